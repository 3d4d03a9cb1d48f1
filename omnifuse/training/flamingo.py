"""The Flamingo arm's LightningModule: :class:`FlamingoLM` over :class:`~omnifuse.model.flamingo.Flamingo`.

Parts come from the stages (:class:`~omnifuse.training.bolt_on.BoltOnModule`): the text LM
(``configs/stage/lm.yaml``), the CLIP and CLAP encoders. What trains is Flamingo's recipe: the
Perceiver resamplers and the tanh-gated cross-attention blocks. The LM and the encoders are frozen
(``requires_grad=False``, eval mode, in no optimizer group); ``train_lm: true`` unfreezes the LM
for an ablation (the encoders stay frozen: they run under ``no_grad`` in the model).

Every gate value ``tanh(α)`` (attention and feed-forward, per gated block) is logged as
``gates/layer{i}_attn`` and ``gates/layer{i}_ffn`` (``i``: the decoder block the gated block
precedes) on every step Lightning writes logs (``trainer.log_every_n_steps``), so a user sees
whether vision is being let in; ``eval.py`` draws them (:mod:`omnifuse.eval.gates`).

FLOPs (:data:`FLAMINGO_FLOPS_FORMULA`; :func:`flamingo_step_flops`) charge what a step computes:

- the frozen LM on the LM stream (``B`` rows of ``S`` slots, ``S`` the longest row once the media
  interiors leave it): ``4 N_i`` per slot for each LM block at or above the first gated block
  (gradients flow through it to the gated blocks below), ``2 N_i`` for the blocks below it (nothing
  flows back there), ``4 N`` for the final norm and output head; ``6 N`` everywhere with
  ``train_lm``. Causal self-attention within the stream's documents counts
  ``6 * dim * sum_d n_d (n_d + 1)`` per back-propagated block (attention has no weights: its
  whole backward is input gradients) and ``2 * dim * …`` per forward-only one;
- each gated block (trained): ``6 P`` per stream slot for its query/output projections,
  feed-forward, norms and gates, ``6 P_kv`` per media token for its key/value projections over the
  row's ``T`` media tokens (``T = R * the most media in a row``; every row computes all ``T``),
  and ``12 * dim * S * T`` per row for its ``QK^T`` and ``AV``;
- each resampler (trained), per medium of ``n`` patches and ``R`` latents:
  :func:`resampler_forward_flops` times 3;
- the frozen encoders' forward, per medium: ``PatchEncoder.forward_flops(n)`` (as the LLaVA arm
  counts it; it includes the pooled head, which Flamingo does not run).
"""

from __future__ import annotations

import torch
from torch import nn
from torchtune.modules.model_fusion import FusionLayer

from omnifuse.model.flamingo import Flamingo, FlamingoConfig, PerceiverResampler, kept_slots
from omnifuse.model.media import media_layout
from omnifuse.tokenizers.stream import AUDIO, IMAGE
from omnifuse.training.base import OptimConfig
from omnifuse.training.bolt_on import BoltOnModule
from omnifuse.training.compute import FLOPS_PER_PARAM, causal_attention_flops, doc_lengths, matmul_flops

FLAMINGO_FLOPS_FORMULA = (
    "per step, summed over steps and ranks: frozen LM on the LM stream (B rows x S slots, media interiors removed): "
    "4*N_i per slot for LM blocks at or above the first gated block and for the final norm + head (backward "
    "through), 2*N_i for blocks below it (forward only), 6*N_i everywhere when train_lm; causal self-attention "
    "within the stream's documents 6*dim*sum_d n_d*(n_d+1) per back-propagated block, 2*dim*... per forward-only "
    "block; gated cross-attention blocks (trained): 6*P_slot*B*S + 6*P_kv*B*T + 12*dim*B*S*T each (T = media "
    "tokens per row = R * most media in a row); Perceiver resamplers (trained): 3 * resampler_forward_flops(n) per "
    "medium of n patches; frozen encoders: PatchEncoder.forward_flops(n) per medium (forward only). "
    "omnifuse/training/flamingo.py"
)


