"""Compute accounting: parameters, tokens by modality, training FLOPs, throughput, MFU.

FLOPs follow Kaplan et al. 2020 / PaLM appendix B: a multiply-add is 2 FLOPs, a weight matrix
of ``N`` parameters costs ``2N`` per slot forward, ``4N`` backward (``2N`` for the gradient of
its input, ``2N`` for the gradient of its weights), so ``6N`` per trained slot; a frozen matrix
that gradients still flow through costs ``4N`` (no weight gradient), a frozen one that nothing
flows back through ``2N`` (:data:`FLOPS_PER_PARAM`).

Attention scores and values (``QK^T`` and ``AV``) have no parameters. With causal attention
within a document of ``n`` slots, query ``i`` meets ``i`` keys (itself included), so both
matmuls make ``dim * n(n+1)/2`` multiply-adds per layer each: forward ``2 * dim * n(n+1)``
FLOPs, forward + backward three times that. A packed training step of the shared decoder
(:func:`packed_decoder_flops`) therefore costs

    6 * N * B * L  +  6 * n_layers * dim * sum_d n_d * (n_d + 1)  +  6 * sum_m P_m * S_m

with ``N`` = :meth:`omnifuse.model.decoder.Decoder.matmul_params` (blocks, final norm, output
head; not the embedding lookup), ``B * L`` every slot of the rows (padding included: it is
computed), ``n_d`` the slots of document ``d`` of a row (the padding slots of a row attend to each
other too and count as one more document), ``P_m`` the parameters of modality ``m``'s patch
projection and ``S_m`` its slots (projections run on media slots only). The full-row figure
that PaLM's MFU uses, ``12 * n_layers * dim * L`` per slot for attention, is kept as an upper
bound (:func:`full_attention_flops`). On a tiny-preset batch (rows of 512, documents of 59 slots
on average) attention is 3.5% of the causal count but 37% of the bound, and the causal total is
0.65x the bound (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import torch

from omnifuse.model.decoder import Decoder, attention_flops_per_token

# Dense bf16 peak FLOP/s (no sparsity) by device name substring; MFU is reported only when known.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 125e12,
}

# FLOPs per parameter per slot: trained (forward + input and weight gradients), frozen but
# back-propagated through (forward + input gradient), frozen and forward only.
FLOPS_PER_PARAM = {"train": 6, "backward_through": 4, "forward": 2}

PACKED_DECODER_FLOPS_FORMULA = (
    "6*N*B*L + 6*n_layers*dim*sum_d n_d*(n_d+1) + 6*sum_m P_m*S_m per step, summed over steps and ranks; "
    "N = decoder matmul parameters (blocks, final norm, output head; not the embedding lookup), "
    "B*L = slots of the packed rows (padding included), n_d = slots of document d of a row "
    "(causal attention within documents; a row's padding counts as one document), "
    "P_m = parameters of modality m's patch projection, S_m = its slots. "
    "train_flops_full_attention_bound replaces the attention term by 12*n_layers*dim*L per slot "
    "(full rows, PaLM appendix B). omnifuse/training/compute.py"
)


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def param_counts(module: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}


def matmul_flops(params: int, slots: int, mode: str = "train") -> int:
    """FLOPs of ``slots`` slots through weight matrices holding ``params`` parameters;
    ``mode`` is a key of :data:`FLOPS_PER_PARAM`."""
    if mode not in FLOPS_PER_PARAM:
        raise ValueError(f"mode must be one of {tuple(FLOPS_PER_PARAM)}, got {mode!r}")
    return FLOPS_PER_PARAM[mode] * params * slots


def doc_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """Slots per document of each row: ``doc_ids (B, L)`` -> ``(B, L + 1)`` long.

    Column ``k`` counts the slots of document ``k - 1``; column 0 counts padding (id -1). Ids
    absent from a row count 0. Slots with the same id attend to each other (the mask's rule),
    so a document's length is its number of slots whether or not they are contiguous. No host
    sync: the result stays on ``doc_ids``' device.
    """
    b, l = doc_ids.shape
    if doc_ids.numel() and int(doc_ids.min()) < -1:  # the training step syncs here anyway
        raise ValueError(f"doc_ids must be >= -1 (-1 marks padding), got {int(doc_ids.min())}")
    offset = torch.arange(b, device=doc_ids.device).unsqueeze(1) * (l + 1)  # (B, 1)
    flat = (doc_ids + 1 + offset).flatten()  # (B*L,)
    return torch.bincount(flat, minlength=b * (l + 1)).view(b, l + 1)  # (B, L+1)


def causal_attention_flops(lengths: torch.Tensor, n_layers: int, dim: int, mode: str = "train") -> torch.Tensor:
    """FLOPs of ``QK^T`` and ``AV`` with causal attention within documents of ``lengths`` slots
    (any shape, zeros allowed): ``(FLOPS_PER_PARAM[mode] / 2) * 2 * n_layers * dim * sum n(n+1)``,
    i.e. ``6 * n_layers * dim * sum n(n+1)`` when trained. A float64 0-dim tensor."""
    n = lengths.to(torch.float64)
    return FLOPS_PER_PARAM[mode] * n_layers * dim * (n * (n + 1)).sum()


def full_attention_flops(rows: int, row_len: int, n_layers: int, dim: int) -> int:
    """Training FLOPs of ``QK^T`` and ``AV`` over full rows (no mask): PaLM's upper bound."""
    return rows * row_len * attention_flops_per_token(n_layers, dim, row_len)


def packed_decoder_flops(decoder: Decoder, doc_ids: torch.Tensor, mode: str = "train") -> torch.Tensor:
    """FLOPs of the shared decoder on packed rows ``doc_ids (B, L)``, attention causal within
    documents: ``FLOPS_PER_PARAM[mode] * N`` per slot plus :func:`causal_attention_flops`.

    A float64 0-dim tensor on ``doc_ids``' device. Patch projections, encoders and other
    arm-specific parts are the caller's to add.
    """
    b, l = doc_ids.shape
    cfg = decoder.cfg
    dense = matmul_flops(decoder.matmul_params(), b * l, mode)
    return causal_attention_flops(doc_lengths(doc_ids), cfg.n_layers, cfg.dim, mode) + dense


def packed_decoder_flops_bound(decoder: Decoder, rows: int, row_len: int, mode: str = "train") -> int:
    """:func:`packed_decoder_flops` with attention over full rows (PaLM's upper bound)."""
    cfg = decoder.cfg
    attention = full_attention_flops(rows, row_len, cfg.n_layers, cfg.dim) * FLOPS_PER_PARAM[mode] // 6
    return matmul_flops(decoder.matmul_params(), rows * row_len, mode) + attention
