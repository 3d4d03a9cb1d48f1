"""LLaVA's LightningModule: :class:`LLaVALM` over :class:`~omnifuse.model.llava.LLaVAFusion`, in two stages.

    configs/fusion/llava.yaml     the arm (LLaVALM, 1-D positions, the parts' runs) + stage 2, and init_stage
    configs/stage/llava-1.yaml    alignment: train_projector: true, train_lm: false; captions; lr 1e-3
    configs/stage/llava-2.yaml    instruction tuning: train_projector: true, train_lm: true; every task;
                                  init_from stage 1's run

    python train.py fit -c configs/scale/tiny.yaml -c configs/fusion/llava.yaml     # both stages, when stage 1's
                                                                                     # run is missing (cli.py)
    ... -c configs/fusion/llava.yaml -c configs/stage/llava-1.yaml                   # stage 1 alone
    ... -c configs/fusion/llava.yaml --init_stage null                               # stage 2 alone

The encoders never train (LLaVA-1.5). Which of the other parts train is one knob per part
(nanoVLM's freezing knobs); a frozen part has ``requires_grad=False``, stays in eval mode
(:meth:`FusionModule.frozen_modules`) and enters no optimizer group. Where the parts come from (the
LM, CLIP and CLAP stage runs, or a whole earlier LLaVA run with ``init_from``) and what they cost
is :class:`~omnifuse.training.bolt_on.BoltOnModule`'s.

Training FLOPs of a step (:data:`LLAVA_FLOPS_FORMULA`, Kaplan / PaLM counting as in
:mod:`omnifuse.training.compute`): the decoder at ``6N`` per slot when it trains and ``4N`` when it
is frozen but the projectors train (the gradient flows back through it to the media slots, no
weight gradient); its causal attention always forward + backward (attention has no weights, so a
frozen decoder saves nothing there); the projectors ``6P`` per media slot when trained, ``2P``
when frozen; the frozen encoders' forward over every item, padding included (items are padded to
the longest of their kind in the batch), through the blocks up to ``feature_layer`` only
(:func:`encoder_feature_flops`; the blocks after it and the pooled head never run).
"""

from __future__ import annotations

import torch
from torch import nn

from omnifuse.model.encoders import PatchEncoder
from omnifuse.model.llava import LLaVAConfig, LLaVAFusion
from omnifuse.model.media import media_layout
from omnifuse.tokenizers.stream import AUDIO, IMAGE
from omnifuse.training.base import OptimConfig
from omnifuse.training.bolt_on import BoltOnModule
from omnifuse.training.compute import causal_attention_flops, doc_lengths, matmul_flops

LLAVA_FLOPS_FORMULA = (
    "per step: c_lm*N*B*L + 6*n_layers*dim*sum_d n_d*(n_d+1) + c_proj*sum_m P_m*S_m "
    "+ sum_m M_m*F_m(n_max_m); c_lm = 6 if the LM trains, 4 if frozen (gradients flow through it to the "
    "projectors); c_proj = 6 if the projectors train, 2 if frozen; N = decoder matmul parameters (blocks, "
    "final norm, output head), B*L = slots of the packed rows (padding included), n_d = slots of document d "
    "of a row (causal attention, always forward + backward: it has no weights to freeze), P_m = parameters "
    "of modality m's projector, S_m = its media slots, M_m = its items (images, clips) and n_max_m the most "
    "patches of one (items are padded to it), F_m(n) = forward FLOPs of the frozen encoder on one item up to "
    "feature_layer: E(n) + k*(2*N_block*(n+1) + 4*dim*(n+1)^2), k = blocks run, E(n) = the patch embedding "
    "(2*patch_dim*dim*n linear, PatchEncoder.embed_flops for the conv stem); summed over steps and ranks. omnifuse/training/llava.py"
)


def encoder_feature_flops(encoder: PatchEncoder, n_patches: int, layer: int) -> int:
    """Forward FLOPs of :meth:`PatchEncoder.patch_features` on one item of ``n_patches`` patches
    (sequence ``S = n_patches + 1`` with the class token): the patch embedding (:meth:`PatchEncoder.embed_flops`), then the blocks up
    to and including ``layer`` (a Python index; the ones after it and the pooled head never run).
    Same counting as :meth:`PatchEncoder.forward_flops`, which bounds this from above."""
    cfg, s = encoder.cfg, n_patches + 1
    blocks_run = layer % cfg.n_layers + 1  # the arm config checked that the index exists
    per_block = encoder.block_matmul_params() // cfg.n_layers  # identical blocks
    return encoder.embed_flops(n_patches) + blocks_run * (2 * per_block * s + 4 * cfg.dim * s * s)


