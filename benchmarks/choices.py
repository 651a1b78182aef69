"""Every automatic choice of a method, checked against the test set: does pseudo-validation rank as the test does?

Trains the method with its defaults (every ``auto`` chosen on pseudo-validation, as ``edgead train`` does),
then, one choice at a time, scores every candidate of that choice on the test split: a candidate that only
changes the inference graph is the same run with the parameter set; one that changes the fit is a new fit with
that parameter fixed (the other choices stay automatic). The record holds, per choice, every candidate's
pseudo-validation figures (from the run) and test figures, the Spearman correlation of the two image AUROC
rankings, and the test figure of the chosen candidate against the best on test. The test figures check the
choices; they choose nothing.

Examples:
    python benchmarks/choices.py --method gaussian --data $EDGEAD_DATA_ROOT/magnetic_tile --work runs/choices
    python benchmarks/choices.py --method lafite --data $EDGEAD_DATA_ROOT/bsdata --run runs/lafite_bench/lafite/latest

``--run`` scores the choices of a run trained elsewhere (``benchmarks/lafite.py accuracy``: a CPU hour per
lafite training); choices that change the fit still train new runs. ``--calibrate`` first makes a copy of that
run whose ``map_calibration`` is chosen by the current code on the run's stored held-out normals (for runs
trained before the option existed); the run itself is left as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from edgead.bench.machine import save_record
from edgead.config import RunConfig, TrainConfig
from edgead.methods import get_method
from edgead.metrics import rank_correlation
from edgead.pipeline import score_test_split, train_run
from edgead.spec import RunSpec

RESULTS = Path(__file__).resolve().parent / "results"

#: Per method: parameter -> (state key of its selection record, key of the candidates' pseudo-validation rows).
CHOICES: dict[str, dict[str, tuple[str, str]]] = {
    "gaussian": {
        "opca_fraction": ("opca_selection", "pseudo_validation_image_auroc"),
        "map_statistics": ("map_statistics_selection", "pseudo_validation"),
        "map_calibration": ("map_calibration_selection", "pseudo_validation"),
    },
    "lafite": {"tau": ("selection", "tau"), "map_calibration": ("map_calibration_selection", "pseudo_validation")},
    # every single tap and every prefix the selection tried (keys "dec0" or "dec1,dec0")
    "score-tscale": {"feature_maps": ("feature_selection", "candidates+prefixes")},
}
#: Parameters whose row keys are comma-joined lists, and whose choice the run keeps in its selection record.
LIST_VALUED = {"feature_maps": "selected"}
SET_KEYS = ("validation", "kinds", "strength", "calibration")
COMMON = {"map_calibration": ("map_calibration_selection", "pseudo_validation")}


def _value(key: str, param: str = "") -> Any:
    if param in LIST_VALUED:
        return key.split(",")
    try:
        return json.loads(key)
    except json.JSONDecodeError:
        return key


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation over at least three candidates (two always rank perfectly or inversely)."""
    rho = rank_correlation(a, b) if len(a) >= 3 else None
    return None if rho is None else round(rho, 3)


def calibrated_copy(run: Path, work: Path) -> Path:
    """A copy of ``run`` under ``work`` with ``map_calibration="auto"`` chosen and its statistics fitted now
    (``Method.calibrate_maps`` on the run's stored held-out normals): the same model, the choice added."""
    copy = work / f"{run.resolve().name}-calibrated"
    if copy.exists():
        raise SystemExit(f"{copy} exists; remove it or pass another --work")
    shutil.copytree(run.resolve(), copy)
    config = RunConfig.load(copy)
    config.method_params["map_calibration"] = "auto"
    for key in ("map_calibration", "map_calibration_selection"):
        config.state.pop(key, None)
    method = get_method(config.method).load(copy, config)
    method.calibrate_maps(None)
    method.config.save(copy)
    return copy


