"""The training loop every network-based method shares.

A method supplies the network and its loss (for score-resilience: denoising score matching,
eq. 4 of the paper); the loop owns batching, AdamW, the learning-rate schedule, EMA, gradient
clipping, mixed precision on CUDA, seeding, checkpoints, resume, progress and DDP.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from edgead.config import TrainConfig
from edgead.train.checkpoint import load_training_state, save_training_state, save_weights
from edgead.train.distributed import DistInfo, any_rank_true, barrier
from edgead.train.ema import EMA

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
#: Without a terminal, a plain progress line at least this often (and every 5 % of the steps).
LOG_INTERVAL_S = 30.0


#: After this many steps the loop says what the whole run will cost.
ESTIMATE_AFTER_STEPS = 5


def _cost_line(description: str, cfg: TrainConfig, step: int, seconds_per_step: float, device: torch.device) -> str:
    """``"... about 2:13:00 for 20000 steps on cpu (0.40 s/step)"``, with a hint when a CPU run is long."""
    remaining = (cfg.steps - step) * seconds_per_step
    what = f"the remaining {cfg.steps - step} steps"
    if cfg.max_time_s is not None and cfg.max_time_s - step * seconds_per_step < remaining:
        remaining = max(cfg.max_time_s - step * seconds_per_step, 0.0)
        what = f"about {step + int(remaining / seconds_per_step)} of {cfg.steps} steps (the --max-time limit)"
    hours, rest = divmod(int(remaining), 3600)
    line = (
        f"{description}: about {hours}:{rest // 60:02d}:{rest % 60:02d} for {what} on {device.type} "
        f"({seconds_per_step:.2f} s/step)"
    )
    if device.type == "cpu" and remaining > 3600:
        line += f"; {CPU_RECIPE_HINT}"
    return line


#: The CPU-budget recipe measured on pseudo-validation (benchmarks/results/README.md, "CPU-budget recipe").
CPU_RECIPE_HINT = (
    "the CPU recipe measured for a 2-core machine (1070 s of training in the recorded run): --preset tiny "
    "--image-size 128 --batch-size 16 --lr 2e-3 --lr-schedule cosine --steps 1500, or stop early with --max-time "
    "SECONDS"
)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training at a step boundary after saving a resumable checkpoint."""

    def __init__(self, step: int, total: int, run_dir: Path | None) -> None:
        super().__init__(f"interrupted at step {step} of {total}")
        self.step, self.total, self.run_dir = step, total, run_dir


@contextlib.contextmanager
def _graceful_interrupt(flag: dict[str, bool], say: Callable[[str], None]) -> Iterator[None]:
    """The first Ctrl-C asks the loop to stop after the current step (which then checkpoints); a second one
    interrupts at once. Only the main thread can install signal handlers; elsewhere Ctrl-C is untouched."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        say("stopping after this step and saving a checkpoint (Ctrl-C again to stop at once) ...")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class TrainResult:
    step: int
    seconds: float
    finished: bool
    losses: list[float] = field(default_factory=list)  # mean loss of every logged window
    ema: EMA | None = None


class BatchSampler:
    """Epoch-wise shuffling that every rank computes identically, each rank taking its own slice.

    Its state (epoch, position) is saved with the checkpoint so a resumed run sees the same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < 1:
            raise ValueError("cannot train on an empty image set")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_indices(self) -> np.ndarray:
        needed = self.batch_size * self.world_size
        chunks, perm = [], self._perm(self.epoch)
        while needed > 0:
            take = perm[self.position : self.position + needed]
            chunks.append(take)
            needed -= len(take)
            self.position += len(take)
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                perm = self._perm(self.epoch)
        global_batch = np.concatenate(chunks)
        return global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then the chosen schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return 0.1 ** sum(step >= int(m * cfg.steps) for m in cfg.lr_milestones)


