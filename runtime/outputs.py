"""The live loop's outputs, written so that they agree after any ending (:mod:`edgead.runtime.live`).

- :func:`check_output`: before the source opens, a log that is a folder, an evidence folder that is a file, a
  read-only or full file system is an :class:`OutputError` naming the path.
- :class:`JsonLinesLog`: one write of the whole line; a write that fails part-way is cut back, so the log
  always ends with a complete line.
- :func:`commit_evidence`: an alarm's files under temporary names, then its log line, then the renames; any
  failure removes the files and cuts the line, so no file is left without its line and no line names a
  missing file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from edgead.runtime.capture import Frame
from edgead.runtime.result import Result

__all__ = [
    "EVIDENCE_SUFFIXES",
    "JsonLinesLog",
    "OutputError",
    "Outputs",
    "check_output",
    "commit_evidence",
    "encode_evidence",
    "evidence_base",
    "log_record",
    "naming",
    "save_anomaly",
    "write_file",
]

# Free space an output location needs before a run starts (engineering choice: a few thousand log lines or a
# few alarms; a full disk reports 0). Running out later is caught when a write fails.
_MIN_FREE_BYTES = 1 << 20


class OutputError(RuntimeError):
    """The log or the evidence folder cannot be written; the message names the path and the reason."""


# ------------------------------------------------------------------------------------------ output checks
def check_output(path: Path, what: str, folder: bool) -> None:
    if path.is_dir() and not folder:
        raise OutputError(f"cannot write {what}: it is a folder; give a file name such as {path / 'run.jsonl'}")
    if path.exists() and not path.is_dir() and folder:
        raise OutputError(f"cannot write {what}: it is a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise OutputError(f"cannot write {what}: {existing} is a file, not a folder")
    refused = _write_error(existing)
    if refused is not None:
        if refused.errno == errno.EROFS:
            reason = "is on a read-only file system"
        elif refused.errno in (errno.EACCES, errno.EPERM):
            reason = "is not writable (permission denied)"
        else:
            reason = f"cannot be written: {_reason(refused)}"
        raise OutputError(f"cannot write {what}: {existing} {reason}")
    free = _free_bytes(existing if existing.is_dir() else existing.parent)
    if free is not None and free < _MIN_FREE_BYTES:
        raise OutputError(f"cannot write {what}: no space left on its file system ({free} bytes free)")


def _write_error(path: Path) -> OSError | None:
    """Does what the run will do, leaving nothing behind: creates and removes a file in a folder, or opens an
    existing file for appending (``os.access`` says yes to root where a write then fails: ACLs, NFS).
    Returns the error, None when the write works."""
    try:
        if path.is_dir():
            handle, name = tempfile.mkstemp(prefix=".edgead-write-check.", dir=path)
            os.close(handle)
            os.unlink(name)
        elif path.is_file():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as exc:
        return exc
    return None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:  # not every file system can say
        return None


def _reason(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the system's words and the errno name users search for."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


@contextlib.contextmanager
def naming(what: str) -> Iterator[None]:
    """Turns an OSError into an OutputError that names the output."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {what}: {_reason(exc)}") from exc


