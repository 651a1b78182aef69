"""ONNX -> TensorRT engine builds, cached by everything that makes an engine different.

Which ONNX and builder flags a flavour needs (TensorRT 10, 11, TensorRT for RTX) is decided in one place,
:mod:`edgead.export.trt_flavours`; this module identifies the GPU, keys the engine cache, runs the builder
(imported only when a build starts; no torch) and records what it built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from edgead.data.files import atomic_output, file_sha256, write_bytes_atomic, write_json_atomic
from edgead.export.trt_flavours import (
    PRECISIONS,
    BuildSettings,
    EngineInfo,
    Flavour,
    Log,
    TensorRTUnavailable,
    choose_onnx_for,
    detect_flavour,
)
from edgead.runtime.backends.base import INPUT_NAME

__all__ = [
    "PRECISIONS",
    "BuildSettings",
    "EngineInfo",
    "Flavour",
    "TensorRTUnavailable",
    "build_engine",
    "choose_onnx_for",
    "detect_flavour",
    "engine_cache_key",
    "file_sha256",
    "gpu_identity",
]


def gpu_identity() -> tuple[str, str]:
    """``(GPU name, compute capability)`` of device 0 from pycuda, else nvidia-smi, else ``("none", "none")``."""
    try:
        import pycuda.driver as cuda  # optional: only GPU machines have it

        cuda.init()
        if cuda.Device.count() > 0:
            device = cuda.Device(0)
            major, minor = device.compute_capability()
            return str(device.name()), f"{major}.{minor}"
    except Exception:  # pycuda missing, or no driver/device: try nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            query = [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"]
            result = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
            name, _, capability = result.stdout.strip().splitlines()[0].rpartition(",")
            if name.strip() and capability.strip():
                return name.strip(), capability.strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return "none", "none"


def engine_cache_key(
    onnx_sha256: str,
    flavour: Flavour,
    gpu_name: str,
    compute_capability: str,
    precision: str,
    input_shape: tuple[int, ...],
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Stable sha256 hex of a canonical JSON of everything that makes an engine different.

    Args:
        onnx_sha256: Hash of the ONNX the engine is built from.
        flavour: Name and version both count: engines do not load across versions.
        gpu_name: GPU the engine is built for (``"any"`` for portable TensorRT-RTX engines).
        compute_capability: e.g. ``"8.7"``, or the requested RTX targets joined by commas.
        precision: ``"fp32"`` or ``"fp16"``.
        input_shape: Fixed input shape.
        extra: Further builder settings that change the engine (optimization level, workspace).
    """
    payload = dict(
        onnx_sha256=onnx_sha256,
        flavour=flavour.name,
        flavour_version=flavour.version,
        gpu_name=gpu_name,
        compute_capability=compute_capability,
        precision=precision,
        input_shape=[int(d) for d in input_shape],
        extra=dict(extra or {}),
    )
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _target(flavour: Flavour, settings: BuildSettings) -> tuple[str, str]:
    """GPU name and compute capability that identify the engine's target in the cache key."""
    if flavour.can_build_without_gpu:
        # RTX engines are portable across their compute capabilities, not tied to the build machine.
        targets = ",".join(sorted(_normalise_capability(c) for c in settings.compute_capabilities or ()))
        return "any", targets or "rtx-default"
    if settings.compute_capabilities:
        raise ValueError(
            "compute_capabilities only applies to TensorRT-RTX ahead-of-time builds; TensorRT "
            f"{flavour.version} engines target the GPU they are built on"
        )
    return gpu_identity()


def _normalise_capability(capability: str) -> str:
    """``"8.6"``, ``"86"``, ``"sm_86"`` -> ``"86"``."""
    digits = capability.lower().replace("sm", "").replace("_", "").replace(".", "").strip()
    if not digits.isdigit():
        raise ValueError(f"invalid compute capability {capability!r}: expected e.g. '8.6'")
    return digits


def _parse_onnx(trt: ModuleType, network: Any, onnx_path: Path, trt_logger: Any) -> None:
    """Parses the ONNX into ``network``; raises RuntimeError listing every parser error."""
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file (not parse(bytes)) resolves external-data files relative to the model.
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = [f"  [{i}] {parser.get_error(i).desc()}" for i in range(parser.num_errors)]
    raise RuntimeError(
        f"TensorRT's ONNX parser rejected {onnx_path} ({parser.num_errors} error(s)):\n" + "\n".join(errors)
    )


