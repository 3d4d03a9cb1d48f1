"""FlamingoLM (omnifuse/training/flamingo.py) on the tiny stage runs: exactly the LM before any step,
frozen means frozen, gates that move and are logged, FLOPs by hand, pretraining FLOPs, errors that
name the part, and eval.py's world suite on a Flamingo run with the gate curves in its report."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import ROOT, subprocess_env, tiny_train_args
from omnifuse.model.decoder import Decoder
from omnifuse.training.pretrained import load_encoder, load_lm

FLAMINGO = "configs/fusion/flamingo.yaml"


def part_args(stages: dict[str, Path]) -> list[str]:
    return ["--model.lm_ckpt", str(stages["lm"]), "--model.image_encoder_ckpt", str(stages["clip"]),
            "--model.audio_encoder_ckpt", str(stages["clap"])]


def flamingo_cli(world: Path, run_dir: Path, stages: dict[str, Path], *extra: str):
    """The module and datamodule ``train.py`` builds from configs/fusion/flamingo.yaml (not run)."""
    from omnifuse.training.cli import OmniCLI

    args = tiny_train_args(world, run_dir, *part_args(stages), "--model.model.resampler.n_latents", "4",
                           "--model.model.resampler.n_heads", "2", *extra, config=FLAMINGO)
    return OmniCLI(args=args[1:], run=False)


def first_batch(dm) -> dict[str, torch.Tensor]:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def lm_reference(stages: dict[str, Path]) -> Decoder:
    lm = load_lm(stages["lm"])
    decoder = Decoder(lm.config).eval()
    decoder.load_state_dict(lm.state_dict)
    return decoder


# ---- before any step ----------------------------------------------------------------------------


@torch.no_grad()
def test_a_fresh_run_gives_the_lm_logits_exactly(small_world, stage_runs, tmp_path):
    cli = flamingo_cli(small_world, tmp_path / "run", stage_runs)
    module = cli.model
    module.load_pretrained()  # what on_fit_start does on a fresh run
    module.eval()
    batch = first_batch(cli.datamodule)
    assert batch["image_patches"].shape[0] > 0 and batch["audio_patches"].shape[0] > 0  # media in the rows
    logits = module(batch)  # (B, L, V)
    stream = module.model.lm_stream(batch["tokens"], batch["modality"], batch["image_patches"],
                                    batch["audio_patches"], batch["doc_ids"])
    lm = lm_reference(stage_runs)
    ref = lm(lm.embed(stream.tokens), stream.positions, stream.doc_ids)  # (B, S, V)
    real = stream.valid & (stream.doc_ids >= 0)  # the stream's padding is compared by nobody
    assert torch.equal(logits[stream.kept & (batch["doc_ids"] >= 0)], ref[real])
    # the parts are the stages' weights, bit for bit
    image = load_encoder(stage_runs["clip"], "image")
    for k, v in image.state_dict.items():
        assert torch.equal(module.model.image_encoder.state_dict()[k], v)
    assert set(module.pretraining) == {"lm", "image_encoder", "audio_encoder"}


def test_step_flops_by_hand(small_world, stage_runs, tmp_path):
    """compute.json's count on one batch, written out from the model's sizes and the LM stream."""
    cli = flamingo_cli(small_world, tmp_path / "run", stage_runs, "--model.model.cross_every", "2")
    module = cli.model
    model, cfg = module.model, module.cfg
    batch = first_batch(cli.datamodule)
    with torch.no_grad():
        stream = model.lm_stream(batch["tokens"], batch["modality"], batch["image_patches"], batch["audio_patches"],
                                 batch["doc_ids"])
    b, s = stream.tokens.shape
    t = stream.media.shape[1]
    d, r, h = cfg.decoder.dim, cfg.resampler.n_latents, cfg.cross_ffn_hidden
    hd = d // cfg.cross_heads
    assert cfg.cross_layers() == [1]  # 2 LM blocks: one gated block, before block 1
    plain = Decoder(cfg.decoder)
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in plain.layers]
    head = sum(p.numel() for p in plain.norm.parameters()) + cfg.decoder.vocab_size * d
    docs = [int(n) for n in torch.unique_consecutive(stream.doc_ids[0], return_counts=True)[1]]
    docs += [int(n) for n in torch.unique_consecutive(stream.doc_ids[1], return_counts=True)[1]]
    pairs = sum(n * (n + 1) for n in docs)  # per-document causal attention, the padding as one document
    # LM: block 0 is below the only gated block (forward only), block 1 and the head pass gradients back
    lm = 2 * blocks[0] * b * s + 4 * blocks[1] * b * s + 4 * head * b * s + (2 + 6) * d * pairs
    # the gated block: q, out (d x d), k, v (d x d, on the media tokens), q/k RMSNorm, GELU MLP, 2 norms, 2 gates
    p_kv = 2 * d * d + hd
    p_slot = 2 * d * d + hd + (d * h + h + h * d + d) + 2 * d + 2
    cross = 6 * p_slot * b * s + 6 * p_kv * b * t + 12 * d * b * s * t
    # resampler per medium of n patches (in_dim = the encoder's width: 32 in the tiny stage runs)
    enc_dim = cfg.image_encoder.dim

    def resampler(n: int) -> int:
        fwd = 2 * (enc_dim * d + d) * n + 2 * 2 * d * r  # input projection, final LayerNorm
        per_layer = (2 * 2 * d * n  # media LayerNorm
                     + 2 * 2 * d * d * (n + r)  # k, v on patches and latents
                     + 2 * (2 * d + 2 * d * d + 2 * d + d * 4 * d + 4 * d + 4 * d * d + d) * r  # norms, q, out, MLP
                     + 4 * d * r * (n + r))  # QK^T, AV
        return 3 * (fwd + cfg.resampler.n_layers * per_layer)

    from omnifuse.model.media import media_layout
    from omnifuse.tokenizers.stream import AUDIO, IMAGE

    media = 0
    for kind, encoder in ((IMAGE, model.image_encoder), (AUDIO, model.audio_encoder)):
        for n in media_layout(batch["tokens"], batch["modality"], kind).counts.tolist():
            media += resampler(n) + encoder.forward_flops(n)
    assert float(module.step_flops(batch)) == lm + cross + media
    # train_lm: every LM block and the head train (6N), attention back-propagated in both blocks
    module.train_lm = True
    unfrozen = 6 * (blocks[0] + blocks[1] + head) * b * s + (6 + 6) * d * pairs
    assert float(module.step_flops(batch)) == unfrozen + cross + media


# ---- a short run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(stage_runs, tmp_path_factory) -> dict[str, Path]:
    """Copies of the stage runs that the Flamingo run is built from; the eval test deletes them."""
    root = tmp_path_factory.mktemp("parts")
    return {k: Path(shutil.copytree(v, root / k)) for k, v in stage_runs.items()}


@pytest.fixture(scope="module")
def flamingo_run(small_world, parts, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("flamingo") / "runs" / "flamingo"
    args = tiny_train_args(small_world, run, *part_args(parts), "--trainer.max_steps", "4", "--checkpoint_every", "4",
                           "--model.optim.lr", "0.01", "--model.optim.warmup_steps", "0",
                           "--model.model.resampler.n_latents", "4", "--model.model.resampler.n_heads", "2",
                           config=FLAMINGO)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def logged(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The CSV log's gate columns, read without omnifuse."""
    rows = list(csv.DictReader(open(run / "logs" / "csv" / "version_0" / "metrics.csv")))
    names = [k for k in rows[0] if k.startswith("gates/")]
    return {k: [(int(row["step"]), float(row[k])) for row in rows if row[k] != ""] for k in names}


