"""Typed, self-checking configs for the shared decoder and the native early-fusion model.

A config is a plain dataclass: YAML (LightningCLI / jsonargparse) fills it, ``__post_init__``
refuses contradictory or impossible settings at start-up with a message naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

POSITIONS = ("mrope", "1d")
ATTENTION = ("sdpa", "flex", "auto")
AUX_LOSSES = ("none",)


def default_mrope_sections(head_dim: int) -> tuple[int, int, int]:
    """Split the ``head_dim // 2`` rotary frequency pairs into (t, h, w) like Qwen2-VL.

    Qwen2-VL uses (16, 24, 24) of 64 pairs: a quarter to time, three eighths each to height and
    width. ``head_dim=32`` -> (4, 6, 6); ``head_dim=64`` -> (8, 12, 12); ``head_dim=128`` -> (16, 24, 24).
    """
    n = head_dim // 2
    hw = (3 * n) // 8
    return (n - 2 * hw, hw, hw)


@dataclass
class DecoderConfig:
    """The decoder every fusion arm shares (RMSNorm, SwiGLU, GQA, optional QK-norm, RoPE).

    Args:
        vocab_size: size of the token vocabulary (and of the output head).
        dim: model width ``D``.
        n_layers: number of transformer blocks.
        n_heads: query heads; ``head_dim = dim // n_heads``.
        n_kv_heads: key/value heads (GQA); must divide ``n_heads``. ``None`` -> ``n_heads``.
        ffn_hidden: the **final** SwiGLU hidden width (no 2/3 rule or rounding is applied).
        max_seq_len: longest sequence (packed row, or prompt + generation) the model accepts.
        rope_base: RoPE frequency base.
        positions: ``"mrope"`` rotates (t, h, w) sections of the head by their own position;
            ``"1d"`` rotates every pair by the ``t`` component only (the flat-position ablation).
        mrope_sections: frequency pairs given to (t, h, w); must sum to ``head_dim // 2``.
            ``None`` -> Qwen2-VL's proportions, see :func:`default_mrope_sections`.
        qk_norm: RMSNorm over ``head_dim`` on queries and keys, before RoPE (Chameleon).
        tie_embeddings: the output head reuses the token embedding matrix.
        norm_eps: RMSNorm epsilon.
        attention: ``"sdpa"`` (boolean (B, S, S) mask), ``"flex"`` (``flex_attention`` BlockMask;
            compiled on CUDA, eager on CPU) or ``"auto"`` (flex on CUDA, sdpa elsewhere).
        init_std: std of the normal init of embeddings and linear layers; the output projections
            of attention and MLP get ``init_std / sqrt(2 * n_layers)`` (GPT-2).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    positions: Literal["mrope", "1d"] = "mrope"
    mrope_sections: tuple[int, int, int] | None = None
    qk_norm: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    attention: Literal["sdpa", "flex", "auto"] = "auto"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.dim
        if self.n_kv_heads <= 0 or self.ffn_hidden <= 0:
            raise ValueError(
                f"DecoderConfig.n_kv_heads and ffn_hidden must be positive, got {self.n_kv_heads}, {self.ffn_hidden}"
            )
        if self.dim % self.n_heads != 0:
            raise ValueError(f"DecoderConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"DecoderConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"DecoderConfig head_dim = dim // n_heads = {self.head_dim} must be even for RoPE")
        if self.positions not in POSITIONS:
            raise ValueError(f"DecoderConfig.positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"DecoderConfig.attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.mrope_sections is None:
            self.mrope_sections = default_mrope_sections(self.head_dim)
        self.mrope_sections = tuple(int(s) for s in self.mrope_sections)
        if len(self.mrope_sections) != 3 or any(s < 0 for s in self.mrope_sections):
            raise ValueError(
                f"DecoderConfig.mrope_sections must be three non-negative ints (t, h, w), got {self.mrope_sections}"
            )
        if sum(self.mrope_sections) != self.head_dim // 2:
            raise ValueError(
                f"DecoderConfig.mrope_sections {self.mrope_sections} sum to {sum(self.mrope_sections)}, "
                f"but head_dim // 2 = {self.head_dim // 2} frequency pairs must be split"
            )
        if self.rope_base <= 1.0:
            raise ValueError(f"DecoderConfig.rope_base must be > 1, got {self.rope_base}")
        if self.norm_eps <= 0.0 or self.init_std <= 0.0:
            raise ValueError("DecoderConfig.norm_eps and init_std must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class NativeConfig:
    """Native early fusion: patches are embedded by one linear layer per modality, inside the decoder.

    Args:
        decoder: the shared decoder.
        patch: patch side ``P``; an image patch has ``3 * P * P`` values, an audio patch ``P * P``.
        image_channels: channels of an image patch (3 for RGB).
        modality_embedding: add a learned (3, D) embedding of the slot's modality to every slot.
        pixel_shuffle: image slots carry 2×2 patches (``data.pixel_shuffle``, linked by the CLI): the
            image projection takes ``4 * image_channels * P * P`` values.
        patch_projections: build the image and audio patch projections. ``False`` builds none:
            the model then takes text slots only (the text-LM stage, ``data.media: marker | drop``),
            and its parameter counts hold no weight it never uses.
        aux_loss: reserved for auxiliary objectives; only ``"none"`` exists.
    """

    decoder: DecoderConfig
    patch: int = 8
    image_channels: int = 3
    modality_embedding: bool = True
    patch_projections: bool = True
    aux_loss: Literal["none"] = "none"
    pixel_shuffle: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.decoder, dict):  # YAML / plain-dict construction
            self.decoder = DecoderConfig(**self.decoder)
        if not isinstance(self.decoder, DecoderConfig):
            raise ValueError(f"NativeConfig.decoder must be a DecoderConfig, got {type(self.decoder).__name__}")
        if not isinstance(self.patch, int) or self.patch <= 0:
            raise ValueError(f"NativeConfig.patch must be a positive int, got {self.patch!r}")
        if not isinstance(self.image_channels, int) or self.image_channels <= 0:
            raise ValueError(f"NativeConfig.image_channels must be a positive int, got {self.image_channels!r}")
        if self.aux_loss not in AUX_LOSSES:
            raise ValueError(f"NativeConfig.aux_loss must be one of {AUX_LOSSES}, got {self.aux_loss!r}")

    @property
    def image_patch_dim(self) -> int:
        return self.image_channels * self.patch * self.patch * (4 if self.pixel_shuffle else 1)

    @property
    def audio_patch_dim(self) -> int:
        return self.patch * self.patch
