"""Hot swap for ``edgead run --follow``: switch to a newer export version without dropping a frame.

``edgead export`` publishes each version by switching the export folder's link in one atomic step
(``edgead.export.publish``). The follower polls where the link points (every ``poll_s``, on its own thread);
when it points somewhere new, it loads that version with the running backend and precision and runs
``edgead verify``'s check on its verification set, all on its own thread while the loop goes on with the old
one. A version that loads and passes is handed to the loop, which takes it between two frames
(:meth:`ExportFollower.take`: one attribute read); one that fails is refused, said once, and the running
version kept. Every log line names the version that scored its frame.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_POLL_S = 2.0


def export_version(export_dir: str | Path) -> str:
    """The version folder an export folder (a link) points to now: its name."""
    return Path(export_dir).resolve().name


class ExportFollower:
    """Watches ``export_dir`` and prepares newer versions (``load(path) -> detector``, ``check(path) -> failures``).

    Args:
        export_dir: The export folder as the user gave it (the link a new export switches).
        load: Opens a version (the resolved folder) with the running backend and precision.
        check: ``edgead verify``'s check on that version; returns the failures (empty: it passes).
        on_event: Receives one line per switch or refusal.
        poll_s: Seconds between looks at the link.
    """

    def __init__(
        self,
        export_dir: str | Path,
        load: Callable[[Path], Any],
        check: Callable[[Path], list[str]],
        on_event: Callable[[dict[str, Any]], None],
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self.export_dir = Path(export_dir)
        self._load, self._check = load, check
        self.on_event = on_event  # the loop replaces it with its own queue
        self.poll_s = poll_s
        self._seen = {self.export_dir.resolve()}  # the version the loop starts on
        self._ready: tuple[Path, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="edgead-follow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)
        ready = self._ready
        if ready is not None and hasattr(ready[1], "close"):
            ready[1].close()

    def take(self) -> tuple[str, Any] | None:
        """A verified newer version ``(version, detector)`` when one is ready (the loop calls it every frame)."""
        ready = self._ready
        if ready is None:
            return None
        self._ready = None
        return ready[0].name, ready[1]

    def poll_once(self) -> None:
        """One look at the link (the thread's loop body; tests call it directly)."""
        try:
            target = self.export_dir.resolve(strict=True)
        except OSError:  # between an export's unlink and its new link, or removed: look again later
            return
        if target in self._seen or self._ready is not None:
            return
        self._seen.add(target)
        try:
            detector = self._load(target)
        except Exception as err:  # any load error refuses the version; the loop keeps the running one
            self.on_event({"event": "export refused", "version": target.name, "reason": f"cannot load: {err}"})
            return
        try:
            failures = self._check(target)
        except Exception as err:
            failures = [f"cannot verify: {err}"]
        if failures:
            if hasattr(detector, "close"):
                detector.close()
            self.on_event({"event": "export refused", "version": target.name, "reason": "; ".join(failures)})
            return
        self._ready = (target, detector)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll_once()


__all__ = ["DEFAULT_POLL_S", "ExportFollower", "export_version"]
