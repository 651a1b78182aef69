"""TensorRT engine builds: flavour logic as pure functions, and real CPU-only builds with TensorRT-RTX."""

from __future__ import annotations

import json
import re
import stat
import sys
import types
import warnings
from pathlib import Path

import pytest

from edgead.export.tensorrt import (
    BuildSettings,
    Flavour,
    TensorRTUnavailable,
    _load_timing_cache,
    _save_timing_cache,
    build_engine,
    choose_onnx_for,
    detect_flavour,
    engine_cache_key,
    file_sha256,
    gpu_identity,
)

SHAPE = (1, 3, 32, 32)
TRT10 = Flavour("tensorrt", "10.3.0", 10)
TRT11 = Flavour("tensorrt", "11.0.0", 11)
RTX = Flavour("tensorrt_rtx", "1.7.1.116", 1)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.onnx`` and ``model.fp16.onnx`` (FP16 inside, FP32 IO via Casts) of a tiny detector-shaped net."""
    torch = pytest.importorskip("torch")
    nn, functional = torch.nn, torch.nn.functional

    class Tiny(nn.Module):
        def __init__(self, half: bool) -> None:
            super().__init__()
            self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 1, 1)
            self.half_inside = half

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.half_inside:
                x = x.half()
            amap = functional.avg_pool2d(self.head(functional.silu(self.norm(self.conv(x)))), 2)[:, 0]
            score = torch.amax(amap.flatten(1), dim=1)
            return (amap.float(), score.float()) if self.half_inside else (amap, score)

    folder = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    fp32 = Tiny(half=False).eval()
    fp16 = Tiny(half=True).eval()
    fp16.load_state_dict(fp32.state_dict())
    for module in (fp16.conv, fp16.norm, fp16.head):
        module.half()
    example = (torch.randn(SHAPE),)
    names = {"input_names": ["image"], "output_names": ["anomaly_map", "score"], "opset_version": 18}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(fp32, example, str(folder / "model.onnx"), dynamo=False, **names)
        torch.onnx.export(fp16, example, str(folder / "model.fp16.onnx"), dynamo=False, **names)
        dynamic = {"image": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}}
        torch.onnx.export(fp32, example, str(folder / "model.batched.onnx"), dynamo=False, dynamic_axes=dynamic,
                          **names)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def rtx() -> Flavour:
    pytest.importorskip("tensorrt_rtx")
    return detect_flavour("tensorrt_rtx")


# ---------------------------------------------------------------------------- pure flavour logic


@pytest.mark.parametrize(
    ("flavour", "strongly_typed", "without_gpu", "timing_cache"),
    [(TRT10, False, False, True), (TRT11, True, False, True), (RTX, True, True, False)],
)
def test_flavour_properties(flavour: Flavour, strongly_typed: bool, without_gpu: bool, timing_cache: bool) -> None:
    assert flavour.strongly_typed is strongly_typed
    assert flavour.fp16_from_onnx is strongly_typed
    assert flavour.can_build_without_gpu is without_gpu
    assert flavour.has_timing_cache is timing_cache


def test_flavour_identity_ignores_module() -> None:
    a = Flavour("tensorrt", "10.3.0", 10, module=types.ModuleType("a"))
    b = Flavour("tensorrt", "10.3.0", 10, module=types.ModuleType("b"))
    assert a == b and hash(a) == hash(b) and "module" not in repr(a)


@pytest.mark.parametrize(
    ("flavour", "precision", "expected_onnx", "flags"),
    [
        (TRT10, "fp32", "model.onnx", frozenset()),
        (TRT10, "fp16", "model.onnx", frozenset({"FP16"})),
        (TRT11, "fp32", "model.onnx", frozenset()),
        (TRT11, "fp16", "model.fp16.onnx", frozenset()),
        (RTX, "fp32", "model.onnx", frozenset()),
        (RTX, "fp16", "model.fp16.onnx", frozenset()),
    ],
)
def test_choose_onnx_truth_table(flavour: Flavour, precision: str, expected_onnx: str, flags: frozenset[str]) -> None:
    onnx, chosen_flags = choose_onnx_for(flavour, precision, Path("model.onnx"), Path("model.fp16.onnx"))
    assert (onnx, chosen_flags) == (Path(expected_onnx), flags)


def test_choose_onnx_fp16_needs_fp16_export_when_strongly_typed() -> None:
    for flavour in (TRT11, RTX):
        with pytest.raises(FileNotFoundError, match="--precision fp16"):
            choose_onnx_for(flavour, "fp16", Path("model.onnx"), None)
    # TensorRT 10 builds FP16 from the FP32 ONNX, so a missing FP16 export is fine there.
    assert choose_onnx_for(TRT10, "fp16", Path("model.onnx"), None) == (Path("model.onnx"), frozenset({"FP16"}))
    with pytest.raises(ValueError, match="precision"):
        choose_onnx_for(RTX, "int4", Path("model.onnx"), None)


def test_engine_cache_key_changes_with_every_field() -> None:
    base = ("ab" * 32, TRT10, "Orin", "8.7", "fp16", SHAPE)
    key = engine_cache_key(*base)
    assert key == engine_cache_key(*base) and re.fullmatch("[0-9a-f]{64}", key)
    variants = [
        ("cd" * 32, *base[1:]),
        (base[0], Flavour("tensorrt", "10.4.0", 10), *base[2:]),
        (base[0], Flavour("tensorrt_rtx", "10.3.0", 10), *base[2:]),
        (*base[:2], "RTX 3090", *base[3:]),
        (*base[:3], "8.6", *base[4:]),
        (*base[:4], "fp32", base[5]),
        (*base[:5], (1, 3, 64, 64)),
    ]
    keys = {engine_cache_key(*v) for v in variants} | {engine_cache_key(*base, extra={"opt_level": 5})}
    assert len(keys) == len(variants) + 1 and key not in keys


def test_build_settings_validate() -> None:
    with pytest.raises(ValueError, match="precision"):
        BuildSettings("fp8", SHAPE)
    with pytest.raises(ValueError, match="input_shape"):
        BuildSettings("fp32", (1, 3, 0, 32))
    assert BuildSettings("fp16", [1, 3, 32, 32]).input_shape == SHAPE  # type: ignore[arg-type]
    assert BuildSettings("fp32", SHAPE).profile() == (SHAPE, SHAPE, SHAPE)
    assert BuildSettings("fp32", (8, 3, 32, 32), max_batch=8).profile() == (
        (1, 3, 32, 32),
        (8, 3, 32, 32),
        (8, 3, 32, 32),
    )
    with pytest.raises(ValueError, match="max_batch 8 must equal"):
        BuildSettings("fp32", SHAPE, max_batch=8)


# ---------------------------------------------------------------------------- flavour detection and GPU identity


def test_detect_flavour_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(TensorRTUnavailable, match=r"install `edgead\[trt\]`.*tensorrt-rtx-cu13.*ONNX export works"):
        detect_flavour("tensorrt")
    with pytest.raises(ValueError, match="unknown TensorRT flavour"):
        detect_flavour("openvino")


def test_detect_flavour_treats_stub_package_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = types.ModuleType("tensorrt")  # PyPI's stub: importable, but no Builder
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    with pytest.raises(TensorRTUnavailable, match="no Builder"):
        detect_flavour("tensorrt")
    pytest.importorskip("tensorrt_rtx")
    flavour = detect_flavour()  # falls through to the RTX flavour
    assert flavour.name == "tensorrt_rtx" and flavour.major >= 1 and flavour.module is not None


def test_gpu_identity_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_identity() == ("none", "none")
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "NVIDIA GeForce RTX 3090, 8.6"\n')
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    assert gpu_identity() == ("NVIDIA GeForce RTX 3090", "8.6")


# ---------------------------------------------------------------------------- real builds (TensorRT-RTX, CPU only)


def test_rtx_builds_fp32_and_fp16_without_gpu(rtx: Flavour, onnx_models: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    infos = {}
    for precision in ("fp32", "fp16"):
        engine = tmp_path / f"model.{precision}.engine"
        infos[precision] = build_engine(
            onnx_models / "model.onnx", engine, BuildSettings(precision, SHAPE), flavour=rtx, log=lines.append
        )
        info = infos[precision]
        assert engine.stat().st_size > 0 and info.size_bytes == engine.stat().st_size
        assert info.sha256 == file_sha256(engine)
        assert (info.flavour, info.flavour_version, info.precision) == ("tensorrt_rtx", rtx.version, precision)
        assert info.cache_hit is False and info.layers > 0 and info.builder_flags == ()
        assert info.input_shape == SHAPE and len(info.key) == 64 and info.build_seconds > 0
    assert infos["fp32"].onnx_path.name == "model.onnx"
    assert infos["fp16"].onnx_path.name == "model.fp16.onnx"  # strongly typed: the FP16 export is used
    assert infos["fp16"].layers > infos["fp32"].layers  # the FP16 graph's IO Casts are layers too
    assert infos["fp16"].key != infos["fp32"].key
    assert any("MB" in line and " s" in line for line in lines), lines


class _NoBuilder(types.ModuleType):
    """A flavour module that fails loudly if a cache hit touches the builder."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the builder was used on a cache hit ({name})")


