"""OpenVINO backend: Intel and AMD CPUs, Intel integrated GPUs and NPUs (``pip install "edgead[openvino]"``).

OpenVINO reads the exported ONNX itself (FP32, FP16 or the INT8 QDQ graph, whose Q/DQ pairs its CPU and GPU
plugins run as INT8 arithmetic), compiles it for one device and runs it with the same inputs and outputs as
every other backend. The device is ``CPU`` unless asked: :func:`available_devices` lists what OpenVINO finds
(``edgead info`` prints them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgead.runtime.backends.base import (
    INPUT_NAME,
    OUTPUT_NAMES,
    Backend,
    BackendError,
    check_batch,
    check_io,
    model_file,
)

DEFAULT_DEVICE = "CPU"
INSTALL_HINT = 'pip install "edgead[openvino]"'


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as err:
        raise BackendError(f"the OpenVINO backend needs the openvino package ({INSTALL_HINT}): {err}") from None
    return openvino


def available_devices() -> list[dict[str, str]]:
    """The devices OpenVINO finds here: ``{"device": "CPU", "name": "<full device name>"}`` each; empty without
    OpenVINO."""
    try:
        ov = _openvino()
    except BackendError:
        return []
    core = ov.Core()
    devices = []
    for device in core.available_devices:
        try:
            name = str(core.get_property(device, "FULL_DEVICE_NAME"))
        except Exception:  # a plugin that cannot answer still counts as found
            name = device
        devices.append({"device": device, "name": name})
    return devices


class OpenVINOBackend(Backend):
    """Runs an exported ONNX graph with OpenVINO on ``device`` (``CPU``, ``GPU``, ``NPU``, ``GPU.1``, ...).

    Example:
        >>> backend = OpenVINOBackend("exports/gaussian/model.int8.onnx", device="CPU")
        >>> outputs = backend.infer(batch)  # {"anomaly_map": (B, H, W), "score": (B,)}
    """

    name = "openvino"

    def __init__(self, onnx_path: str | Path, device: str = DEFAULT_DEVICE, threads: int | None = None) -> None:
        ov = _openvino()
        self.onnx_path = model_file(onnx_path)
        core = ov.Core()
        found = list(core.available_devices)
        base = device.split(".")[0]
        if device not in found and base not in found and base not in ("AUTO", "MULTI", "HETERO"):
            raise BackendError(
                f"OpenVINO has no device {device!r} here (found: {', '.join(found) or 'none'}); "
                "choose one with --device"
            )
        self.device = device
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if base == "CPU":  # the CPU plugin would otherwise run FP32 graphs in BF16 on CPUs that have it
            config["INFERENCE_PRECISION_HINT"] = "f32"
        try:
            model = core.read_model(str(self.onnx_path))
            self.compiled = core.compile_model(model, device, config)
        except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own
            raise BackendError(f"{self.onnx_path}: OpenVINO cannot compile this model for {device} ({err})") from err
        inputs = {port.get_any_name(): port for port in self.compiled.inputs}
        outputs = {port.get_any_name() for port in self.compiled.outputs}
        check_io(self.onnx_path, inputs, outputs)
        port = inputs[INPUT_NAME]
        self._input_shape = tuple(int(d) for d in port.get_shape())
        self._input_dtype = np.float16 if port.get_element_type().get_type_name() == "f16" else np.float32
        self.request = self.compiled.create_infer_request()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    def describe_device(self) -> str:
        """The full name of the device the model runs on."""
        try:
            return str(self.compiled.get_property("EXECUTION_DEVICES"))
        except Exception:
            return self.device

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        check_batch(batch, self._input_shape)
        results = self.request.infer({INPUT_NAME: np.ascontiguousarray(batch, dtype=self._input_dtype)})
        by_name = {port.get_any_name(): value for port, value in results.items()}
        return {name: np.array(by_name[name], dtype=np.float32) for name in OUTPUT_NAMES}

    def close(self) -> None:
        self.request = None
        self.compiled = None
