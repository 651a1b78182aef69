"""LafitE on a real data set: accuracy, the ablation without feature editing, pseudo-validation vs test for
tau and K (the paper's Fig. 6 question), DDIM steps vs accuracy; and the exported graph's latency per DDIM
step count against PyTorch eager and the gaussian graph, in the same run.

Examples:
    python benchmarks/lafite.py accuracy --data $EDGEAD_DATA_ROOT/magnetic_tile --channels 1 --max-time 900
    python benchmarks/lafite.py accuracy --data $EDGEAD_DATA_ROOT/magnetic_tile --data $EDGEAD_DATA_ROOT/bsdata
    python benchmarks/lafite.py accuracy --data $EDGEAD_DATA_ROOT/bsdata --run runs/lafite/latest --reselect
    python benchmarks/lafite.py latency --run runs/lafite/latest --baseline runs/gaussian/latest

Test data plays no part in any choice: tau and K are the run's own pseudo-validation choices; the test
figures of the other candidates are recorded only to show whether that choice held.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgead.bench.machine import machine_record, save_record
from edgead.bench.report import run_bench
from edgead.config import RunConfig, TrainConfig
from edgead.data.mvtec import list_test, load_images, load_masks
from edgead.export.exporter import ExportOptions, export_run
from edgead.methods import get_method, load_method
from edgead.metrics import compute_metrics, image_auroc, pixel_auroc, rank_correlation
from edgead.pipeline import train_run
from edgead.spec import RunSpec

RESULTS = Path(__file__).resolve().parent / "results"


def _round(values: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in values.items()}


class TestSet:
    """One data set's test split with its ``x_0`` features computed once, scored under many settings."""

    def __init__(self, method: Any, root: Path) -> None:
        samples = list_test(root)
        pre = method.preprocess_config
        self.labels = np.array([s.label for s in samples])
        self.masks = load_masks(samples, pre.image_size)
        images = torch.from_numpy(load_images(samples, pre))
        graph = method.build_graph()
        with torch.no_grad():
            self.x0 = torch.cat([graph.features(images[i : i + 16]) for i in range(0, len(images), 16)])

    def score(self, method: Any, full: bool = False, **settings: Any) -> dict[str, float]:
        p = method.params
        graph = method.graph_for(
            tau=settings.get("tau", p.tau),
            k=settings.get("k", p.k),
            edit=settings.get("edit", p.edit),
            weighting=settings.get("weighting"),
        )
        with torch.no_grad():
            outputs = [graph.score_features(self.x0[i : i + 16]) for i in range(0, len(self.x0), 16)]
        maps = torch.cat([m for m, _ in outputs]).numpy()
        scores = torch.cat([s for _, s in outputs]).numpy()
        if full:
            return _round(compute_metrics(self.labels, scores, self.masks, maps))
        defect = self.labels == 1
        return _round(
            {
                "image_auroc": image_auroc(self.labels, scores),
                "pixel_auroc": pixel_auroc(self.masks[defect], maps[defect]),
            }
        )


def agreement(pseudo: dict[str, dict], test: dict[str, dict]) -> dict[str, Any]:
    """Spearman rank correlation of pseudo-validation vs test image AUROC over the candidates, and the test
    AUROC of the candidate pseudo-validation picked vs the best one."""
    keys = list(pseudo)
    p = [pseudo[k]["image_auroc"] for k in keys]
    t = [test[k]["image_auroc"] for k in keys]
    picked = max(keys, key=lambda k: (pseudo[k]["image_auroc"], pseudo[k]["pixel_auroc"]))
    best = max(keys, key=lambda k: test[k]["image_auroc"])
    rho = rank_correlation(p, t)
    return {
        "spearman": None if rho is None else round(float(rho), 3),
        "picked": picked,
        "picked_test_image_auroc": test[picked]["image_auroc"],
        "best_on_test": best,
        "best_test_image_auroc": test[best]["image_auroc"],
    }


