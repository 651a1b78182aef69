"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A run directory holds
- ``weights.safetensors``: the EMA weights, what evaluation and export use;
- ``config.json``: the run configuration, including ``state.step`` and ``state.weights_id``;
- ``training_state/``: raw weights, EMA, optimiser moments and RNG states, for ``--resume``.

A checkpoint is complete or ignored, never mixed:
- the resume state of one step is written into a fresh folder ``training_state/step-<step>-<id>/``, each
  file fsynced; then ``training_state/checkpoint.json`` (the manifest: step, folder, sha256 of every file)
  is replaced atomically. That rename is the commit point: a kill before it leaves the previous manifest,
  which names the previous, complete folder; folders no manifest names are removed by the next save.
  ``--resume`` reads only the manifest's folder and checks every hash, so it never continues from a torn or
  altered state.
- ``weights.safetensors`` carries a random ``weights_id`` in its header that ``config.json`` records next
  to it; ``config.json`` is written last. A kill between the two leaves ids that differ, and loading the
  run says so (and how to finish it) instead of pairing one checkpoint's weights with another's config.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgead.config import WEIGHTS_NAME, write_json_atomic
from edgead.data.files import atomic_output, file_sha256

TRAINING_STATE_DIR = "training_state"
MANIFEST_NAME = "checkpoint.json"
WEIGHTS_ID_KEY = "edgead_weights_id"
_STATE_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


class TornRunError(ValueError):
    """A run's files come from different checkpoints (a kill while saving) or its resume state is damaged."""


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


def save_weights(state_dict: dict[str, torch.Tensor], run_dir: Path) -> str:
    """Write ``weights.safetensors`` atomically; returns its new random id, which the caller records in
    ``config.json``'s ``state.weights_id`` (written after it) so that loading can tell a torn pair."""
    weights_id = uuid.uuid4().hex
    save_tensors_atomic(state_dict, Path(run_dir) / WEIGHTS_NAME, metadata={"format": "pt", WEIGHTS_ID_KEY: weights_id})
    return weights_id


def weights_id(path: Path) -> str | None:
    """The id in a weights file's header (None for files written before ids existed)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(WEIGHTS_ID_KEY)
    except Exception as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def load_weights(run_dir: Path, config_state: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Load ``weights.safetensors``; given the run's ``config.json`` ``state``, refuse a file from another
    checkpoint than the config (ids differ, or the config was never updated after the weights were written)."""
    path = Path(run_dir) / WEIGHTS_NAME
    tensors = load_tensors(path)
    found = weights_id(path)
    if config_state is not None and found is not None and found != config_state.get("weights_id"):
        raise TornRunError(
            f"{path} and {Path(run_dir) / 'config.json'} come from different checkpoints: the run was stopped "
            f"while saving. Finish it with `edgead train --resume {run_dir}` (it continues from the last complete "
            "checkpoint), or train again"
        )
    return tensors


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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_training_state(
    run_dir: Path,
    model: torch.nn.Module,
    ema_state: dict[str, torch.Tensor],
    ema_updates: int,
    optimizer: torch.optim.Optimizer,
    step: int,
    sampler_state: dict[str, Any],
) -> Path:
    """Save what ``--resume`` needs to continue bit-for-bit from ``step``, as one complete checkpoint.

    The files go into a new folder; the manifest that names it is replaced last (the commit point); then
    folders no manifest names (older checkpoints, ones a kill left half-written) are removed.
    Returns the checkpoint's folder.
    """
    root = Path(run_dir) / TRAINING_STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"step-{step:09d}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
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
    _fsync_dir(folder)
    manifest = {
        "step": step,
        "folder": folder.name,
        "sha256": {name: file_sha256(folder / name) for name in _STATE_FILES},
    }
    write_json_atomic(root / MANIFEST_NAME, manifest)
    _fsync_dir(root)
    for entry in root.iterdir():
        if entry.is_dir() and entry.name != folder.name:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and entry.name != MANIFEST_NAME:  # the single-folder layout of older runs
            entry.unlink(missing_ok=True)
    return folder


def checkpoint_folder(run_dir: Path) -> tuple[int, Path]:
    """The step and folder of the run's last complete checkpoint, every file checked against the manifest.

    Raises:
        FileNotFoundError: no checkpoint was ever committed in ``run_dir``.
        TornRunError: the manifest or a file it names is missing, unreadable or altered.
    """
    root = Path(run_dir) / TRAINING_STATE_DIR
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        if (root / "state.json").is_file():  # written by an edgead without manifests: one folder, unverified
            return int(json.loads((root / "state.json").read_text())["step"]), root
        raise FileNotFoundError(f"{manifest_path}: no complete checkpoint to resume from in {run_dir}")
    try:
        manifest = json.loads(manifest_path.read_text())
        step, name, hashes = int(manifest["step"]), str(manifest["folder"]), dict(manifest["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise TornRunError(f"{manifest_path}: not a checkpoint manifest ({err})") from err
    folder = root / name
    if Path(name).name != name or not folder.is_dir():
        raise TornRunError(f"{manifest_path}: names checkpoint folder {name!r}, which is not in {root}")
    for file_name in _STATE_FILES:
        path = folder / file_name
        if not path.is_file() or file_sha256(path) != hashes.get(file_name):
            raise TornRunError(
                f"{path}: missing or altered since checkpoint step {step} was saved; the run cannot resume "
                "bit-exactly from it. Train again (or restore the file)"
            )
    return step, folder


def load_training_state(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, torch.Tensor], int, dict[str, Any]]:
    """Restore model, optimiser and RNG from the last complete checkpoint; return
    ``(step, ema_state, ema_updates, sampler_state)``."""
    step, folder = checkpoint_folder(run_dir)
    meta = json.loads((folder / "state.json").read_text())
    if int(meta["step"]) != step:
        raise TornRunError(f"{folder / 'state.json'}: step {meta['step']} but its manifest says {step}")
    model.load_state_dict(load_tensors(folder / "model.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(load_tensors(folder / "optimizer.safetensors"), meta["optimizer"]))
    rng = load_tensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    ema_state = load_tensors(folder / "ema.safetensors")
    return step, ema_state, int(meta["ema_updates"]), meta["sampler"]
