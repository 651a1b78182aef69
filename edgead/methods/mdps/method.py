"""mdps: a DDPM prior trained on normal images; detect by masked diffusion posterior sampling (Wu et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from edgead.config import RunConfig
from edgead.diffusion.schedules import ddpm_eps_loss, make_alpha_bar
from edgead.methods.backbone_params import input_scaling_param
from edgead.methods.base import FitContext
from edgead.methods.mdps.graph import GUIDANCE_NORMS, GUIDANCES, MDPSGraph, PixelScaler
from edgead.methods.params import FIXED_SEED, at_least, open_unit, param
from edgead.methods.score_unet import ScoreUNetMethod
from edgead.methods.scoring import AGGREGATIONS, MapScoreParams
from edgead.nn.backbones import (
    DEFAULT_BACKBONE,
    FeatureExtractor,
    InputAdapter,
    resolve_input_scaling,
)
from edgead.nn.unet import UNetConfig
from edgead.train.checkpoint import load_tensors, save_tensors_atomic

#: The perceptual network of eq. 18, saved in the run so that export needs no weights file.
BACKBONE_FILE = "mdps_backbone.safetensors"
#: EfficientNet-Lite0 stages at strides 4, 8 and 16 (edgead.nn.backbones numbering: blocks 1, 2 and 4), the
#: resolutions of the paper's Wide-ResNet-101 stages {1, 2, 3} (layer1..layer3).
DEFAULT_STAGES = [2, 3, 5]
#: The prior's U-Net per preset: the shared presets with the DDPM sinusoidal time embedding; ``paper`` is sized
#: like the released Dhariwal-Nichol U-Net (34.5 M parameters for RGB against its 33 M; not its exact layout).
PAPER_UNET: dict[str, Any] = {
    "base_channels": 96,
    "channel_mult": (1, 1, 2, 4, 4),
    "num_res_blocks": 2,
    "attention_levels": (3, 4),
    "embed_dim": 256,
    "mid_blocks": 2,
    "groups": 32,
}


def _stages(value: Any) -> str | None:
    ok = isinstance(value, list) and value and all(isinstance(v, int) and 0 <= v <= 8 for v in value)
    return None if ok else "a non-empty list of stage numbers 0..8"


@dataclass(frozen=True)
class MDPSParams(MapScoreParams):
    image_score: str = param(
        "topk_mean",
        "image score: the mean of the S largest pixels (topk_mean), max or interior_max",
        "Sec. 4.3",
        choices=AGGREGATIONS,
        origin="paper",
    )
    noise_level: int = param(
        200,
        "noise level T the test image is diffused to (of diffusion_steps)",
        "Sec. 5, Alg. 1",
        check=at_least(1),
        origin="paper",
    )
    steps: int = param(
        10,
        "sampling times N: DDIM updates from T to 0, unrolled in the graph",
        "Sec. 5, Alg. 1",
        check=at_least(1),
        origin="paper",
    )
    rho: float = param(
        100.0,
        "guidance scale rho (0: no posterior, the 'w/o posterior' ablation)",
        "eq. 16, Sec. 5.2",
        check=at_least(0.0),
        origin="paper",
    )
    n_samples: int = param(
        1,
        "posterior samples N_s per image, batched (the paper: 1 and 16)",
        "eq. 19, Table 1, 5",
        check=at_least(1),
        origin="paper",
    )
    mask_lambda: float = param(
        0.3,
        "lambda of the mask threshold (the paper gives no value; README)",
        "eq. 20",
        check=open_unit,
        origin="engineering",
        why="the paper gives no value; measured on generated defects (mdps_choices_*.json), no test data",
    )
    mask: bool = param(
        True,
        "two passes with eq. 20's mask (false: m = 1, the 'w/o mask' ablation)",
        "Sec. 4.3, Fig. 4",
        origin="paper",
    )
    eta: float = param(
        1.0,
        "weight eta of the pixel-level L1 term (the paper gives no value; README)",
        "eq. 18",
        check=at_least(0.0),
        origin="engineering",
        why="the paper gives no value; measured on generated defects (mdps_choices_*.json), no test data",
    )
    guidance: str = param(
        "exact",
        "exact: the gradient through the U-Net; jacobian-free: d x0 / d x_t = I / sqrt(alpha_t), one "
        "network call per step",
        "eq. 16 / ours",
        choices=GUIDANCES,
        origin="paper",
    )
    guidance_norm: str = param(
        "l2",
        "l2: ||y - x0|| (the released code, per image, at 3x224x224); squared: eq. 16 as printed",
        "eq. 16 / released code",
        choices=GUIDANCE_NORMS,
        origin="paper",
    )
    ddim_eta: float = param(
        0.0,
        "DDIM stochasticity of sigma_t (0: deterministic; 1: the released code)",
        "Alg. 1 l. 11",
        check=at_least(0.0),
        origin="paper",
    )
    schedule: str = param(
        "linear", "noise schedule of the prior", "DDPM [Ho 2020]", choices=("linear", "cosine"), origin="paper"
    )
    diffusion_steps: int = param(1000, "diffusion steps of the prior", "Sec. 5", check=at_least(2), origin="paper")
    backbone: str = param(
        DEFAULT_BACKBONE,
        "timm network of the perceptual term (the paper: Wide-ResNet-101)",
        "eq. 18",
        origin="engineering",
        why=(
            "the paper's Wide-ResNet-50 weights cannot ship; EfficientNet-Lite0's "
            "ImageNet weights are bundled (a user may pass another timm network and "
            "weights file)"
        ),
    )
    weights: str = param(
        "imagenet",
        '"imagenet" (the shipped Lite0 weights), "random", or a weights file',
        "ours",
        origin="backbone",
        why="the bundled ImageNet weights of the backbone",
    )
    stages: list[int] = param(
        list(DEFAULT_STAGES),
        "backbone stages J of eq. 18 (README)",
        "eq. 18: {1, 2, 3}",
        check=_stages,
        origin="backbone",
        why="Lite0's stages at the strides (4, 8, 16) of the paper's Wide-ResNet layers 1-3",
    )
    input_scaling: str = input_scaling_param()
    smoothing_sigma: float = param(
        4.0,
        "Gaussian smoothing sigma of the map at 256 px, scaled (0: none)",
        "ours",
        check=at_least(0.0),
        origin="engineering",
        why="MDPS gives none; sigma 4, the smoothing of LafitE and PatchCore, reasoned not tuned",
    )
    noise_seed: int = param(
        0, "seed of the fixed noise buffers in the graph", "ours", origin="engineering", why=FIXED_SEED
    )

    def check(self) -> str | None:
        if self.noise_level > self.diffusion_steps:
            return f"noise_level ({self.noise_level}) must be <= diffusion_steps ({self.diffusion_steps})"
        return None


class MDPS(ScoreUNetMethod):
    """Wu, Fan, Zhou, Yu, Deng, Zou, Lin: "Unsupervised Anomaly Detection via Masked Diffusion Posterior
    Sampling", IJCAI 2024."""

    name = "mdps"
    paper = "Wu et al., IJCAI 2024"
    summary = "masked diffusion posterior sampling with a DDPM prior"
    Params = MDPSParams
    params: MDPSParams
    default_image_size = 256  # Sec. 5 (BTAD; MVTec: 256 then a 224 crop)
    inference_params = ScoreUNetMethod.inference_params | {
        "noise_level",
        "steps",
        "rho",
        "n_samples",
        "mask_lambda",
        "mask",
        "eta",
        "guidance",
        "guidance_norm",
        "ddim_eta",
        "smoothing_sigma",
        "noise_seed",
    }
    tune_grid: ClassVar[dict[str, list[Any]]] = {"image_score": ["topk_mean", "max", "interior_max"]}
    smoke: ClassVar[dict[str, Any]] = {**ScoreUNetMethod.smoke, "params": {"steps": 1, "n_samples": 2}}
    slow_smoke_export = True  # the gradient graph's trace and FP16 parity take 1-2 minutes on 2 cores

    backbone: FeatureExtractor

    @classmethod
    def unet_config(cls, preset: str, channels: int, params: Any) -> UNetConfig:
        """The prior's epsilon U-Net: the shared preset (``paper``: :data:`PAPER_UNET`) with the DDPM
        sinusoidal time embedding."""
        if preset == "paper":
            return UNetConfig(in_channels=channels, time_embedding="sinusoidal", **PAPER_UNET)
        config = UNetConfig.preset(preset, in_channels=channels)
        config.time_embedding = "sinusoidal"
        return config

    def scaler(self) -> PixelScaler:
        pre = self.preprocess_config
        return PixelScaler(pre.mean, pre.std)

    def adapter(self) -> InputAdapter:
        """The model's [-1, 1] pixels -> the backbone's input scaling (grayscale replicated to RGB)."""
        p, channels = self.params, self.preprocess_config.channels
        scaling = resolve_input_scaling(p.input_scaling, p.backbone, p.weights)
        return InputAdapter.for_scaling((0.5,) * channels, (0.5,) * channels, scaling)

    def loss(self, net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Eq. 5 (the DDPM objective, ``edgead.diffusion.schedules.ddpm_eps_loss``) on [-1, 1] pixels."""
        scaler = self.scaler().to(batch.device)
        return ddpm_eps_loss(net, scaler(batch), make_alpha_bar(self.params.schedule, self.params.diffusion_steps))

    def fit(self, ctx: FitContext) -> dict[str, Any]:
        """Load the perceptual network (saved into the run), then train the prior with the shared loop."""
        p = self.params
        self.resolve_params({"input_scaling": resolve_input_scaling(p.input_scaling, p.backbone, p.weights)})
        with torch.random.fork_rng(devices=[]):
            self.backbone = FeatureExtractor(self.params.backbone, self.params.stages, self.params.weights).eval()
        if self.run_dir is not None and ctx.dist.is_main:
            save_tensors_atomic(dict(self.backbone.state_dict()), Path(self.run_dir) / BACKBONE_FILE)
        return super().fit(ctx)

    def build_graph(self) -> MDPSGraph:
        p, pre = self.params, self.preprocess_config
        reference = 256  # smoothing_sigma is given at the paper's 256 px
        return MDPSGraph(
            unet=self.unet,
            backbone=self.backbone,
            scaler=self.scaler(),
            adapter=self.adapter(),
            alpha_bar=make_alpha_bar(p.schedule, p.diffusion_steps),
            noise_level=p.noise_level,
            steps=p.steps,
            rho=p.rho,
            n_samples=p.n_samples,
            lam=p.mask_lambda,
            eta=p.eta,
            guidance=p.guidance,
            guidance_norm=p.guidance_norm,
            mask_pass=p.mask,
            ddim_eta=p.ddim_eta,
            image_size=pre.image_size,
            channels=pre.channels,
            smoothing_sigma=p.smoothing_sigma * pre.image_size / reference,
            noise_seed=p.noise_seed,
            map_score=p.map_score((pre.image_size, pre.image_size)),
        ).eval()

    @classmethod
    def load(cls, run_dir: Path, config: RunConfig) -> MDPS:
        method = super().load(run_dir, config)
        assert isinstance(method, MDPS)
        with torch.random.fork_rng(devices=[]):
            method.backbone = FeatureExtractor(method.params.backbone, method.params.stages, weights="random")
        method.backbone.load_state_dict(load_tensors(Path(run_dir) / BACKBONE_FILE), strict=True)
        method.backbone.eval()
        return method