def figures_on_test(run_dir: Path, data: Path, params: dict[str, Any] | None = None) -> dict[str, float]:
    """Image and pixel AUROC and AUPRO of the run (with ``params`` over its own) on the test split."""
    config = RunConfig.load(run_dir)
    config.method_params.update(params or {})
    method = get_method(config.method).load(run_dir, config)
    return score_test_split(method.inference_graph(), method.frame_preprocess_config, data).headline()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--data", required=True, type=Path, help="MVTec-layout dataset root")
    parser.add_argument("--image-size", type=int, default=None, help="default: the method's")
    parser.add_argument("--param", action="append", default=[], help="method hyperparameter KEY=JSON (all runs)")
    parser.add_argument("--run", type=Path, default=None, help="a trained run with the defaults (default: train one)")
    parser.add_argument("--calibrate", action="store_true", help="with --run: choose map_calibration on a copy")
    parser.add_argument("--only", action="append", default=[], help="score only this choice (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("runs/choices"))
    parser.add_argument("--tag", default="defaults")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    cls = get_method(args.method)
    base_params = {k: json.loads(v) for k, _, v in (p.partition("=") for p in args.param)}

    def spec(params: dict[str, Any]) -> RunSpec:
        return RunSpec(method=args.method, data=[str(args.data)], image_size=args.image_size,
                       train=TrainConfig(batch_size=16), params={**base_params, **params},
                       runs_root=str(args.work))  # fmt: skip

    run_dir, summary = (args.run, None) if args.run else train_run(spec({}), progress=False)
    if args.calibrate:
        if args.run is None:
            parser.error("--calibrate needs --run")
        run_dir = calibrated_copy(args.run, args.work)
    config = RunConfig.load(run_dir)
    record: dict[str, Any] = {
        "benchmark": "choices",
        "method": args.method,
        "dataset": args.data.resolve().name,
        "image_size": config.preprocess["image_size"],
        "method_params": base_params,
        "method_params_resolved": config.method_params,
        "defaults_test": figures_on_test(run_dir, args.data),
        "choices": {},
    }
    for param, (state_key, rows_key) in {**COMMON, **CHOICES.get(args.method, {})}.items():
        selection = config.state.get(state_key)
        parts = rows_key.split("+")
        if not selection or any(k not in selection for k in parts) or param in base_params:
            continue
        if args.only and param not in args.only:
            continue
        rows = {key: row for k in parts for key, row in selection[k].items()}
        chosen = config.method_params.get(param)
        if param in LIST_VALUED:
            chosen = ",".join(selection[LIST_VALUED[param]])
        test: dict[str, dict[str, float]] = {}
        for key in rows:
            value = _value(key, param)
            if param in cls.inference_params:
                test[key] = figures_on_test(run_dir, args.data, {param: value})
            else:
                other, _ = train_run(spec({param: value}), progress=False)
                test[key] = figures_on_test(other, args.data)
            print(f"{param}={key}: pseudo {rows[key]} test {test[key]}", flush=True)
        pseudo_image = [r["image_auroc"] if isinstance(r, dict) else float(r) for r in rows.values()]
        test_image = [test[k]["image_auroc"] for k in rows]
        # the service's rule on the test figures: image AUROC, then pixel AUROC (map-only choices tie on image)
        best_test = max(test, key=lambda k: (test[k]["image_auroc"], test[k]["pixel_auroc"]))
        record["choices"][param] = {
            "chosen": chosen,
            "decision": selection.get("decision"),
            "set": {k: v for k, v in selection.get(f"{param}_set", selection).items() if k in SET_KEYS},
            "pseudo_validation": rows,
            "test": test,
            "spearman_image_auroc": spearman(pseudo_image, test_image),
            "spearman_pixel_auroc": spearman(
                [r["pixel_auroc"] for r in rows.values() if isinstance(r, dict) and "pixel_auroc" in r],
                [test[k]["pixel_auroc"] for k, r in rows.items() if isinstance(r, dict) and "pixel_auroc" in r],
            ),
            "chosen_test_image_auroc": test.get(json.dumps(chosen) if not isinstance(chosen, str) else chosen, {}).get(
                "image_auroc"
            ),
            "best_on_test": _value(best_test, param),
            "best_test_image_auroc": test[best_test]["image_auroc"],
        }
    record["train_summary"] = summary if summary is not None else f"the given run {run_dir.name}"
    name = f"choices_{args.method}_{record['dataset']}_{args.tag}.json"
    save_record(record, RESULTS, name, args.out)


if __name__ == "__main__":
    main()
