"""The score-tscale inference graph: Algorithms 1 and 2 of Teng et al. (appendix A.3) as one ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.diffusion.sde import SDE, broadcast_like, perturb, probability_flow_step, reverse_sde_step
from edgead.methods.base import InferenceGraph
from edgead.methods.scoring import MapScore
from edgead.nn.filters import GaussianBlur

SAMPLERS = ("ode", "sde")
COMBINES = ("product", "sum")

ScoreFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def tscale_pair(
    x0: Tensor,
    t: Tensor,
    dt: float,
    r: int,
    z: Tensor,
    sde: SDE,
    score_fn: ScoreFn,
    sampler: str = "ode",
    step_noise: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Whole-score and self-score trajectories from one noised start, ``r`` steps each (Algorithms 1, 2).

    Lines 2-4: ``x(t_0) = mu(t) x(0) + sigma(t) z(t)``. Line 5 (``i = 0 .. r-1``, ``t_{i+1} = t_i - dt``):
    ``x'`` takes an Euler step of the flow ODE (eq. 5, Algorithm 1) or of the reverse SDE (eq. 2,
    Algorithm 2) with the whole-score ``s_theta(x', t_i)``. Line 6: ``x''`` takes the same step with the
    self-score ``-z(t_i) / sigma(t_i)`` (eq. 9 / eq. 8), then ``z(t_{i+1}) = (x''(t_{i+1}) - mu(t_{i+1})
    x(0)) / sigma(t_{i+1})``. Algorithm 2 adds the same ``g(t_i) sqrt(dt) n(t_i)`` to both paths.

    Args:
        x0: Clean images ``x(0)``, (N, C, H, W).
        t: Start time of each row, (N,) tensor.
        dt: Step ``t_i - t_{i+1} > 0``.
        r: Number of steps (>= 1).
        z: ``z(t) ~ N(0, I)`` shaped like ``x0``.
        sde: The forward SDE (``mu``, ``sigma``, ``f``, ``g``).
        score_fn: ``score_fn(x, t, sigma) -> s_theta(x, t)`` (the whole-score).
        sampler: ``"ode"`` (Algorithm 1) or ``"sde"`` (Algorithm 2).
        step_noise: ``r`` tensors ``n(t_i)`` shaped like ``x0``; required for ``"sde"``.

    Returns:
        ``(x'(t_r), x''(t_r), t_r)``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    if sampler == "sde" and (step_noise is None or len(step_noise) < r):
        raise ValueError(f"the reverse-SDE sampler needs {r} step-noise tensors")
    x_t = perturb(x0, t, z, sde)  # lines 2-4
    whole, own = x_t, x_t
    t_i = t
    for i in range(r):  # line 5
        _, std_i = sde.marginal(t_i)
        self_score = -z / broadcast_like(std_i, z)
        whole_score = score_fn(whole, t_i, std_i)
        if sampler == "ode":
            whole = probability_flow_step(whole, t_i, -dt, whole_score, sde)
            own = probability_flow_step(own, t_i, -dt, self_score, sde)  # line 6, eq. 9
        else:
            noise = step_noise[i]
            whole = reverse_sde_step(whole, t_i, -dt, whole_score, sde, noise)
            own = reverse_sde_step(own, t_i, -dt, self_score, sde, noise)  # line 6, eq. 8
        t_i = t_i - dt
        mean_next, std_next = sde.marginal(t_i)
        z = (own - broadcast_like(mean_next, x0) * x0) / broadcast_like(std_next, x0)  # line 6, z update
    return whole, own, t_i


def feature_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance over channels, per position, without l2 normalisation (section 4.2): (N, 1, h, w)."""
    return (a - b).square().sum(dim=1, keepdim=True).sqrt()


