"""The decoder every fusion arm shares: token embedding, torchtune blocks, final norm, output head.

Unlike torchtune's ``TransformerDecoder`` (token ids in), :meth:`Decoder.forward` takes input
*embeddings*, so an arm can put patch embeddings (native), projected encoder features (LLaVA) or
plain token embeddings (text LM) into the same stream. Blocks are
:class:`torchtune.modules.TransformerSelfAttentionLayer` (pre-norm RMSNorm, SwiGLU
:class:`~torchtune.modules.FeedForward`) around :class:`~omnifuse.model.attention.SelfAttention`
(GQA, optional QK-norm, M-RoPE). Extra keyword arguments of ``forward`` go to every layer, so a
layer may be wrapped (e.g. torchtune's ``FusionLayer`` for cross-attention) without a new decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import FeedForward, RMSNorm, TransformerSelfAttentionLayer, delete_kv_caches

from omnifuse.model.attention import SelfAttention, build_attention_mask, kv_cache_mask
from omnifuse.model.config import DecoderConfig

IGNORE_INDEX = -100


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
        self._cache_len: int | None = None  # slots written to the KV cache; None: no cache set up
        self._cache_max = 0  # slots the KV cache holds (set by setup_caches)
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
        self, h: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor | None = None, **layer_kwargs
    ) -> torch.Tensor:
        """Run the blocks and the final norm: ``h (B, S, D)`` -> ``(B, S, D)``.

        ``positions (B, S, 3)`` long; ``doc_ids (B, S)`` or None (one document per row). With the
        KV cache set up (:meth:`setup_caches`), ``h`` holds the *next* slots only and is appended
        to the cache; ``doc_ids`` must then be None.
        """
        b, s, _ = h.shape
        if tuple(positions.shape) != (b, s, 3):
            raise ValueError(f"positions must have shape {(b, s, 3)}, got {tuple(positions.shape)}")
        if self._cache_len is None:
            if s > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {s} slots exceeds max_seq_len={self.cfg.max_seq_len}")
            mask = build_attention_mask(doc_ids, b, s, h.device, self.cfg.attention)
        else:
            if doc_ids is not None:
                raise ValueError("doc_ids (packing) is not supported while decoding with a KV cache")
            cache_len = self._cache_max
            if self._cache_len + s > cache_len:
                raise ValueError(f"KV cache of {cache_len} slots is full ({self._cache_len} + {s})")
            mask = kv_cache_mask(b, s, self._cache_len, cache_len, h.device)  # (B, s, cache_len)
            self._cache_len += s
        for layer in self.layers:
            h = layer(h, mask=mask, input_pos=positions, **layer_kwargs)  # (B, S, D)
        return self.norm(h)

    def forward(
        self, h: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor | None = None, **layer_kwargs
    ) -> torch.Tensor:
        """``h (B, S, D)`` embeddings, ``positions (B, S, 3)``, ``doc_ids (B, S)`` -> logits ``(B, S, V)``."""
        return self.output(self.hidden(h, positions, doc_ids, **layer_kwargs))

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
        dtype = dtype or self.tok_embeddings.weight.dtype
        for layer in self.layers:
            layer.setup_caches(
                batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len, decoder_max_seq_len=max_seq_len
            )
        self._cache_len, self._cache_max = 0, max_seq_len

    def reset_caches(self) -> None:
        """Empty the caches (keep the allocation)."""
        for layer in self.layers:
            layer.reset_cache()
        self._cache_len = 0

    def teardown_caches(self) -> None:
        """Free the caches (every attention module's, cross-attention included); ``forward`` is an
        ordinary full (training) forward again."""
        if self._cache_len is not None:
            delete_kv_caches(self)
        self._cache_len = None

    def caches_are_setup(self) -> bool:
        """torchtune's name, used by :func:`torchtune.modules.delete_kv_caches`."""
        return self._cache_len is not None

    def caches_are_enabled(self) -> bool:
        return self._cache_len is not None

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