def _n_params(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def resampler_forward_flops(resampler: PerceiverResampler, n_patches: int) -> int:
    """Forward FLOPs of one medium of ``n_patches`` patches through ``resampler`` (``R`` latents,
    width ``d``): the input projection on the patches; per layer the media norm on the patches,
    the key/value projections on patches and latents (``n + R``), everything else on the ``R``
    latents, and ``QK^T`` + ``AV`` (``4 * d * R * (n + R)``); the final norm on the latents."""
    r, d = resampler.cfg.n_latents, resampler.cfg.dim
    n, kv = n_patches, n_patches + r
    total = 2 * _n_params(resampler.input_proj) * n + 2 * _n_params(resampler.norm) * r
    for layer in resampler.layers:
        on_media = _n_params(layer.media_norm)
        on_kv = _n_params(layer.attn.k_proj, layer.attn.v_proj)
        on_latents = _n_params(layer) - on_media - on_kv
        total += 2 * (on_media * n + on_kv * kv + on_latents * r) + 4 * d * r * kv
    return total


def cross_attention_params(model: Flamingo) -> tuple[int, int]:
    """``(P_slot, P_kv)`` of one gated block: parameters applied to each LM-stream slot (query and
    output projections, feed-forward, norms, gates) and to each media token (key/value projections
    and the key norm)."""
    block = model.cross_attention_layers()[0]
    p_kv = _n_params(block.attn.k_proj, block.attn.v_proj, block.attn.k_norm)
    return _n_params(block) - p_kv, p_kv


def flamingo_step_flops(model: Flamingo, batch: dict[str, torch.Tensor], train_lm: bool = False) -> torch.Tensor:
    """Training FLOPs of one packed batch (module docstring, :data:`FLAMINGO_FLOPS_FORMULA`): a
    float64 0-dim tensor on the batch's device. Reads only the batch's layout (no forward)."""
    tokens, modality = batch["tokens"], batch["modality"]
    b, l = tokens.shape
    dev = tokens.device
    doc_ids = batch.get("doc_ids")
    if doc_ids is None:
        doc_ids = torch.zeros_like(tokens)
    layouts = {kind: media_layout(tokens, modality, kind) for kind in (IMAGE, AUDIO)}
    row = torch.cat([lay.row for lay in layouts.values()])
    start = torch.cat([lay.start for lay in layouts.values()])
    end = torch.cat([lay.end for lay in layouts.values()])
    kept = kept_slots(b, l, row, start, end)  # (B, L)
    s = int(kept.sum(dim=1).max())  # the LM stream's length: every row computes S slots
    lengths = doc_lengths(torch.where(kept, doc_ids, -1))  # (B, L+1); column 0 mixes pad and removed
    lengths[:, 0] = s - lengths[:, 1:].sum(dim=1)  # the stream's padding document: pad + filler slots
    cfg = model.cfg
    d = cfg.decoder.dim
    r = cfg.resampler.n_latents
    t = r * max(int(torch.bincount(row, minlength=b).max()) if row.numel() else 0, 1)  # media tokens per row

    total = torch.zeros((), dtype=torch.float64, device=dev)
    # the frozen LM: gradients flow back from the loss down to the first gated block
    first = min(cfg.cross_layers())
    blocks = [layer.layer if isinstance(layer, FusionLayer) else layer for layer in model.decoder.layers]
    for i, block in enumerate(blocks):
        back = train_lm or i >= first
        mode = "train" if train_lm else ("backward_through" if back else "forward")
        total += matmul_flops(_n_params(block), b * s, mode)
        total += causal_attention_flops(lengths, 1, d, "train" if back else "forward")
    head = _n_params(model.decoder.norm) + model.decoder.output.weight.numel()
    total += matmul_flops(head, b * s, "train" if train_lm else "backward_through")
    # the gated blocks (trained)
    p_slot, p_kv = cross_attention_params(model)
    n_cross = len(cfg.cross_layers())
    cross_attention = FLOPS_PER_PARAM["train"] * 2 * d * b * s * t  # QK^T and AV, (B, S) queries x T keys
    total += n_cross * (matmul_flops(p_slot, b * s) + matmul_flops(p_kv, b * t) + cross_attention)
    # resamplers (trained) and encoders (frozen, forward) per medium
    for kind, lay in layouts.items():
        encoder = model.image_encoder if kind == IMAGE else model.audio_encoder
        resampler = model.image_resampler if kind == IMAGE else model.audio_resampler
        if not lay.n_items:
            continue
        for n, k in zip(*torch.unique(lay.counts, return_counts=True)):
            n, k = int(n), int(k)
            total += k * (3 * resampler_forward_flops(resampler, n) + encoder.forward_flops(n))
    return total


class FlamingoLM(BoltOnModule):
    """Flamingo trained on packed inline batches; see the module docstring.

    Args:
        model: the arm's config. Leave ``image_encoder`` / ``audio_encoder`` unset (null): they are
            filled from the encoder stage runs when the module is built, and saved with the
            checkpoint (evaluating a run never reads the stage runs). ``decoder`` must match the LM
            stage's (same scale preset).
        train_lm: unfreeze the LM (an ablation; Flamingo keeps it frozen). The encoders stay frozen.
        gate_lr: peak learning rate of the gates' α (``None``: ``optim.lr``), same schedule, no weight
            decay. Each gate is one scalar that starts at 0; with AdamW it moves by about the learning
            rate per step, so a short run can hold the media back by its gates alone.
        lm_ckpt, image_encoder_ckpt, audio_encoder_ckpt, init_from: where the parts come from
            (:class:`~omnifuse.training.bolt_on.BoltOnModule`).
        optim, compile, max_nonfinite, tasks: see :class:`~omnifuse.training.base.FusionModule`.
    """

    flops_formula = FLAMINGO_FLOPS_FORMULA

    def __init__(
        self,
        model: FlamingoConfig,
        train_lm: bool = False,
        gate_lr: float | None = None,
        lm_ckpt: str | None = "runs/lm",
        image_encoder_ckpt: str | None = "runs/clip",
        audio_encoder_ckpt: str | None = "runs/clap",
        init_from: str | None = None,
        optim: OptimConfig = OptimConfig(),
        compile: bool = False,
        max_nonfinite: int = 3,
        tasks: tuple[str, ...] | None = None,
    ):
        super().__init__(
            lm_ckpt=lm_ckpt, image_encoder_ckpt=image_encoder_ckpt, audio_encoder_ckpt=audio_encoder_ckpt,
            init_from=init_from, optim=optim, compile=compile, max_nonfinite=max_nonfinite, tasks=tasks,
        )
        self.fill_encoders(model)  # from the encoder stages (or the init_from run), saved with the checkpoint
        self.cfg = model
        self.train_lm = train_lm
        if gate_lr is not None and gate_lr <= 0:
            raise ValueError(f"FlamingoLM.gate_lr must be positive (or null: optim.lr), got {gate_lr}")
        self.gate_lr = gate_lr
        self.model = Flamingo(model)
        for module in self.model.lm_modules():
            module.requires_grad_(train_lm)
        for module in self.model.encoder_modules():
            module.requires_grad_(False)

    # -- parts -------------------------------------------------------------------------------
    def load_parts(self, lm, image_encoder, audio_encoder) -> None:
        self.model.load_pretrained(lm=lm, image_encoder=image_encoder, audio_encoder=audio_encoder)

    def frozen_modules(self) -> list[nn.Module]:
        lm = [] if self.train_lm else self.model.lm_modules()
        return [*lm, *self.model.encoder_modules()]

    def configure_optimizers(self):
        """The base's AdamW and schedule; with ``gate_lr`` the gates' α form a group of their own
        (that peak learning rate, no decay) under the same warmup + cosine."""
        config = super().configure_optimizers()
        if self.gate_lr is None:
            return config
        opt, old = config["optimizer"], config["lr_scheduler"]["scheduler"]
        gates = [layer.ca_scale.scale for layer in self.model.cross_attention_layers()]
        gates += [layer.mlp_scale.scale for layer in self.model.cross_attention_layers()]
        ids = {id(p) for p in gates}
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        opt.add_param_group({"params": gates, "weight_decay": 0.0, "lr": self.gate_lr, "initial_lr": self.gate_lr})
        # a LambdaLR schedules the groups it was built with: rebuild it over all groups, same lambda
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(opt, old.lr_lambdas[0])
        return config

    # -- steps -------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.loss(batch)  # per_slot (B, L), 0 where unlabelled

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        # the gates this step's forward used (the optimizer step that follows moves them), on the
        # steps Lightning writes logs (on the others they would be computed and dropped)
        if self._log_step:
            self.log_dict(self.gate_values(), on_step=True, batch_size=self._batch_size(batch))
        return loss

    def gate_values(self) -> dict[str, torch.Tensor]:
        """``{"gates/layer{i}_attn": tanh(α), "gates/layer{i}_ffn": ...}`` (0-dim tensors), the names logged."""
        return {f"gates/{name.replace('/', '_')}": value for name, value in self.model.gates().items()}

    def step_flops(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return flamingo_step_flops(self.model, batch, self.train_lm)
