"""Statistics for comparing runs: seed confidence intervals, paired bootstrap, seed grouping.

* :func:`mean_ci` — mean over seeds with a Student-t 95% half-width.
* :func:`paired_bootstrap` — is arm A better than arm B *on the same samples*?
* :func:`group_runs` — runs that differ only in seed (and output paths) and share a world form one arm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as _scipy_stats  # scipy comes with scikit-learn and librosa

# Leaf config keys that only say where a run writes things; they never define an arm.
OUTPUT_PATH_KEYS = frozenset({
    "default_root_dir", "dirpath", "save_dir", "log_dir", "logdir", "root_dir", "run_dir",
    "out_dir", "output_dir", "ckpt_path", "ckpt_dir", "checkpoint_path", "checkpoint_dir",
    "resume_from_checkpoint", "weights_save_path",
})
# Config sections that only configure where and how logs are written.
LOGGER_SECTIONS = frozenset({"logger", "loggers"})
# Keys that change how a run is watched or where its data lies, not what it trains: the world's
# content is fixed by its preset and seed (and is identified by results["world"]), whatever folder
# it sits in; validation only reads.
NON_ARM_KEYS = frozenset({
    "world_dir", "enable_progress_bar", "enable_model_summary", "log_every_n_steps",
    "val_check_interval", "limit_val_batches", "num_sanity_val_steps", "checkpoint_every",
    "num_workers", "cache_mb", "token_cache",  # where and how batches are loaded: the same batches either way (tested)
})
# An option a run's config lacks was added after it was trained: the code then had it off.
_UNSET_MEANS_OFF = (None, False)
# Seeds that choose *what* is trained on, not the draw of one experiment: never ignored.
DATA_SEED_KEYS = frozenset({"world_seed"})


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and confidence half-width over independent runs (seeds).

    ``half = t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation
    (``ddof=1``), so the interval is ``mean ± half``. With one value the spread is unknown and
    the half-width is ``nan`` (not 0: one seed says nothing about seed noise). NaN values are
    dropped first; with none left both numbers are ``nan``.
    """
    x = np.asarray([v for v in values if not math.isnan(float(v))], dtype=np.float64)
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    mean = float(x.mean())
    if n == 1:
        return mean, float("nan")
    t = float(_scipy_stats.t.ppf(0.5 + level / 2, df=n - 1))
    return mean, t * float(x.std(ddof=1)) / math.sqrt(n)


def paired_bootstrap(correct_a: Sequence[float], correct_b: Sequence[float],
                     n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Paired bootstrap of ``mean(a) - mean(b)`` over samples scored by both arms.

    ``correct_a[i]`` and ``correct_b[i]`` are the two arms' scores (bool or float) on the same
    sample ``i``. Each replicate resamples sample indices with replacement (the same indices
    for both arms, which is what pairs them) and takes the mean difference. The CI is the
    percentile interval at ``level``. The two-sided p-value tests ``diff == 0`` by centring the
    bootstrap distribution on the null: ``p = (1 + #{|d* - diff| >= |diff|}) / (1 + n_boot)``
    (Efron & Tibshirani 1993, §16.4; the +1 keeps p > 0). Identical arms give ``p = 1``.
    Deterministic in ``seed``; vectorised with numpy in chunks to bound memory.

    Returns:
        ``dict(diff, ci_low, ci_high, p_value, n, n_boot)``.
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap: need two 1-D arrays of one length, got {a.shape}, {b.shape}")
    n = a.size
    if n == 0:
        nan = float("nan")
        return dict(diff=nan, ci_low=nan, ci_high=nan, p_value=nan, n=0, n_boot=n_boot)
    d = a - b  # (N,) per-sample difference; resampling d is resampling the pairs
    diff = float(d.mean())
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 4_000_000 // n)  # replicates per chunk: ~32 MB of int64 indices
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))  # (chunk, N)
        boot[start:stop] = d[idx].mean(axis=1)
    alpha = 1.0 - level
    ci_low, ci_high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    # a tiny tolerance so that float noise on an exactly-zero difference does not count
    extreme = np.abs(boot - diff) >= abs(diff) - 1e-12
    p_value = (1 + int(extreme.sum())) / (1 + n_boot)
    return dict(diff=diff, ci_low=float(ci_low), ci_high=float(ci_high), p_value=min(1.0, p_value),
                n=n, n_boot=n_boot)


# --------------------------------------------------------------------------- grouping


