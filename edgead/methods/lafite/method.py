"""lafite: latent DDIM on pretrained features with memory-bank feature editing (Yin et al., 2023)."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgead.config import RunConfig
from edgead.diffusion.schedules import ddpm_eps_loss, make_alpha_bar
from edgead.methods.backbone_params import input_scaling_param
from edgead.methods.base import FitContext
from edgead.methods.lafite.graph import FeatureStandardiser, LafitEGraph, aggregate, pool_for, scaled_size
from edgead.methods.lafite.memory import EDIT_WEIGHTINGS, FeatureEditor, greedy_coreset
from edgead.methods.lafite.selection import PAPER_EDIT, by_weighting, choose_edit
from edgead.methods.params import at_least, open_unit, param, positive
from edgead.methods.score_unet import ScoreUNetMethod
from edgead.methods.scoring import MapScoreParams
from edgead.methods.validation import PseudoValidationSet, calibrated_set
from edgead.nn.backbones import (
    DEFAULT_BACKBONE,
    FeatureExtractor,
    InputAdapter,
    resolve_input_scaling,
)
from edgead.nn.unet import UNetConfig
from edgead.train.checkpoint import load_tensors, save_tensors_atomic

#: The file of the fitted feature side: backbone, standardisation statistics and the coreset.
FEATURES_FILE = "lafite_features.safetensors"
#: timm's feature levels 1-4 (strides 2, 4, 8, 16), UniAD's and LafitE's "stages 1 to 4", in our numbering of
#: EfficientNet stages (edgead.nn.backbones: 1..7 = blocks.0..6): blocks 0, 1, 2 and 4.
DEFAULT_STAGES = [1, 2, 3, 5]

#: The epsilon U-Net per preset. ``tiny``: tests; ``small``: this project's CPU / edge size; ``paper``: Sec. 4.1
#: (base 256, multipliers (1, 2, 3, 4)); residual blocks, attention and embedding width are the DDPM
#: convention (the paper does not state them).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "base_channels": 16,
        "channel_mult": (1, 2),
        "num_res_blocks": 1,
        "attention_levels": (),
        "embed_dim": 32,
        "mid_blocks": 1,
        "groups": 8,
        "io_kernel": 1,
    },
    "small": {
        "base_channels": 32,
        "channel_mult": (1, 2, 2),
        "num_res_blocks": 1,
        "attention_levels": (2,),
        "embed_dim": 64,
        "mid_blocks": 1,
        "groups": 8,
        "io_kernel": 1,
    },
    "paper": {
        "base_channels": 256,
        "channel_mult": (1, 2, 3, 4),
        "num_res_blocks": 2,
        "attention_levels": (1, 2),
        "embed_dim": 1024,
        "mid_blocks": 2,
        "groups": 32,
        "io_kernel": 3,
    },
}


def _auto_or_int(low: int) -> Any:
    def check(value: Any) -> str | None:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            return None
        return f'"auto" or an integer >= {low}'

    return check


def _int_list(low: int) -> Any:
    def check(value: Any) -> str | None:
        ok = isinstance(value, list) and value and all(isinstance(v, int) and v >= low for v in value)
        return None if ok else f"a non-empty list of integers >= {low}"

    return check


@dataclass(frozen=True)
class LafitEParams(MapScoreParams):
    backbone: str = param(
        DEFAULT_BACKBONE, "timm EfficientNet (the paper: EfficientNet-b4; see the README)", "Sec. 4.1",
        origin="engineering", why="Lite0: the ImageNet weights shipped offline (gaussian's); b4 via --param",
    )  # fmt: skip
    weights: str = param(
        "imagenet", '"imagenet" (the shipped Lite0 weights), "random", or a weights file', "ours",
        origin="backbone", why="the pretrained ImageNet features Sec. 3.1 asks for",
    )  # fmt: skip
    stages: list[int] = param(
        list(DEFAULT_STAGES), "backbone stages (0 = stem, 1..7 = MBConv stages)", "Sec. 4.1: stages 1-4 (README)",
        origin="paper",
    )  # fmt: skip
    input_scaling: str = input_scaling_param()
    grid: int = param(
        32, "side of the aggregated feature tensor", "Sec. 4.1: 32 x 32", check=at_least(2), origin="paper"
    )
    schedule: str = param(
        "cosine", "noise schedule", "Sec. 4.1: cosine [27]", choices=("cosine", "linear"), origin="paper"
    )
    diffusion_steps: int = param(1000, "diffusion steps T", "Sec. 4.1", check=at_least(2), origin="paper")
    tau: Any = param(
        "auto",
        'corruption step tau (eq. 8, 11); "auto": chosen on pseudo-validation without editing',
        "Sec. 3.3, 4.5",
        check=_auto_or_int(1),
        origin="pseudo-validation",
        why="Sec. 4.5 chooses tau on the pseudo-validation set",
    )
    tau_candidates: list[int] = param(
        [50, 100, 200, 300, 400], 'what tau="auto" chooses from', "Sec. 4.5 / ours", check=_int_list(1),
        origin="engineering", why="Fig. 6's range of tau, reasoned (the paper does not list its grid)",
    )  # fmt: skip
    k: Any = param(
        "auto",
        'neighbours K of feature editing (eq. 10); "auto": chosen with edit_weighting on pseudo-validation',
        "Sec. 3.3, 4.5",
        check=_auto_or_int(1),
        origin="pseudo-validation",
        why="Sec. 4.5 chooses K on the pseudo-validation set; here jointly with the weighting (README)",
    )
    k_candidates: list[int] = param(
        [2, 3, 4, 5, 6, 7, 8], 'what k="auto" chooses from', "Sec. 4.5 / ours", check=_int_list(1),
        origin="engineering",
        why="K = 1 is excluded (eq. 10 edits to zero); 2..8 spans Fig. 6's small K at 7 graph passes per weighting",
    )  # fmt: skip
    edit: bool = param(
        True, "feature editing (false: the paper's 'LafitE w/o F.E.' ablation)", "Table 4", origin="paper"
    )
    edit_weighting: str = param(
        "auto",
        'eq. 10 weights: "paper" (exactly as printed, summing to K - 1), "normalised" (divided by K - 1, '
        'summing to 1), "auto": chosen together with K on pseudo-validation',
        "eq. 10, Sec. 4.5 / ours",
        choices=("auto", *EDIT_WEIGHTINGS),
        origin="pseudo-validation",
        why="eq. 10 as printed leaves the normal manifold for K > 2; the set decides (README)",
    )
    edit_weighting_candidates: list[str] = param(
        list(EDIT_WEIGHTINGS), 'what edit_weighting="auto" chooses from', "eq. 10 / ours",
        check=lambda v: None if isinstance(v, list) and v and set(v) <= set(EDIT_WEIGHTINGS)
        else f"a non-empty list of {', '.join(EDIT_WEIGHTINGS)}",
        origin="engineering", why="both readings of eq. 10: as printed, and normalised as its text intends",
    )  # fmt: skip
    ddim_steps: int = param(
        5, "DDIM updates from tau to 0, unrolled in the graph (tau: one per diffusion step)", "eq. 7 / ours",
        check=at_least(1), origin="engineering",
        why="the paper gives no interval; 5 bounds latency (3.4x gaussian on a 2-core CPU, measured)",
    )  # fmt: skip
    coreset_keep: float = param(
        0.1, "coreset keep rate of the memory bank", "Sec. 4.1", check=open_unit, origin="paper"
    )
    coreset_max: int = param(
        2048, "cap on the coreset size (graph size and latency)", "ours", check=at_least(1),
        origin="engineering", why="bounds the graph's constants and the editing matmul (README: Memory bank)",
    )  # fmt: skip
    bank_max: int = param(
        100_000, "feature slices sampled (evenly per image) before the coreset selection", "ours",
        check=at_least(1), origin="engineering", why="bounds the greedy selection's time and memory",
    )  # fmt: skip
    projection_dim: int = param(
        128, "random projection for the coreset distances", "PatchCore", check=at_least(1),
        origin="engineering", why="PatchCore's approximate greedy sampler (its reference implementation)",
    )  # fmt: skip
    smoothing_sigma: float = param(
        4.0, "Gaussian smoothing sigma at 224 px (scaled)", "eq. 12", check=positive, origin="paper"
    )
    pool_size: int = param(
        16, "average pooling before the max, at 224 px (scaled)", "Sec. 3.3 / UniAD", check=at_least(1),
        origin="engineering", why="UniAD's max_avg pooling window, which Sec. 3.3 follows without a size",
    )  # fmt: skip
    noise_seed: int = param(
        0, "seed of the fixed noise buffer in the graph", "ours", origin="engineering",
        why="any fixed seed; a seeded buffer makes every backend compute the same function",
    )  # fmt: skip

    def check(self) -> str | None:
        if self.tau != "auto" and self.tau > self.diffusion_steps:
            return f"tau ({self.tau}) must be <= diffusion_steps ({self.diffusion_steps})"
        if max(self.tau_candidates) > self.diffusion_steps:
            return f"tau_candidates must be <= diffusion_steps ({self.diffusion_steps})"
        return None


class LafitE(ScoreUNetMethod):
    """Yin, Jiao, Wu, Karlsson, Huang, Lin: "LafitE: Latent Diffusion Model with Feature Editing for
    Unsupervised Multi-class Anomaly Detection", arXiv 2307.08059, 2023."""

    name = "lafite"
    paper = "Yin et al., 2023"
    summary = "latent DDIM on pretrained features with memory-bank feature editing"
    Params = LafitEParams
    params: LafitEParams
    default_image_size = 224  # Sec. 4.1
    #: ``edgead update``: the added images' feature slices join the memory bank (:meth:`extend`).
    update: ClassVar[str] = "extend"
    #: The fit's pixel-space context (set by :meth:`fit`); None for a loaded run, whose selection
    #: (:meth:`after_training`) then uses the run's stored held-out normals.
    _pixel_ctx: FitContext | None = None
    inference_params = ScoreUNetMethod.inference_params | {
        "tau", "k", "edit", "edit_weighting", "ddim_steps", "smoothing_sigma", "pool_size", "noise_seed",
    }  # fmt: skip
    tune_grid: ClassVar[dict[str, list[Any]]] = {"image_score": ["max", "topk_mean", "interior_max"]}
    smoke: ClassVar[dict[str, Any]] = {
        **ScoreUNetMethod.smoke,
        "params": {"grid": 8, "tau_candidates": [100, 300], "k_candidates": [2], "coreset_max": 64, "ddim_steps": 2},
    }

    adapter: InputAdapter
    backbone: FeatureExtractor
    standardiser: FeatureStandardiser
    coreset: torch.Tensor

    # -- configuration -------------------------------------------------------------------------------------

    @classmethod
    def feature_channels(cls, params: LafitEParams) -> int:
        with torch.random.fork_rng(devices=[]):  # timm's random init must not disturb the caller's RNG
            return sum(FeatureExtractor(params.backbone, params.stages, weights="random").channels)

    @classmethod
    def unet_config(cls, preset: str, channels: int, params: Any) -> UNetConfig:
        """The epsilon U-Net on the feature tensor (Sec. 3.2, 4.1): ``UNET_PRESETS[preset]``, as many input
        and output channels as the aggregated features, the DDPM sinusoidal time embedding."""
        if preset not in UNET_PRESETS:
            raise ValueError(f"unknown lafite preset {preset!r}; choose from {', '.join(UNET_PRESETS)}")
        config = UNetConfig(
            in_channels=cls.feature_channels(params), time_embedding="sinusoidal", **UNET_PRESETS[preset]
        )
        factor = 2 ** (len(config.channel_mult) - 1)
        if params.grid % factor:
            raise ValueError(f"--param grid={params.grid}: the {preset} U-Net needs a multiple of {factor}")
        return config

    def build_feature_side(self, weights: str | Path | None = None) -> None:
        p, pre = self.params, self.preprocess_config
        self.adapter = InputAdapter.for_scaling(
            pre.mean, pre.std, resolve_input_scaling(p.input_scaling, p.backbone, p.weights)
        )
        self.backbone = FeatureExtractor(p.backbone, p.stages, p.weights if weights is None else weights)

    # -- fit -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def raw_features(self, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
        """Eq. 1 over ``images``: the aggregated (unstandardised) feature tensors ``(N, C, grid, grid)``."""
        adapter, backbone = self.adapter.to(device), self.backbone.to(device)
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(images[start : start + batch_size]).to(device, torch.float32)
            out.append(aggregate(backbone(adapter(batch)), self.params.grid).cpu())
        adapter.cpu(), backbone.cpu()
        return torch.cat(out)

    def memory_bank(self, x0: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Eq. 9's bank of every training feature slice, reduced to the coreset ``M_C`` by greedy k-center
        selection (keep rate ``coreset_keep`` of the whole bank, capped at ``coreset_max``); at most
        ``bank_max`` slices, taken evenly from every image, enter the selection."""
        p = self.params
        n, c, h, w = x0.shape
        slices = x0.permute(0, 2, 3, 1).reshape(n, h * w, c)
        total = n * h * w
        generator = torch.Generator().manual_seed(seed)
        per_image = max(1, min(h * w, p.bank_max // n))
        if per_image < h * w:
            picks = torch.stack([torch.randperm(h * w, generator=generator)[:per_image] for _ in range(n)])
            bank = torch.gather(slices, 1, picks[..., None].expand(-1, -1, c)).reshape(-1, c)
        else:
            bank = slices.reshape(-1, c)
        count = min(max(1, math.ceil(p.coreset_keep * total)), p.coreset_max, len(bank))
        start = time.perf_counter()
        index = greedy_coreset(bank, count, p.projection_dim, seed)
        info = {"bank_slices": total, "selection_pool": len(bank), "coreset": count,
                "keep_rate": round(count / total, 5), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        return bank[index].clone(), info

    def fit(self, ctx: FitContext) -> dict[str, Any]:
        """Features (eq. 1) and their statistics, the coreset (eq. 9), then the U-Net (eq. 6, shared loop),
        then tau and K on the pseudo-validation set (``after_training``)."""
        if len(ctx.images) < 2:
            raise ValueError(f"lafite needs at least 2 training images, got {len(ctx.images)}")
        start = time.perf_counter()
        p = self.params
        self.resolve_params({"input_scaling": resolve_input_scaling(p.input_scaling, p.backbone, p.weights)})
        torch.manual_seed(ctx.train.seed)  # makes weights="random" reproducible
        self.build_feature_side()
        raw = self.raw_features(ctx.images, ctx.train.batch_size, ctx.dist.device)
        mean = raw.mean(dim=(0, 2, 3))
        std = raw.std(dim=(0, 2, 3)).clamp(min=1e-6)
        self.standardiser = FeatureStandardiser(mean, std)
        x0 = self.standardiser(raw)
        del raw
        self.coreset, bank_info = self.memory_bank(x0, ctx.train.seed)
        if self.run_dir is not None and ctx.dist.is_main:
            save_tensors_atomic(self.feature_state(), Path(self.run_dir) / FEATURES_FILE)
        self.config.state["memory_bank"] = bank_info
        feature_seconds = round(time.perf_counter() - start, 1)
        self._pixel_ctx = ctx
        summary = super().fit(replace(ctx, images=x0))
        return {"feature_seconds": feature_seconds, "memory_bank": bank_info, **summary}

    def loss(self, net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Eq. 6 (the shared DDPM objective, ``edgead.diffusion.schedules.ddpm_eps_loss``)."""
        return ddpm_eps_loss(net, batch, make_alpha_bar(self.params.schedule, self.params.diffusion_steps))

    def after_training(self, ctx: FitContext) -> dict[str, Any]:
        """Sec. 4.5: tau first (without editing), then the edit weighting and K together (with editing, at
        that tau), on pseudo-validation through the shared service (``edgead.methods.validation``: image
        AUROC, pixel AUROC breaking ties). tau is the best candidate, as the paper chooses it (it names no
        default); the weighting and K follow the tie rule of :mod:`edgead.methods.lafite.selection` (the
        paper's setting unless beaten by more than the set can resolve). tau and the edit pair are chosen in
        turn, as the paper does, not jointly: the joint grid would be 5 x 14 graph passes instead of 5 + 14
        on a CPU, and more candidates on a set of a few dozen images mean more chance winners.

        Each step has its own set, calibrated to discriminate (:func:`edgead.methods.validation.calibrated_set`:
        the paper's fragments saturated at 0.998 on bsdata): tau's so that the best tau without editing,
        the pair's so that the paper's pair at the chosen tau, scores at most the target image AUROC. Both
        come from the same held-out normals and defects, at their own strength. A set's features are
        extracted once for every candidate."""
        p = self.params
        auto_k, auto_weighting = p.edit and p.k == "auto", p.edit and p.edit_weighting == "auto"
        chosen: dict[str, Any] = {}
        if not p.edit:  # unused without editing; keeps the run concrete
            if p.k == "auto":
                chosen["k"] = p.k_candidates[0]
            if p.edit_weighting == "auto":
                chosen["edit_weighting"] = PAPER_EDIT[0]
        if p.tau != "auto" and not (auto_k or auto_weighting):
            if chosen:
                self.resolve_params(chosen)
            return {}
        rgb, source = self.held_out_normals(self._pixel_ctx, limit=200)
        pre = self.preprocess_config
        record: dict[str, Any] = {}
        self.unet.eval()
        features: dict[str, Any] = {}  # the last set's images and their standardised features x0

        def x0_of(images: np.ndarray) -> torch.Tensor:
            if features.get("images") is not images:
                features["images"] = images
                features["x0"] = self.standardiser(self.raw_features(images, 16, torch.device("cpu")))
            return features["x0"]

        def candidate(tau: int, edit: tuple[str, int] | None) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
            @torch.no_grad()
            def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                x0 = x0_of(images)
                weighting, k = edit if edit is not None else (None, None)
                graph = self.graph_for(tau=tau, k=k, edit=edit is not None, weighting=weighting)
                parts = [graph.score_features(x0[i : i + 16]) for i in range(0, len(x0), 16)]
                return torch.cat([m for m, _ in parts]).numpy(), torch.cat([s for _, s in parts]).numpy()

            return outputs

        if p.tau == "auto":
            seen: dict[str, Any] = {}

            def best_tau(candidate_set: PseudoValidationSet) -> float:  # keeps the choice on the set it ends on
                seen["choice"] = candidate_set.choose({tau: candidate(tau, None) for tau in p.tau_candidates})
                return max(row["image_auroc"] for row in seen["choice"].rows.values())

            tau_set = calibrated_set(rgb, pre, source, best_tau)
            choice = seen["choice"]  # the returned set is the one the reference saw last
            record["tau"], chosen["tau"] = choice.by_name(), choice.best
            record["tau_set"] = tau_set.describe()
        tau = chosen.get("tau", p.tau)
        if auto_k or auto_weighting:
            weightings = p.edit_weighting_candidates if auto_weighting else [p.edit_weighting]
            ks = [k for k in (p.k_candidates if auto_k else [p.k]) if k <= len(self.coreset)]
            pairs = [(w, k) for w in weightings for k in ks]
            reference_pair = PAPER_EDIT if PAPER_EDIT in pairs else pairs[0]

            def paper_pair(candidate_set: PseudoValidationSet) -> float:
                return float(candidate_set.evaluate(candidate(tau, reference_pair))["image_auroc"])

            edit_set = calibrated_set(rgb, pre, source, paper_pair)
            rows = edit_set.choose({pair: candidate(tau, pair) for pair in pairs}).rows
            (weighting, k), record["edit_rule"] = choose_edit(rows, reference_pair)
            record["k"] = by_weighting(rows)
            record["edit_set"] = edit_set.describe()
            chosen.update({"edit_weighting": weighting, "k": k})
        record["chosen"] = chosen
        self.record_choice("selection", record, chosen)
        return {"selection": record}

    def extend(self, images: torch.Tensor, run_dir: Path, config: RunConfig, train: Any) -> dict[str, Any]:
        """``edgead update``: the added normal images' features (eq. 1), standardised with the statistics the
        U-Net was trained on, join the memory bank; the new coreset is selected (eq. 9's greedy k-center rule)
        from the old coreset and every added slice, keeping the run's coreset size plus the added images'
        share (``coreset_keep`` of their slices), capped at ``coreset_max``. The U-Net is copied unchanged."""
        p = self.params
        start = time.perf_counter()
        x0 = self.standardiser(self.raw_features(images, train.batch_size, torch.device("cpu")))
        n, c, h, w = x0.shape
        added = x0.permute(0, 2, 3, 1).reshape(-1, c)
        pool = torch.cat([self.coreset, added])
        count = min(len(self.coreset) + math.ceil(p.coreset_keep * len(added)), p.coreset_max, len(pool))
        index = greedy_coreset(pool, count, p.projection_dim, train.seed)
        kept_old = int((index < len(self.coreset)).sum())
        self.coreset = pool[index].clone()
        save_tensors_atomic(self.feature_state(), Path(run_dir) / FEATURES_FILE)
        unet = Path(self.run_dir or "") / "weights.safetensors"  # the U-Net, unchanged
        if unet.is_file():
            shutil.copyfile(unet, Path(run_dir) / unet.name)
        info = {"added_images": n, "added_slices": len(added), "coreset": count, "kept_from_old_coreset": kept_old,
                "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        config.state["memory_bank"] = {**config.state.get("memory_bank", {}), "update": info}
        return info

    # -- graph ---------------------------------------------------------------------------------------------

    def feature_state(self) -> dict[str, torch.Tensor]:
        state = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        state.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        state.update({f"standardiser.{k}": v for k, v in self.standardiser.state_dict().items()})
        state["coreset"] = self.coreset
        return state

    def graph_for(self, *, tau: int, k: int | None, edit: bool, weighting: str | None = None) -> LafitEGraph:
        """The graph at ``tau`` with (``edit``) K-neighbour editing weighted by ``weighting`` (default: the
        run's ``edit_weighting``)."""
        p, size = self.params, self.preprocess_config.image_size
        editor = FeatureEditor(self.coreset, k, weighting or p.edit_weighting) if edit else None
        pool = pool_for(size, p.pool_size)
        pooled = size - pool + 1 if pool > 1 else size
        return LafitEGraph(
            adapter=self.adapter,
            backbone=self.backbone,
            standardiser=self.standardiser,
            unet=self.unet,
            editor=editor,
            grid=p.grid,
            alpha_bar=make_alpha_bar(p.schedule, p.diffusion_steps),
            tau=tau,
            ddim_steps=p.ddim_steps,
            image_size=size,
            smoothing_sigma=scaled_size(p.smoothing_sigma, size),
            pool_size=pool,
            noise_seed=p.noise_seed,
            map_score=p.map_score((pooled, pooled)),
        ).eval()

    def build_graph(self) -> LafitEGraph:
        p = self.params
        if p.tau == "auto" or (p.edit and "auto" in (p.k, p.edit_weighting)):
            raise ValueError(
                f"{self.run_dir}: tau / K / edit_weighting are still 'auto' (the run's selection did not "
                "finish); pass --param tau=N --param k=N --param edit_weighting=paper or retrain"
            )
        return self.graph_for(tau=int(p.tau), k=int(p.k) if p.edit else None, edit=p.edit)

    @classmethod
    def load(cls, run_dir: Path, config: RunConfig) -> LafitE:
        method = super().load(run_dir, config)
        assert isinstance(method, LafitE)
        state = load_tensors(Path(run_dir) / FEATURES_FILE)
        with torch.random.fork_rng(devices=[]):
            method.build_feature_side(weights="random")
        channels = state["standardiser.mean"].shape[1]
        method.standardiser = FeatureStandardiser(torch.zeros(channels), torch.ones(channels))
        for prefix in ("adapter", "backbone", "standardiser"):
            module = getattr(method, prefix)
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(part, strict=True)
        method.coreset = state["coreset"]
        method.backbone.eval()
        return method
