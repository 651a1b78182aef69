"""What a graph that wraps method graphs (calibrated maps, tiles, fusion) tells export about them."""

from __future__ import annotations

from torch import nn


def networks_of(graph: nn.Module) -> list[str]:
    """The graph's networks, which the FP16 export runs in FP16: ``graph.fp16_modules`` if it declares them
    (dotted names reach into wrapped graphs), else its direct children that hold parameters."""
    declared = getattr(graph, "fp16_modules", None)
    if declared is not None:
        return list(declared)
    return [name for name, child in graph.named_children() if any(True for _ in child.parameters())]


def wrapped_networks(inner: dict[str, nn.Module]) -> tuple[str, ...]:
    """The ``fp16_modules`` of a wrapper holding ``inner`` graphs under the attribute names given as keys."""
    return tuple(f"{attribute}.{name}" for attribute, graph in inner.items() for name in networks_of(graph))


def has_gradients(*graphs: nn.Module) -> bool:
    """Whether any wrapped graph differentiates a network (export then traces its gradients)."""
    return any(bool(getattr(graph, "has_gradients", False)) for graph in graphs)
