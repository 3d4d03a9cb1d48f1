"""The scaling config: model sizes from a width/depth rule, an IsoFLOP grid of budgets, the arms.

    kind: scaling                          # python -m omnifuse.study reads this file as a scaling sweep
    name: scaling
    default_profile: cpu
    scale: configs/scale/tiny.yaml         # data, optimiser, trainer; the rule's sizes replace its model sizes
    world_dir: worlds/tiny
    seeds: [0]
    accountings: [all_in]
    sizes: {count: 5, head_dim: 16, heads_start: 2, heads_growth: 1.4142, dim_per_layer: 32}
    grid: {budget_min: 1.5e11, budget_max: 5.0e12, budgets: 4, sizes_per_budget: 3}
    stages:                                # the bolt-on arms' parts, trained once per size
      lm: {configs: [configs/stage/lm.yaml], share: 0.2}
    arms:                                  # a study's arms without sizes or budgets
      - {name: native, phases: [{configs: [configs/fusion/native.yaml]}]}
    profiles:                              # merged over the keys above: mappings key by key, the rest replaced
      cpu: {out_dir: runs/scaling-cpu}
      gpu: {out_dir: runs/scaling-gpu, scale: configs/scale/base.yaml}

**Sizes** (:class:`SizeRule`): size ``k`` has ``heads_k = round(heads_start * heads_growth**k)`` heads
of ``head_dim``, so ``dim = heads_k * head_dim``; ``n_layers = max(min_layers, round(dim /
dim_per_layer))`` (a fixed aspect ratio); ``n_kv_heads`` the largest divisor of ``n_heads`` that is at
most ``n_heads / kv_group``; ``ffn_hidden = ffn_mult * dim`` rounded to a multiple of 8. The media
encoder of the CLIP/CLAP parts gets the same width, depth, heads and FFN (``--encoder.*``): a bolt-on
arm's parts are "at the same size" as its decoder.

**Grid** (:class:`GridSpec`): ``budgets`` compute budgets ``C_j`` log-spaced from ``budget_min`` to
``budget_max``; budget ``j`` is spent by ``sizes_per_budget`` consecutive sizes, a window that slides
from the smallest sizes (at ``budget_min``) to the largest (at ``budget_max``), so every IsoFLOP
profile brackets larger models as compute grows. A point ``(arm, size, C)`` is an arm of the study
(:func:`to_study`) named ``<arm>-<size>-C<budget>`` with the size's ``train.py`` arguments and its own
``budget_flops``; its steps are ``C`` over that arm's FLOPs per step, **measured** by the study runner
(:mod:`omnifuse.study.budget`) on real batches, phase by phase as in the study.

**Parts** (``parts_per``): with ``point`` (the shipped sweep) every (size, budget) has its own
LM/CLIP/CLAP stages, shared by the bolt-on arms of that point: stage ``s`` spends ``share_s * C``
FLOPs, so a bolt-on point's pretrained parts grow with its budget as its fusion stage does. With
``size`` each size's stages are trained once (per seed) and shared by every budget: stage ``s`` of size
``k`` spends ``share_s * C_min(k)``, ``C_min(k)`` the smallest budget size ``k`` is trained at -- cheaper,
but the parts of the larger budgets are as weak as at the smallest one, which holds back an arm whose
LM stays frozen (Flamingo: the first CPU sweep, docs/RESULTS.md). Under ``all_in`` the parts' measured
FLOPs are charged to the points they serve (the fusion stage gets ``C`` minus them); under
``fusion_stage`` they are free.

Relative paths are relative to the directory the sweep runs in, as in a study.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omnifuse.study.config import (
    ACCOUNTINGS, ALL_IN, EvalSpec, PhaseSpec, StudyConfig, StudyConfigError, _build, _check_args, _check_name,
    study_from_dict,
)

KIND = "scaling"
PARTS_PER = ("point", "size")


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class ModelSize:
    """One model size of the sweep: the decoder (and the parts' media encoder) widths and depth."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int

    @property
    def name(self) -> str:
        """``d<dim>x<n_layers>``: the size's part of folder and arm names."""
        return f"d{self.dim}x{self.n_layers}"

    def train_args(self) -> list[str]:
        """``train.py`` arguments that give a run this size: the decoder block of the model config, and the
        preset's ``encoder:`` block (used by the CLIP/CLAP stages; the other runs ignore it)."""
        dec = "--model.model.decoder."
        return [f"{dec}dim", str(self.dim), f"{dec}n_layers", str(self.n_layers), f"{dec}n_heads", str(self.n_heads),
                f"{dec}n_kv_heads", str(self.n_kv_heads), f"{dec}ffn_hidden", str(self.ffn_hidden),
                "--encoder.dim", str(self.dim), "--encoder.n_layers", str(self.n_layers),
                "--encoder.n_heads", str(self.n_heads), "--encoder.ffn_hidden", str(self.ffn_hidden)]

    def matmul_params(self, vocab_size: int, qk_norm: bool = True) -> int:
        """The decoder's :meth:`~omnifuse.model.decoder.Decoder.matmul_params` at this size, without
        building it: per block the q/k/v/o projections, the SwiGLU (3 matrices), two RMSNorms (and the
        q/k norms); the final norm; the output head (``V x D``, counted even when tied)."""
        d, hd = self.dim, self.dim // self.n_heads
        attn = 2 * d * d + 2 * d * self.n_kv_heads * hd + (2 * hd if qk_norm else 0)
        block = attn + 3 * d * self.ffn_hidden + 2 * d
        return self.n_layers * block + d + vocab_size * d

    def params(self, vocab_size: int, qk_norm: bool = True, tied: bool = True) -> int:
        """The decoder's parameters: :meth:`matmul_params` plus the embedding when untied."""
        return self.matmul_params(vocab_size, qk_norm) + (0 if tied else vocab_size * self.dim)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass
class SizeRule:
    """Model sizes from a width/depth rule (module docstring).

    Args:
        count: number of sizes (at least 5 for a sweep that says anything about exponents).
        head_dim: width of an attention head; every size's ``dim`` is a multiple of it.
        heads_start: heads of the smallest size.
        heads_growth: ratio of heads between consecutive sizes before rounding (sqrt 2: the width grows
            by ~1.41 and the depth with it, so parameters by ~2.8x per size).
        dim_per_layer: the aspect ratio ``dim / n_layers`` (the tiny preset: 128 / 4 = 32).
        min_layers: fewest blocks.
        kv_group: query heads per key/value head (GQA) aimed at.
        ffn_mult: SwiGLU hidden width over ``dim`` (the tiny preset: 384 / 128 = 3).
    """

    count: int
    head_dim: int = 16
    heads_start: int = 2
    heads_growth: float = math.sqrt(2.0)
    dim_per_layer: int = 32
    min_layers: int = 1
    kv_group: int = 2
    ffn_mult: float = 3.0

    def check(self, where: str) -> None:
        for key in ("count", "head_dim", "heads_start", "dim_per_layer", "min_layers", "kv_group"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StudyConfigError(f"{where}.{key} must be a positive int, got {value!r}")
        if self.head_dim % 2:
            raise StudyConfigError(f"{where}.head_dim must be even (rotary pairs), got {self.head_dim}")
        if not float(self.heads_growth) > 1:
            raise StudyConfigError(f"{where}.heads_growth must be > 1, got {self.heads_growth!r}")
        if not float(self.ffn_mult) > 0:
            raise StudyConfigError(f"{where}.ffn_mult must be > 0, got {self.ffn_mult!r}")
        dims = [s.dim for s in self.sizes_unchecked()]
        repeated = sorted({d for d in dims if dims.count(d) > 1})
        if repeated:
            raise StudyConfigError(f"{where}: the rule gives the same width {repeated} to two sizes (widths {dims}); "
                                   "raise heads_growth or heads_start")

    def sizes_unchecked(self) -> list[ModelSize]:
        out = []
        for k in range(self.count):
            heads = max(1, _round_half_up(self.heads_start * float(self.heads_growth) ** k))
            dim = heads * self.head_dim
            layers = max(self.min_layers, _round_half_up(dim / self.dim_per_layer))
            kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // self.kv_group))
            ffn = max(8, 8 * _round_half_up(float(self.ffn_mult) * dim / 8))
            out.append(ModelSize(dim, layers, heads, kv, ffn))
        return out

    def sizes(self) -> list[ModelSize]:
        """The sizes, smallest first (checked: widths differ)."""
        self.check("sizes")
        return self.sizes_unchecked()


# --------------------------------------------------------------------------- the grid


def budget_label(flops: float) -> str:
    """``1.5e11`` for 1.5e11 FLOPs: two significant digits, no ``+`` (a folder-name part)."""
    mantissa, exponent = f"{flops:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


@dataclass
class GridSpec:
    """The IsoFLOP grid (module docstring).

    Args:
        budget_min, budget_max: the smallest and largest compute budget (training FLOPs of one point).
        budgets: how many budgets, log-spaced between them.
        sizes_per_budget: consecutive sizes that spend each budget (at least 3: an IsoFLOP profile
            needs three points to locate its minimum).
    """

    budget_min: float
    budget_max: float
    budgets: int
    sizes_per_budget: int = 3

    def check(self, where: str, n_sizes: int) -> None:
        if not float(self.budget_min) > 0 or not float(self.budget_max) >= float(self.budget_min):
            raise StudyConfigError(f"{where}: need 0 < budget_min <= budget_max, got {self.budget_min!r}, "
                                   f"{self.budget_max!r}")
        if not isinstance(self.budgets, int) or self.budgets < 1 or (self.budgets > 1) != (
                float(self.budget_max) > float(self.budget_min)):
            raise StudyConfigError(f"{where}.budgets: one budget when budget_min == budget_max, else at least 2; "
                                   f"got {self.budgets!r}")
        if not isinstance(self.sizes_per_budget, int) or not 3 <= self.sizes_per_budget <= n_sizes:
            raise StudyConfigError(f"{where}.sizes_per_budget must be in [3, sizes.count={n_sizes}], "
                                   f"got {self.sizes_per_budget!r}")
        labels = [budget_label(c) for c in self.values()]
        if len(set(labels)) != len(labels):
            raise StudyConfigError(f"{where}: budgets {labels} are not distinct at two significant digits")

    def values(self) -> list[float]:
        """The budgets, smallest first."""
        lo, hi, n = float(self.budget_min), float(self.budget_max), self.budgets
        if n == 1:
            return [lo]
        return [lo * (hi / lo) ** (j / (n - 1)) for j in range(n)]

    def window(self, j: int, n_sizes: int) -> range:
        """Indices of the sizes that spend budget ``j``."""
        m, n = self.sizes_per_budget, self.budgets
        start = 0 if n == 1 else _round_half_up(j * (n_sizes - m) / (n - 1))
        return range(start, start + m)


@dataclass(frozen=True)
class Point:
    """One point of the grid: ``arm`` at ``size`` spending ``budget`` FLOPs; ``name`` is its study arm."""

    arm: str
    size_index: int
    size: ModelSize
    budget_index: int
    budget: float

    @property
    def name(self) -> str:
        return f"{self.arm}-{self.size.name}-C{budget_label(self.budget)}"


# --------------------------------------------------------------------------- the config


@dataclass
class PartSpec:
    """A pretrained part of the bolt-on arms (LM, CLIP, CLAP), trained once per size and seed.

    Args:
        configs: YAML files composed after the scale preset (``configs/stage/lm.yaml``).
        share: FLOPs of this stage as a share of the smallest budget its size is trained at.
        args: extra ``train.py`` arguments.
    """

    configs: list[str]
    share: float
    args: list[str] = field(default_factory=list)

    def check(self, where: str) -> None:
        if not self.configs:
            raise StudyConfigError(f"{where}.configs: name at least one YAML file")
        if not 0 < float(self.share) < 1:
            raise StudyConfigError(f"{where}.share must be in (0, 1), got {self.share!r}")
        _check_args(self.args, f"{where}.args")


@dataclass
class ScalingArm:
    """An arm of the sweep: a study arm (:class:`omnifuse.study.config.ArmSpec`) without size or budget,
    which the grid gives it. ``parts`` name :class:`PartSpec` stages; the size's own copies are used."""

    name: str
    phases: list[PhaseSpec]
    parts: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)


@dataclass
class CostModel:
    """What :func:`estimate_cost` assumes of the machine: ``flops_per_s`` sustained inside training
    steps, ``step_overhead_s`` per optimizer step on top (data, optimizer, Python: what makes a tiny
    model's step cost more than its FLOPs), ``launch_s`` per ``train.py`` process (imports, workers,
    checkpoints), ``eval_s`` per point (``eval.py`` and the held-out loss), ``measure_s`` per FLOPs
    measurement, ``setup_s`` once (generating the world when it is missing)."""

    flops_per_s: float
    step_overhead_s: float = 0.0
    launch_s: float = 8.0
    eval_s: float = 20.0
    measure_s: float = 8.0
    setup_s: float = 0.0


@dataclass
class FitSpec:
    """How the laws are fitted: ``n_boot`` bootstrap resamples of the points, intervals at ``level``."""

    n_boot: int = 1000
    level: float = 0.95

    def check(self, where: str) -> None:
        if not isinstance(self.n_boot, int) or self.n_boot < 1:
            raise StudyConfigError(f"{where}.n_boot must be a positive int, got {self.n_boot!r}")
        if not 0 < float(self.level) < 1:
            raise StudyConfigError(f"{where}.level must be in (0, 1), got {self.level!r}")


@dataclass
class ScalingConfig:
    """A scaling sweep; see the module docstring for the YAML.

    Args:
        name: the sweep's name (report title; the profile is appended).
        out_dir: output folder (the study's layout, :mod:`omnifuse.study.plan`, plus ``scaling.md``,
            ``points.jsonl`` and the plots).
        scale: the scale preset composed first into every run (data, optimiser, trainer settings).
        world_dir: the world every run trains and is evaluated on.
        seeds: seeds of every point.
        sizes: the width/depth rule.
        grid: the budgets and which sizes spend each.
        arms: the arms; ``baseline`` must be one of them.
        stages: the parts the arms' ``parts`` name (trained once per size and seed).
        accountings: as in a study; ``all_in`` charges the parts to the bolt-on points (equal total
            compute), ``fusion_stage`` does not. Each gets its own points and fits.
        baseline: the arm the verdict compares the others with (the early-fusion arm).
        train_args: extra ``train.py`` arguments of every run.
        eval: the final evaluation of every point (``eval.args``: ``eval.py`` arguments for the QA
            accuracy); curves are not drawn in a sweep.
        heldout_args: ``python -m omnifuse.eval.heldout`` arguments of every point (``--split``,
            ``--limit``, ``--device``): the held-out loss the laws are fitted to.
        measure_batches: batches each FLOPs-per-step measurement averages.
        warmup_fraction: every run warms up over this share of its steps.
        fit: bootstrap settings of the fits.
        cost: the machine :func:`estimate_cost` assumes (``plan`` prints the estimate); ``None``: none.
        profile: the profile this config was built with (set by :func:`load_scaling`).
        parts_per: ``point`` (each size and budget trains its own parts, ``share`` x its budget) or
            ``size`` (each size's parts once, ``share`` x its smallest budget); module docstring.
    """

    name: str
    out_dir: str
    scale: str
    world_dir: str
    seeds: list[int]
    sizes: SizeRule
    grid: GridSpec
    arms: list[ScalingArm]
    stages: dict[str, PartSpec] = field(default_factory=dict)
    accountings: list[str] = field(default_factory=lambda: [ALL_IN])
    baseline: str = "native"
    train_args: list[str] = field(default_factory=list)
    eval: EvalSpec = field(default_factory=lambda: EvalSpec(args=["--limit", "60", "--no-pope", "--no-cogent"],
                                                            curve_points=0))
    heldout_args: list[str] = field(default_factory=lambda: ["--split", "test", "--limit", "2000"])
    measure_batches: int = 4
    warmup_fraction: float | None = 0.1
    fit: FitSpec = field(default_factory=FitSpec)
    cost: CostModel | None = None
    profile: str | None = None
    parts_per: str = "size"

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        self.sizes.check("sizes")
        self.grid.check("grid", self.sizes.count)
        self.fit.check("fit")
        _check_args(self.train_args, "train_args")
        _check_args(self.heldout_args, "heldout_args")
        self.eval.check("eval")
        if not self.arms:
            raise StudyConfigError("arms: name at least one arm")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise StudyConfigError(f"arms: names must differ, got {names}")
        if self.baseline not in names:
            raise StudyConfigError(f"baseline: no arm {self.baseline!r} (arms: {', '.join(names)})")
        for name, part in self.stages.items():
            _check_name(name, "stages")
            part.check(f"stages.{name}")
        for i, arm in enumerate(self.arms):
            _check_name(arm.name, f"arms[{i}].name")
            for key, stage in arm.parts.items():
                if stage not in self.stages:
                    raise StudyConfigError(f"arms[{i}] ({arm.name}).parts.{key}: no stage {stage!r} "
                                           f"(stages: {', '.join(self.stages) or 'none'})")
            used = set(arm.parts.values())
            total = sum(float(self.stages[s].share) for s in used)
            if ALL_IN in self.accountings and total >= 1:
                raise StudyConfigError(f"arms[{i}] ({arm.name}): its parts' shares sum to {total:g}; under all_in "
                                       "nothing would be left for its fusion stage at its smallest budget")
        if self.parts_per not in PARTS_PER:
            raise StudyConfigError(f"parts_per must be one of {', '.join(PARTS_PER)}, got {self.parts_per!r}")
        if not self.accountings or not set(self.accountings) <= set(ACCOUNTINGS):
            raise StudyConfigError(f"accountings: a non-empty list of {ACCOUNTINGS}, got {self.accountings!r}")

    # -- the grid --------------------------------------------------------------------------------
    def model_sizes(self) -> list[ModelSize]:
        return self.sizes.sizes()

    def budgets(self) -> list[float]:
        return self.grid.values()

    def points(self) -> list[Point]:
        """Every point, arm by arm, budget by budget, smallest size first."""
        sizes, out = self.model_sizes(), []
        for arm in self.arms:
            for j, c in enumerate(self.budgets()):
                for k in self.grid.window(j, len(sizes)):
                    out.append(Point(arm.name, k, sizes[k], j, c))
        return out

    def smallest_budget(self, size_index: int) -> float:
        """``C_min(k)``: the smallest budget size ``k`` is trained at (its parts' FLOPs are shares of it)."""
        n = len(self.model_sizes())
        return min(c for j, c in enumerate(self.budgets()) if size_index in self.grid.window(j, n))

    def part_name(self, stage: str, p: Point) -> str:
        """``lm-d64x2`` (``parts_per: size``) or ``lm-d64x2-C8.7e11`` (``point``)."""
        return f"{stage}-{p.size.name}" + (f"-C{budget_label(p.budget)}" if self.parts_per == "point" else "")

    def part_budget(self, stage: str, p: Point) -> float:
        """FLOPs of ``stage``'s part serving point ``p``: ``share`` x its budget, or x its size's smallest."""
        base = p.budget if self.parts_per == "point" else self.smallest_budget(p.size_index)
        return float(self.stages[stage].share) * base

    def compute_range(self) -> float:
        """Largest over smallest budget."""
        b = self.budgets()
        return b[-1] / b[0]

    def arm(self, name: str) -> ScalingArm:
        return next(a for a in self.arms if a.name == name)


# --------------------------------------------------------------------------- the study it becomes


def to_study(cfg: ScalingConfig, base: str | Path = ".") -> StudyConfig:
    """The study that trains the sweep: one arm per point (size args, its own budget, no curve), one
    stage per part and size used, everything else as the sweep says; paths made absolute against
    ``base`` and checked as a study's are."""
    sizes = cfg.model_sizes()
    points = cfg.points()
    stages: dict[str, dict] = {}
    for p in points:
        for stage in cfg.arm(p.arm).parts.values():
            name = cfg.part_name(stage, p)
            if name not in stages:
                part = cfg.stages[stage]
                stages[name] = {"configs": list(part.configs), "budget_flops": cfg.part_budget(stage, p),
                                "args": [*sizes[p.size_index].train_args(), *part.args]}
    arms = []
    for p in points:
        arm = cfg.arm(p.arm)
        arms.append({
            "name": p.name,
            "phases": [dataclasses.asdict(ph) for ph in arm.phases],
            "parts": {key: cfg.part_name(stage, p) for key, stage in arm.parts.items()},
            "args": [*p.size.train_args(), *arm.args],
            "budget_flops": p.budget,
            "curve": False,
        })
    baseline = next(p.name for p in points if p.arm == cfg.baseline)
    data = {
        "name": f"{cfg.name}-{cfg.profile}" if cfg.profile else cfg.name,
        "out_dir": cfg.out_dir, "scale": cfg.scale, "world_dir": cfg.world_dir, "seeds": list(cfg.seeds),
        "budget_flops": max(cfg.budgets()), "accountings": list(cfg.accountings), "baseline": baseline,
        "train_args": list(cfg.train_args), "stages": stages, "arms": arms,
        "eval": dataclasses.asdict(cfg.eval), "measure_batches": cfg.measure_batches,
        "warmup_fraction": cfg.warmup_fraction,
    }
    return study_from_dict(data, base)


# --------------------------------------------------------------------------- reading the YAML


def merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base``: mappings key by key (recursively), anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def resolve_profile(data: dict, profile: str | None, where: str) -> tuple[dict, str | None]:
    """The YAML's keys with ``profiles[profile]`` (default: ``default_profile``) merged over them;
    ``kind``, ``profiles`` and ``default_profile`` removed. Returns ``(data, profile)``."""
    data = dict(data)
    data.pop("kind", None)
    profiles = data.pop("profiles", None) or {}
    default = data.pop("default_profile", None)
    if not isinstance(profiles, dict):
        raise StudyConfigError(f"{where}: profiles must be a mapping of name -> keys, got {profiles!r}")
    profile = profile or default
    if profile is None:
        return data, None
    if profile not in profiles:
        raise StudyConfigError(f"{where}: no profile {profile!r} (profiles: {', '.join(profiles) or 'none'})")
    return merge(data, profiles[profile] or {}), profile


def scaling_from_dict(data: dict, base: str | Path = ".", profile: str | None = None,
                      **overrides: Any) -> ScalingConfig:
    """Build and check a :class:`ScalingConfig` from parsed YAML: ``profile`` (default: the YAML's
    ``default_profile``) merged over the top-level keys, then ``overrides`` (top-level keys; None
    values ignored); relative paths made absolute against ``base``; every config file must exist."""
    data, profile = resolve_profile(data, profile, "scaling config")
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["profile"] = profile
    cfg = _build(ScalingConfig, data, "")
    root = Path(base).absolute()

    def absolute(p: str) -> str:
        return str(Path(p) if Path(p).is_absolute() else root / p)

    cfg.out_dir, cfg.scale, cfg.world_dir = absolute(cfg.out_dir), absolute(cfg.scale), absolute(cfg.world_dir)
    for part in cfg.stages.values():
        part.configs = [absolute(c) for c in part.configs]
    for arm in cfg.arms:
        for phase in arm.phases:
            phase.configs = [absolute(c) for c in phase.configs]
    files = [("scale", cfg.scale), *((f"stages.{n}.configs", c) for n, p in cfg.stages.items() for c in p.configs),
             *((f"arms.{a.name}.{ph.name}.configs", c) for a in cfg.arms for ph in a.phases for c in ph.configs)]
    missing = [f"{where}: {path}" for where, path in files if not Path(path).is_file()]
    if missing:
        raise StudyConfigError("config file(s) not found: " + "; ".join(missing))
    return cfg


def config_kind(data: dict) -> str:
    """``"scaling"`` for a YAML that says ``kind: scaling``, ``"study"`` for one without ``kind``."""
    kind = data.get("kind", "study")
    if kind not in ("study", KIND):
        raise StudyConfigError(f"kind must be 'study' or '{KIND}', got {kind!r}")
    return kind


def load_scaling(path: str | Path, base: str | Path = ".", profile: str | None = None,
                 **overrides: Any) -> ScalingConfig:
    """Read a scaling YAML under ``profile``; ``overrides`` replace top-level keys after the profile
    is merged (``out_dir=...``, ``world_dir=...``)."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or config_kind(data) != KIND:
        raise StudyConfigError(f"{path}: a scaling config is a YAML mapping with kind: {KIND}")
    try:
        return scaling_from_dict(data, base, profile, **overrides)
    except StudyConfigError as e:
        raise StudyConfigError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- what it will cost


def read_preset(cfg: ScalingConfig) -> dict:
    return yaml.safe_load(Path(cfg.scale).read_text()) or {}


def _last_arg(args: list[str], key: str) -> str | None:
    """The value of the last ``key VALUE`` pair in ``args``."""
    found = None
    for i, a in enumerate(args[:-1]):
        if a == key:
            found = args[i + 1]
    return found


def slots_per_step(cfg: ScalingConfig) -> int:
    """Slots of one training batch: ``data.batch_size * data.row_len`` of the preset, or of the sweep's
    ``train_args`` when they set them."""
    data = read_preset(cfg).get("data") or {}
    b = _last_arg(cfg.train_args, "--data.batch_size") or data.get("batch_size", 8)
    row = _last_arg(cfg.train_args, "--data.row_len") or data.get("row_len", 512)
    return int(b) * int(row)


def vocab_size(cfg: ScalingConfig) -> int:
    return int(_last_arg(cfg.train_args, "--data.vocab_size") or (read_preset(cfg).get("data") or {}).get(
        "vocab_size", 1024))


def estimated_flops_per_step(cfg: ScalingConfig, size: ModelSize) -> float:
    """``6 * matmul_params * slots``: a native decoder's training step without attention scores and
    patch projections (a few % at these sizes, docs/PERFORMANCE.md). An **estimate** for the plan and
    the cost; the runs use each arm's measured FLOPs per step."""
    return 6.0 * size.matmul_params(vocab_size(cfg)) * slots_per_step(cfg)


@dataclass
class CostEstimate:
    """:func:`estimate_cost`'s figures (seconds and FLOPs, every seed)."""

    train_flops: float
    steps: int
    launches: int
    evals: int
    measurements: int
    seconds: dict[str, float]

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


def estimate_cost(cfg: ScalingConfig, cost: CostModel | None = None) -> CostEstimate:
    """What the sweep will take on the machine of ``cost`` (default: the config's): training FLOPs
    (every point's budget, the parts once per size or point (``parts_per``); under ``fusion_stage`` the bolt-on points spend
    their whole budget on fusion, under ``all_in`` the budget minus their parts), steps from
    :func:`estimated_flops_per_step`, one launch per phase and stage run, one evaluation per point
    and accounting, one FLOPs measurement per (arm, size) and part."""
    cost = cost or cfg.cost
    if cost is None:
        raise ValueError("no cost model: set `cost:` in the scaling config")
    flops, steps, launches, evals = 0.0, 0, 0, 0
    parts: dict[str, tuple[float, ModelSize]] = {}  # part name -> (budget, size)
    for p in cfg.points():
        arm = cfg.arm(p.arm)
        fps = estimated_flops_per_step(cfg, p.size)
        accs = cfg.accountings if arm.parts else cfg.accountings[:1]  # an arm without parts: one run for all
        for acc in accs:
            pre = sum(cfg.part_budget(s, p) for s in set(arm.parts.values())) if acc == ALL_IN else 0.0
            flops += p.budget - pre
            steps += sum(max(1, round(float(ph.budget_fraction) * (p.budget - pre) / fps)) for ph in arm.phases)
            launches += len(arm.phases)
            evals += 1
        parts.update({cfg.part_name(s, p): (cfg.part_budget(s, p), p.size) for s in arm.parts.values()})
    for budget, size in parts.values():
        flops += budget
        steps += max(1, round(budget / estimated_flops_per_step(cfg, size)))
        launches += 1
    n_seeds = len(cfg.seeds)
    flops, steps, launches, evals = flops * n_seeds, steps * n_seeds, launches * n_seeds, evals * n_seeds
    measurements = sum(len(cfg.arm(a).phases) for a, _ in {(p.arm, p.size_index) for p in cfg.points()}) + len(parts)
    seconds = {"training FLOPs": flops / cost.flops_per_s, "step overhead": steps * cost.step_overhead_s,
               "process launches": launches * cost.launch_s, "evaluations": evals * cost.eval_s,
               "FLOPs measurements": measurements * cost.measure_s, "setup": cost.setup_s}
    return CostEstimate(flops, steps, launches, evals, measurements, seconds)


__all__ = ["ModelSize", "SizeRule", "GridSpec", "Point", "PartSpec", "ScalingArm", "CostModel", "FitSpec",
           "ScalingConfig", "to_study", "load_scaling", "scaling_from_dict", "config_kind", "estimate_cost",
           "estimated_flops_per_step", "budget_label", "KIND"]
