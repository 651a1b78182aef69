"""A CPU-budget training recipe for a score U-Net method, chosen on pseudo-validation (never on test data).

Each candidate recipe (preset, image size, batch, learning rate) is given the same wall-clock budget as a
number of optimiser steps: a short probe measures its seconds per step, and the step count that fits the
budget becomes ``--steps`` (so the cosine learning-rate schedule completes inside the budget; ``max_time``
is only a safety cap at 1.15x). Selection trains every candidate at a proxy budget (default 3 minutes),
scores each on the run's held-out normals plus as many pseudo-anomalies (``edgead.tune.pseudo_validate``),
and retrains the winner at the full budget (default 20 minutes). Test metrics are recorded for every run
so the table shows whether the pseudo-validation choice held on real defects; they play no part in it.

Example:
    python benchmarks/cpu_recipe.py --method score-resilience --data $EDGEAD_DATA_ROOT/magnetic_tile \
        --channels 1 --proxy-minutes 3 --budget-minutes 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgead.bench.machine import machine_record, portable, save_record
from edgead.config import RunConfig, TrainConfig, write_json_atomic
from edgead.methods import get_method
from edgead.metrics import auroc_standard_error
from edgead.pipeline import evaluate_run, train_run
from edgead.spec import RunSpec
from edgead.tune import pseudo_validate

RESULTS = Path(__file__).resolve().parent / "results"

#: The candidates: what fits a 2-core CPU (the paper sizes are GPU recipes, see the method READMEs).
CANDIDATES = [
    {"preset": "tiny", "image_size": 128, "batch_size": 16, "lr": 2e-3},
    {"preset": "tiny", "image_size": 96, "batch_size": 32, "lr": 2e-3},
    {"preset": "small", "image_size": 96, "batch_size": 8, "lr": 1e-3},
]


def train_config(recipe: dict, steps: int, seconds: float | None) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=recipe["batch_size"],
        lr=recipe["lr"],
        lr_schedule="cosine",
        warmup_steps=min(100, steps // 10),
        ema_decay=0.999,
        max_time_s=seconds,
        checkpoint_every=max(500, steps // 4),
    )


def fit(args: argparse.Namespace, recipe: dict, steps: int, seconds: float | None, tag: str) -> Path:
    spec = RunSpec(method=args.method, data=[str(args.data)], preset=recipe["preset"],
                   image_size=recipe["image_size"], channels=args.channels,
                   train=train_config(recipe, steps, seconds), runs_root=str(args.work / tag))  # fmt: skip
    run_dir, _ = train_run(spec, progress=False)
    return run_dir


def seconds_per_step(args: argparse.Namespace, recipe: dict) -> float:
    """Wall seconds of one optimiser step of ``recipe``, from a 15-step probe (includes the first steps'
    overhead, so the estimate errs towards fewer steps)."""
    run_dir = fit(args, recipe, 15, None, "probe")
    return RunConfig.load(run_dir).state["summary"]["train_seconds"] / 15


def measure(args: argparse.Namespace, recipe: dict, budget_s: float, tag: str) -> dict:
    per_step = seconds_per_step(args, recipe)
    steps = max(20, int(budget_s / per_step))
    start = time.perf_counter()
    run_dir = fit(args, recipe, steps, budget_s * 1.15, tag)
    train_seconds = time.perf_counter() - start
    config = RunConfig.load(run_dir)
    method = get_method(args.method).load(run_dir, config)
    pseudo = pseudo_validate(method, run_dir)
    metrics, _ = evaluate_run(run_dir, args.data)
    row = {
        "recipe": recipe,
        "budget_s": budget_s,
        "seconds_per_step": round(per_step, 3),
        "steps_planned": steps,
        "steps_done": config.state.get("step"),
        "train_wall_s": round(train_seconds, 1),
        "pseudo_validation": pseudo,
        "test": {k: round(v, 4) for k, v in metrics.items()},
    }
    print(json.dumps(row), flush=True)
    return row


#: How the recommended recipe follows from the proxies, fixed before any test figure is read: candidates whose
#: pseudo-validation image AUROC is within one standard error (Hanley & McNeil) of the best are tied (the set
#: cannot tell them apart); among the tied, the fewest seconds per step wins (more steps in the same budget).
RULE = (
    "tied = pseudo-validation image AUROC within one Hanley-McNeil standard error of the best; "
    "recommended = the tied candidate with the fewest seconds per step"
)


def recommend(candidates: list[dict]) -> dict:
    """The recommendation of :data:`RULE` from the proxies' pseudo-validation figures (no test figure)."""
    best = max(candidates, key=lambda r: r["pseudo_validation"]["image_auroc"])["pseudo_validation"]
    error = auroc_standard_error(best["image_auroc"], best["n_pseudo"], best["n_normal"])
    tied = [r for r in candidates if best["image_auroc"] - r["pseudo_validation"]["image_auroc"] <= error]
    chosen = min(tied, key=lambda r: r["seconds_per_step"])
    return {
        "rule": RULE,
        "standard_error": round(error, 4),
        "tied": [r["recipe"] for r in tied],
        "recommended": chosen["recipe"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", help="method to recommend a recipe for (not with --analyse)")
    parser.add_argument("--data", type=Path, help="MVTec-layout data set (not with --analyse)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--proxy-minutes", type=float, default=3.0)
    parser.add_argument("--budget-minutes", type=float, default=20.0)
    parser.add_argument("--work", type=Path, default=Path("runs/cpu_recipe"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--analyse", type=Path, default=None, help="add the recommendation to a recorded JSON")
    args = parser.parse_args()
    if args.analyse is not None:
        record = json.loads(args.analyse.read_text())
        record["recommendation"] = recommend(record["candidates"])
        record["recommendation"]["command"] = portable(" ".join(["python", *sys.argv]))
        write_json_atomic(args.out or args.analyse, record)
        print(json.dumps(record["recommendation"], indent=1))
        return
    if args.method is None or args.data is None:
        parser.error("--method and --data are required (or --analyse FILE)")
    get_method(args.method)  # fail early on a wrong name

    proxies = [measure(args, recipe, args.proxy_minutes * 60, "proxy") for recipe in CANDIDATES]
    best = max(proxies, key=lambda r: (r["pseudo_validation"]["image_auroc"], r["pseudo_validation"]["pixel_auroc"]))
    final = measure(args, best["recipe"], args.budget_minutes * 60, "final")
    record = {
        "benchmark": "cpu_recipe",
        "method": args.method,
        "dataset": args.data.resolve().name,
        "channels": args.channels,
        "criterion": "pseudo-validation image AUROC, then pixel AUROC, at the proxy budget",
        "proxy_budget_minutes": args.proxy_minutes,
        "budget_minutes": args.budget_minutes,
        "candidates": proxies,
        "chosen": best["recipe"],
        "recommendation": recommend(proxies),
        "final": final,
        "test_best_proxy": max(proxies, key=lambda r: r["test"]["image_auroc"])["recipe"],
        "machine": machine_record(),
    }
    save_record(record, RESULTS, f"cpu_recipe_{args.method}_{record['dataset']}.json", args.out)


if __name__ == "__main__":
    main()
