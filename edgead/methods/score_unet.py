"""Shared plumbing of methods built on a trained score / noise U-Net (score-resilience, score-tscale, and
the diffusion methods to come): preset -> ``config.model``, build, train with the shared loop, load.

A subclass supplies only its paper's math: the training ``loss`` (and, if its paper adapts the network,
``unet_config``), ``build_graph``, and optionally ``after_training`` for post-training selection steps.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from edgead.config import RunConfig
from edgead.methods.base import FitContext, Method
from edgead.nn.unet import ScoreUNet, UNetConfig
from edgead.train.checkpoint import load_weights
from edgead.train.loop import train_network


class ScoreUNetMethod(Method):
    """A method whose fitted state is one :class:`ScoreUNet` trained on normal images."""

    uses_preset = True
    smoke: ClassVar[dict[str, Any]] = {"preset": "tiny", "steps": 20, "batch_size": 8, "lr": 2e-3}
    unet: ScoreUNet

    @classmethod
    def unet_config(cls, preset: str, channels: int, params: Any) -> UNetConfig:
        """The U-Net of a new run: the preset as it is (override to follow the paper's network)."""
        return UNetConfig.preset(preset, in_channels=channels)

    @classmethod
    def model_config(cls, preset: str, channels: int, params: Any) -> dict[str, Any]:
        return {"preset": preset, "unet": cls.unet_config(preset, channels, params).to_dict()}

    def build_unet(self) -> ScoreUNet:
        return ScoreUNet(UNetConfig.from_dict(self.config.model["unet"]))

    @abc.abstractmethod
    def loss(self, net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """The training objective of one batch (the paper's equation); draws noise from torch's RNG."""

    def after_training(self, ctx: FitContext) -> dict[str, Any]:
        """Steps after the network is trained (e.g. choosing feature maps); returns summary fields."""
        return {}

    def fit(self, ctx: FitContext) -> dict[str, Any]:
        """Train the U-Net with the shared loop (checkpoints record the step in ``config.json``), load the
        EMA weights into it, then run :meth:`after_training`."""
        torch.manual_seed(ctx.train.seed)
        self.unet = self.build_unet()

        def on_checkpoint(step: int, final: bool, weights_id: str) -> None:
            self.config.state.update({"step": step, "final": final, "weights_id": weights_id})
            self.config.save(self.run_dir)

        result = train_network(
            self.unet,
            self.loss,
            ctx.images,
            ctx.train,
            ctx.dist,
            run_dir=self.run_dir,
            on_checkpoint=on_checkpoint,
            resume=ctx.resume,
            progress=ctx.progress,
            description=f"{self.name} training",
        )
        result.ema.copy_to(self.unet)
        self.unet.cpu().eval()
        summary = {
            "steps": result.step,
            "reached_target_steps": result.finished,
            "train_seconds": round(result.seconds, 1),
            "final_loss": result.losses[-1] if result.losses else None,
        }
        summary.update(self.after_training(ctx))
        return summary

    @classmethod
    def load(cls, run_dir: Path, config: RunConfig) -> ScoreUNetMethod:
        method = cls(config, run_dir)
        method.unet = method.build_unet()
        method.unet.load_state_dict(load_weights(run_dir, config.state))
        method.unet.eval()
        return method
