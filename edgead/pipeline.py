"""Train and evaluate a method end to end: the functions behind ``edgead train``, ``eval`` and ``demo``."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgead.config import RunConfig, TrainConfig, mark_latest, new_run_dir
from edgead.data.files import LockBusyError, exclusive_lock
from edgead.data.holdout import save_holdout
from edgead.data.io import list_images, read_image
from edgead.data.mvtec import (
    DatasetLayoutError,
    Sample,
    held_out_count,
    list_test,
    list_train,
    load_images,
    load_masks,
    split_validation,
    validate_dataset,
)
from edgead.data.preprocess import PreprocessConfig, height_width, resize_image
from edgead.methods import get_method, load_method
from edgead.methods.base import FitContext, run_graph
from edgead.methods.params import candidate_notes
from edgead.methods.tiling import frame_config, load_tiles, with_frame
from edgead.progress import Progress
from edgead.spec import RunSpec
from edgead.train.distributed import init_distributed, shutdown
from edgead.train.memory import release_freed_memory


def training_samples(data_root: Path) -> list[Sample]:
    """Normal images to train on: ``<root>/train/good`` (MVTec layout, validated up front) or a plain folder."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"{data_root}: data directory not found")
    if (data_root / "train").is_dir():
        validate_dataset(data_root, check_masks=(data_root / "test").is_dir())
        return list_train(data_root)
    paths = list_images(data_root)
    if not paths:
        raise DatasetLayoutError(
            f"{data_root}: no images and no train/good folder; expected the MVTec layout "
            "<root>/train/good/*.png or a folder of normal images"
        )
    for path in paths:
        read_image(path)  # a broken file fails here, before any training starts
    return [Sample(path=p, label=0, defect_type="good", mask_path=None) for p in paths]


#: Fewest training images (after the hold-out) a run is fitted on. Engineering choice: a Gaussian needs two feature
#: vectors per position, LafitE's feature editing a neighbour, and a network shown one picture memorises it.
MIN_TRAIN_IMAGES = 2


def check_training_set_size(found: list[tuple[Path, list[Sample]]], val_fraction: float, method: str) -> None:
    """Refuse, before any work, a training set that the hold-out leaves too small; the message says what was
    found, what was held out and what to do."""
    counts = [(root, len(samples), held_out_count(len(samples), val_fraction)) for root, samples in found]
    left = sum(n - held for _, n, held in counts)
    if left >= MIN_TRAIN_IMAGES and all(n > held for _, n, held in counts):
        return
    where = "; ".join(
        f"{root}: {n} normal image{'' if n == 1 else 's'} found, {held} held out for validation"
        for root, n, held in counts
    )
    raise DatasetLayoutError(
        f"{method} needs at least {MIN_TRAIN_IMAGES} training images (and one from every data set) after the "
        f"hold-out (--val-fraction {val_fraction:g}); {left} left ({where}). Add normal images, or train with "
        "--val-fraction 0 (then give `edgead export` --data with other normal images to calibrate the threshold)"
    )


