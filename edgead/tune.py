"""``edgead tune``: choose a method's free settings on a pseudo-validation set, never on test data.

A user has only normal images. Following LafitE (Sec. 3.4, Fig. 6), every candidate setting is scored on the
run's held-out normal images plus as many pseudo-anomalies made from them; every candidate's figures are
recorded in the kept run's ``config.json`` (``state.tuning``).

The set and the choice are the shared service's (:mod:`edgead.methods.validation`, issue 24): one set for
every candidate, calibrated to discriminate on the default candidate (several kinds of defect, small and faint
ones too, at the strongest contrast on which the default scores at most the target image AUROC), and the
default candidate (the settings the run would have without ``tune``) is kept unless the best beats it by more
than one standard error (:func:`~edgead.methods.validation.keep_default_unless_beaten`). Without the default
in the grid, the first candidate calibrates the set and the best is kept.

The input size is a candidate like a parameter (``--grid image_size=224,288,320,384``): small defects on large
images can vanish when the frame is squashed to the model's size. The set is then made once at the largest
candidate size and shown to each candidate at its own size (images resized as the runtime resizes frames,
masks by nearest neighbour), so every size sees the same defects.

Cost: candidates are grouped by the parameters that need a new fit (the input size always does); parameters a
method declares as inference-only (``Method.inference_params``: e.g. the image-score aggregation, sampler
steps, draws) reuse the fitted run and only rebuild the graph. Methods may cache more (gaussian reuses the
backbone features across statistics-only candidates).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from edgead.config import RunConfig, mark_latest, new_run_dir
from edgead.data.files import new_folder
from edgead.data.preprocess import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, PreprocessConfig
from edgead.methods import get_method
from edgead.methods.base import Method
from edgead.methods.validation import (
    CRITERION,
    PseudoValidationSet,
    calibrated_set,
    keep_default_unless_beaten,
    per_image_pixel_auroc,
)
from edgead.pipeline import train_run
from edgead.progress import format_eta
from edgead.spec import RunSpec

#: Grid keys that are not method parameters but fields of the run (each candidate is a new fit).
RUN_KEYS = ("image_size",)  # a candidate size has the range of a run's (edgead.data.preprocess)


def parse_grid(items: list[str], method: type[Method]) -> dict[str, list[Any]]:
    """``KEY=V1,V2,...`` (each value JSON, else a string) or ``KEY=[[...], [...]]`` (a JSON list of
    candidates, for list-valued parameters) -> ``{KEY: [candidates]}``; keys and values are validated."""
    grid: dict[str, list[Any]] = {}
    names = {f.name for f in fields(method.Params)}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not text:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,...")
        if key not in names and key not in RUN_KEYS:
            raise ValueError(
                f"--grid {key}: {method.name} has no parameter {key!r}; it has {', '.join(sorted(names))} "
                f"(and the input size, image_size)"
            )
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
            if key == "image_size":
                whole = isinstance(value, int) and not isinstance(value, bool)
                if not whole or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
                    raise ValueError(
                        f"--grid image_size={value}: expected whole pixels >= {MIN_IMAGE_SIZE} and <= {MAX_IMAGE_SIZE}"
                    )
            else:
                method.parse_params({key: value})  # names the key and what is allowed
        if len(set(map(json.dumps, values))) != len(values):
            raise ValueError(f"--grid {item!r}: a candidate is listed twice")
        grid[key] = values
    return grid


def candidates(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def pseudo_validate(method: Method, run_dir: Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Image and pixel AUROC of ``method``'s graph on its run's held-out normals plus pseudo-anomalies (the
    methods' pseudo-validation service, ``edgead.methods.validation``; ``run_dir``: the method's own)."""
    return method.pseudo_validation_set().evaluate(method.inference_graph(tiled=False), device=device)


def default_candidate(cls: type[Method], spec: RunSpec, grid: dict[str, list[Any]]) -> dict[str, Any]:
    """What each key of ``grid`` would be without ``tune``: the spec's value, else the method's default."""
    params = cls.parse_params(dict(spec.params or {}))
    return {
        key: (spec.image_size or cls.default_image_size) if key == "image_size" else getattr(params, key)
        for key in grid
    }


class _SharedSet:
    """One pseudo-validation set for every candidate: made from ``normals`` (one size), calibrated on the
    reference candidate's preprocessing, rebuilt (same defects, same strength) for another input size."""

    def __init__(self, normals: list[np.ndarray], source: str) -> None:
        self.normals, self.source = normals, source
        self.sets: list[tuple[PreprocessConfig, PseudoValidationSet]] = []

    def calibrate(self, pre: PreprocessConfig, reference: Callable[[PseudoValidationSet], float]) -> None:
        self.sets = [(pre, calibrated_set(self.normals, pre, self.source, reference))]

    def at(self, pre: PreprocessConfig) -> PseudoValidationSet:
        for known, validation in self.sets:
            if known == pre:
                return validation
        first = self.sets[0][1]
        validation = PseudoValidationSet.from_normals(
            self.normals, pre, self.source, kinds=first.kinds, strength=first.strength
        )
        validation = dataclasses.replace(validation, calibration=first.calibration)
        self.sets.append((pre, validation))
        return validation


