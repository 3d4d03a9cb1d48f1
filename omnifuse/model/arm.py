"""What every fusion arm shares besides the decoder: the loss on a packed batch and greedy
decoding with a KV cache.

An arm mixes in :class:`FusionArm` (before ``nn.Module``) and provides ``self.decoder`` (a
:class:`~omnifuse.model.decoder.Decoder`) and ``embed(tokens, modality, image_patches=None,
audio_patches=None) -> (B, S, D)``, the decoder's input embeddings of a slot stream. An arm whose
stream is not the decoder's stream (Flamingo) overrides ``forward`` too.
An arm whose decoding needs more than the decoder's self-attention cache (e.g. cached
cross-attention to the media) overrides the three hooks ``_setup_generation``,
``_decode_step`` and ``_teardown_generation``, and ``_prefill`` too when the prompt's forward is not the embedding plus
the decoder; the loop itself is written once, here. An arm may override ``embed_text`` (the
embedding of a decode step's TEXT slot) when its ``embed`` spends work on media.
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
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding after a prompt of one document per row.

        Rows may hold prompts of different lengths, right-padded: ``lengths (B,)`` long says that
        row ``b``'s prompt is its first ``lengths[b]`` slots (default: all ``L``). Padding slots
        must be TEXT (no patch belongs to them); their tokens and positions are never read by a
        real slot. New slots of row ``b`` are TEXT at position ``max(its prompt's positions) + 1,
        + 2, …`` (t = h = w), written after its own last slot.

        Returns the new tokens only, ``(B, T)`` long with ``T <= max_new_tokens``; decoding stops
        when every row has produced ``eos_id`` (included), and a finished row is padded with it.
        A row's tokens do not depend on the other rows of the batch (tests/test_generate.py).
        ``use_cache=False`` re-runs the whole sequence at every step (the reference the cache must equal).
        """
        b, l = tokens.shape
        if max_new_tokens <= 0:
            return tokens.new_zeros(b, 0)
        total = l + max_new_tokens
        max_len = self.decoder.cfg.max_seq_len
        if total > max_len:
            raise ValueError(f"prompt ({l}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={max_len}")
        device = tokens.device
        if lengths is None:
            lengths = torch.full((b,), l, dtype=torch.long, device=device)
        lengths = lengths.to(device=device, dtype=torch.long)
        real = torch.arange(l, device=device)[None, :] < lengths[:, None]  # (B, L)
        next_pos = positions.masked_fill(~real[..., None], 0).amax(dim=(1, 2)) + 1  # (B,)
        new_positions = (next_pos[:, None] + torch.arange(max_new_tokens, device=device)).view(b, max_new_tokens, 1)
        new_positions = new_positions.expand(b, max_new_tokens, 3)  # (B, T, 3): every step's, made once
        prompt = (tokens, modality, positions, image_patches, audio_patches)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        out: list[torch.Tensor] = []
        step = (self._cached_steps if use_cache else self._recomputed_steps)(prompt, lengths, new_positions)
        try:
            logits = next(step)  # (B, V) after each row's last prompt slot
            for k in range(max_new_tokens):
                nxt = logits.argmax(dim=-1)  # (B,)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                out.append(nxt)
                if k == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):  # the loop's one host sync
                    break
                logits = step.send(nxt)  # (B, V)
        finally:
            step.close()
        return torch.stack(out, dim=1)  # (B, T)

    def _cached_steps(self, prompt, lengths: torch.Tensor, new_positions: torch.Tensor):
        """Generator of next-token logits ``(B, V)``: the prompt's, then one per token sent in,
        against the KV caches (set up here, torn down when the generator closes)."""
        b, l = prompt[0].shape
        self._setup_generation(b, l + new_positions.shape[1])
        try:
            nxt = yield self._prefill(*prompt, lengths)
            k = 0
            while True:
                nxt = yield self._decode_step(nxt[:, None], new_positions[:, k : k + 1])
                k += 1
        finally:
            self._teardown_generation()

    def _recomputed_steps(self, prompt, lengths: torch.Tensor, new_positions: torch.Tensor):
        """The reference: next-token logits ``(B, V)`` from a full forward over every slot so far;
        row ``b``'s new tokens go over its padding, at ``lengths[b], lengths[b] + 1, …``."""
        tokens, modality, positions, image_patches, audio_patches = prompt
        b, t = new_positions.shape[:2]
        tokens = torch.cat([tokens, tokens.new_zeros(b, t)], dim=1)  # (B, L+T)
        modality = torch.cat([modality, modality.new_full((b, t), TEXT)], dim=1)  # (B, L+T)
        positions = torch.cat([positions, new_positions], dim=1)  # (B, L+T, 3)
        rows = torch.arange(b, device=tokens.device)
        width = int(lengths.max())
        at = lengths - 1  # (B,) each row's last slot
        k = 0
        while True:
            logits = self(tokens[:, :width], modality[:, :width], positions[:, :width], image_patches, audio_patches)
            nxt = yield logits[rows, at]  # (B, V)
            at = at + 1
            tokens[rows, at], modality[rows, at], positions[rows, at] = nxt, TEXT, new_positions[:, k]
            width, k = width + 1, k + 1

    def compile_decoding(self, enable: bool = True, **compile_kwargs) -> None:
        """Decode steps through ``torch.compile`` (:meth:`Decoder.compile_decoding`); the prompt's
        forward stays eager. Off by default: it compiles again for each new batch size and cache
        length, which pays on a GPU, rarely on CPU."""
        self.decoder.compile_decoding(enable, **compile_kwargs)

    # ---- hooks (override when decoding needs more than the decoder's KV cache) -------------

    def _setup_generation(self, batch_size: int, total_len: int) -> None:
        """Before the prompt's forward: allocate the caches for ``total_len`` slots per row."""
        self.decoder.setup_caches(batch_size, total_len)

    def _prefill(self, tokens, modality, positions, image_patches, audio_patches, lengths) -> torch.Tensor:
        """The prompt's forward through the caches (right-padded rows, ``lengths (B,)``) ->
        logits ``(B, V)`` after each row's last prompt slot."""
        h = self.embed(tokens, modality, image_patches, audio_patches)  # (B, L, D)
        h = self.decoder.hidden(h, positions, lengths=lengths)  # (B, L, D)
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, D): the head runs on these only
        return self.decoder.output(last)  # (B, V)

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new TEXT slot per row against the caches: ``tokens (B, 1)``, ``positions (B, 1, 3)``
        -> logits ``(B, V)``."""
        return self.decoder(self.embed_text(tokens), positions)[:, -1]  # (B, V)

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(B, S, D)`` of TEXT slots only (a decode step). An arm overrides it
        when its ``embed`` does work for media that a text slot does not need; the result must be
        ``embed(tokens, TEXT everywhere)`` exactly."""
        return self.embed(tokens, torch.full_like(tokens, TEXT))

    def _teardown_generation(self) -> None:
        """After decoding (also on error): free the caches; ``forward`` is a full forward again."""
        self.decoder.teardown_caches()
