"""Triton Inference Server model repositories (and a DeepStream ``nvinfer`` config) for an edgead export.

``edgead export --format triton`` (or :func:`write_repository` on any export folder) writes, inside the export:

    triton/
      <name>/              backend "python": serves the export as is, raw BGR frames in, decisions out
        config.pbtxt       max_batch_size + dynamic_batching (requests from many cameras run as one batch)
        1/model.py         edgead.runtime.triton_model (wraps the torch-free Detector)
        1/export/          the export (edgead.json and the files it lists, hashes checked at load)
      <name>_onnx/         platform "onnxruntime_onnx": the FP32 graph for NVIDIA's server containers
        config.pbtxt, 1/model.onnx
      <name>_trt/          platform "tensorrt_plan", only when the export holds a TensorRT (not -RTX) engine
        config.pbtxt, 1/model.plan
      deepstream/<name>_nvinfer.txt   DeepStream nvinfer config for the same ONNX / engine

Batching. ``export --format triton`` also traces the graph with a dynamic batch dimension
(``model.batched.onnx``, batch 1..``--max-batch``, checked against the fixed-batch graph at several batch
sizes). The ``onnxruntime_onnx`` model serves it with ``max_batch_size: N``, per-request dims ``[C, S, S]`` and
``dynamic_batching``, so Triton merges requests from many cameras into one inference; the ``tensorrt_plan``
model serves a plan built from it with one optimisation profile (min 1, opt = max = N), built where NVIDIA's
TensorRT is installed (the export log otherwise gives the ``trtexec`` command for the server). An export
without the batched graph (``write_repository`` on an older export) falls back to the fixed shapes with
``max_batch_size: 0``. The Python model has its own batch dimension for raw frames (``FRAME``) and
``dynamic_batching``; it scores a batch with the export's fixed-shape graph. The preprocessed input of the
ONNX / TensorRT models is ``(x / 255 - mean) / std`` of the export's ``preprocess`` (in ``edgead.json`` and the
config's ``parameters``).

Nothing here imports a Triton package: configs are text. ``tritonclient``'s ``model_config_pb2`` parses them
in the tests (the schema rejects unknown fields).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import onnx

from edgead.runtime import triton_model  # copied into the repository as model.py (stdlib-only at import)
from edgead.runtime.metadata import ExportMetadata, find_engine, load_metadata

DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 2000
_ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def _dims(values: list[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def _parameters(values: dict[str, str]) -> str:
    return "".join(
        f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(str(v))} }} }}\n' for k, v in values.items()
    )


def _io(kind: str, name: str, dtype: str, dims: list[int]) -> str:
    return f'{kind} [ {{ name: "{name}" data_type: {dtype} dims: {_dims(dims)} }} ]\n'


def onnx_io(path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """``(inputs, outputs)`` of an ONNX file as ``(name, Triton type, dims)``; a dynamic dim is -1."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def rows(values: Any) -> list[tuple[str, str, list[int]]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append(
                (v.name, _ONNX_TYPES.get(t.elem_type, f"TYPE_{onnx.TensorProto.DataType.Name(t.elem_type)}"), dims)
            )
        return out

    return rows(graph.input), rows(graph.output)


def _common_parameters(meta: ExportMetadata) -> dict[str, str]:
    return {
        "edgead_method": meta.method,
        "edgead_threshold": repr(float(meta.threshold_value)),
        "edgead_preprocess": json.dumps(meta.preprocess, sort_keys=True),
    }


def python_model_config(name: str, meta: ExportMetadata, max_batch: int, instances: int, env: str | None) -> str:
    """``config.pbtxt`` of the Python-backend model (raw frames in, decisions out)."""
    params = _common_parameters(meta)
    if env:
        params["EXECUTION_ENV_PATH"] = env  # the Python environment with edgead installed (the stub has its own)
    text = f'name: "{name}"\nbackend: "python"\nmax_batch_size: {int(max_batch)}\n'
    text += f"dynamic_batching {{ max_queue_delay_microseconds: {DEFAULT_QUEUE_DELAY_US} }}\n"
    text += f"instance_group [ {{ count: {int(instances)} kind: KIND_CPU }} ]\n"
    text += _io("input", "FRAME", "TYPE_UINT8", [-1, -1, 3])
    for out, dtype, dims in [("SCORE", "TYPE_FP32", [1]), ("IS_ANOMALY", "TYPE_BOOL", [1]),
                             ("THRESHOLD", "TYPE_FP32", [1]), ("ANOMALY_MAP", "TYPE_FP32", [-1, -1]),
                             ("SERVER_MS", "TYPE_FP32", [1])]:  # fmt: skip
        text += _io("output", out, dtype, dims)
    return text + _parameters(params)


