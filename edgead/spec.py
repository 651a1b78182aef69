"""The run spec: everything that starts a run, typed once and shared by ``edgead train``, ``edgead tune``,
``train_run`` and ``tune_run``.

A spec comes from command-line options, from a file (``edgead train --config FILE``, JSON or YAML), or from a
run's recorded ``config.json`` (which stores the spec it was made from under ``spec``, so ``--config
RUN/config.json`` starts the same run again). Files are read strictly: an unknown key, a duplicated key or a
value of the wrong type is an error naming the file, the key and what was expected; nothing is silently
ignored or defaulted.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgead.config import DEFAULT_RUNS_DIR, TrainConfig
from edgead.data.files import json_depth, read_json_strict
from edgead.data.preprocess import check_image_size

#: Deepest nesting a spec file may have (a spec is two levels deep; this stops a hostile file early).
MAX_DEPTH = 16


@dataclass
class RunSpec:
    """What ``edgead train`` / ``edgead tune`` start from (the method's own hyperparameters are ``params``)."""

    #: detection method (``edgead info`` lists them)
    method: str = "score-resilience"
    #: normal images: MVTec-layout roots (``<root>/train/good``) or plain folders; several train one model
    data: list[str] = field(default_factory=list)
    #: network size of methods with a U-Net (tiny, small, paper); None: small
    preset: str | None = None
    #: square input size in pixels (with ``tile``: the frame's height); None: the method's default
    image_size: int | None = None
    #: 3 for RGB, 1 for grayscale
    channels: int = 3
    #: the method's hyperparameters (``--param KEY=VALUE``), validated by the method
    params: dict[str, Any] = field(default_factory=dict)
    #: optimiser and loop settings of methods that train a network
    train: TrainConfig = field(default_factory=TrainConfig)
    #: tiled inference (``edgead.methods.tiling``): the model's input size; ``image_size`` is then the frame
    #: size the tiles are cut from (None: no tiling, the whole frame resized to ``image_size``)
    tile: int | None = None
    #: overlap of neighbouring tiles as a share of a tile (engineering choice: a quarter)
    tile_overlap: float = 0.25
    #: with ``tile``: the frame's width, for a frame kept at its camera's aspect ratio (None: square,
    #: ``image_size`` wide)
    frame_width: int | None = None
    #: share of the normal images held out for the threshold and pseudo-validation
    val_fraction: float = 0.1
    #: cpu or cuda; None: cuda when available
    device: str | None = None
    #: run directory; None: ``<runs_root>/<method>/<timestamp>``
    out: str | None = None
    #: where default run directories go
    runs_root: str = str(DEFAULT_RUNS_DIR)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that is out of range."""
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size is not None:
            check_image_size(self.image_size)
        if self.tile is not None:
            if self.image_size is None:
                raise ValueError(f"tile {self.tile} needs image_size: the frame size the tiles are cut from")
            check_image_size(self.tile, "tile")
            if self.frame_width is not None:
                check_image_size(self.frame_width, "frame_width")
            width = self.image_size if self.frame_width is None else self.frame_width
            if not (self.tile <= min(self.image_size, width) and self.tile < max(self.image_size, width)):
                raise ValueError(
                    f"tile must fit the frame it is cut from ({self.image_size} px high, {width} px wide) and be "
                    f"smaller than one of its sides, got {self.tile}"
                )
        elif self.frame_width is not None:
            raise ValueError(f"frame_width {self.frame_width} needs tile: only a tiled run's frame may be oblong")
        if not 0.0 <= self.tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {self.tile_overlap}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        self.train.validate()

    @property
    def data_paths(self) -> list[Path]:
        return [Path(p) for p in self.data]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, the same keys ``from_dict`` reads."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def recorded(self) -> dict[str, Any]:
        """What a run stores under ``spec``: data roots absolute (so the file works from any folder), the run's
        own folder left out (a second run from it gets a new folder)."""
        record = self.to_dict()
        record["data"] = [str(Path(p).resolve()) for p in self.data]
        record["out"] = None
        return record

    @classmethod
    def from_dict(cls, data: Any, source: str = "run spec") -> RunSpec:
        """A spec from plain data, strictly: every key known, every value of its declared type."""
        values = _check_fields(cls, data, source, prefix="")
        if "train" in values:
            values["train"] = TrainConfig(**_check_fields(TrainConfig, values["train"], source, prefix="train."))
        spec = cls(**values)
        try:
            spec.validate()
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        return spec

    @classmethod
    def from_run_config(cls, config: dict[str, Any], source: str) -> RunSpec:
        """The spec a run was made from: its recorded ``spec``, or (runs made before specs were recorded) what
        its config implies (method, data roots, input size and channels, hyperparameters, training settings)."""
        if "spec" in config:
            return cls.from_dict(config["spec"], f"{source} (spec)")
        data = config.get("data", {})
        roots = data.get("roots") or ([data["root"]] if "root" in data else [])
        preprocess = config.get("preprocess", {})
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return cls.from_dict(
            {
                "method": config["method"],
                "data": roots,
                "preset": config.get("model", {}).get("preset"),
                "image_size": preprocess.get("image_size"),
                "channels": preprocess.get("channels", 3),
                "params": config.get("method_params", {}),
                "train": {k: v for k, v in config.get("train", {}).items() if k in known},
            },
            source,
        )

    @classmethod
    def load(cls, path: Path) -> RunSpec:
        """A spec file (``.json``, ``.yaml`` or ``.yml``), or a run's ``config.json``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no spec file here; expected a JSON or YAML file (or a run's config.json)")
        data = load_strict(path)
        if isinstance(data, dict) and "preprocess" in data and "method_params" in data:
            return cls.from_run_config(data, str(path))
        return cls.from_dict(data, str(path))


