"""Run configuration: dataclasses saved as ``config.json`` next to the weights of every run.

A run directory holds everything needed to rebuild a method's inference graph without the
training data: the method name, its hyperparameters, the network preset, the preprocessing,
the training settings and the training state (step reached, whether it finished).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgead import __version__
from edgead.data.files import (  # the one JSON reader, writer
    new_folder,
    read_json_strict,
    write_bytes_atomic,
    write_json_atomic,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"
DEFAULT_RUNS_DIR = Path("runs")


@dataclass
class TrainConfig:
    """Optimiser and loop settings shared by every method that trains a network.

    Defaults follow the score-resilience paper (section 5.3) where it gives them: AdamW, betas (0.9, 0.999),
    learning rate 1e-4 reduced 10x at 1/3 and 2/3 of training (its epochs 1000 and 2000 of 3000), weight decay
    1e-3, EMA 0.9999, batch size 16. Ours, in no paper: ``steps`` 20000 (the paper trains 3000 epochs, which
    ``epochs=3000`` reproduces: steps are then derived from the training-set size), ``grad_clip`` 1.0 (a
    safeguard against the rare exploding step of score matching at small noise levels, which the papers do not
    mention; 0 disables it), ``ema_warmup``, ``amp`` and the checkpoint cadence.
    """

    steps: int = 20000
    #: train this many passes over the training images instead: ``steps = ceil(epochs * n_train / (batch_size *
    #: processes))``, computed once the data set is known (the paper's recipe is stated in epochs)
    epochs: int | None = None
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "multistep"  # "multistep" | "cosine" | "constant"
    lr_milestones: tuple[float, ...] = (1 / 3, 2 / 3)  # fractions of ``steps`` for "multistep"
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) so short runs get a useful EMA
    grad_clip: float = 1.0
    amp: bool = True  # bf16/fp16 autocast, only on CUDA
    seed: int = 0
    checkpoint_every: int = 1000
    max_time_s: float | None = None  # stop early after this wall time (the demo uses it)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that is out of range."""
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("multistep", "cosine", "constant"):
            raise ValueError(f"lr_schedule must be multistep, cosine or constant, got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a JSON dict, ignoring unknown keys of newer versions."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("adam_betas", "lr_milestones"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


@dataclass
class RunConfig:
    """Everything ``config.json`` records about one run."""

    method: str
    preprocess: dict[str, Any]
    method_params: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    #: the run spec it was made from (``edgead.spec.RunSpec.recorded``); empty for runs made before edgead 0.1.1
    spec: dict[str, Any] = field(default_factory=dict)
    #: tiled inference (``edgead.methods.tiling``): ``frame_size``, ``tile``, ``overlap``; empty: none
    tiling: dict[str, Any] = field(default_factory=dict)
    #: ``edgead update``: the run this one was made from and the normal images it added; empty: trained
    lineage: dict[str, Any] = field(default_factory=dict)
    edgead_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"method", "preprocess", "method_params"} - set(data)
        if missing:
            raise ValueError(f"run config is missing keys {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, run_dir: Path) -> Path:
        """Write ``config.json`` atomically."""
        return write_json_atomic(Path(run_dir) / CONFIG_NAME, self.to_dict())

    @classmethod
    def load(cls, run_dir: Path) -> RunConfig:
        """Read ``<run_dir>/config.json`` with a clear error when it is absent, not valid JSON, repeats a key or is
        nested too deeply (``edgead.data.files.read_json_strict``)."""
        path = Path(run_dir) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no run config here; expected a run directory made by `edgead train`")
        data = read_json_strict(path, hint="expected the config.json `edgead train` wrote")  # names the file
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of run settings, got {type(data).__name__}")
        return cls.from_dict(data)


def new_run_dir(method: str, runs_root: Path = DEFAULT_RUNS_DIR) -> Path:
    """Create ``<runs_root>/<method>/<UTC timestamp>/`` (suffixed if the second is taken)."""
    return new_folder(Path(runs_root) / method, _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S"))


class LatestNotUpdated(UserWarning):
    """``latest`` beside a run was left as it is (it is not edgead's pointer, or cannot be written); the run
    itself is saved. ``edgead train`` prints it as one line."""


def _is_own_latest(link: Path) -> bool:
    """``link`` is nothing yet, or a pointer :func:`mark_latest` made: a link to a sibling by its bare name, or
    (where links are not allowed) a short text file naming a sibling run."""
    if link.is_symlink():
        target = os.readlink(link)
        return Path(target).name == target and target not in ("", ".", "..")
    if not link.exists():
        return True
    if not link.is_file() or link.stat().st_size > 255:
        return False
    try:
        name = link.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(name) and Path(name).name == name and (link.parent / name / CONFIG_NAME).is_file()


def mark_latest(run_dir: Path, report: Callable[[str], None] | None = None) -> str | None:
    """Point ``<runs_root>/<method>/latest`` at ``run_dir`` (a symlink, replaced atomically; a text file
    holding the directory name where symlinks are not allowed).

    Only edgead's own pointer is ever replaced: a ``latest`` that is a user's file, a folder or a link elsewhere
    is left as it is. Returns None, or why ``latest`` was not updated, which also goes to ``report`` (the
    caller's event line), or without one is issued as a :class:`LatestNotUpdated` warning; never an exception:
    the run is saved either way."""
    run_dir = Path(run_dir)
    link = run_dir.parent / "latest"
    if not _is_own_latest(link):
        kind = "a file edgead did not write"
        if link.is_symlink():
            kind = f"a link to {os.readlink(link)}"
        elif link.is_dir():
            kind = "a folder"
        return _latest_not_updated(f"{link} is {kind}; left as it is", run_dir, report)
    tmp = run_dir.parent / f".latest.{os.getpid()}.tmp"
    try:
        try:
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(run_dir.name, target_is_directory=True)
            os.replace(tmp, link)
        except OSError:
            tmp.unlink(missing_ok=True)
            if link.is_symlink():
                link.unlink()
            write_bytes_atomic(link, run_dir.name.encode())
    except OSError as err:
        return _latest_not_updated(f"{link} could not be written ({err.strerror or err})", run_dir, report)
    return None


def _latest_not_updated(why: str, run_dir: Path, report: Callable[[str], None] | None) -> str:
    """Say (to ``report``, else as a warning) that ``latest`` was not updated, and return the message."""
    message = f"{why}, so it does not point at this run; the run is saved in {run_dir}"
    if report is not None:
        report(message)
    else:
        warnings.warn(message, LatestNotUpdated, stacklevel=3)
    return message


def resolve_latest(method: str, runs_root: Path = DEFAULT_RUNS_DIR) -> Path:
    """Return the run that ``<runs_root>/<method>/latest`` points to, with a clear error if none."""
    link = Path(runs_root) / method / "latest"
    if link.is_symlink() or link.is_dir():
        target = link.resolve()
    elif link.is_file():
        target = link.parent / link.read_text().strip()
    else:
        raise FileNotFoundError(
            f"no trained run for method {method!r} under {Path(runs_root) / method}; "
            f"train one with `edgead train --method {method} --data DIR` or pass --run DIR"
        )
    if not (target / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{link} points to {target}, which has no {CONFIG_NAME}")
    return target
