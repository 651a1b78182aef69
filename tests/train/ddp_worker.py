"""Launched by tests/train/test_ddp.py under torchrun: trains a few steps, saves this rank's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from edgead.config import TrainConfig
from edgead.methods.score_resilience.method import dsm_loss
from edgead.nn.unet import ScoreUNet, UNetConfig
from edgead.train.checkpoint import save_tensors_atomic
from edgead.train.distributed import init_distributed, shutdown
from edgead.train.loop import train_network

if __name__ == "__main__":
    out = Path(sys.argv[1])
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = ScoreUNet(UNetConfig.preset("tiny"))
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=5, batch_size=4, lr=1e-3)
    train_network(model, lambda n, b: dsm_loss(n, b, 25.0, 1e-5, 1.0), images, cfg, info, progress=False)
    save_tensors_atomic(model.state_dict(), out / f"rank{info.rank}.safetensors")
    shutdown(info)
