"""CPU/GPU latency of an exported detector vs PyTorch eager, runtime memory without torch, camera-loop FPS.

Latency does not depend on the weights, so by default the run is a short training on generated data;
pass --run to time a real run (needed where the graph's shapes depend on the data, e.g. the number of
components gaussian keeps).

Examples:
    python benchmarks/latency.py --preset small --image-size 192 --n-draws 3
    python benchmarks/latency.py --run runs/gaussian/latest --tag gaussian_magnetic_tile_opca
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from edgead.bench.machine import machine_record, save_record
from edgead.bench.report import run_bench
from edgead.config import TrainConfig
from edgead.data.synthetic import generate_dataset
from edgead.export.exporter import ExportOptions, export_run
from edgead.pipeline import train_run
from edgead.spec import RunSpec

RESULTS = Path(__file__).resolve().parent / "results"

RUNTIME_ONLY = """
import json, sys
sys.modules["torch"] = None  # prove the measured process never loads torch
from edgead.bench.report import run_bench
report = run_bench(sys.argv[1], backend="onnxruntime", warmup_s=float(sys.argv[2]), duration_s=float(sys.argv[3]),
                   torch_baseline=False, camera_loop=False)
total = report["backend"]["stages"]["total"]
print(json.dumps({"memory": report["memory_after_backend"], "median_ms": total["median"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="trained run (default: a 1-step run on generated data)")
    parser.add_argument("--method", default="score-resilience", help="method of the default run")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--n-draws", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--tag", default=None, help="name part of the default result file")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_dir = args.run
        if run_dir is None:
            data = generate_dataset(work / "data", size=args.image_size, n_train=20, n_test_good=2, n_test_defect=2)
            params = {"n_draws": args.n_draws} if args.method == "score-resilience" else {}
            spec = RunSpec(
                method=args.method,
                data=[str(data)],
                preset=args.preset,
                image_size=args.image_size,
                train=TrainConfig(steps=1, batch_size=2),
                runs_root=str(work / "runs"),
                params=params,
            )
            run_dir, _ = train_run(spec, progress=False)
        run_cfg = json.loads((Path(run_dir) / "config.json").read_text())
        export_dir = work / "export"
        export_run(run_dir, export_dir, ExportOptions(precision=args.precision), log=print)
        report = run_bench(
            export_dir, backend="onnxruntime", precision=args.precision, warmup_s=args.warmup, duration_s=args.duration
        )
        runtime_only = subprocess.run(
            [sys.executable, "-c", RUNTIME_ONLY, str(export_dir), str(args.warmup), str(args.duration / 4)],
            capture_output=True,
            text=True,
            check=True,
        )
    report.pop("export")
    report["runtime_process_without_torch"] = json.loads(runtime_only.stdout.strip().splitlines()[-1])
    record = {
        "benchmark": "latency",
        "command": " ".join(["python", *sys.argv]),
        "method": run_cfg["method"],
        "run": args.run.name if args.run else None,
        "image_size": run_cfg["preprocess"]["image_size"],
        "method_params": run_cfg["method_params"],
        "model": run_cfg.get("model"),
        "precision": args.precision,
        **report,
        "machine": machine_record(),
    }
    tag = args.tag or f"{args.preset}_{args.image_size}_n{args.n_draws}"
    print(report["table"])
    save_record(record, RESULTS, f"latency_{{device}}_{tag}.json", args.out)


if __name__ == "__main__":
    main()
