"""Native early fusion: one decoder over one stream of text tokens, image and audio patches.

    tokens ──► tok_embeddings ─┐
    image_patches ─► image_proj ─► overwrite IMAGE slots ─┐
    audio_patches ─► audio_proj ─► overwrite AUDIO slots ─┤
                                  + modality_embeddings[modality]
                                                          └─► Decoder (M-RoPE, block-causal) ─► logits

Everything trains from scratch in one stage; the only vision/audio "encoder" is a linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

from omnifuse.model.arm import FusionArm
from omnifuse.model.config import NativeConfig
from omnifuse.model.decoder import Decoder
from omnifuse.model.media import scatter_media
from omnifuse.tokenizers.stream import AUDIO, IMAGE


class NativeFusion(FusionArm, nn.Module):
    """The native early-fusion model; see the module docstring and docs/ARCHITECTURE.md.
    ``forward``, ``loss`` and ``generate`` (greedy, KV-cached) come from
    :class:`~omnifuse.model.arm.FusionArm`; this class defines ``embed``."""

    def __init__(self, cfg: NativeConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder.dim
        self.decoder = Decoder(cfg.decoder)
        self.image_proj = nn.Linear(cfg.image_patch_dim, d)
        self.audio_proj = nn.Linear(cfg.audio_patch_dim, d)
        self.modality_embeddings = nn.Embedding(3, d) if cfg.modality_embedding else None
        for module in (self.image_proj, self.audio_proj, self.modality_embeddings):
            if module is not None:
                nn.init.normal_(module.weight, std=cfg.decoder.init_std)
        nn.init.zeros_(self.image_proj.bias)
        nn.init.zeros_(self.audio_proj.bias)

    def embed(
        self,
        tokens: torch.Tensor,
        modality: torch.Tensor,
        image_patches: torch.Tensor | None = None,
        audio_patches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Slots -> input embeddings ``(B, L, D)``. ``image_patches (Ni, 3P²)`` and
        ``audio_patches (Na, P²)`` fill the IMAGE / AUDIO slots in row-major order of ``(B, L)``;
        ``None`` means no such slots."""
        h = self.decoder.embed(tokens)  # (B, L, D)
        if image_patches is None:
            image_patches = h.new_zeros(0, self.cfg.image_patch_dim)
        if audio_patches is None:
            audio_patches = h.new_zeros(0, self.cfg.audio_patch_dim)
        h = scatter_media(h, modality == IMAGE, self.image_proj(image_patches), "image")  # (B, L, D)
        h = scatter_media(h, modality == AUDIO, self.audio_proj(audio_patches), "audio")  # (B, L, D)
        if self.modality_embeddings is not None:
            h = h + self.modality_embeddings(modality).to(h.dtype)  # (B, L, D)
        return h

    # ---- accounting ------------------------------------------------------------------------

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters (tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per slot: ``6 * N + 12 * n_layers * dim * seq_len`` where ``N`` is
        :meth:`Decoder.matmul_params` plus the patch projections (charged to every slot: a slight
        over-count for text slots)."""
        patch = sum(p.numel() for p in (*self.image_proj.parameters(), *self.audio_proj.parameters()))
        return self.decoder.flops_per_token(seq_len) + 6 * patch
