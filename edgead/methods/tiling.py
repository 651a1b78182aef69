"""Tiled inference for small defects on large images, for every method (our addition; anomalib's tiler).

Squashing a whole frame to the model's input size (224 px for the backbone methods) shrinks a small defect
below what the features resolve. With ``--tile T`` the frame is preprocessed at ``--image-size F`` (F > T)
and cut into T x T tiles that overlap by ``--tile-overlap`` of a tile; the method is fitted on the training
images' tiles and its graph scores each tile at its own input size. A frame that is not square (a camera's
16:9, a long part such as a ball screw) keeps its aspect ratio with ``--frame-width W``: the frame is then
F high and W wide (both >= T) and the tiles cover both sides the same way. One exported graph takes the whole
frame:

1. the tiles, cut with fixed slices (origins ``0, stride, 2 stride, ..., F - T`` along each side, the last one
   flush with the edge; a side equal to T has one), stacked along the batch;
2. the method's graph on all tiles at once;
3. each tile's map resized to T x T and placed back; where tiles overlap, the mean;
4. the image score over the stitched map by the method's map aggregation (``image_score``); for a score that
   does not come from the map (gaussian's pooled eq. 4), the maximum over the tiles' scores.

So the runtime is unchanged: it resizes a frame to F x W and calls one graph, as for any export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgead.data.mvtec import load_images
from edgead.data.preprocess import PreprocessConfig, height_width
from edgead.methods.wrapping import has_gradients, wrapped_networks

#: Overlap of neighbouring tiles, as a share of the tile (engineering choice: a quarter, so a defect cut by
#: one tile's edge lies inside its neighbour).
DEFAULT_OVERLAP = 0.25


def tile_origins(frame: int, tile: int, overlap: float) -> list[int]:
    """Top-left coordinates along one side: every ``stride = round(tile * (1 - overlap))`` pixels, the last
    tile flush with the far edge (a side as long as the tile: one tile, at 0)."""
    if not 0 < tile <= frame:
        raise ValueError(f"the tile ({tile} px) must not be larger than the frame's side ({frame} px)")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    stride = max(1, round(tile * (1.0 - overlap)))
    origins = list(range(0, frame - tile, stride))
    return [*origins, frame - tile]


def tile_grid(frame: int | tuple[int, int], tile: int, overlap: float) -> list[tuple[int, int]]:
    """``(y, x)`` of every tile of a frame (one side, a square, or ``(height, width)``), row by row."""
    height, width = height_width(frame)
    return [(y, x) for y in tile_origins(height, tile, overlap) for x in tile_origins(width, tile, overlap)]


def frame_size(tiling: dict[str, Any]) -> tuple[int, int]:
    """``(height, width)`` of a run's ``config.tiling`` frame (``frame_width`` only where it is not square)."""
    height = int(tiling["frame_size"])
    return height, int(tiling.get("frame_width") or height)


def with_frame(tiling: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """``tiling`` (a run's ``config.tiling``, or its ``tile`` and ``overlap``) for a ``height x width`` frame:
    ``frame_size`` the height, ``frame_width`` only where the frame is not square (a square run's record stays
    what it always was)."""
    rest = {key: value for key, value in tiling.items() if key not in ("frame_size", "frame_width")}
    return {"frame_size": int(height), **rest, **({"frame_width": int(width)} if width != height else {})}


def frame_config(pre: PreprocessConfig, tiling: dict[str, Any] | None) -> PreprocessConfig:
    """The preprocessing of a run's whole frame: the tiles' own (``pre``) at the frame's size; ``pre`` itself
    for a run without tiling."""
    if not tiling:
        return pre
    height, width = frame_size(tiling)
    return dataclasses.replace(pre, image_size=height, image_width=None if width == height else width)


def cut_tiles(images: np.ndarray, tile: int, overlap: float, channels_last: bool = False) -> np.ndarray:
    """Every tile of every image, image-major: ``(N, C, H, W) -> (N * T, C, tile, tile)`` (or ``(N, H, W, C)``
    -> ``(N * T, tile, tile, C)`` with ``channels_last``)."""
    images = np.asarray(images)
    frame = images.shape[1:3] if channels_last else images.shape[-2:]
    grid = tile_grid(tuple(frame), tile, overlap)
    if channels_last:
        parts = [images[:, y : y + tile, x : x + tile] for y, x in grid]
    else:
        parts = [images[:, :, y : y + tile, x : x + tile] for y, x in grid]
    return np.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:])


