"""edgead.metrics against hand-computed and brute-force references; edgead.report's files."""

from __future__ import annotations

import itertools
import json
from collections import deque
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.metrics import (
    at_metric_size,
    aupro,
    compute_metrics,
    f1_max,
    format_metrics_table,
    image_ap,
    image_auroc,
    metric_size,
    pixel_auroc,
    pro_curve,
    rank_correlation,
)
from edgead.report import heatmap_overlay, write_report


# ------------------------------------------------------------------------------------ brute-force AUPRO
def _regions_8connected(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 8-connected components, by flood fill (independent of OpenCV)."""
    seen = np.zeros(mask.shape, dtype=bool)
    regions = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        region = np.zeros(mask.shape, dtype=bool)
        queue = deque([start])
        seen[start] = True
        while queue:
            row, col = queue.popleft()
            region[row, col] = True
            for d_row in (-1, 0, 1):
                for d_col in (-1, 0, 1):
                    r, c = row + d_row, col + d_col
                    if 0 <= r < height and 0 <= c < width and mask[r, c] and not seen[r, c]:
                        seen[r, c] = True
                        queue.append((r, c))
        regions.append(region)
    return regions


def _brute_force_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    regions = [(index, region) for index, mask in enumerate(masks) for region in _regions_8connected(mask > 0)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for threshold in sorted(np.unique(maps), reverse=True):
        predicted = maps >= threshold
        fpr = predicted[normal].mean()
        pro = np.mean([predicted[index][region].mean() for index, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y_limit) / 2
            break
    return area / limit


def _random_masks(rng: np.random.Generator, num_images: int = 4, size: int = 12) -> np.ndarray:
    masks = np.zeros((num_images, size, size), dtype=np.uint8)
    for mask in masks[1:]:  # the first image stays defect-free, like a "good" test image
        for _ in range(rng.integers(1, 4)):
            row, col = rng.integers(0, size - 2, size=2)
            height, width = rng.integers(1, 5, size=2)
            mask[row : row + height, col : col + width] = 1
        # Single diagonal-touching pixels exercise 8-connectivity.
        row, col = rng.integers(0, size, size=2)
        mask[row, col] = 1
    return masks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed: int, quantised: bool, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng)
    maps = rng.random(masks.shape) + 0.6 * masks
    if quantised:
        maps = np.round(maps * 6) / 6  # few distinct values: many ties between normal and defect pixels
    else:
        maps[0, :3, :3] = maps[1, 0, 0]  # a few exact ties even in the continuous case
    expected = _brute_force_aupro(masks, maps, limit)
    assert aupro(masks, maps, integration_limit=limit) == pytest.approx(expected, abs=1e-9)


def test_pro_curve_uses_8_connectivity_and_per_region_average() -> None:
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = 1  # regions {(0,0),(1,1)} and {(3,3)}
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = maps[0, 3, 3] = 1.0
    fpr, pro, thresholds = pro_curve(masks, maps)
    # At threshold 1: overlaps 1/2 and 1/1 -> mean 0.75 (4-connectivity would give 2/3).
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.75, 1.0])
    assert thresholds[1] == 1.0


def test_aupro_perfect_and_inverted_maps() -> None:
    masks = _random_masks(np.random.default_rng(0))
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("masks", "maps", "message"),
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), "no defect region"),
        (np.ones((2, 4, 4)), np.zeros((2, 4, 4)), "no normal pixel"),
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), "shape"),
    ],
)
def test_aupro_rejects_degenerate_inputs(masks: np.ndarray, maps: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aupro(masks, maps)


# ----------------------------------------------------------------------------------------------- classic
def test_image_auroc_and_f1_max_hand_computed() -> None:
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8]
    # Positive/negative pairs ranked right: 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3 of 4.
    assert image_auroc(labels, scores) == pytest.approx(0.75)
    # Threshold 0.35 flags {0.35, 0.4, 0.8}: precision 2/3, recall 1 -> F1 0.8 (the others give <= 2/3).
    best_f1, threshold = f1_max(labels, scores)
    assert best_f1 == pytest.approx(0.8)
    assert threshold == 0.35
    assert threshold in scores


def test_image_auroc_counts_ties_as_half_and_ap_perfect() -> None:
    assert image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert image_ap([0, 0, 1], [0.1, 0.2, 0.9]) == pytest.approx(1.0)


def test_f1_max_perfect_separation_threshold_is_lowest_positive_score() -> None:
    best_f1, threshold = f1_max([0, 1, 0, 1, 1], [0.2, 0.7, 0.3, 0.9, 0.5])
    assert best_f1 == pytest.approx(1.0)
    assert threshold == 0.5


def test_pixel_auroc_accepts_255_masks() -> None:
    masks = np.zeros((2, 3, 3), dtype=np.uint8)
    masks[1, 1, 1] = 255
    maps = np.zeros((2, 3, 3))
    maps[1, 1, 1] = 2.0
    assert pixel_auroc(masks, maps) == pytest.approx(1.0)


@pytest.mark.parametrize("levels", [3, 50, None])
def test_pixel_auroc_is_sklearns_area_with_ties(levels: int | None) -> None:
    """The pairwise count gives sklearn's ROC area, ties (few score levels) included; and one pair by hand."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(levels or 0)
    masks = rng.random((4, 20, 30)) < 0.1
    maps = rng.normal(size=masks.shape) + 0.8 * masks
    if levels is not None:
        maps = np.round(maps * levels / 8) / levels  # many exact ties, within and across the two classes
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps.astype(np.float32)) == pytest.approx(expected, abs=1e-12)
    maps = np.array([[[0.5, 0.5, 0.2, 0.9]]])  # anomalous 0.5 ties a normal 0.5 and is above 0.2, below 0.9
    assert pixel_auroc(np.array([[[1, 0, 0, 0]]]), maps) == pytest.approx(1.5 / 3)


