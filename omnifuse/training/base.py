"""``FusionModule``: the one LightningModule base every fusion arm subclasses.

It owns everything that is not the model: AdamW over the trainable parameters with warmup +
cosine, the training / validation / test steps (loss, non-finite policy, logging, per-task and
per-modality breakdowns), the compute counters (slots by modality, FLOPs, train and validation
seconds) written to ``RUN/compute.json``, the checkpoint hooks, optional ``torch.compile``, and
"frozen modules stay frozen and in eval mode". A subclass builds ``self.model`` and says how to
compute a batch's loss and FLOPs; see :class:`FusionModule` for the contract.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import nn

from omnifuse.data.packing import IGNORE
from omnifuse.model.decoder import lm_loss
from omnifuse.tokenizers.stream import AUDIO, IMAGE, MODALITIES, TEXT
from omnifuse.training.compute import device_peak_flops, param_counts

SLOT_NAMES = (*MODALITIES, "pad")  # index-aligned with count_slots()


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


def clock_mark(device: torch.device) -> float | torch.cuda.Event:
    """A point on the device's timeline without waiting for it: the host clock on CPU, an event
    recorded on the current stream on CUDA (read by :func:`clock_seconds`)."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def clock_seconds(start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
    """Seconds from ``start`` to ``end`` (:func:`clock_mark`); waits for ``end`` to complete on CUDA."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000


class StepTimer(Callback):
    """Times training steps (``on_train_batch_start`` -> ``on_train_batch_end``) and validation runs
    into the module's counters.

    A callback rather than module hooks because Lightning runs callbacks' ``on_train_batch_end``
    before the module's, and puts checkpoint callbacks last: ending the clock here keeps the
    checkpoint writes (and the validation that follows a step) out of ``train_seconds``.

    Steps are timed without waiting for the device (:func:`clock_mark`: CUDA events on a GPU), so
    the timer adds no host sync to a step; the module reads the marks back on log steps and when it
    writes its record. Validation runs (rare) synchronise at their two ends.
    """

    def __init__(self) -> None:
        self._t0: float | torch.cuda.Event | None = None
        self._v0: float | None = None

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":  # kernels run asynchronously: wait for them
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = clock_mark(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is not None:
            pl_module._end_step(self._t0, clock_mark(pl_module.device))
            self._t0 = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._v0 = self._now(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._v0 is not None:
            pl_module.validation_seconds += self._now(pl_module) - self._v0
            self._v0 = None


def host_value(value: float) -> torch.Tensor:
    """A 0-dim float64 CPU tensor for ``self.log``: Lightning turns a Python number into a tensor on
    the module's device, a blocking copy (a host sync) on CUDA; a CPU tensor stays where it is."""
    return torch.tensor(float(value), dtype=torch.float64)


