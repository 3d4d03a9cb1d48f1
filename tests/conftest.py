"""Shared fixtures: one small generated world (with its tokenizer) per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL_COUNTS = {"train": 400, "val": 40, "test": 120, "cogent": 40, "pope-random": 20, "pope-popular": 20,
                "pope-adversarial": 20}


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """A world with a few hundred samples, four training shards, and a trained tokenizer."""
    from omnifuse.data.world import generate_world
    from omnifuse.tokenizers.text import iter_world_texts, train_tokenizer

    out = tmp_path_factory.mktemp("world")
    generate_world(out, preset="tiny", seed=0, progress=False, counts=SMALL_COUNTS, maxcount=100)
    train_tokenizer(iter_world_texts(out, "train"), 768, out / "tokenizer.model")
    return out


def tiny_train_args(world: Path, run_dir: Path, *extra: str, config: str = "configs/fusion/native.yaml") -> list[str]:
    """`train.py fit` arguments for a model small enough to train a few steps in seconds; ``config``
    is the YAML composed after the tiny preset (a fusion arm or a stage)."""
    return [
        "fit", "-c", str(ROOT / "configs/scale/tiny.yaml"), "-c", str(ROOT / config),
        "--data.world_dir", str(world), "--data.row_len", "256", "--data.batch_size", "2",
        "--data.num_workers", "0", "--data.shuffle_buffer", "16", "--data.pack_pool", "8",
        "--model.model.decoder.dim", "32", "--model.model.decoder.n_layers", "2",
        "--model.model.decoder.n_heads", "2", "--model.model.decoder.n_kv_heads", "1",
        "--model.model.decoder.ffn_hidden", "64",
        "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.val_check_interval", "1000", "--trainer.limit_val_batches", "1",
        *extra,
    ]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# The tiny parts every bolt-on arm test builds on: the decoder of tiny_train_args (dim 32, 2 blocks)
# and a 2-block encoder of width 32, each trained 3 steps.
TINY_ENCODER_ARGS = ("--encoder.dim", "32", "--encoder.n_layers", "2", "--encoder.n_heads", "2",
                     "--encoder.ffn_hidden", "64")
STAGE_CONFIGS = {"lm": "configs/stage/lm.yaml", "clip": "configs/stage/clip.yaml", "clap": "configs/stage/clap.yaml"}


def train_stage(world: Path, run_dir: Path, stage: str, *extra: str) -> Path:
    """Train one pretraining stage (``lm``, ``clip`` or ``clap``) for 3 steps with ``train.py`` in a
    subprocess, at the size of :func:`tiny_train_args`; returns the run directory."""
    import subprocess

    sized = [*TINY_ENCODER_ARGS, "--data.batch_size", "8"] if stage != "lm" else []
    args = tiny_train_args(world, run_dir, "--trainer.max_steps", "3", "--checkpoint_every", "3", *sized, *extra,
                           config=STAGE_CONFIGS[stage])
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{stage} stage failed:\n{proc.stderr[-4000:]}"
    return run_dir


@pytest.fixture(scope="session")
def stage_runs(small_world, tmp_path_factory) -> dict[str, Path]:
    """``{"lm", "clip", "clap"}`` -> run directories of the three tiny pretraining stages (one
    session-wide set: LLaVA and Flamingo tests start from the same parts)."""
    root = tmp_path_factory.mktemp("stages") / "runs"
    return {stage: train_stage(small_world, root / stage, stage) for stage in STAGE_CONFIGS}
