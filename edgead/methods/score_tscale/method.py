"""score-tscale: a score U-Net on a VE / VP / sub-VP SDE; detect by whole- vs self-score feature differences."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgead.config import RunConfig, TrainConfig
from edgead.data.io import read_image
from edgead.data.preprocess import preprocess, resize_image
from edgead.data.pseudo import make_pseudo_anomaly_set
from edgead.diffusion.sde import SDE, broadcast_like, perturb
from edgead.evaluate import image_auroc, pixel_auroc
from edgead.methods.base import Method
from edgead.methods.score_tscale.graph import COMBINES, SAMPLERS, ScoreTScaleGraph
from edgead.nn.unet import ScoreUNet, UNetConfig
from edgead.train.checkpoint import load_weights
from edgead.train.distributed import DistInfo

SDE_KINDS = ("ve", "vp", "subvp")


def sde_dsm_loss(net: nn.Module, x: torch.Tensor, sde: SDE, t_min: float, t_max: float) -> torch.Tensor:
    """Denoising score matching, eq. 3 with ``lambda(t) = sigma(t)^2`` (Song et al. 2021, eq. 7).

    ``t ~ U(t_min, t_max)``, ``x(t) = mu(t) x(0) + sigma(t) z`` (eq. 4) and the target
    ``grad log p_0t = -z / sigma(t)``; weighted by ``sigma(t)^2`` the loss is
    ``||sigma(t) s_theta(x(t), t) + z||^2``, summed over pixels and averaged over the batch.
    """
    t = torch.rand(x.shape[0], device=x.device) * (t_max - t_min) + t_min
    _, std = sde.marginal(t)
    z = torch.randn_like(x)
    s = net(perturb(x, t, z, sde), t, sigma=std)
    return (broadcast_like(std, x) * s.float() + z).square().sum(dim=(1, 2, 3)).mean()


def rank_feature_maps(
    maps: dict[str, np.ndarray], labels: np.ndarray, masks: np.ndarray, combine: str, keep: int
) -> tuple[list[str], dict[str, Any]]:
    """Choose feature taps on a pseudo-anomaly validation set (our addition; the paper picks by hand).

    Each candidate's upsampled distance map is scored by ``(image AUROC + pixel AUROC) / 2`` on
    held-out normal images (label 0) and pseudo-anomalies (label 1, with masks); the candidates are
    ranked, then the best-ranked prefix of length 1..``keep`` whose combined map (``combine``) scores
    highest is kept.

    Args:
        maps: Candidate name -> (N, S, S) map at image size.
        labels: (N,) 0/1.
        masks: (N, S, S) bool, all False for normal images.
        combine: ``"product"`` or ``"sum"``.
        keep: Largest number of taps to keep.

    Returns:
        ``(selected names, record)``; the record holds every candidate's and prefix's validation AUROCs.
    """

    def quality(m: np.ndarray) -> dict[str, float]:
        scores = m.reshape(len(m), -1).max(axis=1)
        img = image_auroc(labels, scores)
        pix = pixel_auroc(masks[labels == 1], m[labels == 1])
        return {"image_auroc": round(img, 4), "pixel_auroc": round(pix, 4), "criterion": round((img + pix) / 2, 4)}

    candidates = {name: quality(m) for name, m in maps.items()}
    ranked = sorted(candidates, key=lambda n: candidates[n]["criterion"], reverse=True)
    prefixes = {}
    for k in range(1, min(keep, len(ranked)) + 1):
        combined = None
        for name in ranked[:k]:
            m = maps[name].astype(np.float64)
            combined = m if combined is None else (combined * m if combine == "product" else combined + m)
        prefixes[",".join(ranked[:k])] = quality(combined)
    best = max(prefixes, key=lambda key: prefixes[key]["criterion"])
    return best.split(","), {"candidates": candidates, "prefixes": prefixes, "selected": best.split(",")}


class ScoreTScale(Method):
    """Teng et al., "Unsupervised Visual Defect Detection with Score-Based Generative Model" (Score-DD)."""

    name = "score-tscale"

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {
            "sde": "ve",  # Table 1 (i): VE SDE with the flow ODE is the paper's best
            "sigma_min": 0.01,  # appendix B, MVTec
            "sigma_max": 348.0,
            "beta_min": 0.1,  # appendix B, VP / sub-VP
            "beta_max": 20.0,
            "sampler": "ode",  # "ode": Algorithm 1, "sde": Algorithm 2
            "n_timesteps": 2000,  # section 5.2: 2000 diffusion time steps, dt = 1 / n_timesteps
            "timesteps": [250, 200, 150, 100, 50],  # section 5.5: {t} in units of 1 / n_timesteps
            "r": 1,  # section 5.5
            "dt_timesteps": 20,  # dt = t_i - t_{i+1} = 20 / 2000 = 1 / 100 (see the README: FP32 conditioning)
            "feature_maps": "auto",  # "auto" or a list of taps, e.g. ["dec0", "dec1"]
            "auto_candidates": None,  # None: every tap of the network
            "auto_keep": 3,
            "auto_pseudo": 32,  # pseudo-anomalies for the selection (as many normal images)
            "combine": "product",  # section 4.2; "sum" is the option
            "smoothing_sigma": 0.0,  # the paper smooths nothing
            "noise_seed": 0,
            "train_t_min": 1e-5,
            "train_t_max": 1.0,
        }

    @classmethod
    def model_config(cls, preset: str, channels: int, params: dict[str, Any]) -> dict[str, Any]:
        """Appendix B: Fourier time embedding (scale 16) for VE, positional for VP / sub-VP; the network
        output is divided by ``sigma(t)`` (NCSN++ ``scale_by_sigma``), so it predicts ``-z``."""
        unet = UNetConfig.preset(preset, in_channels=channels)
        unet.time_embedding = "fourier" if params["sde"] == "ve" else "sinusoidal"
        unet.output_scaling = "sigma"
        return {"preset": preset, "unet": unet.to_dict()}

    def sde(self) -> SDE:
        p = self.config.method_params
        if p["sde"] not in SDE_KINDS:
            raise ValueError(f"sde must be one of {SDE_KINDS}, got {p['sde']!r}")
        return SDE(p["sde"], sigma_min=p["sigma_min"], sigma_max=p["sigma_max"], beta_min=p["beta_min"],
                   beta_max=p["beta_max"])

    def _check_params(self) -> None:
        p = self.config.method_params
        self.sde()
        if p["sampler"] not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {p['sampler']!r}")
        if p["combine"] not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {p['combine']!r}")
        if int(p["r"]) < 1 or int(p["n_timesteps"]) < 1:
            raise ValueError(f"need r >= 1 and n_timesteps >= 1, got r={p['r']}, n_timesteps={p['n_timesteps']}")
        if not float(p["dt_timesteps"]) > 0:
            raise ValueError(f"dt_timesteps must be > 0, got {p['dt_timesteps']}")
        low = int(p["r"]) * float(p["dt_timesteps"])
        bad = [k for k in p["timesteps"] if not low < k <= int(p["n_timesteps"])]
        if bad:
            raise ValueError(f"timesteps {bad} outside (r * dt_timesteps, n_timesteps] = ({low:g}, {p['n_timesteps']}]")
        maps = p["feature_maps"]
        if maps != "auto" and (not isinstance(maps, list) or not maps):
            raise ValueError(f'feature_maps must be "auto" or a non-empty list of tap names, got {maps!r}')

    def build_unet(self) -> ScoreUNet:
        return ScoreUNet(UNetConfig.from_dict(self.config.model["unet"]))

    def selected_feature_maps(self) -> list[str]:
        maps = self.config.method_params["feature_maps"]
        if maps != "auto":
            return list(maps)
        selection = self.config.state.get("feature_selection")
        if not selection:
            raise ValueError('feature_maps="auto" but the run holds no selection; train it again')
        return list(selection["selected"])

    def fit(
        self,
        train_images: torch.Tensor,
        train_cfg: TrainConfig,
        dist_info: DistInfo,
        resume: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        params = self.config.method_params
        self._check_params()
        torch.manual_seed(train_cfg.seed)
        self.unet = self.build_unet()
        sde = self.sde()

        def loss(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
            return sde_dsm_loss(net, batch, sde, params["train_t_min"], params["train_t_max"])

        summary = self.train_unet(self.unet, loss, train_images, train_cfg, dist_info, resume, progress,
                                  "score-tscale DSM")
        summary["network_calls_per_image"] = self.network_calls()
        if params["feature_maps"] == "auto" and dist_info.is_main:
            start = time.perf_counter()
            selection = self.select_feature_maps(train_images, device=dist_info.device)
            selection["seconds"] = round(time.perf_counter() - start, 1)
            self.config.state["feature_selection"] = selection
            summary["feature_maps"] = selection["selected"]
            summary["feature_selection_auroc"] = selection["prefixes"][",".join(selection["selected"])]
        return summary

    def network_calls(self) -> dict[str, Any]:
        """How often the network runs per image: ``r`` calls on T samples and one on 2T (section 5.5)."""
        p = self.config.method_params
        n, r = len(p["timesteps"]), int(p["r"])
        return {"batched_calls": r + 1, "sample_evaluations": n * (r + 2),
                "calls": f"{r} x batch {n} (whole-score steps) + 1 x batch {2 * n} (features of x' and x'')"}

    def _validation_set(self, train_images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """Held-out normal images plus as many pseudo-anomalies (LafitE section 3.4) made from them."""
        pre = self.preprocess_config
        params = self.config.method_params
        paths = [Path(p) for p in (self.config.data or {}).get("validation_paths", []) if Path(p).is_file()]
        if len(paths) >= 2:
            rgb = [resize_image(read_image(p), pre.image_size, pre.interpolation) for p in paths]
            rgb = rgb[: params["auto_pseudo"]]
            normal = np.stack([preprocess(img, pre) for img in rgb])
            source = f"{len(rgb)} held-out normal images"
        else:
            # No held-out split (e.g. --val-fraction 0): fall back to training images, which the network saw.
            count = min(len(train_images), params["auto_pseudo"])
            normal = train_images[:count].numpy()
            pixels = normal.transpose(0, 2, 3, 1)
            if pixels.shape[-1] == 1:
                pixels = np.repeat(pixels, 3, axis=-1)
            mean, std = np.array(pre.mean), np.array(pre.std)
            rgb = [np.clip((p * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8) for p in pixels]
            source = f"{count} training images (no held-out split)"
        if len(rgb) < 2:
            raise ValueError('feature_maps="auto" needs at least two normal images for pseudo-anomalies')
        pseudo_rgb, pseudo_masks = make_pseudo_anomaly_set(rgb, n=max(len(rgb), 2), seed=0)
        pseudo = np.stack([preprocess(img, pre) for img in pseudo_rgb])
        images = np.concatenate([normal, pseudo]).astype(np.float32)
        labels = np.r_[np.zeros(len(normal), dtype=int), np.ones(len(pseudo), dtype=int)]
        masks = np.concatenate([np.zeros((len(normal), pre.image_size, pre.image_size), dtype=bool),
                                np.stack(pseudo_masks).astype(bool)])
        return images, labels, masks, source

    @torch.no_grad()
    def select_feature_maps(self, train_images: torch.Tensor, device: str | torch.device = "cpu") -> dict[str, Any]:
        """``feature_maps="auto"``: rank every candidate tap on pseudo-anomalies (see :func:`rank_feature_maps`)."""
        params = self.config.method_params
        candidates = params["auto_candidates"] or list(self.unet.feature_names())
        graph = self._graph(candidates).to(device).eval()
        images, labels, masks, source = self._validation_set(train_images)
        size = images.shape[-1]
        maps: dict[str, list[np.ndarray]] = {name: [] for name in candidates}
        for start in range(0, len(images), 8):
            batch = torch.from_numpy(images[start : start + 8]).to(device)
            for name, d in graph.distances(batch, candidates).items():
                maps[name].append(graph.smooth(graph.combine_maps([d], size))[:, 0].float().cpu().numpy())
        stacked = {name: np.concatenate(parts) for name, parts in maps.items()}
        graph.cpu()
        _, record = rank_feature_maps(stacked, labels, masks, params["combine"], int(params["auto_keep"]))
        record.update({"validation": source, "n_normal": int((labels == 0).sum()), "n_pseudo": int(labels.sum())})
        return record

    def _graph(self, feature_maps: Sequence[str]) -> ScoreTScaleGraph:
        p = self.config.method_params
        pre = self.preprocess_config
        n = int(p["n_timesteps"])
        return ScoreTScaleGraph(
            self.unet,
            sde=self.sde(),
            times=[k / n for k in p["timesteps"]],
            dt=float(p["dt_timesteps"]) / n,
            r=int(p["r"]),
            feature_maps=feature_maps,
            image_size=pre.image_size,
            channels=pre.channels,
            sampler=p["sampler"],
            combine=p["combine"],
            smoothing_sigma=p["smoothing_sigma"],
            noise_seed=p["noise_seed"],
        ).eval()

    def build_graph(self) -> ScoreTScaleGraph:
        return self._graph(self.selected_feature_maps())

    @classmethod
    def load(cls, run_dir: Path, config: RunConfig) -> ScoreTScale:
        method = cls(config, run_dir)
        method.unet = method.build_unet()
        method.unet.load_state_dict(load_weights(run_dir))
        method.unet.eval()
        return method