def _flatten(obj: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dicts/lists -> {path tuple: leaf value}; list items get their index as key."""
    if isinstance(obj, Mapping):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, prefix + (str(i),)))
        return out
    return {prefix: obj}


def is_ignored_key(path: Sequence[str]) -> bool:
    """True for config keys that do not define an arm: seeds, output paths, logger settings.

    A key is ignored when any component of its dotted path contains ``seed``
    (``seed_everything``, ``data.init_args.seed``, ``shuffle_seed``) — except the world
    generator's ``world_seed`` (:data:`DATA_SEED_KEYS`: another world is another experiment) —, when a component is a
    logger section (``trainer.logger.*``: where logs go), or when its last component is an
    output-path key (:data:`OUTPUT_PATH_KEYS`: ``default_root_dir``, ``dirpath``, ``ckpt_path``, …)
    or a key that does not change what is trained (:data:`NON_ARM_KEYS`: progress bars, logging
    and validation cadence, the world's folder).
    """
    parts = [p.lower() for p in path]
    if parts and parts[-1] in DATA_SEED_KEYS:
        return False
    if any("seed" in p for p in parts):
        return True
    if any(p in LOGGER_SECTIONS for p in parts):
        return True
    return bool(parts) and (parts[-1] in OUTPUT_PATH_KEYS or parts[-1] in NON_ARM_KEYS)


def arm_config(config: Mapping) -> dict[str, Any]:
    """The flattened config (``"a.b.c": value``) with :func:`is_ignored_key` keys removed."""
    return {".".join(k): v for k, v in _flatten(config).items() if not is_ignored_key(k)}


def _short_value(v: Any) -> str:
    """Readable value: a dotted class path shortens to its last name."""
    s = str(v)
    if isinstance(v, str) and "." in s and " " not in s and s.split(".")[-1][:1].isupper():
        return s.split(".")[-1]
    return s


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Shortest unique dotted suffix of each key (``model.init_args.lr`` -> ``lr``)."""
    short = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if sum(o == cand or o.endswith("." + cand) for o in keys) == 1:
                break
        short[k] = cand
    return short


def _fusion_of(run: Mapping, flat: Mapping[str, Any]) -> str | None:
    """The run's fusion name: ``run["fusion"]``, else a config leaf named ``fusion``."""
    if run.get("fusion") is not None:
        return str(run["fusion"])
    for k, v in flat.items():
        if k.split(".")[-1] == "fusion":
            return _short_value(v)
    return None


def group_runs(runs: Sequence[Mapping], max_label_len: int = 60) -> dict[str, list]:
    """Group runs that differ only in seed / output paths; name each group readably.

    Each run is a mapping with a ``"config"`` (nested dict, the resolved training config) and
    optionally ``"fusion"`` and ``"world"`` (``{"hash": ...}``, the identity of the world it was
    trained on, written by ``eval.py``). Two runs are in one group when their :func:`arm_config`
    are equal and their world hashes are equal (a run without one is of an unknown world, which
    matches only other unknown ones), and so are their fusion names: runs trained on different worlds
    are never seeds of one arm. A key set to ``None`` or ``False`` counts as unset: a run trained
    before an option existed lacks it in its config, and the code then behaved as the option off.
    The world enters the labels as ``world=<first 8 hex digits>`` when it differs between groups.

    Group label: the fusion name (``run["fusion"]`` or the config leaf named ``fusion``), then
    ``key=value`` for every kept config key whose value differs between the groups *of that
    fusion* (an arm's defaults, such as LLaVA's 1-D positions, say nothing next to another fusion;
    keys shortened to their shortest unique dotted suffix, class paths to the class name), joined by
    spaces and cut to ``max_label_len`` characters. Without
    fusion or differing keys the label is ``"group<i>"``; clashing labels get ``#<i>``.
    Groups keep the order of their first run; runs keep their input order.

    Returns:
        ``{label: [run, ...]}``.
    """
    flats = [{k: v for k, v in arm_config(r.get("config") or {}).items() if v not in _UNSET_MEANS_OFF}
             | {"world": str((r.get("world") or {}).get("hash", "unknown"))[:8]} for r in runs]
    keys_of_group: list[tuple] = []
    members: list[list[int]] = []
    for i, flat in enumerate(flats):
        key = (_fusion_of(runs[i], flat), *sorted((k, repr(v)) for k, v in flat.items()))
        if key in keys_of_group:
            members[keys_of_group.index(key)].append(i)
        else:
            keys_of_group.append(key)
            members.append([i])

    reps = [flats[m[0]] for m in members]
    fusions = [_fusion_of(runs[m[0]], rep) for m, rep in zip(members, reps)]
    all_keys = sorted(set().union(*[set(f) for f in reps])) if reps else []

    def differs(k: str, among: list[int]) -> bool:
        return len({repr(reps[i].get(k, "<unset>")) for i in among}) > 1

    everyone = list(range(len(reps)))
    family = [[j for j in everyone if fusions[j] == fusions[i]] for i in everyone]  # None: one family
    shown = [[k for k in all_keys if k.split(".")[-1] != "fusion"
              and (differs(k, family[i]) or (k == "world" and differs(k, everyone)))] for i in everyone]
    differing = sorted(set().union(*map(set, shown))) if shown else []
    short = _short_keys(differing)

    groups: dict[str, list] = {}
    for gi, m in enumerate(members):
        rep = reps[gi]
        parts = [p for p in [fusions[gi]] if p]
        parts += [f"{short[k]}={_short_value(rep.get(k, '<unset>'))}" for k in shown[gi]]
        label = " ".join(parts)[:max_label_len] or f"group{gi}"
        if label in groups:
            label = f"{label}#{gi}"
        groups[label] = [runs[i] for i in m]
    return groups
