"""``edgead export``: run dir -> ONNX (+ FP16 ONNX) -> parity -> threshold -> optional engine -> export dir.

One table of formats drives the checks (as in the ultralytics exporter); each step logs its time and
file size. Everything is written into a staging folder first and moved into place only when every
check passed, ``edgead.json`` last, so a failed export never damages the previous one.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgead.config import RunConfig
from edgead.data.io import read_image
from edgead.data.mvtec import list_test, list_train
from edgead.data.preprocess import PreprocessConfig, preprocess, resize_image
from edgead.data.pseudo import make_pseudo_anomaly_set
from edgead.export.calibration import DEFAULT_FALSE_ALARM_RATE, pseudo_anomaly_check, threshold_from_normal_scores
from edgead.export.fp16 import mixed_precision_graph
from edgead.export.metadata import build_metadata
from edgead.export.onnx import ExportError, export_onnx
from edgead.export.parity import FP32_SCORE_RTOL, compare, fp32_envelope
from edgead.methods import get_method
from edgead.methods.base import run_graph
from edgead.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgead.runtime.metadata import artifact_record, write_metadata

#: name -> (file suffix, needs TensorRT)
FORMATS: dict[str, tuple[str, bool]] = {"onnx": (".onnx", False), "tensorrt": (".engine", True)}
PRECISIONS = ("fp32", "fp16")
FP32_NAME, FP16_NAME = "model.onnx", "model.fp16.onnx"


@dataclass
class ExportOptions:
    precision: str = "fp32"
    format: str = "onnx"
    batch: int = 1
    image_size: int | None = None
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
    data: Path | None = None
    max_eval_images: int = 200
    trt_flavour: str | None = None
    workspace_mb: int = 1024
    compute_capabilities: tuple[str, ...] | None = None
    engine_cache: Path | None = None

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")


#: Images (those where PyTorch and ONNX Runtime disagree most) evaluated in float64 when FP32 parity trips.
FP64_CHECK_IMAGES = 16


def _held_out_images(config: RunConfig, data: Path | None) -> tuple[list[np.ndarray], str]:
    """Normal RGB images not used for training: the run's validation split, else ``--data``'s normals."""
    paths = [Path(p) for p in config.data.get("validation_paths", []) if Path(p).is_file()]
    source = "held-out normal training images"
    if not paths and data is not None:
        paths = [s.path for s in (list_test(data) if (Path(data) / "test").is_dir() else [])
                 if s.label == 0] or [s.path for s in list_train(data)]
        source = f"normal images of {Path(data).name}"
    if not paths:
        raise ValueError(
            "no held-out normal images to calibrate the threshold and check parity: the run's validation images "
            "are gone; pass --data DIR (an MVTec-layout root or a folder of normal images)"
        )
    return [read_image(p) for p in paths], source


def _run_onnx(path: Path, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    backend = OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"])
    maps, scores = [], []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)]) if len(chunk) < batch \
            else chunk
        out = backend.infer(padded)
        maps.append(out["anomaly_map"][: len(chunk)])
        scores.append(out["score"][: len(chunk)])
    return np.concatenate(maps), np.concatenate(scores)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from edgead.evaluate import image_auroc

    return float(image_auroc(labels, scores)) if 0 < labels.sum() < len(labels) else None


def _move_into_place(staging: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    for name in [n for n in names if n != "edgead.json"] + ["edgead.json"]:
        os.replace(staging / name, out_dir / name)


def export_run(
    run_dir: Path, out_dir: Path, options: ExportOptions, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Export the run in ``run_dir`` into ``out_dir``; returns the metadata written to ``edgead.json``."""
    options.validate()
    config = copy.deepcopy(RunConfig.load(run_dir))
    if options.image_size:
        config.preprocess["image_size"] = options.image_size
    method = get_method(config.method).load(Path(run_dir), config)
    pre = PreprocessConfig.from_dict(config.preprocess)
    graph = method.build_graph().float().eval()
    input_shape = (options.batch, pre.channels, pre.image_size, pre.image_size)

    normal_rgb, normal_source = _held_out_images(config, options.data)
    normal = np.stack([preprocess(img, pre) for img in normal_rgb])
    pseudo_rgb, _ = make_pseudo_anomaly_set(
        [resize_image(img, pre.image_size, pre.interpolation) for img in normal_rgb], n=len(normal_rgb), seed=0
    ) if len(normal_rgb) >= 2 else ([], [])
    pseudo = np.stack([preprocess(img, pre) for img in pseudo_rgb]) if pseudo_rgb else None
    test_images = test_labels = None
    if options.data is not None and (Path(options.data) / "test").is_dir():
        samples = list_test(options.data)
        step = max(1, len(samples) // options.max_eval_images)
        samples = samples[::step]
        test_images = np.stack([preprocess(read_image(s.path), pre) for s in samples])
        test_labels = np.array([s.label for s in samples])

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        log(f"tracing {config.method} graph {tuple(input_shape)} to ONNX ...")
        artifacts: dict[str, Any] = {}
        onnx_info = export_onnx(graph, staging / FP32_NAME, input_shape)
        log(f"  {FP32_NAME}: {onnx_info['nodes']} nodes, {onnx_info['bytes'] / 1e6:.2f} MB, {onnx_info['seconds']} s")
        artifacts["onnx"] = artifact_record(staging, FP32_NAME, precision="fp32", opset=onnx_info["opset"],
                                            nodes=onnx_info["nodes"])

        sets = {"normal": normal, **({"pseudo": pseudo} if pseudo is not None else {}),
                **({"test": test_images} if test_images is not None else {})}
        ref = {name: run_graph(graph, images, batch_size=8) for name, images in sets.items()}
        threshold = threshold_from_normal_scores(ref["normal"][1], options.false_alarm_rate)
        threshold["source"] = normal_source
        if "pseudo" in ref:
            threshold["pseudo_anomalies"] = pseudo_anomaly_check(ref["normal"][1], ref["pseudo"][1], threshold["value"])
        log(f"  threshold {threshold['value']:.6g} ({threshold['method']}, {threshold['n_normal']} images, "
            f"target false-alarm rate {options.false_alarm_rate:.1%})")

        parity: dict[str, Any] = {}
        all_images = np.concatenate(list(sets.values()))
        ref_maps = np.concatenate([ref[n][0] for n in sets])
        ref_scores = np.concatenate([ref[n][1] for n in sets])
        ort_maps, ort_scores = _run_onnx(staging / FP32_NAME, all_images, options.batch)
        parity["torch_vs_onnxruntime_fp32"] = compare(ref_maps, ref_scores, ort_maps, ort_scores, threshold["value"])
        worst = parity["torch_vs_onnxruntime_fp32"]["score_max_rel_error"]
        log(f"  parity torch vs ONNX Runtime (FP32): score rel. error {worst:.2e}, "
            f"flips {parity['torch_vs_onnxruntime_fp32']['decision_flips']}")
        if worst > FP32_SCORE_RTOL:
            # Either a broken export, or a graph whose FP32 result is itself this inexact: decide with float64
            # on the images where the two disagree most (float64 convolutions are slow on a CPU).
            rel = np.abs(ref_scores - ort_scores) / np.maximum(np.abs(ref_scores), 1e-12)
            worst_images = np.argsort(rel)[-FP64_CHECK_IMAGES:]
            _, f64_scores = run_graph(copy.deepcopy(graph).double(), all_images[worst_images].astype(np.float64),
                                      batch_size=8)
            envelope = fp32_envelope(ref_scores[worst_images], ort_scores[worst_images], f64_scores)
            envelope["n_images"] = len(worst_images)
            parity["fp32_conditioning"] = envelope
            log(f"  PyTorch FP32 itself is {envelope['torch_fp32_vs_float64']:.2e} from float64, ONNX Runtime "
                f"{envelope['export_vs_float64']:.2e} (allowed {envelope['allowed']:.2e})")
            if not envelope["within"]:
                raise ExportError(
                    f"FP32 ONNX disagrees with PyTorch: score relative error {worst:.3e} > {FP32_SCORE_RTOL:g}, and "
                    f"{envelope['export_vs_float64']:.3e} from a float64 evaluation where PyTorch FP32 is "
                    f"{envelope['torch_fp32_vs_float64']:.3e}; the export is not written"
                )

        if options.precision == "fp16":
            half = mixed_precision_graph(graph)
            fp16_info = export_onnx(half, staging / FP16_NAME, input_shape)
            log(f"  {FP16_NAME}: {fp16_info['nodes']} nodes, {fp16_info['bytes'] / 1e6:.2f} MB")
            artifacts["onnx_fp16"] = artifact_record(staging, FP16_NAME, precision="fp16", opset=fp16_info["opset"],
                                                     nodes=fp16_info["nodes"],
                                                     fp32_parts="normalisation, embeddings, error reduction, pooling")
            h_maps, h_scores = _run_onnx(staging / FP16_NAME, all_images, options.batch)
            parity["fp32_vs_onnxruntime_fp16"] = compare(ref_maps, ref_scores, h_maps, h_scores, threshold["value"])
            log(f"  parity FP32 vs FP16 ONNX: score rel. error "
                f"{parity['fp32_vs_onnxruntime_fp16']['score_max_rel_error']:.2e}, "
                f"flips {parity['fp32_vs_onnxruntime_fp16']['decision_flips']}")
            if test_images is not None:
                n = len(test_images)
                parity["test_image_auroc"] = {"fp32": _auroc(test_labels, ref_scores[-n:]),
                                              "fp16": _auroc(test_labels, h_scores[-n:]), "n_images": n}

        if FORMATS[options.format][1]:
            from edgead.export.tensorrt import BuildSettings, build_engine, detect_flavour

            flavour = detect_flavour(options.trt_flavour)
            engine_name = f"model.{options.precision}.engine"
            settings = BuildSettings(precision=options.precision, input_shape=input_shape,
                                     workspace_mb=options.workspace_mb,
                                     timing_cache=(options.engine_cache / "timing.cache") if options.engine_cache
                                     else None, compute_capabilities=options.compute_capabilities)
            info = build_engine(staging / FP32_NAME, staging / engine_name, settings, flavour=flavour,
                                cache_dir=options.engine_cache, log=lambda line: log(f"  {line}"),
                                fp16_onnx_path=(staging / FP16_NAME) if options.precision == "fp16" else None)
            artifacts["engines"] = [artifact_record(
                staging, engine_name, precision=options.precision, flavour=info.flavour,
                flavour_version=info.flavour_version, key=info.key, built_from=info.onnx_path.name,
                builder_flags=list(info.builder_flags), layers=info.layers,
                compute_capabilities=list(info.compute_capabilities or []),
                build_seconds=round(info.build_seconds, 2),
            )]

        params = dict(config.method_params)
        meta = build_metadata(
            method=config.method, run_dir=str(Path(run_dir).resolve()), preprocess=pre.to_dict(),
            method_params=params, model=config.model, input_shape=input_shape,
            map_shape=(options.batch, *ref_maps.shape[1:]), threshold=threshold, artifacts=artifacts,
            parity=parity, noise={"mode": "fixed seeded buffer in the graph", "seed": params.get("noise_seed")},
        )
        write_metadata(staging, meta)
        _move_into_place(staging, Path(out_dir))
        log(f"export written to {out_dir}")
        return meta
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["FORMATS", "ExportError", "ExportOptions", "export_run"]
