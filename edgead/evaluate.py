"""Anomaly-detection metrics (image and pixel level, AUPRO) and the on-disk evaluation report.

Torch-free on purpose: only numpy and OpenCV are imported at module level. scikit-learn is imported lazily
inside the metric functions, so importing this module works in an edge install that has no scikit-learn.
:func:`heatmap_overlay` lives in ``edgead.runtime.overlay`` (the live runtime draws with it) and is re-exported
here.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from edgead.data.io import write_bytes_atomic
from edgead.runtime.overlay import heatmap_overlay  # re-exported: the report and the live runtime share it

BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]

DEFAULT_AUPRO_LIMIT = 0.3
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


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision of image-level anomaly scores (anomalous is the positive class)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(*_check_binary_problem(labels, scores, "image_ap")))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """ROC AUC over all pixels of all images; masks (N, H, W) nonzero = defect, maps (N, H, W) float."""
    from sklearn.metrics import roc_auc_score

    defect, pixel_scores = _check_pixel_inputs(masks, maps, "pixel_auroc")
    return float(roc_auc_score(*_check_binary_problem(defect.ravel(), pixel_scores.ravel(), "pixel_auroc")))


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
        ``pixel_auroc, pixel_ap, aupro`` (FPR limit 0.3) and ``pixel_f1_max``.

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
        defect, pixel_scores = _check_pixel_inputs(masks, maps, "pixel-level metrics")
        if defect.shape[0] != positive.size:
            raise ValueError(f"compute_metrics: {positive.size} image labels but {len(defect)} masks/maps")
        results["pixel_auroc"] = pixel_auroc(defect, pixel_scores)
        results["pixel_ap"] = pixel_ap(defect, pixel_scores)
        results["aupro"] = aupro(defect, pixel_scores, DEFAULT_AUPRO_LIMIT)
        results["pixel_f1_max"] = f1_max(defect.ravel(), pixel_scores.ravel())[0]
    return results


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


# -------------------------------------------------------------------------------------------- visualisation
def _overlay_row(
    rgb: NDArray[np.uint8], anomaly_map: NDArray, mask: NDArray | None, vmin: float, vmax: float, caption: str
) -> NDArray[np.uint8]:
    """Input | heatmap overlay | ground-truth contour (when a mask exists), as one BGR image for writing."""
    if rgb.shape[0] < _MIN_PANEL_HEIGHT:
        # Upscale small inputs so the caption and contours stay legible.
        factor = _MIN_PANEL_HEIGHT / rgb.shape[0]
        new_size = (max(1, round(rgb.shape[1] * factor)), _MIN_PANEL_HEIGHT)
        rgb = cv2.resize(rgb, new_size, interpolation=cv2.INTER_LINEAR)
    height, width = rgb.shape[:2]
    overlay = heatmap_overlay(rgb, anomaly_map, vmin, vmax)
    text_scale = max(0.4, width / 560)
    # White text over a thicker black copy stays readable on any heatmap colour.
    origin = (6, int(22 * text_scale / 0.4))
    for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(
            overlay, caption, origin, cv2.FONT_HERSHEY_SIMPLEX, text_scale, colour, thickness, cv2.LINE_AA
        )
    panels = [rgb, overlay]
    if mask is not None:
        defect = (np.asarray(mask) > 0).astype(np.uint8)
        defect = cv2.resize(defect, (width, height), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(defect, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        ground_truth = rgb.copy()
        cv2.drawContours(ground_truth, contours, -1, _GT_COLOR, max(1, width // 160), cv2.LINE_AA)
        panels.append(ground_truth)
    return cv2.cvtColor(np.hstack(panels), cv2.COLOR_RGB2BGR)


def _render_roc(
    curves: Sequence[tuple[str, NDArray, NDArray, float, tuple[int, int, int]]],
) -> NDArray[np.uint8]:
    """Draws ROC curves ``(name, fpr, tpr, auroc, bgr_colour)`` on a white square canvas (BGR)."""
    canvas = np.full((_ROC_SIZE, _ROC_SIZE, 3), 255, dtype=np.uint8)
    left, top, side = _PLOT_LEFT, _PLOT_TOP, _PLOT_SIDE
    right, bottom = left + side, top + side
    font = cv2.FONT_HERSHEY_SIMPLEX

    def to_pixels(x: NDArray, y: NDArray) -> NDArray[np.int32]:
        points = np.stack([left + np.asarray(x) * side, bottom - np.asarray(y) * side], axis=1)
        return np.round(points).astype(np.int32).reshape(-1, 1, 2)

    for tick in np.linspace(0.0, 1.0, 6):
        offset = round(tick * side)
        cv2.line(canvas, (left + offset, top), (left + offset, bottom), (230, 230, 230), 1)
        cv2.line(canvas, (left, bottom - offset), (right, bottom - offset), (230, 230, 230), 1)
        label = f"{tick:.1f}"
        cv2.putText(canvas, label, (left + offset - 10, bottom + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(canvas, label, (left - 30, bottom - offset + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    # Dashed chance diagonal, so it is not mistaken for a curve.
    for start in np.arange(0.0, 1.0, 0.04):
        segment = to_pixels([start, start + 0.02], [start, start + 0.02])
        cv2.polylines(canvas, [segment], False, (150, 150, 150), 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (left, top), (right, bottom), (0, 0, 0), 1)
    for _, fpr, tpr, _, colour in curves:
        cv2.polylines(canvas, [to_pixels(fpr, tpr)], False, colour, 2, cv2.LINE_AA)
    if curves:
        # A boxed legend keeps the diagonal and curves from running through the text.
        legend_top = bottom - 30 - 20 * (len(curves) - 1)
        cv2.rectangle(canvas, (right - 198, legend_top), (right - 6, bottom - 6), (255, 255, 255), -1)
        cv2.rectangle(canvas, (right - 198, legend_top), (right - 6, bottom - 6), (160, 160, 160), 1)
    for index, (name, _, _, auroc_value, colour) in enumerate(curves):
        y = bottom - 14 - 20 * (len(curves) - 1 - index)
        cv2.line(canvas, (right - 190, y - 4), (right - 165, y - 4), colour, 2, cv2.LINE_AA)
        text = f"{name} AUROC {auroc_value:.4f}"
        cv2.putText(canvas, text, (right - 158, y), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "ROC", (left + side // 2 - 18, top - 12), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "False positive rate", (left + side // 2 - 80, bottom + 40), font, 0.5, (0, 0, 0), 1)
    # OpenCV cannot draw rotated text, so the y label is drawn horizontally and the strip rotated.
    strip = np.full((20, side, 3), 255, dtype=np.uint8)
    cv2.putText(strip, "True positive rate", (side // 2 - 75, 15), font, 0.5, (0, 0, 0), 1)
    canvas[top:bottom, 4:24] = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return canvas


# ------------------------------------------------------------------------------------------------ report IO
def _write_png(path: Path, image_bgr: NDArray[np.uint8]) -> None:
    ok, encoded = cv2.imencode(".png", image_bgr)
    if not ok:
        raise RuntimeError(f"could not encode {path.name} as PNG")
    write_bytes_atomic(path, encoded.tobytes())


def _to_json_value(value: Any) -> Any:
    """Converts numpy values to JSON types, non-finite floats to null (strict JSON) and other objects to str."""
    if isinstance(value, Mapping):
        return {str(key): _to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_to_json_value(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value if value is None or isinstance(value, (str, int)) else str(value)


def write_report(
    out_dir: str | os.PathLike[str],
    metrics: Mapping[str, Any],
    labels: ArrayLike,
    scores: ArrayLike,
    image_paths: Sequence[str],
    images_rgb: NDArray[np.uint8] | Sequence[NDArray[np.uint8]],
    maps: ArrayLike,
    masks: ArrayLike | None = None,
    top_k: int = 8,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``metrics.json``, ``roc.png`` and ``overlays/NN_<stem>.png`` for the top-k scoring images.

    ``metrics.json`` holds ``{"metrics": ..., "run": extra, "images": [{path, label, score}, ...]}``. Overlays
    colour every map with one global min/max over the whole test set so images are comparable; overlays
    left in ``overlays/`` by an earlier report are removed so the folder always shows this run's top-k.

    Args:
        out_dir: Report directory (created if missing).
        metrics: Metric name to value, e.g. from :func:`compute_metrics`.
        labels: (N,) image labels, 1 = anomalous.
        scores: (N,) image anomaly scores.
        image_paths: N source paths, used in the JSON and for overlay file names.
        images_rgb: (N, H, W, 3) uint8 array or N (H, W, 3) uint8 RGB images.
        maps: (N, h, w) anomaly maps (any size; resized to each image).
        masks: Optional (N, H', W') ground-truth masks, nonzero = defect.
        top_k: Number of highest-scoring images to draw.
        extra: Run information stored under "run" (method, checkpoint, timings...).

    Returns:
        The path of ``metrics.json``.
    """
    from sklearn.metrics import auc, roc_curve

    labels_arr = np.asarray(labels).astype(int)
    scores_arr = np.asarray(scores, dtype=np.float64)
    maps_arr = np.asarray(maps, dtype=np.float64)
    masks_arr = None if masks is None else np.asarray(masks)
    num_images = len(image_paths)
    lengths = {"labels": len(labels_arr), "scores": len(scores_arr), "images_rgb": len(images_rgb)}
    lengths.update(maps=len(maps_arr), masks=num_images if masks_arr is None else len(masks_arr))
    if any(length != num_images for length in lengths.values()) or maps_arr.ndim != 3:
        raise ValueError(f"write_report: expected {num_images} items each and (N, h, w) maps, got {lengths}")

    out_path = Path(out_dir)
    overlay_dir = out_path / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)

    curves = []
    if 0 < labels_arr.sum() < num_images:
        fpr, tpr, _ = roc_curve(labels_arr, scores_arr)
        curves.append(("image", fpr, tpr, float(auc(fpr, tpr)), (200, 90, 20)))
    # The pixel curve needs masks at map resolution; overlays resize masks, so they accept any size.
    same_size = masks_arr is not None and masks_arr.shape == maps_arr.shape
    pixel_defect = masks_arr.ravel() > 0 if same_size else np.zeros(0, dtype=bool)
    if 0 < pixel_defect.sum() < pixel_defect.size:
        fpr, tpr, _ = roc_curve(pixel_defect, maps_arr.ravel())
        curves.append(("pixel", fpr, tpr, float(auc(fpr, tpr)), (30, 30, 220)))
    _write_png(out_path / "roc.png", _render_roc(curves))

    for stale in overlay_dir.iterdir():
        if re.fullmatch(r"\d{2,}_.*\.png", stale.name):
            stale.unlink()
    vmin, vmax = float(maps_arr.min()), float(maps_arr.max())
    rank_width = max(2, len(str(top_k)))
    for rank, index in enumerate(np.argsort(-scores_arr, kind="stable")[: max(0, top_k)]):
        rgb = np.asarray(images_rgb[index])
        mask = None if masks_arr is None else masks_arr[index]
        caption = f"score {scores_arr[index]:.4g}  label {labels_arr[index]}"
        row = _overlay_row(rgb, maps_arr[index], mask, vmin, vmax, caption)
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(image_paths[index]).stem)
        _write_png(overlay_dir / f"{rank:0{rank_width}d}_{stem}.png", row)

    report = {
        "metrics": dict(metrics),
        "run": dict(extra or {}),
        "images": [
            {"path": str(path), "label": int(label), "score": float(score)}
            for path, label, score in zip(image_paths, labels_arr, scores_arr, strict=True)
        ],
    }
    metrics_path = out_path / "metrics.json"
    text = json.dumps(_to_json_value(report), indent=2, allow_nan=False)
    write_bytes_atomic(metrics_path, (text + "\n").encode("utf-8"), durable=True)
    return metrics_path
