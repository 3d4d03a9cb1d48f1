"""The LightningCLI behind ``train.py``: composed YAML configs, one run directory per experiment.

A run directory (``--trainer.default_root_dir``) holds::

    config.yaml            the resolved config of the latest ``fit`` (every default filled in)
    checkpoints/           step-NNNNNN.ckpt every ``checkpoint_every`` steps, and last.ckpt
    logs/csv/version_N/    metrics.csv (one version per launch; a resumed run gets a new one)
    logs/tb/version_N/     TensorBoard events
    compute.json           parameters, tokens by modality, training FLOPs (rewritten at each checkpoint)
    launch.json            {"cwd": ...}: the directory train.py ran in, which config.yaml's relative
                           paths (data.world_dir) are relative to (read by omnifuse.eval.loading)

A run may start from an earlier run (``model.init_from``, e.g. LLaVA's stage 2 from stage 1). The
top-level key ``init_stage`` names a config file that turns the command into the one that makes
that run: when ``fit`` starts and ``model.init_from`` holds no finished run, train.py first runs the
same command with ``-c INIT_STAGE`` after its last config file, into ``model.init_from``
(:func:`init_stage_args`), resuming it when it was interrupted. So ``-c configs/scale/tiny.yaml
-c configs/fusion/llava.yaml`` trains LLaVA's two stages, each into its own run directory, and
every preset, ablation file and command-line override applies to both (the stage file overrides
only what differs between the stages). ``init_stage`` is relative to the current directory, as
every path in the configs; a file a config includes with jsonargparse's ``config:`` key is relative
to the including file.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
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
log = logging.getLogger("omnifuse.training")


def config_files(path: Path) -> list[Path]:
    """``path`` after the config files it includes with jsonargparse's ``config:`` key (relative to
    it, recursively): the files a ``-c path`` reads, in the order jsonargparse applies them."""
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
    included = cfg.get("config") if isinstance(cfg, dict) else None
    files: list[Path] = []
    for inc in [included] if isinstance(included, str) else included or []:
        files += config_files(path.parent / inc)
    return [*files, path]


def _config_tokens(args: list[str]) -> list[tuple[int, int, Path]]:
    """``(first, end, path)`` for each ``-c PATH`` / ``--config PATH`` / ``--config=PATH`` of a command
    line: ``args[first:end]`` are its tokens."""
    found = []
    for i, tok in enumerate(args):
        if tok in ("-c", "--config") and i + 1 < len(args):
            found.append((i, i + 2, Path(args[i + 1])))
        elif tok.startswith("--config="):
            found.append((i, i + 1, Path(tok.split("=", 1)[1])))
    return found




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
    configs = {first: path for first, _, path in _config_tokens(tokens)}
    for i, tok in enumerate(tokens):
        if i in configs:
            for path in config_files(configs[i]):  # a file's includes first, as jsonargparse reads them
                cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
                model = cfg.get("model") if isinstance(cfg, dict) else None
                if isinstance(model, dict) and model.get("class_path"):
                    named = model["class_path"]
        elif tok == "--model.class_path" and i + 1 < len(tokens):
            named = tokens[i + 1]
        elif tok.startswith("--model.class_path="):
            named = tok.split("=", 1)[1]
    return named


def init_stage_args(args: list[str], init_stage: str, run_dir: str, resume: Path | None) -> list[str]:
    """The ``train.py`` arguments that make the run ``model.init_from`` names, from a ``fit`` command
    line ``args`` whose config set ``init_stage``: the same arguments with ``-c init_stage`` added
    after the last config file (so its keys override the configs', and the command line's overrides
    still apply to both runs), ``--ckpt_path`` dropped (it belongs to the later run), then
    ``--trainer.default_root_dir run_dir --model.init_from null --init_stage null`` and, when
    resuming, ``--ckpt_path resume``.
    """
    out = list(args)
    configs = _config_tokens(out)
    at = configs[-1][1] if configs else 1  # after the last config file, else after the subcommand
    out[at:at] = ["-c", init_stage]
    kept, skip = [], False
    for tok in out:
        if skip:
            skip = False
        elif tok == "--ckpt_path":
            skip = True
        elif not tok.startswith("--ckpt_path="):
            kept.append(tok)
    kept += ["--trainer.default_root_dir", run_dir, "--model.init_from", "null", "--init_stage", "null"]
    if resume is not None:
        kept += ["--ckpt_path", str(resume)]
    return kept


def init_run_state(run_dir: Path) -> tuple[str, Path | None]:
    """``("done" | "resume" | "missing", checkpoint)`` of the run an ``init_stage`` makes: done when
    its compute.json reached its config's ``trainer.max_steps``, resume from its last checkpoint
    when it stopped before, missing when it holds no checkpoint."""
    from omnifuse.eval.loading import find_checkpoint

    try:
        ckpt = find_checkpoint(run_dir)
    except FileNotFoundError:
        return "missing", None
    compute, config = run_dir / "compute.json", run_dir / "config.yaml"
    if compute.exists() and config.exists():
        step = json.loads(compute.read_text()).get("global_step", 0)
        max_steps = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("max_steps") or -1
        if max_steps < 0 or step >= max_steps:
            return "done", ckpt
    return "resume", ckpt


def run_init_stage(args: list[str], init_stage: str, init_from: str | None) -> None:
    """Make ``init_from``'s run with ``init_stage`` (module docstring) unless it is done: ``train.py``
    in a subprocess, so that the later run starts from a fresh process state (seeds, threads)."""
    if init_from is None:
        raise ValueError(f"init_stage is {init_stage} but model.init_from is null: there is no run to make "
                         "(set model.init_from, or init_stage: null)")
    if not Path(init_stage).is_file():
        raise FileNotFoundError(f"init_stage {init_stage} not found (relative to the current directory {os.getcwd()})")
    state, ckpt = init_run_state(Path(init_from))
    if state == "done":
        return
    stage_args = init_stage_args(args, init_stage, init_from, ckpt if state == "resume" else None)
    shown = "python train.py " + shlex.join(stage_args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched as one of several processes: they would race
        raise RuntimeError(f"model.init_from {init_from} is not a finished run: make it first with `{shown}`")
    log.info("model.init_from %s is %s: running its stage first: %s", init_from,
             "unfinished" if state == "resume" else "missing", shown)
    import omnifuse

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(omnifuse.__file__).parents[1]), env.get("PYTHONPATH")]))
    rc = subprocess.call([sys.executable, "-m", "omnifuse.training.cli", *stage_args], env=env)
    if rc != 0:
        raise RuntimeError(f"the stage that makes model.init_from {init_from} failed (exit {rc}; its log is above): "
                           f"`{shown}`")
    if init_run_state(Path(init_from))[0] != "done":
        raise RuntimeError(f"`{shown}` ended without finishing {init_from}")


class OmniCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
        logging.getLogger("omnifuse").setLevel(logging.INFO)
        argv = sys.argv[1:] if args is None else args
        self.argv = argv
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
        parser.add_argument("--init_stage", type=str | None, default=None,
                            help="config file that makes the run model.init_from names; `fit` runs it first when "
                                 "that run is missing or unfinished (see omnifuse/training/cli.py)")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        t = cfg.trainer
        if t.precision is None:  # bf16-mixed on GPU, fp32 on CPU
            on_gpu = torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda")
            t.precision = "bf16-mixed" if on_gpu else "32-true"
        if self.subcommand == "fit" and cfg.get("init_stage"):
            if not isinstance(self.argv, list):
                raise ValueError("init_stage needs a command line (a list of arguments) to run its stage with")
            run_init_stage(self.argv, cfg.init_stage, cfg.model.init_args.get("init_from"))

    def after_instantiate_classes(self) -> None:
        # The loggers get the module's hyper-parameters only: Lightning merges the datamodule's into
        # them and refuses a name both hold with different values, and `tasks` is both the module's
        # label names and the data's task filter (data.tasks). RUN/config.yaml has every setting.
        if self.datamodule is not None:
            self.datamodule._log_hyperparams = False

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


if __name__ == "__main__":  # what run_init_stage runs: train.py without depending on where it lies
    OmniCLI()
