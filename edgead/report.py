"""The on-disk evaluation report: ``metrics.json``, ROC curve, heatmap overlays of the top-scoring images.

Torch-free: numpy and OpenCV. :func:`heatmap_overlay` lives in ``edgead.runtime.overlay`` (the live runtime
draws with it) and is re-exported here.

A report folder is the user's folder as much as edgead's, so a report writes only where nothing of the user's
can be lost: into a new or empty folder, or over an earlier report of its own. Every file a report writes is
listed in the folder's manifest, ``.edgead-report.json``, *before* it is written (so a report killed half-way
is still recognisable as edgead's), and a later report replaces or removes only files listed there, never a
file found by its name. A folder holding anything else (the user's files, or a report of an edgead older than
the manifest) is refused with the names of those files; nothing in it is touched.
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

from edgead.data.files import check_output_folder, write_bytes_atomic, write_json_atomic
from edgead.runtime.overlay import heatmap_overlay  # re-exported: the report and the live runtime share it

_ROC_SIZE = 480
_PLOT_LEFT, _PLOT_TOP, _PLOT_SIDE = 62, 34, 390
_MIN_PANEL_HEIGHT = 224
_GT_COLOR = (0, 255, 0)


# -------------------------------------------------------------------------------------------- visualisation
def _caption_strip(text: str, width: int) -> NDArray[np.uint8]:
    """``text`` in white on a black band of ``width`` pixels: readable whatever the image below looks like; the
    font shrinks until the line fits (down to a floor, then the text is cut with an ellipsis)."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.6
    while scale > 0.35 and cv2.getTextSize(text, font, scale, 1)[0][0] > width - 12:
        scale -= 0.05
    while len(text) > 4 and cv2.getTextSize(text, font, scale, 1)[0][0] > width - 12:
        text = text[:-4] + "..."
    (_, text_height), baseline = cv2.getTextSize(text, font, scale, 1)
    strip = np.zeros((text_height + baseline + 12, width, 3), dtype=np.uint8)
    cv2.putText(strip, text, (6, text_height + 6), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def _overlay_row(
    rgb: NDArray[np.uint8], anomaly_map: NDArray, mask: NDArray | None, vmin: float, vmax: float, caption: str
) -> NDArray[np.uint8]:
    """Input | heatmap overlay | ground-truth contour (when a mask exists) under a caption band, as one BGR image
    for writing."""
    if rgb.shape[0] < _MIN_PANEL_HEIGHT:
        # Upscale small inputs so the contours stay legible.
        factor = _MIN_PANEL_HEIGHT / rgb.shape[0]
        new_size = (max(1, round(rgb.shape[1] * factor)), _MIN_PANEL_HEIGHT)
        rgb = cv2.resize(rgb, new_size, interpolation=cv2.INTER_LINEAR)
    height, width = rgb.shape[:2]
    overlay = heatmap_overlay(rgb, anomaly_map, vmin, vmax)
    panels = [rgb, overlay]
    if mask is not None:
        defect = (np.asarray(mask) > 0).astype(np.uint8)
        defect = cv2.resize(defect, (width, height), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(defect, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        ground_truth = rgb.copy()
        cv2.drawContours(ground_truth, contours, -1, _GT_COLOR, max(1, width // 160), cv2.LINE_AA)
        panels.append(ground_truth)
    row = np.hstack(panels)
    return cv2.cvtColor(np.vstack([_caption_strip(caption, row.shape[1]), row]), cv2.COLOR_RGB2BGR)


def _overlay_name(group: str, rank: int, path: str) -> str:
    """``<group>_<rank>_<folder>_<file stem>.png``: the defect folder keeps equal file names of different
    defect types (``crack/000.png``, ``hole/000.png``) apart."""
    source = Path(path)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", f"{source.parent.name}_{source.stem}")
    return f"{group}_{rank:02d}_{stem}.png"


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


# ------------------------------------------------------------------------------------------ report ownership
#: The list of every file edgead wrote into a report folder (paths relative to it, "/"-separated).
REPORT_MANIFEST = ".edgead-report.json"
#: How many foreign files an error names before it says "and N more".
_NAMED_FILES = 5


class ReportFolderError(ValueError):
    """The report folder is not a folder, or holds files edgead did not write: refused, nothing touched."""


def _listed(rel: str) -> bool:
    """``rel`` is a plain relative path inside the folder (a hand-edited manifest must never point outside)."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(part not in ("", ".", "..") for part in parts)


def report_manifest(folder: str | os.PathLike[str]) -> set[str] | None:
    """The files the manifest of ``folder`` lists, or None when it has none (or one that is not edgead's)."""
    path = Path(folder) / REPORT_MANIFEST
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (
        not isinstance(record, dict)
        or record.get("written_by") != "edgead"
        or not isinstance(record.get("files"), list)
    ):
        return None
    return {f for f in record["files"] if isinstance(f, str) and _listed(f)}


def _write_manifest(folder: Path, files: set[str]) -> None:
    write_json_atomic(folder / REPORT_MANIFEST, {"written_by": "edgead", "files": sorted(files)}, durable=False)


def _is_temporary_of(rel: str, owned: set[str]) -> bool:
    """``rel`` is what :func:`edgead.data.files.atomic_output` leaves of a listed file when killed mid-write."""
    head, _, name = rel.rpartition("/")
    match = re.fullmatch(r"\.(.+)\.[^./]+\.tmp", name)
    return match is not None and (f"{head}/{match[1]}" if head else match[1]) in owned | {REPORT_MANIFEST}


def _foreign_files(folder: Path, prefix: str = "") -> list[str]:
    """Files under ``folder`` (relative to the folder first given) that no edgead report manifest lists. A
    subfolder with a manifest of its own is a report of one data set (``eval`` over several) and is checked
    against its own; links are never followed (a link is foreign unless listed)."""
    owned = report_manifest(folder) or set()
    foreign: list[str] = []
    for entry in sorted(folder.iterdir()):
        rel = entry.name
        if rel == REPORT_MANIFEST:
            continue
        if entry.is_dir() and not entry.is_symlink():
            if report_manifest(entry) is not None:
                foreign += _foreign_files(entry, f"{prefix}{rel}/")
                continue
            for root, dirs, files in os.walk(entry):  # os.walk never descends into linked folders
                base = Path(root).relative_to(folder).as_posix()
                links = [d for d in dirs if (Path(root) / d).is_symlink()]
                for name in sorted(files + links):
                    if f"{base}/{name}" not in owned and not _is_temporary_of(f"{base}/{name}", owned):
                        foreign.append(f"{prefix}{base}/{name}")
        elif rel not in owned and not _is_temporary_of(rel, owned):
            foreign.append(prefix + rel)
    return foreign


def _looks_like_old_report(folder: Path) -> bool:
    """``folder/metrics.json`` has the layout :func:`write_report` gives it (only for the error's advice)."""
    try:
        record = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and {"metrics", "run", "images"} <= set(record)


def check_report_folder(out_dir: str | os.PathLike[str], also_ours: tuple[str, ...] = ()) -> Path:
    """Fail (before any work) unless a report may be written into ``out_dir``: it does not exist yet, is empty, or
    holds only files an earlier edgead report listed in its manifest. ``also_ours``: files the caller itself has
    just written there (``decisions.csv``, written by ``edgead.pipeline`` before the report).

    Raises:
        ReportFolderError: ``out_dir`` is not a folder, or holds other files (the error names them).
        edgead.data.files.OutputPathError: ``out_dir`` cannot be created or written.
    """
    folder = Path(out_dir)
    if folder.is_dir():
        foreign = [rel for rel in _foreign_files(folder) if rel not in also_ours]
        if foreign:
            names = ", ".join(foreign[:_NAMED_FILES])
            more = f" and {len(foreign) - _NAMED_FILES} more" if len(foreign) > _NAMED_FILES else ""
            legacy = (
                " (it looks like an eval report of an edgead older than the manifest: if nothing else in it is "
                "yours, delete it to write a new report there)"
                if report_manifest(folder) is None and _looks_like_old_report(folder)
                else ""
            )
            raise ReportFolderError(
                f"{folder} holds files edgead did not write: {names}{more}{legacy}. A report goes into a new or "
                f"empty folder or over an earlier edgead report ({REPORT_MANIFEST}), never over other files: "
                "choose another --out or move them away"
            )
    return check_output_folder(folder, "report folder")


def claim_report_folder(out_dir: str | os.PathLike[str], files: tuple[str, ...] = ()) -> Path:
    """:func:`check_report_folder` (``files`` count as the caller's), then create ``out_dir`` and list ``files``
    (written, or to be written, by the caller: ``summary.json`` of an eval over several data sets) in its
    manifest, with what it listed already."""
    folder = check_report_folder(out_dir, also_ours=files)
    folder.mkdir(parents=True, exist_ok=True)
    _write_manifest(folder, (report_manifest(folder) or set()) | set(files))
    return folder


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
    threshold: float | None = None,
) -> Path:
    """Writes ``metrics.json``, ``roc.png`` and the overlays a reviewer needs, in ``overlays/``:

    - ``top_NN_<folder>_<stem>.png``: the ``top_k`` highest-scoring images;
    - ``falsealarm_NN_...``: the highest-scoring normal images (those at or above ``threshold`` when one is
      given: the deployed threshold's false alarms), up to ``top_k``;
    - ``missed_NN_...``: the lowest-scoring defective images (below ``threshold`` when given: its misses).

    Each overlay is input | heatmap | ground-truth contour under a caption band (file, label, score, decision).
    ``metrics.json`` holds ``{"metrics": ..., "run": extra, "images": [{path, label, score}, ...]}``. Overlays
    colour every map with one global min/max over the whole test set so images are comparable.

    ``out_dir`` must be new, empty or an earlier edgead report (:func:`check_report_folder`; with ``threshold``,
    a ``decisions.csv`` there counts as this report's: ``edgead.pipeline`` writes it just before). Files of the
    earlier report that this one does not write again (its overlays, a ``decisions.csv`` of another threshold)
    are removed so the folder shows this run's only; they are found in the manifest, never by their names.

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
        threshold: The deployed decision threshold, if any (selects false alarms and misses, and is captioned).

    Returns:
        The path of ``metrics.json``.

    Raises:
        ReportFolderError: ``out_dir`` holds files edgead did not write (nothing is written then).
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
    beside = ("decisions.csv",) if threshold is not None and (out_path / "decisions.csv").is_file() else ()
    check_report_folder(out_path, also_ours=beside)
    previous = report_manifest(out_path) or set()

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

    order = np.argsort(-scores_arr, kind="stable")
    normal, defective = order[labels_arr[order] == 0], order[labels_arr[order] == 1][::-1]
    if threshold is not None:
        normal = normal[scores_arr[normal] >= threshold]
        defective = defective[scores_arr[defective] < threshold]
    k = max(0, top_k)
    overlays = [
        (_overlay_name(group, rank, str(image_paths[index])), index)
        for group, indices in (("top", order[:k]), ("falsealarm", normal[:k]), ("missed", defective[:k]))
        for rank, index in enumerate(indices)
    ]
    written = {"roc.png", "metrics.json", *beside, *(f"overlays/{name}" for name, _ in overlays)}
    out_path.mkdir(parents=True, exist_ok=True)
    _write_manifest(out_path, previous | written)  # listed before written: a killed report stays edgead's
    overlay_dir.mkdir(exist_ok=True)
    _write_png(out_path / "roc.png", _render_roc(curves))
    vmin, vmax = float(maps_arr.min()), float(maps_arr.max())
    for name, index in overlays:
        rgb = np.asarray(images_rgb[index])
        mask = None if masks_arr is None else masks_arr[index]
        source = Path(image_paths[index])
        caption = f"{source.parent.name}/{source.name}  {'defect' if labels_arr[index] else 'normal'}  "
        caption += f"score {scores_arr[index]:.4g}"
        if threshold is not None:
            flagged = scores_arr[index] >= threshold
            caption += f"  {'ANOMALY' if flagged else 'pass'} at threshold {threshold:.4g}"
        row = _overlay_row(rgb, maps_arr[index], mask, vmin, vmax, caption)
        _write_png(overlay_dir / name, row)

    report = {
        "metrics": dict(metrics),
        "run": dict(extra or {}),
        "images": [
            {"path": str(path), "label": int(label), "score": float(score)}
            for path, label, score in zip(image_paths, labels_arr, scores_arr, strict=True)
        ],
    }
    metrics_path = out_path / "metrics.json"
    write_json_atomic(metrics_path, _to_json_value(report), allow_nan=False)
    for stale in sorted(previous - written):  # only files an earlier report listed as its own
        path = out_path / stale
        if path.is_symlink() or path.is_file():
            path.unlink()
    _write_manifest(out_path, written)
    return metrics_path
