"""What gaussian's fit gathers from the backbone: pooled vectors (eq. 4), sampled position vectors, and the
moments of every position (``positions.py``), in one pass over the training images."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from edgead.methods.gaussian.positions import PositionMoments

#: Feature maps of all training images up to this many bytes are kept for the per-position fit's second pass;
#: above it that pass runs the backbone again (engineering bound: 1 GiB; 224 px runs of a few hundred images
#: keep theirs, e.g. 685 magnetic_tile images take 0.26 GB over the five default stages, while the 10,731
#: tiles of 511 bsdata frames at 1130 x 460 px would take 4 GB).
KEEP_MAPS_BYTES = 1 << 30


class TrainingFeatures(NamedTuple):
    """What :func:`collect_features` gathers per stage for the Gaussians."""

    pooled: list[np.ndarray]  # (N, C): globally average-pooled, for the image Gaussians (eq. 4)
    positions: list[np.ndarray]  # (M, C): spatial vectors of all positions, for map_statistics="positions"
    sizes: list[tuple[int, int]]  # (h, w) of each stage's feature map
    moments: list[PositionMoments]  # pass 1 of map_statistics="per_position" (else empty)
    maps: list[torch.Tensor]  # (N, C, h, w): the whole maps for its pass 2, where they fit KEEP_MAPS_BYTES


@torch.no_grad()
def stage_batches(
    adapter: nn.Module,
    backbone: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    label: str = "features",
) -> Iterator[list[torch.Tensor]]:
    """The backbone's stage features ``(B, C, h, w)`` (float32, on the CPU) of ``images``, batch by batch."""
    console = Console(stderr=True)
    columns = (
        TextColumn(f"[bold]gaussian {label}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    adapter, backbone = adapter.to(device), backbone.to(device)
    with Progress(*columns, console=console, disable=not progress or not console.is_terminal) as bar:
        task = bar.add_task(label, total=len(images))
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device, torch.float32)
            yield [feature.float().cpu() for feature in backbone(adapter(batch))]
            bar.advance(task, len(batch))


def collect_features(
    adapter: nn.Module,
    backbone: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    max_map_vectors: int | None,
    seed: int,
    position_moments: bool = False,
    progress: bool = False,
) -> TrainingFeatures:
    """Run the backbone over ``images`` once and gather what the Gaussians are fitted on.

    Returns:
        Per stage, the globally average-pooled vectors ``(N, C)``, the spatial feature vectors ``(M, C)``
        of all positions (a seeded random subset of at most about ``max_map_vectors``, taken evenly from
        every batch; empty when ``max_map_vectors`` is 0), the feature map size ``(h, w)``, and with
        ``position_moments`` each position's moments (pass 1 of the per-position fit) and, where all
        images' maps take at most :data:`KEEP_MAPS_BYTES`, the maps themselves (float32).
    """
    count = len(images)
    generator = torch.Generator().manual_seed(seed)
    pooled: list[list[torch.Tensor]] = []
    positions: list[list[torch.Tensor]] = []
    moments: list[PositionMoments] = []
    maps: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    start = 0
    batches = stage_batches(adapter, backbone, images, batch_size=batch_size, device=device, progress=progress)
    for features in batches:
        if not pooled:
            pooled, positions = [[] for _ in features], [[] for _ in features]
            sizes = [(int(f.shape[2]), int(f.shape[3])) for f in features]
            if position_moments:
                moments = [PositionMoments() for _ in features]
                if count * sum(f[0].numel() for f in features) * 4 <= KEEP_MAPS_BYTES:
                    maps = [torch.empty((count, *f.shape[1:])) for f in features]
        for stage, feature in enumerate(features):
            pooled[stage].append(feature.mean(dim=(2, 3)))
            if moments:
                moments[stage].add(feature)
            if maps:
                maps[stage][start : start + len(feature)] = feature
            if max_map_vectors == 0:
                continue
            vectors = feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])
            quota = vectors.shape[0] if max_map_vectors is None else math.ceil(max_map_vectors * len(feature) / count)
            if vectors.shape[0] > quota:  # bound memory and fitting time on large inputs
                vectors = vectors[torch.randperm(vectors.shape[0], generator=generator)[:quota]]
            positions[stage].append(vectors)
        start += len(features[0])
    return TrainingFeatures(
        [torch.cat(chunks).numpy() for chunks in pooled],
        [torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32) for chunks in positions],
        sizes,
        moments,
        maps,
    )


__all__ = ["KEEP_MAPS_BYTES", "TrainingFeatures", "collect_features", "stage_batches"]
