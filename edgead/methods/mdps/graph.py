"""The MDPS inference graph (Wu et al. 2024, Algorithm 1, eq. 17-20) as one ``nn.Module``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.diffusion.schedules import ddim_step, ddim_timesteps, ddpm_q_sample, predict_x0_from_eps
from edgead.methods.base import InferenceGraph
from edgead.nn.backbones import InputAdapter
from edgead.nn.filters import GaussianBlur, resize
from edgead.nn.gradients import value_and_input_grad

GUIDANCES = ("exact", "jacobian-free")
GUIDANCE_NORMS = ("l2", "squared")
#: The pixel count the guidance scale rho = 100 refers to (MVTec's 3 x 224 x 224 input, Sec. 5); see the README.
REFERENCE_PIXELS = 3 * 224 * 224


class PixelScaler(nn.Module):
    """The shared preprocessing's output -> the diffusion model's [-1, 1] pixels (per-channel affine map,
    ``x_m = 2 (x * std + mean) - 1``), so the prior, eq. 17 and eq. 18's L1 term work on the paper's scale."""

    keep_fp32 = True

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.register_buffer("scale", (2.0 * s).float())
        self.register_buffer("shift", (2.0 * m - 1.0).float())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


def eq20_mask(distance: Tensor, lam: float) -> Tensor:
    """Eq. 20: ``m = (D > min D + lambda (max D - min D))`` per image, as 0/1 floats of ``distance``'s shape."""
    low = distance.amin(dim=(1, 2, 3), keepdim=True)
    high = distance.amax(dim=(1, 2, 3), keepdim=True)
    return (distance > low + lam * (high - low)).to(distance.dtype)