class ScoreTScaleGraph(InferenceGraph):
    """Anomaly map and image score of a batch with T scales (section 4.3, Fig. 5, Algorithms 1-2).

    All ``T`` start times run as one batch of ``B * T``; the ``r`` steps are unrolled. The network is
    evaluated ``r`` times on ``B * T`` samples (whole-score steps; the self-score needs no network) and
    once on ``2 * B * T`` samples (line 8: ``x'(t_r)`` and ``x''(t_r)`` together), ``T (r + 2)``
    sample-evaluations per image in ``r + 1`` batched calls. For each selected feature tap the
    Euclidean distance between the two feature maps is summed over the ``T`` scales, bilinearly
    upsampled to the image size, and the maps are multiplied (``combine="product"``, the paper) or
    added (``"sum"``); the image score is the map's maximum (section 5.2). ``z(t)`` and, for the reverse
    SDE, ``n(t_i)`` are fixed seeded buffers, so PyTorch, ONNX Runtime and TensorRT compute one function.

    Example:
        >>> graph = ScoreTScaleGraph(unet, sde=SDE("ve", 0.01, 348.0), times=[0.125, 0.1, 0.075, 0.05, 0.025],
        ...                          dt=1 / 2000, r=1, feature_maps=["dec0", "dec1"], image_size=64, channels=3)
        >>> anomaly_map, score = graph(images)  # (B, 64, 64), (B,)
    """

    fp16_modules = ("unet",)

    def __init__(
        self,
        unet: nn.Module,
        *,
        sde: SDE,
        times: Sequence[float],
        dt: float,
        r: int,
        feature_maps: Sequence[str],
        image_size: int,
        channels: int,
        sampler: str = "ode",
        combine: str = "product",
        smoothing_sigma: float = 0.0,
        noise_seed: int = 0,
        map_score: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if r < 1 or dt <= 0:
            raise ValueError(f"need r >= 1 and dt > 0, got r={r}, dt={dt}")
        times = [float(t) for t in times]
        if not times or min(times) - r * dt <= 0 or max(times) > 1:
            raise ValueError(f"every start time must lie in (r * dt, 1] = ({r * dt:g}, 1], got {times}")
        available = list(unet.feature_names()) if hasattr(unet, "feature_names") else None
        if not feature_maps:
            raise ValueError("feature_maps is empty; name at least one feature tap")
        if available is not None and (unknown := [m for m in feature_maps if m not in available]):
            raise ValueError(f"unknown feature maps {unknown}; the network has {available}")
        self.unet = unet
        self.sde = sde
        self.dt = float(dt)
        self.r = int(r)
        self.sampler = sampler
        self.combine = combine
        self.feature_maps = list(feature_maps)
        self.image_size = image_size
        self.register_buffer("times", torch.tensor(times, dtype=torch.float32))
        self.noise_seed = noise_seed
        self.map_score = map_score if map_score is not None else MapScore("max", map_size=(image_size, image_size))
        generator = torch.Generator().manual_seed(noise_seed)
        n_scales = len(times)
        self.register_buffer("z", torch.randn(n_scales, channels, image_size, image_size, generator=generator))
        steps = self.r if sampler == "sde" else 0
        self.register_buffer(
            "step_noise", torch.randn(steps, n_scales, channels, image_size, image_size, generator=generator)
        )
        self.smoothing_sigma = float(smoothing_sigma)
        self.blur = GaussianBlur(self.smoothing_sigma, truncate=3.0)

    def _score(self, x: Tensor, t: Tensor, std: Tensor) -> Tensor:
        return self.unet(x, t, sigma=std)

    def distances(self, image: Tensor, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per feature tap, the distance summed over the T scales, at the tap's resolution: (B, 1, h, w)."""
        names = list(names or self.feature_maps)
        b, c, h, w = image.shape
        n = self.times.shape[0]
        x0 = image.unsqueeze(1).expand(b, n, c, h, w).reshape(b * n, c, h, w)
        t = self.times.repeat(b)
        z = self.z.repeat(b, 1, 1, 1)
        noise = [self.step_noise[i].repeat(b, 1, 1, 1) for i in range(self.step_noise.shape[0])]
        whole, own, t_r = tscale_pair(x0, t, self.dt, self.r, z, self.sde, self._score, self.sampler, noise)
        _, std_r = self.sde.marginal(t_r)
        pair_t, pair_std = torch.cat([t_r, t_r]), torch.cat([std_r, std_r])
        _, features = self.unet(torch.cat([whole, own]), pair_t, sigma=pair_std, return_features=True)  # line 8
        out = {}
        for name in names:
            # Sliced at b * n, not .chunk(2): chunk's rounding pins the batch size when traced with a dynamic one.
            first, second = features[name][: b * n], features[name][b * n :]
            d = feature_distance(first, second)
            out[name] = d.reshape(b, n, *d.shape[-2:]).sum(dim=1, keepdim=True)  # sum over {t}
        return out

    def combine_maps(self, distances: Sequence[Tensor], size: int) -> Tensor:
        """Upsample each (B, 1, h, w) map to ``size`` and multiply (or add) them: (B, 1, size, size)."""
        result = None
        for d in distances:
            up = F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)
            result = up if result is None else (result * up if self.combine == "product" else result + up)
        return result

    def smooth(self, anomaly_map: Tensor) -> Tensor:
        """Separable Gaussian filter (``smoothing_sigma`` pixels, radius 3 sigma, reflect padding); identity when 0."""
        return self.blur(anomaly_map)

    def export_notes(self) -> dict[str, Any]:
        return {
            "noise": {
                "mode": "fixed seeded buffers in the graph (z(t), and n(t_i) for the reverse SDE)",
                "seed": self.noise_seed,
            },
            "fp32_parts": "normalisation, time embedding, SDE steps, feature distances, resize, combination, max",
        }

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        distances = self.distances(image)
        anomaly_map = self.smooth(self.combine_maps(list(distances.values()), image.shape[-1]))[:, 0]
        return anomaly_map, self.map_score(anomaly_map)  # section 5.2: the max (other aggregations: scoring.py)
