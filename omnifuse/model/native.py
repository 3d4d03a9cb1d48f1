"""Native early fusion: one decoder over one stream of text tokens, image and audio patches.

    tokens ──► tok_embeddings ─┐
    image_patches ─► image_proj ─► overwrite IMAGE slots ─┐
    audio_patches ─► audio_proj ─► overwrite AUDIO slots ─┤
                                  + modality_embeddings[modality]
                                                          └─► Decoder (M-RoPE, block-causal) ─► logits

Everything trains from scratch in one stage; the only vision/audio "encoder" is a linear layer.
With ``patch_projections=False`` and ``modality_embedding=False`` (the text-LM stage) there is
neither, and the model is exactly the decoder over token embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from omnifuse.model.arm import FusionArm
from omnifuse.model.config import NativeConfig
from omnifuse.model.decoder import Decoder
from omnifuse.model.media import scatter_media
from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT


class NativeFusion(FusionArm, nn.Module):
    """The native early-fusion model; see the module docstring and docs/ARCHITECTURE.md.
    ``forward``, ``loss`` and ``generate`` (greedy, KV-cached) come from
    :class:`~omnifuse.model.arm.FusionArm`; this class defines ``embed``."""

    def __init__(self, cfg: NativeConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder.dim
        self.decoder = Decoder(cfg.decoder)
        self.image_proj = nn.Linear(cfg.image_patch_dim, d) if cfg.patch_projections else None
        self.audio_proj = nn.Linear(cfg.audio_patch_dim, d) if cfg.patch_projections else None
        self.modality_embeddings = nn.Embedding(3, d) if cfg.modality_embedding else None
        for module in (self.image_proj, self.audio_proj, self.modality_embeddings):
            if module is not None:
                nn.init.normal_(module.weight, std=cfg.decoder.init_std)
        for proj in (self.image_proj, self.audio_proj):
            if proj is not None:
                nn.init.zeros_(proj.bias)

    def embed(
        self,
        tokens: torch.Tensor,
        modality: torch.Tensor,
        image_patches: torch.Tensor | None = None,
        audio_patches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Slots -> input embeddings ``(B, L, D)``. ``image_patches (Ni, 3P²)`` and
        ``audio_patches (Na, P²)`` fill the IMAGE / AUDIO slots in row-major order of ``(B, L)``;
        ``None`` means no such slots. Without patch projections, media slots are a ValueError."""
        h = self.decoder.embed(tokens)  # (B, L, D)
        if not self.cfg.patch_projections:
            self._check_text_only(modality, image_patches, audio_patches)
        else:
            h = self._embed_media(h, modality, image_patches, audio_patches)  # (B, L, D)
        if self.modality_embeddings is not None:
            h = h + self.modality_embeddings(modality).to(h.dtype)  # (B, L, D)
        return h

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``embed(tokens, TEXT everywhere)`` without the media work (a decode step): ``(B, S, D)``."""
        h = self.decoder.embed(tokens)  # (B, S, D)
        if self.modality_embeddings is not None:
            h = h + self.modality_embeddings.weight[TEXT].to(h.dtype)  # (B, S, D)
        return h

    def _embed_media(self, h, modality, image_patches, audio_patches) -> torch.Tensor:
        if image_patches is None:
            image_patches = h.new_zeros(0, self.cfg.image_patch_dim)
        if audio_patches is None:
            audio_patches = h.new_zeros(0, self.cfg.audio_patch_dim)
        h = scatter_media(h, modality == IMAGE, self.image_proj(image_patches), "image")  # (B, L, D)
        return scatter_media(h, modality == AUDIO, self.audio_proj(audio_patches), "audio")  # (B, L, D)

    @staticmethod
    def _check_text_only(modality, image_patches, audio_patches) -> None:
        if torch.compiler.is_compiling():  # the check syncs; eager runs (and tests) do it
            return
        n_media = int((modality != TEXT).sum())
        n_patches = sum(int(p.shape[0]) for p in (image_patches, audio_patches) if p is not None)
        if n_media or n_patches:
            raise ValueError(
                f"the batch has {n_media} media slots and {n_patches} patches, but NativeConfig.patch_projections "
                "is false (a text-only model): give it text slots only (data.media: marker or drop)"
            )

    # ---- accounting ------------------------------------------------------------------------

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters (tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per slot: ``6 * N + 12 * n_layers * dim * seq_len`` where ``N`` is
        :meth:`Decoder.matmul_params` plus the patch projections (charged to every slot: a slight
        over-count for text slots)."""
        projections = [m for m in (self.image_proj, self.audio_proj) if m is not None]
        patch = sum(p.numel() for m in projections for p in m.parameters())
        return self.decoder.flops_per_token(seq_len) + 6 * patch
