"""A graph may contain gradients of its networks: eager PyTorch, the traced forward graph and ONNX Runtime agree."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgead.export.gradients import GradientTraceError, trace_gradients
from edgead.export.onnx import export_onnx
from edgead.nn.gradients import value_and_input_grad
from edgead.nn.unet import ScoreUNet, UNetConfig


class GuidedStep(nn.Module):
    """A DPS-like step: ``eps + d ||y - x0(x)|| / dx`` through a U-Net with every layer kind the methods use
    (stride-2 and 3x3 convolutions, GroupNorm, attention, SiLU, nearest upsampling, the time MLP)."""

    has_gradients = True

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((y.shape[0],), 0.3, dtype=y.dtype)

        def loss(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            eps = self.net(x, t)
            return (y - (x - 0.5 * eps)).flatten(1).norm(dim=1), eps

        grad, eps = value_and_input_grad(loss, 0.8 * y)
        out = eps + 10.0 * grad
        return out.square().sum(dim=1), out.abs().flatten(1).mean(dim=1)


def _net(dtype: torch.dtype = torch.float32) -> ScoreUNet:
    torch.manual_seed(0)
    return ScoreUNet(UNetConfig.preset("tiny", in_channels=3)).to(dtype).eval()


def test_value_and_input_grad_matches_finite_differences() -> None:
    net = _net(torch.float64)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    t = torch.full((2,), 0.3, dtype=torch.float64)

    def loss(v: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (v - net(v, t)).square().flatten(1).sum(dim=1), None

    with torch.no_grad():  # the helper turns gradients on itself
        grad, _ = value_and_input_grad(loss, x)
        for index in [(0, 0, 3, 4), (1, 2, 15, 0), (1, 1, 8, 8)]:
            step = torch.zeros_like(x)
            step[index] = 1e-6
            numeric = (loss(x + step)[0] - loss(x - step)[0])[index[0]] / 2e-6
            assert abs(float(numeric) - float(grad[index])) < 1e-6 * max(1.0, abs(float(numeric)))
    assert all(p.grad is None for p in net.parameters())  # only the input was differentiated


def test_traced_gradient_graph_equals_eager_in_float64() -> None:
    graph = GuidedStep(_net(torch.float64))
    y = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    traced = trace_gradients(graph, y)
    assert not any("backward" in str(n.target) for n in traced.traced.graph.nodes)
    for ref, out in zip(graph(y), traced(y), strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert all(p.requires_grad for p in graph.parameters())  # restored after tracing


@pytest.mark.parametrize("max_batch", [None, pytest.param(8, marks=pytest.mark.slow)])
def test_gradient_graph_exports_to_onnx_with_parity(tmp_path, max_batch: int | None) -> None:
    """Fixed batch 2, or a dynamic batch 1..8 run at 1, 2 and 5 (group norm, the guidance's per-image norm and
    the transposed-convolution gradients all follow the batch size)."""
    graph = GuidedStep(_net())
    record = export_onnx(graph, tmp_path / "g.onnx", (2, 3, 32, 32), max_batch=max_batch)
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape == ([2, 3, 32, 32] if max_batch is None else ["batch", 3, 32, 32])
    for batch in [2] if max_batch is None else [1, 2, 5]:
        y = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            ref = [r.numpy() for r in graph(y)]
        outs = session.run(None, {session.get_inputs()[0].name: y.numpy()})
        for r, o in zip(ref, outs, strict=True):
            assert o.shape == r.shape and np.abs(o - r).max() <= 1e-4 * max(1.0, np.abs(r).max())
    assert record["nodes"] > 0 and record.get("batch") == (None if max_batch is None else "dynamic 1..8")


def test_unsupported_backward_is_named() -> None:
    class Transposed(nn.Module):
        has_gradients = True

        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 3, 2, stride=2)

        def forward(self, y: torch.Tensor) -> torch.Tensor:
            grad, _ = value_and_input_grad(lambda x: (self.up(x).flatten(1).sum(dim=1), None), y)
            return grad

    with pytest.raises(GradientTraceError, match="transposed convolution"):
        trace_gradients(Transposed(), torch.rand(1, 3, 8, 8))