def graph_model_config(
    name: str, platform: str, onnx_path: Path, meta: ExportMetadata, instances: int, max_batch: int = 0
) -> str:
    """``config.pbtxt`` of an ``onnxruntime_onnx`` or ``tensorrt_plan`` model, a GPU instance group.

    ``max_batch`` > 0 (the graph's batch dimension is dynamic): ``max_batch_size`` and ``dynamic_batching``,
    and the dims of one request, without the batch. 0: the export's fixed shapes, passed through unbatched.
    """
    inputs, outputs = onnx_io(onnx_path)
    if max_batch and inputs[0][2][0] != -1:
        raise ValueError(f"{onnx_path}: max_batch {max_batch} needs a dynamic batch dimension, found {inputs[0][2]}")
    text = f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {int(max_batch)}\n'
    if max_batch:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {DEFAULT_QUEUE_DELAY_US} }}\n"
    text += f"instance_group [ {{ count: {int(instances)} kind: KIND_GPU }} ]\n"
    for kind, rows in (("input", inputs), ("output", outputs)):
        for n, dtype, dims in rows:
            text += _io(kind, n, dtype, dims[1:] if max_batch else dims)
    return text + _parameters(_common_parameters(meta))


def deepstream_config(name: str, onnx_name: str, engine_name: str | None, meta: ExportMetadata,
                      onnx_path: Path, max_batch: int = 0) -> str:  # fmt: skip
    """A DeepStream ``nvinfer`` config (``network-type=100``: "other", raw output tensors attached as metadata).

    nvinfer's preprocessing is ``y = net-scale-factor * (x - offsets)`` on 0..255 pixels, per channel with one
    scale factor: the export's ``(x / 255 - mean) / std`` maps onto it exactly when ``std`` is the same for every
    channel (true for exports made by ``edgead train``); otherwise this raises. ``batch-size`` is the ONNX's
    fixed batch, or ``max_batch`` for a batch-dynamic ONNX (nvinfer builds its engine for that many sources).
    """
    pre = meta.preprocess
    std, mean = [float(v) for v in pre["std"]], [float(v) for v in pre["mean"]]
    if len(set(std)) != 1:
        raise ValueError(f"DeepStream's nvinfer has one scale factor; this export's std differs per channel: {std}")
    inputs, outputs = onnx_io(onnx_path)
    in_name, _, in_dims = inputs[0]
    # GKeyFile (nvinfer's format) has no inline comments: every comment is a line of its own.
    lines = [
        "# DeepStream nvinfer config written by edgead export --format triton (not run here: needs DeepStream).",
        f"# input: {in_name} {in_dims}; outputs: " + ", ".join(f"{n} {dims}" for n, _, dims in outputs),
        f"# decision: score >= {float(meta.threshold_value)!r} (the export's calibrated threshold)",
        "[property]",
        "gpu-id=0",
        f"net-scale-factor={1.0 / (255.0 * std[0])!r}",
        "offsets=" + ";".join(repr(255.0 * m) for m in mean),
        f"onnx-file={onnx_name}",
        *([f"model-engine-file={engine_name}"] if engine_name else []),
        f"batch-size={in_dims[0] if in_dims[0] > 0 else int(max_batch)}",
        "# 0 FP32, 1 INT8, 2 FP16",
        "network-mode=2",
        "# 100: other (no detector or classifier post-processing); the raw tensors go to the metadata",
        "network-type=100",
        "output-tensor-meta=1",
        "# 0 RGB, 2 GRAY",
        f"model-color-format={0 if pre['channels'] == 3 else 2}",
        f"infer-dims={';'.join(str(d) for d in in_dims[1:])}",
        f"output-blob-names={';'.join(n for n, _, _ in outputs)}",
        "# edgead squashes frames to the square input, it does not letterbox",
        "maintain-aspect-ratio=0",
    ]
    return "\n".join(lines) + "\n"