#: Frames read at a time by :func:`load_tiles`: bounds the memory above the tiles themselves.
_FRAMES_PER_CHUNK = 32


def load_tiles(samples: Sequence[Any], frame: PreprocessConfig, tile: int, overlap: float) -> np.ndarray:
    """The tiles of every training frame, as :func:`cut_tiles` gives them, read a few frames at a time into one
    array: the frames are never all in memory next to their tiles (at 1130 x 460 px, 511 frames take 3.2 GB
    and their tiles, 21 of 224 px each, 6.5 GB)."""
    count = len(tile_grid(frame.size, tile, overlap))
    tiles = np.empty((len(samples) * count, frame.channels, tile, tile), dtype=np.float32)
    for start in range(0, len(samples), _FRAMES_PER_CHUNK):
        chunk = samples[start : start + _FRAMES_PER_CHUNK]
        tiles[start * count : (start + len(chunk)) * count] = cut_tiles(load_images(chunk, frame), tile, overlap)
    return tiles


class TiledGraph(nn.Module):
    """``forward(frame (B, C, H, W)) -> (stitched map (B, H, W), score (B,))`` over a method's tile graph."""

    def __init__(
        self, graph: nn.Module, frame: int | tuple[int, int], tile: int, overlap: float, score: nn.Module | None
    ) -> None:
        super().__init__()
        self.tile_graph = graph
        self.frame, self.tile = height_width(frame), int(tile)
        self.grid = tile_grid(self.frame, self.tile, overlap)
        self.score = score  # None: the maximum of the tiles' own scores
        coverage = torch.zeros(*self.frame)
        for y, x in self.grid:
            coverage[y : y + tile, x : x + tile] += 1.0
        self.register_buffer("inverse_coverage", 1.0 / coverage)
        self.has_gradients = has_gradients(graph)
        self.fp16_modules = wrapped_networks({"tile_graph": graph})

    @property
    def n_tiles(self) -> int:
        return len(self.grid)

    def export_notes(self) -> dict[str, Any]:
        notes = dict(self.tile_graph.export_notes()) if hasattr(self.tile_graph, "export_notes") else {}
        height, width = self.frame
        notes["tiling"] = {
            "frame": [height, width],
            "tile": self.tile,
            "origins": {"y": sorted({y for y, _ in self.grid}), "x": sorted({x for _, x in self.grid})},
            "tiles": self.n_tiles,
        }
        return notes

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, size, n = image.shape[0], self.tile, self.n_tiles
        height, width = self.frame
        tiles = torch.cat([image[:, :, y : y + size, x : x + size] for y, x in self.grid])
        maps, scores = self.tile_graph(tiles)  # tile-major: rows [i * B, (i + 1) * B) are tile i
        maps = maps.float()
        if tuple(maps.shape[-2:]) != (size, size):
            maps = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        maps = maps.reshape(n, batch, size, size)
        stitched = image.new_zeros(batch, height, width, dtype=torch.float32)
        for index, (y, x) in enumerate(self.grid):
            stitched = stitched + F.pad(maps[index], (x, width - x - size, y, height - y - size))
        stitched = stitched * self.inverse_coverage
        if self.score is not None:
            return stitched, self.score(stitched)
        return stitched, scores.float().reshape(n, batch).amax(dim=0)


__all__ = [
    "DEFAULT_OVERLAP",
    "TiledGraph",
    "cut_tiles",
    "frame_config",
    "frame_size",
    "load_tiles",
    "tile_grid",
    "tile_origins",
    "with_frame",
]