class MDPSGraph(InferenceGraph):
    """Anomaly map and image score of a batch: Algorithm 1 twice (eq. 20's two passes), every step unrolled.

    ``forward(image (B, C, S, S)) -> (anomaly_map (B, S, S), score (B,))``:

    1. ``y``: the image on the model's [-1, 1] scale (``scaler``); its perceptual features ``F_i(y)``;
    2. pass 1 (``mask_pass``): ``N_s`` posterior samples with ``m = 1`` (:meth:`posterior_samples`), their
       difference maps (eq. 18) averaged (eq. 19), and the mask of eq. 20 (``lam``);
    3. pass 2: ``N_s`` posterior samples with that mask, eq. 18-19 again: the anomaly map, optionally
       Gaussian-smoothed, and the image score (the mean of the ``S`` largest pixels by default).

    Every image is independent of the others in its batch: the guidance loss, the mask's min / max and the
    image score are per image. Randomness (lines 1 and 10) comes from fixed seeded buffers. The U-Net and the
    backbone run in FP16 in the FP16 export; the sampler arithmetic, the gradient's loss, the metric and the
    mask stay FP32.
    """

    fp16_modules = ("unet", "backbone")

    def __init__(
        self,
        *,
        unet: nn.Module,
        backbone: nn.Module,
        scaler: PixelScaler,
        adapter: InputAdapter,
        alpha_bar: Tensor,
        noise_level: int,
        steps: int,
        rho: float,
        n_samples: int,
        lam: float,
        eta: float,
        guidance: str,
        guidance_norm: str,
        mask_pass: bool,
        ddim_eta: float,
        image_size: int,
        channels: int,
        smoothing_sigma: float,
        noise_seed: int,
        map_score: nn.Module,
    ) -> None:
        super().__init__()
        total = len(alpha_bar)
        if not 1 <= noise_level <= total:
            raise ValueError(f"noise level T must be in 1..{total} (the diffusion steps), got {noise_level}")
        if guidance not in GUIDANCES:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCES)}, got {guidance!r}")
        if guidance_norm not in GUIDANCE_NORMS:
            raise ValueError(f"guidance_norm must be one of {', '.join(GUIDANCE_NORMS)}, got {guidance_norm!r}")
        self.unet, self.backbone, self.scaler, self.adapter = unet, backbone, scaler, adapter
        self.alpha_bar = [float(a) for a in alpha_bar]  # constants in the exported graph
        self.total = total
        self.noise_level = int(noise_level)
        self.timesteps = ddim_timesteps(self.noise_level, steps)  # line 4: t = T n / N, s = T (n - 1) / N
        self.rho, self.n_samples, self.lam, self.eta = float(rho), int(n_samples), float(lam), float(eta)
        self.guidance, self.guidance_norm, self.mask_pass = guidance, guidance_norm, bool(mask_pass)
        self.ddim_eta = float(ddim_eta)
        self.image_size, self.channels = int(image_size), int(channels)
        # eq. 16's norm at REFERENCE_PIXELS: the l2 norm of an image of P pixels is scaled by sqrt(P / P_ref).
        self.norm_scale = math.sqrt(channels * image_size * image_size / REFERENCE_PIXELS)
        self.noise_seed = int(noise_seed)
        self.has_gradients = self.rho > 0 and guidance == "exact"
        generator = torch.Generator().manual_seed(self.noise_seed)
        shape = (self.n_samples, channels, image_size, image_size)
        self.register_buffer("noise", torch.randn(*shape, generator=generator))  # line 1
        step_noise = torch.randn(len(self.timesteps), *shape, generator=generator) if self.ddim_eta > 0 else None
        self.register_buffer("step_noise", step_noise)  # line 10 (only stored when sigma_t > 0)
        self.blur = GaussianBlur(smoothing_sigma)
        self.map_score = map_score

    def ab(self, t: int) -> float:
        """``alpha_t`` of the paper (DDIM's cumulative product; ``alpha_0 = 1``)."""
        return 1.0 if t == 0 else self.alpha_bar[t - 1]

    # -- eq. 16-17 -----------------------------------------------------------------------------------------

    def guidance_loss(self, y: Tensor, x0_prior: Tensor) -> Tensor:
        """Eq. 16's ``||y - x0_prior||`` per sample: ``l2`` (the norm, at the reference size; the default, see
        the README) or ``squared`` (eq. 16 as printed)."""
        residual = (y - x0_prior).flatten(1)
        if self.guidance_norm == "squared":
            return residual.square().sum(dim=1)
        return self.norm_scale * torch.sqrt(residual.square().sum(dim=1) + 1e-12)

    def guidance_loss_grad(self, y: Tensor, x0_prior: Tensor) -> Tensor:
        """``d guidance_loss / d x0_prior`` in closed form (for the Jacobian-free guidance)."""
        residual = y - x0_prior
        if self.guidance_norm == "squared":
            return -2.0 * residual
        norm = torch.sqrt(residual.flatten(1).square().sum(dim=1) + 1e-12).view(-1, 1, 1, 1)
        return -self.norm_scale * residual / norm

    def guided_eps(self, x: Tensor, y: Tensor, t: int) -> Tensor:
        """Line 5-6: ``eps_theta(x_t, t) + rho sqrt(1 - alpha_t) grad_{x_t} ||y - x0_prior(x_t)||`` (eq. 16).

        ``exact``: the gradient through the U-Net (a vector-Jacobian product, one forward and one backward
        pass). ``jacobian-free``: ``d x0_prior / d x_t`` taken as ``I / sqrt(alpha_t)`` (the U-Net's Jacobian
        dropped), one forward pass: ``grad = (d loss / d x0_prior) / sqrt(alpha_t)``.
        """
        a = self.ab(t)
        t_in = torch.full((x.shape[0],), t / self.total, dtype=x.dtype, device=x.device)
        if self.rho == 0:
            return self.unet(x, t_in)

        def loss(x_t: Tensor) -> tuple[Tensor, Tensor]:
            eps = self.unet(x_t, t_in)
            return self.guidance_loss(y, predict_x0_from_eps(x_t, eps, a)), eps  # line 5 (eq. 13)

        if self.guidance == "exact":
            grad, eps = value_and_input_grad(loss, x)
        else:
            eps = self.unet(x, t_in)
            grad = self.guidance_loss_grad(y, predict_x0_from_eps(x, eps, a)) / math.sqrt(a)
        return eps + self.rho * math.sqrt(1 - a) * grad  # line 6

    def posterior_samples(self, y: Tensor, mask: Tensor | None) -> Tensor:
        """Algorithm 1 for a batch of ``B * N_s`` (each image's ``N_s`` samples side by side): ``x_0``.

        ``mask`` (``(B * N_s, 1, S, S)`` or None for ``m = 1``) selects eq. 17's guided epsilon (inside) or the
        closed form of line 7 (outside)."""
        x = ddpm_q_sample(y, self.ab(self.noise_level), self.noise.repeat(y.shape[0] // self.n_samples, 1, 1, 1))
        for i, (t, s) in enumerate(self.timesteps):
            a = self.ab(t)
            eps = self.guided_eps(x, y, t)  # lines 5-6
            if mask is not None:
                closed = (x - math.sqrt(a) * y) / math.sqrt(1 - a)  # line 7 (eq. 10)
                eps = (1 - mask) * closed + mask * eps  # line 8 (eq. 17)
            noise = None
            if self.step_noise is not None:
                noise = self.step_noise[i].repeat(y.shape[0] // self.n_samples, 1, 1, 1)
            x = ddim_step(x, eps, a, self.ab(s), eta=self.ddim_eta, noise=noise)  # lines 9-11
        return x

    # -- eq. 18-19 -----------------------------------------------------------------------------------------

    def features(self, x: Tensor) -> list[Tensor]:
        """``F_i(x)``, the backbone's stages for images on the model's [-1, 1] scale."""
        return list(self.backbone(self.adapter(x)))

    def difference(self, x0: Tensor, y: Tensor, y_features: Sequence[Tensor]) -> Tensor:
        """Eq. 19: eq. 18 of every sample, averaged over each image's ``N_s`` samples: ``(B, 1, S, S)``.

        Eq. 18: ``eta * ||y_k - x0_k||_1`` (over channels) plus, for each stage ``i``, ``1 - cos(F_i(x0),
        F_i(y))`` at the stage's resolution, bilinearly upsampled to ``S x S``."""
        size = y.shape[-2:]
        distance = self.eta * (y - x0).abs().sum(dim=1, keepdim=True)
        for fx, fy in zip(self.features(x0), y_features, strict=True):
            cosine = F.cosine_similarity(fx, fy, dim=1, eps=1e-8).unsqueeze(1)
            distance = distance + resize(1 - cosine, size, "bilinear")
        b = distance.shape[0] // self.n_samples
        return distance.reshape(b, self.n_samples, 1, *size).mean(dim=1)

    def expand(self, x: Tensor) -> Tensor:
        """``(B, ...) -> (B * N_s, ...)``, each image repeated ``N_s`` times in a row."""
        return x.unsqueeze(1).expand(-1, self.n_samples, *x.shape[1:]).reshape(-1, *x.shape[1:])

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        y = self.scaler(image)
        y_features = [self.expand(f) for f in self.features(y)]
        ys = self.expand(y)
        mask = None
        if self.mask_pass:
            first = self.difference(self.posterior_samples(ys, None), ys, y_features)  # pass 1, m = 1
            mask = self.expand(eq20_mask(first, self.lam))  # eq. 20
        distance = self.difference(self.posterior_samples(ys, mask), ys, y_features)  # pass 2 (eq. 19)
        anomaly_map = self.blur(distance)[:, 0]
        return anomaly_map, self.map_score(anomaly_map)

    def export_notes(self) -> dict[str, Any]:
        return {
            "noise": {
                "mode": "fixed seeded buffers in the graph (Algorithm 1 lines 1 and 10)",
                "seed": self.noise_seed,
                "samples": self.n_samples,
            },
            "fp32_parts": "pixel scaling, sampler arithmetic (eq. 10, 13, 17, DDIM updates), the guidance loss "
            "and its gradient outside the U-Net, the difference metric, the mask, smoothing, top-S mean",
            "timesteps": [t for t, _ in self.timesteps],
            "guidance": self.guidance if self.rho > 0 else "none (rho = 0)",
            "passes": 2 if self.mask_pass else 1,
            "contains_gradients": self.has_gradients,
        }
