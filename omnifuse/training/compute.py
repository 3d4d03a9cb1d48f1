"""Compute accounting: parameters, tokens by modality, training FLOPs, throughput, MFU.

Training FLOPs per step follow the PaLM appendix-B convention (``NativeFusion.flops_per_token``):

    flops_per_token = 6 * N + 12 * n_layers * dim * T

``N`` counts the parameters every slot multiplies through (blocks, final norm, output head and
patch projections; not the embedding lookup): one multiply-add = 2 FLOPs, forward 2N, backward
4N. ``T`` is the attention context (the packed row length; block-causal masks make the real
attention cost smaller, so this is an upper bound, as in PaLM's MFU); the second term is QK^T
and AV over it, forward and backward. Every slot of a packed row, padding included, costs
compute, so FLOPs are counted over ``B * L`` slots.
"""

from __future__ import annotations

import torch

# Dense bf16 peak FLOP/s (no sparsity) by device name substring; MFU is reported only when known.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 125e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def param_counts(module: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}
