"""The contract every method implements (see ARCHITECTURE.md: a method's inference is one tensor graph).

A new method is one folder ``edgead/methods/<folder>/`` with ``method.py`` (a :class:`Method` subclass
with a literal ``name``, ``paper`` and ``summary``, its ``Params`` dataclass, ``fit``, ``build_graph`` and
``load``), ``graph.py`` (the inference ``nn.Module``) and a README. Nothing outside the folder changes:
the registry, packaging, ``edgead info`` and every parametrised test find it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgead.config import RunConfig, TrainConfig
from edgead.data.holdout import held_out_normals
from edgead.data.preprocess import PreprocessConfig, preprocess, resize_image
from edgead.methods import calibration
from edgead.methods.calibration import CalibratedGraph
from edgead.methods.params import MethodParams
from edgead.methods.scoring import MapScoreParams
from edgead.methods.tiling import TiledGraph, cut_tiles, frame_config, frame_size
from edgead.methods.validation import Choice, PseudoValidationSet, calibrated_set, run_graph
from edgead.train.distributed import DistInfo

__all__ = ["Choice", "FitContext", "InferenceGraph", "Method", "PseudoValidationSet", "run_graph"]


@dataclass
class FitContext:
    """What ``Method.fit`` gets: the preprocessed normal training images and how to fit on them."""

    images: torch.Tensor  # (N, C, S, S) float32, preprocessed
    train: TrainConfig
    dist: DistInfo
    resume: bool = False
    progress: bool = True


class InferenceGraph(nn.Module):
    """Base of every method's inference module; what it declares is all that export knows of it.

    ``forward(image (B, C, S, S)) -> (anomaly_map (B, H, W), score (B,))``.
    """

    #: Children that run in FP16 in the FP16 export (None: every direct child with parameters). Inside them,
    #: normalisation layers and modules whose class sets ``keep_fp32 = True`` stay FP32.
    fp16_modules: ClassVar[tuple[str, ...] | None] = None
    #: Whether ``forward`` differentiates a network (``edgead.nn.gradients``); export then traces the forward
    #: and backward passes into one forward graph first (``edgead.export.gradients``). A graph may set it per
    #: instance.
    has_gradients: bool = False

    def export_notes(self) -> dict[str, Any]:
        """What ``edgead.json`` should tell a reader about this graph: ``noise`` (how randomness enters)
        and ``fp32_parts`` (what the FP16 export keeps in FP32), plus anything method-specific."""
        return {}


class Method(abc.ABC):
    """A detection method: fit on normal images, then build the inference ``nn.Module``.

    The inference module's ``forward(image)`` takes a preprocessed batch ``(B, C, S, S)`` and returns
    ``(anomaly_map (B, H, W), score (B,))`` using plain tensor ops with fixed shapes, so the same module
    runs in PyTorch, exports to ONNX and compiles with TensorRT.
    """

    #: The name users type (``--method``); read by the registry from the source, so keep it a literal.
    name: ClassVar[str]
    #: Citation and one-line description, shown by ``edgead info``.
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: The method's hyperparameter dataclass (defaults = the paper's).
    Params: ClassVar[type[MethodParams]]
    #: Whether ``config.model`` holds a network preset (``--preset`` applies).
    uses_preset: ClassVar[bool] = False
    #: Settings of a seconds-long fit on 32 px generated data, used by the parametrised tests:
    #: ``{"preset": ..., "steps": ..., "batch_size": ..., "lr": ..., "params": {...}}`` (all optional).
    smoke: ClassVar[dict[str, Any]] = {}
    #: Whether the smoke export takes minutes on a 2-core CPU (e.g. a graph with traced gradients): the
    #: parametrised end-to-end tests then mark the method slow (outside ``-m "not slow"``; CI still runs them).
    slow_smoke_export: ClassVar[bool] = False
    #: ``--image-size`` when none is given (the paper's input size, or the backbone's native one).
    default_image_size: ClassVar[int] = 192
    #: Parameters that change only the inference graph, not the fit: ``edgead tune`` reuses one fit for them.
    inference_params: ClassVar[frozenset[str]] = frozenset(f.name for f in fields(MapScoreParams))
    #: What ``edgead tune`` searches when no ``--grid`` is given (only settings whose pseudo-validation
    #: ranking was seen to carry over to real defects; see the method's README).
    tune_grid: ClassVar[dict[str, list[Any]]] = {}

    def __init__(self, config: RunConfig, run_dir: Path | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.params = self.parse_params(config.method_params)
        self._pseudo_validation: dict[tuple[int | None, bool], PseudoValidationSet] = {}

    @classmethod
    def parse_params(cls, values: dict[str, Any] | None) -> Any:
        """``values`` (e.g. ``config.method_params`` or ``--param`` pairs) over the defaults, validated."""
        return cls.Params.from_dict(values, method=cls.name)

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        """Hyperparameters with the paper's defaults, as stored in ``config.json``'s ``method_params``."""
        return cls.Params().to_dict()

    @classmethod
    def model_config(cls, preset: str, channels: int, params: Any) -> dict[str, Any]:
        """``config.model`` for a new run (empty for methods without a trained network)."""
        return {}

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """The preprocessing of what the method's graph sees (with tiling: one tile)."""
        return PreprocessConfig.from_dict(self.config.preprocess)

    @property
    def frame_preprocess_config(self) -> PreprocessConfig:
        """The preprocessing of what :meth:`inference_graph` takes: the whole frame (with tiling, the frame size;
        else the same as :attr:`preprocess_config`)."""
        return frame_config(self.preprocess_config, self.config.tiling)

    def held_out_normals(self, ctx: FitContext | None = None, limit: int | None = None) -> tuple[list[np.ndarray], str]:
        """Up to ``limit`` normal uint8 RGB images at the input size that the fit did not train on (the run's
        held-out split, :func:`edgead.data.holdout.held_out_normals`) and where they came from.

        With fewer than two held-out images (``--val-fraction 0``) and a ``ctx``, the first training images,
        which the fit did see, and the source says so; without a ``ctx`` that is an error.
        """
        pre = self.preprocess_config
        rgb, _ = held_out_normals(self.run_dir, self.config.data) if self.run_dir else ([], "")
        if len(rgb) >= 2 and self.config.tiling:  # the graph sees tiles: the held-out frames' tiles
            tiling, frame = self.config.tiling, self.frame_preprocess_config
            frames = np.stack([resize_image(image, frame.size, frame.interpolation) for image in rgb])
            tiles = list(cut_tiles(frames, tiling["tile"], tiling["overlap"], channels_last=True)[:limit])
            return tiles, f"{len(tiles)} tiles of {len(rgb)} held-out normal images"
        if len(rgb) >= 2:
            rgb = [resize_image(image, pre.image_size, pre.interpolation) for image in rgb[:limit]]
            return rgb, f"{len(rgb)} held-out normal images"
        if ctx is None:
            raise ValueError(
                f"{self.run_dir}: pseudo-validation needs at least two held-out normal images; "
                "train with --val-fraction > 0"
            )
        count = len(ctx.images) if limit is None else min(len(ctx.images), limit)
        pixels = ctx.images[:count].numpy().transpose(0, 2, 3, 1)
        if pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        mean, std = np.array(pre.mean), np.array(pre.std)
        rgb = [np.clip((p * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8) for p in pixels]
        return rgb, f"{count} training images (no held-out split)"

    def pseudo_validation_set(
        self,
        ctx: FitContext | None = None,
        limit: int | None = None,
        reference: Callable[[PseudoValidationSet], float] | None = None,
    ) -> PseudoValidationSet:
        """The set every automatic choice and ``edgead tune`` score candidates on (LafitE Sec. 3.4): up to
        ``limit`` of :meth:`held_out_normals` plus as many pseudo-anomalies made from them (seed 0).

        With a ``reference`` (the choice's default candidate: a set -> its image AUROC) the set is calibrated
        to discriminate (:func:`edgead.methods.validation.calibrated_set`: several kinds, small and faint ones
        too, at the strongest strength the reference does not saturate); without, the paper's pasted
        fragments. Built once per method object, ``limit`` and kind of set (the first reference calibrates);
        see :mod:`edgead.methods.validation` for the candidates, figures and choice."""
        key = (limit, reference is not None)
        if key not in self._pseudo_validation:
            rgb, source = self.held_out_normals(ctx, limit)
            pre = self.preprocess_config
            self._pseudo_validation[key] = (
                PseudoValidationSet.from_normals(rgb, pre, source)
                if reference is None
                else calibrated_set(rgb, pre, source, reference)
            )
        return self._pseudo_validation[key]

    def resolve_params(self, values: dict[str, Any]) -> None:
        """Make ``values`` (parameter -> concrete value, e.g. an "auto" resolved) the run's: in ``self.params``
        (``dataclasses.replace``: the config is not parsed again) and in ``config.method_params``, which
        holds what the run uses (``load``, export's metadata and the benchmarks read it)."""
        self.params = dataclasses.replace(self.params, **values)
        self.config.method_params.update(values)

    def record_choice(self, key: str, record: dict[str, Any], chosen: dict[str, Any] | None = None) -> None:
        """Record an automatic choice in the run's state: ``record`` (the set, every candidate's figures,
        the choice) under ``config.state[key]``; ``chosen`` parameter values, if any, become the run's
        (:meth:`resolve_params`)."""
        self.config.state[key] = record
        if chosen:
            self.resolve_params(chosen)

    def calibrated_score(self, map_size: tuple[int, int]) -> nn.Module | None:
        """How a calibrated map is scored: the method's map aggregation; None where the image score does
        not come from the map (gaussian's pooled eq. 4)."""
        if getattr(self.params, "image_score", None) == "pooled":
            return None
        return self.params.map_score(map_size)

    @torch.no_grad()
    def calibrate_maps(self, ctx: FitContext | None = None) -> dict[str, Any]:
        """``map_calibration`` (:mod:`edgead.methods.calibration`): fit the normal maps' statistics on the
        held-out normals and, for ``auto``, choose on pseudo-validation. Runs after the fit; the statistics
        are stored whatever is chosen (``edgead tune`` and ``--param`` can switch later). Returns the summary."""
        mode = getattr(self.params, "map_calibration", "none")
        if mode == "none":
            return {}
        graph = self.build_graph().eval()
        pre = self.preprocess_config
        rgb, source = self.held_out_normals(ctx, limit=calibration.CALIBRATION_LIMIT)
        if len(rgb) < 4:
            if mode == "normal":
                raise ValueError(
                    f"map_calibration='normal' needs at least 4 held-out normal images, got {len(rgb)}; "
                    "train with more images or a larger --val-fraction"
                )
            self.record_choice("map_calibration_selection", {"chosen": "none", "why": f"{source}: fewer than 4"},
                               {"map_calibration": "none"})  # fmt: skip
            return {"map_calibration": "none"}
        normals = np.stack([preprocess(image, pre) for image in rgb]).astype(np.float32)
        maps, _ = run_graph(graph, normals)
        map_size = (int(maps.shape[-2]), int(maps.shape[-1]))
        score = self.calibrated_score(map_size)
        summary: dict[str, Any] = {}
        if mode == "auto":
            stats_half, check_half = rgb[0::2], rgb[1::2]
            mean, spread = calibration.fit_map_statistics(maps[0::2])
            seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}

            def reference(candidate_set: PseudoValidationSet) -> float:  # keeps the outputs of the set it ends on
                seen["raw"] = run_graph(graph, candidate_set.images)
                return candidate_set.figures(*seen["raw"])["image_auroc"]

            validation = calibrated_set(check_half, pre, f"{len(check_half)} of {source}", reference)
            raw = seen["raw"]  # the returned set is the one the reference saw last

            def calibrated_candidate(_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return calibration.calibrated_outputs(raw[0], mean, spread, score, raw[1])

            choice = validation.choose({"none": lambda _: raw, "normal": calibrated_candidate}, default="none")
            selection = {
                "statistics": f"{len(stats_half)} of {source}",
                **validation.describe(),
                "pseudo_validation": choice.by_name(),
                "decision": choice.decision,
                "chosen": choice.chosen,
            }
            self.record_choice("map_calibration_selection", selection, {"map_calibration": choice.chosen})
            summary["map_calibration_selection"] = selection
        mean, spread = calibration.fit_map_statistics(maps)
        self.config.state["map_calibration"] = calibration.record(mean, spread, map_size, source)
        summary["map_calibration"] = self.params.map_calibration
        return summary

    def inference_graph(self, tiled: bool = True) -> nn.Module:
        """What evaluation, export and ``edgead tune`` run: :meth:`build_graph`, its map calibrated where
        ``map_calibration="normal"`` (:mod:`edgead.methods.calibration`), and for a tiled run (``tiled``) the
        whole frame cut into tiles and stitched (:mod:`edgead.methods.tiling`; it takes
        :attr:`frame_preprocess_config` images)."""
        graph = self._calibrated_graph()
        tiling = self.config.tiling
        if not tiled or not tiling:
            return graph
        frame = frame_size(tiling)
        score = self.calibrated_score(frame)
        return TiledGraph(graph, frame, int(tiling["tile"]), float(tiling["overlap"]), score).eval()

    def _calibrated_graph(self) -> nn.Module:
        graph = self.build_graph()
        mode = getattr(self.params, "map_calibration", "none")
        stored = self.config.state.get("map_calibration")
        if mode == "auto":  # unresolved: what the run's choice chose; a run made before calibration has none
            mode = (self.config.state.get("map_calibration_selection") or {}).get("chosen", "none")
        if mode == "none":
            return graph
        if not stored:
            raise ValueError(
                f"{self.run_dir}: map_calibration={mode!r} but the run holds no calibration statistics; "
                "train it again (or pass --param map_calibration='\"none\"')"
            )
        module = calibration.from_record(stored)
        return CalibratedGraph(graph, module, self.calibrated_score(tuple(stored["map_size"]))).eval()

    @abc.abstractmethod
    def fit(self, ctx: FitContext) -> dict[str, Any]:
        """Fit on ``ctx.images``, saving into ``self.run_dir``; return a summary for the run."""

    @abc.abstractmethod
    def build_graph(self) -> nn.Module:
        """The whole inference procedure as one module: ``forward(image) -> (anomaly_map, score)``."""

    @classmethod
    @abc.abstractmethod
    def load(cls, run_dir: Path, config: RunConfig) -> Method:
        """Rebuild the fitted method from a run directory."""
