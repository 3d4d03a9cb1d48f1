"""LLaVA training (issue 9): frozen parts stay bit-identical and out of the optimizer, stage 1 trains
only the projectors and stage 2 the LM too, FLOPs against a hand count (the frozen encoders' forward
against torch's flop counter), the one two-stage command and its run directories, pretraining FLOPs,
clear errors for missing or mismatched parts, eval without the stage runs, exact resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, subprocess_env, tiny_train_args
from omnifuse.model.llava import LLaVAConfig
from omnifuse.tokenizers.stream import AUDIO, IMAGE
from omnifuse.training.cli import OmniCLI, init_stage_args
from omnifuse.training.llava import LLaVALM
from omnifuse.training.pretrained import load_encoder, load_lm, sub_state_dict

FUSION = "configs/fusion/llava.yaml"
STAGE1, STAGE2 = ROOT / "configs/stage/llava-1.yaml", ROOT / "configs/stage/llava-2.yaml"


def parts(stage_runs) -> list[str]:
    return ["--model.lm_ckpt", str(stage_runs["lm"]), "--model.image_encoder_ckpt", str(stage_runs["clip"]),
            "--model.audio_encoder_ckpt", str(stage_runs["clap"])]


def stage1_cli(world, stage_runs, tmp_path, *extra) -> OmniCLI:
    """Stage 1's module and datamodule, built in-process from the configs (no run)."""
    args = tiny_train_args(world, tmp_path / "run", *parts(stage_runs), *extra, config=FUSION)
    at = args.index(str(ROOT / FUSION)) + 1
    return OmniCLI(args=[*args[1:at], "-c", str(STAGE1), *args[at:]], run=False)


def batches(cli: OmniCLI, n: int) -> list[dict]:
    cli.datamodule.setup("fit")
    return [b for _, b in zip(range(n), cli.datamodule.train_dataloader())]


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def changed(before, after, prefix) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


class ModeProbe(L.Callback):
    """Records, at every training step, whether the frozen modules were in eval mode."""

    def __init__(self):
        self.frozen_training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.frozen_training += [m.training for m in pl_module.frozen_modules()]


def one_step(module, batch, tmp_path) -> ModeProbe:
    probe = ModeProbe()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path),
                        callbacks=[probe])
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    return probe


@pytest.mark.parametrize("train_lm", [False, True], ids=["stage1", "stage2"])
def test_a_step_changes_only_what_trains(small_world, stage_runs, tmp_path, train_lm):
    cli = stage1_cli(small_world, stage_runs, tmp_path, "--model.train_lm", str(train_lm).lower(),
                     "--model.optim.warmup_steps", "0", "--model.optim.decay_steps", "10")
    module: LLaVALM = cli.model
    (batch,) = batches(cli, 1)
    assert (batch["modality"] == IMAGE).any() and (batch["modality"] == AUDIO).any()  # captions of both kinds
    module.load_pretrained()
    opt = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = [*module.model.image_projector.parameters(), *module.model.audio_projector.parameters()]
    if train_lm:
        trainable += list(module.model.decoder.parameters())
    assert in_optimizer == {id(p) for p in trainable}
    assert all(p.requires_grad == (id(p) in in_optimizer) for p in module.parameters())

    before = state(module)
    probe = one_step(module, batch, tmp_path)
    after = state(module)
    assert probe.frozen_training and not any(probe.frozen_training)  # frozen modules in eval mode while training
    assert not changed(before, after, "image_encoder.") and not changed(before, after, "audio_encoder.")
    assert changed(before, after, "decoder.") == train_lm
    assert changed(before, after, "image_projector.") and changed(before, after, "audio_projector.")
    if not train_lm:  # stage 1 changes nothing but the projectors
        assert all(torch.equal(before[k], after[k]) for k in before if "_projector." not in k)


