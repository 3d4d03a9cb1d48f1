"""Block-causal attention for packed rows: masks, the SDPA / flex_attention dispatch, and the
self-attention module every decoder block uses.

Slot ``i`` sees slot ``j`` iff ``j <= i`` and ``doc_ids[i] == doc_ids[j]`` (docs/ARCHITECTURE.md).
Two interchangeable implementations of that rule:

- ``"sdpa"``: a boolean ``(B, S, S)`` mask for ``scaled_dot_product_attention`` (any device);
  with ``doc_ids=None`` no mask is built and SDPA runs with ``is_causal=True``.
- ``"flex"``: a ``flex_attention`` ``BlockMask`` built from a ``mask_mod``; compiled on CUDA
  (the point of flex: fully masked blocks are skipped), eager on CPU (correct, not fast, and
  forward-only: torch has no flex backward on CPU, so ``"auto"`` picks SDPA there).

With a KV cache (:class:`RowKVCache`, one per layer), a prompt's forward writes its keys and values
at offsets ``0..S-1`` of every row and attends them exactly as the uncached forward does (same
mask, same kernel), so prompt logits equal a plain forward's. Each later slot is written at its
row's own offset (rows of a right-padded batch of prompts of different lengths each continue after
their own last slot) and attends the cache through the SDPA path with a boolean
``(B, s, cache_keys)`` mask: key offset ``<=`` the slot's offset. What the layers of one decoder
call share (rotation, cache offsets) is built once per call by the decoder: :class:`AttentionSlots`.

The attention module is written here rather than taken from torchtune's ``MultiHeadAttention``
because torchtune applies QK-norm *after* RoPE; a learned per-channel norm scale after the
rotation breaks RoPE's relative-position property. Here QK-norm comes first (Chameleon, OLMo 2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torchtune.modules import RMSNorm

from omnifuse.model.config import DecoderConfig
from omnifuse.model.positions import MultimodalRotaryEmbedding

# None: plain causal (SDPA is_causal); bool Tensor (B, S, S_kv): True = may attend; BlockMask: flex.
AttentionMask = Union[None, torch.Tensor, BlockMask]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"flex"`` on CUDA, ``"sdpa"`` elsewhere; other values pass through."""
    if backend == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    if backend not in ("sdpa", "flex"):
        raise ValueError(f"attention backend must be 'sdpa', 'flex' or 'auto', got {backend!r}")
    return backend


def block_causal_bool_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """``doc_ids (B, S)`` -> boolean ``(B, S, S)``: True where query ``i`` may attend to key ``j``."""
    s = doc_ids.shape[1]
    idx = torch.arange(s, device=doc_ids.device)
    causal = idx[:, None] >= idx[None, :]  # (S, S)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, S, S)
    return causal & same_doc


def block_causal_block_mask(doc_ids: torch.Tensor | None, batch: int, seq_len: int, device) -> BlockMask:
    """The same rule as a flex ``BlockMask`` (``doc_ids=None``: causal only)."""

    if doc_ids is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811 - one mask_mod per branch
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device)


def build_attention_mask(
    doc_ids: torch.Tensor | None, batch: int, seq_len: int, device, backend: str
) -> AttentionMask:
    """The mask for a full (uncached) forward over ``seq_len`` slots, in ``backend``'s form."""
    if doc_ids is not None and tuple(doc_ids.shape) != (batch, seq_len):
        raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected {(batch, seq_len)}")
    if resolve_backend(backend, device) == "flex":
        return block_causal_block_mask(doc_ids, batch, seq_len, device)
    if doc_ids is None:
        return None
    return block_causal_bool_mask(doc_ids)


