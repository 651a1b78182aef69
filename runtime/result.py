"""What one inference returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    """The detector's answer for one frame.

    Attributes:
        score: Image-level anomaly score (higher is more anomalous).
        anomaly_map: (H, W) float32 map at the model's map size (the input size for most methods); use
            :meth:`map_at` for the map at the frame's size.
        is_anomaly: ``score >= threshold``.
        threshold: The decision threshold used.
        timings: Milliseconds spent in ``preprocess``, ``infer`` and ``postprocess``.
    """

    score: float
    anomaly_map: np.ndarray
    is_anomaly: bool
    threshold: float
    timings: dict[str, float] = field(default_factory=dict)

    def map_at(self, height: int, width: int) -> np.ndarray:
        """The anomaly map at a frame's size (bilinear). Preprocessing resizes every frame to the square
        input without keeping its aspect ratio, so resizing the map back is the exact inverse mapping."""
        import cv2

        if height < 1 or width < 1:
            raise ValueError(f"frame size must be positive, got {height} x {width}")
        return cv2.resize(self.anomaly_map, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
