"""ONNX Runtime backend: CPU everywhere, CUDA where that execution provider is installed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgead.runtime.backends.base import (
    INPUT_NAME,
    OUTPUT_NAMES,
    Backend,
    BackendError,
    check_batch,
    check_io,
    model_file,
)


def default_providers() -> list[str]:
    """CUDA (and TensorRT's ORT provider is deliberately not used: edgead builds its own engines), then CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeBackend(Backend):
    """Runs an exported ONNX graph with ONNX Runtime.

    Example:
        >>> backend = OnnxRuntimeBackend("exports/score-resilience/model.onnx")
        >>> outputs = backend.infer(batch)  # {"anomaly_map": (B, H, W), "score": (B,)}
    """

    name = "onnxruntime"

    def __init__(
        self, onnx_path: str | Path, providers: Sequence[str] | None = None, intra_op_threads: int | None = None
    ) -> None:
        self.onnx_path = model_file(onnx_path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.providers = list(providers) if providers else default_providers()
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=self.providers)
        except Exception as err:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            raise BackendError(f"{self.onnx_path}: ONNX Runtime cannot load this model ({err})") from err
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        check_io(self.onnx_path, inputs, outputs)
        self._input_shape = tuple(int(d) for d in inputs[INPUT_NAME].shape)
        self._input_dtype = np.float16 if inputs[INPUT_NAME].type == "tensor(float16)" else np.float32

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        check_batch(batch, self._input_shape)
        feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        results = self.session.run(list(OUTPUT_NAMES), feed)
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(OUTPUT_NAMES, results, strict=True)}
