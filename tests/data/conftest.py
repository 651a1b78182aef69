"""Shared fixtures for the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgead.data.synthetic import generate_dataset


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MVTec-layout dataset shared read-only by several tests."""
    root = tmp_path_factory.mktemp("synthetic") / "print"
    return generate_dataset(root, category="print", size=32, n_train=12, n_test_good=4, n_test_defect=10, seed=3)