def test_step_flops_by_hand(small_world, stage_runs, tmp_path):
    cli = stage1_cli(small_world, stage_runs, tmp_path)
    module: LLaVALM = cli.model
    (batch,) = batches(cli, 1)
    m, dec = module.model, module.model.decoder.cfg
    tokens, modality, doc_ids = batch["tokens"], batch["modality"], batch["doc_ids"]

    # The frozen encoders' forward (and the projectors' weight matmuls): torch's own count of the
    # media embedding, attention seen as the math backend's bmm's.
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        m.embed(tokens, modality, batch["image_patches"], batch["audio_patches"])
    slots = {"image_patches": batch["image_patches"].shape[0], "audio_patches": batch["audio_patches"].shape[0]}
    proj_weights = [sum(p.numel() for p in proj.parameters() if p.ndim == 2) for proj in m.projectors()]
    proj_forward = 2 * (proj_weights[0] * slots["image_patches"] + proj_weights[1] * slots["audio_patches"])
    encoders = counter.get_total_flops() - proj_forward
    assert encoders == module.encoder_flops(tokens, modality) > 0

    b, l = tokens.shape
    n_matmul = m.decoder.matmul_params()
    attention = 6 * dec.n_layers * dec.dim * sum(n * (n + 1) for row in doc_ids.tolist() for n in Counter(row).values())
    proj_params = [sum(p.numel() for p in proj.parameters()) for proj in m.projectors()]
    projectors = 6 * (proj_params[0] * slots["image_patches"] + proj_params[1] * slots["audio_patches"])
    stage1 = 4 * n_matmul * b * l + attention + projectors + encoders  # the frozen LM: forward + input gradients
    assert float(module.step_flops(batch)) == pytest.approx(stage1, rel=1e-12)
    module.train_lm = True  # stage 2's knob: the LM's weight gradients on top, nothing else
    assert float(module.step_flops(batch)) == pytest.approx(stage1 + 2 * n_matmul * b * l, rel=1e-12)


def test_configs_compose_stage_by_stage():
    """Stage 1's file sets every key stage 2's sets (nothing of stage 2 leaks into the stage-1 run
    the one command makes), and the fusion config holds stage 2's keys with the same values."""

    def leaves(d, prefix=()):
        for k, v in d.items():
            yield from leaves(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]

    s1, s2 = (dict(leaves(yaml.safe_load(p.read_text()))) for p in (STAGE1, STAGE2))
    fusion = dict(leaves(yaml.safe_load((ROOT / FUSION).read_text())))
    assert set(s2) - {("init_stage",)} <= set(s1)
    assert {k: v for k, v in s2.items() if k != ("init_stage",)} == {k: fusion[k] for k in s2 if k != ("init_stage",)}
    assert fusion[("init_stage",)] == "configs/stage/llava-1.yaml" and s1[("init_stage",)] is None
    assert s1[("model", "init_args", "train_lm")] is False and s2[("model", "init_args", "train_lm")] is True
    for ablation in sorted((ROOT / "configs/fusion").glob("llava-*.yaml")):  # each in its own run directories
        a = dict(leaves(yaml.safe_load(ablation.read_text())))
        assert a[("trainer", "default_root_dir")] != fusion[("trainer", "default_root_dir")], ablation.name
        init_from = a.get(("model", "init_args", "init_from"), fusion[("model", "init_args", "init_from")])
        assert init_from is None or init_from != fusion[("model", "init_args", "init_from")], ablation.name

    args = ["fit", "-c", "tiny.yaml", "-c", "llava.yaml", "--x", "1", "--ckpt_path", "a.ckpt", "--y=2"]
    assert init_stage_args(args, "s1.yaml", "runs/s1", None) == [
        "fit", "-c", "tiny.yaml", "-c", "llava.yaml", "-c", "s1.yaml", "--x", "1", "--y=2",
        "--trainer.default_root_dir", "runs/s1", "--model.init_from", "null", "--init_stage", "null"]
    assert init_stage_args(args, "s1.yaml", "runs/s1", Path("r.ckpt"))[-2:] == ["--ckpt_path", "r.ckpt"]