#: OpenCV's RGB -> gray weights (``cv2.COLOR_RGB2GRAY``), the shared preprocessing's conversion.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def fold_preprocessing(onnx_path: Path, out_path: Path, preprocess: dict[str, Any]) -> None:
    """A copy of the graph whose input is raw RGB, ``[B, 3, S, S]`` float32 in 0..255 (resized by the client; ``B``
    fixed or dynamic, as in the graph):
    the export's ``(x / 255 - mean) / std`` (and, for a grayscale export, OpenCV's RGB -> gray weights) become
    the graph's first nodes. For a client or DeepStream that sends pixels without normalising them. The one
    difference from the shared preprocessing: OpenCV rounds the gray value to an integer, the graph does not
    (at most 0.5 / 255 per pixel)."""
    import numpy as np
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    original = graph.input[0]
    name = original.name
    inner = f"{name}_normalised"
    for node in graph.node:
        node.input[:] = [inner if value == name else value for value in node.input]
    batch_dim = original.type.tensor_type.shape.dim[0]
    batch = batch_dim.dim_param if batch_dim.dim_param else batch_dim.dim_value  # dynamic stays dynamic
    dims = [d.dim_value for d in original.type.tensor_type.shape.dim]
    channels = int(preprocess["channels"])
    mean = np.array(preprocess["mean"], np.float32).reshape(1, channels, 1, 1)
    std = np.array(preprocess["std"], np.float32).reshape(1, channels, 1, 1)
    nodes, current = [], name
    if channels == 1:
        weights = np.array(GRAY_WEIGHTS, np.float32).reshape(1, 3, 1, 1)
        graph.initializer.append(numpy_helper.from_array(weights, f"{name}_gray_weights"))
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{name}_gray_axis"))
        nodes += [
            helper.make_node("Mul", [current, f"{name}_gray_weights"], [f"{name}_weighted"]),
            helper.make_node("ReduceSum", [f"{name}_weighted", f"{name}_gray_axis"], [f"{name}_gray"], keepdims=1),
        ]
        current = f"{name}_gray"
    graph.initializer.append(numpy_helper.from_array(1.0 / (255.0 * std), f"{name}_scale"))
    graph.initializer.append(numpy_helper.from_array(-mean / std, f"{name}_shift"))
    nodes += [
        helper.make_node("Mul", [current, f"{name}_scale"], [f"{name}_scaled"]),
        helper.make_node("Add", [f"{name}_scaled", f"{name}_shift"], [inner]),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    graph.input.remove(original)
    graph.input.insert(0, helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [batch, 3, *dims[2:]]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same file system: no second copy of the weights
    except OSError:
        shutil.copy2(src, dst)


def execution_env() -> str | None:
    """This interpreter's environment when it is a virtual environment (Triton's Python stub then activates
    it: ``EXECUTION_ENV_PATH``), else None (the server's own Python must have edgead installed)."""
    return sys.prefix if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").is_file() else None


def write_repository(
    export_dir: Path,
    repo_dir: Path,
    name: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    instances: int = 1,
    env: str | None = "auto",
    raw_input: bool = False,
) -> dict[str, Any]:
    """Write the Triton model repository of the export in ``export_dir`` into ``repo_dir`` (see the module
    docstring); returns ``{"repository", "models": {name: platform}, "deepstream"}``. ``raw_input`` gives the
    ``onnxruntime_onnx`` model raw RGB input (:func:`fold_preprocessing`)."""
    export_dir = Path(export_dir).resolve()
    meta = load_metadata(export_dir)
    name = name or meta.method.replace("-", "_")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    # The Python model runs the fixed-shape export through the Detector: the Triton-only graphs stay out of it.
    files = ["edgead.json", *[record["file"] for record in _records(meta, skip=TRITON_ARTIFACTS)]]
    models: dict[str, str] = {}
    python_dir = repo_dir / name
    for file in files:
        _copy(export_dir / file, python_dir / "1" / "export" / file)
    shutil.copyfile(triton_model.__file__, python_dir / "1" / "model.py")
    env_path = execution_env() if env == "auto" else env
    (python_dir / "config.pbtxt").write_text(python_model_config(name, meta, max_batch, instances, env_path))
    models[name] = "python"
    batched = meta.artifacts.get("onnx_batched")
    graph_batch = int(batched.get("max_batch", 0)) if batched else 0
    if graph_batch < 2:  # no batched graph (older export) or --max-batch 1: fixed shapes, max_batch_size 0
        batched, graph_batch = None, 0
    onnx_path = export_dir / (batched or meta.artifacts["onnx"])["file"]
    onnx_dir = repo_dir / f"{name}_onnx"
    if raw_input:
        (onnx_dir / "1").mkdir(parents=True, exist_ok=True)
        fold_preprocessing(onnx_path, onnx_dir / "1" / "model.onnx", meta.preprocess)
    else:
        _copy(onnx_path, onnx_dir / "1" / "model.onnx")
    config = graph_model_config(
        f"{name}_onnx", "onnxruntime_onnx", onnx_dir / "1" / "model.onnx", meta, instances, graph_batch
    )
    if raw_input:
        config += 'parameters { key: "edgead_input" value { string_value: "raw RGB 0..255, resized by the client" } }\n'
    (onnx_dir / "config.pbtxt").write_text(config)
    models[f"{name}_onnx"] = "onnxruntime_onnx"
    # Triton's TensorRT backend cannot load TensorRT-RTX engines: only NVIDIA TensorRT plans are served. The
    # batch-dynamic plan when the export built one, else the fixed-shape engine of --format tensorrt.
    engine, plan_batch = None, 0
    if batched is not None and meta.artifacts.get("triton_engines"):
        engine, plan_batch = meta.artifacts["triton_engines"][0], graph_batch
    if engine is None:
        engine = find_engine(meta, flavour="tensorrt")
    if engine is not None:
        trt_dir = repo_dir / f"{name}_trt"
        _copy(export_dir / engine["file"], trt_dir / "1" / "model.plan")
        plan_onnx = onnx_path if plan_batch else export_dir / meta.artifacts["onnx"]["file"]
        text = graph_model_config(f"{name}_trt", "tensorrt_plan", plan_onnx, meta, instances, plan_batch)
        capabilities = engine.get("compute_capabilities") or []
        if len(capabilities) > 1:
            text += "cc_model_filenames [ " + ", ".join(f'{{ key: "{c}" value: "model.plan" }}' for c in capabilities)
            text += " ]\n"
        (trt_dir / "config.pbtxt").write_text(text)
        models[f"{name}_trt"] = "tensorrt_plan"
    deepstream = repo_dir / "deepstream" / f"{name}_nvinfer.txt"
    deepstream.parent.mkdir(parents=True, exist_ok=True)
    rel_onnx = os.path.relpath(onnx_dir / "1" / "model.onnx", deepstream.parent)
    rel_engine = os.path.relpath(repo_dir / f"{name}_trt" / "1" / "model.plan", deepstream.parent) if engine else None
    deepstream.write_text(deepstream_config(name, rel_onnx, rel_engine, meta, onnx_path, graph_batch or max_batch))
    return {"repository": str(repo_dir), "models": models, "deepstream": str(deepstream)}


#: Artifacts only the Triton graph models use (``edgead.export.exporter``'s ``--format triton`` steps).
TRITON_ARTIFACTS = frozenset({"onnx_batched", "onnx_batched_fp16", "triton_engines"})


def _records(meta: ExportMetadata, skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    records = []
    for key, value in meta.artifacts.items():
        if key in skip:
            continue
        records.extend(value if isinstance(value, list) else [value])
    return [r for r in records if isinstance(r, dict) and "file" in r]


__all__ = ["deepstream_config", "fold_preprocessing", "graph_model_config", "python_model_config", "write_repository"]
