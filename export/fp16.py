"""FP16 graphs whose numerically sensitive parts stay FP32, for strongly typed TensorRT (>= 11, RTX).

Strongly typed TensorRT runs every layer in the type the ONNX graph gives it, so the FP16 export must
say exactly where FP16 is safe. Rules, applied to a copy of a method's inference graph:

- the networks (the graph's ``fp16_modules``, by default every direct child with parameters) run in
  FP16: convolutions, matmuls and activations, where FP16 tensor cores pay off;
- normalisation layers (GroupNorm, LayerNorm, BatchNorm) compute their statistics in FP32;
- any module that declares ``keep_fp32 = True`` stays FP32 (the U-Net's time / position embeddings do:
  sin and cos of large arguments); export knows no particular network;
- everything outside the networks (noise injection, the error reduction, means over draws, resizing,
  the mean filter, the max pooling, Mahalanobis distances) stays FP32, as does the graph's IO.

The result is a plain ``nn.Module`` whose trace has explicit Cast nodes at each boundary.

Weakly typed TensorRT (10, Jetson) builds FP16 from the FP32 ONNX with a builder flag and would otherwise pick
FP16 for any layer; :func:`fp32_node_names` lists the FP32 ONNX's nodes that the same rules keep in FP32 (from
the module scopes the exporter records on each node), and the engine build constrains those layers to FP32.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgead.methods.wrapping import networks_of

#: Normalisation layers whose statistics need FP32 range and precision, in any network.
FP32_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def keeps_fp32(module: nn.Module) -> bool:
    """Whether ``module`` stays FP32 inside an FP16 network: a normalisation layer, or declared by its class."""
    return isinstance(module, FP32_MODULE_TYPES) or bool(getattr(module, "keep_fp32", False))


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


class FP32Island(nn.Module):
    """Runs ``module`` in FP32 inside an FP16 network: inputs up-cast, outputs down-cast to FP16."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.float()

    def forward(self, *args: Any) -> Any:
        return _cast(self.module(*_cast(args, torch.float32)), torch.float16)


class HalfNetwork(nn.Module):
    """Runs ``module`` in FP16 with FP32 inputs and outputs, keeping :func:`keeps_fp32` modules in FP32."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()
        _wrap_fp32_islands(self.module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _cast(self.module(*_cast(args, torch.float16), **_cast(kwargs, torch.float16)), torch.float32)


def _wrap_fp32_islands(module: nn.Module) -> None:
    for name, child in module.named_children():
        if keeps_fp32(child):
            setattr(module, name, FP32Island(child))
        else:
            _wrap_fp32_islands(child)


def fp16_module_names(graph: nn.Module) -> list[str]:
    """The graph's networks: ``graph.fp16_modules`` if it declares them, else its children with parameters."""
    return networks_of(graph)


def mixed_precision_graph(graph: nn.Module) -> nn.Module:
    """A copy of ``graph`` with its networks in FP16 and the sensitive parts in FP32 (see module docstring)."""
    mixed = copy.deepcopy(graph).float().eval()
    names = fp16_module_names(mixed)
    if not names:
        raise ValueError(f"{type(graph).__name__} has no network to run in FP16")
    for name in names:  # a dotted name (a wrapped graph's network, "graph.backbone") replaces the child in place
        parent, _, child = name.rpartition(".")
        owner = mixed.get_submodule(parent) if parent else mixed
        setattr(owner, child, HalfNetwork(getattr(owner, child)))
    return mixed


SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def split_nodes(graph: nn.Module, model: Any, set_aside: Callable[[nn.Module], bool]) -> tuple[list[str], list[str]]:
    """``(inside, outside)``: the names of the nodes of ``model`` (the ONNX of ``graph``) inside the graph's
    networks (:func:`fp16_module_names`) and outside every module of theirs that ``set_aside`` marks, and of every
    other node. A node's module is the deepest of the name scopes the exporter records on it; a node without
    scopes (a graph traced first, such as one with gradients) counts as outside the networks."""
    networks = fp16_module_names(graph)
    aside = [
        f"{name}.{path}" if path else name
        for name in networks
        for path, module in graph.get_submodule(name).named_modules()
        if set_aside(module)
    ]

    def within(path: str, prefixes: list[str]) -> bool:
        return any(path == prefix or path.startswith(prefix + ".") for prefix in prefixes)

    inside, outside = [], []
    for node in model.graph.node:
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == SCOPES_KEY), [])
        path = scopes[-2] if len(scopes) >= 2 else ""
        (inside if within(path, networks) and not within(path, aside) else outside).append(node.name)
    return inside, outside


def fp32_node_names(graph: nn.Module, model: Any) -> list[str]:
    """Names of the nodes of ``model`` (the FP32 ONNX of ``graph``) that the rules above keep in FP32: every node
    outside the graph's networks and inside a :func:`keeps_fp32` module (:func:`split_nodes`); a node without
    scopes stays FP32: accuracy before speed."""
    return split_nodes(graph, model, keeps_fp32)[1]