# ------------------------------------------------------------------------------------------ log and evidence
class JsonLinesLog:
    """Append-only JSON-lines log where every record is one unbuffered write of the whole line; a write that
    fails part-way is truncated back, so the file always ends with a complete line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Unbuffered binary append: each line goes to the OS in one write() call, nothing waits in a buffer.
        self._handle: BinaryIO | None = open(path, "ab", buffering=0)  # closed in close()
        try:
            if path.is_file() and self._handle.tell() > 0 and not _ends_with_newline(path):
                # An earlier run died mid-line (e.g. power loss); start on a fresh line so ours stay parseable.
                self._write_all(b"\n")
        except BaseException:
            self.close()
            raise

    def _write_chunk(self, data: memoryview) -> int:
        assert self._handle is not None
        return self._handle.write(data) or 0

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # raw writes may be partial (a nearly full disk); finish the line or fail
            view = view[self._write_chunk(view) :]

    def write(self, record: dict[str, Any]) -> int | None:
        """Appends one line; returns the file's size before it (for :meth:`cut`), None where it has none.

        Raises:
            OSError: The write failed; whatever part of the line reached the file has been cut off again.
        """
        assert self._handle is not None
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        start = self._size()
        try:
            self._write_all(data)
        except BaseException:
            self.cut(start)
            raise
        return start

    def _size(self) -> int | None:
        assert self._handle is not None
        try:
            return os.fstat(self._handle.fileno()).st_size
        except OSError:
            return None

    def cut(self, size: int | None) -> None:
        """Truncates the log back to ``size`` bytes; best effort (a pipe, or a file system that refuses even
        this, keeps what it has, and the next run starts on a fresh line)."""
        if size is None or self._handle is None:
            return
        with contextlib.suppress(OSError):
            self._handle.truncate(size)

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):  # nothing is buffered; a failing close loses nothing
                self._handle.close()
            self._handle = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Infinity; write null instead so every line stays valid JSON."""
    return value if math.isfinite(value) else None


def utc_now() -> str:
    """The time of a log line or event: UTC, ISO 8601, milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def log_record(frame: Frame, result: Result, latency_ms: float, dropped: int) -> dict[str, Any]:
    timings = result.timings
    return {
        "frame": frame.index,
        "name": frame.name,
        "time": utc_now(),
        "score": _finite_or_none(float(result.score)),
        "threshold": _finite_or_none(float(result.threshold)),
        "is_anomaly": bool(result.is_anomaly),
        "latency_ms": round(latency_ms, 3),
        "preprocess_ms": _finite_or_none(round(float(timings.get("preprocess", math.nan)), 3)),
        "infer_ms": _finite_or_none(round(float(timings.get("infer", math.nan)), 3)),
        "postprocess_ms": _finite_or_none(round(float(timings.get("postprocess", math.nan)), 3)),
        "dropped": dropped,
        # a remote predictor (edgead run --triton) also splits its time into client, network and server
        **{f"{key}_ms": round(float(timings[key]), 3) for key in ("client", "network", "server") if key in timings},
    }


def _safe_stem(name: str) -> str:
    """File-name-safe stem of a frame name (stream and pipeline names may contain any character)."""
    stem = Path(name).stem if "." in name else name
    return re.sub(r"[^A-Za-z0-9._#-]+", "_", stem)[:80] or "frame"


def evidence_base(folder: Path, frame: Frame) -> Path:
    """A name no other alarm has, sortable by time: ``<UTC time, microseconds>_<pid>_<source>_<frame>``.

    The time and process id keep two runs on one stream, two sources with one file name and two processes
    sharing the folder apart; a counter suffix covers anything that still collides. Nothing is overwritten.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    stem = f"{stamp}_{os.getpid()}_{_safe_stem(frame.name)}_{frame.index:06d}"
    base, counter = folder / stem, 0
    while any(base.with_name(base.name + suffix).exists() for suffix in EVIDENCE_SUFFIXES):
        counter += 1
        base = folder / f"{stem}-{counter}"
    return base


#: The files of one saved alarm: the frame, the HUD overlay and the raw map.
EVIDENCE_SUFFIXES = (".png", "_map.png", "_map.npy")


def encode_evidence(frame_bgr: np.ndarray, hud_bgr: np.ndarray, anomaly_map: np.ndarray) -> list[bytes]:
    """The bytes of ``<base>.png`` (the frame), ``<base>_map.png`` (the HUD) and ``<base>_map.npy`` (the raw
    map), encoded in memory so that nothing touches the disk before the commit."""
    payloads = []
    for image in (frame_bgr, hud_bgr):  # BGR, the encoder's own order: encoded as they are
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image))
        if not ok:
            raise OutputError(f"cannot encode a {image.shape} {image.dtype} image as PNG")
        payloads.append(encoded.tobytes())
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(anomaly_map, dtype=np.float32))
    payloads.append(buffer.getvalue())
    return payloads


