"""Tests for edgead.data.synthetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgead.data.io import read_image, read_mask
from edgead.data.mvtec import list_test, list_train
from edgead.data.synthetic import (
    CATEGORIES,
    DEFECT_KINDS,
    MARKER_NAME,
    generate_dataset,
    render_defective,
    render_normal,
)


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    kwargs = {"size": 32, "n_train": 6, "n_test_good": 3, "n_test_defect": 5, "seed": 11}
    first = _file_bytes(generate_dataset(tmp_path / "a", **kwargs))
    second = _file_bytes(generate_dataset(tmp_path / "b", **kwargs))
    assert first == second and len(first) == 6 + 3 + 5 + 5 + 1
    other = _file_bytes(generate_dataset(tmp_path / "c", **{**kwargs, "seed": 12}))
    assert other["train/good/000.png"] != first["train/good/000.png"]


def test_normal_images_vary_between_samples() -> None:
    for category in CATEGORIES:
        first = render_normal(category, 64, np.random.default_rng(0)).astype(int)
        second = render_normal(category, 64, np.random.default_rng(1)).astype(int)
        assert first.shape == (64, 64, 3)
        assert np.abs(first - second).mean() > 3.0, category  # a distribution, not one memorisable image


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_kind_is_visible_with_mask_in_range(category: str) -> None:
    for kind in DEFECT_KINDS:
        for seed in range(5):
            image, mask = render_defective(category, 64, kind, np.random.default_rng(seed))
            clean = render_normal(category, 64, np.random.default_rng(seed))  # same scene, no defect
            assert mask.dtype == bool and 0.005 <= mask.mean() <= 0.08, (category, kind, mask.mean())
            change = np.abs(image.astype(int) - clean.astype(int)).max(axis=2)
            assert np.median(change[mask]) > 25, (category, kind)  # defect differs meaningfully
            assert np.median(change[~mask]) < 10, (category, kind)  # only noise elsewhere


def test_layout_masks_and_kinds(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "d", category="part", size=48, n_train=4, n_test_good=2, n_test_defect=10)
    assert len(list_train(root)) == 4
    test = list_test(root)
    assert {sample.defect_type for sample in test} == {"good", *DEFECT_KINDS}
    for sample in test:
        assert read_image(sample.path).shape == (48, 48, 3)
        if sample.label == 1:
            assert sample.mask_path is not None and sample.mask_path.name.endswith("_mask.png")
            assert 0.005 <= read_mask(sample.mask_path).mean() <= 0.1
    assert json.loads((root / MARKER_NAME).read_text())["complete"] is True


def test_300_images(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "fast", n_train=200, n_test_good=40, n_test_defect=60)
    assert len(list_train(root)) == 200
    test = list_test(root)
    assert sum(s.label == 0 for s in test) == 40 and sum(s.label == 1 for s in test) == 60


def test_refuses_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="non-empty"):
        generate_dataset(foreign, size=32, n_train=2, n_test_good=1, n_test_defect=1)
    assert [path.name for path in foreign.iterdir()] == ["holiday.jpg"]


def test_reuses_or_regenerates_own_directory(tmp_path: Path) -> None:
    kwargs = {"size": 32, "n_train": 3, "n_test_good": 1, "n_test_defect": 2}
    root = generate_dataset(tmp_path / "own", **kwargs)
    stamp = (root / "train" / "good" / "000.png").stat().st_mtime_ns
    generate_dataset(root, **kwargs)  # same parameters: nothing rewritten
    assert (root / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    generate_dataset(root, **{**kwargs, "n_train": 2})  # other parameters: regenerated cleanly
    assert len(list_train(root)) == 2
    (root / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        generate_dataset(root, **{**kwargs, "seed": 5})


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="category"):
        generate_dataset(tmp_path / "x", category="marble")
    with pytest.raises(ValueError, match="defect_kinds"):
        generate_dataset(tmp_path / "x", defect_kinds=("dent",))
