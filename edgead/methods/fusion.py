"""Score fusion: one inference graph that runs two (or more) trained runs on the same input and fuses them.

Methods fail differently (a feature Gaussian misses what a reconstruction sees, and the other way round), so
a fused detector can beat each member. Each member's map and score are first put on one scale, standardised
by the mean and standard deviation of that member's outputs on held-out normal images (the maps pooled over
all pixels), then fused by their ``mean`` or ``max`` (our addition; no paper here fuses methods):

    map(p) = fuse_i((map_i(p) - mu_i) / sd_i),    score = fuse_i((score_i - nu_i) / s_i)

The member maps are resized bilinearly to the first member's map size. All statistics are buffers, so the
fused graph exports like any method's graph (``edgead export --fuse RUN``). ``how="auto"`` chooses on
pseudo-validation (:mod:`edgead.methods.validation`): the statistics from one half of the held-out normals,
the choice on a discriminating set made from the other half, ``mean`` kept unless ``max`` beats it by more
than one standard error; the shipped statistics come from all held-out normals.

The members must preprocess alike (input size, channels, normalisation) and have held out the same normal
images (the same data and seed), so that no member was fitted on the images the statistics come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgead.data.holdout import load_holdout
from edgead.data.preprocess import preprocess
from edgead.methods import load_method
from edgead.methods.base import Method
from edgead.methods.validation import PseudoValidationSet, calibrated_set, run_graph
from edgead.methods.wrapping import has_gradients, wrapped_networks

FUSIONS = ("mean", "max")
#: The fusion kept unless the other beats it by more than one standard error (engineering choice: the mean
#: uses every member's evidence; the max lets one member's false alarms through).
DEFAULT_FUSION = "mean"


class FusedGraph(nn.Module):
    """``forward(image) -> (fused map (B, H, W), fused score (B,))`` over ``members`` (see the module docstring)."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        map_stats: np.ndarray,
        score_stats: np.ndarray,
        how: str,
        map_size: tuple[int, int],
    ) -> None:
        super().__init__()
        if how not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {how!r}")
        if len(members) < 2:
            raise ValueError(f"fusion needs at least two member graphs, got {len(members)}")
        map_stats, score_stats = np.asarray(map_stats, np.float32), np.asarray(score_stats, np.float32)
        if map_stats.shape != (len(members), 2) or score_stats.shape != (len(members), 2):
            raise ValueError(f"need (mean, sd) per member, got {map_stats.shape} and {score_stats.shape}")
        if (map_stats[:, 1] <= 0).any() or (score_stats[:, 1] <= 0).any():
            raise ValueError("a member's outputs do not vary on the normal images (sd 0): it cannot be standardised")
        self.members = nn.ModuleList(members)
        self.register_buffer("map_stats", torch.from_numpy(map_stats))
        self.register_buffer("score_stats", torch.from_numpy(score_stats))
        self.how = how
        self.map_size = (int(map_size[0]), int(map_size[1]))
        self.has_gradients = has_gradients(*members)
        self.fp16_modules = wrapped_networks({f"members.{index}": member for index, member in enumerate(members)})

    def export_notes(self) -> dict[str, Any]:
        notes: dict[str, Any] = {"fusion": self.how, "members": []}
        for member in self.members:
            notes["members"].append(member.export_notes() if hasattr(member, "export_notes") else {})
        noises = [n.get("noise") for n in notes["members"] if n.get("noise")]
        notes["noise"] = "; ".join(noises) if noises else None
        notes["fp32_parts"] = "each member's FP32 parts, the standardisation and the fusion"
        return notes

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores = [], []
        for index, member in enumerate(self.members):
            anomaly_map, score = member(image)
            anomaly_map = anomaly_map.float()
            if tuple(anomaly_map.shape[-2:]) != self.map_size:
                anomaly_map = F.interpolate(
                    anomaly_map[:, None], size=self.map_size, mode="bilinear", align_corners=False
                )[:, 0]
            maps.append((anomaly_map - self.map_stats[index, 0]) / self.map_stats[index, 1])
            scores.append((score.float() - self.score_stats[index, 0]) / self.score_stats[index, 1])
        stacked_maps, stacked_scores = torch.stack(maps), torch.stack(scores)
        if self.how == "mean":
            return stacked_maps.mean(dim=0), stacked_scores.mean(dim=0)
        return stacked_maps.amax(dim=0), stacked_scores.amax(dim=0)


