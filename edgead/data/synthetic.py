"""Synthetic MVTec-style defect datasets for demos and tests (torch-free, deterministic).

Each category is a *family* of normal images (random phase/position, brightness jitter, sensor
noise), so a detector has to learn a distribution rather than memorise one picture. Defects are
painted with an explicit blend weight, and the ground-truth mask is the region where that weight
is large enough to change the pixels meaningfully.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgead.data.files import write_json_atomic
from edgead.data.io import write_image_atomic

__all__ = [
    "CATEGORIES",
    "DEFECT_KINDS",
    "MARKER_NAME",
    "generate_dataset",
    "render_defective",
    "render_normal",
]

CATEGORIES: tuple[str, ...] = ("woven", "grain", "print", "part")
DEFECT_KINDS: tuple[str, ...] = ("scratch", "hole", "stain", "crack", "missing")
MARKER_NAME = "edgead_synthetic.json"
_FORMAT_VERSION = 1
_DATASET_DIRS = ("train", "test", "ground_truth")
# Blend weight above which a defect pixel counts as defective in the ground truth.
_MASK_ALPHA = 0.25
# Saturated stain colours; the one most unlike the scene is preferred so stains stay visible.
_STAIN_COLOURS = np.array(
    [[175, 70, 20], [30, 70, 205], [35, 160, 55], [140, 35, 160], [215, 180, 20]], dtype=np.float32
)
_SUBPIXEL_BITS = 4  # cv2 drawing with fractional coordinates (shift parameter)
_SUBPIXEL = float(1 << _SUBPIXEL_BITS)


@dataclass(frozen=True)
class _Scene:
    """A clean (noise-free) normal image plus where and how defects may be painted on it."""

    image: np.ndarray  # float32 (S, S, 3) in [0, 255]
    centre: tuple[float, float]  # (x, y) of the region defects are placed in
    radius: float  # radius of that region
    backdrop: tuple[float, float, float]  # colour seen through a "missing" chunk
    noise_sigma: float


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) as float32 arrays."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return coords[None, :].repeat(size, axis=0), coords[:, None].repeat(size, axis=1)


def _blend(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return base * (1.0 - alpha[..., None]) + colour * alpha[..., None]


def _print_scene(rng: np.random.Generator, size: int) -> _Scene:
    """Regular grid of dots and dashes printed in navy ink on a cream sheet."""
    scale = size / 64.0
    period = 8.0 * scale
    xx, yy = _grid(size)
    u = (xx - rng.uniform(0.0, period)) / period
    v = (yy - rng.uniform(0.0, period)) / period
    cell_x, cell_y = np.floor(u), np.floor(v)
    dx, dy = (u - cell_x - 0.5) * period, (v - cell_y - 0.5) * period
    # Soft (anti-aliased) edges so that sub-pixel shifts give smooth, natural variation.
    dot = np.clip(1.7 * scale - np.hypot(dx, dy) + 0.5, 0.0, 1.0)
    dash = np.clip(0.9 * scale - np.abs(dy) + 0.5, 0.0, 1.0) * np.clip(2.6 * scale - np.abs(dx) + 0.5, 0.0, 1.0)
    ink_weight = np.where((cell_x + cell_y) % 2 == 0, dot, dash)
    paper = np.array([228.0, 222.0, 205.0], dtype=np.float32) * rng.uniform(0.97, 1.03)
    ink = np.array([40.0, 55.0, 120.0], dtype=np.float32) + rng.normal(0.0, 3.0, 3).astype(np.float32)
    image = _blend(np.broadcast_to(paper, (size, size, 3)), ink, ink_weight)
    return _Scene(image, (size / 2, size / 2), 0.32 * size, (45.0, 42.0, 40.0), noise_sigma=2.0)


def _woven_scene(rng: np.random.Generator, size: int) -> _Scene:
    """Plain weave: alternating horizontal and vertical threads with rounded shading."""
    scale = size / 64.0
    period = 8.0 * scale
    xx, yy = _grid(size)
    u = (xx - rng.uniform(0.0, period)) / period
    v = (yy - rng.uniform(0.0, period)) / period
    cell_x, cell_y = np.floor(u), np.floor(v)
    fx, fy = u - cell_x - 0.5, v - cell_y - 0.5
    warp_on_top = (cell_x + cell_y) % 2 == 0
    profile = np.cos(np.pi * np.where(warp_on_top, fy, fx))  # 1 at the thread centre, 0 at its edges
    shading = (0.55 + 0.45 * profile) * rng.uniform(0.95, 1.05)
    warp = np.array([176.0, 150.0, 112.0], dtype=np.float32)
    weft = np.array([150.0, 128.0, 96.0], dtype=np.float32)
    colour = np.where(warp_on_top[..., None], warp, weft)
    image = colour * shading[..., None]
    return _Scene(image, (size / 2, size / 2), 0.32 * size, (28.0, 28.0, 32.0), noise_sigma=3.0)


def _grain_scene(rng: np.random.Generator, size: int) -> _Scene:
    """Wood-like grain: horizontally stretched smooth noise plus fine grain."""
    scale = size / 64.0
    field = cv2.GaussianBlur(
        rng.normal(0.0, 1.0, (size, size)).astype(np.float32), (0, 0), sigmaX=8.0 * scale, sigmaY=1.5 * scale
    )
    field /= float(field.std()) + 1e-6
    fine = cv2.GaussianBlur(rng.normal(0.0, 1.0, (size, size)).astype(np.float32), (0, 0), 0.6 * scale)
    tone = np.clip(0.5 + 0.18 * field + 0.05 * fine, 0.0, 1.0) * rng.uniform(0.96, 1.04)
    dark = np.array([120.0, 82.0, 50.0], dtype=np.float32)
    light = np.array([205.0, 165.0, 115.0], dtype=np.float32)
    image = _blend(np.broadcast_to(dark, (size, size, 3)), light, tone)
    return _Scene(image, (size / 2, size / 2), 0.32 * size, (25.0, 25.0, 28.0), noise_sigma=3.0)


def _part_scene(rng: np.random.Generator, size: int) -> _Scene:
    """A turned metal disc with concentric grooves and a centre bore on a dark background."""
    scale = size / 64.0
    xx, yy = _grid(size)
    cx, cy = size / 2 + rng.uniform(-3.0 * scale, 3.0 * scale, 2)
    radius = 0.36 * size * rng.uniform(0.98, 1.02)
    r = np.hypot(xx - cx, yy - cy)
    background = np.array([70.0, 74.0, 80.0], dtype=np.float32) * rng.uniform(0.95, 1.05)
    grooves = 1.0 + 0.07 * np.cos(2.0 * np.pi * r / (4.0 * scale))
    lighting = 1.0 + 0.08 * (xx - cx) / radius
    metal = np.array([185.0, 188.0, 194.0], dtype=np.float32) * rng.uniform(0.96, 1.04)
    disc = metal * (grooves * lighting)[..., None]
    hub_groove = np.clip(1.2 * scale - np.abs(r - 0.45 * radius) + 0.5, 0.0, 1.0)
    disc = _blend(disc, metal * 0.6, hub_groove)
    on_part = np.clip(radius - r + 0.5, 0.0, 1.0) * np.clip(r - 0.15 * radius + 0.5, 0.0, 1.0)
    image = _blend(np.broadcast_to(background, (size, size, 3)), disc, on_part)
    return _Scene(image, (float(cx), float(cy)), 0.6 * radius, tuple(float(c) for c in background), 2.0)


_SCENES: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "woven": _woven_scene,
    "grain": _grain_scene,
    "print": _print_scene,
    "part": _part_scene,
}


def _fixed(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates to cv2 fixed-point (shift) integers."""
    return np.rint(np.asarray(points, dtype=np.float64) * _SUBPIXEL).astype(np.int32)