def _apply_compute_capabilities(trt: ModuleType, config: Any, capabilities: tuple[str, ...]) -> None:
    """Sets TensorRT-RTX ahead-of-time targets on the builder config."""
    known = sorted(name for name in trt.ComputeCapability.__members__ if name.startswith("SM"))
    config.num_compute_capabilities = len(capabilities)
    for index, capability in enumerate(capabilities):
        member = getattr(trt.ComputeCapability, f"SM{_normalise_capability(capability)}", None)
        if member is None:
            raise ValueError(f"{trt.__name__} cannot target compute capability {capability!r}: known {known}")
        if not config.set_compute_capability(member, index):
            raise RuntimeError(f"{trt.__name__} refused compute capability {capability!r}")


def _load_timing_cache(config: Any, path: Path | None, log: Log) -> Any:
    """Attaches a timing cache to ``config`` (from ``path`` when it exists); returns it."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        # A cache from another GPU or TensorRT version is rejected; start a fresh one instead.
        log(f"timing cache {path} does not match this GPU/TensorRT; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    """Writes the config's (loaded + newly timed) cache atomically."""
    write_bytes_atomic(path, memoryview(config.get_timing_cache().serialize()).tobytes())


def _copy_atomic(source: Path, target: Path) -> None:
    """Copies a file so that readers of ``target`` never see a partial copy."""
    with atomic_output(target) as tmp:
        shutil.copyfile(source, tmp)


def constrain_fp32(trt: ModuleType, network: Any, names: set[str]) -> list[str]:
    """Sets FP32 precision (and FP32 float outputs) on the layers named ``names`` (ONNX node names; the parser
    names a node's layer after it); returns the names it constrained. For weakly typed FP16 builds only."""
    done = []
    floats = (trt.float32, trt.float16)
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.name not in names:
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            if layer.get_output(output).dtype in floats:
                layer.set_output_type(output, trt.float32)
        done.append(layer.name)
    return done


