"""``Detector``: load an export, preprocess a camera frame exactly as training did, run the backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgead.data.preprocess import PreprocessConfig, preprocess_bgr
from edgead.runtime.backends.base import Backend, BackendError
from edgead.runtime.batching import padded_batches
from edgead.runtime.decision import decision_threshold, is_anomalous
from edgead.runtime.metadata import (
    ONNX_KEYS,
    PRECISIONS,
    ExportMetadata,
    find_engine,
    load_metadata,
    verified_artifact,
)
from edgead.runtime.result import Result

BACKENDS = ("auto", "tensorrt", "onnxruntime", "openvino")


def _tensorrt_usable() -> bool:
    import importlib.util

    has_trt = any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))
    return has_trt and importlib.util.find_spec("pycuda") is not None


class Detector:
    """An exported anomaly detector.

    Example:
        >>> detector = Detector.load("exports/score-resilience")
        >>> result = detector.predict(frame_bgr)
        >>> result.score, result.is_anomaly, result.timings["infer"]
    """

    def __init__(
        self,
        backend: Backend,
        metadata: ExportMetadata,
        threshold: float | None = None,
        *,
        export_dir: Path | None = None,
        precision: str = "fp32",
        version: str | None = None,
    ) -> None:
        self.backend = backend
        self.metadata = metadata
        self.export_dir = export_dir
        #: The export version folder the files came from (the link a later export switches is not followed).
        self.version = version
        self.precision = precision
        self.preprocess_config = PreprocessConfig.from_dict(metadata.preprocess)
        self.threshold = threshold  # type: ignore[assignment]  # the setter applies the override rule
        self.batch_size = int(backend.input_shape[0])

    def describe(self) -> dict[str, Any]:
        """Which export, method, backend and precision this detector runs (for logs, reports and banners)."""
        described = {
            "export": str(self.export_dir) if self.export_dir is not None else None,
            "method": self.metadata.method,
            "backend": getattr(self.backend, "name", type(self.backend).__name__),
            "precision": self.precision,
        }
        if self.version is not None:
            described["version"] = self.version
        if getattr(self.backend, "device", None):  # OpenVINO: the device it compiled for
            described["device"] = self.backend.device
        session = getattr(self.backend, "session", None)
        if session is not None:  # the execution providers ONNX Runtime actually registered (a CUDA fallback shows)
            described["providers"] = list(session.get_providers())
        return described

    @property
    def threshold(self) -> float:
        """The decision threshold in force (``score >= threshold`` is anomalous)."""
        return self._threshold

    @threshold.setter
    def threshold(self, override: float | None) -> None:
        """Override the calibrated threshold (None restores it); the one override point of the runtime."""
        self._threshold = decision_threshold(self.metadata.threshold_for(self.precision), override)

    @classmethod
    def load(
        cls,
        export_dir: str | Path,
        backend: str = "auto",
        precision: str | None = None,
        threshold: float | None = None,
        providers: Sequence[str] | None = None,
        on_event: Callable[[str], None] | None = None,
        device: str | None = None,
    ) -> Detector:
        """Open an export directory made by ``edgead export``.

        Args:
            export_dir: Holds ``edgead.json`` and the artifacts it lists.
            backend: ``auto`` (TensorRT when an engine, TensorRT and pycuda are present, else ONNX Runtime),
                ``tensorrt``, ``onnxruntime`` or ``openvino`` (``pip install "edgead[openvino]"``).
            precision: ``fp32``, ``fp16`` or ``int8`` (an export made with that ``--precision``); None takes the
                engine's precision for TensorRT and FP32 for ONNX Runtime and OpenVINO. INT8 scores are judged by
                the INT8 graph's own calibrated threshold.
            threshold: Overrides the calibrated decision threshold in the metadata.
            providers: ONNX Runtime execution providers (default: CUDA if installed, then CPU).
            on_event: Receives a line when ``auto`` falls back from TensorRT to ONNX Runtime.
            device: OpenVINO's device (``CPU`` by default, ``GPU``, ``NPU``, ...); only with ``openvino``.

        Raises:
            MetadataError: Missing metadata, or an artifact whose SHA-256 does not match it.
            BackendError: The backend cannot load the model.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if precision not in (None, *PRECISIONS):
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if device is not None and backend != "openvino":
            raise ValueError(f"a device ({device!r}) is chosen only for the openvino backend, not {backend!r}")
        # Resolved once: an export folder is a link that a new export switches atomically, so every file must
        # come from the version the link named at this instant (edgead.export.publish).
        requested = Path(export_dir)
        export_dir = requested.resolve()
        meta = load_metadata(export_dir)
        engine = find_engine(meta, precision) if backend != "openvino" else None
        if backend == "tensorrt" or (backend == "auto" and engine is not None and _tensorrt_usable()):
            if engine is None:
                raise BackendError(
                    f"{export_dir}: no {precision or ''} TensorRT engine in this export; build one on this device "
                    "with `edgead export --format tensorrt`"
                )
            from edgead.runtime.backends.tensorrt import TensorRTBackend

            path = verified_artifact(export_dir, engine)
            try:
                backend_ = TensorRTBackend(path, flavour=engine["flavour"])
                return cls(
                    backend_, meta, threshold, export_dir=requested, precision=engine["precision"],
                    version=export_dir.name,
                )  # fmt: skip
            except BackendError as err:
                if backend == "tensorrt":
                    raise
                if on_event:
                    on_event(f"TensorRT unavailable ({err}); using ONNX Runtime")
        chosen = precision or "fp32"
        key = ONNX_KEYS[chosen]
        if key not in meta.artifacts:
            raise BackendError(f"{export_dir}: no {chosen} ONNX in this export; export with --precision {chosen}")
        path = verified_artifact(export_dir, meta.artifacts[key])
        if backend == "openvino":
            from edgead.runtime.backends.openvino import DEFAULT_DEVICE, OpenVINOBackend

            runner: Backend = OpenVINOBackend(path, device=device or DEFAULT_DEVICE)
        else:
            from edgead.runtime.backends.onnxruntime import OnnxRuntimeBackend

            runner = OnnxRuntimeBackend(path, providers=providers)
        return cls(runner, meta, threshold, export_dir=requested, precision=chosen, version=export_dir.name)

    def preprocess(self, frame_bgr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The training-time preprocessing of a BGR frame (``edgead.data.preprocess.preprocess_bgr``: the same
        model input as ``preprocess`` of the frame in RGB, with the channels swapped after the resize).

        Args:
            frame_bgr: (H, W, 3) uint8 BGR frame.
            out: Optional float32 (C, S, S) array to write into, e.g. a row of a batch.
        """
        if not isinstance(frame_bgr, np.ndarray):
            raise ValueError(f"expected an (H, W, 3) uint8 BGR frame (numpy array), got {type(frame_bgr).__name__}")
        if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.dtype != np.uint8 or frame_bgr.size == 0:
            raise ValueError(f"expected an (H, W, 3) uint8 BGR frame, got {frame_bgr.shape} {frame_bgr.dtype}")
        return preprocess_bgr(frame_bgr, self.preprocess_config, out=out)

    def predict_batch(self, frames_bgr: Sequence[np.ndarray]) -> list[Result]:
        """Score several frames; batches are padded to the exported batch size."""
        results: list[Result] = []
        cfg = self.preprocess_config
        batches = padded_batches(frames_bgr, self.batch_size, (cfg.channels, *cfg.size), write=self.preprocess)
        while True:
            t0 = time.perf_counter()
            step = next(batches, None)  # preprocesses the frames into the batch
            if step is None:
                break
            batch, count = step
            t1 = time.perf_counter()
            outputs = self.backend.infer(batch)
            t2 = time.perf_counter()
            maps, scores = outputs["anomaly_map"], outputs["score"]
            chunk_results = [
                Result(
                    score=float(scores[i]),
                    anomaly_map=maps[i],
                    is_anomaly=bool(is_anomalous(scores[i], self.threshold)),
                    threshold=self.threshold,
                )
                for i in range(count)
            ]
            t3 = time.perf_counter()
            timings = {"preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
            for result in chunk_results:
                result.timings = dict(timings)
            results.extend(chunk_results)
        return results

    def predict(self, frame_bgr: np.ndarray) -> Result:
        """Score one (H, W, 3) uint8 BGR frame, e.g. from ``cv2.VideoCapture.read``."""
        return self.predict_batch([frame_bgr])[0]

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["BACKENDS", "BackendError", "Detector"]
