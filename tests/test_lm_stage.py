"""The text-LM stage (configs/stage/lm.yaml) and ``load_lm``: batches without media slots, a model
with no weight it never uses, a normal run directory, the decoder's weights loaded into a
``Decoder`` with the run's own logits, clear errors, and eval's world suite on the LM run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, subprocess_env, tiny_train_args
from omnifuse.data.datamodule import shards_of
from omnifuse.data.stream import BadSamplePolicy, iter_samples
from omnifuse.model.decoder import Decoder
from omnifuse.tokenizers.stream import IMAGE, TEXT
from omnifuse.tokenizers.text import AUD_ID, IMG_END_ID, IMG_ID, ROW_ID
from omnifuse.training.pretrained import LM_STAGE_COMMAND, load_lm

LM = "configs/stage/lm.yaml"


def test_lm_stage_batches_hold_no_media_slot(small_world, tmp_path):
    """The stage's own config: marker media, no patch projection, no modality embedding."""
    from omnifuse.training.cli import OmniCLI

    cli = OmniCLI(args=tiny_train_args(small_world, tmp_path / "run", config=LM)[1:], run=False)
    dm, model = cli.datamodule, cli.model.model
    assert dm.hparams.media == "marker" and dm.hparams.tasks is None
    assert model.image_proj is None and model.audio_proj is None and model.modality_embeddings is None
    assert model.num_params() == sum(p.numel() for p in model.decoder.parameters())
    dm.setup("fit")
    batches = [b for _, b in zip(range(4), dm.train_dataloader())]
    for b in batches:
        assert (b["modality"] == TEXT).all()
        assert b["image_patches"].shape[0] == 0 and b["audio_patches"].shape[0] == 0
        assert not (b["tokens"] == ROW_ID).any()
    tokens = torch.cat([b["tokens"].flatten() for b in batches])
    assert (tokens == IMG_ID).any() and (tokens == AUD_ID).any()  # media are still marked where they were
    with torch.no_grad():  # the model takes these batches (and refuses media ones, test_model_native)
        logits = cli.model(batches[0])
    assert logits.shape == (*batches[0]["tokens"].shape, model.cfg.decoder.vocab_size)


