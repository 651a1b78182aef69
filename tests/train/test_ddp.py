"""DistributedDataParallel: two CPU processes under torchrun with gloo end with identical weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from edgead.nn.unet import ScoreUNet, UNetConfig
from edgead.train.checkpoint import load_tensors


def test_two_ranks_end_with_identical_weights(tmp_path: Path) -> None:
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_tensors(tmp_path / "rank0.safetensors"), load_tensors(tmp_path / "rank1.safetensors")
    torch.manual_seed(0)
    initial = ScoreUNet(UNetConfig.preset("tiny")).state_dict()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0), "training did not change the weights"
