"""Shared setup of the export/runtime tests: a generated dataset and a briefly trained tiny run."""

from __future__ import annotations

from pathlib import Path

from edgead.config import TrainConfig
from edgead.data.synthetic import generate_dataset
from edgead.demo import DEMO_CATEGORY, DEMO_IMAGE_SIZE, demo_train_config
from edgead.pipeline import train_run
from edgead.spec import RunSpec


def make_tiny_run(root: Path, image_size: int = 32, steps: int = 5) -> tuple[Path, Path]:
    """Return ``(data_root, run_dir)``; a few steps suffice for numerical parity tests."""
    data = generate_dataset(root / "data", size=image_size, n_train=24, n_test_good=6, n_test_defect=6, seed=3)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, checkpoint_every=steps)
    run_dir, _ = train_run(
        RunSpec(method="score-resilience", data=[data], preset="tiny", image_size=image_size, train=cfg,
                params={"n_draws": 2}, runs_root=root / "runs", device="cpu"),
        progress=False,
    )  # fmt: skip
    return data, run_dir


def make_gaussian_run(root: Path, image_size: int = 64) -> tuple[Path, Path]:
    """Return ``(data_root, run_dir)`` of the gaussian method (bundled ImageNet backbone, statistics fitted in
    seconds) on a generated dataset: a fitted model for the INT8 and backend tests, where an untrained network's
    noise would say nothing."""
    data = generate_dataset(root / "data", size=image_size, n_train=40, n_test_good=6, n_test_defect=6, seed=3)
    run_dir, _ = train_run(
        RunSpec(method="gaussian", data=[data], image_size=image_size, runs_root=root / "runs", device="cpu"),
        progress=False,
    )
    return data, run_dir


def train_on_demo_data(method: str, root: Path, steps: int = 600) -> tuple[Path, Path, dict]:
    """The acceptance tests' run: ``method`` (tiny preset) trained on the demo's generated defects with the
    demo's short-run settings; returns ``(data_root, run_dir, summary)``."""
    data = generate_dataset(root / "data", category=DEMO_CATEGORY, size=DEMO_IMAGE_SIZE, seed=0)
    cfg = demo_train_config(steps=steps, max_time_s=None, seed=0)
    run_dir, summary = train_run(
        RunSpec(method=method, data=[data], preset="tiny", image_size=DEMO_IMAGE_SIZE, train=cfg,
                runs_root=root / "runs", device="cpu"),
        progress=False,
    )  # fmt: skip
    return data, run_dir, summary
