"""``edgead feedback``: an operator marks saved alarms as false alarms or confirmed defects.

Every mark is one line appended to ``<feedback>/feedback.jsonl`` (never rewritten: a mark that changes is a new
line, the newest wins) with a copy of the alarm's frame under ``<feedback>/<mark>/`` (its overlay and raw map
under ``<feedback>/<mark>/maps/``, so the folder of frames can be read as images); the saved evidence
(``run --save-anomalies``) is only read, never moved or changed. The false alarms are what ``edgead update
--normal <feedback>/false-alarm`` adds to a detector's normal images.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgead.runtime.outputs import EVIDENCE_SUFFIXES, JsonLinesLog

MARKS = ("false-alarm", "defect")
FEEDBACK_LOG = "feedback.jsonl"


class FeedbackError(ValueError):
    """A mark that cannot be recorded: names the alarm, the folder or the value and what was expected."""


def alarm_files(alarms_dir: Path, alarm: str) -> tuple[str, list[Path]]:
    """``(base name, its files)`` of a saved alarm given by its base name or any of its file names."""
    name = Path(alarm).name
    base = name
    for suffix in sorted(EVIDENCE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            break
    files = [alarms_dir / f"{base}{suffix}" for suffix in EVIDENCE_SUFFIXES]
    found = [path for path in files if path.is_file()]
    if not found:
        raise FeedbackError(
            f"alarm {alarm!r}: no saved files {base}{{{', '.join(EVIDENCE_SUFFIXES)}}} in {alarms_dir} (expected an "
            "alarm's name as `run --save-anomalies` wrote it, or one of its file names)"
        )
    return base, found


def _log_line(log: Path | None, files: list[Path]) -> dict[str, Any] | None:
    """The run's log line that names these files (``saved``), if the log is given and holds it."""
    if log is None:
        return None
    names = {path.name for path in files}
    try:
        with open(log, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and names & set(record.get("saved") or []):
                    return record
    except OSError as err:
        raise FeedbackError(f"--log {log}: cannot read it ({err.strerror or err})") from None
    return None


def record_feedback(
    alarms: list[str],
    mark: str,
    alarms_dir: Path,
    out_dir: Path,
    log: Path | None = None,
    note: str = "",
) -> list[dict[str, Any]]:
    """Marks each alarm; returns the lines appended to ``<out_dir>/feedback.jsonl``.

    Raises:
        FeedbackError: An unknown mark, a missing alarm or folder (nothing is written then).
    """
    if mark not in MARKS:
        raise FeedbackError(f"--mark {mark!r}: expected one of {', '.join(MARKS)}")
    if not alarms_dir.is_dir():
        raise FeedbackError(f"--alarms {alarms_dir}: not a folder (the run's --save-anomalies folder)")
    if out_dir.resolve() == alarms_dir.resolve():
        raise FeedbackError(f"--out {out_dir}: is the alarms folder itself; the evidence is never written to")
    found = [alarm_files(alarms_dir, alarm) for alarm in alarms]  # every alarm checked before anything is written
    target = out_dir / mark
    target.mkdir(parents=True, exist_ok=True)
    written = []
    journal = JsonLinesLog(out_dir / FEEDBACK_LOG)
    try:
        for base, files in found:
            copies = []
            for path in files:  # the frame itself beside the others' marks; its HUD and raw map under maps/
                folder = target if path.name == f"{base}{EVIDENCE_SUFFIXES[0]}" else target / "maps"
                folder.mkdir(exist_ok=True)
                copy = folder / path.name
                if not copy.exists():
                    temp = folder / f".{path.name}.tmp"
                    shutil.copyfile(path, temp)
                    os.replace(temp, copy)
                copies.append(copy.relative_to(out_dir).as_posix())
            line = {
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "alarm": base,
                "mark": mark,
                "note": note,
                "files": copies,
                "alarms_dir": str(alarms_dir),
                "log_line": _log_line(log, files),
            }
            journal.write(line)
            written.append(line)
    finally:
        journal.close()
    return written


def latest_marks(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The newest mark of each alarm in ``<out_dir>/feedback.jsonl`` (a later line overrides an earlier one)."""
    marks: dict[str, dict[str, Any]] = {}
    path = out_dir / FEEDBACK_LOG
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "alarm" in record:
                marks[record["alarm"]] = record
    return marks


__all__ = ["MARKS", "FeedbackError", "alarm_files", "latest_marks", "record_feedback"]
