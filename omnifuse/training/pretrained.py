"""Pretrained parts for the bolt-on arms: a stage's run directory (or checkpoint) -> weights, config, cost.

The stages (``configs/stage/*.yaml``) train, with ``train.py``, the parts LLaVA and Flamingo join:

    load_lm(path)                 -> Pretrained(config: DecoderConfig, state_dict for omnifuse.model.Decoder, ...)
    load_encoder(path, modality)  -> Pretrained(config: EncoderConfig, state_dict for omnifuse.model.PatchEncoder, ...)

Every loader resolves its ``path`` the same way (:func:`read_stage`):

- ``path`` is a run directory written by ``train.py fit`` (its ``checkpoints/last.ckpt``, else the
  newest ``step-*.ckpt``) or a ``.ckpt`` file inside one (``RUN/checkpoints/x.ckpt``);
- the checkpoint is opened weights-only: tensors, plain containers and omnifuse's config dataclasses
  (:func:`omnifuse.eval.loading.allowed_checkpoint_globals`), nothing that runs code;
- ``compute`` is the run's ``compute.json`` and must describe the checkpoint's own step: its
  ``train_flops`` are the pretraining FLOPs an arm built on the part records.

A missing path, a missing ``compute.json`` or a checkpoint of another kind of run is an error that
names the path and the stage command that makes the right one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omnifuse.model.config import DecoderConfig, NativeConfig
from omnifuse.model.encoders import ContrastiveConfig, EncoderConfig

LM_STAGE_COMMAND = "python train.py fit -c configs/scale/tiny.yaml -c configs/stage/lm.yaml"
ENCODER_STAGE_COMMANDS = {
    "image": "python train.py fit -c configs/scale/tiny.yaml -c configs/stage/clip.yaml",
    "audio": "python train.py fit -c configs/scale/tiny.yaml -c configs/stage/clap.yaml",
}


@dataclass
class Pretrained:
    """One pretrained part.

    Attributes:
        config: the part's model config (``DecoderConfig`` for the LM).
        state_dict: weights that load with ``strict=True`` into the module built from ``config``
            (``Decoder(config)`` for the LM), on CPU.
        compute: the stage run's ``compute.json`` (``train_flops``, ``params_*``, ``tokens_seen`` …).
        source: the checkpoint file the weights come from.
    """

    config: Any
    state_dict: dict[str, torch.Tensor]
    compute: dict
    source: Path


@dataclass
class StageCheckpoint:
    """A stage run's checkpoint, opened: the Lightning checkpoint dict, its file and the run's compute."""

    checkpoint: dict
    path: Path
    compute: dict

    @property
    def hparams(self) -> dict:
        """The LightningModule's saved init arguments (``hyper_parameters``)."""
        return self.checkpoint.get("hyper_parameters") or {}

    @property
    def data_hparams(self) -> dict:
        """The DataModule's saved init arguments (``datamodule_hyper_parameters``; {} if absent)."""
        return self.checkpoint.get("datamodule_hyper_parameters") or {}


