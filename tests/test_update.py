"""edgead update: gaussian refits, lafite extends its memory bank, the old run untouched, lineage recorded,
methods that train a network refuse."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.config import RunConfig, TrainConfig
from edgead.data.synthetic import generate_dataset
from edgead.export.exporter import ExportOptions, export_run
from edgead.methods import get_method, load_method
from edgead.pipeline import train_run
from edgead.spec import RunSpec
from edgead.update import UpdateError, update_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integration_helpers import make_gaussian_run, make_tiny_run  # noqa: E402


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def new_normals(data: Path, folder: Path, count: int) -> Path:
    folder.mkdir()
    for k, path in enumerate(sorted((data / "train" / "good").glob("*.png"))[:count]):
        image = cv2.imread(str(path))
        cv2.imwrite(str(folder / f"new_{k}.png"), cv2.convertScaleAbs(image, alpha=1.1, beta=20))
    return folder


@pytest.mark.slow  # fits a gaussian run twice and exports the update
def test_gaussian_update_refits_in_a_new_run(tmp_path: Path) -> None:
    data, run_dir = make_gaussian_run(tmp_path)
    before = digest(run_dir)
    added = new_normals(data, tmp_path / "new", 5)
    new_run, summary = update_run(run_dir, [added])
    assert new_run != run_dir and digest(run_dir) == before, "the old run changed"
    config = RunConfig.load(new_run)
    old = RunConfig.load(run_dir)
    assert config.lineage["updated_from"] == str(run_dir.resolve()) and config.lineage["added_images"] == 5
    assert config.data["n_train"] == old.data["n_train"] + 5 and config.method_params == old.method_params
    assert (new_run / "holdout.npz").read_bytes() == (run_dir / "holdout.npz").read_bytes()
    assert summary["seconds"] > 0
    meta = export_run(new_run, tmp_path / "export", ExportOptions(), log=lambda _: None)
    assert meta.threshold["value"] > 0
    runs = sorted(p.name for p in run_dir.parent.iterdir())
    data.rename(tmp_path / "moved")  # the original images are gone: refused, and no half-written run is left
    with pytest.raises(UpdateError, match="training data .* is gone"):
        update_run(run_dir, [added])
    assert sorted(p.name for p in run_dir.parent.iterdir()) == runs


@pytest.mark.slow  # trains a tiny lafite run
def test_lafite_update_extends_the_bank_and_keeps_the_unet(tmp_path: Path) -> None:
    smoke = get_method("lafite").smoke
    data = generate_dataset(tmp_path / "data", size=32, n_train=24, n_test_good=4, n_test_defect=4, seed=3)
    cfg = TrainConfig(steps=smoke["steps"], batch_size=smoke["batch_size"], lr=smoke["lr"], checkpoint_every=1000)
    run_dir, _ = train_run(
        RunSpec(method="lafite", data=[data], preset="tiny", image_size=32, train=cfg, params=smoke["params"],
                runs_root=tmp_path / "runs", device="cpu"),
        progress=False,
    )  # fmt: skip
    old_bank = load_method(run_dir).coreset
    added = new_normals(data, tmp_path / "new", 4)
    new_run, summary = update_run(run_dir, [added])
    assert (new_run / "weights.safetensors").read_bytes() == (run_dir / "weights.safetensors").read_bytes()
    bank = load_method(new_run).coreset
    assert summary["added_images"] == 4 and len(bank) == summary["coreset"] >= len(old_bank)
    assert RunConfig.load(new_run).lineage["how"] == "extend"


@pytest.mark.slow  # trains a tiny score-resilience run
def test_network_methods_refuse_with_the_command_to_retrain(tmp_path: Path) -> None:
    data, run_dir = make_tiny_run(tmp_path)
    with pytest.raises(UpdateError, match=r"learns a network .* edgead train --method score-resilience"):
        update_run(run_dir, [data / "train" / "good"])


def test_bad_folders_are_named(tmp_path: Path) -> None:
    from edgead.update import normal_images

    with pytest.raises(UpdateError, match="not a folder"):
        normal_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UpdateError, match="no images"):
        normal_images([tmp_path / "empty"])
    cv2.imwrite(str(tmp_path / "empty" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    assert [p.name for p in normal_images([tmp_path / "empty"])] == ["a.png"]
    result = CliRunner().invoke(app, ["update", "--run", str(tmp_path / "norun"), "--normal", str(tmp_path)])
    assert result.exit_code != 0 and "config.json" in result.output
