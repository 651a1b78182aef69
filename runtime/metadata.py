"""The ``edgead.json`` sidecar of an export: one typed record, read, validated and written here (torch-free).

It records everything the runtime needs to reproduce the training-time preprocessing and decision
(input size, channel order, normalisation, threshold), the method's inference hyperparameters, and
the SHA-256 of every artifact, so a runtime never runs an ONNX file or engine that does not belong to
the metadata next to it. ``edgead export`` builds an :class:`ExportMetadata` and calls :meth:`save`;
the runtime calls :func:`load_metadata`, which names the field when something is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from edgead.data.files import JSONReadError, file_sha256, read_json_strict, write_json_atomic
from edgead.data.preprocess import PreprocessConfig

METADATA_NAME = "edgead.json"
#: Version 2: ``notes`` (declared by the method's graph) and ``steps`` (export step timings) added.
FORMAT_VERSION = 2
#: The precisions an export can hold (one ONNX each) and a backend can run.
PRECISIONS = ("fp32", "fp16", "int8")
#: The ``edgead.json`` artifact key of each precision's ONNX.
ONNX_KEYS = {"fp32": "onnx", "fp16": "onnx_fp16", "int8": "onnx_int8"}


class MetadataError(ValueError):
    """An export directory is missing its metadata, or an artifact does not match it."""


@dataclass
class ExportMetadata:
    """Everything ``edgead.json`` holds. Mapping-style reads (``meta["threshold"]``) also work."""

    method: str
    input: dict[str, Any]  # name, shape [B, C, S, S], dtype, layout, channel_order
    outputs: list[dict[str, Any]]  # anomaly_map and score: name, shape, dtype
    preprocess: dict[str, Any]  # edgead.data.preprocess.PreprocessConfig fields
    threshold: dict[str, Any]  # value (score >= value is anomalous), how it was calibrated
    artifacts: dict[str, Any]  # onnx, onnx_fp16, engines: file, sha256, bytes, ...
    format_version: int = FORMAT_VERSION
    edgead_version: str = ""
    created: str = ""
    run: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # what the method's graph declares (noise, FP32 parts)
    method_params: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key not in self.field_names():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.field_names() else default

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def threshold_value(self) -> float:
        """The calibrated threshold of the FP32 and FP16 graphs."""
        return float(self.threshold["value"])

    def calibration(self, precision: str) -> dict[str, Any]:
        """The calibration record of ``precision``'s graph (its ``value``, the normals' score quantiles, ...):
        INT8 has its own (its scores are calibrated on the same held-out normals, at the same false-alarm rate:
        ``threshold.int8``), FP32 and FP16 share one."""
        if precision == "int8":
            own = self.threshold.get("int8")
            if not isinstance(own, dict):
                raise MetadataError("edgead.json: an INT8 export needs 'threshold.int8'; re-run `edgead export`")
            return own
        return self.threshold

    def threshold_for(self, precision: str) -> float:
        """The calibrated threshold of ``precision``'s graph (:meth:`calibration`)."""
        return float(self.calibration(precision)["value"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = METADATA_NAME) -> ExportMetadata:
        """Validate ``data`` (parsed JSON) field by field; errors name ``source`` and the field."""
        if not isinstance(data, dict):
            raise MetadataError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise MetadataError(f"{source}: field 'format_version' must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise MetadataError(
                f"{source}: format version {version} is newer than this runtime understands "
                f"({FORMAT_VERSION}); upgrade edgead"
            )
        hints = {"str": str, "int": int, "dict[str, Any]": dict, "list[dict[str, Any]]": list}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if name not in data:
                if required:
                    raise MetadataError(f"{source}: missing field '{name}'; re-run `edgead export`")
                continue
            expected = hints[str(f.type)]
            if not isinstance(data[name], expected):
                raise MetadataError(
                    f"{source}: field '{name}' must be a JSON {expected.__name__}, got {type(data[name]).__name__}"
                )
        meta = cls(**{k: v for k, v in data.items() if k in fields})
        meta._check_details(source)
        return meta

    def _check_details(self, source: str) -> None:
        value = self.threshold.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise MetadataError(f"{source}: field 'threshold.value' must be a finite number, got {value!r}")
        if "int8" in self.threshold:
            own = self.threshold["int8"]
            value = own.get("value") if isinstance(own, dict) else None
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise MetadataError(f"{source}: field 'threshold.int8.value' must be a finite number, got {value!r}")
        shape = self.input.get("shape")
        if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise MetadataError(
                f"{source}: field 'input.shape' must be [batch, channels, height, width], got {shape!r}"
            )
        onnx = self.artifacts.get("onnx")
        if not (isinstance(onnx, dict) and isinstance(onnx.get("file"), str) and isinstance(onnx.get("sha256"), str)):
            raise MetadataError(f"{source}: field 'artifacts.onnx' must name the model file and its sha256")
        try:
            pre = PreprocessConfig.from_dict(self.preprocess)
        except (TypeError, ValueError) as err:
            raise MetadataError(f"{source}: field 'preprocess' is invalid ({err})") from None
        if [pre.channels, *pre.size] != shape[1:]:
            height, width = pre.size
            raise MetadataError(
                f"{source}: 'preprocess' ({pre.channels} channels, {height} px high, {width} px wide) does not fit the "
                f"model input {shape}"
            )
        engines = self.artifacts.get("engines", [])
        if not (isinstance(engines, list) and all(isinstance(e, dict) for e in engines)):
            raise MetadataError(f"{source}: field 'artifacts.engines' must be a list of engine records")
        for engine in engines:
            if not all(isinstance(engine.get(k), str) for k in ("file", "sha256", "precision", "flavour")):
                raise MetadataError(f"{source}: every engine record needs file, sha256, precision and flavour")

    def save(self, export_dir: str | Path) -> Path:
        """Write ``edgead.json`` atomically (last, after every artifact it lists)."""
        return write_json_atomic(Path(export_dir) / METADATA_NAME, self.to_dict())


def load_metadata(export_dir: str | Path) -> ExportMetadata:
    """Read and validate ``<export_dir>/edgead.json`` (strict JSON: ``edgead.data.files.read_json_strict``)."""
    path = Path(export_dir) / METADATA_NAME
    if not path.is_file():
        raise MetadataError(f"{path}: not found; expected an export directory made by `edgead export`")
    try:  # a key given twice (a second "threshold") or a hostile nesting is refused, naming the file
        data = read_json_strict(path, hint="re-run `edgead export`")
    except JSONReadError as err:
        raise MetadataError(str(err)) from None
    return ExportMetadata.from_dict(data, source=str(path))


def artifact_record(export_dir: str | Path, file_name: str, **fields: Any) -> dict[str, Any]:
    """The metadata entry of an artifact: its file name, SHA-256, size and any extra fields."""
    path = Path(export_dir) / file_name
    return {"file": file_name, "sha256": file_sha256(path), "bytes": path.stat().st_size, **fields}


def is_plain_file_name(name: str) -> bool:
    """Whether ``name`` is one file name on every platform: no ``/`` or ``\\`` separator, no drive (``C:``),
    not ``.`` or ``..`` (an ``edgead.json`` written on Linux is read on Windows, and the reverse)."""
    return (
        bool(name)
        and name not in (".", "..")
        and PurePosixPath(name).name == name
        and PureWindowsPath(name).name == name
        and not PureWindowsPath(name).drive
    )


def verified_artifact(export_dir: str | Path, record: dict[str, Any]) -> Path:
    """Return the artifact's path after checking that it is a plain file name inside the export (never
    ``../`` or an absolute path: another export's model must not run with this export's threshold) and that
    its SHA-256 matches the metadata."""
    name = record.get("file")
    if not isinstance(name, str) or not name or not is_plain_file_name(name):
        raise MetadataError(
            f"{Path(export_dir) / METADATA_NAME}: artifact file {name!r} must be a file name inside the export folder"
        )
    if not isinstance(record.get("sha256"), str):
        raise MetadataError(f"{Path(export_dir) / METADATA_NAME}: artifact {name!r} has no sha256")
    path = Path(export_dir) / name
    if not path.is_file():
        raise MetadataError(f"{path}: listed in {METADATA_NAME} but missing; re-run `edgead export`")
    actual = file_sha256(path)
    if actual != record["sha256"]:
        raise MetadataError(
            f"{path}: SHA-256 {actual[:16]}... does not match {METADATA_NAME} ({record['sha256'][:16]}...); "
            "the file was changed or belongs to another export. Re-run `edgead export`."
        )
    return path


def find_engine(meta: ExportMetadata, precision: str | None = None, flavour: str | None = None) -> dict | None:
    """The engine entry for ``precision`` (any if None) and ``flavour`` (any if None), or None."""
    for engine in meta.artifacts.get("engines", []):
        if precision not in (None, engine["precision"]):
            continue
        if flavour not in (None, engine["flavour"]):
            continue
        return engine
    return None
