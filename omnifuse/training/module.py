"""The native arm's LightningModule: :class:`NativeLM` over :class:`~omnifuse.model.native.NativeFusion`.

Optimisation, steps, logging and compute accounting live once in
:class:`omnifuse.training.base.FusionModule`, forward and loss on packed rows in
:class:`~omnifuse.training.base.PackedLM`; this module only says how the native model is built and
what a packed batch costs in FLOPs. ``OptimConfig``, ``lr_factor``, ``NonFiniteLoss`` and
``doc_has_modality`` are re-exported from ``base`` for existing imports.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from omnifuse.model.config import NativeConfig
from omnifuse.model.native import NativeFusion
from omnifuse.training.base import NonFiniteLoss, OptimConfig, PackedLM, doc_has_modality, lr_factor
from omnifuse.training.compute import (
    PACKED_DECODER_FLOPS_FORMULA,
    matmul_flops,
    packed_decoder_flops,
    packed_decoder_flops_bound,
)

__all__ = ["NativeLM", "OptimConfig", "lr_factor", "NonFiniteLoss", "doc_has_modality"]


class NativeLM(PackedLM):
    """Native early fusion trained from scratch, one stage.

    Args:
        model: the native model's config (decoder size, patch, modality embedding).
        optim, compile, max_nonfinite, tasks: see :class:`~omnifuse.training.base.FusionModule`.
    """

    flops_formula = PACKED_DECODER_FLOPS_FORMULA

    def __init__(
        self,
        model: NativeConfig,
        optim: OptimConfig = OptimConfig(),
        compile: bool = False,
        max_nonfinite: int = 3,
        tasks: tuple[str, ...] | None = None,
    ):
        super().__init__(optim=optim, compile=compile, max_nonfinite=max_nonfinite, tasks=tasks)
        self.cfg = model
        self.model = NativeFusion(model)

    def setup(self, stage: str) -> None:
        self.check_vocab(self.cfg.decoder.vocab_size)

    def _patch_flops(self, batch: dict[str, torch.Tensor]) -> int:
        """The patch projections run on the media slots only."""
        return sum(
            matmul_flops(sum(p.numel() for p in proj.parameters()), batch[key].shape[0])
            for proj, key in ((self.model.image_proj, "image_patches"), (self.model.audio_proj, "audio_patches"))
            if proj is not None  # a text-only model (NativeConfig.patch_projections=false) has none
        )

    def step_flops(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return packed_decoder_flops(self.model.decoder, batch["doc_ids"]) + self._patch_flops(batch)

    def step_flops_bound(self, batch: dict[str, torch.Tensor]) -> int:
        return packed_decoder_flops_bound(self.model.decoder, *batch["doc_ids"].shape) + self._patch_flops(batch)

    def compute_extras(self) -> dict:
        return {"model_config": asdict(self.cfg)}
