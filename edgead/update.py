"""``edgead update``: add normal images to a run whose fit is statistics or a memory bank, without training.

A new run is written beside the old one (kept unchanged), with the old run's settings, its held-out normal
images (so the threshold of the new export is calibrated on the same images), and its lineage in
``config.json`` (``lineage``: the run it came from, the folders and number of images added). It exports,
recalibrates and verifies as any run.

- gaussian (``update = "refit"``): the per-stage statistics are fitted again on the original training images
  and the added ones (the pretrained backbone is unchanged; the run's resolved settings are kept, so no
  automatic choice is made again);
- lafite (``update = "extend"``): the added images' features, standardised as the U-Net was trained, join the
  memory bank: the new coreset is chosen (the same greedy k-center rule, eq. 9) from the old coreset and the
  added slices. The U-Net and the feature statistics are unchanged.

Methods that learn a network from the images refuse, naming the command to retrain instead.
"""

from __future__ import annotations

import copy
import datetime as dt
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgead.config import RunConfig, TrainConfig, mark_latest, new_run_dir
from edgead.data.holdout import HOLDOUT_NAME
from edgead.data.io import IMAGE_EXTENSIONS
from edgead.data.mvtec import load_images, split_validation
from edgead.data.preprocess import PreprocessConfig
from edgead.methods import get_method
from edgead.methods.base import FitContext
from edgead.pipeline import training_samples


class UpdateError(ValueError):
    """The run cannot be updated (names the run, the method or the folder and what to do)."""


def normal_images(folders: list[Path]) -> list[Path]:
    """The image files of each folder (not its subfolders), sorted; every folder must hold at least one."""
    paths: list[Path] = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise UpdateError(f"--normal {folder}: not a folder (expected a folder of normal images)")
        found = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise UpdateError(f"--normal {folder}: no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
        paths += found
    return paths


def original_training_paths(config: RunConfig) -> list[Path]:
    """The images the run was fitted on: its data roots' normal images minus the ones it held out."""
    roots = [Path(r) for r in config.data.get("roots", [config.data["root"]])]
    held = {str(Path(p).resolve()) for p in config.data.get("validation_paths", [])}
    paths = []
    for root in roots:
        if not root.is_dir():
            raise UpdateError(
                f"the run's training data {root} is gone: gaussian's update refits on the original images and the "
                "added ones; put the data back at that path, or train a new run on both"
            )
        samples = training_samples(root)
        val_fraction = (config.spec or {}).get("val_fraction")
        if held or val_fraction is None:
            paths += [Path(s.path) for s in samples if str(Path(s.path).resolve()) not in held]
        else:
            kept, _ = split_validation(samples, val_fraction, TrainConfig.from_dict(config.train).seed)
            paths += [Path(s.path) for s in kept]
    return paths


def update_run(
    run_dir: Path,
    normal_dirs: list[Path],
    runs_root: Path | None = None,
    on_event: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write the updated run; returns ``(new run folder, summary)`` (the summary has ``seconds``).

    Raises:
        UpdateError: A method that trains a network, a tiled run, a missing folder or image.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    config = RunConfig.load(run_dir)
    method_cls = get_method(config.method)
    kind = getattr(method_cls, "update", None)
    if not isinstance(kind, str):
        raise UpdateError(
            f"{run_dir}: {config.method} learns a network from its normal images, so new images need training: "
            f"edgead train --method {config.method} --data <the old data> --data <a folder with the new images> "
            "(edgead update works for methods whose fit is statistics or a memory bank: gaussian, lafite)"
        )
    if config.tiling:
        raise UpdateError(f"{run_dir}: a tiled run cannot be updated yet; train a new run on both image sets")
    added = normal_images([Path(d) for d in normal_dirs])
    frame = PreprocessConfig.from_dict(config.preprocess)
    new_config = copy.deepcopy(config)
    target = new_run_dir(config.method, Path(runs_root) if runs_root is not None else run_dir.parent.parent)
    new_config.lineage = {
        "updated_from": str(run_dir),
        "how": kind,
        "added_folders": [str(Path(d).resolve()) for d in normal_dirs],
        "added_images": len(added),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        summary = _fill(target, run_dir, config, new_config, method_cls, kind, added, frame, on_event)
    except BaseException:  # a half-written run is never left behind; the old one was only read
        shutil.rmtree(target, ignore_errors=True)
        raise
    summary["seconds"] = round(time.perf_counter() - start, 1)
    new_config.state.update({"summary": {**config.state.get("summary", {}), "update": summary}})
    new_config.save(target)
    mark_latest(target, report=on_event)
    return target, summary


def _fill(
    target: Path,
    run_dir: Path,
    config: RunConfig,
    new_config: RunConfig,
    method_cls: Any,
    kind: str,
    added: list[Path],
    frame: PreprocessConfig,
    on_event: Callable[[str], None] | None,
) -> dict[str, Any]:
    """The new run's files: the held-out images, then the refitted statistics or the extended memory bank."""
    shutil.copyfile(run_dir / HOLDOUT_NAME, target / HOLDOUT_NAME)
    say = on_event or (lambda _: None)
    train_cfg = TrainConfig.from_dict(config.train)
    if kind == "refit":
        original = original_training_paths(config)
        say(f"refitting {config.method} on {len(original)} original and {len(added)} added normal images")
        images = torch.from_numpy(np.ascontiguousarray(load_images([*original, *added], frame)))
        new_config.data = {**config.data, "n_train": len(images)}
        new_config.save(target)
        from edgead.train.distributed import init_distributed

        method = method_cls(new_config, target)
        ctx = FitContext(images=images, train=train_cfg, dist=init_distributed("cpu"), progress=False)
        summary = method.fit(ctx)
        summary.update(method.calibrate_maps(ctx))
    else:
        say(f"extending {config.method}'s memory bank with {len(added)} normal images (the U-Net unchanged)")
        method = method_cls.load(run_dir, config)
        new_config.data = {**config.data, "n_train": int(config.data.get("n_train", 0)) + len(added)}
        new_config.save(target)
        images = torch.from_numpy(np.ascontiguousarray(load_images(added, frame)))
        summary = method.extend(images, target, new_config, train_cfg)
    return summary


__all__ = ["UpdateError", "normal_images", "original_training_paths", "update_run"]
