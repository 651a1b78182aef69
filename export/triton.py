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

Batching. edgead graphs are exported with fixed shapes (``--batch``), so the ``onnxruntime_onnx`` and
``tensorrt_plan`` models declare ``max_batch_size: 0`` and the export's fixed input ``[B, C, S, S]``: Triton
passes tensors through without batching them. Batching across cameras happens in the Python model, whose
``FRAME`` input has a batch dimension (``max_batch_size``) and whose ``dynamic_batching`` lets Triton queue
requests together; it pads them to the export's batch itself. The preprocessed input of the ONNX / TensorRT
models is ``(x / 255 - mean) / std`` of the export's ``preprocess`` (in ``edgead.json`` and the config's
``parameters``).

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
    """``(inputs, outputs)`` of an ONNX file as ``(name, Triton type, dims)``; every dim must be fixed."""
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


def graph_model_config(name: str, platform: str, onnx_path: Path, meta: ExportMetadata, instances: int) -> str:
    """``config.pbtxt`` of an ``onnxruntime_onnx`` or ``tensorrt_plan`` model: the export's fixed shapes,
    ``max_batch_size: 0`` (see the module docstring), a GPU instance group."""
    inputs, outputs = onnx_io(onnx_path)
    text = f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: 0\n'
    text += f"instance_group [ {{ count: {int(instances)} kind: KIND_GPU }} ]\n"
    for n, dtype, dims in inputs:
        text += _io("input", n, dtype, dims)
    for n, dtype, dims in outputs:
        text += _io("output", n, dtype, dims)
    return text + _parameters(_common_parameters(meta))


def deepstream_config(name: str, onnx_name: str, engine_name: str | None, meta: ExportMetadata,
                      onnx_path: Path) -> str:  # fmt: skip
    """A DeepStream ``nvinfer`` config (``network-type=100``: "other", raw output tensors attached as metadata).

    nvinfer's preprocessing is ``y = net-scale-factor * (x - offsets)`` on 0..255 pixels, per channel with one
    scale factor: the export's ``(x / 255 - mean) / std`` maps onto it exactly when ``std`` is the same for every
    channel (true for exports made by ``edgead train``); otherwise this raises.
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
        f"batch-size={in_dims[0]}",
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
    """A copy of the graph whose input is raw RGB, ``[B, 3, S, S]`` float32 in 0..255 (resized by the client):
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
    graph.input.insert(0, helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [dims[0], 3, *dims[2:]]))
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
    files = ["edgead.json", *[record["file"] for record in _records(meta)]]
    models: dict[str, str] = {}
    python_dir = repo_dir / name
    for file in files:
        _copy(export_dir / file, python_dir / "1" / "export" / file)
    shutil.copyfile(triton_model.__file__, python_dir / "1" / "model.py")
    env_path = execution_env() if env == "auto" else env
    (python_dir / "config.pbtxt").write_text(python_model_config(name, meta, max_batch, instances, env_path))
    models[name] = "python"
    onnx_path = export_dir / meta.artifacts["onnx"]["file"]
    onnx_dir = repo_dir / f"{name}_onnx"
    if raw_input:
        (onnx_dir / "1").mkdir(parents=True, exist_ok=True)
        fold_preprocessing(onnx_path, onnx_dir / "1" / "model.onnx", meta.preprocess)
    else:
        _copy(onnx_path, onnx_dir / "1" / "model.onnx")
    config = graph_model_config(f"{name}_onnx", "onnxruntime_onnx", onnx_dir / "1" / "model.onnx", meta, instances)
    if raw_input:
        config += 'parameters { key: "edgead_input" value { string_value: "raw RGB 0..255, resized by the client" } }\n'
    (onnx_dir / "config.pbtxt").write_text(config)
    models[f"{name}_onnx"] = "onnxruntime_onnx"
    engine = find_engine(meta, flavour="tensorrt")  # Triton's TensorRT backend cannot load TensorRT-RTX engines
    if engine is not None:
        trt_dir = repo_dir / f"{name}_trt"
        _copy(export_dir / engine["file"], trt_dir / "1" / "model.plan")
        text = graph_model_config(f"{name}_trt", "tensorrt_plan", onnx_path, meta, instances)
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
    deepstream.write_text(deepstream_config(name, rel_onnx, rel_engine, meta, onnx_path))
    return {"repository": str(repo_dir), "models": models, "deepstream": str(deepstream)}


def _records(meta: ExportMetadata) -> list[dict[str, Any]]:
    records = []
    for value in meta.artifacts.values():
        records.extend(value if isinstance(value, list) else [value])
    return [r for r in records if isinstance(r, dict) and "file" in r]


__all__ = ["deepstream_config", "fold_preprocessing", "graph_model_config", "python_model_config", "write_repository"]
