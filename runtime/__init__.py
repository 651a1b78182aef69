"""edgead.runtime: torch-free inference on exported detectors (numpy, OpenCV, ONNX Runtime or TensorRT).

Nothing in this package imports torch; ``tests/runtime/test_torch_free.py`` proves it.

Example:
    >>> from edgead.runtime import Detector
    >>> detector = Detector.load("exports/score-resilience")
    >>> result = detector.predict(frame_bgr)
    >>> result.is_anomaly, result.score, result.map_at(*frame_bgr.shape[:2]).shape
"""

from typing import Any

__all__ = ["Detector", "Result"]


def __getattr__(name: str) -> Any:  # lazy, so importing the package stays cheap
    if name == "Detector":
        from edgead.runtime.detector import Detector

        return Detector
    if name == "Result":
        from edgead.runtime.result import Result

        return Result
    raise AttributeError(f"module 'edgead.runtime' has no attribute {name!r}")
