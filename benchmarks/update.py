"""`edgead update` on a changed line: false alarms on new-looking normal images before and after, test AUROC, time.

The change is simulated on the data set's own normal training images, never on its test images: a new batch
of material under a different light, ``--shift`` (brightness and contrast). ``--added`` such images (taken from
the training split) are given to ``edgead update``; as many others (disjoint) are the held-back normals on which
false alarms are counted. Each run's threshold is calibrated as `edgead export` does (its held-out normals, the
default false-alarm rate). The test split's image AUROC (unchanged images) says whether detection got worse.

Example:
    python benchmarks/update.py --run runs/gaussian/RUN --data $EDGEAD_DATA_ROOT/magnetic_tile
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgead.bench.machine import save_record
from edgead.config import RunConfig
from edgead.data import holdout
from edgead.data.io import read_image
from edgead.data.preprocess import preprocess
from edgead.export.calibration import threshold_from_normal_scores
from edgead.methods import load_method
from edgead.methods.base import run_graph
from edgead.pipeline import score_test_split
from edgead.runtime.decision import is_anomalous
from edgead.update import original_training_paths, update_run

RESULTS = Path(__file__).resolve().parent / "results"


def shifted(image_rgb: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    return cv2.convertScaleAbs(image_rgb, alpha=alpha, beta=beta)


def measure(run_dir: Path, data: Path, held_back: list[np.ndarray]) -> dict[str, Any]:
    config = RunConfig.load(run_dir)
    method = load_method(run_dir)
    pre = method.frame_preprocess_config
    graph = method.inference_graph().eval()
    normals, _ = holdout.held_out_normals(run_dir, config.data)
    _, normal_scores = run_graph(graph, np.stack([preprocess(img, pre) for img in normals]), batch_size=8)
    threshold = threshold_from_normal_scores(normal_scores)["value"]
    _, shifted_scores = run_graph(graph, np.stack([preprocess(img, pre) for img in held_back]), batch_size=8)
    test = score_test_split(graph, pre, data).headline()
    return {
        "threshold": threshold,
        "held_back_false_alarms": int(is_anomalous(shifted_scores, threshold).sum()),
        "held_back_images": len(held_back),
        "test": {key: round(float(value), 4) for key, value in test.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--added", type=int, default=50)
    parser.add_argument("--shift", type=float, nargs=2, default=(1.3, 60.0), metavar=("CONTRAST", "BRIGHTNESS"))
    parser.add_argument("--tag", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    config = RunConfig.load(args.run)
    train_paths = original_training_paths(config)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(train_paths), size=2 * args.added, replace=False)
    alpha, beta = args.shift
    images = [shifted(read_image(train_paths[i]), alpha, beta) for i in picks]
    work = Path(tempfile.mkdtemp(prefix="edgead-update-"))
    try:
        added_dir = work / "new_batch"
        added_dir.mkdir()
        for k, image in enumerate(images[: args.added]):
            cv2.imwrite(str(added_dir / f"new_{k:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        held_back = images[args.added :]
        before = measure(args.run, args.data, held_back)
        print("before", before, flush=True)
        new_run, summary = update_run(args.run, [added_dir], runs_root=work / "runs", on_event=print)
        after = measure(new_run, args.data, held_back)
        print("after", after, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "benchmark": "update",
        "method": config.method,
        "dataset": args.data.resolve().name,
        "run": args.run.name,
        "change": {"contrast": alpha, "brightness": beta, "applied_to": "training-split normal images"},
        "added_images": args.added,
        "update": summary,
        "update_seconds": summary["seconds"],
        "before": before,
        "after": after,
        "test_image_auroc_change": round(after["test"]["image_auroc"] - before["test"]["image_auroc"], 4),
        "targets": {"image_auroc_drop_at_most": 0.005, "seconds_gaussian": 60, "seconds_lafite": 180},
    }
    tag = f"_{args.tag}" if args.tag else ""
    save_record(record, RESULTS, f"update_{config.method}_{record['dataset']}{tag}.json", args.out)


if __name__ == "__main__":
    main()
