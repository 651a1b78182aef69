"""Time-conditioned score U-Net built only from export-friendly operators.

The network is a Ronneberger-style encoder/decoder with BigGAN/DDPM residual blocks and one skip
connection per resolution level. Every operator maps onto plain ONNX opset-18 nodes that TensorRT
supports: ``Conv2d``, ``GroupNorm``, ``SiLU``, ``Linear``, self-attention written with
``torch.matmul`` and ``softmax``, nearest 2x upsampling (``edgead.nn.filters.resize``), strided
convolutions for downsampling and ``torch.cat`` skips. ``forward`` has no data-dependent control
flow and never writes into its inputs; the time embedding is computed inside the graph from ``t``.

Layout for ``L = len(channel_mult)`` levels, widths ``c_l = base_channels * channel_mult[l]``:

- ``conv_in`` (3x3, or 1x1 with ``io_kernel = 1``, ``in_channels -> c_0``);
- encoder level ``l``: ``num_res_blocks`` residual blocks (+ self-attention after each one when
  ``l in attention_levels``), tapped as ``enc{l}``, then a stride-2 3x3 conv unless ``l = L - 1``;
- middle, at the lowest resolution: ``mid_blocks`` residual blocks (attention after the first one when
  the lowest level has attention), tapped as ``mid`` (``mid_blocks = 0`` makes ``mid`` equal
  ``enc{L-1}``, the Ronneberger bottleneck);
- decoder level ``l = L-2 .. 0``: nearest 2x upsampling, concatenation with ``enc{l}``,
  ``num_res_blocks`` residual blocks of width ``d_l = base_channels * decoder_mult[l]`` (+ attention),
  tapped as ``dec{l}``. The lowest level has no decoder block: its output is ``mid``;
- head: GroupNorm, SiLU, 3x3 conv to ``out_channels``; optionally divided by ``sigma(t)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.nn.filters import resize

__all__ = ["ScoreUNet", "UNetConfig", "count_parameters"]

_TIME_EMBEDDINGS = ("fourier", "sinusoidal")
_OUTPUT_SCALINGS = ("none", "sigma")
_FOURIER_SCALE = 16.0

_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests: 128,491 parameters (RGB); attention only at the 1/8 level so exports cover it.
    "tiny": {
        "base_channels": 8,
        "channel_mult": (1, 2, 4, 4),
        "num_res_blocks": 1,
        "attention_levels": (3,),
        "embed_dim": 32,
        "mid_blocks": 1,
        "groups": 4,
    },
    # Edge model: 3,552,227 parameters (RGB), attention at the 1/8 level only.
    "small": {
        "base_channels": 32,
        "channel_mult": (1, 2, 4, 4),
        "num_res_blocks": 2,
        "attention_levels": (3,),
        "embed_dim": 128,
        "mid_blocks": 2,
    },
    # The SPR authors' network: a bilinear Ronneberger U-Net (DoubleConv blocks, widths
    # 64-128-256-512-512, the last being 1024 // 2) with a 256-d Gaussian Fourier embedding, ~17.8 M
    # parameters. Matched: one residual block (= two 3x3 convs, the DoubleConv) per level, no extra
    # middle block (the 512-wide 1/16 level is the bottleneck) and its halving decoder widths
    # (512+512 -> 256, 256+256 -> 128, 128+128 -> 64, 64+64 -> 64). Not matched: stride-2 convs
    # replace max-pooling (+3.1 M), each decoder block's inner conv has the block's output width
    # instead of half its input width (-3.4 M), GroupNorm replaces BatchNorm.
    # Result: 17,737,539 parameters for RGB (-0.4 % of 17.8 M).
    "paper": {
        "base_channels": 64,
        "channel_mult": (1, 2, 4, 8, 8),
        "num_res_blocks": 1,
        "attention_levels": (),
        "embed_dim": 256,
        "mid_blocks": 0,
        "decoder_mult": (1, 1, 2, 4),
    },
}


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`ScoreUNet`.

    Attributes:
        base_channels: Width ``c_0`` of the full-resolution level.
        channel_mult: Width multiplier per encoder level; level 0 is full resolution and each further
            level halves the spatial size.
        num_res_blocks: Residual blocks per encoder and per decoder level.
        attention_levels: Level indices that get self-attention after each residual block.
        embed_dim: Width of the time embedding (even).
        in_channels: Input image channels.
        out_channels: Output channels; ``None`` means ``in_channels`` (a score has the image's shape).
        time_embedding: ``"fourier"`` (Gaussian Fourier projection of ``t`` with fixed random weights,
            scale 16, Song et al. 2021) or ``"sinusoidal"`` (DDPM transformer embedding of ``1000 t``).
        groups: GroupNorm groups; must divide every normalised width.
        dropout: Dropout inside the residual blocks.
        output_scaling: ``"none"`` or ``"sigma"`` (divide the output by the ``sigma`` passed to forward).
        fourier_seed: Seed of the fixed Fourier weights.
        mid_blocks: Residual blocks in the middle (lowest resolution); 0 leaves ``mid = enc{L-1}``.
        decoder_mult: Width multiplier of the decoder levels ``0 .. L-2``; ``None`` means
            ``channel_mult[:-1]``.
        io_kernel: Kernel size of ``conv_in`` and ``conv_out`` (3, or 1 for many-channel inputs such as
            LafitE's feature tensors, where 3x3 convolutions in and out of ~200 channels would dominate
            the cost).
    """

    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[int, ...]
    embed_dim: int
    in_channels: int = 3
    out_channels: int | None = None
    time_embedding: str = "fourier"
    groups: int = 8
    dropout: float = 0.0
    output_scaling: str = "none"
    fourier_seed: int = 0
    mid_blocks: int = 2
    decoder_mult: tuple[int, ...] | None = None
    io_kernel: int = 3

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_levels = tuple(int(level) for level in self.attention_levels)
        if self.decoder_mult is not None:
            self.decoder_mult = tuple(int(m) for m in self.decoder_mult)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        levels = len(self.channel_mult)
        if levels < 1 or self.num_res_blocks < 1 or self.mid_blocks < 0:
            raise ValueError("need at least one level, num_res_blocks >= 1 and mid_blocks >= 0")
        if any(not 0 <= level < levels for level in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} outside levels 0..{levels - 1}")
        if len(self.decoder_widths) != levels - 1:
            raise ValueError(f"decoder_mult needs {levels - 1} entries (levels 0..{levels - 2})")
        if self.io_kernel not in (1, 3):
            raise ValueError(f"io_kernel must be 1 or 3, got {self.io_kernel}")
        if self.time_embedding not in _TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {_TIME_EMBEDDINGS}, got {self.time_embedding!r}")
        if self.output_scaling not in _OUTPUT_SCALINGS:
            raise ValueError(f"output_scaling must be one of {_OUTPUT_SCALINGS}, got {self.output_scaling!r}")
        if self.embed_dim < 2 or self.embed_dim % 2:
            raise ValueError(f"embed_dim must be even and >= 2, got {self.embed_dim}")
        for width in (*self.widths, *self.decoder_widths):
            if width < 1 or width % self.groups:
                raise ValueError(
                    f"GroupNorm groups={self.groups} must divide every width, but a level has {width} "
                    f"channels (widths {self.widths}, decoder widths {self.decoder_widths})"
                )

    @property
    def widths(self) -> tuple[int, ...]:
        """Encoder width ``c_l`` of each level."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """Decoder width ``d_l`` of levels ``0 .. L-2``."""
        mult = self.channel_mult[:-1] if self.decoder_mult is None else self.decoder_mult
        return tuple(self.base_channels * m for m in mult)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, in_channels: int = 3) -> UNetConfig:
        """Named configuration: ``"tiny"`` (CPU tests), ``"small"`` (edge) or ``"paper"`` (SPR network)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; choose from {sorted(_PRESETS)}")
        return cls(in_channels=in_channels, **_PRESETS[name])


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _is_tracing() -> bool:
    """True while TorchScript tracing, ONNX export, ``torch.export`` or ``torch.compile`` runs."""
    is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return bool(
        torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or is_exporting()
    )


