"""Progress wherever a person waits (eval, predict, export, tune, verify; training has its own bar with the loss).

On a terminal a rich bar with the count, the rate, the elapsed time and the ETA; elsewhere (a log file, CI, a pipe)
one plain line every 5 % of the work or every ``interval_s`` seconds, whichever comes first, so a log shows how
far a long job got without thousands of redraws. Always on standard error, so standard output stays the result.
Torch-free: the runtime (``predict``, ``verify``) uses it too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

T = TypeVar("T")

#: Without a terminal, a plain line at least this often (and every 5 % of the work).
LINE_INTERVAL_S = 10.0


def format_eta(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class Progress:
    """``with Progress("eval", total=392, unit="images") as p: ... p.advance(8)``.

    ``enabled=False`` shows nothing (``--no-progress``); ``console`` defaults to standard error. The plain-line
    form is used when the console is not a terminal, or with ``lines=True``.
    """

    def __init__(
        self,
        description: str,
        total: int,
        *,
        unit: str = "items",
        enabled: bool = True,
        console: Console | None = None,
        lines: bool | None = None,
        interval_s: float = LINE_INTERVAL_S,
    ) -> None:
        self.description, self.total, self.unit = description, max(0, int(total)), unit
        self.enabled = enabled and self.total > 0
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.lines = (not self.console.is_terminal) if lines is None else lines
        self.interval_s = interval_s
        self.done = 0
        self._start = 0.0
        self._last_line = 0.0
        self._next_share = 0
        self._bar: RichProgress | None = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        self._start = self._last_line = time.perf_counter()
        if self.enabled and not self.lines:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)  # type: ignore[arg-type]
            self._bar = None

    def eta_s(self) -> float | None:
        """Seconds left at the rate so far (None before anything is done)."""
        elapsed = time.perf_counter() - self._start
        if self.done <= 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / self.done

    def line(self) -> str:
        """``eval: 40/392 images (10 %), 12.3 images/s, ETA 28 s``."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        eta = self.eta_s()
        share = 100.0 * self.done / self.total if self.total else 100.0
        rate = self.done / elapsed
        text = f"{self.description}: {self.done}/{self.total} {self.unit} ({share:.0f} %), {rate:.3g} {self.unit}/s"
        if self.done >= self.total:
            return text + f", done in {format_eta(elapsed)}"
        return text + (f", ETA {format_eta(eta)}" if eta is not None else "")

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.perf_counter()
        share = 20 * self.done // self.total  # a line at every 5 %
        if share > self._next_share or now - self._last_line >= self.interval_s or self.done == self.total:
            self._next_share = share
            self._last_line = now
            self.console.print(self.line(), markup=False, highlight=False)


def track(
    items: Iterable[T], description: str, total: int | None = None, *, unit: str = "items", enabled: bool = True
) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` (one step per item)."""
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    with Progress(description, total, unit=unit, enabled=enabled) as progress:
        for item in items:
            yield item
            progress.advance()