def _build(
    flavour: Flavour, onnx: Path, engine: Path, settings: BuildSettings, flags: frozenset[str], log: Log
) -> tuple[int, int]:
    """Runs the builder and writes the engine; returns the network's layer count and how many layers precision
    constraints hold in FP32."""
    trt = flavour.module
    if trt is None:
        raise TensorRTUnavailable(f"flavour {flavour.name} {flavour.version} has no module to build with")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network_flags = 0
    if flavour.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # Already the default in TensorRT 11 and RTX (flag kept for compatibility); set for clarity.
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(network_flags)
    _parse_onnx(trt, network, onnx, trt_logger)
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [INPUT_NAME]:
        raise RuntimeError(f"{onnx} has inputs {inputs}; edgead engines expect exactly one input {INPUT_NAME!r}")
    shape, onnx_shape = tuple(settings.input_shape), tuple(network.get_input(0).shape)
    if len(onnx_shape) != len(shape) or any(0 <= d != s for d, s in zip(onnx_shape, shape, strict=True)):
        raise ValueError(f"{onnx} has input shape {onnx_shape} (-1 = dynamic); the engine was asked for {shape}")
    if (onnx_shape[0] < 0) != (settings.max_batch is not None):
        raise ValueError(
            f"{onnx} has input shape {onnx_shape}: a dynamic batch needs BuildSettings.max_batch, a fixed one must "
            "not set it"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    for flag in sorted(flags):
        if not hasattr(trt.BuilderFlag, flag):
            raise RuntimeError(f"{flavour.name} {flavour.version} has no BuilderFlag.{flag}")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if settings.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # "fp32" means FP32 math, matching the ONNX reference
    constrained = 0
    if "FP16" in flags and settings.fp32_layers:
        # Weakly typed FP16: keep what the FP16 ONNX keeps in FP32 (normalisation, embeddings, sampler, scoring).
        constrained = len(constrain_fp32(trt, network, set(settings.fp32_layers)))
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log(f"{constrained} layers held in FP32 by precision constraints, the rest may run in FP16")
    if settings.builder_optimization_level is not None:
        config.builder_optimization_level = settings.builder_optimization_level
    if settings.compute_capabilities:
        _apply_compute_capabilities(trt, config, settings.compute_capabilities)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *settings.profile())  # fixed shapes: min = opt = max; else batch 1..max_batch
    config.add_optimization_profile(profile)

    use_timing_cache = settings.timing_cache is not None and flavour.has_timing_cache
    if settings.timing_cache is not None and not use_timing_cache:
        log(f"timing cache {settings.timing_cache} skipped: a no-op in {flavour.name} {flavour.version}")
    if use_timing_cache:
        _load_timing_cache(config, settings.timing_cache, log)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{flavour.name} {flavour.version} failed to build an engine from {onnx} (see log above)")
    with atomic_output(engine) as tmp:
        tmp.write_bytes(memoryview(serialized))
    if use_timing_cache:
        _save_timing_cache(config, settings.timing_cache)
    return int(network.num_layers), constrained


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    settings: BuildSettings,
    flavour: Flavour | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Log = print,
    fp16_onnx_path: str | os.PathLike[str] | None = None,
    int8_onnx_path: str | os.PathLike[str] | None = None,
) -> EngineInfo:
    """Builds (or copies from the engine cache) a fixed-shape engine for the ``image`` input.

    Args:
        onnx_path: The FP32 ONNX export.
        engine_path: Where to write the engine (atomically).
        settings: Precision, shape, workspace, timing cache, RTX targets.
        flavour: Flavour to build with; None detects one.
        cache_dir: Engine cache: ``<cache_dir>/<key>.engine`` is copied instead of building and filled after.
        log: Receives progress lines.
        fp16_onnx_path: The FP16 ONNX; None uses ``<stem>.fp16.onnx`` beside ``onnx_path`` if it exists.
        int8_onnx_path: The INT8 QDQ ONNX; None uses ``<stem>.int8.onnx`` beside ``onnx_path`` if it exists.

    Returns:
        What was built.

    Raises:
        TensorRTUnavailable: No flavour installed.
        FileNotFoundError: A needed ONNX is missing.
        RuntimeError: Parsing or building failed (parser errors are listed).
    """
    flavour = flavour or detect_flavour()
    fp32_onnx, engine_path = Path(onnx_path), Path(engine_path)
    if fp16_onnx_path is None:
        sibling = fp32_onnx.with_name(f"{fp32_onnx.stem}.fp16.onnx")
        fp16_onnx = sibling if sibling.is_file() else None
    else:
        fp16_onnx = Path(fp16_onnx_path)
    if int8_onnx_path is None:
        sibling = fp32_onnx.with_name(f"{fp32_onnx.stem}.int8.onnx")
        int8_onnx = sibling if sibling.is_file() else None
    else:
        int8_onnx = Path(int8_onnx_path)
    onnx, flags = choose_onnx_for(flavour, settings.precision, fp32_onnx, fp16_onnx, int8_onnx)
    if not onnx.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx}")
    gpu_name, capability = _target(flavour, settings)
    extra = {"workspace_mb": settings.workspace_mb, "opt_level": settings.builder_optimization_level}
    if "FP16" in flags and settings.fp32_layers:
        extra["fp32_layers"] = hashlib.sha256("\n".join(sorted(settings.fp32_layers)).encode()).hexdigest()
    if settings.max_batch is not None:
        extra["profile"] = [list(shape) for shape in settings.profile()]
    key = engine_cache_key(
        file_sha256(onnx), flavour, gpu_name, capability, settings.precision, settings.input_shape, extra
    )
    cached = Path(cache_dir) / f"{key}.engine" if cache_dir is not None else None
    started = time.perf_counter()
    if cached is not None and cached.is_file() and cached.stat().st_size > 0:
        _copy_atomic(cached, engine_path)
        sidecar = cached.with_suffix(".json")
        recorded = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        layers, constrained = int(recorded.get("layers", -1)), int(recorded.get("fp32_constrained_layers", 0))
        cache_hit = True
        log(f"engine cache hit {cached.name} -> {engine_path.name}")
    else:
        targets = f" for compute capabilities {capability}" if flavour.can_build_without_gpu else f" for {gpu_name}"
        log(f"building {settings.precision} engine with {flavour.name} {flavour.version}{targets} from {onnx.name}")
        layers, constrained = _build(flavour, onnx, engine_path, settings, flags, log)
        cache_hit = False
    seconds = time.perf_counter() - started
    info = EngineInfo(
        engine_path=engine_path,
        sha256=file_sha256(engine_path),
        flavour=flavour.name,
        flavour_version=flavour.version,
        precision=settings.precision,
        onnx_path=onnx,
        build_seconds=seconds,
        cache_hit=cache_hit,
        key=key,
        input_shape=tuple(settings.input_shape),
        layers=layers,
        size_bytes=engine_path.stat().st_size,
        builder_flags=tuple(sorted(flags)),
        compute_capabilities=settings.compute_capabilities,
        profile=settings.profile(),
        fp32_constrained_layers=constrained,
    )
    if cached is not None and not cache_hit:
        _copy_atomic(engine_path, cached)
        # File names only: the build ran in an export's staging folder, whose path means nothing later.
        record = {**info.to_dict(), "engine_path": engine_path.name, "onnx_path": onnx.name}
        write_json_atomic(cached.with_suffix(".json"), record)
    log(f"engine {engine_path.name} ({info.size_bytes / 1e6:.2f} MB, {layers} layers) in {seconds:.2f} s")
    return info
