"""INT8 against FP32 on the CPU: ONNX Runtime and OpenVINO, graph and whole ``predict`` latency, test accuracy.

``measure``: exports a trained run at ``--precision int8`` (FP32 and INT8 ONNX in one export, the INT8 gate's
figures recorded; ``--accept-int8-loss`` so that a graph the gate refuses is still measured), then for each of
ONNX Runtime FP32 / INT8 and OpenVINO FP32 / INT8 (CPU): the graph on a preprocessed image and ``predict`` on a
generated 1280x720 BGR frame (median and p99 after warm-up, each backend in turn in the same process), and image
and pixel AUROC on the data set's test split. Test figures are reported, never used to choose anything.

``quantizers``: the same run's FP32 ONNX quantized by ONNX Runtime's tool (what ``edgead export`` uses) and by
NNCF (``pip install nncf``), the same scope left in floating point, the same calibration images: pseudo-validation
and test AUROC and the graph's latency on both backends; the record behind the choice in ``edgead.export.int8``.

Example:
    python benchmarks/int8.py measure --run runs/gaussian/RUN --data $EDGEAD_DATA_ROOT/magnetic_tile
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgead.bench.machine import save_record
from edgead.bench.report import DEFAULT_FRAME_SIZE, _bench_frame
from edgead.bench.timing import bench_detector, latency_stats, timed_loop
from edgead.data.mvtec import list_test, load_images, load_masks
from edgead.export.exporter import ExportOptions, export_run
from edgead.metrics import compute_metrics, image_auroc
from edgead.runtime.backends.base import BackendError
from edgead.runtime.detector import Detector
from edgead.runtime.verify import run_batches

RESULTS = Path(__file__).resolve().parent / "results"
COMBINATIONS = (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "int8"))
HEADLINE = ("image_auroc", "pixel_auroc", "aupro")


def graph_latency(backend: Any, image: np.ndarray, warmup_s: float, duration_s: float) -> dict[str, float]:
    """The exported graph alone on one preprocessed image (no preprocessing, no decision)."""
    batch = np.ascontiguousarray(image[None])
    samples = timed_loop(lambda: backend.infer(batch) and None, warmup_s, duration_s)
    return latency_stats(samples["total"])


def measure(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="edgead-int8-"))
    try:
        export_dir = work / "export"
        meta = export_run(args.run, export_dir, ExportOptions(precision="int8", accept_int8_loss=True), log=print)
        samples = list_test(args.data)
        detector = Detector.load(export_dir)
        pre = detector.preprocess_config
        images = load_images(samples, pre)
        labels = np.array([s.label for s in samples])
        frame = _bench_frame(DEFAULT_FRAME_SIZE)
        rows: dict[str, Any] = {}
        for backend, precision in COMBINATIONS:
            name = f"{backend} {precision}"
            try:
                detector = Detector.load(export_dir, backend=backend, precision=precision)
            except BackendError as err:
                rows[name] = {"not_measured": str(err)}
                continue
            with detector:
                maps, scores = run_batches(detector.backend, images)
                masks = load_masks(samples, maps.shape[-1])
                metrics = compute_metrics(labels, scores, masks if masks.any() else None, maps if masks.any() else None)
                graph = graph_latency(detector.backend, images[0], args.warmup, args.duration)
                predict = bench_detector(detector, frame, args.warmup, args.duration)["stages"]["total"]
            rows[name] = {
                "test": {key: round(float(metrics[key]), 4) for key in HEADLINE if key in metrics},
                "threshold": detector.threshold,
                "graph_ms": {"median": round(graph["median"], 2), "p99": round(graph["p99"], 2)},
                "predict_ms": {"median": round(predict["median"], 2), "p99": round(predict["p99"], 2)},
            }
            print(name, rows[name], flush=True)
        base = rows["onnxruntime fp32"]["graph_ms"]["median"]
        for row in rows.values():
            if "graph_ms" in row:
                row["graph_speedup_vs_onnxruntime_fp32"] = round(base / row["graph_ms"]["median"], 2)
        record = {
            "benchmark": "int8",
            "method": meta.method,
            "dataset": args.data.resolve().name,
            "run": args.run.name,
            "image_size": meta.input["shape"][-1],
            "frame": f"{DEFAULT_FRAME_SIZE[0]}x{DEFAULT_FRAME_SIZE[1]}",
            "quantization": meta.artifacts["onnx_int8"]["quantization"],
            "gate": meta.parity["fp32_vs_onnxruntime_int8"],
            "thresholds": {"fp32": meta.threshold["value"], "int8": meta.threshold["int8"]["value"]},
            "n_test": int(len(labels)),
            "results": rows,
        }
        tag = f"_{args.tag}" if args.tag else ""
        save_record(record, RESULTS, f"int8_{meta.method}_{record['dataset']}{tag}.json", args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quantizers(args: argparse.Namespace) -> None:
    import onnx

    from edgead.config import RunConfig
    from edgead.data import holdout
    from edgead.data.preprocess import resize_image
    from edgead.data.pseudo import pseudo_validation_set
    from edgead.export.int8 import int8_node_names, quantize_int8
    from edgead.methods import get_method

    work = Path(tempfile.mkdtemp(prefix="edgead-quantizers-"))
    try:
        export_run(args.run, work / "export", ExportOptions(), log=lambda line: None)
        fp32 = work / "export" / "model.onnx"
        config = RunConfig.load(args.run)
        method = get_method(config.method).load(args.run, config)
        pre, graph = method.frame_preprocess_config, method.inference_graph().float().eval()
        rgb, _ = holdout.held_out_normals(args.run, config.data)
        resized = [resize_image(image, pre.image_size, pre.interpolation) for image in rgb]
        pseudo, pseudo_labels, _ = pseudo_validation_set(resized, pre, seed=0)
        normals = pseudo[pseudo_labels == 0]
        samples = list_test(args.data)
        test, test_labels = load_images(samples, pre), np.array([s.label for s in samples])
        models = {"fp32": fp32}
        logging.getLogger().setLevel(logging.ERROR)
        quantize_int8(fp32, work / "ort.onnx", graph, normals)
        models["onnxruntime.quantization"] = work / "ort.onnx"
        try:
            import nncf

            _, excluded = int8_node_names(graph, onnx.load(str(fp32)))
            dataset = nncf.Dataset([{"image": image[None].astype(np.float32)} for image in normals])
            quantized = nncf.quantize(
                onnx.load(str(fp32)),
                dataset,
                subset_size=len(normals),
                ignored_scope=nncf.IgnoredScope(names=excluded, validate=False),
                preset=nncf.QuantizationPreset.PERFORMANCE,
            )
            onnx.save(quantized, str(work / "nncf.onnx"))
            models[f"nncf {nncf.__version__}"] = work / "nncf.onnx"
        except ImportError:
            print("nncf is not installed: only ONNX Runtime's quantizer measured")
        from edgead.runtime.backends.onnxruntime import OnnxRuntimeBackend
        from edgead.runtime.backends.openvino import OpenVINOBackend

        rows: dict[str, Any] = {}
        for name, path in models.items():
            row: dict[str, Any] = {}
            for backend_name, backend in (
                ("onnxruntime", OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"])),
                ("openvino", OpenVINOBackend(path)),
            ):
                _, pseudo_scores = run_batches(backend, pseudo)
                _, test_scores = run_batches(backend, test)
                row[backend_name] = {
                    "pseudo_validation_auroc": round(float(image_auroc(pseudo_labels, pseudo_scores)), 4),
                    "test_image_auroc": round(float(image_auroc(test_labels, test_scores)), 4),
                    "graph_ms": round(graph_latency(backend, pseudo[0], args.warmup, args.duration)["median"], 2),
                }
                backend.close()
            rows[name] = row
            print(name, row, flush=True)
        record = {
            "benchmark": "int8_quantizers",
            "method": config.method,
            "dataset": args.data.resolve().name,
            "run": args.run.name,
            "calibration_images": int(len(normals)),
            "results": rows,
        }
        save_record(record, RESULTS, f"int8_quantizers_{config.method}_{record['dataset']}.json", args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("measure", "quantizers"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--run", required=True, type=Path, help="a trained run")
        cmd.add_argument("--data", required=True, type=Path, help="the MVTec-layout data set it was trained on")
        cmd.add_argument("--warmup", type=float, default=3.0)
        cmd.add_argument("--duration", type=float, default=10.0)
        cmd.add_argument("--tag", default=None)
        cmd.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    {"measure": measure, "quantizers": quantizers}[args.command](args)


if __name__ == "__main__":
    main()
