"""Open a run directory made by ``train.py``: its resolved config, model weights and tokenizer.

Two rules make a run safe and portable to open:

* **Weights-only loading.** A checkpoint is a pickle; opening one with ``weights_only=False`` runs
  whatever it pickled. :func:`load_checkpoint_module` loads with ``weights_only=True`` and allows,
  besides tensors and plain containers, exactly the extra globals the file names that are
  dataclasses defined in an ``omnifuse.*`` module (the typed configs Lightning stores in
  ``hyper_parameters``). Any other global is refused before unpickling, naming it and the file.
* **Paths resolved from anywhere.** ``config.yaml`` keeps the paths as typed at training time
  (``data.world_dir: worlds/tiny``), relative to the directory ``train.py`` ran in.
  :func:`run_path_candidates` tries, in order: the path itself when absolute; relative to the cwd
  recorded in ``RUN/launch.json`` by ``train.py``; relative to the cwd implied by the run's own
  location (a run saved in ``runs/x`` relative to its cwd and now found at ``/a/b/runs/x`` was
  launched from ``/a/b``: this survives moving the whole project); relative to the current
  directory. The error lists every path looked for.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from omnifuse.data.datamodule import TOKENIZER_FILE

LAUNCH_FILE = "launch.json"  # {"cwd": ...}: the directory train.py ran in (omnifuse.training.cli)


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint names a global that weights-only loading does not allow."""


@dataclass
class Run:
    run_dir: Path
    config: dict  # the resolved training config (RUN/config.yaml)
    module: torch.nn.Module  # the LightningModule, eval mode, on CPU
    world_dir: Path  # the training world, resolved (absolute)
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


# --------------------------------------------------------------------------- weights-only loading


def _is_omnifuse_module(name: str) -> bool:
    return name == "omnifuse" or name.startswith("omnifuse.")


def allowed_checkpoint_globals(path: str | Path) -> list[type]:
    """The globals ``path`` pickles beyond torch's weights-only defaults, if all are allowed.

    The file's pickle is read opcode by opcode (``torch.serialization.get_unsafe_globals_in_checkpoint``,
    nothing is executed). A global is allowed when it is a class defined in an ``omnifuse.*``
    module and is a dataclass: unpickling one only sets its fields. Only ``omnifuse.*`` modules are
    imported to check that. Anything else raises :class:`UnsafeCheckpoint` naming the global and
    the file.
    """
    allowed = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
        module_name, _, qualname = name.rpartition(".")
        obj = None
        if _is_omnifuse_module(module_name):
            try:
                obj = importlib.import_module(module_name)
                for part in qualname.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError):
                obj = None
        if not (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module_name):
            raise UnsafeCheckpoint(
                f"{path} pickles the global {name!r}, which weights-only loading does not allow (only tensors, "
                "plain containers and dataclasses defined in omnifuse.* modules are): refusing to open it. "
                "Unpickling arbitrary globals can run code; re-save the checkpoint from trusted code if you must."
            )
        allowed.append(obj)
    return allowed


def load_checkpoint_module(cls: type, path: str | Path, map_location: str = "cpu"):
    """``cls.load_from_checkpoint(path)`` with ``weights_only=True``, allowing the checkpoint's
    omnifuse config dataclasses (:func:`allowed_checkpoint_globals`) and nothing else.

    The module comes back uncompiled (``compile=False`` overrides the saved hyperparameter):
    Lightning calls ``configure_model`` when it rebuilds a module, which would compile the model
    of a run trained with ``compile: true`` (its weights load either way: the keys do not depend
    on compilation)."""
    allowed = allowed_checkpoint_globals(path)
    with torch.serialization.safe_globals(allowed):
        return cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, compile=False)


