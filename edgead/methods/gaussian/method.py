"""gaussian: Gaussians on pre-trained features, reduced by opposite PCA (Wang, Xu, Chen, J. New Media 2022)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.covariance import LedoitWolf
from torch import nn

from edgead.config import RunConfig
from edgead.methods.base import FitContext, Method
from edgead.methods.gaussian.graph import GaussianGraph, StageGaussian
from edgead.methods.gaussian.params import FIT_ORDERS, PROJECTIONS, GaussianParams
from edgead.methods.scoring import MapScore
from edgead.nn.backbones import FeatureExtractor, InputAdapter, resolve_input_scaling
from edgead.train.checkpoint import load_weights, save_weights

# Shares within this relative tolerance of the threshold count as reaching it (float round-off).
_SHARE_TOLERANCE = 1e-9


def select_components(eigenvalues: np.ndarray, projection: str, fraction: float) -> np.ndarray:
    """Indices of the principal components to keep (section 3.2 and the ablation of section 4.5.1).

    Args:
        eigenvalues: Covariance eigenvalues in ascending order (as ``np.linalg.eigh`` returns them).
        projection: ``"opca"``: the fewest least-variance components that together explain at least
            ``fraction`` of the total variance ("OPCA-0.05 retains principal components that account for
            5% of the overall variance"); ``"pca"``: the fewest largest-variance components that explain at
            least ``1 - fraction`` ("PCA-0.95 removes principal components that account for 5%");
            ``"none"``: all components (plain eq. 3).
        fraction: The variance share of OPCA, in (0, 1).

    Returns:
        Ascending indices into ``eigenvalues``.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0 or np.any(np.diff(lam) < 0):
        raise ValueError("eigenvalues must be a non-empty 1-D array in ascending order")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"opca_fraction must be in (0, 1), got {fraction}")
    count = lam.size
    if projection == "none":
        return np.arange(count)
    share = lam / lam.sum()
    target = fraction if projection == "opca" else 1.0 - fraction
    # "opca" accumulates from the smallest eigenvalue, "pca" from the largest.
    cumulative = np.cumsum(share if projection == "opca" else share[::-1])
    kept = min(count, int(np.searchsorted(cumulative, target * (1.0 - _SHARE_TOLERANCE), side="left")) + 1)
    return np.arange(kept) if projection == "opca" else np.arange(count - kept, count)


#: The last fit's backbone features and their key (one entry: bounded memory).
_FEATURE_CACHE: dict[str, Any] = {}


def _digest(images: torch.Tensor) -> str:
    return hashlib.blake2b(np.ascontiguousarray(images.numpy()).data, digest_size=16).hexdigest()


@dataclass
class FittedGaussian:
    """One stage's Gaussian (section 3.3) with its kept subspace (section 3.2)."""

    mean: np.ndarray  # (C,)
    whitening: np.ndarray  # (C, K): maps centred features to whitened coordinates in the kept subspace
    eigenvalues: np.ndarray  # (C,) ascending, of the covariance the components are chosen on
    kept: np.ndarray  # (K,) indices into eigenvalues
    shrinkage: float
    samples: int

    def distances(self, features: np.ndarray) -> np.ndarray:
        """``(..., C) -> (...)`` Mahalanobis distances in the kept subspace (eq. 3; what ``StageGaussian`` computes)."""
        return np.sqrt((((features - self.mean) @ self.whitening) ** 2).sum(axis=-1))

    def module(self) -> StageGaussian:
        # Copies, so two modules built from one fit never share storage (safetensors refuses shared tensors).
        mean, whitening = (torch.tensor(a, dtype=torch.float32) for a in (self.mean, self.whitening))
        return StageGaussian(mean, whitening)


