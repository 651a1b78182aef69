"""Files edgead writes and the JSON it reads, so that nothing is half-written or silently misread
(torch-free, standard library only).

- Atomic writes (:func:`atomic_output`, :func:`write_bytes_atomic`, :func:`write_json_atomic`): a reader
  sees the old file or the complete new one, never a partial file.
- :func:`exclusive_lock`: one writer at a time (a second is refused, naming the holder).
- :func:`read_json_strict`: the one reader of JSON from users and exports (a run's ``config.json``,
  ``--config`` specs, an export's ``edgead.json``): a duplicated key or excessive nesting is an error naming
  the file, never a silent last-one-wins.
- :func:`check_output_file`, :func:`check_output_folder`: an output location checked before the work starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "JSON_MAX_DEPTH",
    "JSONReadError",
    "LockBusyError",
    "OutputPathError",
    "atomic_output",
    "check_output_file",
    "check_output_folder",
    "exclusive_lock",
    "file_sha256",
    "json_depth",
    "new_folder",
    "read_json_strict",
    "write_bytes_atomic",
    "write_json_atomic",
]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success renames it over ``path``, on error removes it.

    Readers therefore see either the old file or the complete new one, never a partial file. The file
    gets the usual permissions (0666 less the umask), not ``mkstemp``'s private 0600.

    Args:
        path: Destination file; missing parent directories are created.
        durable: Also fsync before the rename (survives power loss; slower, so off by default).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target so that os.replace is a rename on one filesystem, hence atomic.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LockBusyError(RuntimeError):
    """Another process holds the lock; ``holder`` says which (its pid, as it wrote it)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path}: held by {holder}")
        self.path, self.holder = path, holder


