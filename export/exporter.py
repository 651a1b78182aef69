"""``edgead export``: run dir -> ONNX (+ FP16 ONNX) -> parity -> threshold -> optional engine -> export dir.

Export knows no particular method or network: it loads the run's method through the registry, asks it for
its inference graph, and reads what the graph declares (``fp16_modules``, ``export_notes``). The work is a
sequence of named steps (as in the ultralytics exporter's ``try_export``), each logged with its time and the
size of what it wrote, and recorded in ``edgead.json``. Everything is written into a staging folder first
and switched in as a whole only when every check passed (``edgead.export.publish``: versioned folders, one
atomic link switch, a lock), so a failed or killed export never damages the previous one.
"""

from __future__ import annotations

import copy
import errno
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgead import __version__
from edgead.config import RunConfig
from edgead.data import holdout
from edgead.data.io import read_image
from edgead.data.mvtec import list_test
from edgead.data.preprocess import PreprocessConfig, check_image_size, preprocess, resize_image
from edgead.data.pseudo import pseudo_validation_set
from edgead.export.calibration import (
    DEFAULT_FALSE_ALARM_RATE,
    calibration_normals,
    pseudo_anomaly_check,
    threshold_from_normal_scores,
)
from edgead.export.fp16 import fp32_node_names, mixed_precision_graph
from edgead.export.onnx import ExportError, export_onnx
from edgead.export.publish import PublishError, check_target, export_lock, publish, start_version
from edgead.methods import get_method
from edgead.methods.base import run_graph
from edgead.methods.tiling import frame_size
from edgead.runtime.backends.base import INPUT_NAME, OUTPUT_NAMES
from edgead.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgead.runtime.drift import normal_quantiles
from edgead.runtime.machine import module_version
from edgead.runtime.metadata import PRECISIONS, ExportMetadata, artifact_record
from edgead.runtime.parity import FP32_SCORE_RTOL, compare, fp32_envelope, judge, relative_errors, tolerances
from edgead.runtime.verify import compare as verify_compare
from edgead.runtime.verify import polygraphy_compare, reference_for, run_batches

FP32_NAME, FP16_NAME, INT8_NAME = "model.onnx", "model.fp16.onnx", "model.int8.onnx"
#: --format triton: the same graphs with a dynamic batch dimension (1..--max-batch) for Triton's batching.
BATCHED_NAME, BATCHED_FP16_NAME = "model.batched.onnx", "model.batched.fp16.onnx"
DEFAULT_TRITON_MAX_BATCH = 8
#: Fewer held-out normal images than this make the calibrated threshold a rough estimate (export warns).
MIN_CALIBRATION_IMAGES = 20
#: The verification set and its reference outputs (edgead verify), and how many images of each kind it holds.
GOLDEN_NAME, GOLDEN_PER_SET = "verification.npz", 4
#: Write errors that stop an export with a plain message (the previous version stays): full disk or quota, a
#: file too large, a file system that turned read-only.
_NO_ROOM = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG, errno.EROFS)
#: Images (those where PyTorch and ONNX Runtime disagree most) evaluated in float64 when FP32 parity trips.
FP64_CHECK_IMAGES = 16


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
    triton_raw_input: bool = False
    triton_max_batch: int = DEFAULT_TRITON_MAX_BATCH
    #: Further trained runs fused with the exported one into one graph (``edgead.methods.fusion``), and how.
    fuse: tuple[Path, ...] = ()
    fuse_how: str = "auto"
    #: ``--precision int8``: write the INT8 graph even where it fails the gate against FP32 (the failures are
    #: printed and recorded in ``edgead.json``; the user chose the loss).
    accept_int8_loss: bool = False

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision not in FORMATS[self.format].precisions:
            allowed = ", ".join(FORMATS[self.format].precisions)
            raise ValueError(f"--format {self.format} is made at precision {allowed}, not {self.precision!r}")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")
        if self.triton_raw_input and self.format != "triton":
            raise ValueError("--triton-raw-input needs --format triton")
        if self.triton_max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.triton_max_batch}")
        if self.triton_max_batch != DEFAULT_TRITON_MAX_BATCH and self.format != "triton":
            raise ValueError("--max-batch sizes the Triton models' batch: it needs --format triton")
        if self.fuse_how not in ("auto", "mean", "max"):
            raise ValueError(f"--fuse-how must be auto, mean or max, got {self.fuse_how!r}")
        if self.image_size is not None:
            check_image_size(self.image_size, "--image-size")
        if self.accept_int8_loss and self.precision != "int8":
            raise ValueError("--accept-int8-loss goes with --precision int8")
        if self.fuse and self.image_size is not None:
            raise ValueError("--fuse keeps the runs' own input size: leave out --image-size")


