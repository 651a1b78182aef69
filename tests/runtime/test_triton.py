"""Triton Inference Server: the repository that `edgead export --format triton` writes, served by the real
`tritonserver` binary of the nvidia-pytriton wheel (CPU, Python backend), over HTTP and gRPC."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import socket
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.data.synthetic import generate_dataset
from edgead.export.triton import graph_model_config, python_model_config
from edgead.runtime.detector import Detector
from edgead.runtime.metadata import load_metadata

HAS_CLIENT = importlib.util.find_spec("tritonclient") is not None
HAS_SERVER = importlib.util.find_spec("pytriton") is not None
runner = CliRunner()


def _parse(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())  # raises on unknown fields


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A gaussian export at 32 px with its Triton repository, and some test frames (BGR, 48 x 40)."""
    root = tmp_path_factory.mktemp("triton")
    data = generate_dataset(root / "data", size=32, n_train=24, n_test_good=4, n_test_defect=4, seed=3)
    common = ["--runs-root", str(root / "runs")]
    for args in (
        ["train", "--method", "gaussian", "--data", str(data), "--image-size", "32", "--no-progress", *common],
        ["export", "--method", "gaussian", "--format", "triton", "--out", str(root / "export"), *common],
    ):
        result = runner.invoke(app, args, env={"COLUMNS": "240"})
        assert result.exit_code == 0, result.output
    frames = [cv2.resize(cv2.imread(str(p)), (48, 40)) for p in sorted((data / "test").rglob("*.png"))]
    return root / "export", frames


@pytest.mark.skipif(not HAS_CLIENT, reason="tritonclient is not installed (pip install edgead[triton])")
def test_repository_configs_follow_tritons_schema(exported: tuple[Path, list[np.ndarray]]) -> None:
    export, _ = exported
    repo = export / "triton"
    python = _parse((repo / "gaussian" / "config.pbtxt").read_text())
    assert python.backend == "python" and python.max_batch_size == 8
    assert python.dynamic_batching.max_queue_delay_microseconds > 0
    assert [i.name for i in python.input] == ["FRAME"] and list(python.input[0].dims) == [-1, -1, 3]
    assert {o.name for o in python.output} == {"SCORE", "IS_ANOMALY", "THRESHOLD", "ANOMALY_MAP", "SERVER_MS"}
    meta = load_metadata(export)
    assert float(python.parameters["edgead_threshold"].string_value) == pytest.approx(meta.threshold_value)
    onnx_model = _parse((repo / "gaussian_onnx" / "config.pbtxt").read_text())
    # The batch-dynamic graph: Triton batches requests (max_batch_size 8, per-request dims without the batch).
    assert onnx_model.platform == "onnxruntime_onnx" and onnx_model.max_batch_size == 8
    assert onnx_model.dynamic_batching.max_queue_delay_microseconds > 0
    assert [(i.name, list(i.dims)) for i in onnx_model.input] == [("image", [3, 32, 32])]
    assert [(o.name, list(o.dims)) for o in onnx_model.output] == [("anomaly_map", [32, 32]), ("score", [])]
    batched = meta.artifacts["onnx_batched"]
    assert batched["max_batch"] == 8 and batched["batch"] == "dynamic 1..8"
    model_file = repo / "gaussian_onnx" / "1" / "model.onnx"
    assert model_file.read_bytes() == (export / batched["file"]).read_bytes()
    assert not (repo / "gaussian" / "1" / "export" / batched["file"]).exists()  # the Python model's export: fixed
    plan = _parse(graph_model_config("m_trt", "tensorrt_plan", model_file, meta, 2, max_batch=8))
    assert plan.platform == "tensorrt_plan" and plan.instance_group[0].count == 2 and plan.max_batch_size == 8
    fixed = _parse(graph_model_config("m_trt", "tensorrt_plan", export / "model.onnx", meta, 1))
    assert fixed.max_batch_size == 0 and list(fixed.input[0].dims) == [1, 3, 32, 32]
    with pytest.raises(ValueError, match="needs a dynamic batch"):
        graph_model_config("m", "onnxruntime_onnx", export / "model.onnx", meta, 1, max_batch=8)
    with pytest.raises(Exception, match="unknown_field|no field"):
        _parse(python_model_config("m", meta, 4, 1, None) + "unknown_field: 1\n")
    deepstream = (repo / "deepstream" / "gaussian_nvinfer.txt").read_text()
    assert "network-type=100" in deepstream and "output-blob-names=anomaly_map;score" in deepstream
    assert "infer-dims=3;32;32" in deepstream and "onnx-file=../gaussian_onnx/1/model.onnx" in deepstream
    assert "batch-size=8" in deepstream
    settings = [line for line in deepstream.splitlines() if "=" in line and not line.startswith("#")]
    assert settings and not any("#" in line for line in settings)  # GKeyFile has no inline comments


