"""Compute budget -> optimizer steps, under the two accountings.

Each phase's FLOPs per optimizer step are **measured**, not guessed: :func:`measure_flops_per_step`
builds the phase's LightningModule and DataModule through ``OmniCLI(args, run=False)`` from the very
arguments ``train.py fit`` gets, and averages ``module.step_flops(batch)`` (the count compute.json
sums, frozen forwards included) over a few real training batches. Then, for an arm with phases
``p`` of budget fractions ``f_p`` (they sum to 1)::

    fusion_stage:  B_fusion = B                       (pretraining of the parts is free)
    all_in:        B_fusion = B - sum_{s in parts} F_s (each stage run counted once; F_s its train_flops)
    steps_p = max(1, round(f_p * B_fusion / flops_per_step_p))

An arm without parts has ``B_fusion = B`` under both. When ``B_fusion <= 0`` the arm is not trained
under that accounting and :attr:`Allocation.note` says why: the report prints it instead of a row.
"""

from __future__ import annotations

import itertools
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from omnifuse.study.config import ACCOUNTINGS, ALL_IN, FUSION_STAGE, ArmSpec


@dataclass(frozen=True)
class PhaseBudget:
    """One phase's share: ``flops`` to spend, the measured ``flops_per_step``, the derived ``steps``."""

    name: str
    flops: float
    flops_per_step: float
    steps: int


@dataclass(frozen=True)
class Allocation:
    """An arm's budget under one accounting for one seed.

    ``pretraining_flops`` is what the accounting charges to the arm before its fusion phases (0 under
    fusion_stage), ``fusion_budget = budget - pretraining_flops``; ``phases`` is empty and ``note``
    says why when nothing is left to train.
    """

    arm: str
    accounting: str
    budget: float
    pretraining_flops: float
    fusion_budget: float
    phases: tuple[PhaseBudget, ...]
    note: str | None = None

    @property
    def feasible(self) -> bool:
        return bool(self.phases)

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(p.steps for p in self.phases)


def steps_for(flops: float, flops_per_step: float) -> int:
    """Optimizer steps that spend ``flops`` at ``flops_per_step``: rounded, at least 1."""
    if not flops_per_step > 0:
        raise ValueError(f"flops_per_step must be > 0, got {flops_per_step!r}")
    if not flops > 0:
        raise ValueError(f"a phase budget must be > 0 FLOPs, got {flops!r}")
    return max(1, round(flops / flops_per_step))


def pretraining_flops(arm: ArmSpec, stage_flops: Mapping[str, float]) -> float:
    """FLOPs of the stage runs ``arm`` is built from, each stage counted once (two parts from one
    stage run cost it once); ``stage_flops`` maps stage name -> that seed's measured train_flops."""
    missing = sorted(set(arm.parts.values()) - set(stage_flops))
    if missing:
        raise KeyError(f"arm {arm.name}: no FLOPs for stage(s) {missing}")
    return float(sum(stage_flops[s] for s in set(arm.parts.values())))


def allocate(arm: ArmSpec, accounting: str, budget: float, stage_flops: Mapping[str, float],
             flops_per_step: Mapping[str, float]) -> Allocation:
    """``arm``'s phases' steps under ``accounting`` (module docstring); ``flops_per_step`` maps phase
    name -> measured FLOPs per optimizer step."""
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
    pre = pretraining_flops(arm, stage_flops) if accounting == ALL_IN else 0.0
    fusion = budget - pre
    if fusion <= 0:
        note = (f"not trained under {accounting}: its pretraining stages ({', '.join(sorted(set(arm.parts.values())))}) "
                f"took {pre:.4g} FLOPs, which is {'all' if fusion == 0 else 'more than'} the budget of {budget:.4g} "
                "FLOPs: nothing is left for the fusion stage")
        return Allocation(arm.name, accounting, budget, pre, fusion, (), note)
    phases = tuple(
        PhaseBudget(p.name, p.budget_fraction * fusion, flops_per_step[p.name],
                    steps_for(p.budget_fraction * fusion, flops_per_step[p.name]))
        for p in arm.phases
    )
    return Allocation(arm.name, accounting, budget, pre, fusion, phases)


def measure_flops_per_step(train_args: Sequence[str], batches: int = 4) -> float:
    """Mean ``step_flops`` of the first ``batches`` training batches of the run ``train.py fit
    *train_args`` would make (``train_args`` without the ``fit`` subcommand).

    The module and datamodule are built by ``OmniCLI(run=False)`` exactly as ``train.py`` builds them
    (config composition, links, the arm's own init: a bolt-on arm reads its parts' configs, so the
    parts must exist); the loader runs in-process (``--data.num_workers 0``), nothing is trained or
    written. Raises ``ValueError`` with the arguments when the CLI refuses them.
    """
    from omnifuse.training.cli import OmniCLI

    with tempfile.TemporaryDirectory(prefix="omnifuse-measure-") as tmp:
        args = [*train_args, "--data.num_workers", "0", "--trainer.logger", "false",
                "--trainer.default_root_dir", tmp, "--trainer.enable_progress_bar", "false"]
        try:
            with warnings.catch_warnings():  # "args and sys.argv both given": the study's own argv is not train.py's
                warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
                cli = OmniCLI(args=args, run=False)
        except SystemExit as e:  # jsonargparse reports a bad argument by exiting
            raise ValueError(f"train.py refused the arguments {' '.join(args)} (exit {e.code}); see the message above") from None
        module, dm = cli.model, cli.datamodule
        dm.prepare_data()
        dm.setup("fit")
        flops = [float(module.step_flops(batch)) for batch in itertools.islice(dm.train_dataloader(), batches)]
    if not flops:
        raise ValueError(f"no training batch to measure for {' '.join(train_args)}")
    return sum(flops) / len(flops)


__all__ = ["Allocation", "PhaseBudget", "allocate", "measure_flops_per_step", "pretraining_flops", "steps_for",
           "FUSION_STAGE", "ALL_IN"]