def test_frozen_means_frozen_and_the_gates_move(flamingo_run, parts, stage_runs):
    ckpt = torch.load(flamingo_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert ckpt["global_step"] == 4
    lm = load_lm(stage_runs["lm"]).state_dict
    for k, v in lm.items():  # the LM's keys are unchanged by the FusionLayer wrapping
        assert torch.equal(state[f"model.decoder.{k}"], v), k
    for name, stage, modality in (("image_encoder", "clip", "image"), ("audio_encoder", "clap", "audio")):
        for k, v in load_encoder(stage_runs[stage], modality).state_dict.items():
            assert torch.equal(state[f"model.{name}.{k}"], v), k
    # the optimizer holds exactly the fusion parameters: resamplers and gated blocks
    fusion = [k for k in state if ".fusion_layer." in k or "_resampler." in k]
    n_opt = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
    assert n_opt == len(fusion)
    # gates: logged every step, 0 at the first step (the LM exactly), off 0 afterwards
    gates = logged(flamingo_run)
    assert set(gates) == {"gates/layer0_attn", "gates/layer0_ffn", "gates/layer1_attn", "gates/layer1_ffn"}
    for name, series in gates.items():
        assert [step for step, _ in series] == [0, 1, 2, 3]
        assert series[0][1] == 0.0 and abs(series[-1][1]) > 1e-3, name
    # the checkpoint's gates (after the 4th step) are open too
    scales = [v for k, v in state.items() if k.endswith("_scale.scale")]
    assert len(scales) == 4 and all(abs(float(a)) > 1e-3 for a in scales)


def test_compute_json_counts_frozen_parts_and_pretraining(flamingo_run, parts):
    compute = json.loads((flamingo_run / "compute.json").read_text())
    stage_flops = {k: json.loads((v / "compute.json").read_text())["train_flops"] for k, v in parts.items()}
    assert compute["pretraining_flops"] == pytest.approx(sum(stage_flops.values()))
    assert compute["pretraining"]["lm"]["train_flops"] == stage_flops["lm"]
    assert compute["pretraining"]["image_encoder"]["train_flops"] == stage_flops["clip"]
    assert compute["train_flops_all_in"] == pytest.approx(compute["train_flops"] + compute["pretraining_flops"])
    assert "frozen LM" in compute["flops_formula"] and compute["tokens_seen"]["image"] > 0
    assert compute["params_trainable"] < compute["params_total"]
    # the logged per-step FLOPs add up to the record (each step charged by step_flops)
    rows = list(csv.DictReader(open(flamingo_run / "logs" / "csv" / "version_0" / "metrics.csv")))
    last = [float(r["compute/train_flops"]) for r in rows if r.get("compute/train_flops")]
    assert last[-1] == pytest.approx(compute["train_flops"])


def test_lm_unfrozen_ablation_trains_the_lm_only_with_the_fusion(small_world, stage_runs, tmp_path):
    cli = flamingo_cli(small_world, tmp_path / "run", stage_runs, "--model.train_lm", "true",
                       "--model.optim.warmup_steps", "0")
    module = cli.model
    assert module.frozen_modules() == module.model.encoder_modules()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=cli.datamodule)
    lm = load_lm(stage_runs["lm"]).state_dict
    decoder = module.model.decoder.state_dict()
    assert not torch.equal(decoder["layers.0.attn.q_proj.weight"], lm["layers.0.attn.q_proj.weight"])
    image = load_encoder(stage_runs["clip"], "image").state_dict
    assert all(torch.equal(module.model.image_encoder.state_dict()[k], v) for k, v in image.items())
    opt = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for m in module.model.lm_modules() for p in m.parameters()} <= opt
    assert not opt & {id(p) for m in module.model.encoder_modules() for p in m.parameters()}