def read_stage(path: str | Path, command: str) -> StageCheckpoint:
    """Open the checkpoint of a stage run (module docstring); ``command`` is the stage's ``train.py``
    command, quoted by every error so that the reader knows how to make what is missing."""
    from omnifuse.eval.loading import allowed_checkpoint_globals, find_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: train the stage first with `{command}`")
    if path.is_dir():
        try:
            ckpt_path = find_checkpoint(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (the stage is trained by `{command}`)") from None
        run_dir = path
    else:
        ckpt_path = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    with torch.serialization.safe_globals(allowed_checkpoint_globals(ckpt_path)):
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    compute_path = run_dir / "compute.json"
    if not compute_path.exists():
        raise FileNotFoundError(
            f"{compute_path} not found beside {ckpt_path}: the pretraining cost of the part is unknown "
            f"(a run of `{command}` writes it)"
        )
    compute = json.loads(compute_path.read_text())
    step, recorded = checkpoint.get("global_step"), compute.get("global_step")
    if step != recorded:
        raise ValueError(
            f"{ckpt_path} is at step {step} but {compute_path} describes step {recorded}: pass the run "
            "directory (its last checkpoint) so that the pretraining FLOPs belong to the weights"
        )
    return StageCheckpoint(checkpoint, ckpt_path, compute)


def sub_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix`` (e.g. ``"model.decoder."``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_loads(module_cls: type, config: Any, state: dict[str, torch.Tensor], source: Path, command: str) -> None:
    """Raise ValueError, naming ``source`` and ``command``, unless ``state`` loads with ``strict=True``
    into ``module_cls(config)`` (missing or unexpected keys, or a shape that differs)."""
    try:
        module_cls(config).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{source}: the weights do not fit {module_cls.__name__}({type(config).__name__}) "
            f"(a checkpoint of `{command}` does): {e}"
        ) from None


def load_lm(path: str | Path) -> Pretrained:
    """The text LM of a ``configs/stage/lm.yaml`` run: a ``DecoderConfig`` and the state dict of
    its :class:`~omnifuse.model.Decoder` (token embedding, blocks, norm, output head).

    ``path``: the LM stage's run directory (default ``runs/lm``) or one of its ``.ckpt`` files.
    Refuses, naming the file, a run that is not a text LM: a model other than ``NativeConfig``,
    modality embeddings (the arms embed a slot as ``tok_embeddings(token)`` alone), or data that
    put media patches into the stream (``data.media: inline``).
    """
    stage = read_stage(path, LM_STAGE_COMMAND)
    model_cfg = _config(stage.hparams.get("model"), NativeConfig)
    not_lm = None
    if not isinstance(model_cfg, NativeConfig):
        kind = stage.hparams.get("_class_path") or type(model_cfg).__name__
        not_lm = f"its model is {kind}, not the NativeLM (NativeConfig) of a text LM"
    elif model_cfg.modality_embedding:
        not_lm = "its model has modality embeddings (the LM stage sets modality_embedding: false)"
    elif stage.data_hparams.get("media", "inline") == "inline":
        not_lm = "it was trained with media patches in the stream (data.media: inline; the LM stage uses marker)"
    if not_lm:
        raise ValueError(f"{stage.path} is not a text LM stage checkpoint: {not_lm}; train one with `{LM_STAGE_COMMAND}`")
    config: DecoderConfig = model_cfg.decoder
    state = sub_state_dict(stage.checkpoint["state_dict"], "model.decoder.")
    from omnifuse.model.decoder import Decoder

    check_loads(Decoder, config, state, stage.path, LM_STAGE_COMMAND)
    return Pretrained(config, state, stage.compute, stage.path)


def _config(value: Any, cls: type) -> Any:
    """A saved init argument as its dataclass (LightningCLI may save it as a plain dict); a dict of
    another config's fields is returned as it is, for the caller's type check to refuse."""
    if isinstance(value, dict):
        try:
            return cls(**{k: v for k, v in value.items() if not k.startswith("_")})
        except TypeError:  # another kind of run's config (e.g. a CLIP run given as the LM)
            return value
    return value


def _encoder_stage(path: str | Path, modality: str) -> tuple[StageCheckpoint, EncoderConfig]:
    if modality not in ENCODER_STAGE_COMMANDS:
        raise ValueError(f"modality must be one of {tuple(ENCODER_STAGE_COMMANDS)}, got {modality!r}")
    command = ENCODER_STAGE_COMMANDS[modality]
    stage = read_stage(path, command)
    cfg = _config(stage.hparams.get("model"), ContrastiveConfig)
    if not isinstance(cfg, ContrastiveConfig):
        raise ValueError(
            f"{stage.path} is not a contrastive stage checkpoint (its model config is {type(cfg).__name__}, "
            f"not ContrastiveConfig); train one with `{command}`"
        )
    if cfg.modality != modality:
        raise ValueError(
            f"{stage.path} is a {cfg.modality} encoder stage, but an {modality} encoder was asked for; "
            f"train one with `{command}`"
        )
    return stage, cfg.encoder_config()


def encoder_config(path: str | Path, modality: str) -> EncoderConfig:
    """The :class:`~omnifuse.model.encoders.EncoderConfig` of a CLIP (``modality="image"``) or CLAP
    (``"audio"``) stage run, without checking its weights (an arm config fills its encoder field
    with it before the model is built; :func:`load_encoder` checks the weights)."""
    return _encoder_stage(path, modality)[1]


def load_encoder(path: str | Path, modality: str) -> Pretrained:
    """The media encoder of a ``configs/stage/clip.yaml`` (``modality="image"``) or
    ``configs/stage/clap.yaml`` (``"audio"``) run: its ``EncoderConfig`` and the state dict of its
    :class:`~omnifuse.model.encoders.PatchEncoder` (the text tower and temperature stay behind).

    ``path``: the stage's run directory (default ``runs/clip`` / ``runs/clap``) or a ``.ckpt`` in it.
    Refuses, naming the file and the stage command, a run of another kind or modality.
    """
    from omnifuse.model.encoders import PatchEncoder

    stage, config = _encoder_stage(path, modality)
    state = sub_state_dict(stage.checkpoint["state_dict"], "model.encoder.")
    check_loads(PatchEncoder, config, state, stage.path, ENCODER_STAGE_COMMANDS[modality])
    return Pretrained(config, state, stage.compute, stage.path)
