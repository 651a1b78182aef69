"""How an export folder changes: whole versions switched atomically, one writer at a time.

``exports/<name>`` is a relative symbolic link to a complete version folder, ``exports/.<name>.versions/<id>``.
An export writes its version as ``<id>.partial`` (invisible to readers), renames it to ``<id>`` when every
file, ``edgead.json`` included, is written, and then replaces the link with one ``rename`` of a new link
(atomic on POSIX file systems). So at every instant ``exports/<name>`` is either the previous export or the
new one, never a mix; a kill at any point leaves the previous export in use and at most a ``.partial``
folder, which the next export into the same place removes. A lock file (``exports/.<name>.lock``, an
``flock``) refuses a second concurrent export into the same place instead of letting the last writer win.
The version the link pointed to before is kept (for a manual rollback); older ones are removed.

Export replaces only what is verifiably its own, and checks that before any work:

- a link at ``exports/<name>`` is replaced only when it is export's own (a relative link into
  ``.<name>.versions/``); a link anywhere else (e.g. to a user's folder) is refused, never replaced;
- a real folder there (an export made by an edgead before this scheme) is moved into the versions folder only
  when it holds an ``edgead.json`` and nothing but files an export writes (the artifacts its ``edgead.json``
  lists, ``model*.onnx`` / ``.engine`` / ``.plan``, ``verification.npz``, ``triton/``); any other file in it
  (a user's ``thesis.txt``) refuses the export, naming the folder and the file; an empty folder is used;
- the folder above must be writable (a read-only mount is refused before the export starts);
- old versions are removed only from the versions folder, and only when they hold an ``edgead.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgead.data.files import LockBusyError, OutputPathError, check_output_folder, exclusive_lock
from edgead.runtime.metadata import METADATA_NAME

PARTIAL = ".partial"


class PublishError(RuntimeError):
    """The export folder cannot be written (locked by another export, or not an export)."""


def versions_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.versions"


@contextlib.contextmanager
def export_lock(out_dir: Path) -> Iterator[None]:
    """Hold the export lock of ``out_dir`` (non-blocking: a second export fails at once, naming the holder)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
            yield
    except LockBusyError as err:
        raise PublishError(
            f"{out_dir}: another export into this folder is running ({err.holder}); wait for it or use another --out"
        ) from None