def tune_run(
    spec: RunSpec,
    grid: dict[str, list[Any]] | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    keep_candidates: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Fit every candidate of ``grid`` (default: the method's ``tune_grid``) over ``spec``, score each on one
    calibrated pseudo-validation set, keep the chosen one (the default unless beaten by more than one standard
    error) as a new run under ``spec.runs_root`` (marked latest). ``keep_candidates``: a folder to move the
    other fitted runs to (benchmarks score them on test data) instead of deleting them. Returns ``(run_dir,
    tuning record)``."""
    method_name, runs_root, method_params = spec.method, Path(spec.runs_root), spec.params
    cls = get_method(method_name)
    grid = dict(grid if grid else cls.tune_grid)
    if not grid:
        raise ValueError(f"{method_name} declares nothing to tune; pass --grid KEY=V1,V2")
    if "image_size" in grid and spec.tile is not None:
        raise ValueError(
            "--grid image_size with --tile: a tiled run's graph takes its frame size; tune the input size without "
            "--tile, or tile at one frame size"
        )
    base = dict(method_params or {})
    cls.parse_params(base)
    inference = [k for k in grid if k in cls.inference_params]
    fitted = [k for k in grid if k not in cls.inference_params]
    default = default_candidate(cls, spec, grid)
    fit_grid = candidates({k: grid[k] for k in fitted}) if fitted else [{}]
    inference_grid = candidates({k: grid[k] for k in inference}) if inference else [{}]
    # the default's fit first: it calibrates the set
    fit_grid.sort(key=lambda values: any(values[k] != default[k] for k in values))
    work = new_folder(Path(runs_root) / method_name, f".tune-{time.strftime('%Y%m%d-%H%M%S')}")  # this tune's own
    start = time.perf_counter()
    total = len(fit_grid) * len(inference_grid)
    rows: list[dict[str, Any]] = []
    run_dirs: list[Path] = []  # the fitted run of each row
    try:
        fits: list[tuple[dict[str, Any], Path]] = []
        for index, fit_values in enumerate(fit_grid, 1):
            params = {k: v for k, v in fit_values.items() if k not in RUN_KEYS}
            fit_spec = dataclasses.replace(
                spec, params={**base, **params}, image_size=fit_values.get("image_size", spec.image_size),
                runs_root=str(work), out=None,
            )  # fmt: skip
            fits.append((fit_values, train_run(fit_spec, progress=progress)[0]))
            if len(fit_grid) > 1:
                log(f"  fitted {index}/{len(fit_grid)}: {json.dumps(fit_values)}")

        def method_of(run_dir: Path, inference_values: dict[str, Any]) -> Method:
            config = RunConfig.load(run_dir)
            config.method_params.update(inference_values)
            return cls.load(run_dir, config)

        # the set: the held-out normals of the largest input size, calibrated on the default candidate
        sizes = [RunConfig.load(run_dir).preprocess["image_size"] for _, run_dir in fits]
        largest = fits[int(np.argmax(sizes))][1]
        shared = _SharedSet(*method_of(largest, {}).held_out_normals())
        has_default = all(default[k] in grid[k] for k in inference)
        reference = method_of(fits[0][1], {k: default[k] for k in inference} if has_default else inference_grid[0])
        reference_graph = reference.inference_graph(tiled=False)
        shared.calibrate(reference.preprocess_config, lambda s: s.evaluate(reference_graph)["image_auroc"])
        paired: dict[int, np.ndarray] = {}
        for fit_values, run_dir in fits:
            for inference_values in inference_grid:
                method = method_of(run_dir, inference_values)
                validation = shared.at(method.preprocess_config)
                maps, scores = validation.outputs(method.inference_graph(tiled=False))
                figures = validation.figures(maps, scores)
                if maps is not None:
                    defect = validation.labels == 1
                    paired[len(rows)] = per_image_pixel_auroc(validation.masks[defect], np.asarray(maps)[defect])
                rows.append({"params": {**fit_values, **inference_values}, **figures})
                run_dirs.append(run_dir)
                done, elapsed = len(rows), time.perf_counter() - start
                eta = f", ETA {format_eta(elapsed / done * (total - done))}" if done < total else ""
                log(
                    f"  [{done}/{total}{eta}] {json.dumps(rows[-1]['params'])}: pseudo-validation image AUROC "
                    f"{figures['image_auroc']:.4f}, pixel AUROC {figures['pixel_auroc']:.4f}"
                )
        default_index = next((i for i, row in enumerate(rows) if row["params"] == default), None)
        figures_by_index = {i: {k: v for k, v in row.items() if k != "params"} for i, row in enumerate(rows)}
        chosen_index, decision = keep_default_unless_beaten(figures_by_index, default_index, paired=paired or None)
        for key in ("best", "chosen", "default"):
            if decision.get(key) is not None:
                decision[key] = rows[decision[key]]["params"]
        best, chosen = rows[chosen_index], run_dirs[chosen_index]
        config = RunConfig.load(chosen)
        config.method_params.update({k: v for k, v in best["params"].items() if k not in RUN_KEYS})
        record = {
            "grid": grid,
            "base_params": base,
            "default": default,
            "criterion": CRITERION,
            **shared.at(reference.preprocess_config).describe(),
            "candidates": rows,
            "decision": decision,
            "chosen": best["params"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        config.state["tuning"] = record
        config.save(chosen)
        final = new_run_dir(method_name, runs_root)
        final.rmdir()
        chosen.rename(final)
        mark_latest(final, report=lambda message: log(f"warning: {message}"))
        if keep_candidates is not None:
            keep_candidates.mkdir(parents=True, exist_ok=True)
            for _, run_dir in fits:
                if run_dir.exists():
                    run_dir.rename(keep_candidates / run_dir.name)
        return final, record
    finally:
        shutil.rmtree(work, ignore_errors=True)
