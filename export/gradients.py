"""Export graphs that contain gradients of their networks (``graph.has_gradients``).

``torch.onnx.export`` cannot export a module whose forward calls ``torch.autograd.grad``: ONNX has no
autograd. A gradient of a fixed network with respect to its input is, however, an ordinary function of
the input: the backward pass is a chain of plain ops (transposed convolutions, sums, products). So we
first trace the forward and backward passes together into one forward-only FX graph with
``make_fx`` (the same machinery AOTAutograd uses for joint graphs), decomposing the backward ops into
forward ops that ONNX and TensorRT have:

- ``convolution_backward`` -> the input gradient as a transposed convolution with the same weights
  (plus a sum for the bias gradient; weight gradients are never needed, the parameters are frozen);
- ``upsample_nearest2d_backward`` (integer scale) -> a reshape and a sum over each block;
- the other backward ops (GroupNorm, softmax, SiLU, GELU, ...) -> PyTorch's own core-ATen decompositions.

Forward ops are not decomposed, so the traced graph exports to the same ONNX ops as a gradient-free
graph. Any backward op left after tracing is reported by name (:class:`GradientTraceError`) rather than
failing inside the ONNX exporter. :func:`trace_gradients` is method-agnostic; tests check its parity
with eager PyTorch on its own (``tests/export/test_gradients.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

aten = torch.ops.aten


class GradientTraceError(RuntimeError):
    """A graph's backward pass has an op that :func:`trace_gradients` cannot turn into forward ops."""


def _convolution_backward(
    grad_output: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The input gradient of a convolution is the transposed convolution of the output gradient with the
    same weights; ``output_padding`` restores input sizes that the stride rounded down."""
    if transposed:
        raise GradientTraceError("the gradient through a transposed convolution is not supported")
    if output_mask[1]:
        raise GradientTraceError("a weight gradient was requested: freeze the network's parameters")
    grad_input = None
    if output_mask[0]:
        extra = []
        for i in range(inp.dim() - 2):
            kernel = dilation[i] * (weight.shape[2 + i] - 1) + 1
            size = (grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + kernel
            extra.append(int(inp.shape[2 + i]) - int(size))
        grad_input = aten.convolution.default(grad_output, weight, None, stride, padding, dilation, True, extra, groups)
    grad_bias = grad_output.sum(dim=[0, *range(2, grad_output.dim())]) if output_mask[2] else None
    return grad_input, None, grad_bias


def _upsample_nearest2d_backward(
    grad_output: torch.Tensor,
    output_size: Sequence[int],
    input_size: Sequence[int],
    scales_h: float | None = None,
    scales_w: float | None = None,
) -> torch.Tensor:
    """Nearest upsampling by an integer factor copies each pixel into a block; its gradient sums the block."""
    n, c = grad_output.shape[:2]  # kept symbolic: a batch traced as dynamic stays dynamic
    h, w = (int(v) for v in input_size[2:])
    out_h, out_w = (int(v) for v in output_size)
    if out_h % h or out_w % w:
        raise GradientTraceError(f"nearest upsampling {h}x{w} -> {out_h}x{out_w} is not by an integer factor")
    return grad_output.reshape(n, c, h, out_h // h, w, out_w // w).sum(dim=(3, 5))


@functools.cache
def gradient_decompositions() -> dict[Any, Callable[..., Any]]:
    """Backward op -> forward ops: ours (above) over PyTorch's core-ATen decompositions of backward ops."""
    from torch._decomp import core_aten_decompositions

    table = {op: fn for op, fn in core_aten_decompositions().items() if "backward" in str(op)}
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.upsample_nearest2d_backward.default] = _upsample_nearest2d_backward
    return table


class TracedGraph(nn.Module):
    """A traced forward-only graph with the original graph's parameters and buffers as its own buffers, each
    stored once however often the traced forward and backward passes use it."""

    def __init__(self, traced: torch.fx.GraphModule, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.traced = traced
        self.names = list(state)
        for i, name in enumerate(self.names):
            self.register_buffer(f"state_{i}", state[name])

    def forward(self, *inputs: torch.Tensor) -> Any:
        state = {name: getattr(self, f"state_{i}") for i, name in enumerate(self.names)}
        return self.traced(state, *inputs)


def trace_gradients(graph: nn.Module, *example: torch.Tensor, dynamic_batch: bool = False) -> TracedGraph:
    """``graph`` (whose forward may call ``torch.autograd.grad``) traced on ``example`` into one graph of
    forward ops that computes the same outputs; export that with ``torch.onnx.export``.

    The parameters and buffers enter the trace as inputs (``torch.func.functional_call``), detached, so the
    traced graph refers to each one once and computes no gradient for any of them.

    With ``dynamic_batch`` the trace runs on fake tensors whose first input's batch size is symbolic (every
    other size, and every parameter, static), under the Python dispatcher so that composite ops such as
    ``group_norm`` decompose symbolically instead of baking the example's batch in.

    Raises:
        GradientTraceError: a backward op without a decomposition remains (named in the message).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = graph.eval()
    state = {name: t.detach() for name, t in [*graph.named_parameters(), *graph.named_buffers()]}

    def call(values: dict[str, torch.Tensor], *inputs: torch.Tensor) -> Any:
        return torch.func.functional_call(graph, values, inputs)

    if dynamic_batch:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        mode = FakeTensorMode(shape_env=ShapeEnv())
        first, *rest = example
        sizes = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (first.dim() - 1)
        fake_inputs = [mode.from_tensor(first, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))]
        fake_inputs += [mode.from_tensor(t, static_shapes=True) for t in rest]
        fake_state = {name: mode.from_tensor(t, static_shapes=True) for name, t in state.items()}
        traced = make_fx(call, decomposition_table=gradient_decompositions(), tracing_mode="fake")(
            fake_state, *fake_inputs
        )
    else:
        traced = make_fx(call, decomposition_table=gradient_decompositions(), tracing_mode="real")(state, *example)
    calls = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    left = sorted(op for op in calls if "backward" in op)
    if left:
        raise GradientTraceError(
            f"{type(graph).__name__}: the backward pass uses {', '.join(left)}, which has no forward decomposition "
            "here; add one to edgead.export.gradients"
        )
    return TracedGraph(traced, state)


__all__ = ["GradientTraceError", "TracedGraph", "gradient_decompositions", "trace_gradients"]