def test_missing_or_mismatched_parts_name_the_path_and_the_stage_command(small_world, stage_runs, tmp_path):
    module = stage1_cli(small_world, stage_runs, tmp_path).model
    cfg = dataclasses.replace(module.cfg)
    kw = dict(lm_ckpt=str(stage_runs["lm"]), image_encoder_ckpt=str(stage_runs["clip"]),
              audio_encoder_ckpt=str(stage_runs["clap"]))
    nowhere = tmp_path / "nowhere"
    at_nowhere, lm_run = re.escape(str(nowhere)), re.escape(str(stage_runs["lm"]))
    with pytest.raises(FileNotFoundError, match=rf"{at_nowhere}.*configs/stage/lm\.yaml"):
        LLaVALM(cfg, **{**kw, "lm_ckpt": str(nowhere)}).load_pretrained()
    wider = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, dim=64, mrope_sections=None))
    with pytest.raises(ValueError, match=rf"{lm_run}.*dim: arm 64 vs LM 32.*configs/stage/lm\.yaml"):
        LLaVALM(wider, **kw).load_pretrained()
    def blank():  # encoders to be read from the runs (filled in place: a fresh config each time)
        return dataclasses.replace(cfg, image_encoder=None, audio_encoder=None)

    with pytest.raises(FileNotFoundError, match=rf"{at_nowhere}.*configs/stage/clap\.yaml"):
        LLaVALM(blank(), **{**kw, "audio_encoder_ckpt": str(nowhere)})
    with pytest.raises(ValueError, match="configs/stage/clip.yaml"):  # a CLAP run where CLIP belongs
        LLaVALM(blank(), **{**kw, "image_encoder_ckpt": str(stage_runs["clap"])})
    with pytest.raises(FileNotFoundError, match=rf"{at_nowhere}.*configs/stage/llava-1\.yaml"):
        LLaVALM(blank(), **kw, init_from=str(nowhere))
    with pytest.raises(ValueError, match="nothing would train"):
        LLaVALM(cfg, **kw, train_projector=False)


# -- the one command, end to end -----------------------------------------------------------------

TRAIN = [sys.executable, str(ROOT / "train.py")]