def _as_batch(value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` as a 1-D tensor with the dtype and device of ``like`` (a 0-d tensor or float gives (1,))."""
    if isinstance(value, Tensor):
        return value.to(dtype=like.dtype, device=like.device).reshape(-1)
    return torch.full((1,), float(value), dtype=like.dtype, device=like.device)


class GaussianFourierEmbedding(nn.Module):
    """Gaussian Fourier features ``[sin(2 pi t W), cos(2 pi t W)]``, ``W ~ N(0, 16^2)`` fixed.

    Song et al. 2021 ("Score-Based Generative Modeling through SDEs", appendix H.1, after
    Tancik et al. 2020). ``W`` is a persistent buffer, so it travels with the weights.
    """

    keep_fp32 = True  # sin / cos of 2 pi t W with |W| ~ 16: FP16 exports keep this module FP32

    def __init__(self, embed_dim: int, scale: float = _FOURIER_SCALE, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(embed_dim // 2, generator=generator) * scale)

    def forward(self, t: Tensor) -> Tensor:
        """Embed ``t`` of shape (B,) into (B, embed_dim)."""
        proj = t[:, None] * self.weight[None, :] * (2.0 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=1)


class SinusoidalEmbedding(nn.Module):
    """DDPM timestep embedding of ``1000 t`` (Ho et al. 2020, after Vaswani et al. 2017, sec. 3.5)."""

    keep_fp32 = True  # sin / cos of arguments up to 1000: FP16 exports keep this module FP32

    def __init__(self, embed_dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        half = embed_dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1)
        self.register_buffer("freqs", torch.exp(exponent), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        """Embed ``t`` of shape (B,) into (B, embed_dim)."""
        args = (t[:, None] * 1000.0) * self.freqs[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, + Linear(time embedding), GroupNorm-SiLU-Dropout-Conv, + skip (DDPM/BigGAN)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention ``softmax(Q K^T / sqrt(d)) V`` over pixels (Vaswani et al. 2017, eq. 1).

    Written with ``torch.matmul`` so the ONNX graph holds MatMul/Softmax nodes that every backend fuses.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.scale = 1.0 / math.sqrt(channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(dim=1)
        attn = torch.softmax(torch.matmul(q.transpose(1, 2), k) * self.scale, dim=-1)  # (B, HW, HW)
        out = torch.matmul(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(out)


class _Level(nn.Module):
    """Residual blocks of one level, each optionally followed by self-attention."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attention: bool, cfg: UNetConfig) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, cfg.embed_dim, cfg.groups, cfg.dropout)
            for i in range(n_blocks)
        )
        self.attn = nn.ModuleList(
            AttentionBlock(out_ch, cfg.groups) if attention else nn.Identity() for _ in range(n_blocks)
        )

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        for res, attn in zip(self.res, self.attn, strict=True):
            x = attn(res(x, temb))
        return x


class ScoreUNet(nn.Module):
    """Time-conditioned U-Net ``s_theta(x_t, t)`` for score / noise prediction.

    Args:
        config: Architecture; see :class:`UNetConfig` and the module docstring for the layout.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        widths, dec_widths = cfg.widths, cfg.decoder_widths
        levels = len(widths)
        if cfg.time_embedding == "fourier":
            embed: nn.Module = GaussianFourierEmbedding(cfg.embed_dim, seed=cfg.fourier_seed)
        else:
            embed = SinusoidalEmbedding(cfg.embed_dim)
        self.time_embed = nn.Sequential(
            embed, nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.SiLU(), nn.Linear(cfg.embed_dim, cfg.embed_dim)
        )
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], cfg.io_kernel, padding=cfg.io_kernel // 2)
        self.encoder = nn.ModuleList()
        self.down = nn.ModuleList()
        for level, width in enumerate(widths):
            in_ch = widths[max(level - 1, 0)]
            attention = level in cfg.attention_levels
            self.encoder.append(_Level(in_ch, width, cfg.num_res_blocks, attention, cfg))
            if level < levels - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        bottom = widths[-1]
        self.mid = nn.ModuleList(
            ResBlock(bottom, bottom, cfg.embed_dim, cfg.groups, cfg.dropout) for _ in range(cfg.mid_blocks)
        )
        mid_attention = cfg.mid_blocks > 0 and (levels - 1) in cfg.attention_levels
        self.mid_attn = AttentionBlock(bottom, cfg.groups) if mid_attention else nn.Identity()
        self.decoder = nn.ModuleList()  # ordered from level L-2 up to level 0
        in_ch = bottom
        for level in reversed(range(levels - 1)):
            attention = level in cfg.attention_levels
            self.decoder.append(_Level(in_ch + widths[level], dec_widths[level], cfg.num_res_blocks, attention, cfg))
            in_ch = dec_widths[level]
        self.norm_out = nn.GroupNorm(cfg.groups, in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.out_channels or cfg.in_channels, cfg.io_kernel, padding=cfg.io_kernel // 2)

    @property
    def downsampling_factor(self) -> int:
        """Spatial sizes must be divisible by this: ``2 ** (len(channel_mult) - 1)``."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def feature_names(self) -> dict[str, tuple[int, int]]:
        """Feature taps in forward order, as ``name -> (channels, downsampling factor)``."""
        widths, dec_widths = self.config.widths, self.config.decoder_widths
        bottom = len(widths) - 1
        names = {f"enc{level}": (width, 2**level) for level, width in enumerate(widths)}
        names["mid"] = (widths[-1], 2**bottom)
        for level in reversed(range(bottom)):
            names[f"dec{level}"] = (dec_widths[level], 2**level)
        return names

    def feature_shapes(self, image_size: int | tuple[int, int]) -> dict[str, tuple[int, int, int]]:
        """Per-sample ``(C, H, W)`` of each feature tap for an ``image_size`` input."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        return {name: (ch, height // f, width // f) for name, (ch, f) in self.feature_names().items()}

    def forward(
        self, x: Tensor, t: Tensor, sigma: Tensor | None = None, return_features: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Score (or noise) estimate at ``(x_t, t)``.

        Args:
            x: Noisy images (B, C, H, W); H and W divisible by :attr:`downsampling_factor`.
            t: Continuous time in (0, 1], shape (B,) or 0-d (broadcast to B).
            sigma: Noise level sigma(t), (B,) or 0-d; required when ``output_scaling == "sigma"``, where
                the output is divided by it (NCSN++ style ``s_theta = F_theta / sigma(t)``).
            return_features: Also return the feature taps ``enc{l}``, ``mid`` and ``dec{l}``.

        Returns:
            The output (B, out_channels, H, W), and the feature dict when ``return_features`` is true.
        """
        if not _is_tracing():
            self._check_input(x)
        scaled = self.config.output_scaling == "sigma"
        if scaled and sigma is None:
            raise ValueError('output_scaling="sigma" needs the sigma(t) argument')
        t = _as_batch(t, x).expand(x.shape[0])
        temb = self.time_embed(t)
        features: dict[str, Tensor] = {}
        skips: list[Tensor] = []
        h = self.conv_in(x)
        for level, block in enumerate(self.encoder):
            h = block(h, temb)
            features[f"enc{level}"] = h
            skips.append(h)
            if level < len(self.down):
                h = self.down[level](h)
        for i, res in enumerate(self.mid):
            h = res(h, temb)
            if i == 0:
                h = self.mid_attn(h)
        features["mid"] = h
        for level, block in zip(reversed(range(len(self.decoder))), self.decoder, strict=True):
            h = resize(h, (2 * h.shape[-2], 2 * h.shape[-1]), "nearest")  # = F.interpolate(scale_factor=2)
            h = block(torch.cat([h, skips[level]], dim=1), temb)
            features[f"dec{level}"] = h
        out = self.conv_out(F.silu(self.norm_out(h)))
        if scaled:
            out = out / _as_batch(sigma, out).reshape(-1, 1, 1, 1)
        return (out, features) if return_features else out

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        factor = self.downsampling_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be divisible by {factor} (2 ** (len(channel_mult) - 1))"
            )