def _fill_ellipse(
    canvas: np.ndarray, centre: np.ndarray, major: float, direction: float, rng: np.random.Generator
) -> None:
    """Paint a filled anti-aliased ellipse (minor axis 0.6-1.0 x ``major``) into the mask canvas."""
    axes = _fixed([major, major * rng.uniform(0.6, 1.0)])
    cv2.ellipse(
        canvas,
        tuple(_fixed(centre)),
        tuple(axes),
        float(np.degrees(direction)),
        0.0,
        360.0,
        255,
        -1,
        cv2.LINE_AA,
        _SUBPIXEL_BITS,
    )


def _contrasting_grey(rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    """Dark on bright scenes, bright on dark ones, so lines are always visible."""
    luminance = float(scene.image.mean())
    level = rng.uniform(20.0, 45.0) if luminance > 110.0 else rng.uniform(230.0, 250.0)
    return np.full(3, level, dtype=np.float32)


def _paint_defect(
    rng: np.random.Generator, scene: _Scene, kind: str, defect_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (blend weight in [0, 1], defect colour image) for one defect."""
    size = scene.image.shape[0]
    scale = size / 64.0 * defect_scale
    angle = rng.uniform(0.0, 2.0 * np.pi)
    distance = scene.radius * np.sqrt(rng.uniform(0.0, 1.0))
    centre = np.array(scene.centre) + distance * np.array([np.cos(angle), np.sin(angle)])
    canvas = np.zeros((size, size), dtype=np.uint8)
    direction = rng.uniform(0.0, 2.0 * np.pi)
    unit = np.array([np.cos(direction), np.sin(direction)])
    colour: np.ndarray
    if kind == "scratch":
        half = rng.uniform(9.0, 15.0) * scale * unit
        start, end = _fixed(centre - half), _fixed(centre + half)
        thickness = max(1, round(2.0 * scale))
        cv2.line(canvas, tuple(start), tuple(end), 255, thickness, cv2.LINE_AA, _SUBPIXEL_BITS)
        colour = _contrasting_grey(rng, scene)
    elif kind == "hole":
        major = rng.uniform(4.0, 7.0) * scale
        _fill_ellipse(canvas, centre, major, direction, rng)
        colour = np.full(3, rng.uniform(15.0, 30.0), dtype=np.float32)
    elif kind == "stain":
        major = rng.uniform(5.0, 8.0) * scale
        _fill_ellipse(canvas, centre, major, direction, rng)
        soft = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), 1.5 * scale)
        scene_colour = scene.image.reshape(-1, 3).mean(axis=0)
        distances = np.linalg.norm(_STAIN_COLOURS - scene_colour, axis=1)
        colour = _STAIN_COLOURS[rng.choice(np.argsort(distances)[-2:])]
        return soft * rng.uniform(0.85, 1.0), colour
    elif kind == "crack":
        steps = int(rng.integers(10, 17))
        headings = direction + np.cumsum(rng.normal(0.0, 0.5, steps))
        moves = 2.5 * scale * np.stack([np.cos(headings), np.sin(headings)], axis=1)
        path = np.concatenate([np.zeros((1, 2)), np.cumsum(moves, axis=0)])
        path += centre - path.mean(axis=0)
        thickness = max(1, round(1.5 * scale))
        # LINE_8 (no anti-aliasing): a crack is a sharp, binary discontinuity.
        cv2.polylines(canvas, [_fixed(path)], False, 255, thickness, cv2.LINE_8, _SUBPIXEL_BITS)
        colour = np.full(3, rng.uniform(10.0, 30.0), dtype=np.float32)
    elif kind == "missing":
        width, height = rng.uniform(7.0, 12.0) * scale, rng.uniform(5.0, 10.0) * scale
        corners = cv2.boxPoints(((float(centre[0]), float(centre[1])), (width, height), np.degrees(direction)))
        corners += rng.uniform(-1.0, 1.0, corners.shape) * scale  # ragged rather than machined edges
        cv2.fillPoly(canvas, [_fixed(corners)], 255, cv2.LINE_8, _SUBPIXEL_BITS)
        colour = np.array(scene.backdrop, dtype=np.float32)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECT_KINDS}")
    return canvas.astype(np.float32) / 255.0, colour


def _finish(rng: np.random.Generator, image: np.ndarray, noise_sigma: float) -> np.ndarray:
    """Adds sensor noise (after any defect, so defects are noisy like the rest) and quantises."""
    noisy = image + rng.normal(0.0, noise_sigma, image.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def render_normal(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Renders one normal image of a category.

    Returns:
        uint8 (size, size, 3) RGB image.
    """
    _check_category(category)
    scene = _SCENES[category](rng, size)
    return _finish(rng, scene.image, scene.noise_sigma)


def render_defective(
    category: str, size: int, kind: str, rng: np.random.Generator, defect_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Renders one defective image and its exact ground-truth mask.

    Returns:
        (uint8 (size, size, 3) RGB image, bool (size, size) mask of the painted defect region).
    """
    _check_category(category)
    scene = _SCENES[category](rng, size)
    alpha, colour = _paint_defect(rng, scene, kind, defect_scale)
    mask = alpha > _MASK_ALPHA
    if not mask.any():  # a tiny defect_scale can round a defect away; keep the label truthful
        y, x = np.unravel_index(int(np.argmax(alpha)), alpha.shape)
        alpha[y, x] = 1.0
        mask[y, x] = True
    return _finish(rng, _blend(scene.image, colour, alpha), scene.noise_sigma), mask


def _prepare_root(root: Path, marker: dict[str, object]) -> bool:
    """Makes ``root`` ready for generation; True when an identical complete dataset is already there.

    Raises:
        ValueError: ``root`` is a file, or a non-empty directory that is not an edgead synthetic dataset.
    """
    if root.exists() and not root.is_dir():
        raise ValueError(f"cannot generate a dataset at {root}: it is a file, expected a directory")
    root.mkdir(parents=True, exist_ok=True)
    entries = list(root.iterdir())
    if not entries:
        return False
    marker_path = root / MARKER_NAME
    try:
        existing = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"refusing to write a synthetic dataset into non-empty directory {root}: "
            f"it has no readable {MARKER_NAME} marker, so it is not an edgead synthetic dataset"
        ) from exc
    if existing.get("params") == marker["params"] and existing.get("complete") is True:
        return True
    ours = set(_DATASET_DIRS) | {MARKER_NAME}
    foreign = sorted(entry.name for entry in entries if entry.name not in ours and not entry.name.startswith("."))
    if foreign:
        raise ValueError(f"refusing to overwrite {root}: it also holds files edgead did not write: {foreign}")
    # A previous synthetic dataset with other parameters (or an interrupted run): regenerate.
    for name in _DATASET_DIRS:
        shutil.rmtree(root / name, ignore_errors=True)
    return False


def _child_rng(seed: int, category: str, split: int, index: int) -> np.random.Generator:
    """Independent stream per image, so changing one split's count leaves the others unchanged."""
    sequence = np.random.SeedSequence(entropy=(seed, CATEGORIES.index(category)), spawn_key=(split, index))
    return np.random.default_rng(sequence)


def generate_dataset(
    root: str | os.PathLike[str],
    category: str = "print",
    size: int = 64,
    n_train: int = 200,
    n_test_good: int = 40,
    n_test_defect: int = 60,
    seed: int = 0,
    defect_kinds: Sequence[str] = DEFECT_KINDS,
    defect_scale: float = 1.0,
) -> Path:
    """Writes a deterministic synthetic dataset in the MVTec-AD layout (PNG files).

    Files: ``train/good/NNN.png``, ``test/good/NNN.png``, ``test/<kind>/NNN.png`` and
    ``ground_truth/<kind>/NNN_mask.png`` (0/255). Defect kinds are assigned round-robin. The same
    arguments give byte-identical files. A ``edgead_synthetic.json`` marker records the
    parameters; if it matches and the previous run completed, nothing is regenerated.

    Args:
        root: Output directory (created if missing).
        category: One of ``CATEGORIES``.
        size: Image side length in pixels (>= 16).
        n_train: Normal training images (>= 1).
        n_test_good: Normal test images (>= 1).
        n_test_defect: Defective test images (>= 0).
        seed: Non-negative random seed.
        defect_kinds: Subset of ``DEFECT_KINDS`` to use.
        defect_scale: Multiplies defect sizes (1.0: mask area roughly 1-5 % at any image size).

    Returns:
        The dataset root.

    Raises:
        ValueError: Invalid arguments, or ``root`` is a non-empty directory that is not an edgead
            synthetic dataset.
    """
    _check_category(category)
    kinds = tuple(defect_kinds)
    unknown = [kind for kind in kinds if kind not in DEFECT_KINDS]
    if unknown or (n_test_defect > 0 and not kinds):
        raise ValueError(f"defect_kinds must be a non-empty subset of {DEFECT_KINDS}, got {kinds}")
    if size < 16 or n_train < 1 or n_test_good < 1 or n_test_defect < 0 or seed < 0 or defect_scale <= 0:
        raise ValueError(
            "need size >= 16, n_train >= 1, n_test_good >= 1, n_test_defect >= 0, seed >= 0 and "
            f"defect_scale > 0; got size={size}, n_train={n_train}, n_test_good={n_test_good}, "
            f"n_test_defect={n_test_defect}, seed={seed}, defect_scale={defect_scale}"
        )
    root_path = Path(root)
    params: dict[str, object] = {
        "format_version": _FORMAT_VERSION,
        "category": category,
        "size": int(size),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_defect": int(n_test_defect),
        "seed": int(seed),
        "defect_kinds": list(kinds),
        "defect_scale": float(defect_scale),
    }
    marker = {"generator": "edgead.data.synthetic", "params": params, "complete": False}
    if _prepare_root(root_path, marker):
        return root_path
    # The marker goes first (incomplete) so an interrupted run is recognised as ours and redone.
    write_json_atomic(root_path / MARKER_NAME, marker, durable=False)

    digits = max(3, len(str(max(n_train, n_test_good, n_test_defect))))
    for index in range(n_train):
        image = render_normal(category, size, _child_rng(seed, category, 0, index))
        write_image_atomic(root_path / "train" / "good" / f"{index:0{digits}d}.png", image)
    for index in range(n_test_good):
        image = render_normal(category, size, _child_rng(seed, category, 1, index))
        write_image_atomic(root_path / "test" / "good" / f"{index:0{digits}d}.png", image)
    for index in range(n_test_defect):
        kind = kinds[index % len(kinds)]
        number = index // len(kinds)
        rng = _child_rng(seed, category, 2, index)
        image, mask = render_defective(category, size, kind, rng, defect_scale)
        write_image_atomic(root_path / "test" / kind / f"{number:0{digits}d}.png", image)
        write_image_atomic(root_path / "ground_truth" / kind / f"{number:0{digits}d}_mask.png", mask)

    marker["complete"] = True
    write_json_atomic(root_path / MARKER_NAME, marker, durable=False)
    return root_path