# ------------------------------------------------------------------------------------------ compute_metrics
def _toy_dataset(num_images: int = 6, size: int = 16) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    labels = np.array([0, 1] * (num_images // 2))
    masks = np.zeros((num_images, size, size), dtype=np.uint8)
    masks[labels == 1, 4:9, 5:10] = 1
    maps = rng.random(masks.shape) * 0.5 + masks * 0.4
    scores = maps.reshape(num_images, -1).max(axis=1)
    return labels, scores, masks, maps


def test_compute_metrics_keys_and_consistency() -> None:
    labels, scores, masks, maps = _toy_dataset()
    image_only = compute_metrics(labels, scores)
    assert set(image_only) == {"image_auroc", "image_ap", "image_f1_max", "image_f1_threshold"}
    full = compute_metrics(labels, scores, masks, maps)
    assert set(full) == set(image_only) | {"pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max"}
    assert full["image_auroc"] == pytest.approx(image_auroc(labels, scores))
    assert full["aupro"] == pytest.approx(aupro(masks, maps, 0.3))
    assert full["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert all(isinstance(value, float) for value in full.values())


def test_pixel_metrics_of_a_large_map_are_taken_at_a_bounded_size_with_its_aspect() -> None:
    assert metric_size(448, 448) == (448, 448) and metric_size(224, 550) == (224, 550)  # exact at their size
    assert metric_size(460, 1130) == (327, 802)  # 262k pixels, the aspect kept
    rng = np.random.default_rng(0)
    maps = rng.random((4, 460, 1130)).astype(np.float32)
    masks = np.zeros((4, 460, 1130), np.uint8)
    masks[1, 100:300, 200:900] = 255
    maps[1, 100:300, 200:900] += 1.0
    small_masks, small_maps = at_metric_size(masks, maps)
    assert small_maps.shape == small_masks.shape == (4, 327, 802) and set(np.unique(small_masks)) == {0, 1}
    labels, scores = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.3])
    figures = compute_metrics(labels, scores, masks, maps)
    assert figures["pixel_auroc"] == pytest.approx(pixel_auroc(small_masks, small_maps))
    assert figures["pixel_auroc"] > 0.99  # the defect's pixels still outscore the rest after averaging
    square_masks, square_maps = masks[:, :448, :448], maps[:, :448, :448]
    assert at_metric_size(square_masks, square_maps)[1] is square_maps  # untouched where it fits


def test_compute_metrics_errors() -> None:
    labels, scores, masks, maps = _toy_dataset()
    with pytest.raises(ValueError, match="both normal and anomalous"):
        compute_metrics(np.zeros(6, dtype=int), scores)
    with pytest.raises(ValueError, match="equal length"):
        compute_metrics(labels, scores[:-1])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        compute_metrics(labels * 2, scores)
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(labels, scores, masks, maps[:, :-1])
    with pytest.raises(ValueError, match="6 image labels but 5"):
        compute_metrics(labels, scores, masks[:5], maps[:5])
    with pytest.raises(ValueError, match="together"):
        compute_metrics(labels, scores, masks=masks)


def test_format_metrics_table_lists_known_metrics_first() -> None:
    table = format_metrics_table({"zeta": 3, "aupro": 0.91234, "image_auroc": 0.5})
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["image_auroc", "aupro", "zeta"]
    assert "0.9123" in table and "3.0000" in table


# ------------------------------------------------------------------------------------------ visualisation
def test_heatmap_overlay_resizes_and_keeps_rgb_order() -> None:
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    anomaly_map = np.zeros((8, 12))
    anomaly_map[:, 6:] = 1.0
    overlay = heatmap_overlay(rgb, anomaly_map, vmin=0.0, vmax=1.0, alpha=1.0)
    assert overlay.shape == rgb.shape and overlay.dtype == np.uint8
    cold, hot = overlay[20, 2], overlay[20, 57]
    assert cold[2] > cold[0]  # low scores are blue in RGB order
    assert hot[0] > hot[2]  # high scores are red in RGB order
    np.testing.assert_array_equal(heatmap_overlay(rgb + 7, anomaly_map, 0.0, 1.0, alpha=0.0), rgb + 7)
    # A constant map must not divide by zero.
    assert heatmap_overlay(rgb, np.ones((8, 12)), 1.0, 1.0).shape == rgb.shape


def test_write_report_files(tmp_path: Path) -> None:
    labels, scores, masks, maps = _toy_dataset(num_images=6, size=16)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)  # maps/masks are smaller: resized
    paths = [f"data/test/{'crack' if label else 'good'}/{index:03d}.png" for index, label in enumerate(labels)]
    metrics = compute_metrics(labels, scores, masks, maps)
    out_dir = tmp_path / "report"
    # an earlier report with more overlays: the later one removes what that report listed, nothing by name
    write_report(out_dir, metrics, labels, scores, paths, images, maps, masks, top_k=5)

    metrics_path = write_report(
        out_dir,
        metrics,
        labels,
        scores,
        paths,
        images,
        maps,
        masks,
        top_k=3,
        extra={"method": "toy", "seed": np.int64(3)},
    )

    assert metrics_path == out_dir / "metrics.json"
    report = json.loads(metrics_path.read_text())
    assert report["metrics"] == pytest.approx(metrics)
    assert report["run"] == {"method": "toy", "seed": 3}
    assert [entry["path"] for entry in report["images"]] == paths
    assert [entry["label"] for entry in report["images"]] == labels.tolist()
    roc = cv2.imread(str(out_dir / "roc.png"))
    assert roc is not None and roc.shape == (480, 480, 3)
    overlays = {path.name for path in (out_dir / "overlays").iterdir()}
    order = np.argsort(-scores, kind="stable")
    folder = lambda i: "crack" if labels[i] else "good"  # noqa: E731
    top = [f"top_{rank:02d}_{folder(i)}_{i:03d}.png" for rank, i in enumerate(order[:3])]
    worst_normals = [i for i in order if labels[i] == 0][:3]
    weakest_defects = [i for i in order[::-1] if labels[i] == 1][:3]
    expected = set(top) | {f"falsealarm_{r:02d}_good_{i:03d}.png" for r, i in enumerate(worst_normals)}
    expected |= {f"missed_{r:02d}_crack_{i:03d}.png" for r, i in enumerate(weakest_defects)}
    assert overlays == expected  # the stale overlay is gone; names carry the defect folder
    row = cv2.imread(str(out_dir / "overlays" / top[0]))
    assert row is not None and row.shape[1] == 3 * 224 and row.shape[0] > 224  # 3 panels under a caption band
    assert not [path for path in out_dir.rglob("*.tmp")]

    # With the deployed threshold: only its false alarms and misses, captioned with the decision.
    threshold = float(np.median(scores))
    write_report(out_dir, metrics, labels, scores, paths, images, maps, masks, top_k=3, threshold=threshold)
    names = sorted(path.name for path in (out_dir / "overlays").iterdir())
    alarms = [n for n in names if n.startswith("falsealarm_")]
    misses = [n for n in names if n.startswith("missed_")]
    n_alarms = int(((scores >= threshold) & (labels == 0)).sum())
    n_misses = int(((scores < threshold) & (labels == 1)).sum())
    assert len(alarms) == min(3, n_alarms) and len(misses) == min(3, n_misses)