def step_losses(run_dir: Path) -> dict[int, float]:
    versions = sorted((run_dir / "logs" / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = list(csv.DictReader(open(versions[-1] / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(scope="module")
def two_stage(small_world, stage_runs, tmp_path_factory):
    """``train.py fit -c tiny -c configs/fusion/llava.yaml``: 4 steps per stage, checkpoints every 2."""
    root = tmp_path_factory.mktemp("llava")
    run1, run2 = root / "llava-1", root / "llava"
    args = tiny_train_args(small_world, run2, *parts(stage_runs), "--model.init_from", str(run1),
                           "--trainer.max_steps", "4", "--checkpoint_every", "2", "--model.optim.warmup_steps", "1",
                           config=FUSION)
    # cwd: init_stage is relative to the current directory, as every path in the configs
    proc = subprocess.run(TRAIN + args, env=subprocess_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run1, run2, args


def weights(run: Path, prefix: str) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return sub_state_dict(ckpt["state_dict"], prefix)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_stage_command_leaves_two_runs_with_their_parts_and_costs(two_stage, stage_runs):
    run1, run2, _ = two_stage
    c1, c2 = (json.loads((r / "compute.json").read_text()) for r in (run1, run2))
    cfg1, cfg2 = (yaml.safe_load((r / "config.yaml").read_text()) for r in (run1, run2))
    assert cfg1["data"]["tasks"] == ["caption", "audio_caption"] and cfg2["data"].get("tasks") is None
    assert cfg1["model"]["init_args"]["train_lm"] is False and cfg2["model"]["init_args"]["init_from"] == str(run1)
    assert c1["global_step"] == c2["global_step"] == 4
    assert c1["trains"] == {"projectors": True, "lm": False, "encoders": False} and c2["trains"]["lm"]

    # frozen means frozen over a whole run: stage 1 ends with the LM's and the encoders' exact weights
    lm, clip, clap = load_lm(stage_runs["lm"]), load_encoder(stage_runs["clip"], "image"), load_encoder(stage_runs["clap"], "audio")
    assert same(weights(run1, "model.decoder."), lm.state_dict)
    assert same(weights(run1, "model.image_encoder."), clip.state_dict)
    assert same(weights(run2, "model.image_encoder."), clip.state_dict)
    assert same(weights(run2, "model.audio_encoder."), clap.state_dict)
    assert not same(weights(run2, "model.decoder."), lm.state_dict)
    assert c1["params_trainable"] == sum(v.numel() for k, v in weights(run1, "model.").items() if "_projector." in k)

    # pretraining FLOPs: the stage runs' own train_flops; stage 2 adds stage 1's
    stages = {k: json.loads((stage_runs[s] / "compute.json").read_text())["train_flops"]
              for k, s in (("lm", "lm"), ("image_encoder", "clip"), ("audio_encoder", "clap"))}
    assert {k: v["train_flops"] for k, v in c1["pretraining"].items()} == stages
    assert c1["pretraining_flops"] == pytest.approx(sum(stages.values()))
    assert c1["train_flops_all_in"] == pytest.approx(c1["train_flops"] + c1["pretraining_flops"])
    assert c2["pretraining"][run1.name]["train_flops"] == c1["train_flops"]
    assert c2["pretraining_flops"] == pytest.approx(sum(stages.values()) + c1["train_flops"])
    assert "c_lm = 6 if the LM trains, 4 if frozen" in c2["flops_formula"]


def test_stage2_starts_from_stage1_weights(two_stage):
    run1, run2, _ = two_stage
    hp = torch.load(run2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    hp = {k: v for k, v in hp.items() if not k.startswith("_")}  # LightningCLI's own entries
    fresh = LLaVALM(**{**hp, "model": LLaVAConfig(**{**hp["model"], "image_encoder": None, "audio_encoder": None})})
    assert dataclasses.asdict(fresh.cfg.image_encoder) == hp["model"]["image_encoder"]  # read from stage 1's run
    fresh.load_pretrained()
    assert same(state(fresh), weights(run1, "model."))


def test_llava_run_evaluates_without_the_stage_runs(two_stage, tmp_path, monkeypatch):
    from omnifuse.eval.cli import evaluate
    from omnifuse.training import pretrained

    def no_stage_runs(*args, **kwargs):
        raise AssertionError("evaluating a LLaVA run read a stage run")

    monkeypatch.setattr(pretrained, "read_stage", no_stage_runs)
    monkeypatch.setattr("omnifuse.training.bolt_on.read_stage", no_stage_runs)
    _, run2, _ = two_stage
    results = evaluate(str(run2), limit=4, out=str(tmp_path / "eval"), pope=False, cogent=False, progress=False)
    assert results["fusion"] == "LLaVALM"
    assert results["probes"]["blind"]["n"] > 0  # the blind probe removes the media, as for native
    assert results["cost"]["visual_slots_per_image"] > 0
    assert (tmp_path / "eval" / "report.md").exists()


def test_resume_continues_exactly(two_stage, tmp_path):
    run1, run2, args = two_stage
    resumed = tmp_path / "resumed"
    proc = subprocess.run(TRAIN + args + ["--trainer.default_root_dir", str(resumed), "--ckpt_path",
                                          str(run2 / "checkpoints" / "step-000002.ckpt")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "running its stage first" not in proc.stderr  # stage 1's run is finished: not made again
    reference, again = step_losses(run2), step_losses(resumed)
    assert sorted(again) == [2, 3]
    for step in again:
        assert again[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    c, c_ref = (json.loads((r / "compute.json").read_text()) for r in (resumed, run2))
    assert c["train_flops"] == pytest.approx(c_ref["train_flops"]) and c["pretraining"] == c_ref["pretraining"]
