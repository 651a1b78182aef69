"""Progress where a person waits: plain lines with an ETA when not on a terminal, a bar on one."""

from __future__ import annotations

import io
import re

from rich.console import Console

from edgead.progress import Progress, format_eta, track


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=120), out


def test_lines_every_five_percent_with_an_eta_and_a_last_line() -> None:
    console, out = _console(terminal=False)
    with Progress("eval", 40, unit="images", console=console) as progress:
        for _ in range(40):
            progress.advance()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20  # 5 % steps of 40 images: every 2nd image
    assert re.fullmatch(r"eval: 2/40 images \(5 %\), [0-9.e+]+ images/s, ETA \d+ s", lines[0]), lines[0]
    assert lines[-1].startswith("eval: 40/40 images (100 %)") and "done in" in lines[-1]


def test_a_slow_job_gets_a_line_at_least_every_interval() -> None:
    console, out = _console(terminal=False)
    with Progress("tune", 1000, unit="candidates", console=console, interval_s=0.0) as progress:
        progress.advance()
        progress.advance()
    assert len(out.getvalue().splitlines()) == 2  # below 5 %, but the interval has passed each time


def test_disabled_or_empty_progress_prints_nothing() -> None:
    console, out = _console(terminal=False)
    with Progress("x", 10, console=console, enabled=False) as progress:
        progress.advance(10)
    with Progress("x", 0, console=console) as progress:
        progress.advance()
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_and_track_counts_items() -> None:
    console, out = _console(terminal=True)
    with Progress("verify", 3, unit="calls", console=console) as progress:
        progress.advance(3)
    assert "verify" in out.getvalue() and "3/3" in out.getvalue()
    assert list(track(range(4), "t", enabled=False)) == [0, 1, 2, 3]


def test_eta_formatting() -> None:
    assert format_eta(42.4) == "42 s"
    assert format_eta(185) == "3 min 05 s"
    assert format_eta(3720) == "1 h 02 min"
    assert format_eta(-1) == "0 s"