def test_engine_cache_hit_skips_the_builder(rtx: Flavour, onnx_models: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    settings = BuildSettings("fp16", SHAPE)
    first = build_engine(onnx_models / "model.onnx", tmp_path / "a.engine", settings, flavour=rtx, cache_dir=cache)
    assert (cache / f"{first.key}.engine").is_file()
    assert json.loads((cache / f"{first.key}.json").read_text())["layers"] == first.layers

    offline = Flavour(rtx.name, rtx.version, rtx.major, module=_NoBuilder("tensorrt_rtx"))
    second = build_engine(onnx_models / "model.onnx", tmp_path / "b.engine", settings, flavour=offline, cache_dir=cache)
    assert second.cache_hit is True and second.key == first.key
    assert second.sha256 == first.sha256 and second.layers == first.layers

    with pytest.raises(AssertionError, match="builder was used"):  # another precision is another engine
        build_engine(onnx_models / "model.onnx", tmp_path / "c.engine", BuildSettings("fp32", SHAPE), offline, cache)


def test_rtx_compute_capability_targets(rtx: Flavour, onnx_models: Path, tmp_path: Path) -> None:
    default = build_engine(onnx_models / "model.onnx", tmp_path / "d.engine", BuildSettings("fp32", SHAPE), rtx)
    targeted = BuildSettings("fp32", SHAPE, compute_capabilities=("7.5", "8.6"))
    info = build_engine(onnx_models / "model.onnx", tmp_path / "t.engine", targeted, rtx)
    assert info.compute_capabilities == ("7.5", "8.6") and info.key != default.key
    unknown = BuildSettings("fp32", SHAPE, compute_capabilities=("9.9",))
    with pytest.raises(ValueError, match="SM86"):  # the message lists the known targets
        build_engine(onnx_models / "model.onnx", tmp_path / "x.engine", unknown, rtx)
    with pytest.raises(ValueError, match="only applies to TensorRT-RTX"):
        build_engine(onnx_models / "model.onnx", tmp_path / "y.engine", targeted, TRT10)


def test_timing_cache(rtx: Flavour, onnx_models: Path, tmp_path: Path) -> None:
    cache_file = tmp_path / "timing.cache"
    lines: list[str] = []
    settings = BuildSettings("fp32", SHAPE, timing_cache=cache_file)
    build_engine(onnx_models / "model.onnx", tmp_path / "m.engine", settings, flavour=rtx, log=lines.append)
    assert not cache_file.exists() and any("no-op" in line for line in lines)  # RTX deprecated the cache
    # The TensorRT 10/11 load/save helpers, against real builder-config bindings (same API in RTX).
    trt = rtx.module
    assert trt is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
        _load_timing_cache(config, cache_file, lines.append)  # missing file: fresh cache
        _save_timing_cache(config, cache_file)
        assert cache_file.stat().st_size > 0
        _load_timing_cache(config, cache_file, lines.append)  # existing file: loaded
    assert not list(tmp_path.glob(".timing.cache.*")), "atomic write left a temporary file"


def test_corrupt_onnx_lists_parser_errors(rtx: Flavour, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07 this is not a protobuf" * 20)
    engine = tmp_path / "broken.engine"
    with pytest.raises(RuntimeError, match=r"broken\.onnx \(1 error\(s\)\):\n  \[0\] .*parse"):
        build_engine(broken, engine, BuildSettings("fp32", SHAPE), flavour=rtx)
    assert not engine.exists()


def test_shape_mismatch_is_explained(rtx: Flavour, onnx_models: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\(1, 3, 32, 32\).*\(1, 3, 64, 64\)"):
        build_engine(onnx_models / "model.onnx", tmp_path / "s.engine", BuildSettings("fp32", (1, 3, 64, 64)), rtx)


def test_dynamic_batch_builds_one_profile_up_to_max_batch(rtx: Flavour, onnx_models: Path, tmp_path: Path) -> None:
    """A batch-dynamic ONNX (what Triton's tensorrt_plan models need) builds with a 1..max_batch profile; the
    engine records it; a fixed engine cannot be built from it by mistake, nor a profile from a fixed ONNX."""
    settings = BuildSettings("fp32", (4, 3, 32, 32), max_batch=4)
    engine = tmp_path / "batched.engine"
    info = build_engine(onnx_models / "model.batched.onnx", engine, settings, flavour=rtx)
    fixed = build_engine(onnx_models / "model.onnx", tmp_path / "fixed.engine", BuildSettings("fp32", SHAPE), rtx)
    assert engine.stat().st_size > 0 and info.key != fixed.key
    assert info.profile == ((1, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32))
    assert fixed.profile == (SHAPE, SHAPE, SHAPE)
    with pytest.raises(ValueError, match="dynamic batch needs BuildSettings.max_batch"):
        build_engine(onnx_models / "model.batched.onnx", tmp_path / "x.engine", BuildSettings("fp32", SHAPE), rtx)
    with pytest.raises(ValueError, match="fixed one must not set it"):
        build_engine(onnx_models / "model.onnx", tmp_path / "y.engine", BuildSettings("fp32", SHAPE, max_batch=1), rtx)


def test_missing_onnx_is_named(rtx: Flavour, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        build_engine(tmp_path / "absent.onnx", tmp_path / "a.engine", BuildSettings("fp32", SHAPE), flavour=rtx)
    with pytest.raises(FileNotFoundError, match="--precision fp16"):
        build_engine(tmp_path / "absent.onnx", tmp_path / "a.engine", BuildSettings("fp16", SHAPE), flavour=rtx)
