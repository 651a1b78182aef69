"""Drift watch for ``edgead run``: is the live score distribution leaving the one the export was calibrated on?

A lamp that ages, a new batch of material or a bumped camera moves the scores of every frame, not of a few: the
detector then drowns the line in alarms, or, for a shift that lowers scores, misses defects. The watch keeps
the last ``window`` scores and compares them with the held-out normal images' scores stored at export
(``threshold.normal_quantiles``): drift is reported when the window's median exceeds the normals' 90th
percentile, i.e. when more than half of the recent frames score higher than nine normal images in ten did.
On normal frames the median of a window sits near the normals' median, far below their 90th percentile, so
a warning needs a lasting shift, not a burst of defects (a run of alarms on half the window or more is itself
worth a look). Once the shifted frames fill more than half of the window, the warning comes: at most
``window // 2 + 1`` frames after a shift that lifts every frame above that percentile. It is cleared, with its
own record, when the median falls back below it. Detection goes on throughout: drift is reported, never acted
on.

The rule is chosen, not fitted: the median of a window and a percentile of the calibration set, without a
parameter tuned on any test video (``window`` = 200 frames by default, about 7 s at 30 FPS).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

DEFAULT_WINDOW = 200
#: The shortest window: a median of fewer scores follows single frames, not the line.
MIN_WINDOW = 10
#: Which calibration quantile the window's median is compared with.
REFERENCE_QUANTILE = "0.9"
#: The quantiles of the held-out normal scores the export stores (``threshold.normal_quantiles``).
QUANTILES = (0.5, 0.9, 0.99)


def normal_quantiles(normal_scores: np.ndarray) -> dict[str, float]:
    """What export stores for the watch: the held-out normal scores' :data:`QUANTILES`."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    return {str(q): float(np.quantile(scores, q)) for q in QUANTILES}


class DriftWatch:
    """Feed every score (:meth:`update`); it returns a record when drift starts or ends, else None."""

    def __init__(self, quantiles: dict[str, float], window: int = DEFAULT_WINDOW) -> None:
        if window < MIN_WINDOW:
            raise ValueError(f"drift window must be at least {MIN_WINDOW} frames, got {window}")
        if REFERENCE_QUANTILE not in quantiles:
            raise ValueError(f"the export stores no {REFERENCE_QUANTILE} quantile of its normal scores")
        self.reference = float(quantiles[REFERENCE_QUANTILE])
        self.normal_median = float(quantiles.get("0.5", np.nan))
        self.window = window
        self._scores: deque[float] = deque(maxlen=window)
        self.drifting = False
        self.frames = 0
        self.warnings = 0

    def update(self, score: float) -> dict[str, Any] | None:
        self.frames += 1
        self._scores.append(float(score))
        if len(self._scores) < self.window:
            return None
        median = float(np.median(self._scores))
        if median > self.reference and not self.drifting:
            self.drifting, self.warnings = True, self.warnings + 1
            return self._record("drift", median)
        if median <= self.reference and self.drifting:
            self.drifting = False
            return self._record("drift cleared", median)
        return None

    def _record(self, event: str, median: float) -> dict[str, Any]:
        return {
            "event": event,
            "window_frames": self.window,
            "window_median_score": round(median, 6),
            "normal_p90_score": round(self.reference, 6),
            "normal_median_score": round(self.normal_median, 6),
            "share_above_normal_p90": round(float(np.mean(np.array(self._scores) > self.reference)), 3),
            "frames_seen": self.frames,
        }

    def state(self) -> dict[str, Any]:
        return {"drifting": self.drifting, "warnings": self.warnings, "window": self.window}


__all__ = ["DEFAULT_WINDOW", "DriftWatch", "normal_quantiles"]
