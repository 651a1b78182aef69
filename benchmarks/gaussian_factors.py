"""Which of gaussian's free choices matter: each factor varied alone from the default, on pseudo-validation
(held-out normals + pseudo-anomalies, what a user has) and on the test split (what we report).

Features are extracted once per (input normalisation, image size) and cached in memory; every other factor
(stage set, OPCA fraction, image score) is a refit of the statistics. Records go to benchmarks/results/.

Example:
    python benchmarks/gaussian_factors.py --data $EDGEAD_DATA_ROOT/magnetic_tile
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgead.bench.machine import machine_record, save_record
from edgead.config import write_json_atomic
from edgead.data.io import read_image, read_mask
from edgead.data.mvtec import list_test, list_train, load_masks, split_validation
from edgead.data.preprocess import PreprocessConfig, preprocess, resize_image
from edgead.data.pseudo import pseudo_validation_set
from edgead.methods.gaussian.params import FIT_ORDERS
from edgead.methods.gaussian.statistics import fit_gaussian
from edgead.metrics import image_auroc, pixel_auroc, rank_correlation
from edgead.nn.backbones import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor

RESULTS = Path(__file__).resolve().parent / "results"

NORMALISATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "lite": ((0.5,) * 3, (0.5,) * 3)}
ALL_STAGES = (2, 3, 4, 5, 6, 7)


@torch.no_grad()
def features(extractor: FeatureExtractor, images: np.ndarray, norm: str) -> list[np.ndarray]:
    """Per stage: (N, C, h, w) float32 feature maps of preprocessed [0, 1] images."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATIONS[norm])
    out: list[list[np.ndarray]] = []
    for start in range(0, len(images), 16):
        batch = torch.from_numpy(images[start : start + 16])
        feats = extractor((batch.expand(-1, 3, -1, -1) - mean) / std)
        if not out:
            out = [[] for _ in feats]
        for stage, f in enumerate(feats):
            out[stage].append(f.float().numpy())
    return [np.concatenate(parts) for parts in out]


