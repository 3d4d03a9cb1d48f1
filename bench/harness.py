"""Harness vs bare loop: slots/s of train.py's Lightning harness next to a bare training loop, per arm.

    python bench/harness.py [--arms native llava flamingo] [--steps 20] [--warmup 4] [--rounds 2]
                            [--breakdown native] [--variants ...] [--threads N] [--world worlds/tiny]
                            [--json out.json]

For each arm at the scale preset (``configs/scale/tiny.yaml`` composed with ``configs/fusion/ARM.yaml``;
the bolt-on arms with random-weight parts at the preset's ``encoder:`` size, as ``bench/train.py``
builds LLaVA: timing does not depend on the weights, and no stage run is read):

- **harness**: ``Trainer.fit`` of the arm's LightningModule on the ``WorldDataModule``, both built
  by ``train.py``'s :class:`~omnifuse.training.cli.OmniCLI` from the preset and the arm's data keys
  (data workers, loggers, progress bar, gradient clipping, checkpoint callbacks: train.py's
  defaults), validation off (``limit_val_batches 0``, as the issue measured), ``checkpoint_every``
  left at train.py's default (100: no step checkpoint falls in a window of fewer steps; the
  ``ckpt10`` variant prices the writes). Data loading is **included**: the loader workers run as in
  train.py, competing for the cores.
- **bare**: the same module class and optimizer (its own ``configure_optimizers()``: AdamW groups,
  warmup + cosine, stepped per batch), ``clip_grad_norm_`` at the preset's ``gradient_clip_val``,
  on the same batches pre-drawn from the same data module (``num_workers 0``, before timing: data
  cost excluded): ``compute_loss`` -> backward -> clip -> step -> schedule -> zero_grad, nothing else.

slots/s = slots of the steps after ``--warmup`` / the wall time from the end of the last warm-up step
to the end of the last step (on CUDA, synchronised at those two points only). Every harness run is
paired with a bare run next to it in time (alternating which goes first): a shared machine's speed
drifts over minutes, and a pair sees the same drift. ``ratio`` = median over the pairs of harness
slots/s ÷ bare slots/s. ``cpu_ratio`` = bare CPU seconds per slot ÷ the harness's (training process,
all threads, plus its loader workers), from ``psutil``: the ratio on cores shared with other work,
where wall time follows the CPU time a process asks for, whatever the others' load.

``--breakdown ARM ...`` also times harness variants on those arms, one change each from the
harness (each paired with its own bare run), to say where the rest goes:

=================  ==================================================================================
workers0           ``data.num_workers 0``: loading in the training process, between steps (the tiny
                   preset's own setting since the loader cache)
workers1           ``data.num_workers 1``: one loader worker process beside the training process
predrawn           the pre-drawn batches through a plain DataLoader: the harness without data cost
no_cache           ``data.cache_mb 0``: every pass over the shards reads, decodes and tokenizes again
                   (the loader's document cache replays a shard's documents after its first pass:
                   time it on a world whose training split is a few steps long, ``--world``, so
                   that the timed steps are the later passes of a long run)
log1, log50        ``trainer.log_every_n_steps`` 1 / 50 (the preset's is 10)
no_progress_bar    ``trainer.enable_progress_bar false``
ckpt10             ``checkpoint_every 10``: the checkpoint writes, priced per write
no_token_cache     ``data.token_cache null``: the first pass reads, decodes and tokenizes the tars (as a
                   world's first run does; by default the bench fills the token cache on disk first,
                   ``--cold-token-cache`` leaves it as it is)
lightning_only     predrawn, and a ``training_step`` that returns the loss only (no counters, no
                   logging, no step timer): what Lightning's loop costs by itself
=================  ==================================================================================

and counts the **reads to the host per training step** by caller, CUDA-free: during the timed steps
of one more harness fit and one more bare run, ``Tensor.item``, ``tolist``, ``__bool__``,
``__float__`` and ``__int__`` are wrapped to count calls, attributed to the first caller outside
torch. On a GPU each read of a device tensor is a sync; AdamW's step counters (``torch/optim``) and
values the harness logs from the host are CPU tensors there, not syncs. Not counted: blocking copies
to the device (Lightning logging a Python number copies it to the module's device).

The tables go to stdout (the progress bar to stderr); ``--threads`` sets the training process's
torch threads for harness and bare alike.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil
import torch
import yaml
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnifuse.data.datamodule import WorldDataModule  # noqa: E402
from omnifuse.model.config import DecoderConfig, NativeConfig  # noqa: E402
from omnifuse.model.encoders import EncoderConfig  # noqa: E402
from omnifuse.training.base import OptimConfig  # noqa: E402
from omnifuse.training.cli import OmniCLI  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("native", "llava", "flamingo")
VARIANTS = ("workers0", "workers1", "predrawn", "no_cache", "no_token_cache", "log1", "log50", "no_progress_bar", "ckpt10", "lightning_only")
# init arguments of the bolt-on modules that name where parts come from: the bench builds random parts
PART_KEYS = ("model", "optim", "lm_ckpt", "image_encoder_ckpt", "audio_encoder_ckpt", "init_from")


# -- the arms, as train.py's configs describe them --------------------------------------------------

def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def arm_spec(arm: str, scale: str) -> dict:
    """What ``-c configs/scale/SCALE.yaml -c configs/fusion/ARM.yaml`` sets: the module's init args,
    the data keys, the optimizer, the preset's decoder, encoder and trainer sections."""
    preset = load_yaml(ROOT / "configs" / "scale" / f"{scale}.yaml")
    fusion = load_yaml(ROOT / "configs" / "fusion" / f"{arm}.yaml")
    init = fusion["model"].get("init_args") or {}
    optim = {**preset["model"]["init_args"].get("optim", {}), **(init.get("optim") or {})}
    return {
        "class_path": fusion["model"]["class_path"],
        "init": init,
        "optim": optim,
        "decoder": preset["model"]["init_args"]["model"]["decoder"],
        "encoder": preset.get("encoder") or {},
        "data": {**preset["data"], **(fusion.get("data") or {})},
        "trainer": preset["trainer"],
    }


