"""The Triton Inference Server Python-backend model that serves an edgead export (``model.py`` of the
repository written by ``edgead export --format triton``; copied there verbatim, so it imports nothing of
edgead at module level: the backend's stub imports this file before the execution environment is known).

Requests carry raw frames, ``FRAME`` ``(H, W, 3)`` uint8 BGR (as ``cv2.VideoCapture`` reads them; a batch of
same-sized frames per request), and get back what ``edgead.runtime.detector.Detector.predict`` gives, done
server-side: ``SCORE``, ``IS_ANOMALY`` (score >= the export's calibrated threshold), ``THRESHOLD``,
``ANOMALY_MAP`` at the frame's size, and ``SERVER_MS`` (the model's own time for the batch of requests it
ran together). Requests that Triton's dynamic batcher queued together run as one ``predict_batch``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

OUTPUTS = ("SCORE", "IS_ANOMALY", "THRESHOLD", "ANOMALY_MAP", "SERVER_MS")


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, Any]) -> None:
        import numpy as np
        import triton_python_backend_utils as pb

        from edgead.runtime.detector import Detector

        self.np, self.pb = np, pb
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        export_dir = Path(args["model_repository"]) / args["model_version"] / "export"
        backend = parameters.get("edgead_backend") or "auto"
        self.detector = Detector.load(export_dir, backend=backend)
        # The stub is built against numpy 1: with numpy >= 2, tensors cross it intact only through DLPack (as_numpy
        # returns wrong pixels and pb.Tensor empty outputs); the stub then logs a harmless "PyCapsule_GetPointer"
        # line per output. A serving environment with numpy < 2 takes the plain path.
        numpy1 = int(np.__version__.split(".")[0]) < 2
        self.tensor = pb.Tensor if numpy1 else pb.Tensor.from_dlpack
        self.array = (lambda t: t.as_numpy()) if numpy1 else np.from_dlpack

    def execute(self, requests: list[Any]) -> list[Any]:
        np, pb = self.np, self.pb
        start = time.perf_counter()
        frames, spans, errors = [], [], {}
        for i, request in enumerate(requests):
            batch = self.array(pb.get_input_tensor_by_name(request, "FRAME"))
            if batch.ndim != 4 or batch.shape[-1] != 3 or min(batch.shape[1:3]) < 1:
                errors[i] = f"FRAME must be (batch, H, W, 3) uint8 BGR, got {tuple(batch.shape)}"
                spans.append((len(frames), len(frames)))
                continue
            spans.append((len(frames), len(frames) + len(batch)))
            frames.extend(np.ascontiguousarray(frame) for frame in batch)
        try:
            results = self.detector.predict_batch(frames) if frames else []
        except Exception as err:  # one bad batch must not take the model down; every request learns why
            return [pb.InferenceResponse(error=pb.TritonError(f"edgead: {err}")) for _ in requests]
        server_ms = (time.perf_counter() - start) * 1e3
        responses = []
        for i, (first, last) in enumerate(spans):
            if i in errors:
                responses.append(pb.InferenceResponse(error=pb.TritonError(errors[i])))
                continue
            chunk = results[first:last]
            height, width = frames[first].shape[:2]
            values = {
                "SCORE": np.array([[r.score] for r in chunk], np.float32),
                "IS_ANOMALY": np.array([[r.is_anomaly] for r in chunk], np.bool_),
                "THRESHOLD": np.array([[r.threshold] for r in chunk], np.float32),
                "ANOMALY_MAP": np.stack([r.map_at(height, width) for r in chunk]).astype(np.float32),
                "SERVER_MS": np.full((len(chunk), 1), server_ms, np.float32),
            }
            responses.append(pb.InferenceResponse(output_tensors=[self.tensor(k, values[k]) for k in OUTPUTS]))
        return responses

    def finalize(self) -> None:
        self.detector.close()
