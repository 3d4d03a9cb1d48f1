"""Run a scaling sweep with the study runner: the grid's points are the study's arms.

:class:`ScalingStudy` is :class:`omnifuse.study.runner.Study` (stages, budget -> steps from measured
FLOPs per step, ``train.py`` subprocesses, resume after SIGKILL, locks, timings) with two changes:

- each point's final run is evaluated twice: ``eval.py`` with the sweep's ``eval.args`` (the QA
  accuracy) and :mod:`omnifuse.eval.heldout` with ``heldout_args`` into ``RUN/heldout.json`` (the
  held-out loss the laws are fitted to), both written atomically, so a resumed sweep redoes neither;
- instead of ``eval.py compare`` and the study report, :meth:`finish` writes the scaling report
  (:mod:`omnifuse.scaling.report`).

:meth:`describe` (``python -m omnifuse.study plan``) prints the grid with each point's steps:
derived from measured FLOPs per step where ``flops_per_step.json`` has them, else estimated.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omnifuse.eval.heldout import HELDOUT_FILE
from omnifuse.scaling.config import (
    ScalingConfig, estimate_cost, estimated_flops_per_step, slots_per_step, to_study, vocab_size,
)
from omnifuse.study.budget import measure_flops_per_step
from omnifuse.study.config import ALL_IN
from omnifuse.study.plan import FLOPS_FILE, Run, read_json
from omnifuse.study.runner import Study, fmt_seconds


class ScalingStudy(Study):
    """Runs one scaling sweep end to end; :meth:`run` returns the report's path.

    Args:
        scaling: the sweep; the study it becomes is :func:`omnifuse.scaling.config.to_study`'s.
        python, echo, measure: as :class:`~omnifuse.study.runner.Study`'s.
    """

    def __init__(self, scaling: ScalingConfig, python: str = sys.executable, echo: Callable[[str], None] = print,
                 measure: Callable[[list[str], int], float] = measure_flops_per_step):
        super().__init__(to_study(scaling), python=python, echo=echo, measure=measure)
        self.scaling = scaling

    def evaluate(self, run: Run) -> None:
        super().evaluate(run)
        run_dir = run.run_dir(self.out)
        out = run_dir / HELDOUT_FILE
        if out.is_file():
            return
        partial = out.with_name(out.name + ".partial")
        cmd = [self.python, "-m", "omnifuse.eval.heldout", "--ckpt", str(run_dir), "--out", str(partial),
               *self.scaling.heldout_args]
        t = time.perf_counter()
        self.child(cmd, run.cwd(self.out), run_dir / "eval.log", f"heldout {run.key}")
        os.replace(partial, out)
        self.echo(f"    {run.key}: held-out loss in {fmt_seconds(time.perf_counter() - t)}")

    def finish(self, finals: list[Run]) -> Path:
        from omnifuse.scaling.report import write_scaling_report

        return write_scaling_report(self.scaling, self.out)

    def describe(self) -> str:
        """The grid as text: sizes, budgets, each point's steps (measured or ~estimated), the parts, and
        the estimated cost."""
        s = self.scaling
        sizes, budgets = s.model_sizes(), s.budgets()
        cache = read_json(self.out / FLOPS_FILE)
        lines = [f"scaling sweep {self.cfg.name} -> {self.out}",
                 f"  {len(s.arms)} arms ({', '.join(a.name for a in s.arms)}) x {len(budgets)} budgets x "
                 f"{s.grid.sizes_per_budget} sizes = {len(s.points())} points; seeds {s.seeds}; accountings "
                 f"{', '.join(s.accountings)}; compute range {budgets[-1] / budgets[0]:.1f}x "
                 f"({budgets[0]:.3g} to {budgets[-1]:.3g} FLOPs); {self.total_runs} train.py runs at most",
                 f"  sizes (heads x {s.sizes.head_dim}, {s.sizes.dim_per_layer} dims per layer, ffn {s.sizes.ffn_mult:g} x dim; "
                 f"{slots_per_step(s)} slots per step):"]
        vocab = vocab_size(s)
        for size in sizes:
            lines.append(f"    {size.name:>9}: dim {size.dim}, {size.n_layers} layers, {size.n_heads} heads "
                         f"({size.n_kv_heads} kv), ffn {size.ffn_hidden}; decoder {size.params(vocab) / 1e6:.3g}M "
                         f"params; ~{estimated_flops_per_step(s, size):.3g} FLOPs/step (6 N slots)")
        lines.append("  points (steps per phase; '~' estimated from 6 N slots, the run measures each arm's FLOPs per "
                     "step; under all_in the parts' nominal FLOPs are taken off):")
        for j, c in enumerate(budgets):
            cells = []
            for p in [p for p in s.points() if p.budget_index == j]:
                arm = s.arm(p.arm)
                acc = s.accountings[-1] if arm.parts else s.accountings[0]
                pre = sum(s.part_budget(st, p) for st in set(arm.parts.values())) if acc == ALL_IN else 0.0
                steps = []
                for ph in arm.phases:
                    fps = cache.get(f"{p.name}/{ph.name}", {}).get("flops_per_step")
                    est = fps is None
                    fps = fps or estimated_flops_per_step(s, p.size)
                    steps.append(f"{'~' if est else ''}{max(1, round(float(ph.budget_fraction) * (c - pre) / fps))}")
                cells.append(f"{p.arm} {p.size.name} {'+'.join(steps)}")
            lines.append(f"    C={c:.3g}: " + "; ".join(cells))
        parts = {s.part_name(st, p): s.part_budget(st, p) for p in s.points() for st in s.arm(p.arm).parts.values()}
        if parts:
            how = ("once per size and budget: share x the budget" if s.parts_per == "point"
                   else "once per size: share x the size's smallest budget")
            lines.append(f"  parts (trained {how}; per seed): " + ", ".join(
                f"{name} {flops:.3g}" for name, flops in parts.items()))
        if s.cost is not None:
            est = estimate_cost(s)
            lines.append(f"  estimated time (an estimate, from the config's `cost`: {s.cost.flops_per_s:.3g} FLOP/s, "
                         f"{s.cost.step_overhead_s:g} s per step, {s.cost.launch_s:g} s per launch, {s.cost.eval_s:g} s "
                         f"per point evaluation): {fmt_seconds(est.total_s)} = "
                         + " + ".join(f"{k} {fmt_seconds(v)}" for k, v in est.seconds.items())
                         + f" ({est.train_flops:.3g} training FLOPs, ~{est.steps} steps, {est.launches} launches)")
        return "\n".join(lines)


__all__ = ["ScalingStudy"]