def _autocast(device: torch.device, enabled: bool) -> tuple[Any, torch.amp.GradScaler | None]:
    if not (enabled and device.type == "cuda"):
        return torch.autocast(device_type=device.type, enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16), None
    return torch.autocast(device_type="cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def train_network(
    model: nn.Module,
    loss_fn: LossFn,
    images: torch.Tensor,
    cfg: TrainConfig,
    dist_info: DistInfo,
    run_dir: Path | None = None,
    on_checkpoint: Callable[[int, bool, str], None] | None = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "training",
) -> TrainResult:
    """Train ``model`` to minimise ``loss_fn(model, batch)`` over ``images``.

    Args:
        model: the network, on the CPU; moved to ``dist_info.device`` here.
        loss_fn: returns the scalar loss of a batch; draws its own noise from torch's global RNG.
        images: (N, C, H, W) float32 training images, already preprocessed.
        cfg: optimiser and loop settings.
        dist_info: from ``init_distributed``; with world size > 1 the model is wrapped in DDP.
        run_dir: where checkpoints go (rank 0 only); None trains without saving.
        on_checkpoint: called by rank 0 after each checkpoint with ``(step, final, weights_id)``, to
            rewrite ``config.json`` (last, so that its ``weights_id`` tells a torn checkpoint).
        resume: continue from ``run_dir/training_state``.
        progress: show a progress bar with loss, steps/s and ETA (rank 0 only).

    Returns:
        The step reached, wall time, loss history and the EMA whose weights evaluation uses.
    """
    cfg.validate()
    device = dist_info.device
    model.to(device)
    ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    sampler = BatchSampler(len(images), cfg.batch_size, cfg.seed, dist_info.rank, dist_info.world_size)
    step = 0
    # Noise differs per rank (different draws on different shards); parameters stay in sync through DDP.
    # A resumed run restores the RNG state saved with the checkpoint instead.
    torch.manual_seed(cfg.seed * 1000 + dist_info.rank)
    if resume:
        if run_dir is None:
            raise ValueError("resume needs a run directory")
        step, ema_state, ema_updates, sampler_state = load_training_state(run_dir, model, optimizer)
        ema.load_state_dict(ema_state, ema_updates)
        sampler.load(sampler_state)
        if dist_info.rank > 0:  # only rank 0's RNG state is saved; other ranks restart their stream
            torch.manual_seed(cfg.seed * 1000 + dist_info.rank + 7919 * step)
    net: nn.Module = model
    if dist_info.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast, scaler = _autocast(device, cfg.amp)
    images = images.to(device) if images.numel() * 4 < 2**31 and device.type == "cuda" else images

    def checkpoint(at_step: int, final: bool) -> None:
        if run_dir is None or not dist_info.is_main:
            return
        # The resume state first (its manifest is the commit point), then the weights, then the config.
        save_training_state(run_dir, model, ema.state_dict(), ema.num_updates, optimizer, at_step, sampler.state())
        weights_id = save_weights(ema.state_dict(), run_dir)
        if on_checkpoint is not None:
            on_checkpoint(at_step, final, weights_id)

    result = TrainResult(step=step, seconds=0.0, finished=False, ema=ema)
    start = time.perf_counter()
    window: list[float] = []
    show = progress and dist_info.is_main
    console = Console(stderr=True)
    # Rich redraws a bar only on a terminal; in a log file print a plain line every 5 % instead.
    log_every = max(1, cfg.steps // 20) if show and not console.is_terminal else 0
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4g}"),
        TextColumn("{task.fields[rate]:.1f} steps/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    stop = {"stop": False}
    last_log = 0.0
    with (
        _graceful_interrupt(stop, lambda line: console.print(line, markup=False)),
        Progress(*columns, console=console, disable=not show or bool(log_every), transient=False) as bar,
    ):
        task = bar.add_task(description, total=cfg.steps, completed=step, loss=float("nan"), rate=0.0)
        net.train()
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg)
            batch = images[torch.from_numpy(sampler.next_indices())].to(device, non_blocking=True)
            with autocast:
                loss = loss_fn(net, batch)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            ema.update(model)
            step += 1
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step}; lower --lr or check the data")
            window.append(loss_value)
            elapsed = time.perf_counter() - start
            if step % 10 == 0 or step == cfg.steps:
                result.losses.append(float(np.mean(window)))
                window = []
            if show and step - result.step == ESTIMATE_AFTER_STEPS and step < cfg.steps:
                console.print(_cost_line(description, cfg, step, elapsed / ESTIMATE_AFTER_STEPS, device), markup=False)
            shown = result.losses[-1] if result.losses else loss_value
            # Every step, so a slow run shows its true count and rich can estimate the remaining time.
            bar.update(task, completed=step, loss=shown, rate=(step - result.step) / max(elapsed, 1e-9))
            if log_every and (step % log_every == 0 or step == cfg.steps or elapsed - last_log >= LOG_INTERVAL_S):
                last_log = elapsed
                rate = (step - result.step) / max(elapsed, 1e-9)
                eta = (cfg.steps - step) / max(rate, 1e-9)
                console.print(
                    f"{description}: step {step}/{cfg.steps} loss {shown:.4g} {rate:.1f} steps/s ETA {eta:.0f} s",
                    soft_wrap=True,
                )
            out_of_time = cfg.max_time_s is not None and elapsed >= cfg.max_time_s
            if any_rank_true(out_of_time or stop["stop"], dist_info):
                if stop["stop"]:
                    checkpoint(step, False)
                    raise TrainingInterrupted(step, cfg.steps, run_dir)
                if show:
                    console.print(
                        f"{description}: stopped by the time limit ({cfg.max_time_s:g} s) after {step} of "
                        f"{cfg.steps} steps",
                        markup=False,
                    )
                break
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint(step, False)
    result.seconds = time.perf_counter() - start
    result.finished = step >= cfg.steps
    result.step = step
    checkpoint(step, True)
    barrier(dist_info)
    return result
