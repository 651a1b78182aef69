"""Train a method on an MVTec-layout dataset, evaluate it, and record the figures with their provenance.

Example:
    python benchmarks/accuracy.py --method score-resilience --data DATA/magnetic_tile \
        --preset tiny --image-size 128 --channels 1 --steps 1500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgead.bench.machine import machine_record, save_record
from edgead.config import RunConfig, TrainConfig
from edgead.pipeline import evaluate_run, train_run
from edgead.spec import RunSpec

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--data", required=True, type=Path, help="MVTec-layout dataset root")
    parser.add_argument("--preset", default=None, help="U-Net size (default: tiny for methods that train one)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the method's")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--tile", type=int, default=None, help="tile size (--image-size: the frame)")
    parser.add_argument("--frame-width", type=int, default=None, help="with --tile: the frame's width (oblong)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-schedule", default="cosine")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--max-time", type=float, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--param", action="append", default=[], help="method hyperparameter KEY=JSON")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks"), help="where the run is saved")
    parser.add_argument("--tag", default=None, help="name part of the default result file (default: the preset)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/...)")
    parser.add_argument("--run", type=Path, default=None,
                        help="evaluate this run, trained by this command before, instead of training")  # fmt: skip
    args = parser.parse_args()

    params = {k: json.loads(v) for k, _, v in (p.partition("=") for p in args.param)}
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        warmup_steps=min(100, args.steps // 10),
        ema_decay=args.ema_decay,
        max_time_s=args.max_time,
        checkpoint_every=max(500, args.steps // 4),
    )
    dataset = args.data.resolve().name
    from edgead.methods import get_method

    if args.preset is None and get_method(args.method).uses_preset:
        args.preset = "tiny"
    spec = RunSpec(
        method=args.method,
        data=[str(args.data)],
        preset=args.preset,
        image_size=args.image_size,
        channels=args.channels,
        tile=args.tile,
        frame_width=args.frame_width,
        train=cfg,
        params=params,
        runs_root=str(args.work),
        device=args.device,
    )
    if args.run is None:
        run_dir, summary = train_run(spec)
        config = RunConfig.load(run_dir)
    else:  # the run this command trained (its spec must be the one these options give)
        run_dir, config = args.run, RunConfig.load(args.run)
        summary = config.state["summary"]
        if {**config.spec, "runs_root": None} != {**spec.recorded(), "runs_root": None}:
            parser.error(f"--run {run_dir}: trained from another spec than these options give")
    device = "cuda" if summary["device"].startswith("cuda") else "cpu"
    metrics, report = evaluate_run(run_dir, args.data, device=device)
    eval_info = json.loads(report.read_text())["run"]
    record = {
        "benchmark": "accuracy",
        "method": args.method,
        "dataset": dataset,
        "preset": args.preset,
        "image_size": config.preprocess["image_size"],
        "tiling": config.tiling,
        "method_params_resolved": config.method_params,
        "channels": args.channels,
        "method_params": params,
        "train": {**summary, "config": cfg.__dict__},
        "metrics": metrics,
        "n_test": eval_info["n_test"],
        "inference_seconds_per_image": eval_info["inference_seconds_per_image"],
        "machine": machine_record(),
    }
    print(json.dumps(metrics, indent=2))
    name = f"accuracy_{args.method}_{dataset}_{args.tag or args.preset or 'defaults'}.json"
    save_record(record, RESULTS, name, args.out)


if __name__ == "__main__":
    main()