def seconds_per_step(preset: str, batch_size: int, grid: int = 32, channels: int = 192) -> float:
    """Median wall time of one optimiser step of the lafite U-Net on a feature batch (after 3 warm-up steps)."""
    import time

    from edgead.methods.lafite.method import UNET_PRESETS
    from edgead.nn.unet import ScoreUNet, UNetConfig

    net = ScoreUNet(UNetConfig(in_channels=channels, time_embedding="sinusoidal", **UNET_PRESETS[preset]))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch_size, channels, grid, grid)
    times = []
    for i in range(13):
        start = time.perf_counter()
        loss = (net(x, torch.rand(batch_size)) - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def reselect(run: Path, work: Path) -> Path:
    """A copy of ``run`` (under ``work/lafite``) whose tau, edit weighting and K are chosen again by the current
    code (``LafitE.after_training`` on the run's stored held-out normals): the same trained model, only the
    choice differs. The original run is left as it is."""
    copy = work / "lafite" / f"{run.resolve().name}-reselected"
    if copy.exists():
        raise SystemExit(f"{copy} exists; remove it or pass another --work")
    shutil.copytree(run, copy)
    config = RunConfig.load(copy)
    config.method_params.update({"tau": "auto", "k": "auto", "edit_weighting": "auto"})
    config.state.pop("selection", None)
    config.save(copy)
    method = get_method("lafite").load(copy, config)
    method.after_training(None)  # a loaded run: the selection uses its stored held-out normals
    method.config.save(copy)
    return copy


def accuracy(args: argparse.Namespace) -> None:
    if args.run is None:
        if args.budget is not None:  # as many steps as fit the budget, so the cosine schedule completes
            per_step = seconds_per_step(args.preset, args.batch_size)
            args.steps = max(50, int(args.budget / (per_step * 1.1)))
            args.max_time = args.budget * 1.2
            print(f"{per_step:.3f} s per step: {args.steps} steps in the {args.budget:g} s budget", flush=True)
        cfg = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            lr_schedule="cosine", warmup_steps=min(100, args.steps // 10), ema_decay=args.ema_decay,
            max_time_s=args.max_time, checkpoint_every=max(500, args.steps // 4),
        )  # fmt: skip
        params = {k: json.loads(v) for k, _, v in (p.partition("=") for p in args.param)}
        run_dir, summary = train_run(
            RunSpec(method="lafite", data=[str(d) for d in args.data], preset=args.preset,
                    image_size=args.image_size, channels=args.channels, train=cfg, params=params,
                    runs_root=str(args.work)),
        )  # fmt: skip
    else:
        run_dir, summary = args.run, RunConfig.load(args.run).state.get("summary", {})
        if args.reselect:
            run_dir = reselect(args.run, args.work)
    method = load_method(run_dir)
    p = method.params
    selection = method.config.state.get("selection", {})
    per_dataset = {}
    for root in args.data:
        test = TestSet(method, root)
        record: dict[str, Any] = {
            "lafite": test.score(method, full=True),
            "lafite_without_editing": test.score(method, full=True, edit=False),
        }
        if args.sweeps:
            tau_test = {str(t): test.score(method, tau=t, edit=False) for t in p.tau_candidates}
            joint = "edit_rule" in selection  # runs before the joint selection: K alone, a flat table
            weightings = p.edit_weighting_candidates if joint else [p.edit_weighting]
            k_test = {
                w: {str(k): test.score(method, k=k, edit=True, weighting=w) for k in p.k_candidates} for w in weightings
            }
            k_test = k_test if joint else k_test[p.edit_weighting]
            record["tau_sweep"] = {"pseudo": selection.get("tau"), "test": tau_test}
            record["k_sweep"] = {"pseudo": selection.get("k"), "test": k_test}
            if selection.get("tau"):
                record["tau_sweep"]["agreement"] = agreement(selection["tau"], tau_test)
            if selection.get("k") and not joint:
                record["k_sweep"]["agreement"] = agreement(selection["k"], k_test)
            elif selection.get("k"):  # over every (weighting, K) pair, then per weighting
                flat = lambda table: {f"{w}/{k}": row for w, rows in table.items() for k, row in rows.items()}  # noqa: E731
                record["k_sweep"]["agreement"] = {
                    "all": agreement(flat(selection["k"]), flat(k_test)),
                    **{w: agreement(selection["k"][w], k_test[w]) for w in k_test if w in selection["k"]},
                }
        steps = {}
        for n in args.ddim_steps:
            method.params = method.parse_params({**method.config.method_params, "ddim_steps": n})
            steps[str(n)] = test.score(method, full=True)
        method.params = p
        record["ddim_steps"] = steps
        per_dataset[root.resolve().name] = record
        print(json.dumps({root.resolve().name: record["lafite"]}), flush=True)
    names = list(per_dataset)
    result = {
        "benchmark": "lafite_accuracy",
        "datasets": names,
        "run": Path(run_dir).name,
        "preset": method.config.model.get("preset"),
        "image_size": method.preprocess_config.image_size,
        "method_params": method.config.method_params,
        "train": summary,
        "selection": selection,
        "results": per_dataset,
        "machine": machine_record(),
    }
    save_record(result, RESULTS, f"lafite_{'+'.join(names)}{('_' + args.tag) if args.tag else ''}.json", args.out)


def _bench(run_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    export_dir = work / f"export-{run_dir.name}"
    export_run(run_dir, export_dir, ExportOptions(precision="fp32"), log=lambda _: None)
    report = run_bench(export_dir, backend="onnxruntime", precision="fp32", warmup_s=args.warmup,
                       duration_s=args.duration, camera_loop=False)  # fmt: skip
    eager = report["torch_eager"][0]["stats"]["median"]
    return {
        "onnxruntime_infer_median_ms": round(report["backend"]["stages"]["infer"]["median"], 2),
        "onnxruntime_predict_median_ms": round(report["backend"]["stages"]["total"]["median"], 2),
        "torch_eager_median_ms": round(eager, 2),
        "speedup_vs_torch_eager": round(eager / report["backend"]["stages"]["infer"]["median"], 2),
    }


def latency(args: argparse.Namespace) -> None:
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.baseline is not None:
            rows["gaussian"] = _bench(Path(args.baseline).resolve(), work, args)
            print("gaussian", rows["gaussian"], flush=True)
        for n in args.ddim_steps:
            variant = work / f"lafite-steps-{n}"
            shutil.copytree(Path(args.run).resolve(), variant, ignore=shutil.ignore_patterns("eval", "training_state*"))
            config = RunConfig.load(variant)
            config.method_params["ddim_steps"] = n
            config.save(variant)
            rows[f"lafite_{n}_steps"] = _bench(variant, work, args)
            print(n, rows[f"lafite_{n}_steps"], flush=True)
    if "gaussian" in rows:
        base = rows["gaussian"]["onnxruntime_infer_median_ms"]
        for row in rows.values():
            row["vs_gaussian_graph"] = round(row["onnxruntime_infer_median_ms"] / base, 2)
    config = RunConfig.load(args.run)
    result = {
        "benchmark": "lafite_latency",
        "run": Path(args.run).resolve().name,
        "image_size": config.preprocess["image_size"],
        "preset": config.model.get("preset"),
        "method_params": config.method_params,
        "precision": "fp32",
        "batch": 1,
        "rows": rows,
        "machine": machine_record(),
    }
    save_record(result, RESULTS, f"latency_{{device}}_lafite{('_' + args.tag) if args.tag else ''}.json", args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--data", required=True, type=Path, action="append", help="repeat for a unified model")
    acc.add_argument("--run", type=Path, default=None, help="a trained lafite run (default: train one)")
    acc.add_argument("--reselect", action="store_true", help="with --run: choose tau, weighting and K again")
    acc.add_argument("--preset", default="small")
    acc.add_argument("--image-size", type=int, default=None)
    acc.add_argument("--channels", type=int, default=3)
    acc.add_argument("--steps", type=int, default=3000)
    acc.add_argument("--batch-size", type=int, default=16)
    acc.add_argument("--lr", type=float, default=1e-3)
    acc.add_argument("--weight-decay", type=float, default=1e-4)
    acc.add_argument("--ema-decay", type=float, default=0.999)
    acc.add_argument("--max-time", type=float, default=None)
    acc.add_argument("--budget", type=float, default=None, help="training seconds; sets --steps from a probe")
    acc.add_argument("--param", action="append", default=[], help="method hyperparameter KEY=JSON")
    acc.add_argument("--ddim-steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 3, 5, 10])
    acc.add_argument("--sweeps", action=argparse.BooleanOptionalAction, default=True,
                     help="test figures of every tau / K candidate")  # fmt: skip
    acc.add_argument("--work", type=Path, default=Path("runs/benchmarks"))
    acc.add_argument("--tag", default=None)
    acc.add_argument("--out", type=Path, default=None)
    lat = sub.add_parser("latency")
    lat.add_argument("--run", required=True, type=Path)
    lat.add_argument("--baseline", type=Path, default=None, help="a gaussian run, timed in the same run")
    lat.add_argument("--ddim-steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 3, 5, 10])
    lat.add_argument("--warmup", type=float, default=3.0)
    lat.add_argument("--duration", type=float, default=10.0)
    lat.add_argument("--tag", default=None)
    lat.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    accuracy(args) if args.command == "accuracy" else latency(args)


if __name__ == "__main__":
    main()
