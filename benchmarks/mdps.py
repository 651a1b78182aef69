"""MDPS on real and generated data: the paper's ablation (Fig. 4) and a cost table (sampler steps N x posterior
samples N_s x guidance), accuracy in PyTorch and latency of the exported graph (ONNX Runtime) against PyTorch
eager and the score-resilience graph, all timed in the same run.

Examples:
    python benchmarks/mdps.py generated --category grain --work runs/mdps_generated  # train as the test does
    python benchmarks/mdps.py accuracy --run runs/mdps_bench/mdps/latest --data $EDGEAD_DATA_ROOT/magnetic_tile
    python benchmarks/mdps.py latency --run runs/mdps_bench/mdps/latest --baseline runs/.../score-resilience/latest

Test data plays no part in any choice: every setting is the run's, or the paper's, or one of the table's
fixed grid; the cost table's subsample of the test split is stratified by defect type and seeded.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from edgead.bench.machine import machine_record, save_record
from edgead.bench.timing import latency_stats, timed_loop
from edgead.config import RunConfig
from edgead.data.mvtec import list_test, load_images, load_masks
from edgead.export.onnx import export_onnx
from edgead.methods import load_method
from edgead.methods.base import run_graph
from edgead.metrics import compute_metrics

RESULTS = Path(__file__).resolve().parent / "results"
ABLATION = {
    "vanilla_ddim": {"mask": False, "rho": 0.0},
    "without_mask": {"mask": False},
    "without_posterior": {"rho": 0.0},
    "mdps": {},
}
#: The settings the paper leaves open (README): eq. 18's eta and eq. 20's lambda, around the defaults.
CHOICES = {
    **{f"eta_{v:g}": {"eta": v} for v in (0.0, 0.3, 1.0, 3.0)},
    **{f"lambda_{v:g}": {"mask_lambda": v} for v in (0.1, 0.3, 0.5)},
}
COST_GRID = [
    {"steps": n, "n_samples": s, "guidance": g} for g in ("exact", "jacobian-free") for s in (1, 4) for n in (2, 5, 10)
]


def _key(setting: dict[str, Any]) -> str:
    return f"N{setting['steps']}_Ns{setting['n_samples']}_{setting['guidance']}"


def _with(method: Any, **settings: Any) -> Any:
    method.params = method.parse_params({**method.config.method_params, **settings})
    return method.build_graph()


def _subsample(samples: list, count: int | None, seed: int = 0) -> list:
    """At most ``count`` samples, the same share of every defect type (and of good images), seeded."""
    if count is None or count >= len(samples):
        return samples
    rng = np.random.default_rng(seed)
    kinds = sorted({s.defect_type for s in samples})
    keep = []
    for kind in kinds:
        group = [s for s in samples if s.defect_type == kind]
        n = max(1, round(count * len(group) / len(samples)))
        keep += [group[i] for i in sorted(rng.choice(len(group), size=min(n, len(group)), replace=False))]
    return keep


def accuracy(args: argparse.Namespace) -> None:
    method = load_method(args.run)
    pre = method.preprocess_config
    samples = _subsample(list_test(args.data), args.subsample)
    labels = np.array([s.label for s in samples])
    images = load_images(samples, pre)
    masks = load_masks(samples, pre.image_size)
    settings = {"ablation": ABLATION, "choices": CHOICES, "cost": {_key(s): s for s in COST_GRID}}[args.table]
    rows = {}
    for name, setting in settings.items():
        start = time.perf_counter()
        maps, scores = run_graph(_with(method, **setting), images, batch_size=args.batch_size)
        metrics = compute_metrics(labels, scores, masks, maps)
        rows[name] = {
            "settings": setting,
            "image_auroc": round(metrics["image_auroc"], 4),
            "pixel_auroc": round(metrics["pixel_auroc"], 4),
            "aupro": round(metrics["aupro"], 4),
            "torch_seconds_per_image": round((time.perf_counter() - start) / len(images), 4),
        }
        print(name, rows[name], flush=True)
    config = RunConfig.load(args.run)
    result = {
        "benchmark": f"mdps_{args.table}",
        "dataset": Path(args.data).resolve().name,
        "test_images": len(samples),
        "test_images_defective": int(labels.sum()),
        "subsample": args.subsample,
        "run": Path(args.run).resolve().name,
        "preset": config.model.get("preset"),
        "image_size": pre.image_size,
        "method_params": config.method_params,
        "train": config.state.get("summary", {}),
        "rows": rows,
        "machine": machine_record(),
    }
    tag = f"_{args.tag}" if args.tag else ""
    save_record(result, RESULTS, f"mdps_{args.table}_{result['dataset']}{tag}.json", args.out)


def generated(args: argparse.Namespace) -> None:
    """Generate a defect data set and train the tiny prior on it exactly as tests/methods/test_mdps.py does."""
    from edgead.config import TrainConfig
    from edgead.data.synthetic import generate_dataset
    from edgead.pipeline import train_run
    from edgead.spec import RunSpec

    data = args.work / args.category
    if not data.exists():
        generate_dataset(data, category=args.category, size=64, n_train=80, n_test_good=16, n_test_defect=24, seed=0)
    cfg = TrainConfig(steps=400, batch_size=16, lr=2e-3, lr_schedule="cosine", warmup_steps=10, ema_decay=0.99)
    spec = RunSpec(method="mdps", data=[str(data)], preset="tiny", image_size=64, train=cfg, params={"steps": 5},
                   runs_root=str(args.work / "runs"), device="cpu")  # fmt: skip
    run_dir, _ = train_run(spec, progress=False)
    print(f"data {data}\nrun {run_dir}")


def _median_ms(fn: Any, warmup_s: float, runs: int) -> float:
    """Median of ``runs`` calls after ``warmup_s`` of unrecorded ones (``edgead.bench.timing``)."""

    def call() -> None:
        fn()  # timed_loop reads a returned dict as stage timings; these calls return outputs

    return round(latency_stats(timed_loop(call, warmup_s, 0.0, min_runs=runs)["total"])["median"], 2)


def _time_graph(graph: torch.nn.Module, work: Path, name: str, size: int, channels: int, args: argparse.Namespace):
    x = torch.rand(1, channels, size, size)
    start = time.perf_counter()
    record = export_onnx(copy.deepcopy(graph), work / f"{name}.onnx", (1, channels, size, size))
    export_s = round(time.perf_counter() - start, 1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(work / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    onnx_ms = _median_ms(lambda: session.run(None, feed), args.warmup, args.runs)

    def eager() -> None:
        with torch.no_grad():
            graph(x)

    torch_ms = _median_ms(eager, args.warmup, args.runs)
    return {
        "onnxruntime_ms": onnx_ms,
        "torch_eager_ms": torch_ms,
        "speedup_vs_torch_eager": round(torch_ms / onnx_ms, 2),
        "export_seconds": export_s,
        "onnx_nodes": record["nodes"],
        "onnx_bytes": record["bytes"],
    }


def latency(args: argparse.Namespace) -> None:
    method = load_method(args.run)
    pre = method.preprocess_config
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.baseline is not None:
            base = load_method(args.baseline)
            base_config = copy.deepcopy(base.config)
            base_config.preprocess["image_size"] = pre.image_size  # same input as MDPS
            base = type(base).load(Path(args.baseline), base_config)
            rows["score-resilience"] = _time_graph(base.build_graph(), work, "base", pre.image_size, pre.channels, args)
            print("score-resilience", rows["score-resilience"], flush=True)
        grid = [s for s in COST_GRID if not args.only or _key(s) in args.only]
        for setting in sorted(grid, key=lambda s: s["steps"] * s["n_samples"]):
            rows[_key(setting)] = _time_graph(_with(method, **setting), work, _key(setting), pre.image_size,
                                              pre.channels, args)  # fmt: skip
            print(_key(setting), rows[_key(setting)], flush=True)
    if "score-resilience" in rows:
        base_ms = rows["score-resilience"]["onnxruntime_ms"]
        for row in rows.values():
            row["vs_score_resilience"] = round(row["onnxruntime_ms"] / base_ms, 2)
    config = RunConfig.load(args.run)
    result = {
        "benchmark": "mdps_latency",
        "run": Path(args.run).resolve().name,
        "image_size": pre.image_size,
        "channels": pre.channels,
        "preset": config.model.get("preset"),
        "baseline": None
        if args.baseline is None
        else "score-resilience graph of " + Path(args.baseline).resolve().name,
        "method_params": config.method_params,
        "precision": "fp32",
        "batch": 1,
        "timing": f"median of {args.runs} runs after {args.warmup:g} s warm-up, one process, "
        f"{torch.get_num_threads()} threads",
        "rows": rows,
        "machine": machine_record(),
    }
    tag = f"_{args.tag}" if args.tag else ""
    save_record(result, RESULTS, f"latency_{{device}}_mdps{tag}.json", args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--run", required=True, type=Path)
    acc.add_argument("--data", required=True, type=Path)
    acc.add_argument("--table", choices=("ablation", "choices", "cost"), default="ablation")
    acc.add_argument("--subsample", type=int, default=None, help="stratified share of the test split")
    acc.add_argument("--batch-size", type=int, default=16)
    acc.add_argument("--tag", default=None)
    acc.add_argument("--out", type=Path, default=None)
    gen = sub.add_parser("generated")
    gen.add_argument("--category", default="grain")
    gen.add_argument("--work", type=Path, default=Path("runs/mdps_generated"))
    lat = sub.add_parser("latency")
    lat.add_argument("--run", required=True, type=Path)
    lat.add_argument("--baseline", type=Path, default=None, help="a score-resilience run, timed in the same run")
    lat.add_argument("--only", action="append", default=[], help="a cost-table key, e.g. N5_Ns1_exact")
    lat.add_argument("--warmup", type=float, default=2.0)
    lat.add_argument("--runs", type=int, default=20)
    lat.add_argument("--tag", default=None)
    lat.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    {"accuracy": accuracy, "generated": generated, "latency": latency}[args.command](args)


if __name__ == "__main__":
    main()
