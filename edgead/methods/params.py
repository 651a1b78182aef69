"""Typed, validated method hyperparameters: one dataclass per method, defaults from its paper.

Each field is declared with :func:`param`, which records where the value comes from in the paper, what
it means, and (optionally) the allowed values or a range check. ``config.json`` stores the fields as a
plain dict (``method_params``); :meth:`MethodParams.from_dict` turns it back into the dataclass, naming
the method, the key and what was expected when something is wrong.

A field whose name ends in ``_candidates`` is a list an automatic choice tries one by one (each entry costs a
pseudo-validation pass): :meth:`MethodParams.from_dict` drops repeated entries (keeping the first of each, in
order; :func:`candidate_notes` says so) and refuses more than :data:`MAX_CANDIDATES` distinct ones.

Example:
    >>> @dataclass(frozen=True)
    ... class Params(MethodParams):
    ...     k: float = param(1e-3, "inference perturbation scale", "Sec. 5.3", check=positive)
    >>> Params.from_dict({"k": 0.01}, method="demo").k
    0.01
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

P = TypeVar("P", bound="MethodParams")
Check = Callable[[Any], str | None]  # returns None when the value is fine, else what was expected


class ParamError(ValueError):
    """A method hyperparameter is unknown, of the wrong type or out of range."""


#: Most distinct entries a ``*_candidates`` list may hold. Engineering choice: each candidate is one
#: pseudo-validation pass (a graph build and a pass over the set, seconds to minutes); the shipped grids hold
#: at most 7, and 64 still finishes in minutes where 15,000 ran for tens of minutes.
MAX_CANDIDATES = 64
CANDIDATES_SUFFIX = "_candidates"

#: Where a default may come from (issue: no default is justified by a test figure).
ORIGINS: dict[str, str] = {
    "paper": "the paper's value (the section is in ref)",
    "backbone": "the pretrained backbone's own convention",
    "pseudo-validation": "chosen per run on held-out normals + pseudo-anomalies (an 'auto' value)",
    "engineering": "an engineering choice, reasoned or measured without test data (why says which)",
}

#: ``why`` of every noise seed's default (origin "engineering").
FIXED_SEED = (
    "any fixed seed: the noise becomes a buffer of the graph, so PyTorch, ONNX Runtime and TensorRT compute the "
    "same function"
)


def param(
    default: Any,
    doc: str,
    ref: str,
    *,
    choices: Sequence[Any] | None = None,
    check: Check | None = None,
    origin: str | None = None,
    why: str = "",
) -> Any:
    """A documented hyperparameter field: ``doc`` says what it is, ``ref`` where in the paper it comes
    from (or "ours" for a choice the paper leaves open), ``origin`` where its default comes from (one of
    :data:`ORIGINS`) and ``why`` the reason, required unless the default is the paper's. Mutable defaults
    (lists) are copied per instance."""
    if origin is not None and origin not in ORIGINS:
        raise ValueError(f"origin {origin!r}: expected one of {', '.join(ORIGINS)}")
    metadata = {
        "doc": doc,
        "ref": ref,
        "choices": tuple(choices) if choices else None,
        "check": check,
        "origin": origin,
        "why": why,
    }
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def positive(value: Any) -> str | None:
    return None if value > 0 else "a value > 0"


def at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"a value >= {low:g}"


def open_unit(value: Any) -> str | None:
    return None if 0.0 < value < 1.0 else "a value in (0, 1)"


def distinct_candidates(values: list[Any]) -> list[Any]:
    """``values`` without repeats, the first of each kept in order (1 and 1.0 count as the same candidate)."""
    seen: set[Any] = set()
    kept = []
    for value in values:
        key = repr(value) if isinstance(value, list | dict) else value
        if key not in seen:
            seen.add(key)
            kept.append(value)
    return kept


def candidate_notes(given: dict[str, Any] | None, params: MethodParams) -> list[str]:
    """One line per ``*_candidates`` parameter in ``given`` (e.g. ``--param`` pairs) whose list had repeats that
    :meth:`MethodParams.from_dict` dropped, for the run's log and summary."""
    notes = []
    for name, value in (given or {}).items():
        if name.endswith(CANDIDATES_SUFFIX) and isinstance(value, list | tuple):
            kept = getattr(params, name, None)
            if isinstance(kept, list) and len(kept) < len(value):
                notes.append(
                    f"parameter {name}: {len(value)} entries given, {len(kept)} distinct kept (repeats dropped, "
                    "order kept)"
                )
    return notes


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` converted to ``annotation`` where that is lossless (int -> float, list for tuple), else
    raise ``TypeError`` with the expected type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except TypeError as err:
                errors.append(str(err))
        raise TypeError(" or ".join(errors) + (" or null" if type(None) in options else ""))
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise TypeError("one of " + ", ".join(repr(v) for v in typing.get_args(annotation)))
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise TypeError("a list")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return [_coerce(v, item) for v in value]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError("an integer")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise TypeError("a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError("a string")
    return value


def _shown(value: Any, limit: int = 200) -> str:
    """``repr(value)``, shortened: an error about a 15,000-entry list should not print all of it."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value)} entries)" if isinstance(value, list | tuple) else f"{text[:limit]}..."


@dataclass(frozen=True)
class MethodParams:
    """Base of every method's parameter dataclass (fields declared with :func:`param`)."""

    def check(self) -> str | None:
        """Cross-field rules of a method; return what is wrong (None when fine). Override where needed."""
        return None

    @classmethod
    def from_dict(cls: type[P], data: dict[str, Any] | None, method: str) -> P:
        """Validate ``data`` (missing keys take their defaults) and build the dataclass.

        Raises:
            ParamError: naming ``method``, the key, the value and the allowed values or type.
        """
        data = dict(data or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ParamError(
                f"{method}: unknown parameter(s) {', '.join(unknown)}; "
                f"{method} has {', '.join(fields)} (see `edgead info --method {method}`)"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            field = fields[name]
            try:
                value = _coerce(value, hints[name])
            except TypeError as err:
                raise ParamError(f"{method}: parameter {name}={_shown(value)} must be {err}") from None
            if name.endswith(CANDIDATES_SUFFIX) and isinstance(value, list):
                value = distinct_candidates(value)
                if len(value) > MAX_CANDIDATES:
                    raise ParamError(
                        f"{method}: parameter {name} has {len(value)} distinct candidates; at most {MAX_CANDIDATES} "
                        "(each is a pseudo-validation pass): give a shorter list"
                    )
            choices = field.metadata.get("choices")
            if choices and value not in choices:
                raise ParamError(
                    f"{method}: parameter {name}={_shown(value)} must be one of {', '.join(repr(c) for c in choices)}"
                )
            check = field.metadata.get("check")
            problem = check(value) if check is not None and value is not None else None
            if problem:
                raise ParamError(f"{method}: parameter {name}={_shown(value)} must be {problem}")
            kwargs[name] = value
        params = cls(**kwargs)
        problem = params.check()
        if problem:
            raise ParamError(f"{method}: {problem}")
        return params

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly values of every field (what ``config.json`` stores as ``method_params``)."""
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One row per field: name, default, meaning, paper reference, allowed values, where the default
        comes from (``origin``, ``why``)."""
        rows = []
        for field in dataclasses.fields(cls):
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            rows.append(
                {
                    "name": field.name,
                    "default": default,
                    "doc": field.metadata.get("doc", ""),
                    "ref": field.metadata.get("ref", ""),
                    "choices": field.metadata.get("choices"),
                    "origin": field.metadata.get("origin"),
                    "why": field.metadata.get("why", ""),
                }
            )
        return rows


__all__ = [
    "FIXED_SEED",
    "MAX_CANDIDATES",
    "ORIGINS",
    "MethodParams",
    "ParamError",
    "at_least",
    "candidate_notes",
    "distinct_candidates",
    "open_unit",
    "param",
    "positive",
]
