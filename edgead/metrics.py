"""Anomaly-detection metrics: image and pixel AUROC, AP, F1-max, AUPRO (the MVTec protocol).

Torch-free on purpose: only numpy is imported at module level. scikit-learn is imported lazily inside the
metric functions, so importing this module works in an edge install that has no scikit-learn. The
on-disk evaluation report (ROC plot, overlays) is :mod:`edgead.report`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]

DEFAULT_AUPRO_LIMIT = 0.3
#: Pixels per image that the pixel metrics look at: larger maps (a tiled run's oblong high-resolution frame,
#: e.g. 1130 x 460 = 520k pixels) are scored at this many, their aspect kept (maps area-averaged, masks nearest
#: neighbour). Engineering choice: 512 x 512, above every square map this project measures, so those figures
#: are exact at the map's own size; the four pixel metrics sort every pixel of the test split, and at 467
#: images of 520k pixels that needed more than the 24 GiB of the machine the benchmarks ran on.
METRIC_PIXELS = 512 * 512
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max", "image_f1_threshold")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max")
METRIC_ORDER = IMAGE_METRICS + PIXEL_METRICS
_ROC_SIZE = 480
_PLOT_LEFT, _PLOT_TOP, _PLOT_SIDE = 62, 34, 390
_MIN_PANEL_HEIGHT = 224
_GT_COLOR = (0, 255, 0)


# ----------------------------------------------------------------------------------------------- validation
def _check_binary_problem(labels: ArrayLike, scores: ArrayLike, what: str) -> tuple[BoolArray, FloatArray]:
    """Validates 1-D binary labels and finite scores of equal length that contain both classes.

    Returns:
        The labels as a boolean "is anomalous" array and the scores as float64.
    """
    labels_arr = np.asarray(labels)
    scores_arr = np.asarray(scores, dtype=np.float64)
    if labels_arr.ndim != 1 or scores_arr.shape != labels_arr.shape:
        raise ValueError(
            f"{what}: need 1-D labels and scores of equal length, got {labels_arr.shape}, {scores_arr.shape}"
        )
    if not np.isin(labels_arr, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0 (normal) or 1 (anomalous)")
    if not np.isfinite(scores_arr).all():
        raise ValueError(f"{what}: scores contain NaN or infinite values")
    positive = labels_arr.astype(bool)
    num_positive = int(positive.sum())
    if num_positive in (0, positive.size):
        raise ValueError(
            f"{what}: needs both normal and anomalous samples, got {num_positive}/{positive.size} anomalous"
        )
    return positive, scores_arr


def _check_pixel_inputs(masks: ArrayLike, maps: ArrayLike, what: str) -> tuple[BoolArray, FloatArray]:
    """Validates (N, H, W) ground-truth masks (nonzero = defect, so 0/255 PNG masks work) and finite maps."""
    masks_arr = np.asarray(masks)
    maps_arr = np.asarray(maps, dtype=np.float64)
    if masks_arr.ndim != 3 or masks_arr.shape != maps_arr.shape:
        raise ValueError(
            f"{what}: masks and maps must share one (N, H, W) shape, got {masks_arr.shape}, {maps_arr.shape}"
        )
    if not np.isfinite(maps_arr).all():
        raise ValueError(f"{what}: anomaly maps contain NaN or infinite values")
    return masks_arr > 0, maps_arr


# -------------------------------------------------------------------------------------------------- metrics
def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image-level anomaly scores (labels: 1 = anomalous)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_check_binary_problem(labels, scores, "image_auroc")))


def auroc_standard_error(auroc: float, n_positive: int, n_negative: int) -> float:
    """Hanley & McNeil (1982), eq. 2: the standard error of an AUROC measured on ``n_positive`` anomalous and
    ``n_negative`` normal images; two candidates closer than this are not told apart by the set."""
    a = min(max(float(auroc), 0.0), 1.0)
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    variance = a * (1 - a) + (n_positive - 1) * (q1 - a * a) + (n_negative - 1) * (q2 - a * a)
    return float(np.sqrt(max(variance, 0.0) / (n_positive * n_negative)))


def rank_correlation(a: ArrayLike, b: ArrayLike) -> float | None:
    """Spearman's rank correlation of two equally long sequences (tied values share their mean rank, as
    ``scipy.stats.spearmanr`` ranks them); None where either sequence is constant (no ranking to compare)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"rank_correlation needs two 1-D sequences of one length, got {x.shape} and {y.shape}")

    def ranks(values: FloatArray) -> FloatArray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):  # ties: the mean of their ranks
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision of image-level anomaly scores (anomalous is the positive class)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(*_check_binary_problem(labels, scores, "image_ap")))


