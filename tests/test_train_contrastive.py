"""The contrastive stages through train.py: config composition (preset + stage), a short CLIP and
CLAP run whose compute.json is recomputed from its batches, and the trained encoder's features in
the shapes the bolt-on arms read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, subprocess_env
from omnifuse.model.config import DecoderConfig
from omnifuse.model.encoders import ContrastiveConfig, EncoderSize
from omnifuse.training.cli import OmniCLI, named_model_class
from omnifuse.training.contrastive import ContrastiveModule

TINY = str(ROOT / "configs/scale/tiny.yaml")
STAGES = {"image": str(ROOT / "configs/stage/clip.yaml"), "audio": str(ROOT / "configs/stage/clap.yaml")}


def contrastive_args(world: Path, run_dir: Path, modality: str, *extra: str) -> list[str]:
    """Composition of the tiny preset and a stage, shrunk to train a few steps in seconds."""
    return [
        "-c", TINY, "-c", STAGES[modality],
        "--data.world_dir", str(world), "--data.batch_size", "8", "--data.num_workers", "0",
        "--data.shuffle_buffer", "16", "--data.row_len", "64",
        "--model.model.decoder.dim", "32", "--model.model.decoder.n_layers", "1",
        "--model.model.decoder.n_heads", "2", "--model.model.decoder.n_kv_heads", "1",
        "--model.model.decoder.ffn_hidden", "64",
        "--encoder.dim", "32", "--encoder.n_layers", "2", "--encoder.n_heads", "2", "--encoder.ffn_hidden", "64",
        "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.val_check_interval", "1000", "--trainer.limit_val_batches", "1",
        *extra,
    ]


def test_named_model_class_reads_config_files_and_flags(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model:\n  init_args:\n    optim:\n      lr: 0.1\n")
    b.write_text("model:\n  class_path: pkg.B\n")
    assert named_model_class(["fit", "-c", str(a)]) is None
    assert named_model_class(["fit", "-c", str(a), "--config", str(b)]) == "pkg.B"
    assert named_model_class(["fit", f"--config={b}", "--model.class_path", "pkg.C"]) == "pkg.C"
    assert named_model_class(["fit", "--model.class_path=pkg.C", "-c", str(b)]) == "pkg.B"


def test_preset_then_stage_composes(small_world, tmp_path):
    """`-c tiny.yaml -c clip.yaml`: the preset's decoder block sizes the text tower, its top-level
    `encoder:` block the media encoder, the stage's settings win where both speak."""
    cli = OmniCLI(args=["-c", TINY, "-c", STAGES["image"], "--data.world_dir", str(small_world),
                        "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    assert isinstance(cli.model, ContrastiveModule)
    preset = yaml.safe_load(Path(TINY).read_text())
    cfg = cli.model.cfg
    assert cfg.encoder == EncoderSize(**preset["encoder"])
    want = preset["model"]["init_args"]["model"]["decoder"]
    assert {k: getattr(cfg.decoder, k) for k in want} == want
    assert cfg.decoder.vocab_size == preset["data"]["vocab_size"] and cfg.modality == "image"
    assert cli.model.optim_cfg.lr == 1.0e-3 and cli.datamodule.hparams.format == "image_pairs"
    assert cli.datamodule.hparams.batch_size == 128
    enc = cli.model.model.encoder.cfg
    assert (enc.patch_dim, enc.dim, enc.n_layers) == (3 * 8 * 8, preset["encoder"]["dim"], preset["encoder"]["n_layers"])


def test_locked_recipe_composes_after_the_stage(small_world):
    """`-c tiny.yaml -c clip.yaml -c clip-locked.yaml`: every key of the recipe reaches the option it
    names (a misspelt key would be an error or a silent no-op), the rest is clip.yaml's."""
    recipe = str(ROOT / "configs/stage/clip-locked.yaml")
    cli = OmniCLI(args=["-c", TINY, "-c", STAGES["image"], "-c", recipe, "--data.world_dir", str(small_world),
                        "--data.preset", "tiny"], run=False)
    want = yaml.safe_load(Path(recipe).read_text())
    assert isinstance(cli.model, ContrastiveModule)
    assert cli.model.lock_text is True and cli.model.frozen_modules() == [cli.model.model.text, cli.model.model.text_proj]
    assert cli.model.cfg.stem == "conv" and cli.model.model.encoder.cfg.stem == "conv"
    assert cli.datamodule.hparams.upsample == want["data"]["upsample"] == {"digit": 12}
    assert cli.datamodule.hparams.shuffle_buffer == want["data"]["shuffle_buffer"]
    assert cli.trainer.max_steps == want["trainer"]["max_steps"] and cli.datamodule.hparams.batch_size == 128
    assert cli.trainer.default_root_dir == want["trainer"]["default_root_dir"]
    assert cli.model.optim_cfg.lr == 1.0e-3  # clip.yaml's, untouched


def test_native_arm_ignores_the_encoder_block(small_world, tmp_path):
    from omnifuse.training.module import NativeLM

    cli = OmniCLI(args=["-c", TINY, "-c", str(ROOT / "configs/fusion/native.yaml"), "--data.world_dir",
                        str(small_world), "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    assert isinstance(cli.model, NativeLM) and not hasattr(cli.model.cfg, "encoder")


def test_missing_encoder_block_is_named(small_world, tmp_path):
    with pytest.raises(ValueError, match="top-level `encoder:` block"):
        ContrastiveConfig(decoder=DecoderConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2))


def test_stage_refuses_packed_data(small_world, tmp_path):
    args = contrastive_args(small_world, tmp_path / "run", "image", "--data.format", "packed",
                            "--trainer.max_steps", "1")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "trains on data.format=image_pairs" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_stage_run_records_its_compute_and_gives_arm_shaped_features(small_world, tmp_path, modality):
    from omnifuse.data.datamodule import WorldDataModule
    from omnifuse.eval.loading import load_checkpoint_module
    from omnifuse.model.media import group_patches, media_layout, ungroup
    from omnifuse.tokenizers.stream import AUDIO, IMAGE

    run = tmp_path / "run"
    steps = 3
    args = contrastive_args(small_world, run, modality, "--trainer.max_steps", str(steps), "--checkpoint_every", "3")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "omnifuse.training.contrastive.ContrastiveModule"
    assert config["encoder"] == {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64}  # linked into the model

    module = load_checkpoint_module(ContrastiveModule, run / "checkpoints" / "last.ckpt")
    assert module.cfg.encoder == EncoderSize(32, 2, 2, 64)
    compute = json.loads((run / "compute.json").read_text())
    # the same batches again (the stream is a pure function of the seed): what the run must have counted
    dm = WorldDataModule(world_dir=str(small_world), batch_size=8, num_workers=0, shuffle_buffer=16, row_len=64,
                         format=f"{modality}_pairs")
    dm.setup("fit")
    batches = [b for _, b in zip(range(steps), dm._stream(dm.train_shards(), train=True))]
    assert compute["pairs_seen"] == steps * 8 == sum(len(b["captions"]) for b in batches)
    assert compute["train_flops"] == pytest.approx(sum(module.step_flops(b) for b in batches), rel=1e-12)
    kind = "image" if modality == "image" else "audio"
    assert compute["tokens_seen"][kind] == sum(int(b["mask"].sum()) for b in batches)
    assert compute["tokens_seen"]["text"] == sum(int(b["text_lengths"].sum()) for b in batches)
    assert compute["modality"] == modality and compute["global_step"] == steps

    # the arms' view: a packed batch's patches grouped per item -> penultimate features per patch slot
    packed = WorldDataModule(world_dir=str(small_world), batch_size=2, num_workers=0, row_len=256, pack_pool=8)
    packed.setup("fit")
    code = IMAGE if modality == "image" else AUDIO
    key = "image_patches" if modality == "image" else "audio_patches"
    batch = next(b for b in packed.test_dataloader() if b[key].shape[0])
    layout = media_layout(batch["tokens"], batch["modality"], code)
    patches, grid, mask = group_patches(batch[key], layout)
    encoder = module.model.encoder
    with torch.no_grad():
        feats = encoder.patch_features(patches, grid, mask)
        pooled = encoder.embed(patches, grid, mask)
    assert feats.shape == (layout.n_items, patches.shape[1], encoder.width)
    assert ungroup(feats, mask).shape == (batch[key].shape[0], encoder.width)
    assert pooled.shape == (layout.n_items, module.cfg.embed_dim)
    assert torch.isfinite(feats).all()


TOY_SHAPE = (6, 5, 7)  # pairs, patches, text slots of toy_stage's batch


def toy_stage(lock_text: bool = False) -> tuple[ContrastiveModule, dict]:
    """A two-block CLAP stage (SDPA attention, so the flop counter sees its matmuls) and a pair batch."""
    torch.manual_seed(0)
    cfg = ContrastiveConfig(decoder=DecoderConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, ffn_hidden=64,
                                                  attention="sdpa"),
                            encoder=EncoderSize(dim=32, n_layers=2, n_heads=2, ffn_hidden=64), modality="audio",
                            patch=2, embed_dim=16)
    m, n, t = TOY_SHAPE
    batch = {"patches": torch.randn(m, n, 4), "grid": torch.zeros(m, n, 2, dtype=torch.long),
             "mask": torch.ones(m, n, dtype=torch.bool), "text": torch.randint(9, 50, (m, t)),
             "text_lengths": torch.full((m,), t), "captions": [str(i) for i in range(m)]}
    return ContrastiveModule(cfg, lock_text=lock_text), batch


def test_step_flops_against_torch_flop_counter():
    """The formula counts what the flop counter sees, plus three conventions named here: the text
    tower's norm weights count as matmul weights (as the native run's N does), backward is charged
    twice the forward even where no input gradient exists (the patch embedding), and causal
    attention is charged n(n+1)/2 query-key pairs where SDPA's math kernel computes all n²."""
    module, batch = toy_stage()
    cfg, (m, n, t) = module.cfg, TOY_SHAPE
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        module.compute_loss(batch)[0].backward()
    text = module.model.text
    norms = sum(p.numel() for name, p in text.named_parameters() if "norm" in name)
    d = cfg.decoder
    conventions = (6 * norms * m * t + 2 * 4 * 32 * n * m
                   - 6 * d.n_layers * d.dim * m * (2 * t * t - t * (t + 1)))  # counter: 12 L D t^2 per row
    assert module.step_flops(batch) == counter.get_total_flops() + conventions


def test_locked_text_tower_stays_put_and_is_charged_its_forward_only():
    """lock_text: the text tower and its projection never change and get no gradient; the media encoder
    and the temperature learn; the FLOPs are the counter's with the same conventions as the trained
    tower's, at the forward's rate."""
    module, batch = toy_stage(lock_text=True)
    cfg, (m, n, t) = module.cfg, TOY_SHAPE
    module.train()
    assert not module.model.text.training and module.model.encoder.training
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        module.compute_loss(batch)[0].backward()
    text, d = module.model.text, cfg.decoder
    norms = sum(p.numel() for name, p in text.named_parameters() if "norm" in name)
    conventions = (2 * norms * m * t + 2 * 4 * 32 * n * m
                   - 2 * d.n_layers * d.dim * m * (2 * t * t - t * (t + 1)))  # counter: 4 L D t^2 per row
    assert module.step_flops(batch) == counter.get_total_flops() + conventions
    assert module.step_flops(batch) < toy_stage()[0].step_flops(batch)

    frozen = {k: v.clone() for k, v in module.model.state_dict().items() if k.startswith("text")}
    assert all(p.grad is None for p in [*text.parameters(), *module.model.text_proj.parameters()])
    assert all(p.grad is not None for p in module.model.encoder.parameters())
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    before = {k: v.clone() for k, v in module.model.state_dict().items() if not k.startswith("text")}
    for _ in range(3):
        opt.zero_grad()
        module.compute_loss(batch)[0].backward()
        opt.step()
    after = module.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in before.items())