@dataclass
class ExportJob:
    """What the steps share: the inputs, and what each step produced for the next."""

    run_dir: Path
    out_dir: Path
    options: ExportOptions
    log: Callable[[str], None]
    staging: Path = Path()
    config: RunConfig | None = None
    pre: PreprocessConfig | None = None
    graph: torch.nn.Module | None = None
    input_shape: tuple[int, ...] = ()
    sets: dict[str, np.ndarray] = field(default_factory=dict)  # "normal", "pseudo", "test": preprocessed images
    normal_source: str = ""
    test_labels: np.ndarray | None = None
    ref: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # PyTorch FP32 maps, scores
    golden: dict[str, np.ndarray] = field(default_factory=dict)  # verification.npz's arrays
    threshold: dict[str, Any] = field(default_factory=dict)
    fusion: dict[str, Any] | None = None  # how the fused graph was made (--fuse)
    parity: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    total_steps: int = 0  # for the [k/N] progress of the log

    @property
    def all_images(self) -> np.ndarray:
        return np.concatenate(list(self.sets.values()))

    @property
    def ref_maps(self) -> np.ndarray:
        return np.concatenate([self.ref[name][0] for name in self.sets])

    @property
    def ref_scores(self) -> np.ndarray:
        return np.concatenate([self.ref[name][1] for name in self.sets])


Step = Callable[[ExportJob], list[Path] | None]


def run_step(job: ExportJob, name: str, step: Step) -> None:
    """Run one step; log ``[k/N] name: seconds, files (size)`` (the export's progress) and record its time and
    the size of the files it wrote."""
    start = time.perf_counter()
    written = step(job) or []
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in written if p.is_file())
    files = ", ".join(p.name for p in written)
    counter = f"[{len(job.steps) + 1}/{job.total_steps}] " if job.total_steps else ""
    job.log(f"{counter}{name}: {seconds:.1f} s" + (f", {files} ({size / 1e6:.2f} MB)" if written else ""))
    job.steps.append({"step": name, "seconds": round(seconds, 2), "files": [p.name for p in written], "bytes": size})


# ----------------------------------------------------------------------------------------------------- steps
def load_graph(job: ExportJob) -> None:
    """The run's method, rebuilt through the registry, and its inference graph in FP32."""
    config = copy.deepcopy(RunConfig.load(job.run_dir))
    if job.options.image_size is not None and config.tiling:
        height, width = frame_size(config.tiling)
        raise ValueError(
            f"{job.run_dir}: a tiled run's graph takes its frame size ({width}x{height}); leave out --image-size"
        )
    if job.options.image_size is not None:
        config.preprocess["image_size"] = job.options.image_size
    method = get_method(config.method).load(job.run_dir, config)
    job.config, job.pre = config, method.frame_preprocess_config
    job.graph = method.inference_graph().float().eval()
    if job.options.fuse:
        from edgead.methods.fusion import fuse_runs

        fused, job.fusion = fuse_runs([job.run_dir, *job.options.fuse], job.options.fuse_how)
        job.graph = fused.float().eval()
        job.log(f"  fused with {len(job.options.fuse)} run(s): {job.fusion['how']}")
    job.input_shape = (job.options.batch, job.pre.channels, *job.pre.size)


def _held_out_normals(job: ExportJob) -> tuple[list[np.ndarray], str]:
    """Normal RGB images not used for training: those the run holds out (``edgead.data.holdout.held_out_normals``,
    the one place that finds them), else ``--data``'s normals."""
    rgb, origin = holdout.held_out_normals(job.run_dir, job.config.data)
    if origin == holdout.STORED:
        record = job.config.data["holdout"]
        stored = (record.get("image_size"), record.get("image_width") or record.get("image_size"))
        resized = f", resized from the stored {stored[1]}x{stored[0]}" if stored != job.pre.size else ""
        return rgb, f"held-out normal training images stored in the run{resized}"
    if origin == holdout.DATASET:
        return rgb, "held-out normal training images (read from the dataset)"
    data = job.options.data
    if data is not None:  # an MVTec-layout root or a folder of normal images (calibration_normals says which)
        paths, description = calibration_normals(data)
        return [read_image(p) for p in paths], description
    raise ValueError(
        f"{job.run_dir}: the run holds no held-out normal images to calibrate the threshold and check parity "
        "(trained with --val-fraction 0, or by an older edgead); pass --data DIR (an MVTec-layout root or a "
        "folder of normal images)"
    )