def build_module(spec: dict, seed: int = 0):
    """A fresh module of the arm (same seed, same weights every call); bolt-on parts random."""
    import importlib

    torch.manual_seed(seed)
    module_name, cls_name = spec["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    data = spec["data"]
    patch = data.get("patch", 8)
    decoder = DecoderConfig(vocab_size=data["vocab_size"], max_seq_len=data["row_len"],
                            positions=data.get("positions", "mrope"), **spec["decoder"])
    # decay over the preset's run length, as train.py's schedule does (the bench runs fewer steps)
    optim = OptimConfig(**{**spec["optim"], "decay_steps": spec["trainer"]["max_steps"]})
    arm_model = dict(spec["init"].get("model") or {})
    if cls_name == "NativeLM":
        return cls(NativeConfig(decoder, patch=patch, **arm_model), optim=optim)
    enc = {k: spec["encoder"][k] for k in ("dim", "n_layers", "n_heads", "ffn_hidden")}
    arm_model.update(image_encoder=EncoderConfig(patch_dim=3 * patch * patch, **enc),
                     audio_encoder=EncoderConfig(patch_dim=patch * patch, **enc), patch=patch)
    config_cls = cls.__init__.__annotations__["model"]
    if isinstance(config_cls, str):  # postponed annotations
        config_cls = getattr(importlib.import_module(module_name), config_cls)
    kwargs = {k: v for k, v in spec["init"].items() if k not in PART_KEYS}
    module = cls(config_cls(decoder=decoder, **arm_model), optim=optim, **kwargs)
    module.pretraining = {"bench": {"checkpoint": "random weights (bench/harness.py)"}}  # no stage run is read
    return module


def cli_args(spec: dict, world: str, root: str, max_steps: int, extra: list[str]) -> list[str]:
    """train.py's ``fit`` arguments (no subcommand: ``run=False``) for the arm's data keys with the native class (the trainer and data
    module do not depend on the class; the bench puts its own module in)."""
    data = []
    for key in ("positions", "media", "tasks"):
        if key in spec["data"]:
            value = spec["data"][key]
            data += [f"--data.{key}", "null" if value is None else str(value)]
    return ["-c", str(ROOT / "configs/scale/tiny.yaml"), "-c", str(ROOT / "configs/fusion/native.yaml"),
            "--data.world_dir", world, *data, "--trainer.limit_val_batches", "0",
            "--trainer.max_steps", str(max_steps), "--trainer.default_root_dir", root, *extra]


VARIANT_ARGS = {
    "harness": [], "workers0": ["--data.num_workers", "0"], "workers1": ["--data.num_workers", "1"],
    "predrawn": [], "lightning_only": [],
    "log1": ["--trainer.log_every_n_steps", "1"], "log50": ["--trainer.log_every_n_steps", "50"],
    "no_progress_bar": ["--trainer.enable_progress_bar", "false"], "ckpt10": ["--checkpoint_every", "10"],
    "no_cache": ["--data.cache_mb", "0"],
    "no_token_cache": ["--data.token_cache", "null"],
}


# -- timing ---------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> tuple[float, float]:
    """(this process's CPU seconds, all threads; its live child processes' (the loader workers))."""
    me = psutil.Process()
    own = me.cpu_times()
    kids = 0.0
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            kids += t.user + t.system
    return own.user + own.system, kids


class Window:
    """Wall time, CPU time and slots of the steps after ``warmup`` (the end of step ``warmup - 1``
    to the end of the last step); ``mark(step, slots)`` is called at the end of every step."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.last, self.device = warmup, warmup + steps - 1, device
        self.t0 = self.t1 = None
        self.cpu0 = self.cpu1 = (0.0, 0.0)
        self.slots = 0
        self.ends: list[float] = []  # every step's end (not synchronised: for a look at the steps only)

    def mark(self, step: int, slots: int) -> None:
        self.ends.append(time.perf_counter())
        if step == self.warmup - 1 or step == self.last:
            sync(self.device)
            now, cpu = time.perf_counter(), cpu_seconds()
            if step == self.warmup - 1:
                self.t0, self.cpu0 = now, cpu
            else:
                self.t1, self.cpu1 = now, cpu
        if self.warmup <= step <= self.last:
            self.slots += slots

    def cpu_ms_per_kslot(self) -> tuple[float, float]:
        """CPU milliseconds per 1000 slots in the window: (training process, loader workers)."""
        return tuple(1e6 * (b - a) / self.slots for a, b in zip(self.cpu0, self.cpu1))

    def step_seconds(self) -> list[float]:
        return [round(b - a, 4) for a, b in zip(self.ends, self.ends[1:])]

    @property
    def slots_per_s(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the timed window did not complete")
        return self.slots / (self.t1 - self.t0)


class Clock(Callback):
    """The harness's :class:`Window` (and the first batch checked against the bare loop's)."""

    def __init__(self, window: Window, first_batch: dict | None = None, on_window=None):
        self.window, self.first, self.on_window = window, first_batch, on_window

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and self.first is not None and not torch.equal(batch["tokens"].cpu(), self.first["tokens"]):
            raise RuntimeError("the harness's first batch differs from the bare loop's: not the same data")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.window.mark(batch_idx, batch["tokens"].numel())
        if self.on_window is not None:
            if batch_idx == self.window.warmup - 1:
                self.on_window(True)
            elif batch_idx == self.window.last:
                self.on_window(False)


def data_module(spec: dict, world: str) -> WorldDataModule:
    """The arm's data module as the harness's (the preset's and the arm's data keys), no workers."""
    data = spec["data"]
    keys = {k: data[k] for k in ("world_dir", "preset", "vocab_size", "row_len", "batch_size", "positions",
                                 "media", "tasks", "patch") if k in data}
    dm = WorldDataModule(**{**keys, "world_dir": world, "num_workers": 0})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def predraw(spec: dict, world: str, n: int) -> list[dict]:
    """The first ``n`` training batches the harness's data module yields (seed 0, no workers)."""
    it = iter(data_module(spec, world).train_dataloader())
    return [next(it) for _ in range(n)]


