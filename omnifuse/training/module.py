"""LightningModules: thin wrappers that own optimisation, steps, metrics and compute logging.

Model code (``omnifuse.model``) knows nothing of training; these modules build a model from its
typed config and run it on the packed batches of ``omnifuse.data``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import lightning as L
import torch

from omnifuse.data.packing import IGNORE
from omnifuse.model.config import NativeConfig
from omnifuse.model.decoder import lm_loss
from omnifuse.model.native import NativeFusion
from omnifuse.tokenizers.stream import AUDIO, IMAGE, MODALITIES, TEXT
from omnifuse.training.compute import device_peak_flops, param_counts


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr`` at ``decay_steps``.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW decay, applied to matrices only (not to norms, biases, embeddings).
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warmup from 0.
        decay_steps: optimizer step where the cosine reaches its floor; ``None`` -> trainer.max_steps.
        min_lr_ratio: floor of the cosine, as a fraction of ``lr``.
    """

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimConfig: need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1; got {self}")


def lr_factor(step: int, warmup: int, decay: int, floor: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= decay:
        return floor
    progress = (step - warmup) / max(1, decay - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class NonFiniteLoss(RuntimeError):
    pass


class NativeLM(L.LightningModule):
    """Native early fusion trained from scratch, one stage.

    Args:
        model: the native model's config (decoder size, patch, modality embedding).
        optim: optimizer and schedule.
        compile: wrap the model's forward in ``torch.compile`` (the saved weights stay uncompiled).
        max_nonfinite: consecutive non-finite losses tolerated (each skipped and counted) before
            the run stops with a checkpoint.
        tasks: task names, index-aligned with the batch's ``label_task`` (for per-task losses).
    """

    def __init__(
        self,
        model: NativeConfig,
        optim: OptimConfig = OptimConfig(),
        compile: bool = False,
        max_nonfinite: int = 3,
        tasks: tuple[str, ...] | None = None,
    ):
        super().__init__()
        from omnifuse.data.world import TASKS

        self.save_hyperparameters()
        self.cfg, self.optim_cfg = model, optim
        self.tasks = tuple(tasks or TASKS)
        self.model = NativeFusion(model)
        self._forward = torch.compile(self.model) if compile else self.model
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        # slots seen by modality (text, image, audio, pad); a buffer, so counting stays on the device
        self.register_buffer("tokens_seen", torch.zeros(len(MODALITIES) + 1, dtype=torch.long), persistent=False)
        self.flops_seen = 0.0
        self.train_seconds = 0.0  # wall time between consecutive training batches, summed
        self._step_flops = 0.0  # FLOPs of the current step, all ranks
        self._t_last = None

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        if tok is not None and tok.vocab_size > self.cfg.decoder.vocab_size:
            raise ValueError(
                f"the tokenizer in {dm.world_dir} has {tok.vocab_size} pieces but the model's vocabulary is "
                f"{self.cfg.decoder.vocab_size}: set --data.vocab_size {tok.vocab_size} (or larger)"
            )

    # -- forward / loss ----------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._forward(
            batch["tokens"], batch["modality"], batch["positions"], batch["image_patches"], batch["audio_patches"],
            doc_ids=batch["doc_ids"],
        )  # (B, L, V)

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self(batch)  # (B, L, V)
        loss, per_slot = lm_loss(logits, batch["labels"])  # per_slot (B, L), 0 where ignored
        return loss, per_slot, logits

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        loss, per_slot, _ = self._losses(batch)
        finite = torch.isfinite(loss).float()
        if self.trainer.world_size > 1:  # every rank must agree to skip, or DDP deadlocks
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        self._count_compute(batch)
        if finite.item() < 1:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            self.log("train/nonfinite_steps", float(self.nonfinite_total), on_step=True)
            if self.nonfinite_run > self.hparams.max_nonfinite:
                path = f"{self.trainer.default_root_dir}/nonfinite-step{self.global_step}.ckpt"
                self.trainer.save_checkpoint(path)
                raise NonFiniteLoss(
                    f"{self.nonfinite_run} consecutive non-finite losses at step {self.global_step} "
                    f"(limit max_nonfinite={self.hparams.max_nonfinite}); state saved to {path}. "
                    "Lower the learning rate, enable model.decoder.qk_norm, or check the data."
                )
            return None  # Lightning skips backward and the optimizer step
        self.nonfinite_run = 0
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["tokens"].shape[0])
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # when Lightning writes logs (the breakdown syncs)
            self._log_breakdown("train", batch, per_slot)
        return loss

    def _count_compute(self, batch: dict[str, torch.Tensor]) -> None:
        mod = torch.where(batch["doc_ids"] >= 0, batch["modality"], len(MODALITIES))
        self.tokens_seen += torch.bincount(mod.flatten(), minlength=len(MODALITIES) + 1)
        self._step_flops = self.flops_per_batch(batch["tokens"].shape) * self.trainer.world_size
        self.flops_seen += self._step_flops

    def flops_per_batch(self, shape: torch.Size) -> float:
        b, l = shape
        return self.model.flops_per_token(l) * b * l

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._t_last is not None:
            dt = now - self._t_last
            self.train_seconds += dt
            slots = batch["tokens"].numel() * self.trainer.world_size
            self.log("perf/tokens_per_s", slots / dt, on_step=True)
            peak = device_peak_flops(self.device)
            if peak:
                self.log("perf/mfu", self._step_flops / dt / (peak * self.trainer.world_size), on_step=True)
        self._t_last = now
        for i, name in enumerate((*MODALITIES, "pad")):
            self.log(f"compute/tokens_{name}", self.tokens_seen[i].float(), on_step=True)
        self.log("compute/train_flops", self.flops_seen, on_step=True)

    def _log_breakdown(self, stage: str, batch: dict[str, torch.Tensor], per_slot: torch.Tensor) -> None:
        """Loss per task, and per modality of the document a label belongs to."""
        labelled = batch["labels"] != IGNORE
        task = batch["label_task"]
        on_step = stage == "train"
        for i, name in enumerate(self.tasks):
            m = labelled & (task == i)
            if m.any():
                self.log(f"{stage}/loss_{name}", per_slot[m].mean(), on_step=on_step, on_epoch=not on_step,
                         batch_size=int(m.sum()))
        has = doc_has_modality(batch["doc_ids"], batch["modality"])  # (3, B, L)
        for mod in (TEXT, IMAGE, AUDIO):
            m = labelled & has[mod]
            if m.any():
                self.log(f"{stage}/loss_{MODALITIES[mod]}_docs", per_slot[m].mean(), on_step=on_step,
                         on_epoch=not on_step, batch_size=int(m.sum()))

    # -- validation / test -------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        loss, per_slot, logits = self._losses(batch)
        labels = batch["labels"]
        mask = labels != IGNORE
        n = mask.sum()
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=int(n), sync_dist=True)
        # answer accuracy: a document's answer is right when every target slot's argmax is right
        wrong = (logits.argmax(-1) != labels) & mask  # (B, L)
        doc = batch["doc_ids"].clamp_min(0)
        n_docs = int(doc.max()) + 1
        wrong_doc = torch.zeros(labels.shape[0], n_docs, dtype=torch.bool, device=labels.device)
        wrong_doc.scatter_reduce_(1, doc, wrong, reduce="amax")
        has_doc = torch.zeros_like(wrong_doc).scatter_reduce_(1, doc, mask, reduce="amax")
        if has_doc.any():
            acc = (~wrong_doc[has_doc]).float().mean()
            self.log(f"{stage}/answer_acc", acc, on_epoch=True, batch_size=int(has_doc.sum()), sync_dist=True)
        self._log_breakdown(stage, batch, per_slot)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas, fused=False,
        )
        total = o.decay_steps or self.trainer.max_steps
        if not total or total < 0:
            raise ValueError("set trainer.max_steps or model.optim.decay_steps: the cosine schedule needs a length")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, o.warmup_steps, total, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- compute record ----------------------------------------------------------------------
    def compute_record(self) -> dict:
        """What the run cost, written to the run directory as compute.json."""
        counts = param_counts(self.model)
        slots = int(self.tokens_seen.sum())
        peak = device_peak_flops(self.device)
        world = self.trainer.world_size if self._trainer is not None else 1
        metrics = self.trainer.callback_metrics if self._trainer is not None else {}
        return {
            **counts,
            # slots of rank 0's batches; FLOPs and tokens/s cover all `world_size` ranks
            "tokens_seen": {name: int(self.tokens_seen[i]) for i, name in enumerate((*MODALITIES, "pad"))},
            "world_size": world,
            "train_flops": self.flops_seen,
            "flops_formula": "6 * N + 12 * n_layers * dim * row_len per slot (omnifuse/training/compute.py)",
            "train_seconds": self.train_seconds,
            "tokens_per_s": slots * world / self.train_seconds if self.train_seconds else None,
            "mfu": self.flops_seen / self.train_seconds / (peak * world) if peak and self.train_seconds else None,
            "last_losses": {k: float(v) for k, v in metrics.items() if "/loss" in k},
            "nonfinite_steps": self.nonfinite_total,
            "global_step": int(self.global_step),
            "model_config": asdict(self.cfg),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["omnifuse_compute"] = {
            "tokens_seen": self.tokens_seen.tolist(),
            "flops_seen": self.flops_seen,
            "train_seconds": self.train_seconds,
            "nonfinite_total": self.nonfinite_total,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("omnifuse_compute")
        if state:
            self.tokens_seen.copy_(torch.tensor(state["tokens_seen"], dtype=torch.long))
            self.flops_seen = state["flops_seen"]
            self.train_seconds = state.get("train_seconds", 0.0)
            self.nonfinite_total = state["nonfinite_total"]


def doc_has_modality(doc_ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """(3, B, L) bool: does slot's document contain image / audio slots; TEXT = neither."""
    b, l = doc_ids.shape
    doc = doc_ids.clamp_min(0)
    n = int(doc.max()) + 1 if doc.numel() else 1
    has = torch.zeros(3, b, n, dtype=torch.bool, device=doc_ids.device)
    for mod in (IMAGE, AUDIO):
        has[mod].scatter_reduce_(1, doc, (modality == mod) & (doc_ids >= 0), reduce="amax")
    has[TEXT] = ~(has[IMAGE] | has[AUDIO])
    return torch.gather(has, 2, doc.unsqueeze(0).expand(3, b, l))  # (3, B, L)