@dataclass
class AttentionSlots:
    """What every self-attention layer of one decoder call shares, built once per call by the
    decoder (it reaches the layers through torchtune's ``input_pos`` argument).

    Attributes:
        cos, sin: ``(B, S, 1, hd)`` the rotation of the slots' positions
            (:meth:`~omnifuse.model.positions.MultimodalRotaryEmbedding.rotation`).
        cache_index: ``None``: no KV cache, or a prompt written at offsets ``0..S-1`` of every row
            that attends its own keys as an uncached forward does. Else ``(B, S)`` long: each
            slot's offset in its row's KV cache; the slots attend keys ``0..cache_keys-1`` of the
            cache under the caller's boolean mask.
        cache_keys: while decoding, how many cache offsets are read (the largest written + 1).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    cache_index: torch.Tensor | None = None
    cache_keys: int = 0


class RowKVCache(nn.Module):
    """Keys and values of ``B`` rows, ``(B, H_kv, max_seq_len, hd)`` each; unlike torchtune's
    ``KVCache`` (one offset for the whole batch) every row is written at its own offsets, so rows
    whose prompts have different lengths decode side by side. Offsets past what a row has written
    hold stale values that the decoder's mask hides."""

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def write(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor | None) -> None:
        """Store ``k, v (B, H_kv, s, hd)`` at offsets ``0..s-1`` of every row (``index`` None) or at
        ``index (B, s)`` long, each row its own."""
        k, v = k.to(self.k_cache.dtype), v.to(self.v_cache.dtype)  # under autocast k, v may be bf16
        if index is None:
            s = k.shape[2]
            self.k_cache[:, :, :s] = k
            self.v_cache[:, :, :s] = v
            return
        idx = index[:, None, :, None].expand(k.shape)  # (B, H_kv, s, hd)
        self.k_cache.scatter_(2, idx, k)
        self.v_cache.scatter_(2, idx, v)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """``q (B, H, S, hd)``, ``k, v (B, H_kv, S_kv, hd)`` -> ``(B, H, S, hd)`` (GQA handled here)."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
            raise ValueError(
                "flex_attention has no backward on CPU: train with attention='sdpa' or 'auto' on CPU "
                "(flex on CPU is for inference and tests)"
            )
        if q.is_cuda and not torch.compiler.is_compiling():
            return _compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)  # mask (B, 1, S, S_kv)


class SelfAttention(nn.Module):
    """GQA self-attention with optional QK-norm and M-RoPE; torchtune-compatible call and cache API
    (``forward(x, y, *, mask, input_pos)``, ``setup_cache``, ``reset_cache``, ``kv_cache``,
    ``cache_enabled``), so it drops into :class:`torchtune.modules.TransformerSelfAttentionLayer`.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads = cfg.n_heads
        self.num_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.output_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.pos_embeddings = MultimodalRotaryEmbedding(
            cfg.head_dim, cfg.mrope_sections, base=cfg.rope_base, mode=cfg.positions
        )
        self.kv_cache: RowKVCache | None = None
        self.cache_enabled = False

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        self.kv_cache = RowKVCache(batch_size, max_seq_len, self.num_kv_heads, self.head_dim, dtype).to(
            self.q_proj.weight.device
        )
        self.cache_enabled = True

    def reset_cache(self) -> None:
        if self.kv_cache is None:
            raise RuntimeError("KV cache is not set up; call setup_cache() first")
        self.kv_cache.reset()

    def teardown_cache(self) -> None:
        self.kv_cache = None
        self.cache_enabled = False

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        mask: AttentionMask = None,
        input_pos: torch.Tensor | AttentionSlots | None = None,
    ) -> torch.Tensor:
        """``x (B, S, D)`` -> ``(B, S, D)``. ``input_pos``: positions ``(B, S, 3)`` (None: ``0..S-1``),
        or the decoder's :class:`AttentionSlots` (rotation computed once for every layer; needed
        with a KV cache). ``y`` must be ``x`` or None (self-attention only; the argument exists for
        torchtune's layer call ``attn(h, h, ...)``)."""
        if y is not None and y is not x:
            raise ValueError("SelfAttention is self-attention only: y must be x")
        b, s, _ = x.shape
        if isinstance(input_pos, AttentionSlots):
            slots = input_pos
        else:
            if input_pos is None:
                input_pos = torch.arange(s, device=x.device).view(1, s, 1).expand(b, s, 3)
            slots = AttentionSlots(*self.pos_embeddings.rotation(input_pos))
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)  # (B, S, H, hd)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)  # (B, S, H_kv, hd)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)  # (B, S, H_kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.pos_embeddings.rotate(q, slots.cos, slots.sin).transpose(1, 2)  # (B, H, S, hd)
        k = self.pos_embeddings.rotate(k, slots.cos, slots.sin).transpose(1, 2)  # (B, H_kv, S, hd)
        v = v.transpose(1, 2)  # (B, H_kv, S, hd)
        if self.kv_cache is not None and self.cache_enabled:
            self.kv_cache.write(k, v, slots.cache_index)
            if slots.cache_index is not None:  # decoding: attend what the cache holds
                if mask is None or isinstance(mask, BlockMask):
                    raise ValueError("decoding with a KV cache needs a boolean (B, s, cache_keys) mask")
                n = slots.cache_keys
                k = self.kv_cache.k_cache[:, :, :n].to(q.dtype)  # (B, H_kv, cache_keys, hd)
                v = self.kv_cache.v_cache[:, :, :n].to(q.dtype)  # (B, H_kv, cache_keys, hd)
        out = attend(q, k, v, mask)  # (B, H, S, hd)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)  # (B, S, H*hd)
        return self.output_proj(out)