def pairwise_auroc(positive: BoolArray, scores: FloatArray) -> float:
    """ROC AUC as the Mann-Whitney statistic: the share of (anomalous, normal) pairs in which the anomalous
    score is the higher, a tie counting one half. This is the area sklearn's ``roc_auc_score`` gives (the
    trapezoidal area under the ROC curve, ties as its diagonal steps), computed by sorting the normal scores
    only and counting, in exact integers, where each anomalous score falls among them: its memory is one copy
    of the normal scores, not the several arrays of all scores that the curve takes (over 60 M pixels of
    pseudo-anomalies the curve took several GB)."""
    normal = np.sort(scores[~positive])
    anomalous = scores[positive]
    below = np.searchsorted(normal, anomalous, side="left")
    tied = np.searchsorted(normal, anomalous, side="right") - below
    half_units = 2 * int(below.sum(dtype=np.int64)) + int(tied.sum(dtype=np.int64))
    return half_units / (2 * anomalous.size * normal.size)


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """ROC AUC over all pixels of all images (:func:`pairwise_auroc`); masks (N, H, W) nonzero = defect, maps
    (N, H, W) float."""
    defect, pixel_scores = _check_pixel_inputs(masks, maps, "pixel_auroc")
    return pairwise_auroc(*_check_binary_problem(defect.ravel(), pixel_scores.ravel(), "pixel_auroc"))