def start_version(out_dir: Path) -> Path:
    """A new, empty ``<id>.partial`` folder for the next version; removes partial folders of killed exports
    (call under :func:`export_lock`, so none of them belongs to a running export)."""
    versions = versions_dir(out_dir)
    versions.mkdir(parents=True, exist_ok=True)
    for stale in versions.glob(f"*{PARTIAL}"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale_link in out_dir.parent.glob(f".{out_dir.name}.link-*"):  # a kill between link and switch
        stale_link.unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return Path(tempfile.mkdtemp(prefix=f"{stamp}-", suffix=PARTIAL, dir=versions))  # unique, sortable


def _adopt_legacy_folder(out_dir: Path, versions: Path) -> Path | None:
    """Turn a real folder at ``out_dir`` into a version (an older edgead's export; returned), or refuse it."""
    if not out_dir.exists() or out_dir.is_symlink():
        return None
    check_target(out_dir)
    if (out_dir / METADATA_NAME).is_file():
        adopted = versions / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-earlier"
        os.rename(out_dir, adopted)
        return adopted.resolve()
    out_dir.rmdir()  # empty: check_target refused anything else
    return None


def publish(staging: Path, out_dir: Path) -> Path:
    """Make the complete ``staging`` version the export at ``out_dir``; returns the version folder."""
    check_target(out_dir)  # again, under the lock: what is there now is still export's own
    versions = versions_dir(out_dir)
    final = staging.with_name(staging.name.removesuffix(PARTIAL))
    os.rename(staging, final)
    previous = out_dir.resolve() if out_dir.is_symlink() else _adopt_legacy_folder(out_dir, versions)
    link = out_dir.parent / f".{out_dir.name}.link-{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(os.path.relpath(final, out_dir.parent), link)
    os.replace(link, out_dir)  # the one atomic switch
    keep = {final.resolve(), previous}
    for version in versions.iterdir():
        if (
            version.is_dir()
            and not version.is_symlink()
            and not version.name.endswith(PARTIAL)
            and version.resolve() not in keep
            and (version / METADATA_NAME).is_file()  # a complete version; anything else is not export's to delete
        ):
            shutil.rmtree(version, ignore_errors=True)
    return final


#: Names an export writes into its folder (besides ``edgead.json`` and the artifacts it lists): the ONNX graphs,
#: engines and plans, the verification set and the Triton repository (``edgead.export.exporter``).
_EXPORT_FILE = re.compile(r"model(\.[A-Za-z0-9_-]+)*\.(onnx|engine|plan)|verification\.npz")
_EXPORT_FOLDERS = ("triton",)
#: How many foreign files an error names before it says "and N more".
_NAMED_FILES = 5


def _listed_artifacts(out_dir: Path) -> set[str]:
    """The file names ``out_dir/edgead.json`` lists as artifacts (empty when it lists none or is unreadable)."""
    try:
        record = json.loads((out_dir / METADATA_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    artifacts = record.get("artifacts") if isinstance(record, dict) else None
    if not isinstance(artifacts, dict):
        return set()
    records = [r for value in artifacts.values() for r in (value if isinstance(value, list) else [value])]
    return {r["file"] for r in records if isinstance(r, dict) and isinstance(r.get("file"), str)}


def _foreign_entries(out_dir: Path) -> list[str]:
    """Entries of a real folder at ``out_dir`` that an export does not write (links never count as export's)."""
    if not (out_dir / METADATA_NAME).is_file():  # not an export at all: only an empty folder is used
        return [
            entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else "")
            for entry in sorted(out_dir.iterdir())
        ]
    listed = _listed_artifacts(out_dir) | {METADATA_NAME}
    foreign = []
    for entry in sorted(out_dir.iterdir()):
        name = entry.name
        temporary = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", name)  # a killed atomic write of one of its files
        if temporary is not None:
            name = temporary[1]
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_dir():
            if name not in _EXPORT_FOLDERS:
                foreign.append(entry.name + "/")
        elif name not in listed and not _EXPORT_FILE.fullmatch(name):
            foreign.append(entry.name)
    return foreign


def _is_own_link(out_dir: Path) -> bool:
    """``out_dir`` is a link this module made: relative, into ``.<name>.versions/`` beside it."""
    target = os.readlink(out_dir)
    parts = Path(target).parts
    return not os.path.isabs(target) and len(parts) == 2 and parts[0] == versions_dir(out_dir).name


def check_target(out_dir: Path) -> None:
    """Fail before any work when ``out_dir`` is something an export must not replace, or cannot be written.

    Raises:
        PublishError: naming the folder, and the files in it that are not an export's.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        if not _is_own_link(out_dir):
            raise PublishError(
                f"{out_dir} is a link to {os.readlink(out_dir)}, not one edgead export made; export never replaces "
                "a link it did not make: choose another --out (or remove the link yourself)"
            )
    elif out_dir.exists():
        if not out_dir.is_dir():
            raise PublishError(f"{out_dir} exists and is not a folder; choose another --out")
        foreign = _foreign_entries(out_dir)
        if foreign:
            names = ", ".join(foreign[:_NAMED_FILES])
            more = f" and {len(foreign) - _NAMED_FILES} more" if len(foreign) > _NAMED_FILES else ""
            what = "an earlier edgead export" if (out_dir / METADATA_NAME).is_file() else "an edgead export"
            raise PublishError(
                f"{out_dir} is a folder that is not {what}: it holds {names}{more}, which export does not write; "
                "export never moves or deletes such files: choose another --out or move them away"
            )
    try:  # the versions, the lock and the link all go into the folder above
        check_output_folder(out_dir.parent, f"--out {out_dir}: its folder")
    except OutputPathError as err:
        raise PublishError(str(err)) from None