# ---- errors -----------------------------------------------------------------------------------


def test_a_missing_or_mismatched_part_names_the_path_and_the_stage_command(small_world, stage_runs, tmp_path):
    nowhere = tmp_path / "runs" / "nowhere"
    # encoder configs are read when the module is built (jsonargparse wraps the error, message kept)
    with pytest.raises((FileNotFoundError, ValueError), match=r"runs/nowhere does not exist.*configs/stage/clip\.yaml"):
        flamingo_cli(small_world, tmp_path / "a", {**stage_runs, "clip": nowhere})
    with pytest.raises(ValueError, match=r"an image encoder was asked for.*configs/stage/clip\.yaml"):
        flamingo_cli(small_world, tmp_path / "b", {**stage_runs, "clip": stage_runs["clap"]})
    module = flamingo_cli(small_world, tmp_path / "c", {**stage_runs, "lm": nowhere}).model
    with pytest.raises(FileNotFoundError, match=r"runs/nowhere does not exist.*configs/stage/lm\.yaml"):
        module.load_pretrained()
    module = flamingo_cli(small_world, tmp_path / "d", {**stage_runs, "lm": stage_runs["clip"]}).model
    with pytest.raises(ValueError, match=r"not a text LM stage checkpoint.*configs/stage/lm\.yaml"):
        module.load_pretrained()
    module = flamingo_cli(small_world, tmp_path / "e", stage_runs, "--model.model.decoder.ffn_hidden", "96").model
    with pytest.raises(ValueError, match=r"does not match the arm's decoder \(ffn_hidden: arm 96 vs LM 64.*stage/lm"):
        module.load_pretrained()


