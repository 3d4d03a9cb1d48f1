"""FusionModule (the base every arm subclasses) and the FLOPs helpers of omnifuse.training.compute."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from omnifuse.model.config import DecoderConfig, NativeConfig
from omnifuse.training.base import FusionModule, OptimConfig
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
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
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