def test_the_batched_graph_scores_every_batch_size_like_the_fixed_one(exported) -> None:
    """What Triton's onnxruntime_onnx model runs, at batch 1, 5 and 8, equals the export's fixed graph image by
    image; with TensorRT-RTX installed, the same graph builds with a 1..8 optimisation profile."""
    import onnxruntime as ort

    export, _ = exported
    meta = load_metadata(export)
    fixed = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    batched = ort.InferenceSession(str(export / meta.artifacts["onnx_batched"]["file"]),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    images = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    singles = [fixed.run(None, {"image": image[None]}) for image in images]
    for size in (1, 5, 8):
        maps, scores = batched.run(None, {"image": images[:size]})
        np.testing.assert_allclose(maps, np.concatenate([m for m, _ in singles[:size]]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(scores, np.concatenate([s for _, s in singles[:size]]), rtol=1e-4, atol=1e-4)
    report = meta.parity["fixed_vs_batched_fp32"]
    assert report["score_max_rel_error"] <= 1e-4 and report["decision_flips"] == 0
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        from edgead.export.tensorrt import BuildSettings, build_engine, detect_flavour

        info = build_engine(export / meta.artifacts["onnx_batched"]["file"], export.parent / "batched.engine",
                            BuildSettings("fp32", (8, 3, 32, 32), max_batch=8), flavour=detect_flavour("tensorrt_rtx"),
                            log=lambda _: None)  # fmt: skip
        assert info.profile[0] == (1, 3, 32, 32) and info.profile[2] == (8, 3, 32, 32)


def test_max_batch_is_for_triton_only(exported) -> None:
    export, _ = exported
    args = ["export", "--method", "gaussian", "--runs-root", str(export.parent / "runs"), "--max-batch", "4"]
    result = runner.invoke(app, [*args, "--out", str(export.parent / "other")])
    assert result.exit_code == 2 and "--format triton" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(exported: tuple[Path, list[np.ndarray]], tmp_path_factory: pytest.TempPathFactory):
    from edgead.runtime.triton_server import backend_directory, server_command, wait_ready

    export, _ = exported
    ports = [_free_port() for _ in range(3)]
    backends = backend_directory(tmp_path_factory.mktemp("backends"))
    log = (tmp_path_factory.mktemp("log") / "server.log").open("w")
    process = subprocess.Popen(server_command(export / "triton", backends, *ports, models=["gaussian"]),
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_ready(ports[0], process, timeout_s=90)
        yield {"http": f"127.0.0.1:{ports[0]}", "grpc": f"127.0.0.1:{ports[1]}"}
    finally:
        process.terminate()
        process.wait(timeout=40)
        log.close()


needs_server = pytest.mark.skipif(
    not (HAS_CLIENT and HAS_SERVER), reason="needs tritonclient and the server (pip install --no-deps nvidia-pytriton)"
)


def _infer(protocol: str, url: str, frames: np.ndarray, model: str = "gaussian", dtype: str = "UINT8"):
    if protocol == "http":
        import tritonclient.http as client
    else:
        import tritonclient.grpc as client
    c = client.InferenceServerClient(url)
    inp = client.InferInput("FRAME", list(frames.shape), dtype)
    inp.set_data_from_numpy(frames)
    names = ("SCORE", "IS_ANOMALY", "THRESHOLD", "ANOMALY_MAP")
    outputs = [client.InferRequestedOutput(n, binary_data=True) if protocol == "http" else
               client.InferRequestedOutput(n) for n in names]  # fmt: skip
    result = c.infer(model, [inp], outputs=outputs)
    return {n: result.as_numpy(n) for n in names}


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_results_equal_the_detector(exported, server, protocol: str) -> None:
    export, frames = exported
    detector = Detector.load(export, backend="onnxruntime")
    batch = np.stack(frames[:3])
    out = _infer(protocol, server[protocol], batch)
    for i, frame in enumerate(frames[:3]):
        ref = detector.predict(frame)
        assert float(out["SCORE"][i, 0]) == pytest.approx(ref.score, rel=1e-5)
        assert bool(out["IS_ANOMALY"][i, 0]) == ref.is_anomaly
        assert float(out["THRESHOLD"][i, 0]) == pytest.approx(detector.threshold)
        np.testing.assert_allclose(out["ANOMALY_MAP"][i], ref.map_at(40, 48), rtol=1e-5, atol=1e-6)


@needs_server
def test_concurrent_clients_are_batched(exported, server) -> None:
    import tritonclient.http as client

    _, frames = exported
    stats = client.InferenceServerClient(server["http"])
    before = stats.get_inference_statistics("gaussian")["model_stats"][0]

    def camera(k: int) -> None:
        for j in range(12):
            _infer("http", server["http"], frames[(k + j) % len(frames)][None])

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(camera, range(4)))
    deadline = time.monotonic() + 10.0
    while True:  # the server counts a request after its response went out: wait until all 48 are counted
        after = stats.get_inference_statistics("gaussian")["model_stats"][0]
        requests = int(after["inference_count"]) - int(before["inference_count"])
        if requests >= 48 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert requests == 48 and executions < requests, (requests, executions)


@needs_server
def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(exported, server) -> None:
    from tritonclient.utils import InferenceServerException

    _, frames = exported
    url = server["http"]
    with pytest.raises(InferenceServerException, match="FRAME|shape|dims"):
        _infer("http", url, np.zeros((1, 8, 8), np.uint8))  # not (batch, H, W, 3)
    with pytest.raises(InferenceServerException, match="FRAME|shape|dims"):
        _infer("http", url, np.zeros((1, 8, 8, 4), np.uint8))
    with pytest.raises(InferenceServerException, match="FP32|UINT8|data type|datatype"):
        _infer("http", url, np.zeros((1, 8, 8, 3), np.float32), dtype="FP32")
    with pytest.raises(InferenceServerException, match="nope|unknown|not found"):
        _infer("http", url, frames[0][None], model="nope")
    assert _infer("grpc", server["grpc"], frames[0][None])["SCORE"].shape == (1, 1)  # still serving


@needs_server
def test_run_triton_reconnects_after_a_server_restart(exported, tmp_path: Path) -> None:
    """`edgead run --triton`'s predictor through the live loop on a folder of frames: the server is stopped and
    started again mid-run; the client waits, reconnects and continues, and the log has every frame once."""
    import json
    import threading

    from edgead.runtime.live import LiveOptions, run_live
    from edgead.runtime.triton_client import TritonPredictor
    from edgead.runtime.triton_server import backend_directory, server_command, wait_ready

    export, frames = exported
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(40):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frames[i % len(frames)])
    ports = [_free_port() for _ in range(3)]
    command = server_command(export / "triton", backend_directory(tmp_path / "backends"), *ports, models=["gaussian"])

    def start() -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(ports[0], process, timeout_s=90)
        return process

    process = start()
    events: list[str] = []
    predictor = TritonPredictor(f"grpc://127.0.0.1:{ports[1]}", "gaussian", on_event=events.append, max_wait_s=120)
    log = tmp_path / "frames.jsonl"
    done: dict[str, object] = {}
    worker = threading.Thread(
        target=lambda: done.update(summary=run_live(predictor, str(folder), LiveOptions(show=False, log_path=log)))
    )
    worker.start()
    try:
        while not log.exists() or len(log.read_text().splitlines()) < 5:
            assert worker.is_alive(), done
        process.terminate()
        process.wait(timeout=40)
        process = start()
        worker.join(timeout=180)
    finally:
        process.terminate()
        process.wait(timeout=40)
    assert not worker.is_alive()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(40))  # every frame once, in order
    assert all({"server_ms", "network_ms", "client_ms"} <= set(line) for line in lines)
    assert any("unreachable" in e for e in events) and any("back" in e for e in events), events


def test_folded_preprocessing_takes_raw_rgb(exported, tmp_path: Path) -> None:
    """The raw-input graph on resized 0..255 RGB equals the exported graph on the shared preprocessing."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from edgead.data.preprocess import PreprocessConfig, bgr_to_rgb, preprocess, resize_image
    from edgead.export.triton import fold_preprocessing

    export, frames = exported
    meta = load_metadata(export)
    fold_preprocessing(export / "model.onnx", tmp_path / "raw.onnx", meta.preprocess)
    pre = PreprocessConfig.from_dict(meta.preprocess)
    plain = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    raw = ort.InferenceSession(str(tmp_path / "raw.onnx"), providers=["CPUExecutionProvider"])
    rgb = bgr_to_rgb(frames[0])
    resized = resize_image(rgb, pre.image_size, pre.interpolation).astype(np.float32).transpose(2, 0, 1)[None]
    ref = plain.run(None, {"image": preprocess(rgb, pre)[None]})
    out = raw.run(None, {"image": resized})
    for r, o in zip(ref, out, strict=True):
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4)

    # a grayscale export: OpenCV's RGB -> gray weights in the graph (OpenCV rounds to integers, the graph not)
    identity = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["image"], ["out"])], "g",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
    ), opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
    onnx.save(identity, str(tmp_path / "id.onnx"))
    gray = {"channels": 1, "mean": [0.25], "std": [0.5], "image_size": 8}
    fold_preprocessing(tmp_path / "id.onnx", tmp_path / "id_raw.onnx", gray)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    expected = (cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255 - 0.25) / 0.5
    session = ort.InferenceSession(str(tmp_path / "id_raw.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": pixels.astype(np.float32).transpose(2, 0, 1)[None]})
    assert np.abs(got[0, 0] - expected).max() <= 0.5 / 255 / 0.5 + 1e-5
