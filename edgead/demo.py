"""``edgead demo``: synthetic data -> tiny score-resilience model on the CPU -> evaluation report."""

from __future__ import annotations

from pathlib import Path

from edgead.config import TrainConfig
from edgead.data.synthetic import generate_dataset
from edgead.pipeline import evaluate_run, train_run
from edgead.spec import RunSpec

#: Settings of the demo and of the end-to-end test: a tiny U-Net at 64x64 that trains in minutes on a CPU.
DEMO_IMAGE_SIZE = 64
DEMO_CATEGORY = "print"


def demo_train_config(steps: int, max_time_s: float | None, seed: int) -> TrainConfig:
    """Short-run settings: a higher constant-then-cosine learning rate than the paper's 1e-4 over
    20k+ steps, because the demo has a few minutes of CPU time; EMA with warm-up."""
    return TrainConfig(
        steps=steps,
        batch_size=16,
        lr=2e-3,
        lr_schedule="cosine",
        warmup_steps=50,
        ema_decay=0.999,
        seed=seed,
        max_time_s=max_time_s,
        checkpoint_every=max(steps, 1),
        amp=False,
    )


def run_demo(
    out: Path, steps: int = 1500, max_time_s: float | None = 240.0, seed: int = 0, progress: bool = True
) -> tuple[dict[str, float], Path]:
    """Run the whole demo in ``out``; return the metrics and the path of ``metrics.json``."""
    out = Path(out)
    data = generate_dataset(out / "data", category=DEMO_CATEGORY, size=DEMO_IMAGE_SIZE, seed=seed)
    spec = RunSpec(
        method="score-resilience",
        data=[str(data)],
        preset="tiny",
        image_size=DEMO_IMAGE_SIZE,
        train=demo_train_config(steps, max_time_s, seed),
        out=str(out / "run"),
        runs_root=str(out / "runs"),
        device="cpu",
    )
    run_dir, _ = train_run(spec, progress=progress)
    return evaluate_run(run_dir, data, out / "report", device="cpu")


def next_commands(out: Path) -> list[str]:
    """What to type after the demo, runnable as printed from the current folder: export its run, run the
    detector on its own defective test images (a folder source, headless, logged), benchmark the export."""
    import shlex

    out = Path(out)
    kinds = sorted(p.name for p in (out / "data" / "test").iterdir() if p.is_dir() and p.name != "good")
    q = lambda path: shlex.quote(str(path))  # noqa: E731
    export = out / "export"
    return [
        f"edgead export --run {q(out / 'run')} --out {q(export)}",
        f"edgead run --export {q(export)} --camera {q(out / 'data' / 'test' / kinds[0])} --headless "
        f"--log {q(out / 'run.jsonl')} --save-anomalies {q(out / 'anomalies')}",
        f"edgead bench --export {q(export)} --duration 5",
    ]
