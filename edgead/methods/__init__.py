"""Detection methods: one folder each, found by name through this registry.

Importing this package does not import torch; ``get_method`` imports the method's module lazily.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgead.methods.base import Method

#: Every method of the product, with its paper. ``module:Class`` where implemented, None where not yet.
METHODS: dict[str, tuple[str | None, str]] = {
    "score-resilience": ("edgead.methods.score_resilience.method:ScoreResilience", "Shin et al., ICCV 2023"),
    "score-tscale": ("edgead.methods.score_tscale.method:ScoreTScale", "Teng et al. (Score-DD)"),
    "lafite": (None, "Yin et al., 2023"),
    "mdps": (None, "Wu et al., 2024"),
    "gaussian": ("edgead.methods.gaussian.method:GaussianOPCA", "Wang et al., 2022"),
}


def implemented_methods() -> list[str]:
    return [name for name, (target, _) in METHODS.items() if target is not None]


def get_method(name: str) -> type[Method]:
    """Return the method class registered under ``name``, with a clear error for unknown names."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    target, _ = METHODS[name]
    if target is None:
        raise NotImplementedError(
            f"method {name!r} is planned but not in this release; available: {', '.join(implemented_methods())}"
        )
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_method(run_dir: Path) -> Method:
    """Rebuild a fitted method from its run directory (``config.json`` + weights)."""
    from edgead.config import RunConfig

    config = RunConfig.load(run_dir)
    return get_method(config.method).load(Path(run_dir), config)
