"""The decoder every fusion arm shares: token embedding, torchtune blocks, final norm, output head.

Unlike torchtune's ``TransformerDecoder`` (token ids in), :meth:`Decoder.forward` takes input
*embeddings*, so an arm can put patch embeddings (native), projected encoder features (LLaVA) or
plain token embeddings (text LM) into the same stream. Blocks are
:class:`torchtune.modules.TransformerSelfAttentionLayer` (pre-norm RMSNorm, SwiGLU
:class:`~torchtune.modules.FeedForward`) around :class:`~omnifuse.model.attention.SelfAttention`
(GQA, optional QK-norm, M-RoPE). Extra keyword arguments of ``forward`` go to every layer, so a
layer may be wrapped (e.g. torchtune's ``FusionLayer`` for cross-attention) without a new decoder.

What every layer of one call shares is built once per call (:class:`~omnifuse.model.attention.AttentionSlots`:
the rotary rotation of the positions, the KV-cache offsets and the decoding mask), not per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import FeedForward, RMSNorm, TransformerSelfAttentionLayer, delete_kv_caches

from omnifuse.model.attention import AttentionSlots, SelfAttention, build_attention_mask
from omnifuse.model.config import DecoderConfig
from omnifuse.model.positions import MultimodalRotaryEmbedding

IGNORE_INDEX = -100
COMPILED_CACHE_MULTIPLE = 64  # a compiled decode step's cache length is rounded up to a multiple of this


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``logits (B, L, V)`` against ``labels (B, L)``, ignoring ``-100``.

    Returns ``(loss, per_slot)``: ``per_slot (B, L)`` float32 is each slot's loss (0 where the
    label is -100); ``loss`` is its mean over labelled slots (0 when there are none, not NaN).
    """
    b, l, v = logits.shape
    per_slot = F.cross_entropy(
        logits.float().reshape(b * l, v), labels.reshape(b * l), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(b, l)  # (B, L)
    n = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return per_slot.sum() / n, per_slot


def attention_flops_per_token(n_layers: int, dim: int, seq_len: int) -> int:
    """Training FLOPs per token of the attention score/value matmuls: ``12 * n_layers * dim * seq_len``
    (PaLM appendix B: 2 matmuls x 2 FLOPs/MAC x 3 for forward + backward; full, not causal, S x S)."""
    return 12 * n_layers * dim * seq_len


class Decoder(nn.Module):
    """Pre-norm decoder with embeddings in, logits out. See the module docstring.

    Attributes: ``tok_embeddings`` (V, D), ``layers`` (torchtune blocks), ``norm``, ``output``
    (V x D; shares ``tok_embeddings.weight`` when ``cfg.tie_embeddings``).
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([self._block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # the rotation every layer applies (the layers' own modules have the same buffers); no weights
        self.rope = MultimodalRotaryEmbedding(cfg.head_dim, cfg.mrope_sections, base=cfg.rope_base, mode=cfg.positions)
        self._cache_max: int | None = None  # slots per row the KV cache holds; None: no cache set up
        self._cache_next: torch.Tensor | None = None  # (B,) offset of each row's next slot; None: prompt not yet written
        self._cache_top = 0  # max over rows of _cache_next (a host int: how many cache offsets a step reads)
        self._offsets: torch.Tensor | None = None  # arange(cache slots), made by setup_caches
        self._compiled_step = None  # compile_decoding's torch.compile of _decode_layers
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @staticmethod
    def _block(cfg: DecoderConfig) -> TransformerSelfAttentionLayer:
        mlp = FeedForward(
            gate_proj=nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False),
            down_proj=nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False),
            up_proj=nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False),
        )
        return TransformerSelfAttentionLayer(
            attn=SelfAttention(cfg),
            mlp=mlp,
            sa_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps),
            mlp_norm=RMSNorm(cfg.dim, eps=cfg.norm_eps),
        )

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) everywhere, residual output projections scaled by 1/sqrt(2L)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        for layer in self.layers:
            for proj in (layer.attn.output_proj, layer.mlp.w2):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))

    # ---- forward ---------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, S)`` long -> ``(B, S, D)``."""
        return self.tok_embeddings(tokens)

    def hidden(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        *,
        lengths: torch.Tensor | None = None,
        **layer_kwargs,
    ) -> torch.Tensor:
        """Run the blocks and the final norm: ``h (B, S, D)`` -> ``(B, S, D)``.

        ``positions (B, S, 3)`` long; ``doc_ids (B, S)`` or None (one document per row). With the
        KV cache set up (:meth:`setup_caches`), ``doc_ids`` must be None and:

        - the first call is the prompt: written at offsets ``0..S-1`` of every row, computed as an
          uncached forward (causal). ``lengths (B,)`` long: row ``b``'s real slots are its first
          ``lengths[b]`` (right padding; default all ``S``); its next slot goes to offset ``lengths[b]``,
          over the padding, which no real slot ever sees.
        - each later call appends ``S`` slots to every row after that row's last one.
        """
        b, s, _ = h.shape
        if tuple(positions.shape) != (b, s, 3):
            raise ValueError(f"positions must have shape {(b, s, 3)}, got {tuple(positions.shape)}")
        if self._cache_max is not None and self._cache_next is not None:  # decoding: append to the cache
            if doc_ids is not None:
                raise ValueError("doc_ids (packing) is not supported while decoding with a KV cache")
            top = self._cache_top + s
            if top > self._cache_max:
                raise ValueError(f"KV cache of {self._cache_max} slots is full ({self._cache_top} + {s})")
            index = self._cache_next[:, None] + self._offsets[:s]  # (B, s) each slot's cache offset
            # a compiled step reads the whole cache (one shape per generation), an eager one what is written
            keys = self._cache_max if self._compiled_step is not None else top
            h = (self._compiled_step or self._decode_layers)(h, positions, index, keys, **layer_kwargs)
            self._cache_next, self._cache_top = self._cache_next + s, top
            return h
        if self._cache_max is not None:  # the prompt, written at offsets 0..S-1
            if doc_ids is not None:
                raise ValueError("doc_ids (packing) is not supported while decoding with a KV cache")
            if s > self._cache_max:
                raise ValueError(f"KV cache of {self._cache_max} slots is full (0 + {s})")
            self._start_rows(b, s, lengths, h.device)
        elif s > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {s} slots exceeds max_seq_len={self.cfg.max_seq_len}")
        mask = build_attention_mask(doc_ids, b, s, h.device, self.cfg.attention)
        slots = AttentionSlots(*self.rope.rotation(positions))  # cos, sin (B, S, 1, hd): once for every layer
        for layer in self.layers:
            h = layer(h, mask=mask, input_pos=slots, **layer_kwargs)  # (B, S, D)
        return self.norm(h)

    def _decode_layers(
        self, h: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, keys: int, **layer_kwargs
    ) -> torch.Tensor:
        """The blocks and final norm of a decode step: ``h (B, s, D)`` at cache offsets ``index (B, s)``
        against cache offsets ``0..keys-1`` -> ``(B, s, D)``. No Python state is read or written
        here (what :meth:`compile_decoding` compiles)."""
        mask = self._offsets[:keys][None, None, :] <= index[:, :, None]  # (B, s, keys): key offset <= slot's
        slots = AttentionSlots(*self.rope.rotation(positions), cache_index=index, cache_keys=keys)
        for layer in self.layers:
            h = layer(h, mask=mask, input_pos=slots, **layer_kwargs)  # (B, s, D)
        return self.norm(h)

    def compile_decoding(self, enable: bool = True, **compile_kwargs) -> None:
        """Run decode steps through ``torch.compile(self._decode_layers)`` (``enable=False``: eager again).

        A compiled step reads every cache offset (the mask hides the unwritten ones), so its shapes
        are fixed for a whole generation, and :meth:`setup_caches` rounds the cache up to a multiple
        of 64 slots so that prompts of similar lengths share a graph. A new batch size or cache
        length compiles again (seconds on CPU). Worth it where a step is launch-bound (a GPU);
        on CPU it pays only for single-row decoding of a small model (docs/PERFORMANCE.md).
        """
        self._compiled_step = torch.compile(self._decode_layers, **compile_kwargs) if enable else None

    def _start_rows(self, b: int, s: int, lengths: torch.Tensor | None, device) -> None:
        """Bookkeeping of the prompt's call: each row's next cache offset."""
        if lengths is None:
            self._cache_next = torch.full((b,), s, dtype=torch.long, device=device)
            self._cache_top = s
            return
        lengths = lengths.to(device=device, dtype=torch.long)
        if tuple(lengths.shape) != (b,):
            raise ValueError(f"lengths must have shape {(b,)}, got {tuple(lengths.shape)}")
        top = int(lengths.max())  # one host sync per prompt
        if top > s or int(lengths.min()) < 1:
            raise ValueError(f"lengths must lie in 1..{s} (the prompt's slots), got {lengths.tolist()}")
        self._cache_next, self._cache_top = lengths.clone(), top

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        *,
        lengths: torch.Tensor | None = None,
        **layer_kwargs,
    ) -> torch.Tensor:
        """``h (B, S, D)`` embeddings, ``positions (B, S, 3)``, ``doc_ids (B, S)`` -> logits ``(B, S, V)``
        (``lengths``: see :meth:`hidden`)."""
        return self.output(self.hidden(h, positions, doc_ids, lengths=lengths, **layer_kwargs))

    # ---- KV cache --------------------------------------------------------------------------

    def setup_caches(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        encoder_max_seq_len: int = 0,
    ) -> None:
        """Allocate an empty KV cache of ``max_seq_len`` slots (default ``cfg.max_seq_len``) per layer.

        Layers are set up through torchtune's layer protocol (``layer.setup_caches``), so a block
        wrapped in :class:`torchtune.modules.model_fusion.FusionLayer` also gets the cache of its
        cross-attention layer: ``encoder_max_seq_len`` slots of encoder (media) keys and values,
        ignored by plain blocks.
        """
        max_seq_len = max_seq_len or self.cfg.max_seq_len
        if self._compiled_step is not None:  # a few cache lengths, a few graphs
            rounded = -(-max_seq_len // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE
            max_seq_len = min(rounded, max(self.cfg.max_seq_len, max_seq_len))
        dtype = dtype or self.tok_embeddings.weight.dtype
        for layer in self.layers:
            layer.setup_caches(
                batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len, decoder_max_seq_len=max_seq_len
            )
        self._cache_max, self._cache_next, self._cache_top = max_seq_len, None, 0
        # cache offsets 0..max_seq_len-1, made once: each step's offsets and mask are views and one comparison
        self._offsets = torch.arange(max_seq_len, device=self.tok_embeddings.weight.device)

    def reset_caches(self) -> None:
        """Empty the caches (keep the allocation); the next call is a prompt again."""
        for layer in self.layers:
            layer.reset_cache()
        self._cache_next, self._cache_top = None, 0

    def teardown_caches(self) -> None:
        """Free the caches (every attention module's, cross-attention included); ``forward`` is an
        ordinary full (training) forward again."""
        if self._cache_max is not None:
            delete_kv_caches(self)
        self._cache_max, self._cache_next, self._cache_top = None, None, 0

    def caches_are_setup(self) -> bool:
        """torchtune's name, used by :func:`torchtune.modules.delete_kv_caches`."""
        return self._cache_max is not None

    def caches_are_enabled(self) -> bool:
        return self._cache_max is not None

    # ---- accounting ------------------------------------------------------------------------

    def num_params(self) -> int:
        """Parameters, a tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self) -> int:
        """Weights each slot is multiplied by: blocks, final norm and the output head (V x D, counted
        even when tied, since the head matmul is real compute); the embedding lookup is excluded."""
        blocks = sum(p.numel() for p in self.layers.parameters()) + sum(p.numel() for p in self.norm.parameters())
        return blocks + self.output.weight.numel()

    def flops_per_token(self, seq_len: int) -> int:
        """Training (forward + backward) FLOPs per slot at row length ``seq_len``:
        ``6 * matmul_params() + 12 * n_layers * dim * seq_len`` (Kaplan et al. 2020 / PaLM)."""
        return 6 * self.matmul_params() + attention_flops_per_token(self.cfg.n_layers, self.cfg.dim, seq_len)
