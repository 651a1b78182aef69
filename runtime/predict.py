"""``edgead predict``: an exported detector over an image, a folder of images or a video file, in batch.

The batch counterpart of ``edgead run`` (which is live and may drop frames): every image or frame is scored,
and the results go to ``predictions.csv`` (one row per image: file, frame, score, decision, threshold) and
``predictions.json`` (the same rows, the export used and a summary), with heatmap overlays of all images,
only the anomalous ones, or none.

Output goes into a folder no other writer uses: a new or empty ``--out`` (a non-empty one is refused, so earlier
predictions and a user's files are never overwritten; two predicts into one folder: the second is refused), or
by default a new ``predictions/<time>`` created atomically (``-2``, ``-3``, ... when another predict took that
second). Files are written atomically. A predict that fails (a full disk, an unreadable image, Ctrl-C) removes
every file it wrote, and the folder too when it made it, so the same command can simply be run again.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgead.data.files import OutputPathError, check_output_folder, new_folder, write_bytes_atomic, write_json_atomic
from edgead.data.io import write_image_atomic
from edgead.progress import Progress
from edgead.runtime.overlay import draw_hud
from edgead.runtime.sources import SourceError, create_source

SAVE_CHOICES = ("all", "anomalies", "none")
CSV_FIELDS = ("file", "frame", "score", "is_anomaly", "threshold")
#: Where predictions go without ``--out``: a new ``<time>`` folder under it.
DEFAULT_ROOT = Path("predictions")
#: Held (created exclusively) while a predict writes into a folder: a second predict into it is refused.
WRITING_MARKER = ".edgead-predict-writing"


@dataclass
class PredictSummary:
    images: int = 0
    anomalies: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path = Path()


def _overlay_name(row: dict[str, Any], used: set[str]) -> str:
    stem = Path(str(row["file"])).stem or "frame"
    name = f"{row['frame']:06d}_{stem}_{'anomaly' if row['is_anomaly'] else 'normal'}.png"
    while name in used:  # two files of one name in a video / folder: never overwrite
        name = name.replace(".png", "+.png")
    used.add(name)
    return name


def check_out_dir(out_dir: Path | None) -> None:
    """Fail before any work when predictions cannot go to ``out_dir`` (None: the default folder): not a folder,
    not empty, or not writable.

    Raises:
        edgead.data.files.OutputPathError: naming the folder.
    """
    if out_dir is None:
        check_output_folder(DEFAULT_ROOT, "predictions folder")
        return
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        unfinished = (
            " (an unfinished predict is writing there, or was killed)" if (out_dir / WRITING_MARKER).exists() else ""
        )
        raise OutputPathError(
            f"{out_dir}: the output folder exists and is not empty{unfinished}; predictions never overwrite: "
            "choose another --out"
        )
    check_output_folder(out_dir, "--out")


def _new_default_folder() -> Path:
    """``predictions/<time>``, made here and now (``-2``, ``-3``, ... when the second is taken): never shared."""
    return new_folder(DEFAULT_ROOT, time.strftime("%Y%m%d-%H%M%S"))


def _claim(out_dir: Path | None) -> tuple[Path, bool]:
    """Take the output folder for this process alone; returns it and whether this call created it."""
    if out_dir is None:
        out_dir, created = _new_default_folder(), True
    else:
        check_out_dir(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            out_dir.mkdir()
            created = True
        except FileExistsError:
            created = False
    try:  # exclusive: of two predicts into one (empty) folder, the second stops here
        os.close(os.open(out_dir / WRITING_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise OutputPathError(f"{out_dir}: another predict is writing into this folder; choose another --out") from None
    if any(entry.name != WRITING_MARKER for entry in out_dir.iterdir()):  # filled between the check and the claim
        (out_dir / WRITING_MARKER).unlink()
        raise OutputPathError(f"{out_dir}: the output folder is not empty; predictions never overwrite")
    return out_dir, created


def _remove_partial(out_dir: Path, written: list[Path], created: bool) -> None:
    """Undo a failed predict: the files it wrote, its overlays folder, and ``out_dir`` when it made it (all
    only when empty then: nothing else is ever removed)."""
    for path in [*written, out_dir / WRITING_MARKER]:
        path.unlink(missing_ok=True)
    for folder in (out_dir / "overlays", *([out_dir] if created else [])):
        try:
            folder.rmdir()
        except OSError:
            pass


def _is_write_error(err: OSError, out_dir: Path) -> bool:
    """``err`` says an output could not be written: no room (disk, quota, file size), a read-only file system,
    or any error about a file inside ``out_dir`` (an input that cannot be read is not one)."""
    no_room = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG, errno.EROFS}
    name = err.filename
    inside = isinstance(name, (str, bytes)) and Path(os.fsdecode(name)).parent in (out_dir, out_dir / "overlays")
    return err.errno in no_room or inside


def predict_source(
    detector: Any,
    source: str,
    out_dir: Path | None,
    *,
    save: str = "anomalies",
    skip_bad: bool = False,
    on_event: Callable[[str], None] = print,
    progress: bool = False,
) -> PredictSummary:
    """Score every image of ``source`` with ``detector`` (a :class:`edgead.runtime.Detector`) into ``out_dir``
    (None: a new ``predictions/<time>`` folder; ``summary.out_dir`` says which).

    Raises:
        ValueError: ``save`` is not one of :data:`SAVE_CHOICES`.
        edgead.data.files.OutputPathError: ``out_dir`` holds files already or cannot be written, or writing failed
            (a full disk: what this call wrote is removed again).
        SourceError: The source cannot be opened, or an image cannot be read (unless ``skip_bad``).
    """
    if save not in SAVE_CHOICES:
        raise ValueError(f"--save must be one of {', '.join(SAVE_CHOICES)}, got {save!r}")
    check_out_dir(None if out_dir is None else Path(out_dir))
    frames = create_source(source, skip_bad=skip_bad, on_event=on_event)
    if frames.live:
        raise SourceError(f"{source}: predict takes an image, a folder of images or a video file; use `edgead run`")
    out_dir, created = _claim(None if out_dir is None else Path(out_dir))
    summary = PredictSummary(out_dir=out_dir)
    written: list[Path] = []
    try:
        _score(detector, frames, out_dir, save, progress, summary, written)
        if summary.images == 0:
            raise SourceError(f"{source}: no image could be scored")
        _write_results(out_dir, detector, source, summary, written)
        (out_dir / WRITING_MARKER).unlink()
    except BaseException as err:
        _remove_partial(out_dir, written, created)
        if isinstance(err, OSError) and _is_write_error(err, out_dir):
            where = f" {err.filename}" if err.filename else ""
            raise OutputPathError(
                f"{out_dir}: cannot write{where} ({err.strerror or err}); the partial output was removed, so the "
                "same command can run again once there is room"
            ) from None
        raise
    return summary


def _score(
    detector: Any,
    frames: Any,
    out_dir: Path,
    save: str,
    progress: bool,
    summary: PredictSummary,
    written: list[Path],
) -> None:
    """Score every frame into ``summary``; every overlay written is appended to ``written``."""
    used: set[str] = set()
    start = time.perf_counter()
    frames.open()
    with Progress("predict", frames.expected_frames or 0, unit="images", enabled=progress) as bar:
        try:
            while (frame := frames.read()) is not None:
                result = detector.predict(frame.image)
                row = {
                    "file": frame.name,
                    "frame": frame.index,
                    "score": float(result.score),
                    "is_anomaly": bool(result.is_anomaly),
                    "threshold": float(result.threshold),
                }
                summary.rows.append(row)
                summary.images += 1
                summary.anomalies += int(result.is_anomaly)
                if save == "all" or (save == "anomalies" and result.is_anomaly):
                    hud = draw_hud(frame.image, result, None, None, 0.0, 2.0 * float(result.threshold))
                    name = _overlay_name(row, used)
                    written.append(out_dir / "overlays" / name)
                    write_image_atomic(written[-1], hud, bgr=True)
                    row["overlay"] = f"overlays/{name}"
                bar.advance()
        finally:
            frames.close()
    summary.seconds = time.perf_counter() - start
    summary.skipped = int(getattr(frames, "skipped", 0))


def _write_results(out_dir: Path, detector: Any, source: str, summary: PredictSummary, written: list[Path]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in summary.rows:
        writer.writerow({**row, "score": f"{row['score']:.6g}", "threshold": f"{row['threshold']:.6g}"})
    written.append(out_dir / "predictions.csv")
    write_bytes_atomic(written[-1], text.getvalue().encode("utf-8"))
    scores = np.array([row["score"] for row in summary.rows])
    record = {
        "source": source,
        "export": detector.describe(),
        "summary": {
            "images": summary.images,
            "anomalies": summary.anomalies,
            "skipped": summary.skipped,
            "threshold": summary.rows[0]["threshold"],
            "score_min": float(scores.min()),
            "score_median": float(np.median(scores)),
            "score_max": float(scores.max()),
            "seconds": round(summary.seconds, 3),
        },
        "predictions": summary.rows,
    }
    written.append(out_dir / "predictions.json")
    write_json_atomic(written[-1], record, durable=False)