def train_run(
    spec: RunSpec,
    *,
    resume: Path | None = None,
    progress: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> tuple[Path | None, dict[str, Any]]:
    """Fit the method of ``spec`` on the normal images of its data roots and save the run; with ``resume``, continue
    that run with the settings and data it recorded (only ``spec.device`` is taken from ``spec``).

    ``on_event`` receives warnings before training starts (e.g. images smaller than the training size); they
    are also kept in the summary's ``warnings``.

    Several roots train one unified model on all of them (LafitE's multi-class setting); each root gives
    its own share of held-out images. The run's ``config.json`` records ``spec`` (``edgead train --config
    RUN/config.json`` starts the same run again).

    Returns ``(run_dir, summary)``; ``run_dir`` is None on non-zero DDP ranks, which do not write.
    """
    method_name = spec.method
    method_cls = get_method(method_name)
    preset = spec.preset
    if preset is not None and not method_cls.uses_preset:
        raise ValueError(f"--preset {preset}: the {method_name} method trains no network to size; leave --preset out")
    preset = preset or "small"
    dist_info = init_distributed(spec.device)
    locks = contextlib.ExitStack()
    try:
        if resume is not None:
            config = RunConfig.load(resume)
            if config.method != method_name:
                raise ValueError(f"{resume} is a {config.method} run, not {method_name}")
            train_cfg = TrainConfig.from_dict(config.train)
            data_root = [Path(r) for r in config.data.get("roots", [config.data["root"]])]
            val_fraction = config.spec.get("val_fraction", spec.val_fraction) if config.spec else spec.val_fraction
            run_dir = Path(resume)
            notes: list[str] = []
            if dist_info.is_main:
                _lock_run(locks, run_dir)
        else:
            spec.validate()
            train_cfg, data_root, val_fraction = spec.train, spec.data_paths, spec.val_fraction
            run_dir = Path(spec.out) if spec.out is not None else None
            params = method_cls.parse_params(spec.params)
            notes = candidate_notes(spec.params, params)  # repeated candidates dropped: said in the log and summary
            model = method_cls.model_config(preset, spec.channels, params)
            config = RunConfig(
                method=method_name,
                preprocess=PreprocessConfig(
                    image_size=method_cls.default_image_size if spec.image_size is None else spec.image_size,
                    channels=spec.channels,
                ).to_dict(),
                method_params=params.to_dict(),
                model=model,
                train=asdict(train_cfg),
                spec=spec.recorded(),
            )
            if spec.tile is not None:  # the method sees tiles; the frame is what the export takes
                height = config.preprocess["image_size"]
                tiles = {"tile": spec.tile, "overlap": spec.tile_overlap}
                config.tiling = with_frame(tiles, height, spec.frame_width or height)
                config.preprocess["image_size"] = spec.tile
        train_cfg.validate()
        roots = list(data_root)
        if not roots:
            raise ValueError("no data root given")
        if len({r.resolve() for r in roots}) < len(roots):
            raise ValueError(f"the same data root is given twice: {', '.join(map(str, roots))}")
        found = [(root, training_samples(root)) for root in roots]
        check_training_set_size(found, val_fraction, method_name)
        train_samples, val_samples = [], []
        for _, samples in found:
            kept, held = split_validation(samples, val_fraction, train_cfg.seed)
            train_samples += kept
            val_samples += held
        if resume is None and train_cfg.epochs is not None:  # a resumed run recorded its derived steps
            per_step = train_cfg.batch_size * dist_info.world_size
            train_cfg = dataclasses.replace(
                train_cfg, steps=max(1, math.ceil(train_cfg.epochs * len(train_samples) / per_step))
            )
            config.train = asdict(train_cfg)
            if dist_info.is_main and on_event is not None:
                on_event(
                    f"{train_cfg.epochs} epochs of {len(train_samples)} images at batch {per_step}: "
                    f"{train_cfg.steps} steps"
                )
        pre = PreprocessConfig.from_dict(config.preprocess)
        frame = frame_config(pre, config.tiling)
        warnings = [*notes, *[w for w in [upscale_warning([s.path for s in train_samples], frame.size)] if w]]
        if dist_info.is_main and on_event is not None:
            for warning in warnings:
                on_event(f"warning: {warning}")
        if dist_info.is_main and resume is None:
            run_dir = run_dir if run_dir is not None else new_run_dir(method_name, Path(spec.runs_root))
            run_dir.mkdir(parents=True, exist_ok=True)
            _lock_run(locks, run_dir)
            config.data = {
                "root": str(roots[0].resolve()),
                **({"roots": [str(r.resolve()) for r in roots]} if len(roots) > 1 else {}),
                "n_train": len(train_samples),
                "validation_paths": [str(Path(s.path).resolve()) for s in val_samples],
                # The held-out images themselves, so export works after the dataset moved.
                "holdout": save_holdout(run_dir, [s.path for s in val_samples], frame),
            }
            config.save(run_dir)
        if config.tiling:
            images = load_tiles(train_samples, frame, config.tiling["tile"], config.tiling["overlap"])
        else:
            images = load_images(train_samples, frame)
        images = torch.from_numpy(np.ascontiguousarray(images))
        method = method_cls(config, run_dir if dist_info.is_main else None)
        ctx = FitContext(images=images, train=train_cfg, dist=dist_info, resume=resume is not None, progress=progress)
        summary = method.fit(ctx)
        release_freed_memory()  # what the fit's steps freed, before the map calibration's sets
        if dist_info.is_main:  # the map calibration's statistics and choice (every method; calibration.py)
            summary.update(method.calibrate_maps(ctx))
        summary["device"] = str(dist_info.device)
        if warnings:
            summary["warnings"] = warnings
        summary["world_size"] = dist_info.world_size
        if not dist_info.is_main:
            return None, summary
        config.state.update({"summary": summary})
        config.save(run_dir)
        say = None if on_event is None else lambda message: on_event(f"warning: {message}")
        mark_latest(run_dir, report=say)  # a `latest` that is not edgead's own is left alone, said in one line
        return run_dir, summary
    finally:
        locks.close()
        shutdown(dist_info)


#: Training images whose sizes :func:`upscale_warning` looks at (a sample: reading every image twice is waste).
SIZE_SAMPLE = 8


def upscale_warning(paths: list[Path], image_size: int | tuple[int, int]) -> str | None:
    """A warning when most (of a sample of) the training images are smaller than the training size (a side, or
    ``(height, width)``): they are enlarged to it, so the model learns interpolated pixels and every camera frame
    must be enlarged the same way to look normal; training at the images' own size avoids both."""
    out_h, out_w = height_width(image_size)
    sizes = [read_image(path).shape[:2] for path in paths[:SIZE_SAMPLE]]
    smaller = [(h, w) for h, w in sizes if h < out_h or w < out_w]
    if not sizes or 2 * len(smaller) <= len(sizes):
        return None
    h, w = smaller[0]
    shortest = min(min(size) for size in smaller)
    size_text, advice = f"{out_h} px", f"--image-size {shortest} or less"
    if out_h != out_w:
        size_text, advice = f"{out_w}x{out_h}", "a frame (--image-size, --frame-width) no larger than the images"
    return (
        f"{len(smaller)} of {len(sizes)} sampled training images (e.g. {w}x{h}) are smaller than the training size "
        f"{size_text}: they are enlarged to it, and every frame must then look like an enlarged image to pass "
        f"as normal. Unless the camera's frames are enlarged the same way, train at {advice}"
    )


TRAIN_LOCK_NAME = ".train.lock"


class RunBusyError(ValueError):
    """Another process is training into the same run directory."""


def _lock_run(locks: contextlib.ExitStack, run_dir: Path) -> None:
    """Hold ``run_dir``'s training lock until training ends: a second ``train``/``--resume`` into the same
    run fails at once instead of interleaving checkpoints."""
    try:
        locks.enter_context(exclusive_lock(Path(run_dir) / TRAIN_LOCK_NAME))
    except LockBusyError as err:
        raise RunBusyError(
            f"{run_dir}: another training process is writing this run ({err.holder}); wait for it to finish"
        ) from None


@dataclass(frozen=True)
class TestScores:
    """A graph's outputs on a data set's test split and the metrics they give (:func:`score_test_split`)."""

    samples: list[Sample]
    labels: np.ndarray  # (N,) 0 normal, 1 defective
    maps: np.ndarray  # (N, H, W)
    scores: np.ndarray  # (N,)
    masks: np.ndarray  # (N, H, W) at the maps' size
    metrics: dict[str, float]  # edgead.metrics.compute_metrics (pixel metrics only where masks exist)
    seconds: float  # the graph's time over the whole split

    def headline(self) -> dict[str, float]:
        """Image AUROC, pixel AUROC and AUPRO to four digits, as benchmark records keep them."""
        return {k: round(float(v), 4) for k, v in self.metrics.items() if k in ("image_auroc", "pixel_auroc", "aupro")}


def score_test_split(
    graph: torch.nn.Module,
    pre: PreprocessConfig,
    data_root: Path,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = False,
) -> TestScores:
    """Run ``graph`` on the test split of ``data_root`` (images preprocessed by ``pre``) and compute the metrics
    (``progress``: the images scored so far, with an ETA)."""
    from edgead.metrics import compute_metrics

    samples = list_test(data_root)
    images = load_images(samples, pre)
    start = time.perf_counter()
    with Progress(f"eval {Path(data_root).name}", len(images), unit="images", enabled=progress) as bar:
        maps, scores = run_graph(graph, images, batch_size=batch_size, device=device, on_batch=bar.advance)
    seconds = time.perf_counter() - start
    masks = load_masks(samples, tuple(maps.shape[-2:]))
    labels = np.array([s.label for s in samples])
    metrics = compute_metrics(labels, scores, masks if masks.any() else None, maps if masks.any() else None)
    return TestScores(samples, labels, maps, scores, masks, metrics, seconds)


def evaluate_run(
    run_dir: Path,
    data_root: Path,
    out_dir: Path | None = None,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    top_k: int = 8,
    threshold: float | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], Path]:
    """Score the test split of ``data_root`` with the run's inference graph and write the report (``progress``:
    the images scored so far, with an ETA).

    With ``threshold`` (e.g. the deployed export's), the report also says what that threshold does on the
    test set: false alarms, misses and the decision of every image (``decisions.csv``).

    Returns ``(metrics, path of metrics.json)``.
    """
    from edgead.report import write_report

    method = load_method(run_dir)
    pre = method.frame_preprocess_config
    test = score_test_split(
        method.inference_graph(), pre, data_root, batch_size=batch_size, device=device, progress=progress
    )
    samples, labels, maps, scores, masks, metrics = (
        test.samples, test.labels, test.maps, test.scores, test.masks, test.metrics
    )  # fmt: skip
    map_size = tuple(maps.shape[-2:])
    rgb = np.stack([resize_image(read_image(s.path), map_size, pre.interpolation) for s in samples])
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"
    at_threshold = None
    if threshold is not None:
        at_threshold = decisions_at_threshold(labels, scores, threshold)
        write_decisions(out_dir / "decisions.csv", samples, labels, scores, threshold)
        metrics = {**metrics, **{f"at_threshold_{k}": v for k, v in at_threshold.items()}}
    extra = {
        "method": method.name,
        "run_dir": str(run_dir),
        "data_root": str(data_root),
        "n_test": len(samples),
        "device": device,
        "inference_seconds_per_image": test.seconds / len(samples),
    }
    report = write_report(
        out_dir, metrics, labels, scores, [str(s.path) for s in samples], rgb, maps, masks, top_k=top_k, extra=extra,
        threshold=threshold,
    )  # fmt: skip
    return metrics, report


