"""Tests for edgead.data.mvtec."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.data.io import ImageReadError, read_mask
from edgead.data.mvtec import (
    DatasetLayoutError,
    Sample,
    list_test,
    list_train,
    load_images,
    load_masks,
    split_validation,
    validate_dataset,
)
from edgead.data.preprocess import PreprocessConfig


@pytest.fixture()
def dataset_copy(small_dataset: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the shared synthetic dataset."""
    return Path(shutil.copytree(small_dataset, tmp_path / "copy"))


def test_lists_generated_dataset(small_dataset: Path) -> None:
    train = list_train(small_dataset)
    assert len(train) == 12 and all(sample.label == 0 and sample.mask_path is None for sample in train)
    assert [sample.path.name for sample in train] == sorted(sample.path.name for sample in train)
    test = list_test(small_dataset)
    assert [sample.defect_type for sample in test[:4]] == ["good"] * 4
    defects = test[4:]
    assert len(defects) == 10 and all(sample.label == 1 for sample in defects)
    assert [sample.defect_type for sample in defects] == sorted(sample.defect_type for sample in defects)
    for sample in defects:
        assert sample.mask_path == small_dataset / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png"
    assert list_test(small_dataset) == test  # deterministic order


def test_load_images_and_masks(small_dataset: Path) -> None:
    test = list_test(small_dataset)
    images = load_images(test, PreprocessConfig(image_size=16))
    assert images.shape == (len(test), 3, 16, 16) and images.dtype == np.float32
    assert np.array_equal(images, load_images([sample.path for sample in test], PreprocessConfig(image_size=16)))
    masks = load_masks(test, 32)
    assert masks.dtype == np.uint8 and set(np.unique(masks).tolist()) <= {0, 1}
    assert not masks[:4].any() and all(masks[index].any() for index in range(4, len(test)))
    np.testing.assert_array_equal(masks[5].astype(bool), read_mask(test[5].mask_path))
    assert load_masks(test, 8).shape == (len(test), 8, 8)


def test_mask_named_like_image_is_accepted(dataset_copy: Path) -> None:
    sample = list_test(dataset_copy)[-1]
    renamed = sample.mask_path.with_name(f"{sample.path.stem}.png")
    sample.mask_path.rename(renamed)
    assert list_test(dataset_copy)[-1].mask_path == renamed


def test_missing_mask_names_image_and_tried_paths(dataset_copy: Path) -> None:
    sample = list_test(dataset_copy)[-1]
    sample.mask_path.unlink()
    with pytest.raises(DatasetLayoutError, match=f"{sample.path.stem}_mask.png") as info:
        list_test(dataset_copy)
    assert str(sample.path) in str(info.value)


def test_empty_train_folder(dataset_copy: Path) -> None:
    for path in (dataset_copy / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(DatasetLayoutError, match="empty train folder"):
        list_train(dataset_copy)
    shutil.rmtree(dataset_copy / "train")
    with pytest.raises(DatasetLayoutError, match="train"):
        validate_dataset(dataset_copy)


def test_test_without_good(dataset_copy: Path) -> None:
    shutil.rmtree(dataset_copy / "test" / "good")
    with pytest.raises(DatasetLayoutError, match="good"):
        list_test(dataset_copy)
    with pytest.raises(DatasetLayoutError, match="good"):
        validate_dataset(dataset_copy)


def test_validate_accepts_generated_dataset(small_dataset: Path) -> None:
    validate_dataset(small_dataset)


def test_mask_size_mismatch_names_both_files(dataset_copy: Path) -> None:
    sample = list_test(dataset_copy)[-1]
    assert cv2.imwrite(str(sample.mask_path), np.full((20, 24), 255, np.uint8))
    with pytest.raises(DatasetLayoutError, match="24x20") as info:
        validate_dataset(dataset_copy)
    assert str(sample.mask_path) in str(info.value) and str(sample.path) in str(info.value)
    assert "32x32" in str(info.value)
    validate_dataset(dataset_copy, check_masks=False)
    with pytest.raises(DatasetLayoutError, match="24x20"):  # what `edgead eval` loads is checked as well
        load_masks([sample], 16)


def test_validate_finds_unreadable_image(dataset_copy: Path) -> None:
    broken = sorted((dataset_copy / "train" / "good").iterdir())[5]
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(ImageReadError, match=broken.name):
        validate_dataset(dataset_copy)


def test_split_validation_deterministic_and_disjoint(small_dataset: Path) -> None:
    train = list_train(small_dataset)
    kept, held_out = split_validation(train, 0.25, seed=1)
    assert len(held_out) == 3 and len(kept) == 9
    assert set(kept).isdisjoint(held_out) and set(kept) | set(held_out) == set(train)
    assert split_validation(train, 0.25, seed=1) == (kept, held_out)
    assert split_validation(train, 0.25, seed=2)[1] != held_out
    assert split_validation(train, 0.0, seed=1) == (train, [])
    with pytest.raises(ValueError):
        split_validation(train, 1.0, seed=1)
    with pytest.raises(ValueError, match="normal"):
        split_validation([Sample(Path("x.png"), 1, "hole", Path("m.png"))], 0.5, seed=0)


REAL_DATA_ROOT = os.environ.get("EDGEAD_DATA_ROOT")


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA_ROOT, reason="EDGEAD_DATA_ROOT is not set")
@pytest.mark.parametrize("name", ["magnetic_tile", "bsdata"])
def test_real_dataset_layout(name: str) -> None:
    root = Path(str(REAL_DATA_ROOT)) / name
    assert list_train(root)
    test = list_test(root)
    defects = [sample for sample in test if sample.label == 1]
    assert defects and all(sample.mask_path is not None and sample.mask_path.is_file() for sample in defects)
    assert any(sample.label == 0 for sample in test)
    first = defects[0]
    assert first.mask_path is not None and read_mask(first.mask_path).any()
    validate_dataset(root)  # every file decodes and every mask matches its image size
