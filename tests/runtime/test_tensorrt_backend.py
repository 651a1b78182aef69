"""TensorRT backend: import hygiene, clear errors without a GPU, and the GPU code path run against fakes.

The fakes stand in for ``tensorrt`` and ``pycuda.driver`` with just the calls the backend makes, so the
orchestration (buffers, dtype casts, warm-up, CUDA-graph capture and its fallbacks, cleanup) is tested on
CPU machines; ``test_matches_onnxruntime_on_gpu`` checks the real stack where a GPU exists.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgead.runtime.backends.base import BackendError
from edgead.runtime.backends.tensorrt import TensorRTBackend, import_tensorrt

SHAPE = (1, 3, 8, 8)


# ---------------------------------------------------------------------------- fakes


class FakeAllocation:
    def __init__(self, cuda: FakeCuda, nbytes: int) -> None:
        self.address = 0x1000 * (len(cuda.memory) + 1)
        cuda.memory[self.address] = np.zeros(nbytes, np.uint8)
        self.cuda, self.freed = cuda, False

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        self.freed = True
        self.cuda.freed += 1


class FakeStream:
    def __init__(self, cuda: FakeCuda) -> None:
        self.handle = 7000 + len(cuda.streams)
        cuda.streams[self.handle] = self
        self.capturing = False
        self.captured: list[Any] = []

    def synchronize(self) -> None:
        assert not self.capturing, "synchronize on a capturing stream is an error in CUDA"


class CapturingStream(FakeStream):
    def begin_capture(self) -> None:
        self.capturing, self.captured = True, []

    def end_capture(self) -> FakeGraph:
        self.capturing = False
        return FakeGraph(self.captured)


class FakeGraph:
    def __init__(self, ops: list[Any]) -> None:
        self.ops = list(ops)
        self.launches = 0

    def instantiate(self) -> FakeGraph:
        return self

    def launch(self, stream: FakeStream) -> None:
        self.launches += 1
        for op in self.ops:
            op()


class StreamlessGraph(FakeGraph):
    """pycuda releases whose GraphExec.launch() takes no stream (it then runs on the legacy stream)."""

    def launch(self) -> None:  # type: ignore[override]
        super().launch(None)  # type: ignore[arg-type]


class FakeCuda:
    """Stands in for ``pycuda.driver``."""

    def __init__(self, devices: int = 1, graph_support: bool = True) -> None:
        self.devices, self.memory, self.streams = devices, {}, {}
        self.stack: list[str] = []
        self.freed = self.detached = 0
        stream_cls = CapturingStream if graph_support else FakeStream
        self.Stream = lambda: stream_cls(self)
        cuda = self

        class Context:
            def push(self) -> None:
                cuda.stack.append("ctx")

            @staticmethod
            def pop() -> None:
                cuda.stack.pop()

            def detach(self) -> None:
                cuda.detached += 1

        class Device:
            def __init__(self, ordinal: int) -> None:
                self.ordinal = ordinal

            @staticmethod
            def count() -> int:
                return cuda.devices

            def name(self) -> str:
                return "Fake GPU"

            def retain_primary_context(self) -> Context:
                return Context()

        self.Context, self.Device = Context, Device

    def init(self) -> None:
        pass

    def pagelocked_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def mem_alloc(self, nbytes: int) -> FakeAllocation:
        return FakeAllocation(self, nbytes)

    def memcpy_htod_async(self, dest: FakeAllocation, src: np.ndarray, stream: FakeStream) -> None:
        assert self.stack, "no CUDA context current"
        self.memory[int(dest)][: src.nbytes] = src.reshape(-1).view(np.uint8)

    def memcpy_dtoh_async(self, dest: np.ndarray, src: FakeAllocation, stream: FakeStream) -> None:
        dest.reshape(-1).view(np.uint8)[:] = self.memory[int(src)][: dest.nbytes]

    def Event(self) -> SimpleNamespace:  # noqa: N802 - mirrors pycuda's class name
        return SimpleNamespace(record=lambda stream: None, time_till=lambda other: 0.25)


class FakeEngine:
    def __init__(self, trt: FakeTRT, io_dtype: type, names: tuple[str, ...]) -> None:
        shapes = {"image": SHAPE, "anomaly_map": (SHAPE[0], *SHAPE[2:]), "score": (SHAPE[0],)}
        self.tensors = {n: (shapes.get(n, (1,)), io_dtype) for n in names}
        self.trt, self.num_io_tensors = trt, len(names)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> str:
        return "in" if name == "image" else "out"

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> type:
        return self.tensors[name][1]

    def create_runtime_config(self) -> SimpleNamespace:
        return SimpleNamespace(cuda_graph_strategy=None)

    def create_execution_context(self, runtime_config: Any = None) -> FakeContext:
        self.trt.context = FakeContext(self, runtime_config)
        return self.trt.context


class FakeContext:
    def __init__(self, engine: FakeEngine, runtime_config: Any) -> None:
        self.engine, self.runtime_config = engine, runtime_config
        self.addresses: dict[str, int] = {}
        self.executions = 0
        self.fail_during_capture = ""  # "", "false" (returns False) or "raise"

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def _run(self) -> None:
        self.executions += 1
        memory = self.engine.trt.cuda.memory
        shape, dtype = self.engine.tensors["image"]
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        image = memory[self.addresses["image"]][:nbytes].view(dtype).reshape(shape).astype(np.float32)
        amap = image.mean(axis=1)
        outputs = {"anomaly_map": amap, "score": amap.reshape(shape[0], -1).max(axis=1)}
        for name, value in outputs.items():
            raw = value.astype(self.engine.tensors[name][1]).reshape(-1).view(np.uint8)
            memory[self.addresses[name]][: raw.size] = raw

    def execute_async_v3(self, handle: int) -> bool:
        stream = self.engine.trt.cuda.streams[handle]
        if stream.capturing:
            if self.fail_during_capture == "raise":
                raise RuntimeError("operation not permitted when stream is capturing")
            stream.captured.append(self._run)
            return self.fail_during_capture != "false"
        self._run()
        return True


class FakeLogger:
    WARNING = 2

    def __init__(self, severity: int) -> None:
        self.severity = severity


class FakeTRT:
    """Stands in for ``tensorrt`` / ``tensorrt_rtx``."""

    __version__ = "10.3.0"
    Builder = object
    Logger = FakeLogger
    TensorIOMode = SimpleNamespace(INPUT="in", OUTPUT="out")

    def __init__(self, cuda: FakeCuda, io_dtype: type = np.float32, deserializable: bool = True) -> None:
        self.cuda, self.io_dtype, self.deserializable = cuda, io_dtype, deserializable
        self.names: tuple[str, ...] = ("image", "anomaly_map", "score")
        self.context: FakeContext | None = None

    def nptype(self, dtype: type) -> type:
        return dtype

    def Runtime(self, logger: Any) -> SimpleNamespace:  # noqa: N802 - mirrors TensorRT's class name
        engine = FakeEngine(self, self.io_dtype, self.names) if self.deserializable else None
        return SimpleNamespace(deserialize_cuda_engine=lambda data: engine)


@pytest.fixture()
def engine_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.engine"
    path.write_bytes(b"serialized engine")
    return path


def _install(monkeypatch: pytest.MonkeyPatch, trt: FakeTRT, name: str = "tensorrt") -> None:
    monkeypatch.setitem(sys.modules, name, trt)
    monkeypatch.setitem(sys.modules, "pycuda.driver", trt.cuda)


# ---------------------------------------------------------------------------- import and environment errors


def test_module_imports_without_gpu_stack() -> None:
    code = textwrap.dedent(
        """
        import sys
        import edgead.runtime.backends.tensorrt
        heavy = [m for m in ("torch", "pycuda", "tensorrt", "tensorrt_rtx") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_engine_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.engine"
    with pytest.raises(BackendError, match="nope.engine"):
        TensorRTBackend(missing)


def test_without_tensorrt_gives_install_hint(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match=r"edgead\[trt\].*tensorrt-rtx-cu13"):
        TensorRTBackend(engine_file, flavour="tensorrt")


def test_stub_tensorrt_package_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="0.0.1"))
    with pytest.raises(ImportError, match="no Builder"):
        import_tensorrt("tensorrt")
    with pytest.raises(ValueError, match="unknown TensorRT flavour"):
        import_tensorrt("onnxruntime")


