"""Training loop: schedule, EMA, batching, checkpoints and bit-exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgead.config import TrainConfig
from edgead.methods.score_resilience.method import dsm_loss
from edgead.nn.unet import ScoreUNet, UNetConfig
from edgead.train.checkpoint import load_tensors, load_weights, save_tensors_atomic
from edgead.train.distributed import DistInfo
from edgead.train.ema import EMA
from edgead.train.loop import BatchSampler, lr_factor, train_network

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _model(seed: int = 0) -> ScoreUNet:
    torch.manual_seed(seed)
    return ScoreUNet(UNetConfig.preset("tiny"))


def _images(n: int = 12, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _loss(net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return dsm_loss(net, batch, sigma=25.0, k_min=1e-5, k_max=1.0)


def test_lr_factor_multistep_and_warmup() -> None:
    cfg = TrainConfig(steps=300, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(50, cfg) == 1.0
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(250, cfg) == pytest.approx(0.01)
    cosine = TrainConfig(steps=100, lr_schedule="cosine")
    assert lr_factor(0, cosine) == pytest.approx(1.0)
    assert lr_factor(100, cosine) == pytest.approx(0.0, abs=1e-12)


def test_batch_sampler_covers_each_epoch_and_splits_ranks() -> None:
    seen = [BatchSampler(10, 5, seed=3).next_indices() for _ in range(1)]
    sampler = BatchSampler(10, 5, seed=3)
    epoch = sorted(list(sampler.next_indices()) + list(sampler.next_indices()))
    assert epoch == list(range(10))
    rank0, rank1 = BatchSampler(10, 5, 3, rank=0, world_size=2), BatchSampler(10, 5, 3, rank=1, world_size=2)
    assert sorted(list(rank0.next_indices()) + list(rank1.next_indices())) == list(range(10))
    assert list(seen[0]) == list(rank0._perm(0)[:5])


def test_ema_warmup_tracks_short_runs() -> None:
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9999, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(100):
        ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.ones(2, 2), atol=0.05)
    plain = EMA(torch.nn.Linear(2, 2), decay=0.9999, warmup=False)
    assert plain.current_decay() == 0.9999


def test_training_reduces_the_loss() -> None:
    model = _model()
    cfg = TrainConfig(steps=60, batch_size=8, lr=2e-3, lr_schedule="constant", checkpoint_every=1000, ema_decay=0.99)
    result = train_network(model, _loss, _images(), cfg, SINGLE, progress=False)
    assert result.finished and result.step == 60
    assert result.losses[-1] < 0.8 * result.losses[0]


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    # constant lr: the shortened first leg must see the same schedule as the straight run
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, lr_schedule="constant", checkpoint_every=3, ema_decay=0.9)
    straight = _model()
    train_network(straight, _loss, _images(), cfg, SINGLE, run_dir=tmp_path / "a", progress=False)

    interrupted = _model()
    short = TrainConfig(**{**cfg.__dict__, "steps": 3})
    train_network(interrupted, _loss, _images(), short, SINGLE, run_dir=tmp_path / "b", progress=False)
    resumed = _model(seed=123)  # weights come from the checkpoint, not from this initialisation
    result = train_network(resumed, _loss, _images(), cfg, SINGLE, run_dir=tmp_path / "b", resume=True, progress=False)
    assert result.step == 6
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    ema_a, ema_b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_non_finite_loss_stops_with_a_clear_error() -> None:
    def bad_loss(net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return net(batch, torch.ones(len(batch))).sum() * float("nan")

    with pytest.raises(FloatingPointError, match="lower --lr"):
        train_network(_model(), bad_loss, _images(), TrainConfig(steps=3, batch_size=4), SINGLE, progress=False)


def test_corrupt_safetensors_names_the_file(tmp_path: Path) -> None:
    path = save_tensors_atomic({"w": torch.ones(3)}, tmp_path / "weights.safetensors")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="weights.safetensors"):
        load_tensors(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_tensors(tmp_path / "missing.safetensors")


def test_bad_train_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear").validate()


def test_ctrl_c_stops_at_a_step_boundary_with_a_resumable_checkpoint(tmp_path: Path) -> None:
    """The first SIGINT stops training after the current step and checkpoints it; resume finishes bit-exactly
    like an uninterrupted run."""
    import os
    import signal

    from edgead.train.loop import TrainingInterrupted

    cfg = TrainConfig(steps=12, batch_size=4, lr=1e-2, checkpoint_every=100, seed=3)
    calls = {"n": 0}

    def interrupting_loss(net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 5
        return _loss(net, batch)

    with pytest.raises(TrainingInterrupted) as caught:
        train_network(_model(), interrupting_loss, _images(), cfg, SINGLE, run_dir=tmp_path / "a", progress=False)
    assert caught.value.step == 5 and caught.value.run_dir == tmp_path / "a"
    resumed = _model(seed=123)
    result = train_network(resumed, _loss, _images(), cfg, SINGLE, run_dir=tmp_path / "a", resume=True, progress=False)
    assert result.step == 12 and result.finished
    straight = _model()
    train_network(straight, _loss, _images(), cfg, SINGLE, run_dir=tmp_path / "b", progress=False)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_the_cost_of_a_run_is_said_before_it_is_paid() -> None:
    from edgead.train.loop import _cost_line

    cpu = torch.device("cpu")
    line = _cost_line("training", TrainConfig(steps=20000), 5, 0.4, cpu)
    assert "about 2:13:18 for the remaining 19995 steps on cpu (0.40 s/step)" in line
    assert "--preset tiny --image-size 128 --batch-size 16 --lr 2e-3 --lr-schedule cosine --steps 1500" in line
    capped = _cost_line("training", TrainConfig(steps=20000, max_time_s=600), 5, 0.4, cpu)
    assert "about 0:09:58 for about 1500 of 20000 steps (the --max-time limit)" in capped and "--preset" not in capped
