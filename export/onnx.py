"""Trace an inference graph to one ONNX file with fixed shapes, check it, fold constants."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from edgead.data.files import atomic_output, file_sha256
from edgead.runtime.backends.base import INPUT_NAME, OUTPUT_NAMES

DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """Tracing, checking or verifying an export failed; the message says which step and file."""


def export_onnx(
    graph: nn.Module,
    path: Path,
    input_shape: tuple[int, ...],
    opset: int = DEFAULT_OPSET,
    max_batch: int | None = None,
) -> dict[str, Any]:
    """Trace ``graph`` (``image -> (anomaly_map, score)``) to ``path``.

    Uses the ``torch.export``-based exporter (``dynamo=True``) with its optimiser, which folds constants
    (the fixed noise, ``sigma_k``, the filter weights) and removes dead nodes; then runs the ONNX checker
    with shape inference. Shapes are fixed (no dynamic axes) so TensorRT builds one optimal profile; with
    ``max_batch`` the batch dimension is dynamic instead (``batch``, 1..``max_batch``; ``input_shape``'s batch
    is ignored), for servers that batch requests (Triton). edgead graphs treat every image independently, so
    nothing but the batch size changes.

    A graph that declares ``has_gradients`` (its forward differentiates a network, e.g. MDPS's guidance)
    is first traced into a forward-only graph (:func:`edgead.export.gradients.trace_gradients`); for it the
    exporter's full optimiser (minutes on unrolled backward passes) is replaced by constant folding and dead-node
    removal, which take seconds; ONNX Runtime and TensorRT fuse the rest when they load the model.

    Returns:
        ``{"file", "sha256", "bytes", "opset", "nodes", "seconds"}``.
    """
    if opset < 18:
        raise ValueError(f"opset must be >= 18, got {opset}")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    graph = graph.eval()
    name = type(graph).__name__
    dynamic = max_batch is not None and max_batch > 1
    if max_batch is not None:
        # A batch of 2 to trace with: the exporter specialises sizes 0 and 1.
        input_shape = (2 if dynamic else 1, *input_shape[1:])
    example = torch.rand(*input_shape, dtype=torch.float32)
    batch_dim = {0: torch.export.Dim("batch", min=1, max=max_batch)} if dynamic else None
    start = time.perf_counter()
    with atomic_output(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's informational warnings are noise for users
        try:
            gradients = bool(getattr(graph, "has_gradients", False))
            if gradients:
                from edgead.export.gradients import trace_gradients

                graph = trace_gradients(graph, example, dynamic_batch=dynamic)
            if batch_dim is None:
                dynamic_shapes = None
            else:  # a traced gradient graph takes *inputs, so its spec is nested one level deeper
                dynamic_shapes = ((batch_dim,),) if gradients else (batch_dim,)
            program = torch.onnx.export(
                graph,
                (example,),
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                optimize=not gradients,
                external_data=False,
                verbose=False,
            )
        except Exception as err:  # the exporter raises many error types; the user needs the step and cause
            raise ExportError(f"tracing {name} to ONNX failed: {err}") from err
        if gradients:
            import onnxscript.optimizer

            onnxscript.optimizer.fold_constants(program.model)
            onnxscript.optimizer.remove_unused_nodes(program.model)
        program.save(str(tmp))
        model = onnx.load(str(tmp))
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as err:
            raise ExportError(f"{path.name}: the ONNX checker rejected the export: {err}") from err
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "opset": opset,
        "nodes": len(model.graph.node),
        "seconds": round(time.perf_counter() - start, 2),
        **({"batch": f"dynamic 1..{max_batch}"} if dynamic else {}),
    }


def load_checked(path: Path) -> onnx.ModelProto:
    """Load an ONNX file and run the checker, with an error naming the file when it is corrupt."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as err:  # DecodeError for truncated protobufs, ValidationError for bad graphs
        raise ExportError(f"{path}: not a valid ONNX model ({err})") from err
    return model
