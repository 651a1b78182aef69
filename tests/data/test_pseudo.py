"""Tests for edgead.data.pseudo (LafitE section 3.4 pseudo-anomalies)."""

from __future__ import annotations

import numpy as np
import pytest

from edgead.data.pseudo import PseudoAnomaly, make_pseudo_anomaly_set


def _images(count: int = 4, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def _shifted_source_match(result: np.ndarray, mask: np.ndarray, source: np.ndarray) -> tuple[int, int] | None:
    """Finds the shift (dy, dx) under which the masked pixels equal the source's pixels."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    for dy in range(-ys.min(), height - ys.max()):
        for dx in range(-xs.min(), width - xs.max()):
            if np.array_equal(result[ys, xs], source[ys + dy, xs + dx]):
                return dy, dx
    return None


def test_fragments_come_from_shifted_source_and_rest_is_untouched() -> None:
    target, source = _images(2)
    synthesiser = PseudoAnomaly(seed=5)
    for _ in range(10):
        result, mask = synthesiser(target, source)
        assert mask.dtype == bool and mask.shape == target.shape[:2] and mask.any()
        assert 0.001 < mask.mean() <= 0.08
        np.testing.assert_array_equal(result[~mask], target[~mask])
        shift = _shifted_source_match(result, mask, source)
        assert shift is not None and shift != (0, 0)  # pasted out of context
    assert target.flags.writeable and not np.shares_memory(result, target)


def test_shapes_are_rotated_and_combined() -> None:
    target, source = _images(2)
    ellipse_areas = [PseudoAnomaly(seed=seed, n_shapes=(3, 3))(target, source)[1].sum() for seed in range(5)]
    assert len(set(ellipse_areas)) > 1
    for shape in ("ellipse", "rectangle", "polygon"):
        _, mask = PseudoAnomaly(seed=1, shapes=(shape,))(target, source)
        assert mask.any()


def test_determinism() -> None:
    images = _images()
    first = make_pseudo_anomaly_set(images, 6, seed=3)
    second = make_pseudo_anomaly_set(images, 6, seed=3)
    assert len(first[0]) == 6 and len(first[1]) == 6
    for a, b in zip(first[0] + first[1], second[0] + second[1], strict=True):
        np.testing.assert_array_equal(a, b)
    other = make_pseudo_anomaly_set(images, 6, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(first[1], other[1], strict=True))


def test_target_and_source_are_distinct_images() -> None:
    # With identical-per-image constant colours, pasting from the same image would change nothing.
    images = [np.full((32, 32, 3), value, np.uint8) for value in (10, 120, 240)]
    results, masks = make_pseudo_anomaly_set(images, 20, seed=0)
    for result, mask in zip(results, masks, strict=True):
        assert len(np.unique(result[mask])) == 1 and len(np.unique(result[~mask])) == 1
        assert result[mask][0, 0] != result[~mask][0, 0]


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same shape"):
        PseudoAnomaly()(np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="two"):
        make_pseudo_anomaly_set(_images(1), 2, seed=0)
    with pytest.raises(ValueError, match="n_shapes"):
        PseudoAnomaly(n_shapes=(0, 2))


def test_inspection_kinds_are_deterministic_local_and_labelled() -> None:
    from edgead.data.pseudo import KINDS, make_pseudo_anomaly_set

    rng = np.random.default_rng(0)
    images = [np.clip(rng.normal(120, 10, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(4)]
    first = make_pseudo_anomaly_set(images, 8, seed=1, kinds=KINDS)
    second = make_pseudo_anomaly_set(images, 8, seed=1, kinds=KINDS)
    for (a, ma), (b, mb) in zip(zip(*first, strict=True), zip(*second, strict=True), strict=True):
        assert np.array_equal(a, b) and np.array_equal(ma, mb)
    for mask in first[1]:
        assert 0 < mask.sum() < 0.5 * mask.size
    # The paper's default is unchanged by the new kinds: pasted fragments only.
    default = make_pseudo_anomaly_set(images, 4, seed=1)
    again = make_pseudo_anomaly_set(images, 4, seed=1, kinds=("paste",))
    assert all(np.array_equal(a, b) for a, b in zip(default[0], again[0], strict=True))
    with pytest.raises(ValueError, match="kinds must be"):
        make_pseudo_anomaly_set(images, 2, seed=0, kinds=("crack",))
