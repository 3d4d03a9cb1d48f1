"""Open a run directory made by ``train.py``: its resolved config, model weights and tokenizer."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml


@dataclass
class Run:
    run_dir: Path
    config: dict  # the resolved training config (RUN/config.yaml)
    module: torch.nn.Module  # the LightningModule, eval mode, on CPU
    world_dir: Path
    tokenizer: object
    interleaver: object
    compute: dict  # RUN/compute.json, {} if absent
    checkpoint: Path

    @property
    def model(self):
        return self.module.model

    @property
    def fusion(self) -> str:
        return self.config["model"]["class_path"].rsplit(".", 1)[-1]


def find_checkpoint(run_dir: Path) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if last.exists():
        return last
    steps = sorted(ckpt_dir.glob("step-*.ckpt"))
    if not steps:
        raise FileNotFoundError(f"{run_dir} has no checkpoints/last.ckpt nor checkpoints/step-*.ckpt: was it trained with train.py?")
    return steps[-1]


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> Run:
    """Load a run for evaluation: its model, and the tokenizer of the world it was trained on."""
    from omnifuse.data.datamodule import build_interleaver

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: --ckpt must be a run directory written by `train.py fit`")
    config = yaml.safe_load(cfg_path.read_text())
    ckpt = Path(checkpoint) if checkpoint else find_checkpoint(run_dir)
    module_path, cls_name = config["model"]["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_path), cls_name)
    module = cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    module.eval()
    data = config["data"]
    world = Path(data["world_dir"])
    tokenizer, interleaver = build_interleaver(world, data["patch"], data["positions"])
    compute_path = run_dir / "compute.json"
    compute = json.loads(compute_path.read_text()) if compute_path.exists() else {}
    return Run(run_dir, config, module, world, tokenizer, interleaver, compute, ckpt)