def module_class(config: dict, cfg_path: Path) -> type:
    """The LightningModule class named by ``config.yaml``'s ``model.class_path``; only classes of
    ``omnifuse.*`` modules are imported (a shared run's config must not import arbitrary code)."""
    import lightning as L

    try:
        class_path = config["model"]["class_path"]
    except (KeyError, TypeError):
        raise ValueError(f"{cfg_path}: key 'model', field 'class_path' is missing") from None
    module_path, _, cls_name = str(class_path).rpartition(".")
    if not _is_omnifuse_module(module_path):
        raise ValueError(f"{cfg_path}: model.class_path {class_path!r} is not an omnifuse.* class; refusing to import it")
    cls = getattr(importlib.import_module(module_path), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise ValueError(f"{cfg_path}: model.class_path {class_path!r} is not a LightningModule")
    return cls


# --------------------------------------------------------------------------- paths


def _launch_cwd(run_dir: Path) -> Path | None:
    path = run_dir / LAUNCH_FILE
    if not path.exists():
        return None
    cwd = json.loads(path.read_text()).get("cwd")
    return Path(cwd) if cwd else None


def _implied_cwd(run_dir: Path, config: dict) -> Path | None:
    """The directory ``train.py`` ran in, if the run still sits at its relative ``default_root_dir``."""
    root = (config.get("trainer") or {}).get("default_root_dir")
    if not root or Path(root).is_absolute():
        return None
    here, parts = run_dir.resolve().parts, Path(root).parts
    if ".." in parts or len(parts) >= len(here) or here[len(here) - len(parts):] != parts:
        return None
    return Path(*here[: len(here) - len(parts)])


def run_path_candidates(run_dir: str | Path, config: dict, path: str | Path) -> list[Path]:
    """Where a path from a run's ``config.yaml`` may be, most trusted first (module docstring)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return [p]
    run_dir = Path(run_dir)
    bases = [_launch_cwd(run_dir), _implied_cwd(run_dir, config), Path.cwd()]
    out: list[Path] = []
    for base in bases:
        if base is not None and (base / p).absolute() not in out:
            out.append((base / p).absolute())
    return out


def resolve_world(run_dir: str | Path, config: dict) -> Path:
    """The run's training world folder (the one holding its ``tokenizer.model``), absolute."""
    try:
        world = config["data"]["world_dir"]
    except (KeyError, TypeError):
        raise ValueError(f"{Path(run_dir) / 'config.yaml'}: key 'data', field 'world_dir' is missing") from None
    candidates = run_path_candidates(run_dir, config, world)
    for c in candidates:
        if (c / TOKENIZER_FILE).is_file():
            return c
    looked = ", ".join(str(c / TOKENIZER_FILE) for c in candidates)
    raise FileNotFoundError(
        f"the world of run {run_dir} (config.yaml data.world_dir = {world!r}) was not found: looked for {looked}. "
        f"Evaluate from the directory train.py ran in, or put the world (with its {TOKENIZER_FILE}) at one of those paths."
    )


def world_identity(world_dir: str | Path) -> dict:
    """``{"hash", "preset", "seed"}`` of a world: ``hash`` is the SHA-256 (first 16 hex digits) of
    its ``world.json``, which the generator writes byte-identically for one preset, seed and
    counts; runs trained on worlds with different hashes are different experiments."""
    import hashlib

    path = Path(world_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a run's world identity is the hash of its world.json")
    raw = path.read_bytes()
    settings = json.loads(raw).get("settings", {})
    return {"hash": hashlib.sha256(raw).hexdigest()[:16], "preset": settings.get("preset"), "seed": settings.get("seed")}


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> Run:
    """Load a run for evaluation: its model (weights-only), and the tokenizer of the world it was
    trained on, from any working directory."""
    from omnifuse.data.datamodule import build_interleaver

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: --ckpt must be a run directory written by `train.py fit`")
    config = yaml.safe_load(cfg_path.read_text())
    ckpt = Path(checkpoint) if checkpoint else find_checkpoint(run_dir)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found")
    module = load_checkpoint_module(module_class(config, cfg_path), ckpt)
    module.eval()
    data = config["data"]
    world = resolve_world(run_dir, config)
    tokenizer, interleaver = build_interleaver(world, data["patch"], data["positions"], data.get("media", "inline"),
                                               data.get("pixel_shuffle", False))
    compute_path = run_dir / "compute.json"
    compute = json.loads(compute_path.read_text()) if compute_path.exists() else {}
    return Run(run_dir, config, module, world, tokenizer, interleaver, compute, ckpt)
