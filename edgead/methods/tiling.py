"""Tiled inference for small defects on large images, for every method (our addition; anomalib's tiler).

Squashing a whole frame to the model's input size (224 px for the backbone methods) shrinks a small defect
below what the features resolve. With ``--tile T`` the frame is preprocessed at ``--image-size F`` (F > T)
and cut into T x T tiles that overlap by ``--tile-overlap`` of a tile; the method is fitted on the training
images' tiles and its graph scores each tile at its own input size. One exported graph takes the whole frame:

1. the tiles, cut with fixed slices (origins ``0, stride, 2 stride, ..., F - T``, the last one flush with the
   edge), stacked along the batch;
2. the method's graph on all tiles at once;
3. each tile's map resized to T x T and placed back; where tiles overlap, the mean;
4. the image score over the stitched map by the method's map aggregation (``image_score``); for a score that
   does not come from the map (gaussian's pooled eq. 4), the maximum over the tiles' scores.

So the runtime is unchanged: it resizes a frame to F x F and calls one graph, as for any export.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgead.methods.wrapping import has_gradients, wrapped_networks

#: Overlap of neighbouring tiles, as a share of the tile (engineering choice: a quarter, so a defect cut by
#: one tile's edge lies inside its neighbour).
DEFAULT_OVERLAP = 0.25


def tile_origins(frame: int, tile: int, overlap: float) -> list[int]:
    """Top-left coordinates along one side: every ``stride = round(tile * (1 - overlap))`` pixels, the last
    tile flush with the far edge."""
    if not 0 < tile < frame:
        raise ValueError(f"the tile ({tile} px) must be smaller than the frame (--image-size {frame} px)")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    stride = max(1, round(tile * (1.0 - overlap)))
    origins = list(range(0, frame - tile, stride))
    return [*origins, frame - tile]


def cut_tiles(images: np.ndarray, tile: int, overlap: float, channels_last: bool = False) -> np.ndarray:
    """Every tile of every image, image-major: ``(N, C, F, F) -> (N * T, C, tile, tile)`` (or ``(N, F, F, C)``
    -> ``(N * T, tile, tile, C)`` with ``channels_last``)."""
    images = np.asarray(images)
    frame = images.shape[1] if channels_last else images.shape[-1]
    origins = tile_origins(frame, tile, overlap)
    if channels_last:
        parts = [images[:, y : y + tile, x : x + tile] for y in origins for x in origins]
    else:
        parts = [images[:, :, y : y + tile, x : x + tile] for y in origins for x in origins]
    return np.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:])


class TiledGraph(nn.Module):
    """``forward(frame (B, C, F, F)) -> (stitched map (B, F, F), score (B,))`` over a method's tile graph."""

    def __init__(self, graph: nn.Module, frame: int, tile: int, overlap: float, score: nn.Module | None) -> None:
        super().__init__()
        self.tile_graph = graph
        self.frame, self.tile = int(frame), int(tile)
        self.origins = tile_origins(self.frame, self.tile, overlap)
        self.score = score  # None: the maximum of the tiles' own scores
        coverage = torch.zeros(self.frame, self.frame)
        for y in self.origins:
            for x in self.origins:
                coverage[y : y + tile, x : x + tile] += 1.0
        self.register_buffer("inverse_coverage", 1.0 / coverage)
        self.has_gradients = has_gradients(graph)
        self.fp16_modules = wrapped_networks({"tile_graph": graph})

    @property
    def n_tiles(self) -> int:
        return len(self.origins) ** 2

    def export_notes(self) -> dict[str, Any]:
        notes = dict(self.tile_graph.export_notes()) if hasattr(self.tile_graph, "export_notes") else {}
        notes["tiling"] = {"frame": self.frame, "tile": self.tile, "origins": self.origins, "tiles": self.n_tiles}
        return notes

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, size, n = image.shape[0], self.tile, self.n_tiles
        tiles = torch.cat([image[:, :, y : y + size, x : x + size] for y in self.origins for x in self.origins])
        maps, scores = self.tile_graph(tiles)  # tile-major: rows [i * B, (i + 1) * B) are tile i
        maps = maps.float()
        if tuple(maps.shape[-2:]) != (size, size):
            maps = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        maps = maps.reshape(n, batch, size, size)
        stitched = image.new_zeros(batch, self.frame, self.frame, dtype=torch.float32)
        index = 0
        for y in self.origins:
            for x in self.origins:
                pad = (x, self.frame - x - size, y, self.frame - y - size)
                stitched = stitched + F.pad(maps[index], pad)
                index += 1
        stitched = stitched * self.inverse_coverage
        if self.score is not None:
            return stitched, self.score(stitched)
        return stitched, scores.float().reshape(n, batch).amax(dim=0)


__all__ = ["DEFAULT_OVERLAP", "TiledGraph", "cut_tiles", "tile_origins"]
