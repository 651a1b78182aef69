"""Peak memory of `edgead train`: the resident set of the training process at its largest, and its fit time.

Runs `edgead train` as a user does (a subprocess, the arguments after ``--`` passed on) and reads the child's
peak resident set from the kernel (``os.wait4``: ``ru_maxrss``, KiB on Linux), so the figure is the whole
process's, not an estimate. The record names the source commit, so figures taken before and after a change
sit side by side. Linux only (``os.wait4`` and ``ru_maxrss`` in KiB).

Example (bsdata at its images' own resolution, 21 tiles of 224 px per frame):
    python benchmarks/fit_memory.py --tag gaussian_bsdata_tiled460x1130 -- --method gaussian \
        --data $EDGEAD_DATA_ROOT/bsdata --image-size 460 --frame-width 1130 --tile 224
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgead.bench.machine import save_record

RESULTS = Path(__file__).resolve().parent / "results"


def source_commit() -> str | None:
    """The checkout's commit (with ``+changes`` when the working tree differs), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True)  # fmt: skip
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def measure(train_args: list[str], runs_root: Path) -> dict[str, Any]:
    """Run ``edgead train`` with ``train_args`` under ``runs_root``; its peak RSS, wall time and fit summary."""
    entry = "import sys; from edgead.cli import app; sys.argv[0] = 'edgead'; app()"  # the `edgead` script's entry
    command = [sys.executable, "-c", entry, "train", *train_args, "--runs-root", str(runs_root), "--no-progress"]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    stderr = child.stderr.read() if child.stderr else ""
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"edgead train failed (exit {child.returncode}):\n{stderr[-4000:]}")
    configs = [path for path in runs_root.glob("*/*/config.json") if not path.parent.is_symlink()]  # not `latest`
    if len(configs) != 1:
        raise SystemExit(f"expected one run under {runs_root}, found {len(configs)}")
    summary = json.loads(configs[0].read_text())["state"]["summary"]
    return {
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss: KiB on Linux
        "wall_seconds": round(seconds, 1),
        "fit_seconds": summary.get("fit_seconds"),
        "n_images": summary.get("n_images"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", required=True, help="names the record: fit_memory_<tag>.json")
    parser.add_argument("--out", type=Path, default=None, help="record path (default: benchmarks/results/)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of edgead train")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not train_args:
        parser.error("give the arguments of edgead train after --")
    with tempfile.TemporaryDirectory(prefix="edgead-fit-memory-") as work:
        figures = measure(train_args, Path(work))
    record = {"benchmark": "fit_memory", "train_args": train_args, "source_commit": source_commit(), **figures}
    save_record(record, RESULTS, f"fit_memory_{args.tag}.json", args.out)


if __name__ == "__main__":
    main()
