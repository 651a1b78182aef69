"""ONNX -> TensorRT engine builds for every TensorRT flavour edgead supports, behind one interface.

The flavours differ in how FP16 is obtained, and :func:`choose_onnx_for` is the one place that knows it:

* TensorRT 10 (``import tensorrt``, Jetson/JetPack 6): weakly typed networks; FP16 comes from the
  ``FP16`` builder flag applied to the FP32 ONNX.
* TensorRT 11 (``import tensorrt``): ``BuilderFlag.FP16`` is gone and networks are strongly typed, so
  the precision is the ONNX's: FP16 engines are built from ``model.fp16.onnx``, whose sensitive parts
  the exporter keeps in FP32 behind Cast nodes.
* TensorRT for RTX (``import tensorrt_rtx``): strongly typed like 11, and builds ahead of time on a
  machine without a GPU (only deserializing and running need one). Its timing-cache calls are
  deprecated no-ops (RTX 1.2+), so no timing cache is read or written for it.

This module imports no torch; the builder module is only imported when a build starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from edgead.runtime.backends.tensorrt import import_tensorrt
from edgead.runtime.metadata import PRECISIONS

_UNAVAILABLE = (
    "no TensorRT flavour installed: install `edgead[trt]` (TensorRT 10/11 + pycuda + polygraphy) on the target "
    "device, or `tensorrt-rtx-cu13` for RTX GPUs; ONNX export works without it"
)
Log = Callable[[str], None]


class TensorRTUnavailable(RuntimeError):
    """No usable TensorRT flavour could be imported."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(f"{_UNAVAILABLE} ({detail})" if detail else _UNAVAILABLE)


@dataclass(frozen=True)
class Flavour:
    """One importable TensorRT flavour and the properties that change how engines are built.

    Attributes:
        name: ``"tensorrt"`` or ``"tensorrt_rtx"``.
        version: The module's ``__version__``.
        major: Major version number.
        module: The imported module (not part of equality, hashing or repr).
    """

    name: str
    version: str
    major: int
    module: ModuleType | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def strongly_typed(self) -> bool:
        """Networks take their precision from the ONNX types (TensorRT-RTX and TensorRT >= 11)."""
        return self.name == "tensorrt_rtx" or self.major >= 11

    @property
    def fp16_from_onnx(self) -> bool:
        """FP16 engines need the FP16 ONNX (strongly typed); TensorRT 10 uses the builder flag instead."""
        return self.strongly_typed

    @property
    def can_build_without_gpu(self) -> bool:
        """Ahead-of-time builds on a CPU-only machine (TensorRT-RTX)."""
        return self.name == "tensorrt_rtx"

    @property
    def has_timing_cache(self) -> bool:
        """Whether the builder's timing cache does anything (a deprecated no-op in TensorRT-RTX)."""
        return self.name == "tensorrt"


def detect_flavour(preferred: str | None = None) -> Flavour:
    """Finds a usable TensorRT flavour.

    Args:
        preferred: ``"tensorrt"``, ``"tensorrt_rtx"`` or None (``tensorrt`` first, then ``tensorrt_rtx``).

    Raises:
        ValueError: Unknown ``preferred``.
        TensorRTUnavailable: Nothing importable, or only a stub/broken package (no ``Builder``).
    """
    try:
        name, module = import_tensorrt(preferred)  # raises ValueError for an unknown name
    except ImportError as exc:
        raise TensorRTUnavailable(str(exc)) from exc
    version = str(getattr(module, "__version__", "0"))
    head = version.split(".", 1)[0]
    return Flavour(name=name, version=version, major=int(head) if head.isdigit() else 0, module=module)