def evaluate_runs(
    run_dir: Path,
    data_roots: list[Path],
    out_dir: Path | None = None,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    top_k: int = 8,
    threshold: float | None = None,
    progress: bool = False,
) -> tuple[dict[str, dict[str, float]], Path]:
    """:func:`evaluate_run` on each data set (a report each, in ``<out>/<data set name>``) and the mean of
    every metric over the data sets (LafitE's multi-class protocol), written to ``<out>/summary.json``.

    Returns ``({data set name: metrics, ..., "mean": metrics}, path of summary.json)``.
    """
    from edgead.config import write_json_atomic

    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"
    names = [Path(root).resolve().name for root in data_roots]
    names = [name if names.count(name) == 1 else f"{name}-{i}" for i, name in enumerate(names)]
    results: dict[str, dict[str, float]] = {}
    for name, root in zip(names, data_roots, strict=True):
        results[name], _ = evaluate_run(
            run_dir, root, out_dir / name, batch_size=batch_size, device=device, top_k=top_k, threshold=threshold,
            progress=progress,
        )  # fmt: skip
    keys = [k for k in results[names[0]] if all(k in r for r in results.values())]
    results["mean"] = {k: float(np.mean([results[n][k] for n in names])) for k in keys if not k.endswith("threshold")}
    for name in names:
        results[name] = {k: results[name][k] for k in results["mean"]}
    summary = out_dir / "summary.json"
    write_json_atomic(summary, {"run_dir": str(run_dir), "data": [str(r) for r in data_roots], "metrics": results})
    return results, summary


