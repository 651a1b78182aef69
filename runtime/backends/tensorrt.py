"""TensorRT backend: runs a serialized engine with pycuda (torch-free, GPU only).

Works with TensorRT 10/11 (``import tensorrt``) and TensorRT for RTX (``import tensorrt_rtx``); both share
the name-based tensor API used here (``num_io_tensors``, ``set_tensor_address``, ``execute_async_v3``).
Nothing heavy is imported at module import time, so this module loads on any machine; the errors come
when a backend is constructed without TensorRT, pycuda or a GPU.

CUDA graphs (fixed shapes make one captured enqueue valid for every frame):

* TensorRT 10/11: after one warm-up ``execute_async_v3`` (TensorRT requires it before capture), the
  enqueue is captured with pycuda's ``Stream.begin_capture``/``end_capture`` and replayed with
  ``Graph.instantiate().launch(stream)``. Those calls exist in pycuda releases that include its
  CUDA-graph support (``test/test_graph.py`` upstream); with an older pycuda the backend falls back to a
  plain ``execute_async_v3`` per frame and sets ``cuda_graph`` to False.
* TensorRT-RTX: manual stream capture needs engines built with ``REQUIRE_USER_ALLOCATION``, so the
  runtime's own graph support is used instead (``IRuntimeConfig.cuda_graph_strategy``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgead.runtime.backends.base import INPUT_NAME, OUTPUT_NAMES, Backend, BackendError

__all__ = ["TRT_MODULE_NAMES", "TensorRTBackend", "import_tensorrt"]

logger = logging.getLogger(__name__)

TRT_MODULE_NAMES: tuple[str, ...] = ("tensorrt", "tensorrt_rtx")
_INSTALL_HINT = (
    "install `edgead[trt]` (TensorRT 10/11 + pycuda + polygraphy) on the target device, "
    "or `tensorrt-rtx-cu13` for RTX GPUs"
)
_REBUILD_HINT = "engines are not portable: rebuild on this device with `edgead export --format tensorrt`"


def import_tensorrt(preferred: str | None = None) -> tuple[str, ModuleType]:
    """Imports the first usable TensorRT flavour.

    PyPI's ``tensorrt`` stub can be importable yet useless (it only redirects the install), so a module
    without ``Builder`` counts as unavailable, like one that fails to import.

    Args:
        preferred: ``"tensorrt"`` or ``"tensorrt_rtx"`` to require one flavour; None tries ``tensorrt``
            first, then ``tensorrt_rtx``.

    Returns:
        ``(module name, module)``.

    Raises:
        ValueError: ``preferred`` is not a known flavour.
        ImportError: No usable flavour; the message says what was tried and why it failed.
    """
    if preferred is not None and preferred not in TRT_MODULE_NAMES:
        raise ValueError(f"unknown TensorRT flavour {preferred!r}: expected one of {', '.join(TRT_MODULE_NAMES)}")
    candidates = (preferred,) if preferred else TRT_MODULE_NAMES
    reasons: list[str] = []
    for name in candidates:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # broken wheels raise anything from OSError to RuntimeError
            reasons.append(f"`import {name}` failed ({type(exc).__name__}: {exc})")
            continue
        if not hasattr(module, "Builder"):
            reasons.append(f"`{name}` is importable but has no Builder (a stub or broken install)")
            continue
        return name, module
    raise ImportError("; ".join(reasons))


def _import_pycuda() -> ModuleType:
    """Imports ``pycuda.driver`` or raises BackendError with an install hint."""
    try:
        return importlib.import_module("pycuda.driver")
    except Exception as exc:  # pycuda raises ImportError or OSError when libcuda is missing
        raise BackendError(
            f"the TensorRT backend needs pycuda and a CUDA driver ({type(exc).__name__}: {exc}); {_INSTALL_HINT}"
        ) from exc


class TensorRTBackend(Backend):
    """Runs a fixed-shape TensorRT engine on one GPU.

    Attributes:
        flavour: ``"tensorrt"`` or ``"tensorrt_rtx"``.
        cuda_graph: Whether frames are replayed from a CUDA graph.
        cuda_graph_mode: ``"stream_capture"`` (pycuda), ``"native"`` (TensorRT-RTX runtime) or ``"off"``.
        timings: Milliseconds of the last call, split into ``h2d``, ``compute`` and ``d2h`` (CUDA events).
    """

    name = "tensorrt"

    def __init__(
        self,
        engine_path: str | os.PathLike[str],
        flavour: str | None = None,
        use_cuda_graph: bool = True,
        device: int = 0,
    ) -> None:
        """Deserializes the engine, allocates pinned host and device buffers and warms up.

        Args:
            engine_path: Serialized engine built by ``edgead export --format tensorrt``.
            flavour: ``"tensorrt"``, ``"tensorrt_rtx"`` or None to detect (``tensorrt`` first).
            use_cuda_graph: Replay the enqueue from a CUDA graph where the stack supports it.
            device: CUDA device ordinal.

        Raises:
            BackendError: Missing file, TensorRT/pycuda/GPU unavailable, or the engine does not load here.
        """
        self.engine_path = Path(engine_path)
        self._ctx: Any = None  # set first: close() must work on a half-constructed backend
        self._closed = False
        self.cuda_graph = False
        self.cuda_graph_mode = "off"
        self.timings: dict[str, float] = {}
        self._graph_exec: Any = None
        self._graph: Any = None
        self._launch_takes_stream = True
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        self._runtime_config: Any = None
        self._stream: Any = None
        self._events: list[Any] = []
        self._device_buffers: dict[str, Any] = {}
        self._host_buffers: dict[str, np.ndarray] = {}
        self.device_name = ""
        if not self.engine_path.is_file():
            raise BackendError(f"TensorRT engine not found: {self.engine_path}")
        try:
            self.flavour, self._trt = import_tensorrt(flavour)
        except ImportError as exc:
            raise BackendError(f"cannot load {self.engine_path}: no TensorRT ({exc}); {_INSTALL_HINT}") from exc
        self._cuda = _import_pycuda()
        self._open_device(device)
        try:
            with self._current():
                self._load(use_cuda_graph)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _open_device(self, device: int) -> None:
        """Initialises the driver and retains the device's primary context."""
        cuda = self._cuda
        try:
            cuda.init()
            count = cuda.Device.count()
        except Exception as exc:  # pycuda.driver.Error subclasses differ by failure
            raise BackendError(
                f"cannot load {self.engine_path}: CUDA is not usable here ({type(exc).__name__}: {exc})"
            ) from exc
        if count <= device:
            raise BackendError(
                f"cannot load {self.engine_path}: CUDA device {device} requested but {count} device(s) found"
            )
        # The primary context is the one TensorRT's CUDA-runtime calls bind to, so pycuda buffers and
        # TensorRT allocations live in the same context even on threads where nothing was pushed.
        self._ctx = cuda.Device(device).retain_primary_context()
        self.device_name = str(cuda.Device(device).name())

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        """Makes the backend's context current on the calling thread (camera threads differ from init)."""
        self._ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _load(self, use_cuda_graph: bool) -> None:
        """Deserializes the engine, creates the context and buffers, warms up and captures."""
        trt, cuda = self._trt, self._cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise BackendError(
                f"TensorRT ({self.flavour} {getattr(trt, '__version__', '?')}) could not deserialize "
                f"{self.engine_path} (see the TensorRT log above); {_REBUILD_HINT}"
            )
        # RTX: its own graph support (1.2+) or none; manual capture there needs REQUIRE_USER_ALLOCATION engines.
        native_graph = use_cuda_graph and self.flavour == "tensorrt_rtx" and hasattr(trt, "CudaGraphStrategy")
        if native_graph:
            self._runtime_config = self._engine.create_runtime_config()
            self._runtime_config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self._context = self._engine.create_execution_context(self._runtime_config)
        else:
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"TensorRT could not create an execution context for {self.engine_path}")
        self._allocate()
        self._stream = cuda.Stream()
        self._events = [cuda.Event() for _ in range(4)]
        # Warm-up: TensorRT needs one enqueue before capture, and TensorRT-RTX JIT-compiles its kernels
        # here, so the first camera frame does not pay for it.
        self._host_buffers[INPUT_NAME].fill(0)
        self._enqueue_plain()
        self._stream.synchronize()
        if native_graph:
            self.cuda_graph, self.cuda_graph_mode = True, "native"
        elif use_cuda_graph and self.flavour == "tensorrt":
            self._capture()

    def _allocate(self) -> None:
        """Creates pinned host and device buffers for every IO tensor and binds their addresses."""
        trt, cuda, engine = self._trt, self._cuda, self._engine
        inputs: dict[str, tuple[int, ...]] = {}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(
                    f"{self.engine_path}: tensor {name!r} has dynamic shape {shape}; edgead engines are built "
                    f"with fixed shapes, {_REBUILD_HINT}"
                )
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            host = cuda.pagelocked_empty(shape, dtype)
            device = cuda.mem_alloc(max(host.nbytes, 1))
            self._host_buffers[name] = host
            self._device_buffers[name] = device
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs[name] = shape
            if not self._context.set_tensor_address(name, int(device)):
                raise BackendError(f"TensorRT rejected the device address of tensor {name!r} in {self.engine_path}")
        missing = [n for n in (INPUT_NAME, *OUTPUT_NAMES) if n not in names]
        if missing or list(inputs) != [INPUT_NAME]:
            raise BackendError(
                f"{self.engine_path} has IO tensors {names} (inputs {list(inputs)}); expected input "
                f"{INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}"
            )
        self._input_shape = inputs[INPUT_NAME]

    def _enqueue_plain(self) -> None:
        """Enqueues one inference on the stream without a graph."""
        if not self._context.execute_async_v3(self._stream.handle):
            raise BackendError(f"TensorRT execute_async_v3 failed for {self.engine_path}")

    def _capture(self) -> None:
        """Captures the enqueue into a CUDA graph; falls back to plain enqueues when that is not possible."""
        stream = self._stream
        if not hasattr(stream, "begin_capture"):
            logger.info("pycuda %s has no CUDA-graph support; running without graphs", self._pycuda_version())
            return
        capturable = getattr(self._context, "is_stream_capturable", None)
        if capturable is not None and not capturable(stream.handle):
            logger.info("TensorRT reports %s as not stream-capturable; running without graphs", self.engine_path)
            return
        graph = None
        try:
            stream.begin_capture()
            try:
                ok = self._context.execute_async_v3(stream.handle)
            finally:
                # Always end the capture: a stream left capturing makes every later call fail.
                graph = stream.end_capture()
            if not ok:
                raise RuntimeError("execute_async_v3 returned False during capture")
            self._graph_exec, self._graph = graph.instantiate(), graph
            self._launch_graph(first=True)  # one replay validates the graph before frames depend on it
            stream.synchronize()
        except Exception as exc:  # any capture failure only costs the optimisation
            logger.warning("CUDA graph capture failed (%s); running without graphs", exc)
            self._graph_exec = self._graph = None
            return
        self.cuda_graph, self.cuda_graph_mode = True, "stream_capture"

    def _launch_graph(self, first: bool = False) -> None:
        """Replays the captured graph on the backend's stream."""
        if first:
            try:
                self._graph_exec.launch(self._stream)
                self._launch_takes_stream = True
                return
            except TypeError:  # Boost.Python's ArgumentError: this pycuda's launch() takes no stream
                self._launch_takes_stream = False
        if self._launch_takes_stream:
            self._graph_exec.launch(self._stream)
        else:
            # The legacy default stream is ordered with our blocking stream on both sides, so the
            # H2D and D2H copies on the stream still bracket the replay.
            self._graph_exec.launch()

    def _pycuda_version(self) -> str:
        """Best-effort pycuda version string for log messages."""
        with contextlib.suppress(Exception):
            return str(importlib.import_module("pycuda").VERSION_TEXT)
        return "?"

    # ------------------------------------------------------------------ inference

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The fixed input shape the engine was built for."""
        return self._input_shape

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Runs one batch.

        Args:
            batch: Array of exactly ``input_shape``; cast to the engine's input dtype.

        Returns:
            float32 copies of ``anomaly_map`` and ``score``.

        Raises:
            BackendError: The backend is closed or the batch has the wrong shape.
        """
        if self._closed:
            raise BackendError(f"TensorRT backend for {self.engine_path} is closed")
        batch = np.asarray(batch)
        if tuple(batch.shape) != self._input_shape:
            raise BackendError(
                f"input shape {tuple(batch.shape)} does not match the engine's fixed shape {self._input_shape} "
                f"({self.engine_path})"
            )
        cuda, stream = self._cuda, self._stream
        start, after_h2d, after_compute, end = self._events
        with self._current():
            np.copyto(self._host_buffers[INPUT_NAME], batch, casting="unsafe")
            start.record(stream)
            cuda.memcpy_htod_async(self._device_buffers[INPUT_NAME], self._host_buffers[INPUT_NAME], stream)
            after_h2d.record(stream)
            if self._graph_exec is not None:
                self._launch_graph()
            else:
                self._enqueue_plain()
            after_compute.record(stream)
            for name in OUTPUT_NAMES:
                cuda.memcpy_dtoh_async(self._host_buffers[name], self._device_buffers[name], stream)
            end.record(stream)
            stream.synchronize()
            self.timings = {
                "h2d": float(start.time_till(after_h2d)),
                "compute": float(after_h2d.time_till(after_compute)),
                "d2h": float(after_compute.time_till(end)),
            }
        # Copies: the pinned buffers are overwritten by the next call.
        return {name: self._host_buffers[name].astype(np.float32, copy=True) for name in OUTPUT_NAMES}

    def close(self) -> None:
        """Releases the graph, TensorRT objects, buffers and the context; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._ctx is None:
            return
        with contextlib.suppress(Exception), self._current():
            # Destroy in reverse order of creation while the context is current.
            self._graph_exec = self._graph = None
            self._context = self._runtime_config = None
            self._engine = self._runtime = None  # the runtime must outlive its engines
            self._stream, self._events = None, []
            for buffer in self._device_buffers.values():
                buffer.free()
            self._device_buffers.clear()
            self._host_buffers.clear()
        with contextlib.suppress(Exception):
            self._ctx.detach()
        self._ctx = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