def choose_onnx_for(
    flavour: Flavour, precision: str, fp32_onnx: Path, fp16_onnx: Path | None, int8_onnx: Path | None = None
) -> tuple[Path, frozenset[str]]:
    """Picks the ONNX to parse and the builder flags to set: the one place handling the flavour difference.

    Args:
        flavour: Target flavour.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        fp32_onnx: The FP32 export.
        fp16_onnx: The FP16 export (``model.fp16.onnx``) or None if there is none.
        int8_onnx: The INT8 QDQ export (``model.int8.onnx``) or None if there is none. Every flavour builds INT8
            from it (explicit quantization); TensorRT 10 also needs ``BuilderFlag.INT8`` to honour its Q/DQ
            layers, strongly typed flavours take the types from the graph.

    Returns:
        ``(onnx path, builder flag names)``, e.g. ``(fp32_onnx, {"FP16"})`` for TensorRT 10 FP16.

    Raises:
        ValueError: Unknown precision.
        FileNotFoundError: FP16 on a strongly typed flavour without an FP16 ONNX.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return Path(fp32_onnx), frozenset()
    if precision == "int8":
        if int8_onnx is None:
            raise FileNotFoundError(
                f"an INT8 engine is built from the INT8 QDQ ONNX next to {fp32_onnx}; export it with --precision int8"
            )
        return Path(int8_onnx), frozenset() if flavour.strongly_typed else frozenset({"INT8"})
    if not flavour.fp16_from_onnx:
        return Path(fp32_onnx), frozenset({"FP16"})
    if fp16_onnx is None:
        raise FileNotFoundError(
            f"{flavour.name} {flavour.version} builds strongly typed networks, so an FP16 engine needs the FP16 "
            f"ONNX next to {fp32_onnx}; export it with --precision fp16"
        )
    return Path(fp16_onnx), frozenset()


@dataclass
class BuildSettings:
    """What to build.

    Attributes:
        precision: ``"fp32"`` or ``"fp16"``.
        input_shape: Fixed input shape, e.g. ``(1, 3, 256, 256)``.
        workspace_mb: Builder workspace pool limit.
        timing_cache: Timing-cache file to load and update (TensorRT 10/11 only).
        compute_capabilities: TensorRT-RTX ahead-of-time targets such as ``("8.6", "8.9")``; None keeps the
            flavour's default (RTX: portable across 8.0/8.6/8.9/12.0, Turing 7.5 only when named).
        builder_optimization_level: 0-5, None for the builder's default.
        max_batch: For an ONNX with a dynamic batch dimension: one optimisation profile from batch 1 to
            ``max_batch`` (``input_shape``'s batch must equal it), tuned for ``max_batch`` (what a batching
            server such as Triton runs under load). None: fixed shapes, ``min = opt = max = input_shape``.
        fp32_layers: Weakly typed FP16 builds (TensorRT 10): the ONNX nodes whose layers are constrained to FP32
            (:func:`edgead.export.fp16.fp32_node_names`), as the FP16 ONNX keeps them for strongly typed builds.
    """

    precision: str
    input_shape: tuple[int, ...]
    workspace_mb: int = 1024
    timing_cache: Path | None = None
    compute_capabilities: tuple[str, ...] | None = None
    builder_optimization_level: int | None = None
    max_batch: int | None = None
    fp32_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.input_shape = tuple(int(d) for d in self.input_shape)
        if not self.input_shape or any(d <= 0 for d in self.input_shape):
            raise ValueError(f"input_shape must be positive integers, got {self.input_shape}")
        if self.workspace_mb <= 0:
            raise ValueError(f"workspace_mb must be positive, got {self.workspace_mb}")
        if self.max_batch is not None and self.max_batch != self.input_shape[0]:
            raise ValueError(f"max_batch {self.max_batch} must equal the batch of input_shape {self.input_shape}")

    def profile(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The optimisation profile's ``(min, opt, max)`` input shapes."""
        shape = tuple(self.input_shape)
        if self.max_batch is None:
            return shape, shape, shape
        return (1, *shape[1:]), shape, shape
        if self.compute_capabilities is not None:
            self.compute_capabilities = tuple(str(c) for c in self.compute_capabilities)
        self.fp32_layers = tuple(str(name) for name in self.fp32_layers)


@dataclass
class EngineInfo:
    """What :func:`build_engine` produced (also stored beside cached engines as JSON)."""

    engine_path: Path
    sha256: str
    flavour: str
    flavour_version: str
    precision: str
    onnx_path: Path
    build_seconds: float
    cache_hit: bool
    key: str
    input_shape: tuple[int, ...]
    layers: int
    size_bytes: int
    builder_flags: tuple[str, ...] = ()
    compute_capabilities: tuple[str, ...] | None = None
    profile: tuple[tuple[int, ...], ...] = ()  # the optimisation profile's (min, opt, max) input shapes
    fp32_constrained_layers: int = 0  # weakly typed FP16 builds: layers held in FP32 by precision constraints

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (paths as strings)."""
        data = asdict(self)
        data["engine_path"], data["onnx_path"] = str(self.engine_path), str(self.onnx_path)
        return data