@pytest.fixture(scope="module")
def lm_run(small_world, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lm") / "runs" / "lm"
    args = tiny_train_args(small_world, run, "--trainer.max_steps", "3", "--checkpoint_every", "2", config=LM)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


@pytest.mark.slow
def test_lm_run_directory_and_load_lm_gives_the_runs_logits(lm_run, small_world):
    from omnifuse.eval.loading import load_run

    assert (lm_run / "config.yaml").exists() and (lm_run / "checkpoints" / "step-000002.ckpt").exists()
    compute = json.loads((lm_run / "compute.json").read_text())
    assert compute["tokens_seen"]["image"] == compute["tokens_seen"]["audio"] == 0
    assert compute["global_step"] == 3 and compute["train_flops"] > 0
    # training stopped between two step checkpoints (3 steps, one every 2): last.ckpt still holds step 3
    last = torch.load(lm_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3

    lm = load_lm(lm_run)
    assert lm.source == lm_run / "checkpoints" / "last.ckpt" and lm.compute == compute
    assert (lm.config.dim, lm.config.n_layers, lm.config.vocab_size) == (32, 2, 768)
    decoder = Decoder(lm.config)
    decoder.load_state_dict(lm.state_dict, strict=True)
    decoder.eval()
    # params_trainable is the decoder alone: no patch projection, no modality embedding
    assert compute["params_trainable"] == sum(p.numel() for p in decoder.parameters())

    run = load_run(lm_run)
    assert run.interleaver.media == "marker"
    sample = next(s for s in iter_samples(shards_of(small_world, "test"), BadSamplePolicy("error"))
                  if s.task == "vqa")
    stream = run.interleaver.encode(sample.segments, sample.media)  # `<img></img>` + question + answer
    assert (stream.modality == TEXT).all() and IMG_ID in stream.tokens.tolist()
    tokens, positions = stream.tokens[None], stream.positions[None]
    with torch.no_grad():
        expected = run.model(tokens, stream.modality[None], positions)  # (1, S, V)
        got = decoder(decoder.tok_embeddings(tokens), positions)  # (1, S, V)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # a .ckpt path inside the run works as well
    same = load_lm(lm_run / "checkpoints" / "last.ckpt")
    for k, v in lm.state_dict.items():
        torch.testing.assert_close(same.state_dict[k], v, rtol=0, atol=0)


def _copy_run(run: Path, dest: Path, edit_ckpt=None, edit_compute=None) -> Path:
    """A copy of the run's last checkpoint and compute.json, optionally edited."""
    (dest / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    if edit_ckpt:
        edit_ckpt(ckpt)
    torch.save(ckpt, dest / "checkpoints" / "last.ckpt")
    compute = json.loads((run / "compute.json").read_text())
    if edit_compute:
        edit_compute(compute)
    (dest / "compute.json").write_text(json.dumps(compute))
    return dest


@pytest.mark.slow
def test_load_lm_errors_name_the_path_and_the_stage_command(lm_run, tmp_path):
    assert "configs/stage/lm.yaml" in LM_STAGE_COMMAND
    with pytest.raises(FileNotFoundError, match=r"runs/nowhere does not exist.*configs/stage/lm\.yaml"):
        load_lm(tmp_path / "runs" / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no checkpoints.*configs/stage/lm\.yaml"):
        load_lm(tmp_path / "empty")
    no_compute = _copy_run(lm_run, tmp_path / "no-compute")
    (no_compute / "compute.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"compute.json not found.*configs/stage/lm\.yaml"):
        load_lm(no_compute)

    def older(compute):
        compute["global_step"] = 1

    with pytest.raises(ValueError, match=r"last.ckpt is at step 3 but .*compute.json describes step 1"):
        load_lm(_copy_run(lm_run, tmp_path / "stale", edit_compute=older))

    def inline(ckpt):
        ckpt["datamodule_hyper_parameters"]["media"] = "inline"

    with pytest.raises(ValueError, match=r"not a text LM stage checkpoint: .*data.media: inline.*configs/stage/lm\.yaml"):
        load_lm(_copy_run(lm_run, tmp_path / "native", edit_ckpt=inline))

    def modality_embedding(ckpt):
        ckpt["hyper_parameters"]["model"]["modality_embedding"] = True

    with pytest.raises(ValueError, match=r"not a text LM stage checkpoint: .*modality embeddings"):
        load_lm(_copy_run(lm_run, tmp_path / "modemb", edit_ckpt=modality_embedding))

    def wider(ckpt):
        ckpt["hyper_parameters"]["model"]["decoder"]["ffn_hidden"] = 96

    with pytest.raises(ValueError, match=r"weights do not fit Decoder\(DecoderConfig\).*configs/stage/lm\.yaml"):
        load_lm(_copy_run(lm_run, tmp_path / "wider", edit_ckpt=wider))


@pytest.mark.slow
def test_world_suite_on_the_lm_run_prompts_in_marker_mode(lm_run, small_world, tmp_path):
    """eval.py on the LM run: prompts built with the run's data.media (markers, no patch slot),
    text perplexity and text-only QA reported."""
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "--ckpt", str(lm_run), "--suite", "world", "--limit", "12",
         "--no-pope", "--no-cogent", "--quiet", "--out", str(out)],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    from omnifuse.eval.report import load_results

    results = load_results(out)
    assert results["cost"]["visual_slots_per_image"] == 0  # the LM saw markers, never a patch
    assert results["text"]["n_tokens"] > 0 and results["text"]["perplexity"] > 1
    qa = [r for r in results["samples"] if r.get("task") == "vqa"]
    assert qa and results["splits"]["iid"]["n"] >= len(qa)
    assert all("ranked" in r for r in qa)  # candidates ranked from the text alone
