"""Score fusion against its members: test figures of each trained run alone and of the fused graph.

The runs must be trained on the same data with the same seed (they then hold out the same normal images,
on which the fusion is standardised and, with ``--how auto``, chosen); nothing here looks at the test set
before the figures are computed.

Example:
    python benchmarks/fusion.py --runs runs/gaussian/RUN runs/lafite/RUN --data $EDGEAD_DATA_ROOT/bsdata
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgead.bench.machine import save_record
from edgead.methods import load_method
from edgead.methods.fusion import fuse_runs
from edgead.pipeline import score_test_split

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, type=Path, help="trained runs, two or more")
    parser.add_argument("--data", required=True, type=Path, help="the MVTec-layout dataset they were trained on")
    parser.add_argument("--how", default="auto", choices=("auto", "mean", "max"))
    parser.add_argument("--tag", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    fused, fusion = fuse_runs(args.runs, args.how)
    methods = [load_method(run) for run in args.runs]
    pre = methods[0].frame_preprocess_config
    record: dict[str, Any] = {
        "benchmark": "fusion",
        "dataset": args.data.resolve().name,
        "image_size": pre.image_size,
        "fusion": fusion,
        "members": {},
    }
    for run, method in zip(args.runs, methods, strict=True):
        record["members"][f"{method.config.method} ({run.name})"] = {
            "method_params": method.config.method_params,
            "test": score_test_split(method.inference_graph().eval(), pre, args.data).headline(),
        }
    record["fused_test"] = score_test_split(fused, pre, args.data).headline()
    print(record["members"], record["fused_test"])
    tag = args.tag or "+".join(m.config.method for m in methods)
    save_record(record, RESULTS, f"fusion_{record['dataset']}_{tag}.json", args.out)


if __name__ == "__main__":
    main()
