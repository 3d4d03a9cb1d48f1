"""FusionModule (the base every arm subclasses) and the FLOPs helpers of omnifuse.training.compute."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from omnifuse.model.attention import block_causal_bool_mask
from omnifuse.model.config import DecoderConfig, NativeConfig
from omnifuse.training.base import FusionModule, OptimConfig, target_seq_accuracy
from omnifuse.training.compute import causal_attention_flops, doc_lengths, full_attention_flops
from omnifuse.training.module import NativeLM


class Frozen(FusionModule):
    """A toy arm: a frozen encoder (with dropout, so train/eval mode shows) under a trained head."""

    flops_formula = "toy"

    def __init__(self, optim: OptimConfig = OptimConfig(lr=0.05, warmup_steps=0), width: int = 4):
        super().__init__(optim=optim)
        self.model = nn.ModuleDict({
            "encoder": nn.Sequential(nn.Linear(width, width), nn.Dropout(0.5), nn.LayerNorm(width)),
            "head": nn.Linear(width, 1),
        })
        self.model["encoder"].requires_grad_(False)

    def frozen_modules(self):
        return [self.model["encoder"]]

    def compute_loss(self, batch):
        pred = self.model["head"](self.model["encoder"](batch["x"])).squeeze(-1)  # (B,)
        return ((pred - batch["y"]) ** 2).mean(), None

    def step_flops(self, batch):
        return 6.0 * batch["x"].shape[0]

    def count_slots(self, batch):
        return torch.tensor([batch["x"].shape[0], 0, 0, 0])

    def compute_extras(self):
        return {"pretraining_flops": 123.0}


def toy_batches(n: int, width: int = 4):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(8, width, generator=g), "y": torch.randn(8, generator=g)} for _ in range(n)]


def fit(module, batches, root, steps, val=None, **kw):
    kw = {"enable_checkpointing": False, **kw}
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(root), **kw)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None),
                val_dataloaders=DataLoader(val, batch_size=None) if val else None)
    return trainer


def test_frozen_modules_stay_in_eval_mode_out_of_the_optimizer_and_unchanged(tmp_path):
    torch.manual_seed(0)
    module = Frozen()
    encoder_before = {k: v.clone() for k, v in module.model["encoder"].state_dict().items()}
    head_before = module.model["head"].weight.clone()
    seen_modes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_modes.append((pl_module.model["encoder"].training, pl_module.model["head"].training))

    # validation after every step: Lightning switches to eval and back, the encoder must stay in eval
    trainer = fit(module, toy_batches(3), tmp_path, steps=3, val=toy_batches(1), callbacks=[Spy()],
                  val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=1)
    assert seen_modes == [(False, True)] * 3
    groups = trainer.optimizers[0].param_groups
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.model["head"].parameters()}
    assert [len(g["params"]) for g in groups] == [1, 1]  # head weight decays, its bias does not
    assert groups[0]["params"][0] is module.model["head"].weight and groups[0]["weight_decay"] == 0.1
    for k, v in module.model["encoder"].state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    assert not torch.equal(module.model["head"].weight, head_before)
    record = module.compute_record()
    assert record["params_trainable"] == 5 and record["params_total"] == 5 + 20 + 8
    assert record["train_flops"] == 3 * 6.0 * 8 and record["tokens_seen"]["text"] == 24
    assert record["pretraining_flops"] == 123.0 and record["flops_formula"] == "toy"
    assert "train_flops_full_attention_bound" not in record  # the toy gives no bound


def test_a_frozen_module_with_trainable_parameters_is_refused():
    module = Frozen()
    module.model["encoder"][0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"frozen_modules\(\).*requires_grad=True"):
        module.train()


def tiny_native(**kw) -> NativeLM:
    cfg = NativeConfig(DecoderConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_hidden=64, max_seq_len=32),
                       patch=4)
    return NativeLM(cfg, **kw)


def test_compiled_module_saves_the_model_once_under_uncompiled_names():
    torch.manual_seed(0)
    compiled = tiny_native(compile=True)
    compiled.configure_model()  # Lightning's hook: compiles self.model in place
    plain = tiny_native(compile=False)
    keys = list(compiled.state_dict())
    assert len(keys) == len(set(keys))
    assert keys == list(plain.state_dict())
    assert all(k.startswith("model.") for k in keys), [k for k in keys if not k.startswith("model.")]
    assert not any("_orig_mod" in k or "_forward" in k for k in keys)
    plain.load_state_dict(compiled.state_dict(), strict=True)
    for k, v in compiled.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    assert compiled.hparams.compile is True and compiled.hparams.model == plain.hparams.model


def test_checkpoint_with_a_legacy_second_copy_loads():
    """Checkpoints written before in-place compilation carried `_forward.*` duplicates."""
    module = tiny_native()
    state = dict(module.state_dict())
    legacy = {**state, **{f"_forward.{k[len('model.'):]}": v for k, v in state.items()}}
    fresh = tiny_native()
    checkpoint = {"state_dict": legacy}
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.slow
def test_compiled_forward_equals_the_uncompiled_model_it_was_loaded_into():
    """An actual CPU compile (about 30 s on 2 cores): same logits from the compiled module and from an
    uncompiled one that loaded its state dict."""
    from test_train import nan_batches

    torch.manual_seed(0)
    compiled = tiny_native(compile=True)
    compiled.configure_model()
    batch = next(nan_batches(1, set()))
    with torch.no_grad():
        out = compiled(batch)  # (B, L, V)
        plain = tiny_native()
        plain.load_state_dict(compiled.state_dict(), strict=True)
        torch.testing.assert_close(out, plain(batch))
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None


# -- timing ------------------------------------------------------------------------------------

class Sleepy(Frozen):
    """Each training step sleeps `step_s`; so does each validation step (`val_s`)."""

    def __init__(self, step_s: float = 0.1, val_s: float = 0.5):
        super().__init__()
        self.step_s, self.val_s = step_s, val_s
        self.slept = {"train": 0.0, "validation": 0.0}  # measured seconds inside the steps' sleeps

    def _sleep(self, kind: str, seconds: float) -> None:
        t = time.perf_counter()
        time.sleep(seconds)
        self.slept[kind] += time.perf_counter() - t

    def training_step(self, batch, batch_idx):
        self._sleep("train", self.step_s)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self._sleep("validation", self.val_s)
        return super().validation_step(batch, batch_idx)


class SlowCheckpoint(ModelCheckpoint):
    writing = 0.0  # measured seconds spent in the writes (their sleep included)

    def _save_checkpoint(self, trainer, filepath):
        t = time.perf_counter()
        time.sleep(0.5)
        super()._save_checkpoint(trainer, filepath)
        self.writing += time.perf_counter() - t


def test_train_seconds_count_training_steps_only(tmp_path):
    """Validation (0.5 s) and a checkpoint write (0.5 s) after each of 3 steps of 0.1 s: 3 s of
    other work that the old between-batch clock counted as training."""
    module = Sleepy()
    ckpt = SlowCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    t0 = time.perf_counter()
    fit(module, toy_batches(3), tmp_path, steps=3, val=toy_batches(1), callbacks=[ckpt], enable_checkpointing=True,
        val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0)
    wall = time.perf_counter() - t0
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 3
    record = module.compute_record()
    train, val, writes = module.slept["train"], module.slept["validation"], ckpt.writing
    assert train >= 0.3 and val >= 1.5 and writes >= 1.5
    # each clock holds its own steps' measured time, and not the other work between them: the training
    # clock neither the validation runs nor the checkpoint writes, the validation clock not the writes
    assert train <= record["train_seconds"] < train + min(val, writes)
    assert val <= record["validation_seconds"] < val + writes
    assert record["train_seconds"] + record["validation_seconds"] + writes <= wall
    assert record["tokens_per_s"] == pytest.approx(24 / record["train_seconds"])


# -- FLOPs ---------------------------------------------------------------------------------------

def test_doc_lengths_and_causal_attention_flops_by_hand():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    lengths = doc_lengths(doc_ids)
    torch.testing.assert_close(lengths, torch.tensor([[1, 3, 2, 0, 0, 0, 0], [0, 6, 0, 0, 0, 0, 0]]))
    # documents of 1 (padding), 3, 2 and 6 slots: causal (query, key) pairs 1 + 6 + 3 + 21 = 31
    pairs = int(block_causal_bool_mask(doc_ids).sum())
    assert pairs == 31
    # QK^T and AV: 2 matmuls x 2 FLOPs per multiply-add x dim per pair, x3 forward + backward, per layer
    expected = 2 * 2 * 8 * pairs * 3 * 2
    assert float(causal_attention_flops(lengths, n_layers=2, dim=8)) == expected == 5952
    assert float(causal_attention_flops(lengths, n_layers=2, dim=8, mode="forward")) == expected / 3
    assert full_attention_flops(2, 6, n_layers=2, dim=8) == 12 * 2 * 8 * 6 * 2 * 6
    with pytest.raises(ValueError, match="doc_ids must be >= -1"):
        doc_lengths(torch.tensor([[0, -2]]))


def test_native_step_flops_count_documents_and_media_slots():
    module = tiny_native()
    from test_train import nan_batches

    batch = next(nan_batches(1, set()))  # (2, 32) rows, one document each, 8 image slots
    batch["doc_ids"][0, 20:] = 1  # row 0: documents of 20 and 12 slots; row 1: one of 32
    batch["doc_ids"][1, 30:] = -1  # row 1: 30 slots and 2 of padding
    model = module.model
    n = model.decoder.matmul_params()
    image = sum(p.numel() for p in model.image_proj.parameters())
    dim, layers = 32, 1
    attention = 6 * layers * dim * (20 * 21 + 12 * 13 + 30 * 31 + 2 * 3)
    expected = 6 * n * 2 * 32 + attention + 6 * image * 8  # audio: no slots, no cost
    assert float(module.step_flops(batch)) == expected
    bound = 6 * n * 2 * 32 + 12 * layers * dim * 32 * 2 * 32 + 6 * image * 8
    assert module.step_flops_bound(batch) == bound
    # the old figure charged every slot the patch projections and full-row attention
    assert module.step_flops_bound(batch) < model.flops_per_token(32) * 2 * 32


# -- validation metrics --------------------------------------------------------------------------

def test_target_seq_accuracy_by_hand():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1, -1, -1]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    correct = torch.tensor([[1, 1, 1, 0, 0, 1, 0, 0], [0, 0, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    # row 0: doc 0 right, doc 1 wrong, doc 2 has no target; row 1: doc 0 right, doc 1 wrong
    acc, n = target_seq_accuracy(correct, mask, doc_ids)
    assert n == 4
    torch.testing.assert_close(acc, torch.tensor(0.5))


def test_validation_logs_target_seq_acc_not_answer_acc(tmp_path):
    from test_train import nan_batches

    module = tiny_native()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=str(tmp_path))
    batches = list(nan_batches(2, set()))
    with torch.no_grad():  # make rows 0 of batch 0 and row 1 of batch 1 exactly right (labels are not inputs)
        for b, r in ((0, 0), (1, 1)):
            pred = module(batches[b]).argmax(-1)  # (B, L)
            labelled = batches[b]["labels"][r] != -100
            batches[b]["labels"][r, labelled] = pred[r, labelled]
        batches[1]["labels"][1, -1] = (pred[1, -1] + 1) % 64  # ... but one slot of row 1 wrong again
    metrics = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    assert "val/answer_acc" not in metrics
    assert metrics["val/target_seq_acc"] == pytest.approx(1 / 4)  # 4 single-document rows, one right
    assert "val/loss_vqa" in metrics and "val/loss_image_docs" in metrics


def test_a_family_missing_the_contract_cannot_be_built():
    """compute_loss / step_flops (every family) and load_parts (bolt-on) are abstract: leaving one out is a
    TypeError naming it when the module is built, not an error mid-training."""
    from omnifuse.training.base import FusionModule
    from omnifuse.training.bolt_on import BoltOnModule

    class NoFlops(FusionModule):
        def compute_loss(self, batch):
            return torch.zeros(()), None

    with pytest.raises(TypeError, match="step_flops"):
        NoFlops()
    assert {"compute_loss", "step_flops"} <= FusionModule.__abstractmethods__
    assert "load_parts" in BoltOnModule.__abstractmethods__
