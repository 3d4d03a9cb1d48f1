"""train.py end to end: exact resume (also after SIGKILL), non-finite steps, two-process DDP, community shards."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from PIL import Image

from conftest import ROOT, subprocess_env, tiny_train_args
from omnifuse.model.config import DecoderConfig, NativeConfig
from omnifuse.training.module import NativeLM, NonFiniteLoss

TRAIN = [sys.executable, str(ROOT / "train.py")]


def step_losses(run_dir: Path) -> dict[int, float]:
    """train/loss by optimizer step (the step a logged row belongs to), from the newest CSV log."""
    versions = sorted((run_dir / "logs" / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = list(csv.DictReader(open(versions[-1] / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def run_train(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(TRAIN + args, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


COMMON = ["--data.num_workers", "2", "--model.optim.decay_steps", "40", "--model.optim.warmup_steps", "2",
          "--checkpoint_every", "3"]


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(small_world, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_train(tiny_train_args(small_world, full, *COMMON, "--trainer.max_steps", "9"))
    reference = step_losses(full)
    assert sorted(reference) == list(range(9))

    # The same run, killed without warning once its step-3 checkpoint is on disk.
    proc = subprocess.Popen(TRAIN + tiny_train_args(small_world, killed, *COMMON, "--trainer.max_steps", "40"),
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "step-000003.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run never wrote its first checkpoint"
    assert not list((killed / "checkpoints").glob("*.tmp*")), "a half-written checkpoint was left behind"
    last = killed / "checkpoints" / "last.ckpt"
    resume_from = last if last.exists() else ckpt
    start = torch.load(resume_from, map_location="cpu", weights_only=False)["global_step"]
    assert 3 <= start < 9

    run_train(tiny_train_args(small_world, killed, *COMMON, "--trainer.max_steps", "9", "--ckpt_path", str(resume_from)))
    resumed = step_losses(killed)
    assert sorted(resumed) == list(range(start, 9))
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), f"step {step}"
    compute = json.loads((killed / "compute.json").read_text())
    assert compute["global_step"] == 9
    assert compute["train_flops"] == pytest.approx(json.loads((full / "compute.json").read_text())["train_flops"])


def test_run_directory_has_config_checkpoints_logs_and_compute(small_world, tmp_path):
    run = tmp_path / "run"
    run_train(tiny_train_args(small_world, run, "--trainer.max_steps", "2", "--checkpoint_every", "2"))
    config = (run / "config.yaml").read_text()
    assert "class_path: omnifuse.training.module.NativeLM" in config and "world_dir" in config
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "step-000002.ckpt").exists()
    assert list((run / "logs" / "tb").glob("version_*/events.*"))
    compute = json.loads((run / "compute.json").read_text())
    assert compute["params_total"] == compute["params_trainable"] > 0
    tokens = compute["tokens_seen"]
    assert tokens["text"] > 0 and tokens["image"] > 0 and sum(tokens.values()) == 2 * 2 * 256
    assert compute["train_flops"] > 6 * compute["params_total"] * 2 * 2 * 256 * 0.5
    # documents of 40-130 slots in rows of 256: causal attention within documents costs less than full rows
    assert compute["train_flops"] < compute["train_flops_full_attention_bound"]
    assert "n_d = slots of document d" in compute["flops_formula"] and "N = decoder matmul" in compute["flops_formula"]
    assert compute["train_seconds"] > 0 and compute["validation_seconds"] >= 0


def test_unknown_key_is_an_error_that_names_it(small_world, tmp_path):
    proc = subprocess.run(TRAIN + tiny_train_args(small_world, tmp_path / "x", "--data.no_such_key", "1"),
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr


def test_ddp_two_cpu_processes_read_different_shards(small_world, tmp_path):
    run = tmp_path / "ddp"
    proc = run_train(tiny_train_args(small_world, run, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                                     "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
                                     "--data.num_workers", "1"), timeout=400)
    reads: dict[int, set[str]] = {}
    for line in proc.stderr.splitlines():
        if "reads shards: " in line:
            rank = int(line.split("rank ")[1].split()[0])
            shards = line.split("shards: ")[1].split(",")
            reads.setdefault(rank, set()).update(s for s in shards if "/train/" in s)
    assert sorted(reads) == [0, 1]
    assert reads[0] and reads[1] and not (reads[0] & reads[1])
    assert json.loads((run / "compute.json").read_text())["global_step"] == 2


# -- non-finite losses -------------------------------------------------------------------------

def nan_batches(n: int, nan_at: set[int]):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        b, l = 2, 32
        modality = torch.zeros(b, l, dtype=torch.long)
        modality[:, 2:6] = 1
        patches = torch.randn(8, 3 * 4 * 4, generator=g)
        if i in nan_at:
            patches[0, 0] = float("nan")
        labels = torch.randint(9, 50, (b, l), generator=g)
        labels[:, :6] = -100
        yield {
            "tokens": torch.randint(9, 50, (b, l), generator=g), "modality": modality,
            "positions": torch.arange(l).view(1, l, 1).expand(b, l, 3).clone(),
            "doc_ids": torch.zeros(b, l, dtype=torch.long), "labels": labels,
            "label_task": torch.where(labels != -100, 2, -1),
            "image_patches": patches, "audio_patches": torch.zeros(0, 16),
        }


def tiny_module(**kw) -> NativeLM:
    cfg = NativeConfig(DecoderConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_hidden=64, max_seq_len=32), patch=4)
    return NativeLM(cfg, **kw)


def fit(module, batches, tmp_path, steps):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=DataLoader(list(batches), batch_size=None))
    return trainer


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    torch.manual_seed(0)
    module = tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit(module, nan_batches(1, {0}), tmp_path, steps=1)
    assert module.nonfinite_total == 1
    for k, v in module.state_dict().items():  # no update came from the NaN step
        assert torch.equal(v, before[k]), k
    module = tiny_module()
    fit(module, nan_batches(6, {1, 3}), tmp_path, steps=4)
    assert module.nonfinite_total == 2 and module.global_step == 4
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_repeated_nonfinite_steps_stop_with_a_checkpoint(tmp_path):
    module = tiny_module(max_nonfinite=2)
    with pytest.raises(NonFiniteLoss, match="3 consecutive non-finite losses"):
        fit(module, nan_batches(6, {1, 2, 3, 4}), tmp_path, steps=6)
    saved = list(tmp_path.glob("nonfinite-step*.ckpt"))
    assert len(saved) == 1
    assert torch.load(saved[0], map_location="cpu", weights_only=False)["omnifuse_compute"]["nonfinite_total"] == 3


@pytest.mark.slow
def test_ddp_nonfinite_step_on_one_rank_is_skipped_on_both(tmp_path):
    """2 gloo processes; rank 1's second batch is NaN. Both ranks survive, both skip that step (no
    weight changes), the other steps train, the ranks stay identical, and the checkpoint is written."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_nonfinite_job.py"), str(tmp_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["changed"] == [True, False, True]
        assert r["nonfinite_total"] == 1 and r["global_step"] == 3
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    batch = next(nan_batches(1, set()))
    per_rank_step = float(tiny_module().step_flops(batch))
    assert ranks[0]["train_flops"] == pytest.approx(2 * 3 * per_rank_step)  # summed over both ranks
    saved = torch.load(tmp_path / "final.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3 and saved["omnifuse_compute"]["nonfinite_total"] == 1


# -- community shards --------------------------------------------------------------------------

def test_trains_on_img2dataset_and_audio_caption_shards(small_world, tmp_path):
    """Shards laid out the way img2dataset and audio-caption tools write them, trained on for a few steps."""
    import soundfile

    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(tmp_path / "img-%05d.tar"), maxcount=8) as sink:
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
            meta = {"url": f"http://example.invalid/{i}.jpg", "caption": "a red circle", "key": f"{i:09d}",
                    "status": "success", "width": 64, "height": 64}
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": "a red circle", "json": meta})
    with wds.ShardWriter(str(tmp_path / "aud-%05d.tar"), maxcount=8) as sink:
        for i in range(6):
            buf = io.BytesIO()
            soundfile.write(buf, rng.uniform(-0.3, 0.3, 22050).astype(np.float32), 22050, format="FLAC")
            sink.write({"__key__": f"clip{i}", "flac": buf.getvalue(), "json": {"text": "a low tone"}})
    run = tmp_path / "run"
    run_train(tiny_train_args(small_world, run, "--trainer.max_steps", "3",
                              "--data.extra_train_shards", f"[{tmp_path}/img-*.tar,{tmp_path}/aud-*.tar]"))
    losses = step_losses(run)
    assert len(losses) == 3 and all(np.isfinite(v) for v in losses.values())

    from omnifuse.data.datamodule import WorldDataModule
    from omnifuse.data.stream import PackedShardStream

    dm = WorldDataModule(world_dir=str(small_world), row_len=256)
    dm.setup("fit")
    community = sorted(str(p) for p in tmp_path.glob("*-*.tar"))
    stream = dm._stream(community, train=False)
    assert isinstance(stream, PackedShardStream)
    docs = sum(int(r.max()) + 1 for b in stream for r in b["doc_ids"])
    assert docs == 18 and stream.policy.seen == 18 and not stream.policy.skipped