# ---- evaluation ---------------------------------------------------------------------------------


def test_eval_world_suite_on_a_flamingo_run_draws_the_gate_curves(flamingo_run, parts, tmp_path):
    """eval.py loads the run from its checkpoint alone (the stage runs it was built from are gone)
    and the report shows the gate curves; the curves' data are the logged values."""
    from omnifuse.eval.gates import gate_curves, plot_gate_curves
    from omnifuse.eval.report import read_training_log

    for path in parts.values():
        shutil.rmtree(path)
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "--ckpt", str(flamingo_run), "--suite", "world", "--limit", "4",
         "--quiet", "--out", str(out)],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["fusion"] == "FlamingoLM" and results["by_qtype"]
    report = (out / "report.md").read_text()
    assert (out / "gate_curves.png").stat().st_size > 0 and "](gate_curves.png)" in report
    assert "## Gates" in report and "layer1_ffn" in report
    gates = logged(flamingo_run)
    assert results["gates"]["final"] == {k[len("gates/"):]: v[-1][1] for k, v in gates.items()}
    drawn = plot_gate_curves(gate_curves(read_training_log(flamingo_run)), tmp_path / "again.png")
    assert drawn == {k[len("gates/"):]: ([float(s) for s, _ in v], [x for _, x in v]) for k, v in gates.items()}


# ---- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ablation, check", [
    ("flamingo-every1.yaml", lambda m: m.cfg.cross_layers() == [0, 1, 2, 3] and not m.train_lm),
    ("flamingo-every2.yaml", lambda m: m.cfg.cross_layers() == [1, 3] and not m.train_lm),
    ("flamingo-every4.yaml", lambda m: m.cfg.cross_layers() == [3] and not m.train_lm),
    ("flamingo-lm-unfrozen.yaml", lambda m: m.train_lm and m.frozen_modules() == m.model.encoder_modules()),
])
def test_ablation_configs_compose_after_flamingo_yaml(small_world, stage_runs, tmp_path, ablation, check):
    # 4 LM blocks, as the tiny preset (building reads only the encoder stages; the LM loads at fit)
    cli = flamingo_cli(small_world, tmp_path / "run", stage_runs, "--model.model.decoder.n_layers", "4",
                       "-c", str(ROOT / "configs/fusion" / ablation))
    assert type(cli.model).__name__ == "FlamingoLM" and check(cli.model)
    assert cli.model.cfg.resampler.n_latents == 4  # flamingo.yaml's keys and earlier overrides survive
    assert cli.trainer.default_root_dir.endswith(ablation.removeprefix("flamingo").removesuffix(".yaml"))


def test_gate_lr_puts_the_gates_in_a_group_of_their_own_on_the_same_schedule(small_world, stage_runs, tmp_path):
    cli = flamingo_cli(small_world, tmp_path / "run", stage_runs, "--model.gate_lr", "0.05",
                       "--model.optim.lr", "0.001", "--model.optim.warmup_steps", "2", "--model.optim.decay_steps", "10")
    module = cli.model
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    gates = {id(layer.ca_scale.scale) for layer in module.model.cross_attention_layers()}
    gates |= {id(layer.mlp_scale.scale) for layer in module.model.cross_attention_layers()}
    *base, last = opt.param_groups
    assert {id(p) for p in last["params"]} == gates and last["weight_decay"] == 0.0
    assert not gates & {id(p) for g in base for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    for _ in range(4):  # warmup then cosine: the ratio of the two learning rates stays 50
        assert last["lr"] == pytest.approx(50 * base[0]["lr"])
        sched.step()
    assert last["lr"] == pytest.approx(0.05 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8))))  # step 4 of 2 + 8
    with pytest.raises(ValueError, match="gate_lr must be positive"):
        flamingo_cli(small_world, tmp_path / "bad", stage_runs, "--model.gate_lr", "0")