def _try_lock(handle: Any) -> bool:
    """Take an exclusive, non-blocking lock on the open file ``handle``; False when another process holds it.
    POSIX: ``flock`` on the whole file; Windows: ``msvcrt.locking`` on its first byte. Each platform's module is
    imported here, never at module level, so that every module imports on both."""
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(handle: Any) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        return
    import fcntl

    fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) without waiting (``flock`` on POSIX,
    ``msvcrt.locking`` on Windows).

    The operating system drops the lock when the process dies, so a killed holder never leaves a stale lock.

    Raises:
        LockBusyError: another process holds it.
    """
    lock_path = Path(path)
    with open(lock_path, "a+") as handle:
        if not _try_lock(handle):
            try:  # Windows forbids reading the locked byte from here: the holder is then not named
                handle.seek(0)
                holder = handle.read().strip()
            except OSError:
                holder = ""
            raise LockBusyError(lock_path, holder or "another process") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            _unlock(handle)


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so engines of any size fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, durable: bool = False) -> Path:
    """Writes bytes through :func:`atomic_output`; returns the destination path."""
    with atomic_output(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


#: Deepest nesting :func:`read_json_strict` accepts by default: edgead's own files are under 10 levels deep; a
#: hostile file 100,000 levels deep would otherwise exhaust Python's recursion limit.
JSON_MAX_DEPTH = 64


class JSONReadError(ValueError):
    """A JSON file is not valid JSON, repeats a key, or is nested too deeply (the message names the file)."""


def read_json_strict(path: str | os.PathLike[str], max_depth: int = JSON_MAX_DEPTH, hint: str = "") -> Any:
    """The one way edgead reads a JSON file a user or an export gave it: UTF-8 JSON in which every object
    has each key once and nothing is nested deeper than ``max_depth`` levels.

    Args:
        path: JSON file.
        max_depth: Deepest nesting of objects and lists accepted.
        hint: Added to the message of invalid JSON (e.g. what the file should be).

    Raises:
        FileNotFoundError, OSError: The file cannot be opened.
        JSONReadError: Not UTF-8, not valid JSON, a key given twice (named) or nested too deeply; each names
            the file.
    """
    file_path = Path(path)
    try:
        text = file_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise JSONReadError(f"{file_path}: not UTF-8 text ({err}); expected a JSON file") from None
    too_deep = f"{file_path}: nested deeper than {max_depth} levels; expected a JSON file edgead wrote or a spec"
    try:
        data = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, file_path))
    except json.JSONDecodeError as err:
        raise JSONReadError(f"{file_path}: not valid JSON ({err})" + (f"; {hint}" if hint else "")) from None
    except RecursionError:
        raise JSONReadError(too_deep) from None
    if json_depth(data, max_depth) > max_depth:
        raise JSONReadError(too_deep)
    return data


def _unique_keys(pairs: list[tuple[str, Any]], path: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise JSONReadError(f"{path}: key {key!r} appears twice; each key may be given once")
        result[key] = value
    return result


def json_depth(value: Any, limit: int, level: int = 0) -> int:
    """Nesting depth of parsed JSON (objects and lists), counted no further than ``limit + 1``."""
    if level > limit:
        return level
    if isinstance(value, dict):
        return max([json_depth(v, limit, level + 1) for v in value.values()], default=level + 1)
    if isinstance(value, list):
        return max([json_depth(v, limit, level + 1) for v in value], default=level + 1)
    return level


def write_json_atomic(
    path: str | os.PathLike[str], data: Any, durable: bool = True, allow_nan: bool = True, **dumps: Any
) -> Path:
    """The one way edgead writes a JSON file: ``json.dumps(data, indent=2)`` plus a newline, through
    :func:`atomic_output` (fsynced unless ``durable=False``); a reader sees the old file or the new one.

    ``allow_nan=False`` refuses NaN / infinity (strict JSON for reports other tools read); ``dumps`` passes
    further ``json.dumps`` options (e.g. ``sort_keys``, ``ensure_ascii``).
    """
    text = json.dumps(data, indent=dumps.pop("indent", 2), allow_nan=allow_nan, **dumps)
    return write_bytes_atomic(path, (text + "\n").encode("utf-8"), durable=durable)


# ------------------------------------------------------------------------------------------ output paths
class OutputPathError(ValueError):
    """An output cannot go where it was asked to (a folder where a file goes, a missing or read-only folder, a
    full disk). Checked before the work starts where possible, so a long run never ends in a traceback."""


def _probe_writable(folder: Path, path: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the one check that answers for read-only mounts,
    permissions and ACLs alike (``os.access`` says yes to root on a folder it then cannot write)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".edgead-write-check.", dir=folder)
    except OSError as err:
        reason = err.strerror or str(err)
        where = "it" if Path(folder) == Path(path) else str(folder)
        raise OutputPathError(f"{what} {path}: cannot write into {where} ({reason})") from None
    os.close(fd)
    os.unlink(name)


def check_output_file(path: str | os.PathLike[str], what: str = "--json") -> Path:
    """Fail before any work when a file cannot be written at ``path``: a folder is there, its folder does not
    exist (or is a file), or this process cannot write into it. ``what`` names the option in the message.

    Raises:
        OutputPathError: naming ``path`` and what was expected.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(
            f"{what} {target}: is a folder; expected the name of a file to write, e.g. {target / 'report.json'}"
        )
    parent = target.parent
    if not parent.exists():
        raise OutputPathError(f"{what} {target}: the folder {parent} does not exist; create it or choose another path")
    if not parent.is_dir():
        raise OutputPathError(f"{what} {target}: {parent} is not a folder")
    _probe_writable(parent, target, what)
    return target


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` or the nearest of its parents that exists (what a folder made there would be made in)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def check_output_folder(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Fail before any work when a folder cannot be made or written at ``path``: something other than a folder is
    there, or the nearest existing folder above it cannot be written. What the folder holds is each command's
    own check (``predict`` wants it empty, ``eval`` its own earlier report, ``export`` its own versions).

    Raises:
        OutputPathError: naming ``path`` and what was expected.
    """
    target = Path(path)
    if (target.exists() or target.is_symlink()) and not target.is_dir():
        raise OutputPathError(f"{what} {target}: exists and is not a folder; expected a folder to write into")
    existing = nearest_existing(target)
    if not existing.is_dir():
        raise OutputPathError(f"{what} {target}: {existing} is not a folder")
    _probe_writable(existing, target, what)
    return target


def new_folder(parent: str | os.PathLike[str], name: str) -> Path:
    """Create and return ``parent/name``, or ``name-2``, ``name-3``, ... when it is taken: a folder this call
    made, never one another process or run also writes into (``mkdir`` without ``exist_ok`` is atomic)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    candidate, n = parent / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = parent / f"{name}-{n}"
