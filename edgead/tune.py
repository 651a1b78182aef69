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

import dataclasses
import itertools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from edgead.config import RunConfig, mark_latest, new_run_dir
from edgead.methods import get_method
from edgead.methods.base import Method
from edgead.methods.validation import CRITERION, ranked
from edgead.pipeline import train_run
from edgead.progress import format_eta
from edgead.spec import RunSpec


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


def pseudo_validate(method: Method, run_dir: Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Image and pixel AUROC of ``method``'s graph on its run's held-out normals plus pseudo-anomalies (the
    methods' pseudo-validation service, ``edgead.methods.validation``; ``run_dir``: the method's own)."""
    return method.pseudo_validation_set().evaluate(method.inference_graph(tiled=False), device=device)


def tune_run(
    spec: RunSpec,
    grid: dict[str, list[Any]] | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Path, dict[str, Any]]:
    """Fit and pseudo-validate every candidate of ``grid`` (default: the method's ``tune_grid``) over
    ``spec.params``; keep the best as a new run under ``spec.runs_root`` (marked latest). Returns ``(run_dir,
    tuning record)``."""
    method_name, runs_root, method_params = spec.method, Path(spec.runs_root), spec.params
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
    total = len(candidates({k: grid[k] for k in fitted})) * len(candidates({k: grid[k] for k in inference}))
    rows: list[dict[str, Any]] = []
    run_dirs: list[Path] = []  # the fitted run of each row
    try:
        for fit_values in candidates({k: grid[k] for k in fitted}) if fitted else [{}]:
            fit_spec = dataclasses.replace(spec, params={**base, **fit_values}, runs_root=str(work), out=None)
            run_dir, _ = train_run(fit_spec, progress=progress)
            config = RunConfig.load(run_dir)
            validation = None  # one set per fitted run, shared by its inference-only candidates
            for inference_values in candidates({k: grid[k] for k in inference}) if inference else [{}]:
                config.method_params.update(inference_values)
                method = cls.load(run_dir, config)
                if validation is None:
                    validation = method.pseudo_validation_set()
                figures = validation.evaluate(method.inference_graph(tiled=False))
                rows.append({"params": {**fit_values, **inference_values}, **figures})
                run_dirs.append(run_dir)
                done, elapsed = len(rows), time.perf_counter() - start
                eta = f", ETA {format_eta(elapsed / done * (total - done))}" if done < total else ""
                log(
                    f"  [{done}/{total}{eta}] {json.dumps(rows[-1]['params'])}: pseudo-validation image AUROC "
                    f"{figures['image_auroc']:.4f}, pixel AUROC {figures['pixel_auroc']:.4f}"
                )
        best_index = ranked(dict(enumerate(rows)))[0]  # the service's rule: image, then pixel AUROC
        best, chosen = rows[best_index], run_dirs[best_index]
        config = RunConfig.load(chosen)
        config.method_params.update(best["params"])
        record = {
            "grid": grid,
            "base_params": base,
            "criterion": CRITERION,
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