def fit_gaussian(features: np.ndarray, projection: str, fraction: float, order: str) -> FittedGaussian:
    """Fit eq. 1's parameters to ``features (m, C)`` in the subspace of the components ``projection`` keeps.

    The mean is the empirical mean and the covariance a Ledoit-Wolf shrinkage estimate [31] (Sec. 3.3;
    sklearn normalises by ``m``, not eq. 2's ``m - 1``, which only rescales all distances by a constant
    factor). ``order`` says where the shrinkage happens:

    - ``"paper"`` (Sec. 3.2, then 3.3; Fig. 1): the principal components are those of the sample covariance
      (eq. 2); the kept ones ``V_k`` project the centred features, and the shrinkage Gaussian is fitted to
      the projections ``z = (x - mu) V_k`` in the kept subspace, ``Sigma_k = U diag(lambda) U^T``.
    - ``"full"``: Ledoit-Wolf on all ``C`` channels first, then the kept components of the shrunk covariance.
      Shrinkage pulls every eigenvalue towards their mean, so it raises exactly the smallest ones, which OPCA
      keeps, and the 5 % share then covers fewer components.

    Either way the Mahalanobis distance in the kept subspace (eq. 3) is ``||(x - mu) W||`` with one matrix
    ``W`` (``V_k diag(lambda_k)^(-1/2)``, or ``V_k U diag(lambda)^(-1/2)``), so the graph needs only ``mu``
    and ``W``.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (m, C) to fit a Gaussian, got {x.shape}")
    if order not in FIT_ORDERS:
        raise ValueError(f"fit_order must be one of {FIT_ORDERS}, got {order!r}")
    if order == "full":
        lw = LedoitWolf(store_precision=False, assume_centered=False).fit(x)
        eigenvalues, eigenvectors = np.linalg.eigh(lw.covariance_)
        eigenvalues = _floored(eigenvalues, float(eigenvalues[-1]))
        kept = select_components(eigenvalues, projection, fraction)
        whitening = eigenvectors[:, kept] / np.sqrt(eigenvalues[kept])
        return FittedGaussian(lw.location_, whitening, eigenvalues, kept, float(lw.shrinkage_), x.shape[0])
    mean = x.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]))  # eq. 2
    eigenvalues = np.maximum(eigenvalues, 0.0)  # round-off below zero; select_components needs a valid share
    if eigenvalues[-1] <= 0.0:
        eigenvalues = np.full_like(eigenvalues, 1e-12)
    kept = select_components(eigenvalues, projection, fraction)
    projected = (x - mean) @ eigenvectors[:, kept]
    lw = LedoitWolf(store_precision=False, assume_centered=True).fit(projected)
    sub_eigenvalues, rotation = np.linalg.eigh(lw.covariance_)
    # With m <= C the least-variance components are directions the training features do not span (variance
    # 0): the floor, relative to the largest sample variance, keeps the distance finite there.
    sub_eigenvalues = _floored(sub_eigenvalues, float(eigenvalues[-1]))
    whitening = eigenvectors[:, kept] @ rotation / np.sqrt(sub_eigenvalues)
    return FittedGaussian(mean, whitening, eigenvalues, kept, float(lw.shrinkage_), x.shape[0])


def _floored(eigenvalues: np.ndarray, largest: float) -> np.ndarray:
    """Eigenvalues kept positive: shrinkage already does so; the floor guards all-constant features."""
    return np.maximum(eigenvalues, 1e-12 + 1e-9 * max(largest, 0.0))


@torch.no_grad()
def collect_features(
    adapter: nn.Module,
    backbone: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    max_map_vectors: int | None,
    seed: int,
    progress: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[int, int]]]:
    """Run the backbone over ``images`` and gather what the Gaussians are fitted on.

    Returns:
        ``(pooled, positions, sizes)``: per stage, the globally average-pooled vectors ``(N, C)``, the
        spatial feature vectors ``(M, C)`` of all positions (a seeded random subset of at most about
        ``max_map_vectors``, taken evenly from every batch; empty when ``max_map_vectors`` is 0), and
        the feature map size ``(h, w)``.
    """
    count = len(images)
    generator = torch.Generator().manual_seed(seed)
    pooled: list[list[torch.Tensor]] = []
    positions: list[list[torch.Tensor]] = []
    sizes: list[tuple[int, int]] = []
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]gaussian statistics"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not progress or not console.is_terminal) as bar:
        task = bar.add_task("features", total=count)
        for start in range(0, count, batch_size):
            batch = images[start : start + batch_size].to(device, torch.float32)
            features = backbone(adapter(batch))
            if not pooled:
                pooled, positions = [[] for _ in features], [[] for _ in features]
                sizes = [(int(f.shape[2]), int(f.shape[3])) for f in features]
            for stage, feature in enumerate(features):
                feature = feature.float()
                pooled[stage].append(feature.mean(dim=(2, 3)).cpu())
                if max_map_vectors == 0:
                    continue
                vectors = feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1]).cpu()
                quota = vectors.shape[0] if max_map_vectors is None else math.ceil(max_map_vectors * len(batch) / count)
                if vectors.shape[0] > quota:  # bound memory and fitting time on large inputs
                    vectors = vectors[torch.randperm(vectors.shape[0], generator=generator)[:quota]]
                positions[stage].append(vectors)
            bar.advance(task, len(batch))
    return (
        [torch.cat(chunks).numpy() for chunks in pooled],
        [torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32) for chunks in positions],
        sizes,
    )


class GaussianOPCA(Method):
    """Wang, Xu, Chen: "Build Gaussian Distribution Under Deep Features for Anomaly Detection and
    Localization", Journal of New Media 4(4), 2022 (doi 10.32604/jnm.2022.032447)."""

    name = "gaussian"
    paper = "Wang et al., 2022"
    summary = "pretrained EfficientNet-Lite0 features, opposite PCA, Ledoit-Wolf Gaussian, Mahalanobis"
    Params = GaussianParams
    params: GaussianParams
    #: Backbone convention: EfficientNet-Lite0's native input (224 x 224, also one of the paper's sizes in
    #: Sec. 4.1). Images are resized to the square without keeping the aspect ratio, as Sec. 4.1 does ("all
    #: images ... are resized to a specific resolution"); the shared preprocessing has no other mode. Neither
    #: is chosen per run: the input size fixes the preprocessing before the fit, and every candidate size
    #: would need its own feature pass (README: Input size and aspect).
    default_image_size = 224
    tune_grid = {"opca_fraction": [0.01, 0.02, 0.05, 0.1]}
    graph: GaussianGraph | None = None  # set by ``fit`` or ``load``

    def map_score(self) -> MapScore | None:
        """The map aggregation that scores images, or None for eq. 4's pooled score."""
        size = self.preprocess_config.image_size
        return None if self.params.image_score == "pooled" else self.params.map_score((size, size))

    def build_adapter(self) -> InputAdapter:
        p, pre = self.params, self.preprocess_config
        return InputAdapter.for_scaling(
            pre.mean, pre.std, resolve_input_scaling(p.input_scaling, p.backbone, p.weights)
        )

    def build_backbone(self, weights: str | Path | None = None) -> FeatureExtractor:
        p = self.params
        return FeatureExtractor(p.backbone, p.stages, p.weights if weights is None else weights)

    def fit(self, ctx: FitContext) -> dict[str, Any]:
        """Fit the per-stage Gaussians; statistics only, no training (``resume`` simply refits).

        Fitting is cheap, so under torchrun only rank 0 fits and saves; other ranks return at once.
        """
        p, train_images, train_cfg, dist_info = self.params, ctx.images, ctx.train, ctx.dist
        if not dist_info.is_main:
            return {"skipped": "statistics are fitted on rank 0 only"}
        if len(train_images) < 2:
            raise ValueError(f"the gaussian method needs at least 2 training images, got {len(train_images)}")
        start = time.perf_counter()
        # The run records the concrete scaling, so it does not depend on how "auto" resolves later.
        self.resolve_params({"input_scaling": resolve_input_scaling(p.input_scaling, p.backbone, p.weights)})
        p = self.params
        torch.manual_seed(train_cfg.seed)  # makes weights="random" reproducible
        adapter, backbone = self.build_adapter(), self.build_backbone()
        pooled_mode = p.map_statistics == "pooled"  # "auto" needs the position statistics as a candidate
        images = torch.as_tensor(train_images)
        max_vectors = 0 if pooled_mode else p.max_map_vectors
        # Candidates that differ only in their statistics (edgead tune) reuse the features of the last fit.
        key = (p.backbone, str(p.weights), tuple(p.stages), p.input_scaling, max_vectors, train_cfg.seed,
               _digest(images))  # fmt: skip
        if _FEATURE_CACHE.get("key") != key:
            _FEATURE_CACHE.clear()
            _FEATURE_CACHE["value"] = collect_features(
                adapter.to(dist_info.device),
                backbone.to(dist_info.device),
                images,
                batch_size=train_cfg.batch_size,
                device=dist_info.device,
                max_map_vectors=max_vectors,
                seed=train_cfg.seed,
                progress=ctx.progress,
            )
            _FEATURE_CACHE["key"] = key
        pooled, positions, sizes = _FEATURE_CACHE["value"]
        summary_extra: dict[str, Any] = {}
        automatic = p.opca_fraction == "auto" or p.map_statistics == "auto"
        val_features = self.validation_features(ctx, adapter, backbone) if automatic else []
        if p.opca_fraction == "auto":
            selection = self.select_opca_fraction(ctx, pooled, val_features)
            self.record_choice("opca_selection", selection, {"opca_fraction": selection["selected"]})
            p = self.params
            summary_extra["opca_selection"] = selection
        projection, fraction, order = p.projection, float(p.opca_fraction), p.fit_order
        image_fits = [fit_gaussian(vectors, projection, fraction, order) for vectors in pooled]
        map_fits = image_fits if pooled_mode else [fit_gaussian(v, projection, fraction, order) for v in positions]
        if p.map_statistics == "auto":
            candidates = {"positions": map_fits, "pooled": image_fits}
            graphs = {name: self._graph(adapter, backbone, image_fits, fits) for name, fits in candidates.items()}
            selection = self.select_map_statistics(ctx, graphs, val_features)
            self.record_choice("map_statistics_selection", selection, {"map_statistics": selection["selected"]})
            p = self.params
            summary_extra["map_statistics_selection"] = selection
            map_fits = candidates[p.map_statistics]
        self.graph = self._graph(adapter, backbone, image_fits, map_fits)
        if self.run_dir is not None:
            # config.json (saved by the caller after fit) records the id, so a kill in between is detected.
            self.config.state["weights_id"] = save_weights(self.graph.state_dict(), self.run_dir)
        stages = [
            {
                "stage": stage,
                "channels": int(image.mean.shape[0]),
                "feature_size": list(size),
                "image_kept": int(image.kept.size),
                "image_shrinkage": round(image.shrinkage, 4),
                "map_kept": int(spatial.kept.size),
                "map_shrinkage": round(spatial.shrinkage, 4),
                "map_vectors": spatial.samples,
            }
            for stage, size, image, spatial in zip(p.stages, sizes, image_fits, map_fits, strict=True)
        ]
        return {
            "fit_seconds": round(time.perf_counter() - start, 1),
            "n_images": len(train_images),
            "backbone": p.backbone,
            "input_scaling": self.params.input_scaling,
            **summary_extra,
            "weights": backbone.weights_info,
            "stages": stages,
        }

    @torch.no_grad()
    def validation_features(self, ctx: FitContext, adapter: nn.Module, backbone: nn.Module) -> list[torch.Tensor]:
        """The stage features ``(N, C, h, w)`` of the pseudo-validation images (:meth:`pseudo_validation_set`),
        computed once for every automatic choice of the fit."""
        images = torch.from_numpy(self.pseudo_validation_set(ctx).images)
        adapter, backbone, batch = adapter.to(ctx.dist.device), backbone.to(ctx.dist.device), ctx.train.batch_size
        chunks = [
            [f.float().cpu() for f in backbone(adapter(images[start : start + batch].to(ctx.dist.device)))]
            for start in range(0, len(images), batch)
        ]
        adapter.cpu()
        backbone.cpu()
        return [torch.cat(stage) for stage in zip(*chunks, strict=True)]

    def select_opca_fraction(
        self, ctx: FitContext, pooled_train: list[np.ndarray], val_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        """``opca_fraction="auto"``: the candidate whose image score (eq. 4 on pooled features) best separates
        the held-out normal images from pseudo-anomalies made from them (LafitE Sec. 3.4; the shared
        pseudo-validation service, ``edgead.methods.validation``: image AUROC, earlier candidates win exact
        ties). The validation features are computed once; each candidate only refits the Gaussians."""
        p = self.params
        validation = self.pseudo_validation_set(ctx)
        pooled_val = [feature.mean(dim=(2, 3)).numpy() for feature in val_features]

        def pooled_scores(fraction: float) -> Callable[[np.ndarray], tuple[None, np.ndarray]]:
            def scores(images: np.ndarray) -> tuple[None, np.ndarray]:
                total = np.zeros(len(images))
                for train, val in zip(pooled_train, pooled_val, strict=True):
                    total += fit_gaussian(train, p.projection, fraction, p.fit_order).distances(val)
                return None, total

            return scores

        choice = validation.choose({fraction: pooled_scores(fraction) for fraction in p.opca_candidates})
        figures = {name: row["image_auroc"] for name, row in choice.by_name().items()}
        return {"selected": choice.best, "pseudo_validation_image_auroc": figures, **validation.describe()}

    @torch.no_grad()
    def select_map_statistics(
        self, ctx: FitContext, graphs: dict[str, GaussianGraph], val_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        """``map_statistics="auto"``: Sec. 3.4 does not say which Gaussian scores each position, so each
        candidate graph scores the pseudo-validation set (its distances, maps and image score on the features
        computed once) and the shared service chooses (image AUROC, then pixel AUROC over the pseudo-anomalies;
        with eq. 4's pooled score the image AUROC is the same for both and the pixel AUROC decides; earlier
        candidates win exact ties)."""
        validation = self.pseudo_validation_set(ctx)
        size = (validation.images.shape[-2], validation.images.shape[-1])

        def outputs(graph: GaussianGraph) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
            def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # the set's images: val_features
                anomaly_map, score = graph.from_features(val_features, size)
                return anomaly_map.numpy(), score.numpy()

            return run

        choice = validation.choose({name: outputs(graph) for name, graph in graphs.items()})
        return {"selected": choice.best, "pseudo_validation": choice.by_name(), **validation.describe()}

    def _graph(
        self,
        adapter: nn.Module,
        backbone: nn.Module,
        image_fits: list[FittedGaussian],
        map_fits: list[FittedGaussian],
    ) -> GaussianGraph:
        return GaussianGraph(
            adapter.cpu(),
            backbone.cpu(),
            [fit.module() for fit in image_fits],
            [fit.module() for fit in map_fits],
            map_score=self.map_score(),
        ).eval()

    def build_graph(self) -> GaussianGraph:
        if self.graph is None:
            raise RuntimeError("the gaussian method has no statistics yet: call fit() or load() first")
        return self.graph.eval()

    def graph_skeleton(self, shapes: dict[str, Sequence[int]]) -> GaussianGraph:
        """An unfitted graph whose buffers have the shapes a saved state dict gives (for ``load``)."""
        with torch.random.fork_rng(devices=[]):  # timm's random init must not disturb the caller's RNG
            backbone = self.build_backbone(weights="random")

        def stage_gaussians(kind: str) -> list[StageGaussian]:
            modules = []
            for index in range(len(backbone.stages)):
                key = f"{kind}.{index}.whitening"
                if key not in shapes:
                    raise ValueError(
                        f"{self.run_dir}: the saved weights have no {key!r}; not a {self.name} run "
                        f"with stages {list(backbone.stages)}"
                    )
                channels, kept = shapes[key]
                modules.append(StageGaussian(torch.zeros(channels), torch.zeros(channels, kept)))
            return modules

        return GaussianGraph(
            self.build_adapter(),
            backbone,
            stage_gaussians("image_gaussians"),
            stage_gaussians("map_gaussians"),
            map_score=self.map_score(),
        )

    @classmethod
    def load(cls, run_dir: Path, config: RunConfig) -> GaussianOPCA:
        """Rebuild the graph skeleton from the method's parameters (backbone, stages) and the saved buffers'
        shapes, then load the buffers."""
        method = cls(config, run_dir)
        state = load_weights(run_dir, config.state)
        graph = method.graph_skeleton({key: tuple(value.shape) for key, value in state.items()})
        graph.load_state_dict(state, strict=True)
        method.graph = graph.eval()
        return method
