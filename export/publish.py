"""How an export folder changes: whole versions switched atomically, one writer at a time.

``exports/<name>`` is a relative symbolic link to a complete version folder, ``exports/.<name>.versions/<id>``.
An export writes its version as ``<id>.partial`` (invisible to readers), renames it to ``<id>`` when every
file, ``edgead.json`` included, is written, and then replaces the link with one ``rename`` of a new link
(atomic on POSIX file systems). So at every instant ``exports/<name>`` is either the previous export or the
new one, never a mix; a kill at any point leaves the previous export in use and at most a ``.partial``
folder, which the next export into the same place removes. A lock file (``exports/.<name>.lock``, an
``flock``) refuses a second concurrent export into the same place instead of letting the last writer win.
The version the link pointed to before is kept (for a manual rollback); older ones are removed.

A real folder at ``exports/<name>`` (made by an edgead before this scheme) that holds an ``edgead.json`` is
moved into the versions folder first; any other non-empty folder there is refused, never deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgead.data.io import LockBusyError, exclusive_lock
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
        if version.is_dir() and not version.name.endswith(PARTIAL) and version.resolve() not in keep:
            shutil.rmtree(version, ignore_errors=True)
    return final


def check_target(out_dir: Path) -> None:
    """Fail before any work when ``out_dir`` is something an export must not replace."""
    if out_dir.is_symlink() or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise PublishError(f"{out_dir} exists and is not a folder; choose another --out")
    if not (out_dir / METADATA_NAME).is_file() and any(out_dir.iterdir()):
        raise PublishError(f"{out_dir} is a folder that is not an edgead export; choose another --out")
