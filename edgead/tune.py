"""``edgead tune``: choose a method's free settings on a pseudo-validation set, never on test data.

A user has only normal images. Following LafitE (Sec. 3.4, Fig. 6), every candidate setting is scored on the
run's held-out normal images plus as many pseudo-anomalies made from them (image AUROC, then pixel AUROC on
the pasted fragments as tie-break); the best candidate becomes the run, and every candidate's figures are
recorded in its ``config.json`` (``state.tuning``).

Cost: candidates are grouped by the parameters that need a new fit; parameters a method declares as
inference-only (``Method.inference_params``: e.g. the image-score aggregation, sampler steps, draws) reuse
the fitted run and only rebuild the graph. Methods may cache more (gaussian reuses the backbone features
across statistics-only candidates).
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from edgead.config import DEFAULT_RUNS_DIR, RunConfig, TrainConfig, mark_latest, new_run_dir
from edgead.data.holdout import load_holdout
from edgead.data.pseudo import pseudo_validation_set
from edgead.methods import get_method
from edgead.methods.base import Method, run_graph
from edgead.metrics import image_auroc, pixel_auroc
from edgead.pipeline import train_run


def parse_grid(items: list[str], method: type[Method]) -> dict[str, list[Any]]:
    """``KEY=V1,V2,...`` (each value JSON, else a string) or ``KEY=[[...], [...]]`` (a JSON list of
    candidates, for list-valued parameters) -> ``{KEY: [candidates]}``; keys and values are validated."""
    grid: dict[str, list[Any]] = {}
    names = {f.name for f in fields(method.Params)}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not text:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,...")
        if key not in names:
            raise ValueError(f"--grid {key}: {method.name} has no parameter {key!r}; it has {', '.join(sorted(names))}")
        if text.lstrip().startswith("[["):
            values = json.loads(text)
        else:
            values = []
            for part in text.split(","):
                try:
                    values.append(json.loads(part))
                except json.JSONDecodeError:
                    values.append(part.strip())
        for value in values:
            method.parse_params({key: value})  # names the key and what is allowed
        grid[key] = values
    return grid


def candidates(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def pseudo_validate(method: Method, run_dir: Path, device: str = "cpu") -> dict[str, float]:
    """Image and pixel AUROC of ``method``'s graph on the run's held-out normals plus pseudo-anomalies."""
    rgb, _ = load_holdout(run_dir, method.config.data.get("holdout"))
    if len(rgb) < 2:
        raise ValueError(f"{run_dir}: tuning needs at least two held-out normal images; train with --val-fraction > 0")
    images, labels, masks = pseudo_validation_set(rgb, method.preprocess_config, seed=0)
    maps, scores = run_graph(method.build_graph(), images, batch_size=8, device=device)
    return pseudo_figures(labels, masks, maps, scores)


def pseudo_figures(labels: np.ndarray, masks: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Image AUROC over all images and pixel AUROC over the pseudo-anomalies (maps resized to the masks)."""
    if maps.shape[-2:] != masks.shape[-2:]:  # a map at another size (e.g. score-resilience map_size)
        import cv2

        maps = np.stack([cv2.resize(m, masks.shape[-2:][::-1], interpolation=cv2.INTER_LINEAR) for m in maps])
    defect = labels == 1
    return {
        "image_auroc": round(float(image_auroc(labels, scores)), 4),
        "pixel_auroc": round(float(pixel_auroc(masks[defect], maps[defect])), 4),
        "n_normal": int((~defect).sum()),
        "n_pseudo": int(defect.sum()),
    }


def tune_run(
    method_name: str,
    data_root: Path,
    grid: dict[str, list[Any]] | None = None,
    *,
    preset: str | None = None,
    image_size: int | None = None,
    channels: int = 3,
    train_cfg: TrainConfig | None = None,
    method_params: dict[str, Any] | None = None,
    runs_root: Path = DEFAULT_RUNS_DIR,
    val_fraction: float = 0.1,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Path, dict[str, Any]]:
    """Fit and pseudo-validate every candidate of ``grid`` (default: the method's ``tune_grid``) over
    ``method_params``; keep the best as a new run (marked latest). Returns ``(run_dir, tuning record)``."""
    cls = get_method(method_name)
    grid = dict(grid if grid else cls.tune_grid)
    if not grid:
        raise ValueError(f"{method_name} declares nothing to tune; pass --grid KEY=V1,V2")
    base = dict(method_params or {})
    cls.parse_params(base)
    inference = [k for k in grid if k in cls.inference_params]
    fitted = [k for k in grid if k not in cls.inference_params]
    work = Path(runs_root) / method_name / f".tune-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=False)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    run_dirs: list[Path] = []  # the fitted run of each row
    try:
        for fit_values in candidates({k: grid[k] for k in fitted}) if fitted else [{}]:
            run_dir, _ = train_run(
                method_name, data_root, preset=preset, image_size=image_size, channels=channels,
                train_cfg=train_cfg, method_params={**base, **fit_values}, runs_root=work,
                val_fraction=val_fraction, device=device, progress=progress,
            )  # fmt: skip
            config = RunConfig.load(run_dir)
            for inference_values in candidates({k: grid[k] for k in inference}) if inference else [{}]:
                config.method_params.update(inference_values)
                figures = pseudo_validate(cls.load(run_dir, config), run_dir)
                rows.append({"params": {**fit_values, **inference_values}, **figures})
                run_dirs.append(run_dir)
                log(
                    f"  {json.dumps(rows[-1]['params'])}: pseudo-validation image AUROC {figures['image_auroc']:.4f}, "
                    f"pixel AUROC {figures['pixel_auroc']:.4f}"
                )
        best_index = max(range(len(rows)), key=lambda i: (rows[i]["image_auroc"], rows[i]["pixel_auroc"]))
        best, chosen = rows[best_index], run_dirs[best_index]
        config = RunConfig.load(chosen)
        config.method_params.update(best["params"])
        record = {
            "grid": grid,
            "base_params": base,
            "criterion": "pseudo-validation image AUROC, then pixel AUROC",
            "validation": "held-out normal training images + as many pseudo-anomalies (LafitE Sec. 3.4)",
            "candidates": rows,
            "chosen": best["params"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        config.state["tuning"] = record
        config.save(chosen)
        final = new_run_dir(method_name, runs_root)
        final.rmdir()
        chosen.rename(final)
        mark_latest(final)
        return final, record
    finally:
        shutil.rmtree(work, ignore_errors=True)
