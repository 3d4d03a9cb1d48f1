"""Compute accounting: parameters, tokens by modality, training FLOPs, throughput, MFU.

Training FLOPs per step follow the PaLM appendix-B convention:

    flops_per_token = 6 * N + 12 * n_layers * dim * T

``N`` is the number of non-embedding parameters that see every slot (attention, MLP, norms, the
patch embeddings and the output head: one multiply-add = 2 FLOPs, forward 2N, backward 4N),
``T`` the attention context (the packed row length; packing with block-causal masks makes the
real attention cost smaller, so this is an upper bound, as in PaLM's MFU), and the second term is
QK^T and AV over that context (forward + backward). Every slot of a packed row, padding
included, costs compute, so FLOPs are counted over ``B * L`` slots.
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


def flops_per_token(n_params_dense: int, n_layers: int, dim: int, context: int) -> float:
    """Training (forward + backward) FLOPs per slot; see the module docstring."""
    return 6.0 * n_params_dense + 12.0 * n_layers * dim * context
