"""Hyperparameters that every method on a pretrained backbone declares alike (gaussian, lafite, mdps)."""

from __future__ import annotations

from typing import Any

from edgead.methods.params import param
from edgead.nn.backbones import INPUT_SCALINGS


def input_scaling_param() -> Any:
    """``input_scaling``: how the shared preprocessing's output is rescaled for the backbone; ``auto`` resolves
    to what the backbone's weights were trained on (``edgead.nn.backbones.resolve_input_scaling``) and the
    fitted run records the resolved value."""
    return param(
        "auto",
        "input scaling the backbone sees: auto = what its weights were trained on ([-1, 1] for the bundled "
        "TensorFlow Lite0 weights), imagenet (mean/std) or inception ([-1, 1]); a fitted run records the "
        "resolved value",
        "ours",
        choices=("auto", *INPUT_SCALINGS),
        origin="backbone",
        why="the scaling the backbone's weights were trained with (the TF Lite0 release: (x - 127) / 128)",
    )
