"""The input size as a candidate (issue 24): ``edgead tune --grid image_size=...`` on a real data set, then every
size checked against the test set.

Runs what a user runs (:func:`edgead.tune.tune_run`: each size fitted with the method's defaults, every size
scored on one pseudo-validation set made at the largest size and calibrated on the default size, the default
kept unless beaten by more than one standard error), keeps the other sizes' runs, and scores every size on the
test split. The record holds each size's pseudo-validation and test figures, the Spearman correlation of the
two rankings, the chosen size's test figure against the best on test, and the seconds the whole tune took. The
test figures check the choice; they choose nothing.

Example:
    python benchmarks/input_size.py --method gaussian --data $EDGEAD_DATA_ROOT/magnetic_tile --sizes 224,288,320,384
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from choices import figures_on_test, spearman

from edgead.bench.machine import save_record
from edgead.config import RunConfig, TrainConfig
from edgead.spec import RunSpec
from edgead.tune import tune_run

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="gaussian")
    parser.add_argument("--data", required=True, type=Path, help="MVTec-layout dataset root")
    parser.add_argument("--sizes", default="224,288,320,384", help="candidate input sizes, comma-separated")
    parser.add_argument("--param", action="append", default=[], help="method hyperparameter KEY=JSON (all sizes)")
    parser.add_argument("--work", type=Path, default=Path("runs/input_size"))
    parser.add_argument("--tag", default="defaults")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    sizes = [int(v) for v in args.sizes.split(",")]
    params = {k: json.loads(v) for k, _, v in (p.partition("=") for p in args.param)}
    spec = RunSpec(method=args.method, data=[str(args.data)], train=TrainConfig(batch_size=16), params=params,
                   runs_root=str(args.work), device="cpu")  # fmt: skip
    kept = args.work / "candidates"
    shutil.rmtree(kept, ignore_errors=True)
    run_dir, tuning = tune_run(spec, {"image_size": sizes}, progress=False, keep_candidates=kept)

    test: dict[str, dict[str, float]] = {}
    for run in [run_dir, *sorted(kept.iterdir())]:
        config = RunConfig.load(run)
        size = str(config.preprocess["image_size"])
        test[size] = figures_on_test(run, args.data)
        print(f"image_size={size}: test {test[size]}", flush=True)
    rows = tuning["candidates"]
    pseudo = {str(r["params"]["image_size"]): {k: v for k, v in r.items() if k != "params"} for r in rows}
    order = [str(s) for s in sizes]

    def ranks(figure: str) -> float | None:
        return spearman([pseudo[k][figure] for k in order], [test[k][figure] for k in order])

    best_test = max(order, key=lambda k: (test[k]["image_auroc"], test[k]["pixel_auroc"]))
    chosen = str(tuning["chosen"]["image_size"])
    record: dict[str, Any] = {
        "benchmark": "input_size",
        "method": args.method,
        "dataset": args.data.resolve().name,
        "method_params": params,
        "sizes": sizes,
        "default": tuning["default"]["image_size"],
        "chosen": int(chosen),
        "decision": tuning["decision"],
        "set": {k: tuning[k] for k in ("validation", "kinds", "strength", "calibration") if k in tuning},
        "pseudo_validation": pseudo,
        "test": test,
        "spearman_image_auroc": ranks("image_auroc"),
        "spearman_pixel_auroc": ranks("pixel_auroc"),
        "chosen_test_image_auroc": test[chosen]["image_auroc"],
        "best_on_test": int(best_test),
        "best_test_image_auroc": test[best_test]["image_auroc"],
        "tune_seconds": tuning["seconds"],
    }
    save_record(record, RESULTS, f"input_size_{args.method}_{record['dataset']}_{args.tag}.json", args.out)


if __name__ == "__main__":
    main()