def build_validation_sets(job: ExportJob) -> None:
    """Held-out normals (threshold), pseudo-anomalies made from them (threshold check) and, with ``--data``,
    a subsample of its test split (FP32/FP16 AUROC): every set goes through the parity checks."""
    pre = job.pre
    normal_rgb, job.normal_source = _held_out_normals(job)
    resized = [resize_image(img, pre.size, pre.interpolation) for img in normal_rgb]
    if len(resized) >= 2:
        images, labels, _ = pseudo_validation_set(resized, pre, seed=0)
        job.sets["normal"], job.sets["pseudo"] = images[labels == 0], images[labels == 1]
    else:
        job.sets["normal"] = np.stack([preprocess(img, pre) for img in resized])
    data = job.options.data
    if data is not None and (Path(data) / "test").is_dir():
        samples = list_test(data)
        samples = samples[:: max(1, len(samples) // job.options.max_eval_images)]
        job.sets["test"] = np.stack([preprocess(read_image(s.path), pre) for s in samples])
        job.test_labels = np.array([s.label for s in samples])
    job.log(f"  validation: {', '.join(f'{len(v)} {k}' for k, v in job.sets.items())} ({job.normal_source})")


def export_fp32_onnx(job: ExportJob) -> list[Path]:
    path = job.staging / FP32_NAME
    info = export_onnx(job.graph, path, job.input_shape)
    job.artifacts["onnx"] = artifact_record(
        job.staging, FP32_NAME, precision="fp32", opset=info["opset"], nodes=info["nodes"]
    )
    return [path]


def reference_outputs(job: ExportJob) -> None:
    job.ref = {name: run_graph(job.graph, images, batch_size=8) for name, images in job.sets.items()}


def calibrate_threshold(job: ExportJob) -> None:
    """Threshold from the held-out normal scores, checked on pseudo-anomalies."""
    normal_scores = job.ref["normal"][1]
    job.threshold = threshold_from_normal_scores(normal_scores, job.options.false_alarm_rate)
    job.threshold["source"] = job.normal_source
    job.threshold["normal_quantiles"] = normal_quantiles(normal_scores)  # edgead run's drift watch
    if "pseudo" in job.ref:
        job.threshold["pseudo_anomalies"] = pseudo_anomaly_check(
            normal_scores, job.ref["pseudo"][1], job.threshold["value"]
        )
    job.log(
        f"  threshold {job.threshold['value']:.6g} ({job.threshold['method']}, {job.threshold['n_normal']} "
        f"images, target false-alarm rate {job.options.false_alarm_rate:.1%})"
    )
    if "pseudo_anomalies" in job.threshold:
        check = job.threshold["pseudo_anomalies"]
        job.log(
            f"  at this threshold {check['recall_at_threshold']:.0%} of {check['n_pseudo_anomalies']} pseudo-anomalies "
            f"are flagged (AUROC {check['auroc_vs_normal']:.3f} against the normals)"
        )
    if job.threshold["n_normal"] < MIN_CALIBRATION_IMAGES:
        job.log(
            f"  warning: the threshold rests on only {job.threshold['n_normal']} normal images (fewer than "
            f"{MIN_CALIBRATION_IMAGES}); its false-alarm rate is a rough estimate. Train with more normal images "
            "or a larger --val-fraction, or set --threshold at run time"
        )


def _run_onnx(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return run_batches(OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"]), images)


def check_fp32_parity(job: ExportJob) -> None:
    """ONNX Runtime FP32 within ``FP32_SCORE_RTOL`` of PyTorch; where it is not, accept the export only if a
    float64 evaluation shows that PyTorch FP32 itself is that inexact for this graph."""
    images, ref_scores = job.all_images, job.ref_scores
    ort_maps, ort_scores = _run_onnx(job.staging / FP32_NAME, images)
    report = compare(job.ref_maps, ref_scores, ort_maps, ort_scores, job.threshold["value"])
    job.parity["torch_vs_onnxruntime_fp32"] = report
    worst = report["score_max_rel_error"]
    flips = report["decision_flips"]
    job.log(
        f"  torch vs ONNX Runtime (FP32): score rel. error {worst:.2e} (allowed {FP32_SCORE_RTOL:g}), decision flips "
        f"{flips} of {len(ref_scores)}"
        + ("" if flips == 0 else " (a score on the threshold can flip within the allowed error)")
    )
    if worst <= FP32_SCORE_RTOL:
        return
    # Either a broken export, or a graph whose FP32 result is itself this inexact: decide with float64 on the
    # images where the two disagree most (float64 convolutions are slow on a CPU).
    rel = relative_errors(ref_scores, ort_scores)  # the measure of the gate above
    worst_images = np.argsort(rel)[-FP64_CHECK_IMAGES:]
    _, f64_scores = run_graph(copy.deepcopy(job.graph).double(), images[worst_images].astype(np.float64), batch_size=8)
    envelope = fp32_envelope(ref_scores[worst_images], ort_scores[worst_images], f64_scores)
    envelope["n_images"] = len(worst_images)
    job.parity["fp32_conditioning"] = envelope
    job.log(
        f"  PyTorch FP32 itself is {envelope['torch_fp32_vs_float64']:.2e} from float64, ONNX Runtime "
        f"{envelope['export_vs_float64']:.2e} (allowed {envelope['allowed']:.2e})"
    )
    if not envelope["within"]:
        raise ExportError(
            f"FP32 ONNX disagrees with PyTorch: score relative error {worst:.3e} > {FP32_SCORE_RTOL:g}, and "
            f"{envelope['export_vs_float64']:.3e} from a float64 evaluation where PyTorch FP32 is "
            f"{envelope['torch_fp32_vs_float64']:.3e}; the export is not written"
        )


def store_golden_data(job: ExportJob) -> list[Path]:
    """``verification.npz``: up to ``GOLDEN_PER_SET`` held-out normals and as many pseudo-anomalies (the
    preprocessed model inputs) with the PyTorch FP32 reference outputs, for ``edgead verify`` on the target
    device. Plain arrays (read with ``allow_pickle=False``), compressed, hashed in ``edgead.json``."""
    names = [name for name in ("normal", "pseudo") if name in job.sets]
    pick = {name: slice(0, GOLDEN_PER_SET) for name in names}
    images = np.concatenate([job.sets[name][pick[name]] for name in names]).astype(np.float32)
    labels = np.concatenate([np.full(len(job.sets[name][pick[name]]), int(name == "pseudo")) for name in names])
    maps = np.concatenate([job.ref[name][0][pick[name]] for name in names]).astype(np.float32)
    scores = np.concatenate([job.ref[name][1][pick[name]] for name in names]).astype(np.float32)
    job.golden = {"images": images, "labels": labels.astype(np.int8), "maps": maps, "scores": scores}
    path = write_golden_data(job)
    check_verification_set(job, "fp32", FP32_NAME)
    return [path]


def write_golden_data(job: ExportJob) -> Path:
    """(Re)write ``verification.npz`` from ``job.golden`` and its record (an INT8 export adds its references)."""
    path = job.staging / GOLDEN_NAME
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **job.golden)
    references = "PyTorch FP32" + (", INT8 on ONNX Runtime (CPU)" if "scores_int8" in job.golden else "")
    job.artifacts["verification"] = artifact_record(
        job.staging,
        GOLDEN_NAME,
        images=len(job.golden["images"]),
        reference=references,
        threshold=job.threshold["value"],
    )
    return path


def check_verification_set(job: ExportJob, precision: str, onnx_name: str) -> None:
    """``edgead verify``'s own check on the verification set just written, run on ONNX Runtime (CPU): its
    comparison (``edgead.runtime.verify.compare``, polygraphy's comparator where installed) judged by
    ``edgead.runtime.parity.judge`` with the tolerances verify will read from this export's parity record
    (``edgead.runtime.parity.tolerances``). So an export this accepts passes verify on ONNX Runtime, and one
    that verify would fail is not written."""
    maps, scores = _run_onnx(job.staging / onnx_name, job.golden["images"])
    reference = reference_for(job.golden, precision)
    threshold = job.threshold["int8"]["value"] if precision == "int8" else job.threshold["value"]
    report = verify_compare(reference, maps, scores, threshold)
    tol = tolerances(precision, job.parity)
    report["polygraphy"] = polygraphy_compare(reference, maps, scores, precision, "onnxruntime", tol)
    failures = judge(report, tol)
    job.parity[f"verification_set_{precision}"] = {**report, "tolerances": tol, "passed": not failures}
    job.log(
        f"  verification set ({len(scores)} images, {precision}, as `edgead verify` checks it): score rel. error "
        f"{report['score_max_rel_error']:.2e} (allowed {tol['score_rel']:g}), map rel. error "
        f"{report['map_max_rel_error']:.2e} (allowed {tol['map_rel']:g})"
    )
    if failures:
        raise ExportError(
            f"`edgead verify` would fail this export ({precision} on ONNX Runtime): {'; '.join(failures)}; the export "
            "is not written"
        )


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from edgead.metrics import image_auroc

    return float(image_auroc(labels, scores)) if 0 < labels.sum() < len(labels) else None


def export_fp16_onnx(job: ExportJob) -> list[Path]:
    """The graph's declared networks in FP16, everything else FP32 (``edgead.export.fp16``); parity vs FP32."""
    path = job.staging / FP16_NAME
    info = export_onnx(mixed_precision_graph(job.graph), path, job.input_shape)
    notes = job.graph.export_notes() if hasattr(job.graph, "export_notes") else {}
    job.artifacts["onnx_fp16"] = artifact_record(
        job.staging,
        FP16_NAME,
        precision="fp16",
        opset=info["opset"],
        nodes=info["nodes"],
        fp32_parts=notes.get("fp32_parts"),
    )
    maps, scores = _run_onnx(path, job.all_images)
    report = compare(job.ref_maps, job.ref_scores, maps, scores, job.threshold["value"])
    job.parity["fp32_vs_onnxruntime_fp16"] = report
    job.log(
        f"  FP32 vs FP16 ONNX: score rel. error {report['score_max_rel_error']:.2e}, flips {report['decision_flips']}"
    )
    if job.test_labels is not None:
        n = len(job.test_labels)
        job.parity["test_image_auroc"] = {
            "fp32": _auroc(job.test_labels, job.ref_scores[-n:]),
            "fp16": _auroc(job.test_labels, scores[-n:]),
            "n_images": n,
        }
    check_verification_set(job, "fp16", FP16_NAME)
    return [path]


def export_int8_onnx(job: ExportJob) -> list[Path]:
    """The graph's networks quantized to INT8 (``edgead.export.int8``), calibrated on the held-out normals, with
    its own threshold, gated against FP32 (``edgead.runtime.parity.INT8_GATE``)."""
    from edgead.export.int8 import int8_step

    return int8_step(job)


def _fp32_layers(job: ExportJob, onnx_name: str) -> tuple[str, ...]:
    """FP16 engines: the FP32 ONNX's nodes that weakly typed TensorRT must keep in FP32 (ignored by strongly
    typed flavours, which build from the FP16 ONNX)."""
    if job.options.precision != "fp16":
        return ()
    import onnx

    return tuple(fp32_node_names(job.graph, onnx.load(str(job.staging / onnx_name), load_external_data=False)))


def build_tensorrt_engine(job: ExportJob) -> list[Path]:
    from edgead.export.tensorrt import BuildSettings, build_engine, detect_flavour

    options = job.options
    flavour = detect_flavour(options.trt_flavour)
    engine_name = f"model.{options.precision}.engine"
    settings = BuildSettings(
        precision=options.precision,
        input_shape=job.input_shape,
        workspace_mb=options.workspace_mb,
        timing_cache=(options.engine_cache / "timing.cache") if options.engine_cache else None,
        compute_capabilities=options.compute_capabilities,
        fp32_layers=_fp32_layers(job, FP32_NAME),
    )
    try:
        info = build_engine(
            job.staging / FP32_NAME,
            job.staging / engine_name,
            settings,
            flavour=flavour,
            cache_dir=options.engine_cache,
            log=lambda line: job.log(f"  {line}"),
            fp16_onnx_path=(job.staging / FP16_NAME) if options.precision == "fp16" else None,
            int8_onnx_path=(job.staging / INT8_NAME) if options.precision == "int8" else None,
        )
    except (RuntimeError, ValueError, FileNotFoundError) as err:  # parser or builder errors, listed by build_engine
        raise ExportError(
            f"{flavour.name} {flavour.version} could not build the {options.precision} engine: {err}; the export "
            "is not written (export --format onnx and build on the device, or see `edgead verify`)"
        ) from err
    job.artifacts["engines"] = [
        artifact_record(
            job.staging,
            engine_name,
            precision=options.precision,
            flavour=info.flavour,
            flavour_version=info.flavour_version,
            key=info.key,
            built_from=info.onnx_path.name,
            builder_flags=list(info.builder_flags),
            layers=info.layers,
            fp32_constrained_layers=info.fp32_constrained_layers,
            compute_capabilities=list(info.compute_capabilities or []),
            build_seconds=round(info.build_seconds, 2),
        )
    ]
    return [job.staging / engine_name]


def _run_onnx_varied_batches(path: Path, images: np.ndarray, max_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch-dynamic ONNX over ``images`` in batches of 1, then ``max_batch``, then the remainder: every
    image is scored once, at several batch sizes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sizes, left = [], len(images)
    while left:
        size = min(left, 1 if not sizes else max_batch)
        sizes.append(size)
        left -= size
    maps, scores, start = [], [], 0
    for size in sizes:
        out_map, out_score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[start : start + size]})
        maps.append(np.asarray(out_map, np.float32))
        scores.append(np.asarray(out_score, np.float32))
        start += size
    return np.concatenate(maps), np.concatenate(scores)


def export_batched_onnx(job: ExportJob) -> list[Path]:
    """``--format triton``: the graph again with a dynamic batch (1..``--max-batch``), so that Triton can batch
    requests from many cameras into one inference (``max_batch_size`` + ``dynamic_batching``); with
    ``--precision fp16`` its mixed-precision twin as well. Each is run at batch sizes 1, ``max_batch`` and the
    remainder and compared with the fixed-batch ONNX of the same precision: FP32 must agree within the FP32
    parity allowance (a graph treats every image on its own, so only the summation order may change)."""
    n = job.options.triton_max_batch
    if n < 2:
        job.log("  --max-batch 1: the Triton models serve the export's fixed-shape graph (max_batch_size 0)")
        return []
    graphs = [(BATCHED_NAME, FP32_NAME, job.graph, "onnx_batched", "fp32")]
    if job.options.precision == "fp16":
        graphs.append((BATCHED_FP16_NAME, FP16_NAME, mixed_precision_graph(job.graph), "onnx_batched_fp16", "fp16"))
    written = []
    images = job.all_images.astype(np.float32)
    for name, fixed_name, graph, key, precision in graphs:
        path = job.staging / name
        info = export_onnx(graph, path, job.input_shape, max_batch=n)
        batched_maps, batched_scores = _run_onnx_varied_batches(path, images, n)
        fixed_maps, fixed_scores = _run_onnx(job.staging / fixed_name, images)
        report = compare(fixed_maps, fixed_scores, batched_maps, batched_scores, job.threshold["value"])
        job.parity[f"fixed_vs_batched_{precision}"] = report
        allowed = job.parity.get("fp32_conditioning", {}).get("allowed", FP32_SCORE_RTOL)
        job.log(
            f"  {name} (batch {info.get('batch', 'fixed 1')}) vs {fixed_name}: score rel. error "
            f"{report['score_max_rel_error']:.2e}" + (f" (allowed {allowed:g})" if precision == "fp32" else "")
        )
        if precision == "fp32" and report["score_max_rel_error"] > allowed:
            raise ExportError(
                f"{name}: the batch-dynamic graph disagrees with the fixed one (score relative error "
                f"{report['score_max_rel_error']:.3e} > {allowed:g}); the export is not written"
            )
        job.artifacts[key] = artifact_record(
            job.staging, name, precision=precision, opset=info["opset"], nodes=info["nodes"], max_batch=n,
            batch=info.get("batch", "fixed 1"),
        )  # fmt: skip
        written.append(path)
    return written


def build_triton_engine(job: ExportJob) -> list[Path]:
    """A TensorRT plan for Triton's ``tensorrt_plan`` backend from the batch-dynamic ONNX, with one optimisation
    profile for batches 1..``--max-batch``. Only with NVIDIA's TensorRT (Triton's backend cannot load
    TensorRT-RTX engines); otherwise the log gives the ``trtexec`` command to build it on the server."""
    from edgead.export.tensorrt import BuildSettings, TensorRTUnavailable, build_engine, detect_flavour

    options, n = job.options, job.options.triton_max_batch
    per_image = job.input_shape[1:]
    dims = "x".join(str(d) for d in per_image)
    shapes = " ".join(f"--{kind}Shapes={INPUT_NAME}:{b}x{dims}" for kind, b in (("min", 1), ("opt", n), ("max", n)))
    if options.precision == "fp32":
        command = f"trtexec --onnx={BATCHED_NAME} {shapes} --saveEngine=model.plan"
    else:
        command = (
            f"trtexec --onnx={BATCHED_NAME} {shapes} --fp16 --saveEngine=model.plan (TensorRT 10), or "
            f"trtexec --onnx={BATCHED_FP16_NAME} {shapes} --saveEngine=model.plan (TensorRT 11, strongly typed)"
        )
    if n < 2:
        job.log("  --max-batch 1: Triton's TensorRT model, if any, is the export's fixed-shape engine")
        return []
    try:
        flavour = detect_flavour("tensorrt")
    except TensorRTUnavailable:
        job.log(f"  no NVIDIA TensorRT here for Triton's tensorrt_plan model; build it on the server: {command}")
        return []
    name = f"model.batched.{options.precision}.plan"
    try:
        info = build_engine(
            job.staging / BATCHED_NAME,
            job.staging / name,
            BuildSettings(
                precision=options.precision,
                input_shape=(n, *per_image),
                workspace_mb=options.workspace_mb,
                max_batch=n,
                fp32_layers=_fp32_layers(job, BATCHED_NAME),
            ),  # fmt: skip
            flavour=flavour,
            cache_dir=options.engine_cache,
            log=lambda line: job.log(f"  {line}"),
            fp16_onnx_path=(job.staging / BATCHED_FP16_NAME) if options.precision == "fp16" else None,
        )
    except (RuntimeError, TensorRTUnavailable) as err:  # e.g. no GPU to build on: the repository still works
        job.log(f"  TensorRT could not build Triton's plan here ({err}); build it on the server: {command}")
        return []
    job.artifacts["triton_engines"] = [
        artifact_record(
            job.staging, name, precision=options.precision, flavour=info.flavour, flavour_version=info.flavour_version,
            key=info.key, built_from=info.onnx_path.name, max_batch=n, profile=[list(s) for s in info.profile],
        )
    ]  # fmt: skip
    return [job.staging / name]


def write_triton_repository(job: ExportJob) -> list[Path]:
    """``triton/`` inside the export: the model repository of ``edgead.export.triton`` (Python-backend model,
    ``onnxruntime_onnx`` model, ``tensorrt_plan`` where a TensorRT engine exists, DeepStream config)."""
    from edgead.export.triton import write_repository

    options = job.options
    info = write_repository(
        job.staging, job.staging / "triton", raw_input=options.triton_raw_input, max_batch=options.triton_max_batch
    )
    size = sum(p.stat().st_size for p in (job.staging / "triton").rglob("*") if p.is_file())
    job.log(
        "Triton repository: triton/ with models "
        + ", ".join(f"{name} ({platform})" for name, platform in info["models"].items())
        + f"; DeepStream config triton/deepstream/ ({size / 1e6:.2f} MB, files hard-linked where possible)"
    )
    return []


# ----------------------------------------------------------------------------------------------- the tables
@dataclass(frozen=True)
class ExportFormat:
    """One ``--format``: what it adds to the export and the named steps that build it. Every format starts
    with ``COMMON_STEPS`` and the precision's own steps (``PRECISION_STEPS``); a new format is one row here."""

    name: str
    summary: str
    #: ``--precision`` values this format can be made at
    precisions: tuple[str, ...]
    #: steps run after the precision's steps, before ``edgead.json`` is written
    steps: tuple[tuple[str, Step], ...] = ()
    #: steps that read the written ``edgead.json`` (run before the version is published)
    after_metadata: tuple[tuple[str, Step], ...] = ()


#: What every export does first, in order (the first two before the target folder is locked).
COMMON_STEPS: tuple[tuple[str, Step], ...] = (
    ("load run", load_graph),
    ("validation sets", build_validation_sets),
    ("ONNX FP32", export_fp32_onnx),
    ("PyTorch reference", reference_outputs),
    ("threshold", calibrate_threshold),
    ("parity FP32", check_fp32_parity),
    ("golden data", store_golden_data),
)

#: --precision -> its steps after the FP32 graph's (e.g. the FP16 twin and its parity gate).
PRECISION_STEPS: dict[str, tuple[tuple[str, Step], ...]] = {
    "fp32": (),
    "fp16": (("ONNX FP16", export_fp16_onnx),),
    "int8": (("ONNX INT8", export_int8_onnx),),
}

#: --format -> how it is built (ultralytics keeps its exporters in one table the same way).
FORMATS: dict[str, ExportFormat] = {
    fmt.name: fmt
    for fmt in (
        ExportFormat("onnx", "ONNX graph(s) for ONNX Runtime; engines built on the device", PRECISIONS),
        ExportFormat(
            "tensorrt",
            "ONNX plus a TensorRT engine built here (NVIDIA TensorRT or TensorRT-RTX)",
            PRECISIONS,
            steps=(("TensorRT engine", build_tensorrt_engine),),
        ),
        ExportFormat(
            "triton",
            "ONNX plus a Triton model repository (triton/): dynamic-batch graphs, a TensorRT plan where NVIDIA "
            "TensorRT is installed, DeepStream config",
            ("fp32", "fp16"),
            steps=(("ONNX batched (Triton)", export_batched_onnx), ("TensorRT plan (Triton)", build_triton_engine)),
            after_metadata=(("Triton repository", write_triton_repository),),
        ),
    )
}


def tool_versions() -> dict[str, str | None]:
    """Versions of the libraries that produced an export."""
    versions: dict[str, str | None] = {"edgead": __version__}
    for module in ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt", "tensorrt_rtx"):
        version, error = module_version(module)  # a broken optional install is recorded, not fatal
        versions[module] = "broken install" if error else version
    return versions


def build_metadata(job: ExportJob) -> ExportMetadata:
    """The ``edgead.json`` record of this export (steps so far included)."""
    import datetime as dt

    pre, config = job.pre, job.config
    notes = job.graph.export_notes() if hasattr(job.graph, "export_notes") else {}
    method = config.method
    if job.fusion is not None:
        notes = {**notes, "fusion": job.fusion}
        method = "+".join(member["method"] for member in job.fusion["members"])
    run_dir = str(Path(job.run_dir).resolve())
    return ExportMetadata(
        method=method,
        edgead_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        run={"name": Path(run_dir).name, "dir": run_dir},
        input={
            "name": INPUT_NAME,
            "shape": list(job.input_shape),
            "dtype": "float32",
            "layout": "NCHW",
            "channel_order": "RGB" if pre.channels == 3 else "GRAY",
            "note": "frames are converted BGR->RGB and preprocessed by edgead.data.preprocess.preprocess",
        },
        outputs=[
            {"name": OUTPUT_NAMES[0], "shape": [job.options.batch, *job.ref_maps.shape[1:]], "dtype": "float32"},
            {"name": OUTPUT_NAMES[1], "shape": [job.options.batch], "dtype": "float32"},
        ],
        preprocess=pre.to_dict(),
        notes=notes,
        method_params=dict(config.method_params),
        model=config.model,
        threshold=job.threshold,
        artifacts=job.artifacts,
        parity=job.parity,
        steps=job.steps,
        versions=tool_versions(),
    )


def export_run(
    run_dir: Path, out_dir: Path, options: ExportOptions, log: Callable[[str], None] = print
) -> ExportMetadata:
    """Export the run in ``run_dir`` into ``out_dir``; returns the metadata written to ``edgead.json``."""
    options.validate()
    job = ExportJob(run_dir=Path(run_dir), out_dir=Path(out_dir), options=options, log=log)
    fmt = FORMATS[options.format]
    job.total_steps = len(COMMON_STEPS) + len(PRECISION_STEPS[options.precision]) + len(fmt.steps)
    job.total_steps += len(fmt.after_metadata)
    try:  # before any work: a link, a folder or files that are not export's own, a read-only folder
        check_target(job.out_dir)
    except PublishError as err:
        raise ExportError(str(err)) from err
    for name, step in COMMON_STEPS[:2]:  # before the target folder is locked
        run_step(job, name, step)
    try:
        with export_lock(job.out_dir):
            job.staging = start_version(job.out_dir)
            try:
                log(f"tracing {job.config.method} graph {job.input_shape} to ONNX ...")
                for name, step in COMMON_STEPS[2:]:
                    run_step(job, name, step)
                for name, step in PRECISION_STEPS[options.precision]:
                    run_step(job, name, step)
                for name, step in fmt.steps:
                    run_step(job, name, step)
                meta = build_metadata(job)
                meta.save(job.staging)  # the version is complete only with its edgead.json
                for name, step in fmt.after_metadata:
                    run_step(job, name, step)
                version = publish(job.staging, job.out_dir)
            finally:
                shutil.rmtree(job.staging, ignore_errors=True)  # left only when the export failed
    except PublishError as err:
        raise ExportError(str(err)) from err
    except OSError as err:
        if err.errno not in _NO_ROOM:
            raise
        where = f" writing {Path(err.filename).name}" if err.filename else ""
        raise ExportError(
            f"{job.out_dir}: the export stopped{where} ({err.strerror}); the previous export there is unchanged"
        ) from err
    log(f"export written to {job.out_dir} (version {version.name}; a failed export never changes it)")
    return meta


__all__ = ["FORMATS", "PRECISION_STEPS", "ExportError", "ExportFormat", "ExportOptions", "export_run"]
