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

import numpy as np
from torch import nn

from edgead.bench.machine import save_record
from edgead.data.mvtec import list_test, load_images, load_masks
from edgead.data.preprocess import PreprocessConfig
from edgead.methods import load_method
from edgead.methods.fusion import fuse_runs
from edgead.methods.validation import run_graph
from edgead.metrics import compute_metrics

RESULTS = Path(__file__).resolve().parent / "results"


def figures_on_test(graph: nn.Module, pre: PreprocessConfig, data: Path) -> dict[str, float]:
    samples = list_test(data)
    maps, scores = run_graph(graph, load_images(samples, pre))
    masks = load_masks(samples, maps.shape[-1])
    labels = np.array([s.label for s in samples])
    metrics = compute_metrics(labels, scores, masks if masks.any() else None, maps if masks.any() else None)
    return {k: round(float(v), 4) for k, v in metrics.items() if k in ("image_auroc", "pixel_auroc", "aupro")}


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
            "test": figures_on_test(method.inference_graph().eval(), pre, args.data),
        }
    record["fused_test"] = figures_on_test(fused, pre, args.data)
    print(record["members"], record["fused_test"])
    tag = args.tag or "+".join(m.config.method for m in methods)
    save_record(record, RESULTS, f"fusion_{record['dataset']}_{tag}.json", args.out)


if __name__ == "__main__":
    main()