class LLaVALM(BoltOnModule):
    """The LLaVA arm trained from the LM, CLIP and CLAP stages (module docstring).

    Args:
        model: the arm's config. Leave ``image_encoder`` / ``audio_encoder`` unset (null): they are
            read from the encoder stage runs (or from ``init_from``'s run) when the module is built,
            and saved with its hyper-parameters.
        train_projector: the projectors train (both stages of LLaVA).
        train_lm: the decoder trains (stage 2); frozen otherwise (stage 1). At least one part must train.
        lm_ckpt, image_encoder_ckpt, audio_encoder_ckpt, init_from: where the weights come from
            (:class:`~omnifuse.training.bolt_on.BoltOnModule`); stage 2 sets ``init_from`` to stage 1's run.
        optim, compile, max_nonfinite, tasks: see :class:`~omnifuse.training.base.FusionModule`.
    """

    flops_formula = LLAVA_FLOPS_FORMULA
    init_from_command = (
        "python train.py fit -c configs/scale/tiny.yaml -c configs/fusion/llava.yaml -c configs/stage/llava-1.yaml"
    )

    def __init__(
        self,
        model: LLaVAConfig,
        train_projector: bool = True,
        train_lm: bool = False,
        lm_ckpt: str | None = "runs/lm",
        image_encoder_ckpt: str | None = "runs/clip",
        audio_encoder_ckpt: str | None = "runs/clap",
        init_from: str | None = None,
        optim: OptimConfig = OptimConfig(),
        compile: bool = False,
        max_nonfinite: int = 3,
        tasks: tuple[str, ...] | None = None,
    ):
        if not (train_projector or train_lm):
            raise ValueError("LLaVALM: train_projector and train_lm are both false: nothing would train")
        super().__init__(lm_ckpt=lm_ckpt, image_encoder_ckpt=image_encoder_ckpt, audio_encoder_ckpt=audio_encoder_ckpt,
                         init_from=init_from, optim=optim, compile=compile, max_nonfinite=max_nonfinite, tasks=tasks)
        if image_encoder_ckpt is None or audio_encoder_ckpt is None:
            raise ValueError("LLaVALM builds both encoders: model.image_encoder_ckpt and model.audio_encoder_ckpt must "
                             "name the CLIP and CLAP stage runs")
        self.train_projector, self.train_lm = train_projector, train_lm
        self.fill_encoders(model)  # in place: the filled config is the saved hyper-parameter
        self.cfg = model
        self.model = LLaVAFusion(model)
        self.model.decoder.requires_grad_(train_lm)
        for projector in self.model.projectors():
            projector.requires_grad_(train_projector)

    # -- parts -------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        frozen: list[nn.Module] = list(self.model.encoders())
        if not self.train_lm:
            frozen.append(self.model.decoder)
        if not self.train_projector:
            frozen.extend(self.model.projectors())
        return frozen

    def load_parts(self, lm, image_encoder, audio_encoder) -> None:
        self.model.decoder.load_state_dict(lm, strict=True)
        self.model.image_encoder.load_state_dict(image_encoder, strict=True)
        self.model.audio_encoder.load_state_dict(audio_encoder, strict=True)

    # -- FusionModule contract ---------------------------------------------------------------
    def step_flops(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training FLOPs of one packed batch on one rank (:data:`LLAVA_FLOPS_FORMULA`)."""
        m, doc_ids = self.model, batch["doc_ids"]
        b, l = doc_ids.shape
        dcfg = m.decoder.cfg
        flops = matmul_flops(m.decoder.matmul_params(), b * l, "train" if self.train_lm else "backward_through")
        flops = flops + causal_attention_flops(doc_lengths(doc_ids), dcfg.n_layers, dcfg.dim, "train")
        proj_mode = "train" if self.train_projector else "forward"
        for params, key in zip(m.projector_params(), ("image_patches", "audio_patches")):
            flops = flops + matmul_flops(params, batch[key].shape[0], proj_mode)
        return flops + self.encoder_flops(batch["tokens"], batch["modality"])

    def encoder_flops(self, tokens: torch.Tensor, modality: torch.Tensor) -> int:
        """Forward FLOPs of the frozen encoders on a batch ``tokens, modality (B, L)``: every item of
        a kind padded to the longest, as :meth:`LLaVAFusion.media_features` runs them."""
        total = 0
        for kind, encoder in ((IMAGE, self.model.image_encoder), (AUDIO, self.model.audio_encoder)):
            counts = media_layout(tokens, modality, kind).counts  # (M,)
            if counts.numel():
                n_max = int(counts.max())
                total += counts.numel() * encoder_feature_flops(encoder, n_max, self.cfg.feature_layer)
        return total

    def compute_extras(self) -> dict:
        return {**super().compute_extras(), "trains": {"projectors": self.train_projector, "lm": self.train_lm,
                                                      "encoders": False}}