def decisions_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """What a deployed threshold does on a labelled test set (``score >= threshold`` is anomalous)."""
    from edgead.runtime.decision import decision_threshold, is_anomalous

    threshold = decision_threshold(threshold)
    flagged = is_anomalous(scores, threshold)
    normal, defect = labels == 0, labels == 1
    false_alarms, misses = int((flagged & normal).sum()), int((~flagged & defect).sum())
    hits = int((flagged & defect).sum())
    precision = hits / max(int(flagged.sum()), 1)
    recall = hits / max(int(defect.sum()), 1)
    return {
        "threshold": float(threshold),
        "false_alarms": false_alarms,
        "false_alarm_rate": false_alarms / max(int(normal.sum()), 1),
        "misses": misses,
        "miss_rate": misses / max(int(defect.sum()), 1),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
    }


def write_decisions(
    path: Path, samples: list[Sample], labels: np.ndarray, scores: np.ndarray, threshold: float
) -> None:
    """``decisions.csv``: file, defect type, label, score and the decision of every test image."""
    import csv
    import io

    from edgead.data.files import write_bytes_atomic
    from edgead.runtime.decision import is_anomalous

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["file", "defect_type", "label", "score", "is_anomaly", "correct"])
    for sample, label, score in zip(samples, labels, scores, strict=True):
        flagged = bool(is_anomalous(score, threshold))
        writer.writerow(
            [str(sample.path), sample.defect_type, int(label), f"{score:.6g}", flagged, flagged == bool(label)]
        )
    write_bytes_atomic(path, text.getvalue().encode("utf-8"))
