"""Fixed image filters as export-friendly modules (plain ``conv2d`` with constant kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resize(x: Tensor, size: tuple[int, int] | list[int], mode: str) -> Tensor:
    """``F.interpolate(x, size=size, mode=mode)`` (``align_corners=False`` for bilinear), called as the aten op
    with the output size: the same result, but ``interpolate``'s composite pins the batch size when a graph with
    gradients is traced with a dynamic batch (:mod:`edgead.export.gradients`)."""
    out = [int(size[0]), int(size[1])]
    if mode == "nearest":
        return torch.ops.aten.upsample_nearest2d.default(x, out)
    if mode == "bilinear":
        return torch.ops.aten.upsample_bilinear2d.default(x, out, False)
    raise ValueError(f"resize: mode must be 'nearest' or 'bilinear', got {mode!r}")


class GaussianBlur(nn.Module):
    """Separable Gaussian filter of ``(B, 1, H, W)`` maps with reflect padding; the identity when ``sigma`` is 0.

    The kernel has radius ``max(1, round(truncate * sigma))`` and is normalised to sum 1
    (``truncate = 4`` is ``scipy.ndimage.gaussian_filter``'s default, which anomaly-detection code such as
    UniAD and LafitE uses for eq. 12's ``g_sigma``). Reflect padding needs ``H, W > radius``.
    """

    def __init__(self, sigma: float, truncate: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        if self.sigma < 0:
            raise ValueError(f"Gaussian sigma must be >= 0, got {sigma}")
        if self.sigma > 0:
            radius = max(1, round(truncate * self.sigma))
            x = torch.arange(-radius, radius + 1, dtype=torch.float64)
            kernel = torch.exp(-0.5 * (x / self.sigma) ** 2)
            self.register_buffer("kernel", (kernel / kernel.sum()).float())
        else:
            self.register_buffer("kernel", torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        if self.sigma <= 0:
            return x
        k = self.kernel.to(x.dtype)
        pad = k.shape[0] // 2
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        return F.conv2d(x, k.view(1, 1, -1, 1))
