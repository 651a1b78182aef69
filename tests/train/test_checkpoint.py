"""A checkpoint is complete or ignored: a kill at every write boundary of a checkpoint leaves a run that
resumes bit-exactly from the last complete step; altered resume state and torn weights/config pairs are
refused with an error that names the file; a second training process into the same run is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import edgead.data.io as io_module
from edgead.config import TrainConfig
from edgead.data.files import exclusive_lock
from edgead.data.synthetic import generate_dataset
from edgead.methods.score_resilience.method import dsm_loss
from edgead.nn.unet import ScoreUNet, UNetConfig
from edgead.pipeline import TRAIN_LOCK_NAME, RunBusyError, train_run
from edgead.spec import RunSpec
from edgead.train.checkpoint import (
    MANIFEST_NAME,
    TRAINING_STATE_DIR,
    TornRunError,
    checkpoint_folder,
    load_weights,
    save_weights,
)
from edgead.train.distributed import DistInfo
from edgead.train.loop import train_network

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# constant lr: a leg resumed from step 3 or step 6 sees the same schedule as the straight run
CFG = TrainConfig(steps=9, batch_size=4, lr=1e-3, lr_schedule="constant", checkpoint_every=3, ema_decay=0.9)
# Renames of one checkpoint: model, ema, optimizer, rng, state.json, the manifest (the commit point), weights.
WRITES_PER_CHECKPOINT = 7


def _model(seed: int = 0) -> ScoreUNet:
    torch.manual_seed(seed)
    return ScoreUNet(UNetConfig.preset("tiny"))


def _images() -> torch.Tensor:
    return torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _loss(net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return dsm_loss(net, batch, sigma=25.0, k_min=1e-5, k_max=1.0)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the boundary runs, no handler cleans up."""


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    model = _model()
    train_network(model, _loss, _images(), CFG, SINGLE, run_dir=tmp_path_factory.mktemp("straight"), progress=False)
    return model.state_dict()


@pytest.mark.parametrize("boundary", range(WRITES_PER_CHECKPOINT + 1))
def test_a_kill_at_every_write_boundary_resumes_bit_exactly(
    tmp_path: Path, boundary: int, straight: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the step-3 checkpoint plus ``boundary`` renames of the step-6 one: resume continues from
    step 3 (manifest not yet replaced) or step 6 (replaced) and ends exactly where the straight run ended."""
    real_replace, renames = os.replace, []

    def replace_then_maybe_die(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        renames.append(Path(dst).name)
        if len(renames) == WRITES_PER_CHECKPOINT + boundary:
            raise _Killed

    monkeypatch.setattr(io_module.os, "replace", replace_then_maybe_die)
    with pytest.raises(_Killed):
        train_network(_model(), _loss, _images(), CFG, SINGLE, run_dir=tmp_path, progress=False)
    monkeypatch.undo()
    assert renames[WRITES_PER_CHECKPOINT - 2 : WRITES_PER_CHECKPOINT] == [MANIFEST_NAME, "weights.safetensors"]
    step, _ = checkpoint_folder(tmp_path)
    assert step == (6 if boundary >= WRITES_PER_CHECKPOINT - 1 else 3)

    resumed = _model(seed=123)  # weights come from the checkpoint, not from this initialisation
    result = train_network(resumed, _loss, _images(), CFG, SINGLE, run_dir=tmp_path, resume=True, progress=False)
    assert result.step == 9
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    state_dir = tmp_path / TRAINING_STATE_DIR
    assert sorted(p.name for p in state_dir.iterdir() if p.is_dir()) == [checkpoint_folder(tmp_path)[1].name]


def test_altered_resume_state_is_refused_naming_the_file(tmp_path: Path) -> None:
    train_network(_model(), _loss, _images(), CFG, SINGLE, run_dir=tmp_path, progress=False)
    _, folder = checkpoint_folder(tmp_path)
    target = folder / "optimizer.safetensors"
    target.write_bytes(target.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(TornRunError, match="optimizer.safetensors: missing or altered"):
        train_network(_model(), _loss, _images(), CFG, SINGLE, run_dir=tmp_path, resume=True, progress=False)
    (tmp_path / TRAINING_STATE_DIR / MANIFEST_NAME).write_text('{"step": 9, "folder": "../../elsewhere"}')
    with pytest.raises(TornRunError, match="not a checkpoint manifest|not in"):
        checkpoint_folder(tmp_path)


def test_weights_from_another_checkpoint_than_the_config_are_refused(tmp_path: Path) -> None:
    state = {"w": torch.ones(2)}
    first = save_weights(state, tmp_path)
    assert torch.equal(load_weights(tmp_path, {"weights_id": first})["w"], state["w"])
    save_weights({"w": torch.zeros(2)}, tmp_path)  # a kill here: config.json still names the first weights
    with pytest.raises(TornRunError, match="different checkpoints.*--resume"):
        load_weights(tmp_path, {"weights_id": first})
    with pytest.raises(TornRunError):
        load_weights(tmp_path, {})  # a config never updated after the weights were written


def test_a_second_training_into_the_same_run_is_refused(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", size=32, n_train=12, n_test_good=2, n_test_defect=2, seed=3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = TrainConfig(steps=2, batch_size=4, checkpoint_every=2)
    spec = RunSpec(data=[data], preset="tiny", image_size=32, train=cfg, out=run_dir, device="cpu")
    with exclusive_lock(run_dir / TRAIN_LOCK_NAME), pytest.raises(RunBusyError, match="another training process"):
        train_run(spec, progress=False)
    assert not (run_dir / "config.json").exists()  # refused before writing anything
    run, _ = train_run(spec, progress=False)
    assert (run / "weights.safetensors").is_file()
    with exclusive_lock(run_dir / TRAIN_LOCK_NAME), pytest.raises(RunBusyError):
        train_run(RunSpec(device="cpu"), resume=run_dir, progress=False)
