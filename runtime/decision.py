"""The decision rule, in one place: a frame is anomalous when its score reaches the threshold.

Calibration (``edgead export``), parity checks (decision flips), the detector and the live loop all
call :func:`is_anomalous`; the threshold comes from ``edgead.json`` unless a user overrides it, and
:func:`decision_threshold` is the one place that override is applied and checked.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray


def is_anomalous(score: ArrayLike, threshold: float) -> NDArray[np.bool_]:
    """``score >= threshold``, element-wise (a score exactly at the threshold is anomalous)."""
    return np.asarray(score) >= threshold


def decision_threshold(calibrated: float, override: float | None = None) -> float:
    """The threshold in force: ``override`` when given, else the calibrated one; both must be finite."""
    value = calibrated if override is None else override
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {value!r}") from None
    if not math.isfinite(value):
        source = "--threshold" if override is not None else "the calibrated threshold in edgead.json"
        raise ValueError(f"{source} must be a finite number, got {value}")
    return value