def prime_token_cache(spec: dict, world: str) -> float:
    """One pass over the training split through the arm's data module, so that its token cache on disk
    holds every shard (as after a world's first run); returns the seconds the pass took (short when it
    already did: the pass then reads the token cache)."""
    dm = data_module(spec, world)
    t0 = time.perf_counter()
    for _ in dm._stream(dm.train_shards(), train=False):
        pass
    return time.perf_counter() - t0


def lightning_only(module):
    """The module with a ``training_step`` that only returns the loss, and no step timer."""
    cls = type(module)
    bare = type(f"LossOnly{cls.__name__}", (cls,), {
        "training_step": lambda self, batch, batch_idx: self.compute_loss(batch)[0],
        "configure_callbacks": lambda self: [],
    })
    module.__class__ = bare
    return module


def run_harness(spec: dict, world: str, variant: str, batches: list[dict], warmup: int, steps: int,
                device: torch.device, on_window=None) -> Window:
    module = build_module(spec)
    if variant == "lightning_only":
        module = lightning_only(module)
    with tempfile.TemporaryDirectory(prefix="harness-") as root:
        extra = [] if device.type == "cpu" else ["--trainer.accelerator", "gpu"]
        cli = OmniCLI(args=cli_args(spec, world, root, warmup + steps, [*VARIANT_ARGS[variant], *extra]), run=False)
        window = Window(warmup, steps, device)
        cli.trainer.callbacks.append(Clock(window, batches[0], on_window))
        with contextlib.redirect_stdout(sys.stderr):  # the progress bar: stdout keeps the tables
            if variant in ("predrawn", "lightning_only"):
                cli.trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
            else:
                cli.trainer.fit(module, datamodule=cli.datamodule)
    return window


