"""``BoltOnModule``: the base LightningModule of the arms built from pretrained parts (LLaVA, Flamingo).

It adds to :class:`~omnifuse.training.base.FusionModule` what a bolt-on recipe needs and the native
arm does not:

- **where the parts come from**: ``lm_ckpt`` (the text-LM stage, ``configs/stage/lm.yaml``),
  ``image_encoder_ckpt`` (CLIP, ``configs/stage/clip.yaml``) and ``audio_encoder_ckpt`` (CLAP,
  ``configs/stage/clap.yaml``): run directories or ``.ckpt`` files, read with
  :mod:`omnifuse.training.pretrained` (weights-only; a missing or mismatched part is an error naming
  the path and the stage command that makes it). ``init_from`` instead starts from a whole earlier
  run of the same arm (LLaVA stage 2 starts from stage 1's run).
- **when they load**: the arm's config needs the encoders' sizes when the model is built, so
  :meth:`BoltOnModule.fill_encoders` reads them in ``__init__``, from the run ``init_from`` names when
  set, else from the CLIP / CLAP stage runs (:func:`fill_encoder_configs`); they are then part of the
  saved hyper-parameters, so evaluating a checkpoint never reads the stage runs again.
  The weights load in ``on_fit_start`` of a fresh run only (after Lightning restores a resumed run's
  checkpoint, which holds every weight and the pretraining record).
- **what they cost**: ``compute.json`` gains ``pretraining`` (each part's stage run: checkpoint,
  ``train_flops``, parameters, slots), ``pretraining_flops`` (their sum, each stage run counted once
  even when two parts come from it) and ``train_flops_all_in`` (this run's ``train_flops`` plus
  ``pretraining_flops``). A run started with ``init_from`` inherits that run's pretraining record and
  adds the run itself as one more stage. ``train_flops`` stays the fusion stage's own cost, frozen
  forwards included: the study reports "fusion stage only" and "everything it took" from these two.

A subclass calls :meth:`BoltOnModule.fill_encoders` on its arm config and builds ``self.model`` (after
``super().__init__``), implements ``compute_loss`` and ``step_flops`` as any :class:`FusionModule`,
and :meth:`load_parts` (put the parts' state dicts into its model); ``init_from_command`` names the
command that makes an ``init_from`` run (quoted by the errors).
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any

import torch

from omnifuse.model.config import DecoderConfig
from omnifuse.training.base import OptimConfig, PackedLM
from omnifuse.training.pretrained import (
    LM_STAGE_COMMAND,
    Pretrained,
    encoder_config,
    load_encoder,
    load_lm,
    read_stage,
    sub_state_dict,
)

# Decoder fields that do not change the LM's weights or function on text: positions ("mrope" on a
# text stream equals "1d" exactly), the longest sequence accepted and the attention kernel.
DECODER_FIELDS_FREE = ("positions", "max_seq_len", "attention", "mrope_sections")


def fill_encoder_configs(arm_cfg: Any, image_encoder_ckpt: str | None, audio_encoder_ckpt: str | None) -> None:
    """Set ``arm_cfg.image_encoder`` / ``audio_encoder`` (when ``None``) to the encoder configs of
    the CLIP / CLAP stage runs, in place, and re-run the arm config's checks. A ``None`` path leaves
    the field ``None`` (the arm decides whether it can do without that modality)."""
    changed = False
    for field, path, modality in (
        ("image_encoder", image_encoder_ckpt, "image"),
        ("audio_encoder", audio_encoder_ckpt, "audio"),
    ):
        if getattr(arm_cfg, field) is None and path is not None:
            setattr(arm_cfg, field, encoder_config(path, modality))
            changed = True
    if changed:
        arm_cfg.__post_init__()  # patch width and feature layer checked against the filled encoders


def encoder_configs_of_run(path: str | Path, command: str) -> dict[str, Any]:
    """``{"image_encoder": ..., "audio_encoder": ...}`` of the arm config saved in a run's checkpoint
    (``path``: run directory or ``.ckpt``; ``command`` makes such a run and is quoted by the errors)."""
    saved = read_stage(path, command).hparams.get("model")
    if saved is None:
        raise ValueError(f"{path}: its checkpoint holds no model config; a run of `{command}` does")
    get = saved.get if isinstance(saved, dict) else lambda name: getattr(saved, name, None)
    return {name: get(name) for name in ("image_encoder", "audio_encoder")}


def check_decoder_matches(want: DecoderConfig, lm: Pretrained) -> None:
    """Refuse an LM whose config differs from the arm's decoder in anything but
    :data:`DECODER_FIELDS_FREE`, naming the fields, both values, the checkpoint and the stage command."""
    diff = [
        f"{f.name}: arm {getattr(want, f.name)!r} vs LM {getattr(lm.config, f.name)!r}"
        for f in dataclasses.fields(DecoderConfig)
        if f.name not in DECODER_FIELDS_FREE and getattr(want, f.name) != getattr(lm.config, f.name)
    ]
    if diff:
        raise ValueError(
            f"the LM in {lm.source} does not match the arm's decoder ({'; '.join(diff)}): use the same scale "
            f"preset for the LM stage and the arm (`{LM_STAGE_COMMAND}` with that preset), or point model.lm_ckpt "
            "at a matching LM run"
        )


def stage_record(part: Pretrained | None = None, *, source: Path | None = None, compute: dict | None = None) -> dict:
    """What compute.json keeps of one pretraining stage run."""
    compute = part.compute if part is not None else compute or {}
    source = part.source if part is not None else source
    keep = ("train_flops", "params_total", "params_trainable", "tokens_seen", "global_step", "train_seconds")
    return {"checkpoint": str(source), **{k: compute[k] for k in keep if k in compute}}


class BoltOnModule(PackedLM):
    """Base of LLaVA and Flamingo training; see the module docstring.

    Args:
        lm_ckpt: the text-LM stage's run directory (or ``.ckpt``).
        image_encoder_ckpt: the CLIP stage's run (or ``.ckpt``); ``None``: no image encoder.
        audio_encoder_ckpt: the CLAP stage's run (or ``.ckpt``); ``None``: no audio encoder.
        init_from: a run of the same LightningModule class to start from (all weights, strict),
            instead of the parts; its encoder configs must equal this run's.
        optim, compile, max_nonfinite, tasks: see :class:`~omnifuse.training.base.FusionModule`.
    """

    init_from_command: str | None = None  # the command that makes an ``init_from`` run (quoted by errors)

    def __init__(
        self,
        lm_ckpt: str | None = "runs/lm",
        image_encoder_ckpt: str | None = "runs/clip",
        audio_encoder_ckpt: str | None = "runs/clap",
        init_from: str | None = None,
        optim: OptimConfig = OptimConfig(),
        compile: bool = False,
        max_nonfinite: int = 3,
        tasks: tuple[str, ...] | None = None,
    ):
        super().__init__(optim=optim, compile=compile, max_nonfinite=max_nonfinite, tasks=tasks)
        self.lm_ckpt, self.image_encoder_ckpt, self.audio_encoder_ckpt = lm_ckpt, image_encoder_ckpt, audio_encoder_ckpt
        self.init_from = init_from
        self.pretraining: dict[str, dict] = {}  # stage name -> stage_record(...); saved in checkpoints

    # -- subclass contract -------------------------------------------------------------------
    @abc.abstractmethod
    def load_parts(
        self,
        lm: dict[str, torch.Tensor] | None,
        image_encoder: dict[str, torch.Tensor] | None,
        audio_encoder: dict[str, torch.Tensor] | None,
    ) -> None:
        """Put the stages' state dicts (``Decoder``, ``PatchEncoder`` keys; ``None`` = no such part)
        into ``self.model``."""

    def decoder_config(self) -> DecoderConfig:
        """The arm's decoder config, which the LM stage's must match (:func:`check_decoder_matches`)."""
        return self.cfg.decoder

    def fill_encoders(self, arm_cfg: Any) -> None:
        """Fill ``arm_cfg``'s ``None`` encoder fields (in place, before the model is built): from the
        run ``init_from`` names when set (its weights are the ones that will load), else from the
        CLIP / CLAP stage runs (:func:`fill_encoder_configs`). Filled fields are saved with the
        hyper-parameters, so a checkpoint reloads without reading either."""
        if self.init_from is None:
            fill_encoder_configs(arm_cfg, self.image_encoder_ckpt, self.audio_encoder_ckpt)
            return
        missing = [name for name in ("image_encoder", "audio_encoder") if getattr(arm_cfg, name) is None]
        if not missing:  # e.g. a checkpoint's saved config: nothing to read
            return
        theirs = encoder_configs_of_run(self.init_from, self._init_from_command())
        for name in missing:
            setattr(arm_cfg, name, theirs[name])
        arm_cfg.__post_init__()

    def _init_from_command(self) -> str:
        return self.init_from_command or f"python train.py fit ... (a {type(self).__name__} run)"

    # -- loading -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.check_vocab(self.decoder_config().vocab_size)

    def on_fit_start(self) -> None:
        # After Lightning restored a resumed run's checkpoint (which holds the pretraining record
        # and every weight), before the first step: only a fresh run loads the parts.
        if not self.pretraining:
            self.load_pretrained()
        super().on_fit_start()

    def load_pretrained(self) -> None:
        """Load the parts (or ``init_from``) into the model and record their pretraining cost."""
        if self.init_from is not None:
            self._load_init_from()
            return
        if self.lm_ckpt is None:
            raise ValueError(f"{type(self).__name__}: model.lm_ckpt is not set (`{LM_STAGE_COMMAND}` makes one)")
        lm = load_lm(self.lm_ckpt)
        check_decoder_matches(self.decoder_config(), lm)
        parts = {"lm": lm}
        for name, path, modality in (
            ("image_encoder", self.image_encoder_ckpt, "image"),
            ("audio_encoder", self.audio_encoder_ckpt, "audio"),
        ):
            if path is not None:
                parts[name] = load_encoder(path, modality)
                want = getattr(self.cfg, name)
                if want != parts[name].config:
                    raise ValueError(
                        f"model.{name}_ckpt ({parts[name].source}) holds an encoder of config {parts[name].config}, "
                        f"but the model was built with {want}: leave model.model.{name} unset (null) to take the "
                        "stage's"
                    )
        self.load_parts(
            lm.state_dict,
            parts["image_encoder"].state_dict if "image_encoder" in parts else None,
            parts["audio_encoder"].state_dict if "audio_encoder" in parts else None,
        )
        self.pretraining = {name: stage_record(part) for name, part in parts.items()}

    def _load_init_from(self) -> None:
        stage = read_stage(self.init_from, self._init_from_command())
        state = sub_state_dict(stage.checkpoint["state_dict"], "model.")
        saved_cfg = stage.hparams.get("model")
        for name in ("image_encoder", "audio_encoder"):
            theirs = getattr(saved_cfg, name, None) if not isinstance(saved_cfg, dict) else saved_cfg.get(name)
            if dataclasses.is_dataclass(theirs):
                theirs = dataclasses.asdict(theirs)
            ours = getattr(self.cfg, name)
            ours = dataclasses.asdict(ours) if ours is not None else None
            if theirs != ours:
                raise ValueError(
                    f"model.init_from {stage.path}: its {name} config {theirs} differs from this run's {ours}; "
                    "start from a run built on the same encoder stages"
                )
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"model.init_from {stage.path}: its weights do not fit {type(self.model).__name__}: {e}") from None
        inherited = stage.compute.get("pretraining") or {}
        self.pretraining = {**inherited, Path(stage.path).parent.parent.name or "init_from": stage_record(
            source=stage.path, compute=stage.compute)}

    # -- accounting --------------------------------------------------------------------------
    def pretraining_flops(self) -> float:
        """FLOPs of the stages this run is built from, each stage checkpoint counted once."""
        by_source = {rec["checkpoint"]: rec.get("train_flops", 0.0) for rec in self.pretraining.values()}
        return float(sum(by_source.values()))

    def compute_extras(self) -> dict:
        pre = self.pretraining_flops()
        return {
            "model_config": dataclasses.asdict(self.cfg),
            "pretraining": self.pretraining,
            "pretraining_flops": pre,
            "train_flops_all_in": self.flops_seen + pre,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["omnifuse_pretraining"] = self.pretraining
        # LightningCLI saves the init arguments as it parsed them (plain dicts, encoders null), not the
        # config __init__ filled in: put the filled encoder configs there, so that loading the
        # checkpoint never reads the stage runs (a config object, when given, is already filled)
        arm = (checkpoint.get("hyper_parameters") or {}).get("model")
        if isinstance(arm, dict):
            for name in ("image_encoder", "audio_encoder"):
                if name in arm:
                    value = getattr(self.cfg, name, None)
                    arm[name] = dataclasses.asdict(value) if value is not None else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.pretraining = checkpoint.get("omnifuse_pretraining") or {}