def load_strict(path: Path) -> Any:
    """JSON or YAML (by suffix; JSON when unsure) with duplicate keys and excessive nesting refused (JSON:
    ``edgead.data.files.read_json_strict``, the one strict JSON reader)."""
    if path.suffix.lower() not in (".yaml", ".yml"):
        try:
            return read_json_strict(path, MAX_DEPTH, hint="a spec file is JSON or YAML (.yaml/.yml)")
        except OSError as err:
            raise ValueError(f"{path}: cannot read it ({err})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read it as text ({err})") from None
    data = _load_yaml(text, path)
    if json_depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels; not a spec file")
    return data


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or give the spec as JSON") from None

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ValueError(f"{path}: key {key!r} appears twice (line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels; not a spec file") from None


def _check_fields(cls: type, data: Any, source: str, prefix: str) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``: unknown keys and ill-typed values refused."""
    if not isinstance(data, dict):
        where = f"'{prefix[:-1]}'" if prefix else "the file"
        raise ValueError(f"{source}: {where} must be a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"{source}: unknown key '{prefix}{key}'; known keys: {', '.join(names)}")
        values[key] = _coerce(value, hints[key], source, f"{prefix}{key}")
    return values


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """``value`` checked against the type ``hint`` (tuples from lists, ints accepted for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, source, key)
            except ValueError as err:
                errors.append(err)
        raise errors[0]
    if hint is TrainConfig:
        return value  # checked field by field by the caller
    expected = _type_name(hint)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{source}: {key} must be {expected}, got {json.dumps(value)}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, source, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is tuple and args and args[-1] is not Ellipsis and len(items) != len(args):
            raise ValueError(f"{source}: {key} must have {len(args)} items, got {len(items)}")
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {key} must be {expected}, got {json.dumps(value)}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {key} must be true or false, got {json.dumps(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: {key} must be an integer, got {json.dumps(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{source}: {key} must be a number, got {json.dumps(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{source}: {key} must be a string, got {json.dumps(value)}")
        return value
    raise TypeError(f"no check for {hint!r} ({key})")  # a new field type: teach _coerce about it


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))
