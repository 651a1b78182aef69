"""What one inference returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    """The detector's answer for one frame.

    Attributes:
        score: Image-level anomaly score (higher is more anomalous).
        anomaly_map: (H, W) float32 map at the model's map size.
        is_anomaly: ``score >= threshold``.
        threshold: The decision threshold used.
        timings: Milliseconds spent in ``preprocess``, ``infer`` and ``postprocess``.
    """

    score: float
    anomaly_map: np.ndarray
    is_anomaly: bool
    threshold: float
    timings: dict[str, float] = field(default_factory=dict)
