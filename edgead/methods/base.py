"""The contract every method implements (see ARCHITECTURE.md: a method's inference is one tensor graph)."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edgead.config import RunConfig, TrainConfig
from edgead.data.preprocess import PreprocessConfig
from edgead.train.distributed import DistInfo
from edgead.train.loop import LossFn, train_network


class Method(abc.ABC):
    """A detection method: fit on normal images, then build the inference ``nn.Module``.

    The inference module's ``forward(image)`` takes a preprocessed batch ``(B, C, S, S)`` and returns
    ``(anomaly_map (B, H, W), score (B,))`` using plain tensor ops with fixed shapes, so the same module
    runs in PyTorch, exports to ONNX and compiles with TensorRT.
    """

    name: ClassVar[str]
    #: Whether ``config.model`` holds a score U-Net preset (False for methods built on a pretrained backbone).
    uses_score_unet: ClassVar[bool] = True

    def __init__(self, config: RunConfig, run_dir: Path | None = None) -> None:
        self.config = config
        self.run_dir = run_dir

    @classmethod
    def model_config(cls, preset: str, channels: int, params: dict[str, Any]) -> dict[str, Any]:
        """``config.model`` for a new run: the U-Net preset (methods override to adapt it to their paper)."""
        if not cls.uses_score_unet:
            return {}
        from edgead.nn.unet import UNetConfig

        return {"preset": preset, "unet": UNetConfig.preset(preset, in_channels=channels).to_dict()}

    def train_unet(
        self,
        net: nn.Module,
        loss: LossFn,
        train_images: torch.Tensor,
        train_cfg: TrainConfig,
        dist_info: DistInfo,
        resume: bool,
        progress: bool,
        description: str,
    ) -> dict[str, Any]:
        """Train ``net`` with the shared loop (checkpoints record the step in ``config.json``), then load
        the EMA weights into it; returns the run summary's training fields."""

        def on_checkpoint(step: int, final: bool) -> None:
            self.config.state.update({"step": step, "final": final})
            self.config.save(self.run_dir)

        result = train_network(net, loss, train_images, train_cfg, dist_info, run_dir=self.run_dir,
                               on_checkpoint=on_checkpoint, resume=resume, progress=progress,
                               description=description)
        result.ema.copy_to(net)
        net.cpu().eval()
        return {
            "steps": result.step,
            "reached_target_steps": result.finished,
            "train_seconds": round(result.seconds, 1),
            "final_loss": result.losses[-1] if result.losses else None,
        }

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.config.preprocess)

    @classmethod
    @abc.abstractmethod
    def default_params(cls) -> dict[str, Any]:
        """Hyperparameters with the paper's defaults, stored as ``method_params`` in ``config.json``."""

    @abc.abstractmethod
    def fit(
        self,
        train_images: torch.Tensor,
        train_cfg: TrainConfig,
        dist_info: DistInfo,
        resume: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Fit on normal images ``(N, C, S, S)``, saving into ``self.run_dir``; return a summary for the run."""

    @abc.abstractmethod
    def build_graph(self) -> nn.Module:
        """The whole inference procedure as one module: ``forward(image) -> (anomaly_map, score)``."""

    @classmethod
    @abc.abstractmethod
    def load(cls, run_dir: Path, config: RunConfig) -> Method:
        """Rebuild the fitted method from a run directory."""


@torch.no_grad()
def run_graph(
    graph: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Run an inference graph over preprocessed images in batches; return ``(maps (N,H,W), scores (N,))``."""
    graph = graph.to(device).eval()
    tensor = torch.as_tensor(images)
    maps, scores = [], []
    for start in range(0, len(tensor), batch_size):
        batch = tensor[start : start + batch_size].to(device)
        anomaly_map, score = graph(batch)
        maps.append(anomaly_map.float().cpu().numpy())
        scores.append(score.float().cpu().numpy())
    if not maps:
        raise ValueError("no images to run")
    return np.concatenate(maps), np.concatenate(scores)