def letterbox(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize keeping the aspect ratio, then pad to a square (edge pixels repeated; masks padded with 0)."""
    import cv2

    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
    top, left = (size - nh) // 2, (size - nw) // 2
    border = cv2.BORDER_CONSTANT if nearest else cv2.BORDER_REPLICATE
    return cv2.copyMakeBorder(resized, top, size - nh - top, left, size - nw - left, border, value=0)


def topk_mean(maps: np.ndarray, fraction: float) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return np.sort(flat, axis=1)[:, -k:].mean(axis=1)


def evaluate(
    feats: dict[str, list[np.ndarray]],
    stages: list[int],
    fraction: float,
    size: int,
    fit_order: str,
    rng_seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Fit on train, score the other splits; every image score variant at once."""
    index = [ALL_STAGES.index(s) for s in stages]
    rng = np.random.default_rng(rng_seed)
    scores: dict[str, dict[str, np.ndarray]] = {}
    maps: dict[str, np.ndarray] = {}
    pooled_fits, map_fits = [], []
    for i in index:
        train = feats["train"][i]
        pooled_fits.append(fit_gaussian(train.mean(axis=(2, 3)), "opca", fraction, fit_order))
        vectors = train.transpose(0, 2, 3, 1).reshape(-1, train.shape[1])
        if len(vectors) > 200_000:
            vectors = vectors[rng.choice(len(vectors), 200_000, replace=False)]
        map_fits.append(fit_gaussian(vectors, "opca", fraction, fit_order))
    for split in ("val", "test"):
        pooled = np.zeros(len(feats[split][0]))
        total = np.zeros((len(feats[split][0]), size, size), np.float32)
        for i, pf, mf in zip(index, pooled_fits, map_fits, strict=True):
            f = feats[split][i]
            pooled += pf.distances(f.mean(axis=(2, 3)))
            v = f.transpose(0, 2, 3, 1)
            d = mf.distances(v).astype(np.float32)
            up = torch.nn.functional.interpolate(torch.from_numpy(d)[:, None], size=(size, size), mode="bilinear")
            total += up[:, 0].numpy()
        total /= len(index)
        maps[split] = total
        scores[split] = {
            "pooled": pooled,
            "map_max": total.reshape(len(total), -1).max(axis=1),
            "map_top1pct": topk_mean(total, 0.01),
            "pooled+map_top1pct": pooled / pooled.std() + topk_mean(total, 0.01) / topk_mean(total, 0.01).std(),
        }
    return {"scores": scores, "maps": maps}


def spearman(a: list[float], b: list[float]) -> float:
    rho = rank_correlation(a, b)
    return float("nan") if rho is None else rho


def ranking_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Does pseudo-validation rank candidates as the real defects do? Per factor (the rows that vary it, with
    the default) and over every (setting, image score) candidate: Spearman correlation of pseudo-validation
    vs test image AUROC, and the test AUROC of the candidate pseudo-validation picks vs the best one."""
    default = rows[0]["setting"]

    def report(cands: list[tuple[str, float, float]]) -> dict[str, Any]:
        picked = max(cands, key=lambda c: c[1])
        best = max(cands, key=lambda c: c[2])
        return {"n": len(cands), "spearman": round(spearman([c[1] for c in cands], [c[2] for c in cands]), 3),
                "picked": picked[0], "picked_test": picked[2], "best": best[0], "best_test": best[2]}  # fmt: skip

    out: dict[str, Any] = {}
    for key in default:
        varied = [r for r in rows if all(r["setting"][k] == default[k] for k in default if k != key)]
        if len(varied) < 2:  # not varied in this study
            continue
        cands = [(json.dumps(r["setting"][key]), r["pseudo_val"]["pooled"], r["test"]["pooled"]) for r in varied]
        out[f"{key} (pooled score)"] = report(cands)
    scores = [k for k in rows[0]["test"] if k != "pixel"]
    out["image score (default setting)"] = report([(s, rows[0]["pseudo_val"][s], rows[0]["test"][s]) for s in scores])
    everything = [(f"{json.dumps(r['setting'])} {s}", r["pseudo_val"][s], r["test"][s]) for r in rows for s in scores]
    out["all candidates"] = report(everything)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sizes", default="224,256", help="image sizes to try")
    parser.add_argument("--norm", default="imagenet", choices=list(NORMALISATIONS), help="the default's input scaling")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--aspect", default="squash", choices=["squash", "letterbox"], help="how images become square")
    parser.add_argument("--pseudo-kinds", default="paste", help="pseudo-anomaly kinds, comma-separated (KINDS)")
    parser.add_argument("--factors", default=None, help="vary only these factors (default: all)")
    parser.add_argument(
        "--fit-order", default="full", choices=list(FIT_ORDERS), help="gaussian's fit_order (the records: full)"
    )
    parser.add_argument("--analyse", type=Path, default=None, help="only add the ranking report to this record")
    args = parser.parse_args()
    if args.analyse:
        record = json.loads(args.analyse.read_text())
        record["pseudo_validation_vs_test"] = ranking_report(record["rows"])
        write_json_atomic(args.out or args.analyse, record)
        print(json.dumps(record["pseudo_validation_vs_test"], indent=1))
        return
    dataset = args.data.resolve().name
    start = time.perf_counter()
    train_samples, val_samples = split_validation(list_train(args.data), 0.1, 0)
    test_samples = list_test(args.data)
    labels = {"test": np.array([s.label for s in test_samples])}
    extractor = FeatureExtractor("efficientnet_lite0", ALL_STAGES, "imagenet").eval()
    rows: list[dict[str, Any]] = []
    default = {"norm": args.norm, "size": 224, "stages": [3, 4, 5, 6, 7], "fraction": 0.05}
    grid = {
        "norm": list(NORMALISATIONS),
        "size": [int(s) for s in args.sizes.split(",")],
        "stages": [[3, 4, 5, 6, 7], [4, 5, 6, 7], [5, 6, 7], [2, 3, 4, 5, 6, 7], [3, 4, 5, 6], [6, 7]],
        "fraction": [0.01, 0.02, 0.05, 0.1, 0.2],
    }
    cache: dict[tuple[str, int], dict[str, Any]] = {}

    def feature_set(norm: str, size: int) -> dict[str, Any]:
        if (norm, size) not in cache:
            pre = PreprocessConfig(image_size=size, channels=3)
            rgb = {
                name: [
                    letterbox(read_image(s.path), size)
                    if args.aspect == "letterbox"
                    else resize_image(read_image(s.path), size, "area")
                    for s in samples
                ]
                for name, samples in (("train", train_samples), ("val", val_samples), ("test", test_samples))
            }
            kinds = tuple(args.pseudo_kinds.split(","))
            val_images, val_labels, val_masks = pseudo_validation_set(rgb["val"], pre, seed=0, kinds=kinds)
            images = {
                "train": np.stack([preprocess(x, pre) for x in rgb["train"]]),
                "val": val_images,
                "test": np.stack([preprocess(x, pre) for x in rgb["test"]]),
            }
            feats = {name: features(extractor, imgs, norm) for name, imgs in images.items()}
            cache[(norm, size)] = {
                "feats": feats,
                "val_labels": val_labels,
                "val_masks": val_masks,
                "test_masks": load_masks(test_samples, size)
                if args.aspect == "squash"
                else np.stack(
                    [
                        letterbox(read_mask(s.mask_path).astype(np.uint8), size, nearest=True).astype(bool)
                        if s.mask_path
                        else np.zeros((size, size), bool)
                        for s in test_samples
                    ]
                ),
            }
        return cache[(norm, size)]

    settings = [dict(default)]
    factors = args.factors.split(",") if args.factors else list(grid)
    for key, values in grid.items():
        if key not in factors:
            continue
        for value in values:
            if value != default[key]:
                settings.append({**default, key: value})
    for setting in settings:
        fs = feature_set(setting["norm"], setting["size"])
        result = evaluate(fs["feats"], setting["stages"], setting["fraction"], setting["size"], args.fit_order)
        defect = fs["val_labels"] == 1
        row = {"setting": setting, "pseudo_val": {}, "test": {}}
        for name in result["scores"]["test"]:
            row["pseudo_val"][name] = round(image_auroc(fs["val_labels"], result["scores"]["val"][name]), 4)
            row["test"][name] = round(image_auroc(labels["test"], result["scores"]["test"][name]), 4)
        row["pseudo_val"]["pixel"] = round(pixel_auroc(fs["val_masks"][defect], result["maps"]["val"][defect]), 4)
        has_mask = labels["test"] == 1
        row["test"]["pixel"] = round(pixel_auroc(fs["test_masks"][has_mask], result["maps"]["test"][has_mask]), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # best combination on pseudo-validation among the single-factor winners
    best_val = max(rows, key=lambda r: max(v for k, v in r["pseudo_val"].items() if k != "pixel"))
    record = {
        "benchmark": "gaussian_factors",
        "dataset": dataset,
        "pseudo_kinds": args.pseudo_kinds.split(","),
        "aspect": args.aspect,
        "fit_order": args.fit_order,
        "default": default,
        "grid": grid,
        "rows": rows,
        "best_on_pseudo_validation": best_val,
        "pseudo_validation_vs_test": ranking_report(rows),
        "seconds": round(time.perf_counter() - start, 1),
        "n_train": len(train_samples),
        "n_val_normal": len(val_samples),
        "n_test": len(test_samples),
        "machine": machine_record(),
    }
    save_record(record, RESULTS, f"gaussian_factors_{dataset}.json", args.out)


if __name__ == "__main__":
    main()
