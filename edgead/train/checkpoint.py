"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A run directory holds
- ``weights.safetensors``: the EMA weights, what evaluation and export use;
- ``config.json``: the run configuration, including ``state.step``;
- ``training_state/``: raw weights, EMA, optimiser moments and RNG states, for ``--resume``.
Each file is written to a temporary name and renamed, so an interrupted save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from edgead.config import WEIGHTS_NAME, write_json_atomic
from edgead.data.io import atomic_output

TRAINING_STATE_DIR = "training_state"


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` through a temporary file and a rename."""
    path = Path(path)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_output(path, durable=True) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)
    return path


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file with an error naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated headers
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def save_weights(state_dict: dict[str, torch.Tensor], run_dir: Path) -> Path:
    return save_tensors_atomic(state_dict, Path(run_dir) / WEIGHTS_NAME, metadata={"format": "pt"})


def load_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_tensors(Path(run_dir) / WEIGHTS_NAME)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors (for safetensors) and plain values (for JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    run_dir: Path,
    model: torch.nn.Module,
    ema_state: dict[str, torch.Tensor],
    ema_updates: int,
    optimizer: torch.optim.Optimizer,
    step: int,
    sampler_state: dict[str, Any],
) -> None:
    """Save what ``--resume`` needs to continue bit-for-bit from ``step``."""
    folder = Path(run_dir) / TRAINING_STATE_DIR
    save_tensors_atomic(model.state_dict(), folder / "model.safetensors")
    save_tensors_atomic(ema_state, folder / "ema.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_tensors_atomic(opt_tensors, folder / "optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_tensors_atomic(rng, folder / "rng.safetensors")
    write_json_atomic(
        folder / "state.json",
        {"step": step, "ema_updates": ema_updates, "optimizer": opt_meta, "sampler": sampler_state},
    )


def load_training_state(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, torch.Tensor], int, dict[str, Any]]:
    """Restore model, optimiser and RNG; return ``(step, ema_state, ema_updates, sampler_state)``."""
    folder = Path(run_dir) / TRAINING_STATE_DIR
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: no training state to resume from in {run_dir}")
    meta = json.loads(state_path.read_text())
    model.load_state_dict(load_tensors(folder / "model.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(load_tensors(folder / "optimizer.safetensors"), meta["optimizer"]))
    rng = load_tensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    ema_state = load_tensors(folder / "ema.safetensors")
    return int(meta["step"]), ema_state, int(meta["ema_updates"]), meta["sampler"]
