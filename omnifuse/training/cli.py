"""The LightningCLI behind ``train.py``: composed YAML configs, one run directory per experiment.

A run directory (``--trainer.default_root_dir``) holds::

    config.yaml            the resolved config of the latest ``fit`` (every default filled in)
    checkpoints/           step-NNNNNN.ckpt every ``checkpoint_every`` steps, and last.ckpt
    logs/csv/version_N/    metrics.csv (one version per launch; a resumed run gets a new one)
    logs/tb/version_N/     TensorBoard events
    compute.json           parameters, tokens by modality, training FLOPs (rewritten at each checkpoint)
    launch.json            {"cwd": ...}: the directory train.py ran in, which config.yaml's relative
                           paths (data.world_dir) are relative to (read by omnifuse.eval.loading)
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from omnifuse.data.datamodule import WorldDataModule
from omnifuse.model.encoders import EncoderSize


class ComputeRecord(Callback):
    """Writes the LightningModule's ``compute_record()`` to RUN/compute.json (rank 0, atomically)."""

    def _write(self, trainer: Trainer, pl_module) -> None:
        if trainer.is_global_zero and hasattr(pl_module, "compute_record"):
            write_json_atomic(Path(trainer.default_root_dir) / "compute.json", pl_module.compute_record())

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)


class RunCheckpoint(ModelCheckpoint):
    """Step checkpoints and ``last.ckpt``, which is also written when training stops between two
    saves (``max_steps`` not a multiple of ``checkpoint_every``). Lightning's own ``on_train_end``
    writes it only when no checkpoint was saved at all, which left ``last.ckpt`` (what eval and the
    pretrained-part loaders read) behind the final weights while compute.json described the end."""

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


DEFAULT_MODEL = "omnifuse.training.module.NativeLM"


def named_model_class(args: list[str]) -> str | None:
    """The ``model.class_path`` a ``train.py`` command line names last (its ``-c/--config`` files and
    ``--model.class_path`` flags, in order), or None.

    Why: composing ``-c configs/scale/tiny.yaml -c configs/stage/clip.yaml`` reads the preset's
    ``model.init_args`` under the default class first. jsonargparse then carries that class's
    nested config (NativeConfig's ``modality_embedding``, …) over to the class the stage names and
    refuses it, because it discards init_args of another class only at the top level. Reading
    every file under the class the command finally uses makes the order of files irrelevant.
    """
    named = None
    tokens = list(args)
    for i, tok in enumerate(tokens):
        if tok in ("-c", "--config") and i + 1 < len(tokens):
            path = Path(tokens[i + 1])
        elif tok.startswith("--config="):
            path = Path(tok.split("=", 1)[1])
        elif tok == "--model.class_path" and i + 1 < len(tokens):
            named = tokens[i + 1]
            continue
        elif tok.startswith("--model.class_path="):
            named = tok.split("=", 1)[1]
            continue
        else:
            continue
        if path.is_file():
            cfg = yaml.safe_load(path.read_text())
            model = cfg.get("model") if isinstance(cfg, dict) else None
            if isinstance(model, dict) and model.get("class_path"):
                named = model["class_path"]
    return named


class OmniCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
        logging.getLogger("omnifuse").setLevel(logging.INFO)
        argv = sys.argv[1:] if args is None else args
        self.default_model = (named_model_class(argv) if isinstance(argv, list) else None) or DEFAULT_MODEL
        super().__init__(
            model_class=None,
            datamodule_class=WorldDataModule,
            subclass_mode_model=True,
            save_config_callback=None,  # the resolved config goes to RUN/config.yaml, see before_fit
            parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": self.default_model}, "seed_everything": 0})
        parser.add_argument("--checkpoint_every", type=int, default=100, help="save a checkpoint every N optimizer steps")
        # one knob each: the data side decides these, the model must agree
        parser.link_arguments("data.vocab_size", "model.init_args.model.decoder.vocab_size")
        parser.link_arguments("data.row_len", "model.init_args.model.decoder.max_seq_len")
        parser.link_arguments("data.patch", "model.init_args.model.patch")
        parser.link_arguments("data.positions", "model.init_args.model.decoder.positions")
        parser.link_arguments("data.pixel_shuffle", "model.init_args.model.pixel_shuffle")
        # A scale preset's media-encoder size sits at the top level, not under model.init_args: a
        # NativeConfig has no `encoder` field, and a preset must compose with every model class.
        # jsonargparse skips a link whose target the chosen class lacks, so the native arm ignores it.
        parser.add_argument("--encoder", type=EncoderSize | None, default=None,
                            help="media encoder size (dim, n_layers, n_heads, ffn_hidden) for the contrastive stages")
        parser.link_arguments("encoder", "model.init_args.model.encoder")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        t = cfg.trainer
        if t.precision is None:  # bf16-mixed on GPU, fp32 on CPU
            on_gpu = torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda")
            t.precision = "bf16-mixed" if on_gpu else "32-true"

    def instantiate_trainer(self, **kwargs) -> Trainer:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(cfg.trainer.default_root_dir or "runs/default")
        cfg.trainer.default_root_dir = str(root)
        extra = [
            RunCheckpoint(
                dirpath=root / "checkpoints",
                filename="step-{step:06d}",
                auto_insert_metric_name=False,
                every_n_train_steps=cfg.checkpoint_every,
                save_top_k=-1,
                save_last=True,
            ),
            LearningRateMonitor(logging_interval="step"),
            ComputeRecord(),
        ]
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), *extra]
        trainer = super().instantiate_trainer(**kwargs)
        if cfg.trainer.logger in (None, True):
            trainer.loggers = [CSVLogger(root / "logs", name="csv"), TensorBoardLogger(root / "logs", name="tb")]
        return trainer

    def before_fit(self) -> None:
        if self.trainer.is_global_zero:
            root = Path(self.trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            self._parser("fit").save(self.config["fit"], root / "config.yaml", overwrite=True, skip_check=True, multifile=False)
            write_json_atomic(root / "launch.json", {"cwd": os.getcwd()})
