"""Gradients of a network inside an inference graph (a graph may contain gradients of its networks).

A method whose inference needs the gradient of a loss through a network with respect to the network's
input (MDPS's posterior guidance, eq. 16-17) computes it with :func:`value_and_input_grad`, in eager
PyTorch, under ``torch.no_grad()`` or not. The graph then sets ``has_gradients = True``, and the export
(``edgead.export.gradients``) traces the forward and backward passes into one plain forward graph before
writing ONNX, since the ONNX exporter cannot export ``torch.autograd.grad`` itself.

Example:
    >>> def loss(x):
    ...     eps = unet(x, t)
    ...     return (y - (x - c * eps)).flatten(1).norm(dim=1), eps
    >>> grad, eps = value_and_input_grad(loss, x_t)  # d loss_i / d x_i per sample, and eps (detached)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def value_and_input_grad(fn: Callable[[Tensor], tuple[Tensor, Any]], x: Tensor) -> tuple[Tensor, Any]:
    """``(d sum(loss) / d x, aux)`` for ``loss, aux = fn(x)``, with ``aux``'s tensors detached.

    ``loss`` is one value per sample ``(B,)``; their sum is differentiated, so each sample's gradient is
    its own loss's gradient as long as the network treats samples independently (no batch statistics).
    Only ``x`` is differentiated: the network's parameters get no gradient and keep their ``.grad``.
    """
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        loss, aux = fn(leaf)
        if loss.ndim != 1 or loss.shape[0] != x.shape[0]:
            raise ValueError(f"the loss must be one value per sample ({x.shape[0]},), got {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return grad.detach(), _detach(aux)


def _detach(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, tuple | list):
        return type(value)(_detach(v) for v in value)
    return value


__all__ = ["value_and_input_grad"]