def write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)


def commit_evidence(
    folder: Path, frame: Frame, evidence: list[bytes], log: JsonLinesLog | None, record: dict[str, Any] | None
) -> list[str]:
    """Saves one alarm as a group with its log line: files under temporary names, then the line (naming the
    files), then the renames. Any failure removes the temporary and renamed files and cuts the line again, so
    no file is left without its line and no line names a missing file; returns the file names.

    Raises:
        OutputError: A write or rename failed (names the folder or the log and the reason).
    """
    base = evidence_base(folder, frame)
    finals = [base.with_name(base.name + suffix) for suffix in EVIDENCE_SUFFIXES]
    temps = [final.with_name(f".{final.name}.tmp") for final in finals]  # hidden: never taken for evidence
    names = [final.name for final in finals]
    placed: list[Path] = []
    mark: int | None = None
    logged = False
    what = f"the anomaly folder {folder}"
    try:
        for temp, data in zip(temps, evidence, strict=True):
            write_file(temp, data)
        if log is not None and record is not None:
            what = f"the log {log.path}"
            mark = log.write({**record, "saved": names})
            logged = True
            what = f"the anomaly folder {folder}"
        for temp, final in zip(temps, finals, strict=True):
            os.replace(temp, final)
            placed.append(final)
    except BaseException as exc:
        for path in (*placed, *temps):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if logged and log is not None:
            log.cut(mark)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {what}: {_reason(exc)}") from exc
        raise
    return names


def save_anomaly(folder: Path, frame: Frame, hud_bgr: np.ndarray, anomaly_map: np.ndarray) -> list[str]:
    """Writes one alarm's three files (see :func:`encode_evidence`, named by :func:`evidence_base`) without a
    log line; returns the file names."""
    with naming(f"the anomaly folder {folder}"):
        folder.mkdir(parents=True, exist_ok=True)
    return commit_evidence(folder, frame, encode_evidence(frame.image, hud_bgr, anomaly_map), None, None)


class Outputs:
    """The log and the evidence folder of one run, opened together and written so that they always agree."""

    def __init__(self, save_anomalies: Path | None, log_path: Path | None, log_every_frame: bool) -> None:
        """Creates the evidence folder (and proves it takes a file), then opens the log.

        Raises:
            OutputError: Either cannot be written.
        """
        self.folder = None if save_anomalies is None else Path(save_anomalies)
        self.log_every_frame = log_every_frame
        self.log: JsonLinesLog | None = None
        if self.folder is not None:
            with naming(f"the anomaly folder {self.folder}"):
                self.folder.mkdir(parents=True, exist_ok=True)
                probe = self.folder / f".edgead-probe-{os.getpid()}.tmp"
                try:
                    write_file(probe, b"probe")
                finally:
                    with contextlib.suppress(OSError):
                        probe.unlink(missing_ok=True)
        if log_path is not None:
            with naming(f"the log {log_path}"):
                self.log = JsonLinesLog(Path(log_path))

    def wants_evidence(self, result: Result) -> bool:
        return bool(result.is_anomaly) and self.folder is not None

    def wants_line(self, result: Result) -> bool:
        return self.log is not None and (self.log_every_frame or bool(result.is_anomaly))

    def commit(self, frame: Frame, record: dict[str, Any] | None, evidence: list[bytes] | None) -> list[str]:
        """Writes the frame's log line (``record``, None = no line) and its evidence (None = none) as a group;
        returns the names of the evidence files (empty without evidence).

        Raises:
            OutputError: Something could not be written; nothing of this frame is left behind.
        """
        if evidence is not None and self.folder is not None:
            return commit_evidence(self.folder, frame, evidence, self.log, record)
        if record is not None:
            self.event(record)
        return []

    def event(self, record: dict[str, Any]) -> None:
        """A log line without evidence (a frame's, or drift, an export switched or refused); nothing without a
        log.

        Raises:
            OutputError: The log could not be written.
        """
        if self.log is not None:
            with naming(f"the log {self.log.path}"):
                self.log.write(record)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
