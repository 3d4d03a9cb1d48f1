"""Run a study: stages, arms and seeds as ``train.py fit`` subprocesses, ``eval.py`` on each, the report.

Order, per seed: the stages the arms need (shared by every arm of that seed), then every arm's phase
chain under each accounting (:mod:`omnifuse.study.plan`), each final phase evaluated in full and every
phase at a few checkpoints (the accuracy-vs-FLOPs curve). The FLOPs per step of every phase are
measured once, after the first seed's stages exist (a bolt-on arm cannot be built without its parts),
and kept in ``flops_per_step.json`` (arms whose phases have the same arguments, as the points of a
scaling grid that differ only in budget, share one measurement); a stage that sets ``budget_flops``
instead of ``steps`` is measured the same way before anything trains. Allocations per seed go to
``plan.json``. Then (:meth:`Study.finish`) ``eval.py compare`` over the arms' final runs, and the
study report (:mod:`omnifuse.study.report`).

Resuming (a study started again after it stopped, also after SIGKILL):

- a run whose ``compute.json`` and ``checkpoints/last.ckpt`` are both at the planned step is finished
  and not touched; one short of it resumes (``--ckpt_path``) from its furthest checkpoint,
  ``last.ckpt`` or a ``step-NNNNNN.ckpt`` (a kill can land between the two); one without starts afresh. A run whose saved ``trainer.max_steps`` is not the planned one is an error
  (the budget, the measurement or the config changed): the study will not mix two schedules.
- an evaluation is finished when its folder exists: it is written to ``<folder>.partial`` and renamed.
- the ``train.py`` / ``eval.py`` children die with the study process (Linux ``PR_SET_PDEATHSIG``), so
  a killed study leaves no orphan writing into a run folder; a lock file keeps a second study
  process out of the same output folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from omnifuse.study.budget import Allocation, allocate, measure_flops_per_step, steps_for
from omnifuse.study.config import StudyConfig
from omnifuse.study.plan import (
    CURVE_DIR, EVAL_DIR, FLOPS_FILE, LOCK_FILE, LOG_FILE, PLAN_FILE, POINT_FILE, STAGES_DIR, TIMINGS_FILE, Run,
    count_train_runs, phase_args, planned_arm_runs, read_json, seed_dir, stage_args, stage_run, write_json,
)
from omnifuse.study.report import write_study_report

ROOT = Path(__file__).resolve().parents[2]  # the repository: train.py and eval.py
TRAIN_PY = ROOT / "train.py"
EVAL_PY = ROOT / "eval.py"


class StudyError(RuntimeError):
    """A study that cannot go on; the message names the run, its log and how to rerun it."""


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed when the study process dies
    except OSError:  # not Linux: a killed study may leave its child running
        pass


@contextlib.contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.study.lock`` (flock, released by the kernel when the holder dies)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another study process is running in {out} (it holds {out / LOCK_FILE})") from None
        f.write(str(os.getpid()))
        f.flush()
        yield


def checkpoint_counters(path: Path) -> tuple[int, float]:
    """``(global_step, train_flops)`` saved in a ``train.py`` checkpoint, read weights-only."""
    import torch

    from omnifuse.eval.loading import allowed_checkpoint_globals

    with torch.serialization.safe_globals(allowed_checkpoint_globals(path)):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return int(ckpt["global_step"]), float((ckpt.get("omnifuse_compute") or {}).get("flops_seen", 0.0))


def train_state(run_dir: Path, steps: int) -> str:
    """``"done"``, ``"resume"`` or ``"fresh"`` (module docstring); StudyError when the run folder
    was started with another step count."""
    config = run_dir / "config.yaml"
    if config.is_file():
        saved = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("max_steps")
        if saved != steps:
            raise StudyError(
                f"{run_dir} was started with trainer.max_steps={saved}, but the study now plans {steps} steps "
                "(the budget, a measured FLOPs per step or the config changed). Remove that run folder to "
                "retrain it, or use another out_dir")
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and read_json(run_dir / "compute.json").get("global_step") == steps \
            and checkpoint_counters(last)[0] == steps:
        return "done"
    return "resume" if resume_checkpoint(run_dir) else "fresh"


def resume_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """``(step, path)`` of the run's furthest checkpoint, ``last.ckpt`` on a tie; None when it has none.
    A kill can land between a ``step-NNNNNN.ckpt`` and the ``last.ckpt`` that follows it, so both count."""
    ckpts = run_dir / "checkpoints"
    found = [(int(p.stem.split("-")[1]), 0, p) for p in ckpts.glob("step-*.ckpt")]
    if (ckpts / "last.ckpt").is_file():
        found.append((checkpoint_counters(ckpts / "last.ckpt")[0], 1, ckpts / "last.ckpt"))
    if not found:
        return None
    step, _, path = max(found)
    return step, path


def curve_checkpoints(run_dir: Path, steps: int, points: int) -> list[tuple[int, Path]]:
    """``points`` of the run's checkpoints, evenly spaced, the last (``last.ckpt``, at ``steps``) included:
    ``[(step, path)]``. Candidates are the ``step-NNNNNN.ckpt`` files before ``steps`` and ``last.ckpt``."""
    if points <= 0:
        return []
    ckpts = run_dir / "checkpoints"
    candidates = sorted((int(p.stem.split("-")[1]), p) for p in ckpts.glob("step-*.ckpt")
                        if int(p.stem.split("-")[1]) < steps)
    candidates.append((steps, ckpts / "last.ckpt"))
    n = len(candidates)
    picked = sorted({round((j + 1) * n / points) - 1 for j in range(points)})
    return [candidates[i] for i in picked if 0 <= i < n]


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------- the study


class Study:
    """Runs one study config end to end (module docstring); :meth:`run` returns the report's path.

    Args:
        cfg: the study.
        python: interpreter of the ``train.py`` / ``eval.py`` children.
        echo: where progress lines go.
        measure: ``(train_args, batches) -> FLOPs per step`` (:func:`measure_flops_per_step`; a test
            may pass a stand-in).
    """

    def __init__(self, cfg: StudyConfig, python: str = sys.executable, echo: Callable[[str], None] = print,
                 measure: Callable[[list[str], int], float] = measure_flops_per_step):
        self.cfg, self.python, self.echo, self.measure = cfg, python, echo, measure
        self.out = Path(cfg.out_dir)
        self.t0 = time.perf_counter()
        self.done_runs = 0
        self.total_runs = count_train_runs(cfg)

    # -- the whole study -----------------------------------------------------------------------
    def run(self) -> Path:
        with study_lock(self.out):
            self.echo(f"study {self.cfg.name}: {len(self.cfg.arms)} arms x {len(self.cfg.seeds)} seeds, budget "
                      f"{self.cfg.budget_flops:.3g} FLOPs, accountings {', '.join(self.cfg.accountings)} -> {self.out}")
            write_json(self.out / "study.json", self.cfg.to_dict())
            plan = {"seeds": {}}
            finals: list[Run] = []
            stage_steps = self.stage_steps()
            for seed in self.cfg.seeds:
                stages = [stage_run(self.cfg, seed, name, stage_steps[name]) for name in self.cfg.needed_stages(seed)]
                for run in stages:
                    self.train(run)
                stage_flops = {r.stage: float(read_json(r.run_dir(self.out) / "compute.json")["train_flops"])
                               for r in stages}
                fps = self.flops_per_step(seed)
                allocations = self.allocations(seed, stage_flops, fps)
                runs = planned_arm_runs(self.cfg, seed, allocations)
                plan["seeds"][str(seed)] = {
                    "stage_flops": stage_flops,
                    "allocations": {a: {acc: dataclasses.asdict(al) for acc, al in per.items()}
                                    for a, per in allocations.items()},
                    "runs": [dataclasses.asdict(r) | {"key": r.key} for r in [*stages, *runs]],
                }
                write_json(self.out / PLAN_FILE, plan)
                self.announce(seed, allocations)
                for run in runs:
                    self.train(run)
                    if self.cfg.curve_for(self.cfg.arm(run.arm), seed):
                        self.curve(run)
                    if run.final:
                        self.evaluate(run)
                        finals.append(run)
            path = self.finish(finals)
            self.echo(f"study {self.cfg.name} finished in {fmt_seconds(self.elapsed)}: {path}")
            return path

    def finish(self, finals: list[Run]) -> Path:
        """After every run is trained and evaluated: ``eval.py compare`` over the final runs and the
        study report; returns the report's path (a scaling sweep writes its own report instead)."""
        self.compare(finals)
        return write_study_report(self.cfg, self.out)

    def allocations(self, seed: int, stage_flops: dict[str, float],
                    fps: dict[str, dict[str, float]]) -> dict[str, dict[str, Allocation]]:
        """``{arm: {accounting: Allocation}}`` for the arms of ``seed`` and their accountings."""
        return {arm.name: {acc: allocate(arm, acc, self.cfg.budget_of(arm), stage_flops, fps[arm.name])
                           for acc in self.cfg.accountings_of(arm)} for arm in self.cfg.arms_in(seed)}

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def announce(self, seed: int, allocations: dict[str, dict[str, Allocation]]) -> None:
        for arm, per in allocations.items():
            # an arm without parts: one chain for all its accountings, announced once
            shown = per if self.cfg.arm(arm).parts else {", ".join(per): next(iter(per.values()))}
            for acc, al in shown.items():
                if not al.feasible:
                    self.done_runs += len(self.cfg.arm(arm).phases)
                    self.echo(f"  seed{seed} {arm} [{acc}]: {al.note}")
                    continue
                steps = " + ".join(f"{p.name} {p.steps}" for p in al.phases)
                self.echo(f"  seed{seed} {arm} [{acc}]: {al.fusion_budget:.3g} FLOPs -> {steps} steps")

    def describe(self) -> str:
        """The plan as text: every run per seed, with steps where they can be known without training
        (the stages' FLOPs and every phase's FLOPs per step on disk)."""
        lines = [f"study {self.cfg.name} -> {self.out}: budget {self.cfg.budget_flops:.4g} FLOPs, "
                 f"accountings {', '.join(self.cfg.accountings)}, {self.total_runs} train.py runs at most"]
        cache = read_json(self.out / FLOPS_FILE)
        fps = {a.name: {p.name: cache.get(f"{a.name}/{p.name}", {}).get("flops_per_step") for p in a.phases}
               for a in self.cfg.arms}
        stage_steps = self.stage_steps(measure=False)
        for seed in self.cfg.seeds:
            unknown = [n for n in self.cfg.needed_stages(seed) if stage_steps[n] is None]
            if unknown:
                lines += [f"  {seed_dir(seed)}/{STAGES_DIR}/{n}: {self.cfg.stages[n].budget_flops:.4g} FLOPs (steps are "
                          "derived once its FLOPs per step are measured)" for n in unknown]
                lines.append(f"  seed{seed} arms: {', '.join(a.name for a in self.cfg.arms_in(seed))} (steps are derived "
                             "once the stages are trained and each phase's FLOPs per step measured)")
                continue
            stages = [stage_run(self.cfg, seed, name, stage_steps[name]) for name in self.cfg.needed_stages(seed)]
            lines += [f"  {r.key}: {r.steps} steps" for r in stages]
            computes = {r.stage: read_json(r.run_dir(self.out) / "compute.json") for r in stages}
            known = all(c.get("global_step") == r.steps for r, c in zip(stages, computes.values())) and all(
                v is not None for per in fps.values() for v in per.values())
            if not known:
                lines.append(f"  seed{seed} arms: {', '.join(a.name for a in self.cfg.arms_in(seed))} (steps are derived once "
                             "the stages are trained and each phase's FLOPs per step measured)")
                continue
            stage_flops = {name: float(c["train_flops"]) for name, c in computes.items()}
            allocations = self.allocations(seed, stage_flops, fps)
            for run in planned_arm_runs(self.cfg, seed, allocations):
                lines.append(f"  {run.key}: {run.steps} steps")
            lines += [f"  seed{seed} {a} [{acc}]: {al.note}" for a, per in allocations.items()
                      for acc, al in per.items() if not al.feasible]
        return "\n".join(lines)

    # -- measuring -----------------------------------------------------------------------------
    def flops_per_step(self, seed: int) -> dict[str, dict[str, float]]:
        """``{arm: {phase: FLOPs per step}}``, measured with this seed's parts unless already in
        ``flops_per_step.json`` for the same arguments (so that a restarted study plans the same steps)."""
        cache = read_json(self.out / FLOPS_FILE)
        out: dict[str, dict[str, float]] = {}
        for arm in self.cfg.arms:
            out[arm.name] = {}
            for i, phase in enumerate(arm.phases):
                configs = [a for c in [self.cfg.scale, *phase.configs] for a in ("-c", c)]
                common = [*configs, "--data.world_dir", self.cfg.world_dir]
                # measured with this seed's parts; cached under the arguments as a run sees them
                args = [*common, *phase_args(self.cfg, arm, i, self.cfg.seeds[0], self.out / seed_dir(seed) / STAGES_DIR)]
                if phase.init_from_previous is not None:  # built from the parts: same FLOPs, no earlier run needed
                    args += [f"--{phase.init_from_previous}", "null"]
                ident = [*common, *phase_args(self.cfg, arm, i, self.cfg.seeds[0])]
                out[arm.name][phase.name] = self._measured(cache, f"{arm.name}/{phase.name}", args, ident)
        return out

    def stage_args(self, name: str) -> list[str]:
        """``train.py`` arguments (without steps and folder) that a stage's FLOPs per step are measured with."""
        configs = [a for c in [self.cfg.scale, *self.cfg.stages[name].configs] for a in ("-c", c)]
        return [*configs, "--data.world_dir", self.cfg.world_dir, *stage_args(self.cfg, name, self.cfg.seeds[0])]

    def stage_steps(self, measure: bool = True) -> dict[str, int | None]:
        """``{stage: steps}``: a stage's own ``steps``, or its ``budget_flops`` over its FLOPs per step
        (measured once, kept in flops_per_step.json under ``stages/<name>``). With ``measure=False``
        nothing is measured and a budget stage not measured yet gets None."""
        cache = read_json(self.out / FLOPS_FILE)
        out: dict[str, int | None] = {}
        for name, stage in self.cfg.stages.items():
            if stage.steps is not None:
                out[name] = stage.steps
                continue
            args = self.stage_args(name)
            known = cache.get(f"{STAGES_DIR}/{name}", {})
            if not measure and known.get("args") != args:
                out[name] = None
                continue
            out[name] = steps_for(stage.budget_flops, self._measured(cache, f"{STAGES_DIR}/{name}", args, args))
        return out

    def _measured(self, cache: dict, key: str, args: list[str], ident: list[str]) -> float:
        """FLOPs per step of the run ``train.py fit *args``: from ``cache[key]`` when it was measured with
        the arguments ``ident``, else from any entry measured with the same ``ident`` (the grid points of
        one size and arm differ only in steps), else measured; ``cache`` is updated and saved."""
        if cache.get(key, {}).get("args") == ident:
            return float(cache[key]["flops_per_step"])
        same = next((v for v in cache.values() if v.get("args") == ident), None)
        if same is not None:
            value = float(same["flops_per_step"])
        else:
            t = time.perf_counter()
            value = self.measure(args, self.cfg.measure_batches)
            self.echo(f"  measured {key}: {value:.4g} FLOPs per step ({time.perf_counter() - t:.0f}s)")
        cache[key] = {"args": ident, "flops_per_step": value, "batches": self.cfg.measure_batches}
        write_json(self.out / FLOPS_FILE, cache)
        return value

    # -- training ------------------------------------------------------------------------------
    def train(self, run: Run) -> None:
        self.done_runs += 1
        head = f"[{self.done_runs}/{self.total_runs}] {run.key} ({run.steps} steps)"
        run_dir = run.run_dir(self.out)
        state = train_state(run_dir, run.steps)
        if state == "done":
            self.echo(f"{head}: finished earlier, kept")
            return
        args = ["fit", *run.train_args(self.cfg.scale, self.cfg.world_dir)]
        if state == "resume":
            step, ckpt = resume_checkpoint(run_dir)
            self.echo(f"{head}: resuming from step {step} ({ckpt.relative_to(self.out)})")
            args += ["--ckpt_path", f"{run.rel}/checkpoints/{ckpt.name}"]  # relative to the seed folder
        else:
            self.echo(f"{head}: training")
        t = time.perf_counter()
        cpu = self.child([self.python, str(TRAIN_PY), *args], run.cwd(self.out), run_dir / LOG_FILE, f"train {run.key}")
        if train_state(run_dir, run.steps) != "done":
            raise StudyError(f"{run.key}: train.py exited cleanly but the run is not at step {run.steps}; "
                             f"see {run_dir / LOG_FILE}")
        self.echo(f"{head}: trained in {fmt_seconds(time.perf_counter() - t)}, cpu {fmt_seconds(cpu)} "
                  f"(study {fmt_seconds(self.elapsed)})")

    def child(self, cmd: list[str], cwd: Path, log: Path, what: str) -> float:
        """Run ``cmd`` in ``cwd``, appending its output to ``log``; StudyError when it fails. Appends
        ``{what, wall_s, cpu_s}`` to ``out/timings.jsonl`` (CPU: the child's and its reaped
        descendants' user + system time, which says what a run costs on a machine shared with others)
        and returns the CPU seconds."""
        log.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        with open(log, "a") as f:
            f.write(f"\n$ cd {cwd} && {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                  preexec_fn=_die_with_parent)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        with open(self.out / TIMINGS_FILE, "a") as f:
            f.write(json.dumps({"what": what, "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu, 2),
                                "rc": proc.returncode}) + "\n")
        if proc.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-30:])
            raise StudyError(f"{what} failed (exit {proc.returncode}); log {log}, last lines:\n{tail}\n"
                             f"rerun by hand: cd {cwd} && {' '.join(cmd)}")
        return cpu

    # -- evaluation ----------------------------------------------------------------------------
    def _eval(self, run: Run, out: Path, extra: list[str], what: str) -> None:
        """``eval.py --ckpt RUN`` into ``out`` (via ``out.partial``, renamed when complete)."""
        if out.is_dir():
            return
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [self.python, str(EVAL_PY), "--ckpt", str(run.run_dir(self.out)), "--suite", "world",
               "--out", str(partial), "--quiet", *extra]
        t = time.perf_counter()
        cpu = self.child(cmd, run.cwd(self.out), run.run_dir(self.out) / "eval.log", f"{what} {run.key}")
        os.replace(partial, out)
        self.echo(f"    {run.key}: {what} in {fmt_seconds(time.perf_counter() - t)}, cpu {fmt_seconds(cpu)} "
                  f"(study {fmt_seconds(self.elapsed)})")

    def evaluate(self, run: Run) -> None:
        self._eval(run, run.run_dir(self.out) / EVAL_DIR, list(self.cfg.eval.args), "eval")

    def curve(self, run: Run) -> None:
        """Evaluate ``curve_points`` checkpoints of the run and record their cumulative FLOPs."""
        run_dir = run.run_dir(self.out)
        for step, ckpt in curve_checkpoints(run_dir, run.steps, self.cfg.eval.curve_points):
            out = run_dir / CURVE_DIR / f"step-{step:06d}"
            if out.is_dir():
                continue
            flops = (float(read_json(run_dir / "compute.json")["train_flops"]) if ckpt.name == "last.ckpt"
                     else checkpoint_counters(ckpt)[1])
            self._eval(run, out, ["--checkpoint", str(ckpt), *self.cfg.eval.curve_args], f"curve eval (step {step})")
            write_json(out / POINT_FILE, {"step": step, "train_flops": flops})

    def compare(self, finals: list[Run]) -> None:
        """``eval.py compare`` over the distinct final runs (a shared native run once)."""
        dirs = list(dict.fromkeys(str(r.run_dir(self.out)) for r in finals))
        out = self.out / "compare"
        cmd = [self.python, str(EVAL_PY), "compare", *dirs, "--out", str(out), "--metric", self.cfg.eval.metric,
               "--n-boot", str(self.cfg.eval.n_boot)]
        t = time.perf_counter()
        self.child(cmd, self.out, self.out / "compare.log", "eval.py compare")
        self.echo(f"compared {len(dirs)} runs in {fmt_seconds(time.perf_counter() - t)}: {out / 'compare.md'}")
