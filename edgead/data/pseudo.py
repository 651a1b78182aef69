"""Pseudo-anomalies cut from normal images, for validation when no real defects exist (torch-free).

Follows LafitE (Yin et al., 2023), section 3.4 "Anomalous Data Synthesis": masks of different
shapes and sizes are randomly rotated and combined, the resulting fragments are cut from one
normal image and pasted onto another randomly selected normal image, and the pasted fragments
are labelled anomalous. Fragments also move to a different location, so they are out of context
even when both images look alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from edgead.data.preprocess import PreprocessConfig, preprocess, resize_mask

__all__ = [
    "DISCRIMINATING_KINDS",
    "KINDS",
    "SHAPES",
    "InspectionDefect",
    "PseudoAnomaly",
    "make_pseudo_anomaly_set",
    "pseudo_validation_set",
]

SHAPES: tuple[str, ...] = ("ellipse", "rectangle", "polygon")
_SUBPIXEL_BITS = 4
_PLACEMENT_TRIES = 20


def _fixed(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates to cv2 fixed-point (shift) integers."""
    return np.rint(np.asarray(points, dtype=np.float64) * (1 << _SUBPIXEL_BITS)).astype(np.int32)


class PseudoAnomaly:
    """Pastes rotated, combined shape fragments of a source image onto a target image.

    Implements LafitE section 3.4 (Anomalous Data Synthesis). Calls draw from one internal random
    stream, so a fresh instance with the same seed and the same call sequence reproduces its output.

    Args:
        seed: Random seed.
        n_shapes: Inclusive (min, max) number of shapes combined into one fragment mask.
        area_fraction: (min, max) total shape area as a fraction of the image area; overlapping
            shapes make the final mask somewhat smaller.
        shapes: Shape kinds to draw from, a subset of ``SHAPES``.
    """

    def __init__(
        self,
        seed: int = 0,
        n_shapes: tuple[int, int] = (1, 3),
        area_fraction: tuple[float, float] = (0.01, 0.08),
        shapes: Sequence[str] = SHAPES,
    ) -> None:
        if not 1 <= n_shapes[0] <= n_shapes[1]:
            raise ValueError(f"n_shapes must satisfy 1 <= min <= max, got {n_shapes}")
        if not 0.0 < area_fraction[0] <= area_fraction[1] < 1.0:
            raise ValueError(f"area_fraction must satisfy 0 < min <= max < 1, got {area_fraction}")
        unknown = [shape for shape in shapes if shape not in SHAPES]
        if unknown or not shapes:
            raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {tuple(shapes)}")
        self.n_shapes = (int(n_shapes[0]), int(n_shapes[1]))
        self.area_fraction = (float(area_fraction[0]), float(area_fraction[1]))
        self.shapes = tuple(shapes)
        self._rng = np.random.default_rng(seed)

    def _draw_shape(self, canvas: np.ndarray, centre: np.ndarray, area: float) -> None:
        """Draws one randomly rotated shape of roughly ``area`` pixels into ``canvas`` (in place)."""
        rng = self._rng
        kind = self.shapes[int(rng.integers(len(self.shapes)))]
        angle = rng.uniform(0.0, 360.0)
        aspect = rng.uniform(0.35, 1.0)
        if kind == "ellipse":
            major = np.sqrt(area / (np.pi * aspect))
            cv2.ellipse(
                canvas,
                tuple(_fixed(centre)),
                tuple(_fixed([major, major * aspect])),
                angle,
                0.0,
                360.0,
                1,
                -1,
                cv2.LINE_8,
                _SUBPIXEL_BITS,
            )
            return
        if kind == "rectangle":
            width = np.sqrt(area / aspect)
            corners = cv2.boxPoints(((float(centre[0]), float(centre[1])), (width, width * aspect), angle))
        else:  # polygon: star-convex with jittered radii, so outlines are irregular like real damage
            n_vertices = int(rng.integers(5, 9))
            mean_radius = np.sqrt(area / np.pi)
            angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, n_vertices))
            radii = mean_radius * rng.uniform(0.6, 1.3, n_vertices)
            corners = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [_fixed(corners)], 1, cv2.LINE_8, _SUBPIXEL_BITS)

    def _fragment_mask(self, height: int, width: int) -> np.ndarray:
        """Combines rotated shapes (union) around the canvas centre and crops to their bounding box."""
        rng = self._rng
        count = int(rng.integers(self.n_shapes[0], self.n_shapes[1] + 1))
        total_area = rng.uniform(*self.area_fraction) * height * width
        canvas = np.zeros((height, width), dtype=np.uint8)
        spread = np.sqrt(total_area) * 0.5  # shapes overlap or sit close: one compound fragment
        for _ in range(count):
            centre = np.array([width / 2, height / 2]) + rng.uniform(-spread, spread, 2)
            self._draw_shape(canvas, centre, total_area / count)
        if not canvas.any():  # a very small image can round every shape away
            canvas[height // 2, width // 2] = 1
        rows = np.flatnonzero(canvas.any(axis=1))
        cols = np.flatnonzero(canvas.any(axis=0))
        return canvas[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(bool)

    def _placements(self, height: int, width: int, box: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Picks top-left corners in source and target that are apart where the image allows."""
        rng = self._rng
        box_h, box_w = box
        source = (int(rng.integers(height - box_h + 1)), int(rng.integers(width - box_w + 1)))
        min_shift = max(box_h, box_w) / 2
        target = source
        for _ in range(_PLACEMENT_TRIES):
            target = (int(rng.integers(height - box_h + 1)), int(rng.integers(width - box_w + 1)))
            if abs(target[0] - source[0]) + abs(target[1] - source[1]) >= min_shift:
                break
        return source, target

    def __call__(self, target: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Creates one pseudo-anomalous image.

        Args:
            target: Normal uint8 (H, W, 3) image that receives the fragments (not modified).
            source: Another normal uint8 image of the same shape that the fragments are cut from.

        Returns:
            (uint8 image equal to ``target`` except inside the mask, where it holds ``source``
            pixels from a shifted location; bool (H, W) mask of the pasted pixels).
        """
        target_pixels, source_pixels = np.asarray(target), np.asarray(source)
        if target_pixels.shape != source_pixels.shape:
            raise ValueError(
                f"target and source must have the same shape, got {target_pixels.shape} and {source_pixels.shape}"
            )
        if target_pixels.dtype != np.uint8 or source_pixels.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {target_pixels.dtype} and {source_pixels.dtype}")
        if target_pixels.ndim not in (2, 3) or min(target_pixels.shape[:2]) < 2:
            raise ValueError(f"expected (H, W, 3) or (H, W) images, got shape {target_pixels.shape}")
        height, width = target_pixels.shape[:2]
        fragment = self._fragment_mask(height, width)
        (sy, sx), (ty, tx) = self._placements(height, width, fragment.shape)
        box_h, box_w = fragment.shape
        result = target_pixels.copy()
        result_window = result[ty : ty + box_h, tx : tx + box_w]
        result_window[fragment] = source_pixels[sy : sy + box_h, sx : sx + box_w][fragment]
        mask = np.zeros((height, width), dtype=bool)
        mask[ty : ty + box_h, tx : tx + box_w] = fragment
        return result, mask


class InspectionDefect:
    """Defects real inspection sees that pasted fragments do not imitate (our addition to LafitE Sec. 3.4).

    Kinds: ``blemish`` (a soft, low-contrast blob: the image brightened or darkened by 6-20 grey levels
    under a blurred ellipse), ``scratch`` (a thin 1-2 px polyline, 25-60 % of the image side long, lighter or
    darker by 25-70 levels) and ``texture`` (a region whose texture is smoothed away or roughened with
    noise). The mask is where the image changed by at least 2 grey levels (for ``texture``: the region).
    """

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
        rng = self._rng
        pixels = np.asarray(image).astype(np.float32)
        height, width = pixels.shape[:2]
        side = min(height, width)
        weight = np.zeros((height, width), np.float32)
        centre = (
            int(rng.integers(width // 6, width - width // 6 + 1)),
            int(rng.integers(height // 6, height - height // 6 + 1)),
        )
        if kind == "blemish":
            axes = (max(2, int(side * rng.uniform(0.05, 0.15))), max(2, int(side * rng.uniform(0.04, 0.12))))
            cv2.ellipse(weight, centre, axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
            weight = cv2.GaussianBlur(weight, (0, 0), max(axes) / 2)
            weight /= max(float(weight.max()), 1e-6)
            changed = pixels + (rng.choice([-1, 1]) * rng.uniform(6, 20)) * weight[..., None]
        elif kind == "scratch":
            length = side * rng.uniform(0.25, 0.6)
            angle = rng.uniform(0, np.pi)
            steps = np.linspace(-0.5, 0.5, 6)[:, None]
            bend = rng.normal(0, length * 0.04, (6, 1))
            direction = np.array([[np.cos(angle), np.sin(angle)]])
            normal = np.array([[-np.sin(angle), np.cos(angle)]])
            points = np.array(centre)[None] + steps * length * direction + bend * normal
            cv2.polylines(weight, [np.rint(points).astype(np.int32)], False, 1.0, int(rng.integers(1, 3)), cv2.LINE_AA)
            changed = pixels + (rng.choice([-1, 1]) * rng.uniform(25, 70)) * weight[..., None]
        elif kind == "texture":
            axes = (max(2, int(side * rng.uniform(0.06, 0.16))), max(2, int(side * rng.uniform(0.06, 0.16))))
            cv2.ellipse(weight, centre, axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
            if rng.random() < 0.5:
                altered = cv2.GaussianBlur(pixels, (0, 0), max(1.0, side / 64))
            else:
                altered = pixels + rng.normal(0, 12, pixels.shape).astype(np.float32)
            changed = pixels * (1 - weight[..., None]) + altered * weight[..., None]
        else:
            raise ValueError(f"kind must be one of {KINDS[2:]}, got {kind!r}")
        result = np.clip(np.rint(changed), 0, 255).astype(np.uint8)
        diff = np.abs(result.astype(np.int16) - np.asarray(image).astype(np.int16))
        mask = (diff.max(axis=-1) if diff.ndim == 3 else diff) >= 2
        if kind == "texture":  # the whole region has another texture, not only the pixels that moved
            mask = weight >= 0.5
        if not mask.any():  # a flat change that rounded away: mark where the weight is strongest
            mask = weight >= weight.max() * 0.5
        return result, mask


#: "paste": LafitE Sec. 3.4 fragments; "speck": the same, 0.1-1 % of the image (small defects); the rest:
#: :class:`InspectionDefect`.
KINDS = ("paste", "speck", "blemish", "scratch", "texture")
#: The kinds of the discriminating set (``edgead.methods.validation``): the paper's fragments plus small and
#: low-contrast ones, so that a set can be made hard enough that candidates differ on it.
DISCRIMINATING_KINDS = KINDS
#: Area fraction of a "speck" fragment.
SPECK_AREA = (0.001, 0.01)


def _blend(target: np.ndarray, changed: np.ndarray, strength: float) -> np.ndarray:
    """``target + strength * (changed - target)``, rounded: the defect at ``strength`` of its contrast."""
    if strength >= 1.0:
        return changed
    mixed = target.astype(np.float32) + strength * (changed.astype(np.float32) - target.astype(np.float32))
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def make_pseudo_anomaly_set(
    images: Sequence[np.ndarray], n: int, seed: int, kinds: Sequence[str] = ("paste",), strength: float = 1.0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Builds a deterministic pseudo-anomalous validation set from normal images.

    Each item pastes fragments of one randomly chosen image onto a different randomly chosen
    image (LafitE section 3.4).

    Args:
        images: At least two normal uint8 images, all of the same shape.
        n: Number of pseudo-anomalous images.
        seed: Random seed; the same images, n, seed and kinds give identical output.
        kinds: Which of ``KINDS`` to make, in turn (item ``i`` is ``kinds[i % len(kinds)]``); the default is
            the paper's pasted fragments alone.
        strength: Share of each defect's contrast kept, in (0, 1]: the image is ``target + strength *
            (defect - target)``, the mask unchanged (1: the defects as drawn; our addition, to calibrate how
            hard the set is). The same seed gives the same defects at every strength.

    Returns:
        (images, bool masks), each a list of length n.
    """
    if len(images) < 2:
        raise ValueError(f"need at least two normal images (target and source differ), got {len(images)}")
    shapes = {np.asarray(image).shape for image in images}
    if len(shapes) != 1:
        raise ValueError(f"all images must have the same shape, got {sorted(shapes)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    pairing_rng = np.random.default_rng([seed, 0])
    synthesiser = PseudoAnomaly(seed=int(np.random.default_rng([seed, 1]).integers(2**63)))
    inspection = InspectionDefect(seed=int(np.random.default_rng([seed, 2]).integers(2**63)))
    specks = PseudoAnomaly(seed=int(np.random.default_rng([seed, 3]).integers(2**63)), area_fraction=SPECK_AREA)
    anomalous: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for i in range(n):
        target_index = int(pairing_rng.integers(len(images)))
        source_index = int(pairing_rng.integers(len(images) - 1))
        source_index += source_index >= target_index  # skip the target itself
        kind = kinds[i % len(kinds)]
        if kind in ("paste", "speck"):
            image, mask = (synthesiser if kind == "paste" else specks)(images[target_index], images[source_index])
        else:
            image, mask = inspection(images[target_index], kind)
        anomalous.append(_blend(np.asarray(images[target_index]), image, strength))
        masks.append(mask)
    return anomalous, masks


def pseudo_validation_set(
    normal_rgb: Sequence[np.ndarray],
    pre: PreprocessConfig,
    seed: int = 0,
    kinds: Sequence[str] = ("paste",),
    strength: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A validation set with labels from normal images alone: the images themselves (label 0) plus as many
    pseudo-anomalies made from them (label 1, with masks), all preprocessed.

    Args:
        normal_rgb: At least two uint8 RGB images of one size: the defects are made at that size, then the
            images are resized to ``pre.size`` by ``preprocess`` and the masks by nearest neighbour
            (``edgead tune`` makes one set at its largest candidate size and shows it to every size).
        pre: The run's preprocessing.
        seed, kinds, strength: As :func:`make_pseudo_anomaly_set`.

    Returns:
        ``(images (N, C, H, W) float32, labels (N,) int, masks (N, H, W) bool)``, H x W = ``pre.size``.
    """
    if len(normal_rgb) < 2:
        raise ValueError(f"a pseudo-anomaly validation set needs at least two normal images, got {len(normal_rgb)}")
    size = pre.size
    pseudo_rgb, pseudo_masks = make_pseudo_anomaly_set(
        list(normal_rgb), n=len(normal_rgb), seed=seed, kinds=kinds, strength=strength
    )
    normal = np.stack([preprocess(img, pre) for img in normal_rgb])
    pseudo = np.stack([preprocess(img, pre) for img in pseudo_rgb])
    images = np.concatenate([normal, pseudo]).astype(np.float32)
    labels = np.r_[np.zeros(len(normal), dtype=int), np.ones(len(pseudo), dtype=int)]
    pseudo_masks = [resize_mask(m, size) for m in pseudo_masks]
    masks = np.concatenate([np.zeros((len(normal), *size), dtype=bool), np.stack(pseudo_masks)])
    return images, labels, masks
