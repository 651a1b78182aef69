"""The PyTorch eager baseline that ``edgead bench`` compares the exported backends against."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgead.bench.timing import latency_stats, timed_loop
from edgead.config import RunConfig
from edgead.methods import get_method
from edgead.methods.tiling import with_frame


def bench_torch_eager(
    run_dir: Path,
    batch: np.ndarray,
    warmup_s: float,
    duration_s: float,
    min_runs: int = 50,
    device: str = "cpu",
    half: bool = False,
) -> dict[str, Any]:
    """Latency of the method's inference graph in eager PyTorch on the same preprocessed batch."""
    config = copy.deepcopy(RunConfig.load(run_dir))
    if config.tiling:  # a tiled run's graph takes the frame; its tiles keep the model's size
        config.tiling = with_frame(config.tiling, int(batch.shape[-2]), int(batch.shape[-1]))
    else:
        config.preprocess["image_size"] = int(batch.shape[-1])
    graph = get_method(config.method).load(Path(run_dir), config).inference_graph().eval().to(device)
    if half:
        from edgead.export.fp16 import mixed_precision_graph

        graph = mixed_precision_graph(graph.cpu()).to(device)
    tensor = torch.from_numpy(batch).to(device)

    def call() -> None:
        with torch.no_grad():  # not inference_mode: a graph may contain gradients of its networks
            graph(tensor)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    samples = timed_loop(call, warmup_s, duration_s, min_runs)
    stats = latency_stats(samples["total"])
    return {
        "stats": stats,
        "fps": 1e3 * len(batch) / stats["median"],
        "device": device,
        "precision": "fp16" if half else "fp32",
        "threads": torch.get_num_threads(),
    }