def pixel_ap(masks: ArrayLike, maps: ArrayLike) -> float:
    """Average precision over all pixels of all images (defect pixels are the positive class)."""
    from sklearn.metrics import average_precision_score

    defect, pixel_scores = _check_pixel_inputs(masks, maps, "pixel_ap")
    positive, scores_arr = _check_binary_problem(defect.ravel(), pixel_scores.ravel(), "pixel_ap")
    return float(average_precision_score(positive, scores_arr))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 score over all thresholds, predicting anomalous where ``score >= threshold``.

    Returns:
        ``(best_f1, threshold)``; the threshold is one of the given scores (the lowest one on ties).
    """
    from sklearn.metrics import precision_recall_curve

    positive, scores_arr = _check_binary_problem(labels, scores, "f1_max")
    precision, recall, thresholds = precision_recall_curve(positive, scores_arr)
    # The final (precision=1, recall=0) point has no threshold attached.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pro_curve(masks: ArrayLike, maps: ArrayLike) -> tuple[NDArray, NDArray, NDArray]:
    """Exact per-region-overlap curve of the MVTec AD protocol (Bergmann et al., IJCV 2021).

    For every distinct map value ``th`` (descending) a pixel is predicted anomalous when ``map >= th``. The FPR
    is measured on all normal pixels (mask == 0) of all images; the PRO is the mean, over every 8-connected
    ground-truth component of every image, of the fraction of that component's pixels predicted anomalous.

    Returns:
        ``(fpr, pro, thresholds)``, all of length ``num_unique_values + 1``: the curve starts at (0, 0) for
        ``th = +inf`` and both fpr and pro are non-decreasing.

    Raises:
        ValueError: On mismatched shapes, non-finite maps, no defect region or no normal pixel.
    """
    defect, scores = _check_pixel_inputs(masks, maps, "aupro")
    # Each defect pixel carries 1/|its region|, so summing over the pixels above a threshold yields the sum of
    # the per-region overlaps, exactly like the official ``compute_pro``. Weights are kept for defect pixels
    # only, in the same (row-major, image by image) order as ``flat_scores[flat_defect]`` below.
    weight_chunks = []
    num_regions = 0
    for image_defect in defect:
        num_labels, component_map = cv2.connectedComponents(image_defect.astype(np.uint8), connectivity=8)
        if num_labels > 1:
            region_sizes = np.bincount(component_map[image_defect], minlength=num_labels).astype(np.float64)
            weight_chunks.append(1.0 / region_sizes[component_map[image_defect]])
            num_regions += num_labels - 1
    flat_scores, flat_defect = scores.ravel(), defect.ravel()
    normal = ~flat_defect
    num_normal = int(normal.sum())
    if num_regions == 0:
        raise ValueError("aupro: the ground-truth masks contain no defect region")
    if num_normal == 0:
        raise ValueError("aupro: the ground-truth masks contain no normal pixel, so the FPR is undefined")

    # Every distinct value is a threshold, from high to low; ties switch together at their shared value.
    thresholds = np.unique(flat_scores)[::-1]
    # Separate sorts plus searchsorted beat one argsort over all pixels (about 3x on MVTec-sized sets):
    # "side=left" counts the pixels with score >= threshold.
    normal_sorted = np.sort(flat_scores[normal])
    normal_above = normal_sorted.size - np.searchsorted(normal_sorted, thresholds, side="left")
    defect_scores = flat_scores[flat_defect]
    defect_order = np.argsort(defect_scores)
    defect_sorted = defect_scores[defect_order]
    defect_weights = np.concatenate(weight_chunks)[defect_order]
    # weight_from[i] = total weight of defect pixels i.. (in ascending-score order); the last entry is 0.
    weight_from = np.append(np.cumsum(defect_weights[::-1])[::-1], 0.0)
    overlap_above = weight_from[np.searchsorted(defect_sorted, thresholds, side="left")]
    return (
        np.concatenate(([0.0], normal_above / num_normal)),
        np.concatenate(([0.0], np.minimum(overlap_above / num_regions, 1.0))),
        np.concatenate(([np.inf], thresholds)),
    )


def _partial_area(x: NDArray, y: NDArray, x_limit: float) -> float:
    """Trapezoid area under a curve with non-decreasing x starting at 0, up to ``x_limit`` (interpolated)."""
    num_inside = int(np.searchsorted(x, x_limit, side="right"))
    x_in, y_in = x[:num_inside], y[:num_inside]
    area = float(np.sum((x_in[1:] - x_in[:-1]) * (y_in[1:] + y_in[:-1]) / 2.0))
    if num_inside < x.size and x_in[-1] < x_limit:
        x0, y0, x1, y1 = x_in[-1], y_in[-1], x[num_inside], y[num_inside]
        y_limit = y0 + (y1 - y0) * (x_limit - x0) / (x1 - x0)
        area += float((x_limit - x0) * (y0 + y_limit) / 2.0)
    return area


def aupro(masks: ArrayLike, maps: ArrayLike, integration_limit: float = DEFAULT_AUPRO_LIMIT) -> float:
    """Normalised area under the PRO curve for FPR in ``[0, integration_limit]`` (MVTec AD protocol).

    The exact curve of :func:`pro_curve` (every distinct map value is a threshold) is integrated with the
    trapezoid rule, interpolated at exactly ``integration_limit``, and divided by ``integration_limit`` so a
    perfect map scores 1.0.

    Raises:
        ValueError: On an integration limit outside (0, 1] and everything :func:`pro_curve` rejects.
    """
    if not 0.0 < integration_limit <= 1.0:
        raise ValueError(f"aupro: integration_limit must be in (0, 1], got {integration_limit}")
    fpr, pro, _ = pro_curve(masks, maps)
    return _partial_area(fpr, pro, integration_limit) / integration_limit


def compute_metrics(
    labels: ArrayLike, scores: ArrayLike, masks: ArrayLike | None = None, maps: ArrayLike | None = None
) -> dict[str, float]:
    """All image-level metrics, plus pixel-level ones when both ``masks`` and ``maps`` are given.

    Returns:
        Keys ``image_auroc, image_ap, image_f1_max, image_f1_threshold`` and, with masks and maps,
        ``pixel_auroc, pixel_ap, aupro`` (FPR limit 0.3) and ``pixel_f1_max``, on maps of at most
        :data:`METRIC_PIXELS` pixels (:func:`at_metric_size`).

    Raises:
        ValueError: On mismatched shapes, non-binary labels, a single class, or only one of masks/maps.
    """
    positive, scores_arr = _check_binary_problem(labels, scores, "image-level metrics")
    best_f1, best_threshold = f1_max(positive, scores_arr)
    results = {
        "image_auroc": image_auroc(positive, scores_arr),
        "image_ap": image_ap(positive, scores_arr),
        "image_f1_max": best_f1,
        "image_f1_threshold": best_threshold,
    }
    if (masks is None) != (maps is None):
        raise ValueError("compute_metrics: masks and maps must be given together (or both omitted)")
    if masks is not None and maps is not None:
        masks, maps = at_metric_size(np.asarray(masks), np.asarray(maps))
        defect, pixel_scores = _check_pixel_inputs(masks, maps, "pixel-level metrics")
        if defect.shape[0] != positive.size:
            raise ValueError(f"compute_metrics: {positive.size} image labels but {len(defect)} masks/maps")
        results["pixel_auroc"] = pixel_auroc(defect, pixel_scores)
        results["pixel_ap"] = pixel_ap(defect, pixel_scores)
        results["aupro"] = aupro(defect, pixel_scores, DEFAULT_AUPRO_LIMIT)
        results["pixel_f1_max"] = f1_max(defect.ravel(), pixel_scores.ravel())[0]
    return results


def metric_size(height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` at which the pixel metrics score an ``height x width`` map: its own size up to
    :data:`METRIC_PIXELS` pixels, else scaled down to that many with its aspect kept."""
    scale = min(1.0, (METRIC_PIXELS / (height * width)) ** 0.5)
    return max(1, round(height * scale)), max(1, round(width * scale))