def _statistics(outputs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """``(map_stats, score_stats)``: per member, the mean and sd of its normal maps' pixels and of its scores."""
    map_stats = [(float(m.mean()), float(m.std())) for m, _ in outputs]
    score_stats = [(float(s.mean()), float(s.std(ddof=1))) for _, s in outputs]
    return np.array(map_stats), np.array(score_stats)


def check_members(methods: Sequence[Method], run_dirs: Sequence[Path]) -> tuple[list[np.ndarray], str]:
    """The held-out normal images the members share, refusing members that cannot be fused."""
    first = methods[0].preprocess_config
    for method, run_dir in zip(methods[1:], run_dirs[1:], strict=True):
        if method.preprocess_config != first or method.config.tiling != methods[0].config.tiling:
            raise ValueError(
                f"{run_dir}: preprocesses differently from {run_dirs[0]} ({method.preprocess_config}, tiling "
                f"{method.config.tiling} vs {first}, {methods[0].config.tiling}); train the runs with the same "
                "--image-size, --channels and --tile"
            )
    held = [load_holdout(run_dir, m.config.data.get("holdout")) for m, run_dir in zip(methods, run_dirs, strict=True)]
    if len(held[0][0]) < 4:
        raise ValueError(f"{run_dirs[0]}: fusion needs at least 4 held-out normal images, got {len(held[0][0])}")
    for (_, names), run_dir in zip(held[1:], run_dirs[1:], strict=True):
        if list(names) != list(held[0][1]):
            raise ValueError(
                f"{run_dir}: held out other normal images than {run_dirs[0]}, so one member may have been fitted "
                "on the images the fusion is calibrated on; train both on the same data with the same seed"
            )
    return held[0][0], f"{len(held[0][0])} held-out normal images"


@torch.no_grad()
def fuse_runs(run_dirs: Sequence[Path], how: str = "auto") -> tuple[FusedGraph, dict[str, Any]]:
    """The fused graph of the trained runs ``run_dirs`` and the record of how it was made (statistics, and
    for ``how="auto"`` every candidate's pseudo-validation figures and the decision)."""
    if how not in ("auto", *FUSIONS):
        raise ValueError(f"fusion must be auto, {', '.join(FUSIONS)}; got {how!r}")
    if len(run_dirs) < 2:
        raise ValueError(f"fusion needs at least two runs, got {len(run_dirs)}")
    methods = [load_method(Path(run_dir)) for run_dir in run_dirs]
    normals_rgb, source = check_members(methods, [Path(r) for r in run_dirs])
    pre = methods[0].frame_preprocess_config
    graphs = [method.inference_graph().eval() for method in methods]
    normals = np.stack([preprocess(image, pre) for image in normals_rgb]).astype(np.float32)
    outputs = [run_graph(graph, normals) for graph in graphs]
    map_size = (int(outputs[0][0].shape[-2]), int(outputs[0][0].shape[-1]))
    record: dict[str, Any] = {
        "members": [{"run": Path(r).name, "method": m.config.method} for r, m in zip(run_dirs, methods, strict=True)],
        "statistics": source,
    }
    if how == "auto":
        half = [(m[0::2], s[0::2]) for m, s in outputs]
        map_stats, score_stats = _statistics(half)
        candidates = {name: FusedGraph(graphs, map_stats, score_stats, name, map_size).eval() for name in FUSIONS}
        seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def reference(candidate_set: PseudoValidationSet) -> float:  # keeps the outputs of the set it ends on
            seen["default"] = run_graph(candidates[DEFAULT_FUSION], candidate_set.images)
            return candidate_set.figures(*seen["default"])["image_auroc"]

        validation = calibrated_set(normals_rgb[1::2], pre, f"{len(normals_rgb[1::2])} of {source}", reference)
        # the returned set is the one the reference saw last: the default's outputs on it are known
        choice = validation.choose({**candidates, DEFAULT_FUSION: lambda _: seen["default"]}, default=DEFAULT_FUSION)
        how = choice.chosen
        record.update({**validation.describe(), "pseudo_validation": choice.by_name(), "decision": choice.decision})
    map_stats, score_stats = _statistics(outputs)
    record.update({"how": how, "map_stats": map_stats.round(6).tolist(), "score_stats": score_stats.round(6).tolist()})
    return FusedGraph(graphs, map_stats, score_stats, how, map_size).eval(), record


__all__ = ["DEFAULT_FUSION", "FUSIONS", "FusedGraph", "check_members", "fuse_runs"]