def stat_tensor(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``(1,)`` float64 on ``device``: a tensor stays where it is, a Python number is copied without
    waiting for the device."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(1)
    return torch.tensor([float(value)], dtype=torch.float64).to(device, non_blocking=True)


class FusionModule(L.LightningModule, metaclass=abc.ABCMeta):
    """Base LightningModule of every fusion arm: one copy of the optimisation and accounting code.

    Subclass contract (docs/ARCHITECTURE.md, "Training")::

        self.model: nn.Module
            # built by the subclass in __init__, after super().__init__(...); the only saved
            # weights. Every parameter lives under it.
        def compute_loss(self, batch) -> tuple[Tensor, Tensor | None]
            # (mean loss, per-slot losses (B, L) with 0 where unlabelled -- or None for batches
            # that are not packed rows). Call self.model(...) directly: compilation is handled here.
        def step_flops(self, batch) -> float | Tensor
            # training FLOPs of this batch on ONE rank (a float, or a 0-dim tensor that may stay
            # on the device), frozen parts' forward (and backward-through) included; use the
            # helpers of omnifuse.training.compute.

    Optional overrides (defaults in brackets)::

        def frozen_modules(self) -> list[nn.Module]       # [] -- kept in eval mode, params must
                                                          #    have requires_grad False
        def compute_extras(self) -> dict                  # {} -- merged into compute.json
        def count_slots(self, batch) -> LongTensor (len(MODALITIES)+1,)
                                                          # packed-batch counting by `modality`,
                                                          #    slots with doc_ids < 0 as "pad"
        def step_flops_bound(self, batch) -> float | Tensor | None
                                                          # None -- the same count with attention
                                                          #    over full rows (compute.json's
                                                          #    train_flops_full_attention_bound)
        def eval_outputs(self, batch) -> (loss, per_slot | None, correct (B, L) bool | None)
                                                          # (*compute_loss(batch), None); with
                                                          #    `correct` (argmax == label) the
                                                          #    eval steps log target_seq_acc
        flops_formula: str                                # class attribute, copied to compute.json

    A batch with per-slot losses must carry the packed keys ``labels``, ``label_task``,
    ``doc_ids`` and ``modality`` (docs/ARCHITECTURE.md "Packed batch") for the breakdowns.

    Args:
        optim: optimizer and schedule.
        compile: compile ``self.model``'s forward with ``nn.Module.compile`` (in place: the
            state dict keys do not change, so checkpoints load with or without compilation).
        max_nonfinite: consecutive non-finite losses tolerated (each skipped and counted) before
            the run stops with a checkpoint.
        tasks: task names, index-aligned with the batch's ``label_task`` (per-task losses);
            ``None`` -> ``omnifuse.data.world.TASKS``.
    """

    flops_formula: str | None = None

    def __init__(
        self,
        optim: OptimConfig = OptimConfig(),
        compile: bool = False,
        max_nonfinite: int = 3,
        tasks: tuple[str, ...] | None = None,
    ):
        super().__init__()
        from omnifuse.data.world import TASKS

        # Lightning collects the init arguments of every class on the path, the subclass's included
        self.save_hyperparameters()
        self.optim_cfg = optim
        self.compile_model = compile
        self.max_nonfinite = max_nonfinite
        self.tasks = tuple(tasks or TASKS)
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self._skip_step = False  # a non-finite loss in the current optimizer step (all ranks agree)
        # slots seen by modality (text, image, audio, pad), summed over ranks; kept on the host
        # (not a buffer): the step's one sync brings the counts there anyway
        self.tokens_seen = torch.zeros(len(SLOT_NAMES), dtype=torch.long)
        self.flops_seen = 0.0  # all ranks
        self.flops_bound_seen = 0.0  # all ranks; stays 0 when step_flops_bound gives None
        self.train_seconds = 0.0  # training steps only, rank 0's clock
        self.validation_seconds = 0.0
        self._step_marks: list[tuple] = []  # StepTimer's (start, end) marks not yet read back
        self._log_step = False  # the current step is one Lightning writes logs on
        self._window = {"flops": 0.0, "slots": 0, "seconds": 0.0}  # since the last logged perf/ metrics

    # -- subclass contract -------------------------------------------------------------------
    # abstract: a family that leaves one out cannot be built (TypeError naming it, at construction)
    @abc.abstractmethod
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(loss, per-slot losses or None)`` of one batch."""

    @abc.abstractmethod
    def step_flops(self, batch: dict[str, torch.Tensor]) -> float | torch.Tensor:
        """Training FLOPs of one step on ``batch``."""

    def step_flops_bound(self, batch: dict[str, torch.Tensor]) -> float | torch.Tensor | None:
        return None

    def frozen_modules(self) -> list[nn.Module]:
        return []

    def compute_extras(self) -> dict:
        return {}

    def count_slots(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Slots of a packed batch by modality: ``(len(MODALITIES) + 1,)`` long, the last is padding."""
        mod = torch.where(batch["doc_ids"] >= 0, batch["modality"], len(MODALITIES))
        return torch.bincount(mod.flatten(), minlength=len(SLOT_NAMES))

    def eval_outputs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return (*self.compute_loss(batch), None)

    # -- model set-up ------------------------------------------------------------------------
    def check_vocab(self, vocab_size: int) -> None:
        """Refuse a model vocabulary smaller than the datamodule's tokenizer (call from ``setup``)."""
        dm = getattr(self.trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        if tok is not None and tok.vocab_size > vocab_size:
            raise ValueError(
                f"the tokenizer in {dm.world_dir} has {tok.vocab_size} pieces but the model's vocabulary is "
                f"{vocab_size}: set --data.vocab_size {tok.vocab_size} (or larger)"
            )

    def configure_model(self) -> None:
        if self.compile_model and getattr(self.model, "_compiled_call_impl", None) is None:
            self.model.compile()  # in place: no second registered module, no `_orig_mod.` keys

    def configure_callbacks(self):
        """The step timer; a subclass adding callbacks returns ``[*super().configure_callbacks(), ...]``."""
        return [StepTimer()]

    def on_fit_start(self) -> None:
        # Lightning keeps the modes it finds (and restores them after validation): set them once here
        self.train()

    def train(self, mode: bool = True):
        """Frozen modules stay in eval mode (dropout, norms' running stats) whatever Lightning asks."""
        super().train(mode)
        if "model" in self._modules:
            for module in self.frozen_modules():
                trainable = [n for n, p in module.named_parameters() if p.requires_grad]
                if trainable:
                    raise ValueError(
                        f"{type(self).__name__}.frozen_modules() returned a {type(module).__name__} whose parameters "
                        f"{trainable[:3]} have requires_grad=True: freeze them (p.requires_grad_(False)) in __init__"
                    )
                module.eval()
        return self

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, per_slot = self.compute_loss(batch)
        nonfinite, value = self._count_step(batch, loss)
        # Lightning writes on_step logs when (optimizer steps so far + 1) % log_every_n_steps == 0
        self._log_step = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        if nonfinite:
            return self._skip(loss)
        self.nonfinite_run = 0
        # the value the step's sync brought back, on the host: the progress bar reads it every step
        self.log("train/loss", host_value(value), on_step=True, prog_bar=True, batch_size=self._batch_size(batch))
        # the breakdown syncs with the host: only on the steps Lightning writes logs
        if per_slot is not None and self._log_step:
            self._log_breakdown("train", batch, per_slot)
        return loss

    def _count_step(self, batch: dict[str, torch.Tensor], loss: torch.Tensor) -> tuple[bool, float]:
        """Add the step's slots and FLOPs (summed over ranks) to the counters; returns (any rank's
        loss is non-finite, this rank's loss). The step's one host sync and one all-reduce (on
        several ranks): every rank must agree to skip, or DDP deadlocks. The counters and the loss
        to log come back with it, so nothing else in the step waits for the device."""
        dev = loss.device
        bound = self.step_flops_bound(batch)
        stats = torch.cat([
            (~torch.isfinite(loss.detach())).to(torch.float64).view(1),
            stat_tensor(self.step_flops(batch), dev),
            stat_tensor(0.0 if bound is None else bound, dev),
            self.count_slots(batch).to(device=dev, dtype=torch.float64),
        ])
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        nonfinite, flops, flops_bound, *slots, value = torch.cat(
            [stats, loss.detach().to(torch.float64).view(1)]).tolist()
        self.tokens_seen += torch.tensor(slots, dtype=torch.long)
        self.flops_seen += flops
        self.flops_bound_seen += flops_bound
        self._window["flops"] += flops
        self._window["slots"] += int(sum(slots))
        return nonfinite > 0, value

    def _skip(self, loss: torch.Tensor) -> torch.Tensor:
        """Count a non-finite step; stop with a checkpoint past ``max_nonfinite`` in a row.

        Returns a zero loss that reaches every trainable parameter (so that every DDP rank runs
        the same backward and all-reduce); ``on_before_optimizer_step`` then drops the gradients,
        so the optimizer leaves weights and moments untouched.
        """
        self._skip_step = True
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self.log("train/nonfinite_steps", host_value(self.nonfinite_total), on_step=True)
        if self.nonfinite_run > self.max_nonfinite:
            path = f"{self.trainer.default_root_dir}/nonfinite-step{self.global_step}.ckpt"
            self.trainer.save_checkpoint(path)
            raise NonFiniteLoss(
                f"{self.nonfinite_run} consecutive non-finite losses at step {self.global_step} "
                f"(limit max_nonfinite={self.max_nonfinite}); state saved to {path}. "
                "Lower the learning rate, enable model.decoder.qk_norm, or check the data."
            )
        zero = loss.new_zeros(())
        for p in self.parameters():
            if p.requires_grad:
                zero = zero + p.sum() * 0.0  # gradient exactly 0, whatever the batch held
        return zero

    def on_before_optimizer_step(self, optimizer) -> None:
        # A skipped step: no gradients at all, so AdamW changes neither weights (decay included)
        # nor moments nor step counts. With gradient accumulation the whole optimizer step goes.
        if self._skip_step:
            optimizer.zero_grad(set_to_none=True)
            self._skip_step = False

    def _end_step(self, start, end) -> None:
        """Called by :class:`StepTimer` with one training step's clock marks. On log steps the marks
        are read back and the throughput since the last log step is logged (``perf/tokens_per_s``,
        ``perf/mfu`` on a GPU of known peak), with the running counters (``compute/*``)."""
        self._step_marks.append((start, end))
        if not self._log_step:
            return
        self._read_step_marks()
        w = self._window
        if w["seconds"] > 0:
            self.log("perf/tokens_per_s", host_value(w["slots"] / w["seconds"]), on_step=True)
            peak = device_peak_flops(self.device)
            if peak:
                self.log("perf/mfu", host_value(w["flops"] / w["seconds"] / (peak * self.trainer.world_size)),
                         on_step=True)
        for i, name in enumerate(SLOT_NAMES):
            self.log(f"compute/tokens_{name}", host_value(self.tokens_seen[i]), on_step=True)
        self.log("compute/train_flops", host_value(self.flops_seen), on_step=True)
        self._window = {"flops": 0.0, "slots": 0, "seconds": 0.0}

    def _read_step_marks(self) -> None:
        """Add the timed steps not yet counted to ``train_seconds`` (waits for the last on CUDA)."""
        for start, end in self._step_marks:
            seconds = clock_seconds(start, end)
            self.train_seconds += seconds
            self._window["seconds"] += seconds
        self._step_marks.clear()

    @staticmethod
    def _batch_size(batch: dict) -> int:
        """Rows of a packed batch (``tokens``), else the leading size of the batch's first tensor."""
        first = batch.get("tokens")
        if first is None:
            first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
        return int(first.shape[0])

    def _log_breakdown(self, stage: str, batch: dict[str, torch.Tensor], per_slot: torch.Tensor) -> None:
        """Loss per task, and per modality of the document a label belongs to: the means of all the
        groups come back to the host together (one sync), and groups without a label are not logged."""
        labelled = batch["labels"] != IGNORE
        task = batch["label_task"]
        has = doc_has_modality(batch["doc_ids"], batch["modality"])  # (3, B, L)
        names = [f"{stage}/loss_{name}" for name in self.tasks]
        names += [f"{stage}/loss_{MODALITIES[mod]}_docs" for mod in (TEXT, IMAGE, AUDIO)]
        groups = torch.stack([labelled & (task == i) for i in range(len(self.tasks))]
                             + [labelled & has[mod] for mod in (TEXT, IMAGE, AUDIO)]).flatten(1)  # (G, B*L)
        sums = torch.where(groups, per_slot.detach().flatten().to(torch.float64), 0.0).sum(dim=1)  # (G,)
        counts = groups.sum(dim=1)  # (G,)
        on_step = stage == "train"
        for name, (total, n) in zip(names, torch.stack([sums, counts.to(torch.float64)], dim=1).tolist()):
            if n:
                self.log(name, host_value(total / n), on_step=on_step, on_epoch=not on_step, batch_size=int(n))

    # -- validation / test -------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        loss, per_slot, correct = self.eval_outputs(batch)
        if per_slot is None:
            self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=self._batch_size(batch),
                     sync_dist=True)
            return
        mask = batch["labels"] != IGNORE
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=int(mask.sum()), sync_dist=True)
        if correct is not None:
            acc, n = target_seq_accuracy(correct, mask, batch["doc_ids"])
            if n:
                self.log(f"{stage}/target_seq_acc", acc, on_epoch=True, batch_size=n, sync_dist=True)
        self._log_breakdown(stage, batch, per_slot)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW over the trainable parameters only: matrices decay; norms, biases and embeddings
        do not. Frozen parameters enter no group."""
        o = self.optim_cfg
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
        if not decay and not no_decay:
            raise ValueError(f"{type(self).__name__} has no trainable parameters: nothing to optimise")
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
        """What the run cost, written to the run directory as compute.json.

        ``tokens_seen`` and the FLOPs are summed over all ``world_size`` ranks; ``train_seconds``
        is rank 0's time inside training steps (data waits between steps, validation and
        checkpoint writes excluded), ``validation_seconds`` its time in validation runs.
        """
        self._read_step_marks()
        slots = int(self.tokens_seen.sum())
        peak = device_peak_flops(self.device)
        world = self.trainer.world_size if self._trainer is not None else 1
        metrics = self.trainer.callback_metrics if self._trainer is not None else {}
        record = {
            **param_counts(self.model),
            "tokens_seen": {name: int(self.tokens_seen[i]) for i, name in enumerate(SLOT_NAMES)},
            "world_size": world,
            "train_flops": self.flops_seen,
            "flops_formula": self.flops_formula,
            "train_seconds": self.train_seconds,
            "validation_seconds": self.validation_seconds,
            "tokens_per_s": slots / self.train_seconds if self.train_seconds else None,
            "mfu": self.flops_seen / self.train_seconds / (peak * world) if peak and self.train_seconds else None,
            "last_losses": {k: float(v) for k, v in metrics.items() if "/loss" in k},
            "nonfinite_steps": self.nonfinite_total,
            "global_step": int(self.global_step),
        }
        if self.flops_bound_seen:
            record["train_flops_full_attention_bound"] = self.flops_bound_seen
        return {**record, **self.compute_extras()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._read_step_marks()
        checkpoint["omnifuse_compute"] = {
            "tokens_seen": self.tokens_seen.tolist(),
            "flops_seen": self.flops_seen,
            "flops_bound_seen": self.flops_bound_seen,
            "train_seconds": self.train_seconds,
            "validation_seconds": self.validation_seconds,
            "nonfinite_total": self.nonfinite_total,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints written before the model was compiled in place hold a second copy of the
        # weights under `_forward.` (`_forward._orig_mod.` when compiled): the same tensors as `model.`.
        weights = checkpoint.get("state_dict", {})
        for key in [k for k in weights if k.startswith("_forward.")]:
            del weights[key]
        state = checkpoint.get("omnifuse_compute")
        if state:
            self.tokens_seen.copy_(torch.tensor(state["tokens_seen"], dtype=torch.long))
            self.flops_seen = state["flops_seen"]
            self.flops_bound_seen = state.get("flops_bound_seen", 0.0)
            self.train_seconds = state.get("train_seconds", 0.0)
            self.validation_seconds = state.get("validation_seconds", 0.0)
            self.nonfinite_total = state["nonfinite_total"]


def target_seq_accuracy(correct: torch.Tensor, mask: torch.Tensor, doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fraction of documents whose every target slot is right: ``correct, mask, doc_ids (B, L)``.

    Counts every document with a target (captions and prose as well as answers), so it is the
    exact-sequence accuracy of the training targets, not a QA accuracy. Returns ``(accuracy, n_docs)``.
    """
    wrong = ~correct & mask  # (B, L)
    doc = doc_ids.clamp_min(0)
    n_docs = int(doc.max()) + 1 if doc.numel() else 1
    wrong_doc = torch.zeros(doc.shape[0], n_docs, dtype=torch.bool, device=doc.device)
    wrong_doc.scatter_reduce_(1, doc, wrong, reduce="amax")  # (B, n_docs)
    has_doc = torch.zeros_like(wrong_doc).scatter_reduce_(1, doc, mask, reduce="amax")  # (B, n_docs)
    n = int(has_doc.sum())
    return (~wrong_doc[has_doc]).float().mean() if n else wrong_doc.new_zeros((), dtype=torch.float), n


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


class PackedLM(FusionModule):
    """A :class:`FusionModule` on packed rows whose ``model`` maps the stream to next-token logits
    (NativeLM, LLaVALM, FlamingoLM): their shared forward, loss and eval outputs. A subclass brings
    ``self.model`` and ``step_flops``."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(
            batch["tokens"], batch["modality"], batch["positions"], batch.get("image_patches"),
            batch.get("audio_patches"), doc_ids=batch.get("doc_ids"),
        )  # (B, L, V)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_loss(self(batch), batch["labels"])  # per_slot (B, L), 0 where ignored

    def eval_outputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self(batch)  # (B, L, V)
        loss, per_slot = lm_loss(logits, batch["labels"])
        return loss, per_slot, logits.argmax(-1) == batch["labels"]