def at_metric_size(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(masks, maps)`` (both ``(N, H, W)``) at :func:`metric_size`: unchanged where they fit (or do not share
    one shape: the caller's check says so), else the maps area-averaged and the masks (nonzero: defect) resized
    by nearest neighbour, labels not blended."""
    if maps.ndim != 3 or masks.shape != maps.shape:
        return masks, maps
    height, width = metric_size(*maps.shape[-2:])
    if (height, width) == maps.shape[-2:]:
        return masks, maps
    dsize = (width, height)
    small_maps = np.stack([cv2.resize(np.asarray(m, np.float32), dsize, interpolation=cv2.INTER_AREA) for m in maps])
    small_masks = np.stack(
        [cv2.resize((m > 0).astype(np.uint8), dsize, interpolation=cv2.INTER_NEAREST) for m in masks]
    )
    return small_masks, small_maps


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Plain-text two-column table, known metrics first in canonical order, then the rest sorted."""
    names = [name for name in METRIC_ORDER if name in metrics]
    names += sorted(name for name in metrics if name not in METRIC_ORDER)
    rows = [(name, _format_value(metrics[name])) for name in names]
    name_width = max([len("metric")] + [len(name) for name, _ in rows])
    value_width = max([len("value")] + [len(value) for _, value in rows])
    lines = [f"{'metric':<{name_width}}  {'value':>{value_width}}", "-" * (name_width + 2 + value_width)]
    lines += [f"{name:<{name_width}}  {value:>{value_width}}" for name, value in rows]
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    """Numbers with four decimals, anything else as ``str``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return str(value)
    return f"{float(value):.4f}"
