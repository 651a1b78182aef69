"""What the image-score aggregation changes: one trained run, every aggregation, pseudo-validation vs test.

Trains a run (or takes ``--run``), then for each ``image_score`` value rebuilds the graph (an inference-only
parameter) and records the test metrics and the pseudo-validation image AUROC (held-out normals + as many
pseudo-anomalies), so the table shows both the effect and whether pseudo-validation would have seen it.

Example:
    python benchmarks/image_score.py --method score-resilience --data $EDGEAD_DATA_ROOT/magnetic_tile \
        --preset tiny --image-size 128 --channels 1 --steps 800
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgead.bench.machine import machine_record, save_record
from edgead.config import RunConfig, TrainConfig
from edgead.data.mvtec import list_test, load_images, load_masks
from edgead.methods import get_method
from edgead.methods.base import run_graph
from edgead.metrics import compute_metrics
from edgead.pipeline import train_run
from edgead.spec import RunSpec
from edgead.tune import pseudo_validate

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--run", type=Path, default=None, help="a trained run (default: train one here)")
    parser.add_argument("--preset", default="tiny", help="U-Net size")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cls = get_method(args.method)
    run_dir = args.run
    train_summary = None
    if run_dir is None:
        cfg = TrainConfig(steps=args.steps, batch_size=16, lr=2e-3, lr_schedule="cosine",
                          warmup_steps=min(100, args.steps // 10), ema_decay=0.999,
                          checkpoint_every=max(500, args.steps // 4))  # fmt: skip
        run_dir, train_summary = train_run(
            RunSpec(method=args.method, data=[str(args.data)], preset=args.preset, image_size=args.image_size,
                    channels=args.channels, train=cfg, runs_root=str(args.work)),
        )  # fmt: skip
    samples = list_test(args.data)
    labels = np.array([s.label for s in samples])
    choices = [f.metadata["choices"] for f in cls.Params.__dataclass_fields__.values() if f.name == "image_score"][0]
    rows = []
    for how in choices:
        config = RunConfig.load(run_dir)
        config.method_params["image_score"] = how
        method = cls.load(run_dir, config)
        maps, scores = run_graph(method.build_graph(), load_images(samples, method.preprocess_config))
        masks = load_masks(samples, maps.shape[-1])
        metrics = compute_metrics(labels, scores, masks, maps)
        pseudo = pseudo_validate(method, run_dir)
        rows.append({"image_score": how, "test": {k: round(v, 4) for k, v in metrics.items()},
                     "pseudo_validation": pseudo})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    record = {
        "benchmark": "image_score", "method": args.method, "dataset": args.data.resolve().name,
        "run_params": RunConfig.load(run_dir).method_params, "train": train_summary, "rows": rows,
        "machine": machine_record(),
    }  # fmt: skip
    save_record(record, RESULTS, f"image_score_{args.method}_{args.data.resolve().name}.json", args.out)


if __name__ == "__main__":
    main()
