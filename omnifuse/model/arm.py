"""What every fusion arm shares besides the decoder: the loss on a packed batch and greedy
decoding with a KV cache.

An arm mixes in :class:`FusionArm` (before ``nn.Module``) and provides ``self.decoder`` (a
:class:`~omnifuse.model.decoder.Decoder`) and ``embed(tokens, modality, image_patches=None,
audio_patches=None) -> (B, S, D)``, the decoder's input embeddings of a slot stream. An arm whose
stream is not the decoder's stream (Flamingo) overrides ``forward`` too.
An arm whose decoding needs more than the decoder's self-attention cache (e.g. cached
cross-attention to the media) overrides the three hooks ``_setup_generation``,
``_decode_step`` and ``_teardown_generation``; the loop itself is written once, here.
"""

from __future__ import annotations

import torch

from omnifuse.model.decoder import lm_loss
from omnifuse.tokenizers.stream import TEXT


class FusionArm:
    """Mixin: ``forward``, ``loss`` and ``generate`` for a fusion arm (see the module docstring for
    what the arm provides). ``loss`` and ``generate`` go through ``forward``, so they read the same
    batch every arm reads."""

    def forward(
        self,
        tokens: torch.Tensor,
        modality: torch.Tensor,
        positions: torch.Tensor,
        image_patches: torch.Tensor | None = None,
        audio_patches: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tokens, modality (B, L)``, ``positions (B, L, 3)``, ``image_patches (Ni, 3P²)``,
        ``audio_patches (Na, P²)`` (the media slots in row-major order; None = no such slot),
        ``doc_ids (B, L)`` or None -> logits ``(B, L, V)``."""
        h = self.embed(tokens, modality, image_patches, audio_patches)  # (B, L, D)
        return self.decoder(h, positions, doc_ids)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A packed batch (docs/ARCHITECTURE.md) -> ``(mean loss over labelled slots, per-slot losses (B, L))``."""
        logits = self(
            batch["tokens"],
            batch["modality"],
            batch["positions"],
            batch.get("image_patches"),
            batch.get("audio_patches"),
            batch.get("doc_ids"),
        )  # (B, L, V)
        return lm_loss(logits, batch["labels"])

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        modality: torch.Tensor,
        positions: torch.Tensor,
        image_patches: torch.Tensor | None = None,
        audio_patches: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding after a prompt of one document per row (rows of equal length, no padding).

        New slots are TEXT at position ``max(prompt positions of the row) + 1, + 2, …`` (t = h = w).
        Returns the new tokens only, ``(B, T)`` long with ``T <= max_new_tokens``; decoding stops
        when every row has produced ``eos_id`` (included), and a finished row is padded with it.
        ``use_cache=False`` re-runs the whole sequence at every step (the reference the cache must equal).
        """
        b, s = tokens.shape
        if max_new_tokens <= 0:
            return tokens.new_zeros(b, 0)
        total = s + max_new_tokens
        max_len = self.decoder.cfg.max_seq_len
        if total > max_len:
            raise ValueError(f"prompt ({s}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={max_len}")
        next_pos = positions.amax(dim=(1, 2)) + 1  # (B,)
        text = torch.full((b, 1), TEXT, dtype=modality.dtype, device=modality.device)  # (B, 1)
        done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
        out: list[torch.Tensor] = []

        def step_positions(k: int) -> torch.Tensor:
            return (next_pos + k).view(b, 1, 1).expand(b, 1, 3)  # (B, 1, 3)

        if use_cache:
            self._setup_generation(b, total)
        try:
            logits = self(tokens, modality, positions, image_patches, audio_patches)[:, -1]  # (B, V)
            for k in range(max_new_tokens):
                nxt = logits.argmax(dim=-1)  # (B,)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                out.append(nxt)
                if bool(done.all()) or k == max_new_tokens - 1:
                    break
                if use_cache:
                    logits = self._decode_step(nxt[:, None], text, step_positions(k))[:, -1]  # (B, V)
                else:
                    tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # (B, S+1)
                    modality = torch.cat([modality, text], dim=1)  # (B, S+1)
                    positions = torch.cat([positions, step_positions(k)], dim=1)  # (B, S+1, 3)
                    logits = self(tokens, modality, positions, image_patches, audio_patches)[:, -1]  # (B, V)
        finally:
            if use_cache:
                self._teardown_generation()
        return torch.stack(out, dim=1)  # (B, T)

    # ---- hooks (override when decoding needs more than the decoder's KV cache) -------------

    def _setup_generation(self, batch_size: int, total_len: int) -> None:
        """Before the prompt's forward: allocate the caches for ``total_len`` slots per row."""
        self.decoder.setup_caches(batch_size, total_len)

    def _decode_step(self, tokens: torch.Tensor, modality: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new TEXT slot per row against the caches: ``tokens, modality (B, 1)``,
        ``positions (B, 1, 3)`` -> logits ``(B, 1, V)``."""
        return self.decoder(self.embed(tokens, modality), positions)

    def _teardown_generation(self) -> None:
        """After decoding (also on error): free the caches; ``forward`` is a full forward again."""
        self.decoder.teardown_caches()
