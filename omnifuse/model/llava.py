"""LLaVA: frozen contrastive encoders, a projector per modality, the pretrained decoder.

    image_patches ─► group per image ─► image_encoder (frozen, block -2, no CLS) ─► image_projector ─┐
    audio_patches ─► group per clip  ─► audio_encoder (frozen, block -2, no CLS) ─► audio_projector ─┤
    tokens ──────────────────────────► tok_embeddings ─► overwrite IMAGE / AUDIO slots ◄────────────┘
                                                                └─► Decoder (1-D RoPE, block-causal) ─► logits

Every patch slot of the stream gets one projected encoder feature: the same slots the native arm
fills with raw patches, so both arms read the same packed batch (docs/ARCHITECTURE.md). There is
no modality embedding: the decoder comes from a text LM trained without one, so a text slot's
embedding is ``tok_embeddings(token)`` exactly as the LM saw it. The encoders are frozen in every
stage (LLaVA-1.5): their parameters never require grad and their features are computed without
autograd; which of projectors and decoder train is the training recipe's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from omnifuse.model.arm import FusionArm
from omnifuse.model.config import DecoderConfig
from omnifuse.model.decoder import Decoder
from omnifuse.model.encoders import EncoderConfig, PatchEncoder, checked_encoder_field
from omnifuse.model.media import group_patches, media_layout, scatter_media, ungroup
from omnifuse.tokenizers.stream import AUDIO, IMAGE

PROJECTORS = ("mlp2x_gelu", "linear")


@dataclass
class LLaVAConfig:
    """The LLaVA arm.

    Args:
        decoder: the shared decoder (weights from the text-LM stage).
        image_encoder: the frozen image encoder (the CLIP stage's config). ``None`` only until the
            training recipe reads it from the stage run; :class:`LLaVAFusion` refuses ``None``.
        audio_encoder: the frozen spectrogram encoder (the CLAP stage's config), same rule.
        patch: patch side ``P``; an image patch has ``image_channels * P * P`` values, an audio patch ``P * P``.
        image_channels: channels of an image patch (3 for RGB).
        projector: ``"mlp2x_gelu"`` (LLaVA-1.5: Linear -> GELU -> Linear) or ``"linear"`` (LLaVA-1).
        feature_layer: the encoder block whose output is projected (Python index over blocks;
            -2 = penultimate, LLaVA-1.5's ``mm_vision_select_layer``).
    """

    decoder: DecoderConfig
    image_encoder: EncoderConfig | None = None
    audio_encoder: EncoderConfig | None = None
    patch: int = 8
    image_channels: int = 3
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    feature_layer: int = -2

    def __post_init__(self) -> None:
        if isinstance(self.decoder, dict):  # YAML / plain-dict construction
            self.decoder = DecoderConfig(**self.decoder)
        if not isinstance(self.decoder, DecoderConfig):
            raise ValueError(f"LLaVAConfig.decoder must be a DecoderConfig, got {type(self.decoder).__name__}")
        for name in ("patch", "image_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LLaVAConfig.{name} must be a positive int, got {value!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"LLaVAConfig.projector must be one of {PROJECTORS}, got {self.projector!r}")
        for name, want in (("image_encoder", self.image_patch_dim), ("audio_encoder", self.audio_patch_dim)):
            value = checked_encoder_field(
                "LLaVAConfig", name, getattr(self, name), want, self.patch, self.feature_layer, "feature_layer"
            )
            setattr(self, name, value)

    # a plain dataclass (no shared base with NativeConfig): jsonargparse would otherwise treat it as
    # a subclass type wanting class_path/init_args, and train.py's links into it would break
    @property
    def image_patch_dim(self) -> int:
        return self.image_channels * self.patch * self.patch

    @property
    def audio_patch_dim(self) -> int:
        return self.patch * self.patch


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Encoder features ``(N, in_dim)`` -> decoder slots ``(N, out_dim)``: LLaVA-1.5's
    ``mlp2x_gelu`` (Linear -> exact GELU -> Linear) or LLaVA-1's single ``linear`` layer;
    PyTorch's default Linear init, as LLaVA."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"projector must be one of {PROJECTORS}, got {kind!r}")


class LLaVAFusion(FusionArm, nn.Module):
    """The LLaVA arm; see the module docstring. Same calls as :class:`~omnifuse.model.NativeFusion`:
    ``forward``, ``loss`` and ``generate`` come from :class:`~omnifuse.model.arm.FusionArm` (the arm
    defines ``embed``).

    Attributes: ``decoder``, ``image_encoder`` / ``audio_encoder`` (frozen
    :class:`~omnifuse.model.encoders.PatchEncoder`), ``image_projector`` / ``audio_projector``.
    """

    def __init__(self, cfg: LLaVAConfig):
        super().__init__()
        for name in ("image_encoder", "audio_encoder"):
            if getattr(cfg, name) is None:
                raise ValueError(
                    f"LLaVAConfig.{name} is None: the encoder's config comes from its stage run "
                    "(omnifuse.training.llava.LLaVALM reads it)"
                )
        self.cfg = cfg
        d = cfg.decoder.dim
        self.decoder = Decoder(cfg.decoder)
        self.image_encoder = PatchEncoder(cfg.image_encoder).requires_grad_(False)
        self.audio_encoder = PatchEncoder(cfg.audio_encoder).requires_grad_(False)
        self.image_projector = build_projector(cfg.projector, self.image_encoder.width, d)
        self.audio_projector = build_projector(cfg.projector, self.audio_encoder.width, d)

    def encoders(self) -> list[PatchEncoder]:
        return [self.image_encoder, self.audio_encoder]

    def projectors(self) -> list[nn.Module]:
        return [self.image_projector, self.audio_projector]

    def media_features(
        self, tokens: torch.Tensor, modality: torch.Tensor, patches: torch.Tensor | None, kind: int
    ) -> torch.Tensor:
        """The ``kind`` (IMAGE or AUDIO) patch slots of ``tokens, modality (B, L)`` -> projected
        encoder features ``(N, D)`` in slot order. Each item (an image, a clip) goes through the
        frozen encoder as a whole; ``patches (N, patch_dim)`` or None (no such slots)."""
        encoder, projector = (
            (self.image_encoder, self.image_projector) if kind == IMAGE else (self.audio_encoder, self.audio_projector)
        )
        if patches is None:
            patches = self.decoder.tok_embeddings.weight.new_zeros(0, encoder.cfg.patch_dim)
        layout = media_layout(tokens, modality, kind)
        grouped, grid, mask = group_patches(patches, layout)  # (M, n, patch_dim), (M, n, 2), (M, n)
        if layout.n_items:
            with torch.no_grad():  # frozen: no graph through the encoder
                feats = encoder.patch_features(grouped, grid, mask, layer=self.cfg.feature_layer)  # (M, n, d_enc)
            feats = ungroup(feats, mask)  # (N, d_enc)
        else:
            feats = patches.new_zeros(0, encoder.width)
        # the projector runs even on no features, so every trainable parameter is in each step's graph (DDP)
        return projector(feats)  # (N, D)

    def embed(
        self,
        tokens: torch.Tensor,
        modality: torch.Tensor,
        image_patches: torch.Tensor | None = None,
        audio_patches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Slots -> input embeddings ``(B, L, D)``: token embeddings, with the IMAGE / AUDIO slots
        overwritten by projected encoder features (:meth:`media_features`)."""
        h = self.decoder.embed(tokens)  # (B, L, D)
        h = scatter_media(h, modality == IMAGE, self.media_features(tokens, modality, image_patches, IMAGE), "image")
        h = scatter_media(h, modality == AUDIO, self.media_features(tokens, modality, audio_patches, AUDIO), "audio")
        return h  # (B, L, D)

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``embed(tokens, TEXT everywhere)`` without running the encoders on no media: ``(B, S, D)``."""
        return self.decoder.embed(tokens)

    # ---- accounting ------------------------------------------------------------------------

    def projector_params(self) -> tuple[int, int]:
        """Parameters of the (image, audio) projectors: each projected feature multiplies through one."""
        return tuple(sum(p.numel() for p in proj.parameters()) for proj in self.projectors())

    def encoder_forward_flops(self, tokens: torch.Tensor, modality: torch.Tensor) -> int:
        """Forward FLOPs of the frozen encoders over every image and clip of the batch
        (:meth:`PatchEncoder.forward_flops` per item; it counts every block and the pooled head,
        an upper bound on the ``feature_layer`` blocks actually run)."""
        total = 0
        for kind, encoder in ((IMAGE, self.image_encoder), (AUDIO, self.audio_encoder)):
            counts = media_layout(tokens, modality, kind).counts
            for n, k in zip(*torch.unique(counts, return_counts=True)):
                total += int(k) * encoder.forward_flops(int(n))
        return total
