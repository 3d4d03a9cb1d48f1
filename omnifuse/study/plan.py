"""The study's runs: which ``train.py fit`` runs, with which arguments, in which folders.

Layout of the output folder (``out_dir``)::

    seed<S>/stages/<stage>             a shared pretrained part (LM, CLIP, CLAP), once per seed
    seed<S>/<arm>                      an arm without parts: one run for every accounting
    seed<S>/<arm>@<accounting>         a bolt-on arm: its budget differs between accountings
    seed<S>/<arm>@<accounting>.<phase> each phase of an arm with several (LLaVA's stage1, stage2)
    flops_per_step.json, plan.json     measurements and allocations (see omnifuse.study.runner)
    timings.jsonl                      wall and CPU seconds of every train.py / eval.py process
    compare/, report.md, *.png         eval.py compare and the study report

Every run of seed ``S`` is started **in** ``seed<S>/`` with paths relative to it (``--model.lm_ckpt
stages/lm``, ``--model.init_from llava@fusion_stage.stage1``, ``--trainer.default_root_dir
llava@fusion_stage.stage2``), so that the saved configs of one arm's seeds differ only in seeds:
``eval.py compare`` then groups them as seeds of one arm (it ignores seed keys and output paths, not
the path of an LM). The world and the config files are absolute. A run's folder name is
its name in ``eval.py compare``'s tables, hence the flat ``<arm>@<accounting>.<phase>``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from omnifuse.study.budget import Allocation
from omnifuse.study.config import ArmSpec, StudyConfig

STAGES_DIR = "stages"
EVAL_DIR = "eval"  # RUN/eval: a final run's full evaluation
CURVE_DIR = "curve"  # RUN/curve/step-NNNNNN/: curve evaluations
POINT_FILE = "point.json"  # {"step", "train_flops"} of a curve evaluation's checkpoint
LOG_FILE = "train.log"  # RUN/train.log: what train.py printed, every launch appended
FLOPS_FILE = "flops_per_step.json"  # measured FLOPs per step of every phase, with the arguments
PLAN_FILE = "plan.json"  # per seed: the stages' FLOPs, every allocation, every run
TIMINGS_FILE = "timings.jsonl"  # one line per child process: what, wall and CPU seconds
LOCK_FILE = ".study.lock"


def read_json(path: Path) -> dict:
    """The JSON object in ``path``, or {} when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, obj) -> None:
    """Write ``obj`` to ``path`` atomically (a killed study never leaves half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def seed_dir(seed: int) -> str:
    return f"seed{seed}"


def arm_folder(arm: ArmSpec, accounting: str) -> str:
    """``<arm>`` for an arm without parts (its runs serve every accounting), else ``<arm>@<accounting>``."""
    return arm.name if not arm.parts else f"{arm.name}@{accounting}"


@dataclass
class Run:
    """One ``train.py fit`` run of the study.

    Attributes:
        rel: the run's folder relative to its seed folder (``stages/lm``, ``llava@all_in.stage2``).
        seed: its seed; it runs in ``out_dir/seed<seed>``.
        configs: YAML files composed after the scale preset (absolute).
        args: the run's own ``train.py`` arguments (study, arm and phase extras, parts, init_from).
        steps: optimizer steps (``--trainer.max_steps``).
        checkpoint_every: ``--checkpoint_every``.
        stage / arm / phase: what it is (a stage run has ``stage``; a phase run ``arm`` and ``phase``).
        accountings: the accountings whose tables this run is part of (phase runs).
        previous: ``rel`` of the arm's previous phase, whose FLOPs come before this run's.
        final: the arm's last phase (evaluated in full and compared).
        warmup_steps: ``--model.optim.warmup_steps`` (the study's ``warmup_fraction`` of ``steps``);
            ``None``: the configs' own.
    """

    rel: str
    seed: int
    configs: list[str]
    args: list[str]
    steps: int
    checkpoint_every: int
    stage: str | None = None
    arm: str | None = None
    phase: str | None = None
    accountings: tuple[str, ...] = ()
    previous: str | None = None
    final: bool = False
    warmup_steps: int | None = None

    @property
    def key(self) -> str:
        """``seed<S>/<rel>``: the run's folder relative to ``out_dir`` and its name in progress lines."""
        return f"{seed_dir(self.seed)}/{self.rel}"

    def cwd(self, out_dir: str | Path) -> Path:
        return Path(out_dir) / seed_dir(self.seed)

    def run_dir(self, out_dir: str | Path) -> Path:
        return Path(out_dir) / self.key

    def train_args(self, scale: str, world_dir: str) -> list[str]:
        """``train.py`` arguments (after ``fit``), as run in :meth:`cwd`."""
        configs = [a for c in [scale, *self.configs] for a in ("-c", c)]
        warmup = [] if self.warmup_steps is None else ["--model.optim.warmup_steps", str(self.warmup_steps)]
        return [*configs, "--data.world_dir", world_dir, *self.args, *warmup,
                "--trainer.max_steps", str(self.steps), "--checkpoint_every", str(self.checkpoint_every),
                "--trainer.default_root_dir", self.rel]


def checkpoint_every(steps: int, checkpoints: int) -> int:
    """Steps between checkpoints so that a run of ``steps`` writes about ``checkpoints`` of them."""
    return max(1, math.ceil(steps / checkpoints))


def seed_args(seed: int) -> list[str]:
    """The seed of a run: Lightning's global seed and the data order (not the world: one world for all)."""
    return ["--seed_everything", str(seed), "--data.seed", str(seed)]


def warmup_steps(cfg: StudyConfig, steps: int) -> int | None:
    """The warmup of a run of ``steps`` steps under the study's ``warmup_fraction`` (None: the configs')."""
    return None if cfg.warmup_fraction is None else max(1, round(cfg.warmup_fraction * steps))


def stage_args(cfg: StudyConfig, name: str, seed: int) -> list[str]:
    """The arguments of stage ``name`` that do not depend on its steps or folder."""
    return [*seed_args(seed), *cfg.train_args, *cfg.stages[name].args]


def stage_run(cfg: StudyConfig, seed: int, name: str, steps: int | None = None) -> Run:
    """The run of stage ``name`` for ``seed``: its own ``steps``, or ``steps`` (derived from the stage's
    ``budget_flops`` by the runner) when the stage sets a budget instead."""
    stage = cfg.stages[name]
    steps = stage.steps if stage.steps is not None else steps
    if steps is None:
        raise ValueError(f"stage {name} sets budget_flops: its steps come from its measured FLOPs per step")
    return Run(rel=f"{STAGES_DIR}/{name}", seed=seed, configs=list(stage.configs),
               args=stage_args(cfg, name, seed), steps=steps,
               checkpoint_every=checkpoint_every(steps, cfg.eval.checkpoints_per_phase), stage=name,
               warmup_steps=warmup_steps(cfg, steps))


def part_args(arm: ArmSpec, base: str | Path = STAGES_DIR) -> list[str]:
    """``--<key> <base>/<stage>`` for every part of ``arm`` (``base`` relative to the seed folder by default)."""
    return [a for key, stage in arm.parts.items() for a in (f"--{key}", str(Path(base) / stage))]


def phase_args(cfg: StudyConfig, arm: ArmSpec, index: int, seed: int, parts: str | Path = STAGES_DIR) -> list[str]:
    """The arguments of phase ``index`` of ``arm`` that do not depend on the budget or folders'
    names: seeds, study/arm/phase extras, parts (under ``parts``, by default relative to the seed folder)."""
    return [*seed_args(seed), *cfg.train_args, *arm.args, *arm.phases[index].args, *part_args(arm, parts)]


def arm_runs(cfg: StudyConfig, seed: int, arm: ArmSpec, allocation: Allocation,
             accountings: tuple[str, ...]) -> list[Run]:
    """The phase runs of ``arm`` for one seed under ``allocation`` (which must be feasible);
    ``accountings`` are the tables they serve."""
    if not allocation.feasible:
        raise ValueError(f"arm {arm.name}: {allocation.note}")
    folder = arm_folder(arm, allocation.accounting)
    runs: list[Run] = []
    for i, (phase, budget) in enumerate(zip(arm.phases, allocation.phases)):
        args = phase_args(cfg, arm, i, seed)
        previous = runs[-1].rel if runs else None
        if phase.init_from_previous is not None:
            args += [f"--{phase.init_from_previous}", previous]
        rel = folder if len(arm.phases) == 1 else f"{folder}.{phase.name}"
        runs.append(Run(rel=rel, seed=seed, configs=list(phase.configs), args=args,
                        steps=budget.steps,
                        checkpoint_every=checkpoint_every(budget.steps, cfg.eval.checkpoints_per_phase),
                        arm=arm.name, phase=phase.name, accountings=accountings, previous=previous,
                        final=i == len(arm.phases) - 1, warmup_steps=warmup_steps(cfg, budget.steps)))
    return runs


def planned_arm_runs(cfg: StudyConfig, seed: int, allocations: dict[str, dict[str, Allocation]]) -> list[Run]:
    """Every phase run of one seed: ``allocations[arm][accounting]`` for the arms of that seed and
    their accountings. An arm without parts gets one chain shared by its accountings (its
    allocations are equal by construction); a bolt-on arm one chain per accounting it is feasible under."""
    runs: list[Run] = []
    for arm in cfg.arms_in(seed):
        accs = cfg.accountings_of(arm)
        per_acc = allocations[arm.name]
        if not arm.parts:
            runs += arm_runs(cfg, seed, arm, per_acc[accs[0]], tuple(accs))
            continue
        for acc in accs:
            if per_acc[acc].feasible:
                runs += arm_runs(cfg, seed, arm, per_acc[acc], (acc,))
    return runs


def count_train_runs(cfg: StudyConfig) -> int:
    """Upper bound of the ``train.py`` runs of the study (all-in arms that turn out infeasible are
    counted, and reported as skipped): the progress lines' N."""
    return sum(len(cfg.needed_stages(seed)) + sum(
        len(arm.phases) * (len(cfg.accountings_of(arm)) if arm.parts else 1) for arm in cfg.arms_in(seed))
        for seed in cfg.seeds)