def test_captions_stay_readable_on_a_narrow_image(tmp_path: Path) -> None:
    """The caption band spans the row and is black with white text whatever the image: never drawn over it."""
    labels, scores, _, maps = _toy_dataset(num_images=2, size=8)
    images = [np.full((20, 12, 3), 255, dtype=np.uint8) for _ in labels]  # small and white
    paths = ["test/a_defect_type_with_a_long_name/an_image_with_a_very_long_file_name.png", "test/good/b.png"]
    write_report(tmp_path, {}, labels, scores, paths, images, maps, top_k=1)
    row = cv2.imread(str(sorted((tmp_path / "overlays").glob("top_*.png"))[0]))
    band_height = row.shape[0] - 224
    band = row[:band_height]
    assert 10 < band_height < 40 and band.max() == 255 and (band == 0).mean() > 0.6  # white on black
    assert row[band_height:].min() > 0  # the white image below is untouched by text


def test_write_report_without_masks(tmp_path: Path) -> None:
    labels, scores, _, maps = _toy_dataset(num_images=4, size=8)
    images = [np.full((300, 300, 3), 128, dtype=np.uint8) for _ in labels]
    write_report(tmp_path, {"image_auroc": 1.0}, labels, scores, [f"{i}.png" for i in range(4)], images, maps, top_k=10)
    overlays = sorted((tmp_path / "overlays").glob("top_*.png"))
    assert len(overlays) == 4
    row = cv2.imread(str(overlays[0]))
    assert row.shape[1:] == (600, 3) and row.shape[0] > 300  # input | heatmap under the caption, no upscaling


def test_rank_correlation_is_spearmans_with_mean_ranks_for_ties() -> None:
    from scipy.stats import spearmanr  # the reference, a dependency of scikit-learn

    rng = np.random.default_rng(0)
    for _ in range(5):
        a = np.round(rng.random(9), 1)  # coarse: ties
        b = np.round(a + rng.normal(0, 0.2, 9), 1)
        assert rank_correlation(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="one length"):
        rank_correlation([1, 2], [1, 2, 3])
