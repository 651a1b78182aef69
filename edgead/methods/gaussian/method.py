"""gaussian: Gaussians on pre-trained features, reduced by opposite PCA (Wang, Xu, Chen, J. New Media 2022)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgead.config import RunConfig
from edgead.methods.base import FitContext, Method
from edgead.methods.gaussian.features import TrainingFeatures, collect_features, stage_batches
from edgead.methods.gaussian.graph import GaussianGraph, PositionGaussians, StageGaussian
from edgead.methods.gaussian.params import (
    DEFAULT_MAP_STATISTICS,
    MAP_STATISTICS,
    PAPER_OPCA_FRACTION,
    GaussianParams,
)
from edgead.methods.gaussian.positions import FittedPositionGaussians, fit_stage_positions
from edgead.methods.gaussian.statistics import FittedGaussian, fit_gaussian
from edgead.methods.scoring import MapScore
from edgead.methods.validation import PseudoValidationSet
from edgead.metrics import image_auroc
from edgead.nn.backbones import FeatureExtractor, InputAdapter, resolve_input_scaling
from edgead.train.checkpoint import load_weights, save_weights
from edgead.train.memory import release_freed_memory

#: The last fit's backbone features and their key (one entry: bounded memory).
_FEATURE_CACHE: dict[str, Any] = {}


def _digest(images: torch.Tensor) -> str:
    return hashlib.blake2b(np.ascontiguousarray(images.numpy()).data, digest_size=16).hexdigest()


class GaussianOPCA(Method):
    """Wang, Xu, Chen: "Build Gaussian Distribution Under Deep Features for Anomaly Detection and
    Localization", Journal of New Media 4(4), 2022 (doi 10.32604/jnm.2022.032447)."""

    name = "gaussian"
    paper = "Wang et al., 2022"
    summary = "pretrained EfficientNet-Lite0 features, opposite PCA, Ledoit-Wolf Gaussian, Mahalanobis"
    Params = GaussianParams
    params: GaussianParams
    #: ``edgead update``: the statistics are fitted again on the original and the added normal images.
    update: ClassVar[str] = "refit"
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

        Automatic choices (``"auto"``) first build the calibrated pseudo-validation set
        (:meth:`calibrated_validation`), then choose the OPCA fraction, fit the image Gaussians with it, and
        choose the map statistics, all on the set's features computed once. Fitting is cheap, so under
        torchrun only rank 0 fits and saves; other ranks return at once.
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
        modes = MAP_STATISTICS if p.map_statistics == "auto" else (p.map_statistics,)
        images = torch.as_tensor(train_images)
        max_vectors = p.max_map_vectors if "positions" in modes else 0
        per_position = "per_position" in modes
        # Candidates that differ only in their statistics (edgead tune) reuse the features of the last fit.
        key = (p.backbone, str(p.weights), tuple(p.stages), p.input_scaling, max_vectors, per_position, train_cfg.seed,
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
                position_moments=per_position,
                progress=ctx.progress,
            )
            _FEATURE_CACHE["key"] = key
        features: TrainingFeatures = _FEATURE_CACHE["value"]
        release_freed_memory()  # the feature pass's freed batches
        summary_extra: dict[str, Any] = {}
        if p.opca_fraction == "auto" or p.map_statistics == "auto":
            validation, val_features = self.calibrated_validation(ctx, adapter, backbone, features.pooled)
            release_freed_memory()  # the sets and features the calibration tried
        if p.opca_fraction == "auto":
            selection = self.select_opca_fraction(validation, features.pooled, val_features)
            self.record_choice("opca_selection", selection, {"opca_fraction": selection["selected"]})
            p = self.params
            summary_extra["opca_selection"] = selection
        projection, fraction, order = p.projection, float(p.opca_fraction), p.fit_order
        image_fits = [fit_gaussian(vectors, projection, fraction, order) for vectors in features.pooled]
        candidates: dict[str, list[Any]] = {}
        for mode in modes:
            if mode == "positions":
                candidates[mode] = [fit_gaussian(v, projection, fraction, order) for v in features.positions]
            elif mode == "pooled":
                candidates[mode] = image_fits
            else:
                second_pass = self.second_pass(ctx, adapter, backbone, features)
                candidates[mode] = fit_stage_positions(
                    features.moments, second_pass, projection, fraction, order, p.max_position_floats
                )
        if p.map_statistics == "auto":
            graphs = {name: self._graph(adapter, backbone, image_fits, fits) for name, fits in candidates.items()}
            selection = self.select_map_statistics(validation, graphs, val_features)
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
                **spatial.map_record(),
            }
            for stage, size, image, spatial in zip(p.stages, features.sizes, image_fits, map_fits, strict=True)
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

    def stage_features(
        self, ctx: FitContext, adapter: nn.Module, backbone: nn.Module, images: np.ndarray
    ) -> list[torch.Tensor]:
        """The stage features ``(N, C, h, w)`` (float32, on the CPU) of preprocessed ``images``."""
        device, batch = ctx.dist.device, ctx.train.batch_size
        chunks = list(stage_batches(adapter, backbone, torch.from_numpy(images), batch_size=batch, device=device))
        adapter.cpu()
        backbone.cpu()
        return [torch.cat(stage) for stage in zip(*chunks, strict=True)]

    @staticmethod
    def second_pass(
        ctx: FitContext, adapter: nn.Module, backbone: nn.Module, features: TrainingFeatures
    ) -> Iterator[list[torch.Tensor]]:
        """The training features again, for pass 2 of the per-position fit (``positions.py``): from the kept
        maps, or (maps above ``features.KEEP_MAPS_BYTES``) from the backbone, batch by batch."""
        batch = ctx.train.batch_size
        if features.maps:
            count = len(features.maps[0])
            yield from ([stage[s : s + batch] for stage in features.maps] for s in range(0, count, batch))
            return
        batches = stage_batches(
            adapter, backbone, torch.as_tensor(ctx.images), batch_size=batch, device=ctx.dist.device,
            progress=ctx.progress, label="per-position statistics, pass 2",
        )  # fmt: skip
        yield from batches
        adapter.cpu()
        backbone.cpu()

    def calibrated_validation(
        self, ctx: FitContext, adapter: nn.Module, backbone: nn.Module, pooled_train: list[np.ndarray]
    ) -> tuple[PseudoValidationSet, list[torch.Tensor]]:
        """The pseudo-validation set every automatic choice of the fit scores on, and its stage features.

        The set is calibrated (:func:`edgead.methods.validation.calibrated_set`) on the default candidate:
        eq. 4's pooled score with the paper's OPCA fraction 0.05 (the run's fraction where it is fixed), the
        run's projection and fit order, so the candidates are not all tied near an AUROC of 1. The reference
        computes the backbone features of each set it tries (the set is built before any validation features
        exist); those of the set it settles on are reused, so the features are computed once.
        """
        p = self.params
        fraction = PAPER_OPCA_FRACTION if p.opca_fraction == "auto" else float(p.opca_fraction)
        reference_fits: list[FittedGaussian] = []
        last: dict[str, Any] = {}

        def reference(candidate: PseudoValidationSet) -> float:
            if not reference_fits:
                reference_fits.extend(fit_gaussian(t, p.projection, fraction, p.fit_order) for t in pooled_train)
            features = self.stage_features(ctx, adapter, backbone, candidate.images)
            last.update(images=candidate.images, features=features)
            scores = sum(
                fit.distances(f.mean(dim=(2, 3)).numpy()) for fit, f in zip(reference_fits, features, strict=True)
            )
            return image_auroc(candidate.labels, scores)

        validation = self.pseudo_validation_set(ctx, reference=reference)
        if last.get("images") is validation.images:
            return validation, last["features"]
        return validation, self.stage_features(ctx, adapter, backbone, validation.images)

    def select_opca_fraction(
        self, validation: PseudoValidationSet, pooled_train: list[np.ndarray], val_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        """``opca_fraction="auto"``: the candidate whose image score (eq. 4 on pooled features) best separates
        the normal images of ``validation`` from its pseudo-anomalies (LafitE Sec. 3.4; the shared
        pseudo-validation service, ``edgead.methods.validation``: image AUROC, earlier candidates win exact
        ties), the paper's 0.05 kept unless another candidate beats it by more than one standard error (no
        default where 0.05 is not a candidate). The validation features are computed once; each candidate only
        refits the Gaussians. The record keeps the chosen value (``selected``), every figure and the decision."""
        p = self.params
        pooled_val = [feature.mean(dim=(2, 3)).numpy() for feature in val_features]

        def pooled_scores(fraction: float) -> Callable[[np.ndarray], tuple[None, np.ndarray]]:
            def scores(images: np.ndarray) -> tuple[None, np.ndarray]:
                total = np.zeros(len(images))
                for train, val in zip(pooled_train, pooled_val, strict=True):
                    total += fit_gaussian(train, p.projection, fraction, p.fit_order).distances(val)
                return None, total

            return scores

        default = PAPER_OPCA_FRACTION if PAPER_OPCA_FRACTION in p.opca_candidates else None
        choice = validation.choose(
            {fraction: pooled_scores(fraction) for fraction in p.opca_candidates}, default=default
        )
        figures = {name: row["image_auroc"] for name, row in choice.by_name().items()}
        return {
            "selected": choice.chosen,
            "pseudo_validation_image_auroc": figures,
            "decision": choice.decision,
            **validation.describe(),
        }

    @torch.no_grad()
    def select_map_statistics(
        self, validation: PseudoValidationSet, graphs: dict[str, GaussianGraph], val_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        """``map_statistics="auto"``: Sec. 3.4 does not say which Gaussian scores each position, so each
        candidate graph (positions, pooled, per_position) scores ``validation`` (its distances, maps and image
        score on the features computed once) and the shared service chooses: image AUROC, then pixel AUROC
        over the pseudo-anomalies, earlier candidates winning exact ties, and ``positions`` (the default) kept
        unless the best beats its image AUROC by more than one standard error. With eq. 4's pooled score the
        image AUROC is the same for every candidate, so the default stays and the pixel AUROCs are recorded
        only (``decision``)."""
        size = (validation.images.shape[-2], validation.images.shape[-1])

        def outputs(graph: GaussianGraph) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
            def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # the set's images: val_features
                anomaly_map, score = graph.from_features(val_features, size)
                return anomaly_map.numpy(), score.numpy()

            return run

        choice = validation.choose(
            {name: outputs(graph) for name, graph in graphs.items()}, default=DEFAULT_MAP_STATISTICS
        )
        return {
            "selected": choice.chosen,
            "pseudo_validation": choice.by_name(),
            "decision": choice.decision,
            **validation.describe(),
        }

    def _graph(
        self,
        adapter: nn.Module,
        backbone: nn.Module,
        image_fits: list[FittedGaussian],
        map_fits: list[FittedGaussian] | list[FittedPositionGaussians],
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
        """An unfitted graph whose buffers have the shapes a saved state dict gives (for ``load``): a 2-D
        whitening ``(C, K)`` is one Gaussian for the stage, a 3-D one ``(P, C, K)`` one per position."""
        with torch.random.fork_rng(devices=[]):  # timm's random init must not disturb the caller's RNG
            backbone = self.build_backbone(weights="random")

        def stage_gaussians(kind: str) -> list[StageGaussian | PositionGaussians]:
            modules: list[StageGaussian | PositionGaussians] = []
            for index in range(len(backbone.stages)):
                key = f"{kind}.{index}.whitening"
                if key not in shapes:
                    raise ValueError(
                        f"{self.run_dir}: the saved weights have no {key!r}; not a {self.name} run "
                        f"with stages {list(backbone.stages)}"
                    )
                shape = tuple(shapes[key])
                if len(shape) == 3:
                    positions, channels, _ = shape
                    modules.append(PositionGaussians(torch.zeros(positions, channels), torch.zeros(shape)))
                else:
                    channels, kept = shape
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