def run_bare(spec: dict, batches: list[dict], warmup: int, steps: int, device: torch.device,
             on_window=None) -> Window:
    module = build_module(spec).to(device)
    module.train()  # frozen modules stay in eval mode (FusionModule.train)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    params = [p for group in opt.param_groups for p in group["params"]]
    clip = spec["trainer"].get("gradient_clip_val")
    window = Window(warmup, steps, device)
    for i, batch in enumerate(batches[: warmup + steps]):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, _ = module.compute_loss(batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.mark(i, batch["tokens"].numel())
        if on_window is not None and i in (warmup - 1, warmup + steps - 1):
            on_window(i == warmup - 1)
    return window


# -- host syncs -----------------------------------------------------------------------------------

SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")
LOADER_CODE = ("omnifuse/data/", "omnifuse/tokenizers/")  # runs on host tensors, in whichever process loads


@contextlib.contextmanager
def counting_syncs(counts: collections.Counter, active: list[bool]):
    """Wrap the tensor methods that read a value to the host; count calls by first caller outside
    torch (``file:line function``) while ``active[0]``. Restores the methods on exit."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    torch_dir = os.path.dirname(torch.__file__)

    optim_dir = os.path.join(torch_dir, "optim")

    def wrap(name, fn):
        def counted(self, *a, **kw):
            if active[0]:
                for frame in reversed(traceback.extract_stack(limit=16)[:-1]):  # innermost first
                    if frame.filename.startswith(optim_dir):
                        # AdamW's step counters: CPU scalars even when the model is on a GPU, no device sync
                        counts[f"torch/optim (step counters, CPU) .{name}"] += 1
                        break
                    if not frame.filename.startswith(torch_dir):
                        where = frame.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
                        if where.startswith(LOADER_CODE):
                            # the loader's own tensors, built on the host (data.num_workers 0): no sync
                            where = f"{where} (loader, CPU tensors)"
                        counts[f"{where}:{frame.lineno} {frame.name} .{name}"] += 1
                        break
            return fn(self, *a, **kw)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def count_harness_syncs(spec: dict, world: str, batches: list[dict], warmup: int, steps: int,
                        device: torch.device) -> dict:
    """Reads to the host per step, by caller, in the harness and in the bare loop (same steps)."""
    found = {}
    for kind in ("harness", "bare"):
        counts: collections.Counter = collections.Counter()
        active = [False]

        def on_window(start: bool, active=active) -> None:
            active[0] = start

        with counting_syncs(counts, active):
            if kind == "harness":
                run_harness(spec, world, "harness", batches, warmup, steps, device, on_window=on_window)
            else:
                run_bare(spec, batches, warmup, steps, device, on_window=on_window)
        found[kind] = {k: v / steps for k, v in counts.items()}
    harness, bare = found["harness"], found["bare"]
    # what the harness adds, caller by caller (e.g. a FLOPs count calling the model's media_layout
    # adds to a caller the forward has too)
    added = {k: v - bare.get(k, 0.0) for k, v in harness.items() if v - bare.get(k, 0.0) > 1e-9}
    return {"per_step_harness": sum(harness.values()), "per_step_bare": sum(bare.values()),
            "per_step_added": sum(added.values()),
            "added_by_caller": dict(sorted(added.items(), key=lambda kv: -kv[1])),
            "bare_by_caller": dict(sorted(bare.items(), key=lambda kv: -kv[1])),
            "harness_by_caller": dict(sorted(harness.items(), key=lambda kv: -kv[1]))}


# -- main -----------------------------------------------------------------------------------------

def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--scale", default="tiny")
    p.add_argument("--world", help="world folder (default: the preset's data.world_dir)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (loader start, first allocations)")
    p.add_argument("--rounds", type=int, default=2, help="harness/bare pairs per arm")
    p.add_argument("--breakdown", nargs="*", default=["native"], choices=ARMS,
                   help="arms whose harness variants and host syncs are measured too")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch threads of the training process (default: torch's, "
                   "one per core); loader workers use one each whatever this says")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--cold-token-cache", action="store_true",
                   help="do not fill the token cache on disk first (by default each arm's training split is "
                        "read once before timing, as by a world's first run: the harness then starts from the "
                        "tokenized shards; the no_token_cache variant prices reading the tars)")
    args = p.parse_args(argv)

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"scale": args.scale, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_start": os.getloadavg(), "steps": args.steps, "warmup": args.warmup,
              "rounds": args.rounds, "token_cache": "cold" if args.cold_token_cache else "primed", "arms": {}}
    n = args.warmup + args.steps
    for arm in args.arms:
        spec = arm_spec(arm, args.scale)
        world = args.world or spec["data"]["world_dir"]
        batches = predraw(spec, world, n)
        if not args.cold_token_cache:
            primed = prime_token_cache(spec, world)
            print(f"{arm}: token cache primed ({primed:.1f} s for one pass over the training split)", file=sys.stderr)

        def measure(kind: str) -> dict:
            if kind == "bare":
                w = run_bare(spec, batches, args.warmup, args.steps, device)
            else:
                w = run_harness(spec, world, kind, batches, args.warmup, args.steps, device)
            main_cpu, worker_cpu = w.cpu_ms_per_kslot()
            out = {"slots_per_s": w.slots_per_s, "cpu_ms_per_kslot": main_cpu, "worker_cpu_ms_per_kslot": worker_cpu,
                   "step_seconds": w.step_seconds()}
            print(f"{arm} {kind}: {w.slots_per_s:.0f} slots/s, CPU ms per 1k slots {main_cpu:.1f} + workers "
                  f"{worker_cpu:.1f}, step seconds {out['step_seconds']}", file=sys.stderr, flush=True)
            return out

        # every harness run (train.py's, or a variant) is paired with a bare run next to it in time,
        # in alternating order: the machine's speed drifts over minutes, a pair sees the same drift
        pairs: dict[str, list[tuple[dict, dict]]] = {}
        kinds = ["harness"] * args.rounds + (list(args.variants) if arm in (args.breakdown or []) else [])
        for i, kind in enumerate(kinds):
            first, second = (kind, "bare") if i % 2 == 0 else ("bare", kind)
            a, b = measure(first), measure(second)
            pairs.setdefault(kind, []).append((a, b) if first == kind else (b, a))

        def summary(kind: str) -> dict:
            ps = pairs[kind]
            return {
                "slots_per_s": statistics.median(h["slots_per_s"] for h, _ in ps),
                "bare_slots_per_s": statistics.median(b["slots_per_s"] for _, b in ps),
                "ratio": statistics.median(h["slots_per_s"] / b["slots_per_s"] for h, b in ps),
                "ratio_per_pair": [h["slots_per_s"] / b["slots_per_s"] for h, b in ps],
                # CPU seconds per slot, bare over harness (training process + loader workers): what
                # the ratio would be on cores fully shared with other work, whatever their load
                "cpu_ratio": statistics.median(b["cpu_ms_per_kslot"] / (h["cpu_ms_per_kslot"] + h["worker_cpu_ms_per_kslot"])
                                               for h, b in ps),
                "cpu_ms_per_kslot": statistics.median(h["cpu_ms_per_kslot"] for h, _ in ps),
                "worker_cpu_ms_per_kslot": statistics.median(h["worker_cpu_ms_per_kslot"] for h, _ in ps),
                "bare_cpu_ms_per_kslot": statistics.median(b["cpu_ms_per_kslot"] for _, b in ps),
                "runs": ps,
            }

        main_row = summary("harness")
        row = {"arm": arm, "harness_slots_per_s": main_row["slots_per_s"], "bare_slots_per_s": main_row["bare_slots_per_s"],
               "ratio": main_row["ratio"], "ratio_per_pair": main_row["ratio_per_pair"], "cpu_ratio": main_row["cpu_ratio"],
               "harness_cpu_ms_per_kslot": main_row["cpu_ms_per_kslot"],
               "harness_worker_cpu_ms_per_kslot": main_row["worker_cpu_ms_per_kslot"],
               "bare_cpu_ms_per_kslot": main_row["bare_cpu_ms_per_kslot"], "runs": main_row["runs"]}
        if arm in (args.breakdown or []):
            row["variants"] = {v: summary(v) for v in args.variants}
            row["syncs"] = count_harness_syncs(spec, world, batches, args.warmup, min(args.steps, 10), device)
        result["arms"][arm] = row
    result["load_average_end"] = os.getloadavg()

    rows = list(result["arms"].values())
    print(f"\nslots/s, {args.steps} steps after {args.warmup} of warm-up; ratio = median over {args.rounds} "
          f"harness/bare pairs ({result['device']}, {result['torch_threads']} torch threads, load "
          f"{result['load_average_start'][0]:.1f} -> {result['load_average_end'][0]:.1f})\n")
    print(table([{**r, "per_pair": " ".join(f"{x:.3f}" for x in r["ratio_per_pair"])} for r in rows],
                ["arm", "harness_slots_per_s", "bare_slots_per_s", "ratio", "per_pair", "cpu_ratio",
                 "harness_cpu_ms_per_kslot", "harness_worker_cpu_ms_per_kslot", "bare_cpu_ms_per_kslot"]))
    for r in rows:
        if "variants" in r:
            print(f"\n{r['arm']}: harness variants (one change each), each ÷ a bare run next to it "
                  f"(train.py's harness: {r['ratio']:.3f}, CPU {r['cpu_ratio']:.3f})\n")
            print(table([{"variant": v, **x} for v, x in r["variants"].items()],
                        ["variant", "slots_per_s", "ratio", "cpu_ratio", "cpu_ms_per_kslot", "worker_cpu_ms_per_kslot",
                         "bare_cpu_ms_per_kslot"]))
            s = r["syncs"]
            print(f"\n{r['arm']}: reads to the host per step (a sync each on a GPU, except torch/optim's and the loader's): "
                  f"harness {s['per_step_harness']:.1f}, bare loop {s['per_step_bare']:.1f}; "
                  f"what the harness adds, by caller ({s['per_step_added']:.1f}):")
            for where, c in s["added_by_caller"].items():
                print(f"  {c:5.1f}  {where}")
            print("  the bare loop's:")
            for where, c in s["bare_by_caller"].items():
                print(f"  {c:5.1f}  {where}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
