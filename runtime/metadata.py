"""The ``edgead.json`` sidecar of an export: read, check and write it without torch.

It records everything the runtime needs to reproduce the training-time preprocessing and decision
(input size, channel order, normalisation, threshold), the method's inference hyperparameters, and
the SHA-256 of every artifact, so a runtime never runs an ONNX file or engine that does not belong to
the metadata next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgead.data.io import file_sha256, write_bytes_atomic

METADATA_NAME = "edgead.json"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "method", "input", "outputs", "preprocess", "threshold", "artifacts")


class MetadataError(ValueError):
    """An export directory is missing its metadata, or an artifact does not match it."""


def load_metadata(export_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``<export_dir>/edgead.json``."""
    path = Path(export_dir) / METADATA_NAME
    if not path.is_file():
        raise MetadataError(f"{path}: not found; expected an export directory made by `edgead export`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MetadataError(f"{path}: not valid JSON ({err})") from err
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise MetadataError(f"{path}: missing keys {missing}")
    if meta["format_version"] > FORMAT_VERSION:
        raise MetadataError(
            f"{path}: format version {meta['format_version']} is newer than this runtime understands "
            f"({FORMAT_VERSION}); upgrade edgead"
        )
    return meta


def write_metadata(export_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``edgead.json`` atomically (last, after every artifact it lists)."""
    payload = (json.dumps(meta, indent=2) + "\n").encode()
    return write_bytes_atomic(Path(export_dir) / METADATA_NAME, payload, durable=True)


def artifact_record(export_dir: str | Path, file_name: str, **fields: Any) -> dict[str, Any]:
    """The metadata entry of an artifact: its file name, SHA-256, size and any extra fields."""
    path = Path(export_dir) / file_name
    return {"file": file_name, "sha256": file_sha256(path), "bytes": path.stat().st_size, **fields}


def verified_artifact(export_dir: str | Path, record: dict[str, Any]) -> Path:
    """Return the artifact's path after checking that its SHA-256 matches the metadata."""
    path = Path(export_dir) / record["file"]
    if not path.is_file():
        raise MetadataError(f"{path}: listed in {METADATA_NAME} but missing; re-run `edgead export`")
    actual = file_sha256(path)
    if actual != record["sha256"]:
        raise MetadataError(
            f"{path}: SHA-256 {actual[:16]}... does not match {METADATA_NAME} ({record['sha256'][:16]}...); "
            "the file was changed or belongs to another export. Re-run `edgead export`."
        )
    return path


def find_engine(meta: dict[str, Any], precision: str | None = None, flavour: str | None = None) -> dict | None:
    """The engine entry for ``precision`` (any if None) and ``flavour`` (any if None), or None."""
    for engine in meta["artifacts"].get("engines", []):
        if precision not in (None, engine["precision"]):
            continue
        if flavour not in (None, engine["flavour"]):
            continue
        return engine
    return None