def test_without_pycuda_on_this_machine(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT(FakeCuda()))
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendError, match=r"needs pycuda.*edgead\[trt\]"):
        TensorRTBackend(engine_file, flavour="tensorrt")


def test_no_gpu_is_reported(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    _install(monkeypatch, FakeTRT(FakeCuda(devices=0)))
    with pytest.raises(BackendError, match="0 device"):
        TensorRTBackend(engine_file)


def test_undeserializable_engine_hints_rebuild(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    trt = FakeTRT(FakeCuda(), deserializable=False)
    _install(monkeypatch, trt)
    with pytest.raises(BackendError, match=r"model\.engine.*not portable.*edgead export --format tensorrt"):
        TensorRTBackend(engine_file)
    assert trt.cuda.stack == [] and trt.cuda.detached == 1, "context must be released after a failed load"


def test_unexpected_io_names_are_listed(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    trt = FakeTRT(FakeCuda())
    trt.names = ("image", "heatmap", "score")
    _install(monkeypatch, trt)
    with pytest.raises(BackendError, match="heatmap"):
        TensorRTBackend(engine_file)
    assert trt.cuda.freed == 3, "buffers allocated before the failure must be freed"


# ---------------------------------------------------------------------------- the GPU path against fakes


def _expected(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amap = batch.astype(np.float32).mean(axis=1)
    return amap, amap.reshape(batch.shape[0], -1).max(axis=1)


def test_stream_capture_graph_is_replayed(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    trt = FakeTRT(FakeCuda())
    _install(monkeypatch, trt)
    backend = TensorRTBackend(engine_file)
    assert backend.input_shape == SHAPE
    assert (backend.cuda_graph, backend.cuda_graph_mode) == (True, "stream_capture")
    # Warm-up plus one validating replay; the capture itself must not execute.
    assert trt.context is not None and trt.context.executions == 2
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = rng.standard_normal(SHAPE).astype(np.float32)
        out = backend.infer(batch)
        amap, score = _expected(batch)
        np.testing.assert_allclose(out["anomaly_map"], amap, rtol=1e-6)
        np.testing.assert_allclose(out["score"], score, rtol=1e-6)
        assert out["anomaly_map"].dtype == np.float32
    assert backend._graph_exec.launches == 4
    assert trt.context.executions == 5
    assert set(backend.timings) == {"h2d", "compute", "d2h"}
    assert trt.cuda.stack == [], "the context is popped after every call"
    backend.close()
    backend.close()
    assert trt.cuda.freed == 3 and trt.cuda.detached == 1
    with pytest.raises(BackendError, match="closed"):
        backend.infer(batch)


def test_outputs_are_copies(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    _install(monkeypatch, FakeTRT(FakeCuda()))
    with TensorRTBackend(engine_file) as backend:
        first = backend.infer(np.ones(SHAPE, np.float32))
        backend.infer(np.zeros(SHAPE, np.float32))
    np.testing.assert_array_equal(first["score"], [1.0])


def test_old_pycuda_falls_back_to_plain_enqueue(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    trt = FakeTRT(FakeCuda(graph_support=False))
    _install(monkeypatch, trt)
    with TensorRTBackend(engine_file) as backend:
        assert (backend.cuda_graph, backend.cuda_graph_mode) == (False, "off")
        batch = np.full(SHAPE, 2.0, np.float32)
        np.testing.assert_allclose(backend.infer(batch)["score"], [2.0])
    assert trt.context is not None and trt.context.executions == 2


@pytest.mark.parametrize("failure", ["false", "raise"])
def test_failed_capture_falls_back(monkeypatch: pytest.MonkeyPatch, engine_file: Path, failure: str) -> None:
    trt = FakeTRT(FakeCuda())
    _install(monkeypatch, trt)
    original = FakeEngine.create_execution_context

    def failing(self: FakeEngine, runtime_config: Any = None) -> FakeContext:
        context = original(self, runtime_config)
        context.fail_during_capture = failure
        return context

    monkeypatch.setattr(FakeEngine, "create_execution_context", failing)
    with TensorRTBackend(engine_file) as backend:
        assert backend.cuda_graph is False
        assert not any(s.capturing for s in trt.cuda.streams.values()), "capture must always be ended"
        np.testing.assert_allclose(backend.infer(np.ones(SHAPE, np.float32))["score"], [1.0])


def test_graph_launch_without_stream_argument(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    _install(monkeypatch, FakeTRT(FakeCuda()))
    original = CapturingStream.end_capture
    monkeypatch.setattr(CapturingStream, "end_capture", lambda self: StreamlessGraph(original(self).ops))
    with TensorRTBackend(engine_file) as backend:
        assert backend.cuda_graph_mode == "stream_capture" and backend._launch_takes_stream is False
        np.testing.assert_allclose(backend.infer(np.full(SHAPE, 3.0, np.float32))["score"], [3.0])
        assert backend._graph_exec.launches == 2


def test_graphs_can_be_disabled(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    _install(monkeypatch, FakeTRT(FakeCuda()))
    with TensorRTBackend(engine_file, use_cuda_graph=False) as backend:
        assert backend.cuda_graph is False and backend._graph_exec is None


def test_fp16_io_is_cast(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    _install(monkeypatch, FakeTRT(FakeCuda(), io_dtype=np.float16))
    with TensorRTBackend(engine_file) as backend:
        batch = np.linspace(0, 1, int(np.prod(SHAPE)), dtype=np.float64).reshape(SHAPE)
        out = backend.infer(batch)
    amap, _ = _expected(batch.astype(np.float16))
    assert out["anomaly_map"].dtype == np.float32
    np.testing.assert_allclose(out["anomaly_map"], amap, atol=1e-3)


def test_wrong_shape_is_rejected(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    _install(monkeypatch, FakeTRT(FakeCuda()))
    with TensorRTBackend(engine_file) as backend, pytest.raises(BackendError, match=r"\(1, 3, 8, 8\)"):
        backend.infer(np.zeros((2, 3, 8, 8), np.float32))


def test_rtx_uses_native_cuda_graphs(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    trt = FakeTRT(FakeCuda())
    trt.CudaGraphStrategy = SimpleNamespace(WHOLE_GRAPH_CAPTURE="whole")  # type: ignore[attr-defined]
    _install(monkeypatch, trt, name="tensorrt_rtx")
    with TensorRTBackend(engine_file, flavour="tensorrt_rtx") as backend:
        assert backend.flavour == "tensorrt_rtx"
        assert (backend.cuda_graph, backend.cuda_graph_mode) == (True, "native")
        assert trt.context is not None and trt.context.runtime_config.cuda_graph_strategy == "whole"
        assert all(not s.captured for s in trt.cuda.streams.values()), "no manual capture on RTX"
        np.testing.assert_allclose(backend.infer(np.ones(SHAPE, np.float32))["score"], [1.0])


def test_rtx_without_native_graphs_does_not_capture(monkeypatch: pytest.MonkeyPatch, engine_file: Path) -> None:
    trt = FakeTRT(FakeCuda())  # no CudaGraphStrategy: TensorRT-RTX before 1.2
    _install(monkeypatch, trt, name="tensorrt_rtx")
    with TensorRTBackend(engine_file, flavour="tensorrt_rtx") as backend:
        assert (backend.cuda_graph, backend.cuda_graph_mode) == (False, "off")
        assert all(not s.captured for s in trt.cuda.streams.values())


# ---------------------------------------------------------------------------- real GPU


def _cuda_device_available() -> bool:
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:  # no pycuda, driver or device
        return False


@pytest.mark.skipif(not _cuda_device_available(), reason="needs pycuda and a CUDA GPU")
def test_matches_onnxruntime_on_gpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from edgead.export.tensorrt import BuildSettings, TensorRTUnavailable, build_engine, detect_flavour

    try:
        flavour = detect_flavour()
    except TensorRTUnavailable as exc:
        pytest.skip(str(exc))

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.head = torch.nn.Conv2d(8, 1, 1)

        def forward(self, x: Any) -> tuple[Any, Any]:
            amap = torch.nn.functional.avg_pool2d(self.head(torch.nn.functional.silu(self.conv(x))), 2)[:, 0]
            return amap, torch.amax(amap.flatten(1), dim=1)

    shape = (1, 3, 32, 32)
    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(
        Tiny().eval(),
        (torch.randn(shape),),
        str(onnx_path),
        input_names=["image"],
        output_names=["anomaly_map", "score"],
        opset_version=18,
        dynamo=False,
    )
    info = build_engine(onnx_path, tmp_path / "model.engine", BuildSettings("fp32", shape), flavour=flavour)
    batch = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    expected = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": batch})
    with TensorRTBackend(info.engine_path, flavour=flavour.name) as backend:
        for _ in range(2):  # the second call replays the CUDA graph
            out = backend.infer(batch)
            np.testing.assert_allclose(out["anomaly_map"], expected[0], rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(out["score"], expected[1], rtol=1e-3, atol=1e-3)
