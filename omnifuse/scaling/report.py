"""The scaling report: ``OUT/scaling.md``, ``OUT/scaling_<accounting>.png``, ``points.jsonl``, ``fits.json``.

Read from the sweep's folder (the study layout of :mod:`omnifuse.study.plan`), per accounting:

- the points (:func:`collect_points`): for every grid point and seed with a final run evaluated, the
  training FLOPs under the accounting (``C``: the arm's phases' measured ``train_flops``, plus its parts'
  under ``all_in``), the parameters ``N`` (``params_total`` of the final run: frozen encoders and LM
  included for a bolt-on arm), the training tokens ``D`` (non-padding slots of its phases), the held-out
  loss (``heldout.json``, :mod:`omnifuse.eval.heldout`) and the QA accuracy (``eval/results.json``);
- per arm, the fits of :mod:`omnifuse.scaling.fit` on the seed means of each point, with bootstrap
  intervals: a table of constants, the plot (loss vs compute with the fitted law and the compute
  frontier, the IsoFLOP profiles with their parabolas, ``N*`` vs compute), and the verdict
  (:func:`verdict`): computed from the fits only, each number with its interval, next to what
  Shukor et al. 2025 report.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from omnifuse.eval.heldout import HELDOUT_FILE
from omnifuse.eval.report import fmt, markdown_table
from omnifuse.scaling.config import ScalingConfig, to_study
from omnifuse.scaling.fit import ArmFit, fit_arm
from omnifuse.study.config import ACCOUNTING_LABELS, ALL_IN
from omnifuse.study.plan import read_json
from omnifuse.study.report import StudyRuns, timing_section

REPORT_FILE = "scaling.md"
POINTS_FILE = "points.jsonl"
FITS_FILE = "fits.json"
SHUKOR = ("Shukor et al. 2025, *Scaling Laws for Native Multimodal Models* (arXiv 2504.07951; 457 models, no "
          "code released)")
# What that paper reports, as docs/../shared/ANCHORS.md summarises it; no figure of theirs is quoted here.
SHUKOR_CLAIMS = ("early and late fusion trained from scratch follow similar compute scaling",
                 "early fusion is better at lower parameter counts",
                 "compute-optimal early-fusion models are smaller")


@dataclass
class PointResult:
    """One evaluated point of one seed under one accounting (module docstring for the fields)."""

    arm: str
    accounting: str
    seed: int
    size: str
    size_index: int
    budget: float
    budget_index: int
    flops: float
    params: float
    tokens: float
    loss: float
    n_tokens: int
    labels_sha: str
    accuracy: float | None
    steps: list[int]


# --------------------------------------------------------------------------- reading the folder


def collect_points(cfg: ScalingConfig, out: str | Path) -> tuple[list[PointResult], list[str]]:
    """Every evaluated point of the sweep in ``out``, and notes on the points that are not (not trained
    under an accounting, or not finished)."""
    out = Path(out)
    runs = StudyRuns(to_study(cfg), out)
    points, notes, missing = [], [], 0
    for seed in runs.seeds():
        for p in cfg.points():
            arm = cfg.arm(p.arm)
            for acc in cfg.accountings:
                alloc = runs.allocation(seed, p.name, acc)
                if not alloc["phases"]:
                    notes.append(f"{p.name} seed {seed} [{acc}]: {alloc['note']}")
                    continue
                chain = runs.chain(seed, p.name, acc)
                final = chain[-1] if chain else None
                heldout = read_json(out / final["key"] / HELDOUT_FILE) if final else {}
                if not heldout:
                    missing += 1
                    continue
                computes = [runs.compute(r) for r in chain]
                fusion = sum(float(c.get("train_flops") or 0.0) for c in computes)
                flops = fusion + (runs.pretraining_flops(seed, p.name) if acc == ALL_IN and arm.parts else 0.0)
                tokens = sum(v for c in computes for k, v in (c.get("tokens_seen") or {}).items() if k != "pad")
                results = runs.results(final) or {}
                acc_value = (results.get("headline") or {}).get("accuracy")
                points.append(PointResult(
                    arm=p.arm, accounting=acc, seed=int(seed), size=p.size.name, size_index=p.size_index,
                    budget=p.budget, budget_index=p.budget_index, flops=flops,
                    params=float(computes[-1].get("params_total") or math.nan), tokens=float(tokens),
                    loss=float(heldout["loss"]), n_tokens=int(heldout["n_tokens"]),
                    labels_sha=str(heldout.get("labels_sha")),
                    accuracy=None if acc_value is None else float(acc_value),
                    steps=[int(c.get("global_step") or 0) for c in computes]))
    if missing:
        notes.append(f"{missing} point(s) have no held-out loss yet (not trained or not evaluated): the fits leave "
                     "them out; `python -m omnifuse.study run` finishes them")
    return points, notes


def seed_means(points: Sequence[PointResult]) -> list[dict]:
    """One record per (arm, accounting, size, budget): the mean over seeds of ``flops, params, tokens,
    loss, accuracy`` and the number of seeds."""
    groups: dict[tuple, list[PointResult]] = defaultdict(list)
    for p in points:
        groups[(p.arm, p.accounting, p.size_index, p.budget_index)].append(p)
    out = []
    for (arm, acc, k, j), ps in groups.items():
        accs = [p.accuracy for p in ps if p.accuracy is not None]
        out.append({"arm": arm, "accounting": acc, "size": ps[0].size, "size_index": k, "budget": ps[0].budget,
                    "budget_index": j, "seeds": len(ps),
                    **{f: float(np.mean([getattr(p, f) for p in ps])) for f in ("flops", "params", "tokens", "loss")},
                    "accuracy": float(np.mean(accs)) if accs else None})
    return sorted(out, key=lambda r: (r["accounting"], r["arm"], r["budget_index"], r["size_index"]))


# --------------------------------------------------------------------------- fitting every arm


def fit_arms(cfg: ScalingConfig, means: Sequence[dict]) -> dict[tuple[str, str], ArmFit]:
    """``{(accounting, arm): ArmFit}`` of the seed means, with replicates, for the verdict, of the loss at
    the smallest and largest budget from the compute law (``L@lo``, ``L@hi``) and from Chinchilla's
    compute-optimal model (``L*@lo``, ``L*@hi``), and of Chinchilla's ``N*`` at their geometric mean
    (``Nopt@ref``)."""
    budgets = cfg.budgets()
    lo, hi = budgets[0], budgets[-1]
    ref = math.sqrt(lo * hi)
    extra = {"L@lo": lambda r: float(r["compute"](lo)), "L@hi": lambda r: float(r["compute"](hi)),
             "L*@lo": lambda r: float(r["chinchilla"].optimal_loss(lo)),
             "L*@hi": lambda r: float(r["chinchilla"].optimal_loss(hi)),
             "Nopt@ref": lambda r: float(r["chinchilla"].optimal_n(ref))}
    fits = {}
    for i, (acc, arm) in enumerate(sorted({(m["accounting"], m["arm"]) for m in means})):
        rows = [m for m in means if m["accounting"] == acc and m["arm"] == arm]
        cols = {f: np.array([r[f] for r in rows], dtype=float) for f in ("flops", "params", "tokens", "loss", "budget")}
        fits[(acc, arm)] = fit_arm(cols["flops"], cols["params"], cols["tokens"], cols["loss"], cols["budget"],
                                   n_boot=cfg.fit.n_boot, seed=1000 + i, extra=extra)
    return fits


def _paired(a: ArmFit, b: ArmFit, name: str) -> np.ndarray:
    """``b - a`` replicate by replicate (independent resamples of each arm's points; the two arms' fits
    have the same ``n_boot``), ``nan`` where either refit failed."""
    return b.boot_raw[name] - a.boot_raw[name]


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the finite ``values`` (nan, nan when none is)."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _ci_text(lo: float, hi: float) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]"


# --------------------------------------------------------------------------- the verdict


def _who(ci: tuple[float, float], base: str, arm: str) -> str:
    if ci[0] > 0:
        return f"{base} has the lower loss"
    if ci[1] < 0:
        return f"{arm} has the lower loss"
    return "the interval includes 0: neither is lower beyond the noise"


def _frontier_text(cfg: ScalingConfig, acc: str, means: Sequence[dict], base: str, arm: str) -> str:
    """The measured best loss of each budget for both arms: ``C: base a, arm b``."""
    cells = []
    for j, c in enumerate(cfg.budgets()):
        best = {}
        for name in (base, arm):
            at = [m["loss"] for m in means if m["accounting"] == acc and m["arm"] == name and m["budget_index"] == j]
            best[name] = min(at) if at else None
        cells.append(f"{c:.2g}: {fmt(best[base])} vs {fmt(best[arm])}")
    return "; ".join(cells)


def verdict(cfg: ScalingConfig, acc: str, fits: Mapping[tuple[str, str], ArmFit], means: Sequence[dict]) -> str:
    """A paragraph per bolt-on arm against the baseline under ``acc``, from the fits only: which arm has
    the lower loss at the smallest and the largest budget, whether the gap grows or shrinks with compute,
    how ``N*(C)`` compares; then the same three questions put to what Shukor et al. 2025 report.

    "At equal compute" is the loss of the compute-optimal model, ``L*(C) = L(N*(C), C / (k N*(C)))`` of
    each arm's Chinchilla fit (every point informs it), with the bootstrap interval of the difference
    (the two arms' refits are independent resamples); the compute-frontier law ``L(C)``, fitted to one
    point per budget, and the measured best loss of each budget are given beside it."""
    level, base = cfg.fit.level, cfg.baseline
    budgets = cfg.budgets()
    lo, hi, ref = budgets[0], budgets[-1], math.sqrt(budgets[0] * budgets[-1])
    fb = fits.get((acc, base))
    if fb is None:
        return f"No evaluated {base} points under {acc}: nothing to compare."
    lines, agree = [], {claim: [] for claim in SHUKOR_CLAIMS}
    for arm in [a.name for a in cfg.arms if a.name != base]:
        fa = fits.get((acc, arm))
        if fa is None:
            lines.append(f"**{arm}**: no evaluated points under {acc}.")
            continue
        text = [f"**{base} vs {arm}** ({acc}; held-out loss in nats per target token; {level:.0%} bootstrap "
                f"intervals over {cfg.fit.n_boot} resamples of the points). Best measured loss per budget "
                f"({base} vs {arm}): {_frontier_text(cfg, acc, means, base, arm)}."]
        if fb.chinchilla is None or fa.chinchilla is None:
            text.append("Chinchilla's L(N, D) could not be fitted for both arms (it needs 6 distinct points each): "
                        "no compute-optimal comparison.")
        else:
            d_lo, d_hi = _paired(fb, fa, "L*@lo"), _paired(fb, fa, "L*@hi")
            point_lo = float(fa.chinchilla.optimal_loss(lo) - fb.chinchilla.optimal_loss(lo))
            point_hi = float(fa.chinchilla.optimal_loss(hi) - fb.chinchilla.optimal_loss(hi))
            ci_lo, ci_hi, ci_ch = _interval(d_lo, level), _interval(d_hi, level), _interval(d_hi - d_lo, level)
            for c, point, ci in ((lo, point_lo, ci_lo), (hi, point_hi, ci_hi)):
                text.append(f"At C = {c:.3g} FLOPs the compute-optimal models (Chinchilla fits) give {arm} − {base} = "
                            f"{fmt(point)} {_ci_text(*ci)}: {_who(ci, base, arm)}.")
            trend = point_hi - point_lo
            if ci_ch[0] > 0 or ci_ch[1] < 0:
                if point_lo > 0:
                    moves = f"{base}'s lead {'grows' if trend > 0 else 'shrinks'}"
                elif point_lo < 0:
                    moves = f"{arm}'s lead {'shrinks' if trend > 0 else 'grows'}"
                else:
                    moves = f"the gap opens in {base if trend > 0 else arm}'s favour"
                text.append(f"From the smallest to the largest budget the difference changes by {fmt(trend)} "
                            f"{_ci_text(*ci_ch)}: {moves} with compute.")
            else:
                text.append(f"From the smallest to the largest budget the difference changes by {fmt(trend)} "
                            f"{_ci_text(*ci_ch)}: no change of the gap beyond the noise.")
            small = "consistent" if ci_lo[0] > 0 else "contradicted" if ci_lo[1] < 0 else "undecided"
            agree[SHUKOR_CLAIMS[1]].append(f"{arm}: {small} at the smallest budget ({arm} − {base} = {fmt(point_lo)} "
                                           f"{_ci_text(*ci_lo)})")
            nb, na = float(fb.chinchilla.optimal_n(ref)), float(fa.chinchilla.optimal_n(ref))
            ci_r = _interval(fa.boot_raw["Nopt@ref"] / fb.boot_raw["Nopt@ref"], level)
            text.append(f"Compute-optimal size: N* ∝ C^a with a = {fmt(fb.chinchilla.optimal_exponent)} "
                        f"{_ci_text(*fb.ci('a_opt', level))} for {base} and {fmt(fa.chinchilla.optimal_exponent)} "
                        f"{_ci_text(*fa.ci('a_opt', level))} for {arm}; at C = {ref:.3g} FLOPs N* = {nb:.3g} vs {na:.3g} "
                        f"parameters ({arm}/{base} = {fmt(na / nb)} {_ci_text(*ci_r)}; a bolt-on arm's N counts its frozen "
                        "encoders and LM).")
            smaller = "consistent" if ci_r[0] > 1 else "contradicted" if ci_r[1] < 1 else "undecided"
            agree[SHUKOR_CLAIMS[2]].append(f"{arm}: {smaller} (N*_{arm} / N*_{base} = {fmt(na / nb)} {_ci_text(*ci_r)})")
        iso = [(name, f.isoflop_exponent, f.ci("a_isoflop", level)) for name, f in ((base, fb), (arm, fa))]
        text.append("IsoFLOP minima (parabola in log N per budget, bracketed minima only): " + "; ".join(
            f"{name} a = {fmt(e)} {_ci_text(*ci)}" if e is not None else f"{name}: fewer than 2 bracketed minima"
            for name, e, ci in iso) + ".")
        if fb.compute is None or fa.compute is None:
            text.append("The compute-frontier law L(C) could not be fitted for both arms (fewer than 3 budgets).")
        else:
            ci_c_lo, ci_c_hi = _interval(_paired(fb, fa, "L@lo"), level), _interval(_paired(fb, fa, "L@hi"), level)
            a_b, a_a = fb.ci("alpha_C", level), fa.ci("alpha_C", level)
            overlap = not (a_b[1] < a_a[0] or a_a[1] < a_b[0])
            text.append(f"The compute-frontier laws L(C) (best size per budget) give {arm} − {base} = "
                        f"{fmt(float(fa.compute(lo) - fb.compute(lo)))} {_ci_text(*ci_c_lo)} at {lo:.3g} and "
                        f"{fmt(float(fa.compute(hi) - fb.compute(hi)))} {_ci_text(*ci_c_hi)} at {hi:.3g} FLOPs; "
                        f"exponents α_C = {fmt(fb.compute.alpha)} {_ci_text(*a_b)} ({base}) and {fmt(fa.compute.alpha)} "
                        f"{_ci_text(*a_a)} ({arm}), {'overlapping' if overlap else 'disjoint'} intervals.")
            agree[SHUKOR_CLAIMS[0]].append(f"{arm}: {'consistent' if overlap else 'not seen'} (α_C intervals "
                                           f"{'overlap' if overlap else 'are disjoint'})")
        lines.append(" ".join(text))
    lines.append(f"**Next to {SHUKOR}.** They report that " + "; that ".join(SHUKOR_CLAIMS) + ". Here, on "
                 f"omnifuse's generated world ({acc}): " + " ".join(
                     f"*{claim}*: {'; '.join(v) if v else 'not tested (fits missing)'}." for claim, v in agree.items())
                 + " Their late-fusion models are trained from scratch with their vision encoder; omnifuse's LLaVA "
                 "and Flamingo arms are built on parts pretrained here (charged to them under all_in, free under "
                 "fusion_stage), at sizes and budgets many orders of magnitude below theirs.")
    n_points = len([m for m in means if m["accounting"] == acc])
    lines.append(f"Scope: {n_points} points (seed means) of one generated world, {len(cfg.seeds)} seed(s), compute "
                 f"from {lo:.3g} to {hi:.3g} FLOPs ({hi / lo:.0f}x). The intervals resample the points, not the "
                 "training runs: with one seed they do not include seed-to-seed noise. The bolt-on arms' parts: "
                 + ("their own at every size and budget (each stage's share of the point's budget)."
                    if cfg.parts_per == "point" else
                    "one set per size, trained at shares of that size's smallest budget and shared by its larger "
                    "budgets (their parts do not grow with compute)."))
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- tables and plot


def constants_rows(cfg: ScalingConfig, acc: str, fits: Mapping[tuple[str, str], ArmFit]) -> list[list]:
    level = cfg.fit.level
    rows = []
    for arm in [a.name for a in cfg.arms]:
        f = fits.get((acc, arm))
        if f is None:
            continue

        def ci(name: str) -> str:
            return _ci_text(*f.ci(name, level))

        c, ch = f.compute, f.chinchilla
        rows.append([
            arm, f.n_points,
            fmt(c.E) if c else "n/a", fmt(c.A) if c else "n/a", f"{fmt(c.alpha)} {ci('alpha_C')}" if c else "n/a",
            fmt(c.c0) if c else "n/a",
            fmt(ch.E) if ch else "n/a", fmt(ch.A) if ch else "n/a", f"{fmt(ch.alpha)} {ci('alpha')}" if ch else "n/a",
            fmt(ch.B) if ch else "n/a", f"{fmt(ch.beta)} {ci('beta')}" if ch else "n/a",
            f"{fmt(ch.optimal_exponent)} {ci('a_opt')}" if ch else "n/a",
            f"{fmt(f.isoflop_exponent)} {ci('a_isoflop')}" if f.isoflop_exponent is not None else "n/a",
            f"{fmt(c.rmse) if c else 'n/a'} / {fmt(ch.rmse) if ch else 'n/a'}",
            f"{min(f.failed.get('alpha_C', 0), f.n_boot)}/{min(f.failed.get('alpha', 0), f.n_boot)}",
        ])
    return rows


CONSTANT_COLUMNS = ["arm", "points", "E (L(C))", "A (L(C))", "α_C", "c0", "E", "A", "α", "B", "β",
                    "a = β/(α+β)", "a (IsoFLOP)", "rmse log L(C) / L(N,D)", "failed refits L(C) / L(N,D)"]


def plot_scaling(cfg: ScalingConfig, acc: str, means: Sequence[dict], fits: Mapping[tuple[str, str], ArmFit],
                 path: Path) -> Path:
    """Three log-log panels: loss vs compute (points, frontier, fitted ``L(C)``, Chinchilla's optimal loss
    dashed), the IsoFLOP profiles (loss vs N per budget, parabolas dotted, minima crossed), and ``N*`` vs
    compute (IsoFLOP minima, filled when bracketed; Chinchilla's ``N*(C)``). One colour per arm."""
    fig = Figure(figsize=(16, 4.8))
    ax_c, ax_n, ax_opt = fig.subplots(1, 3)
    budgets = cfg.budgets()
    grid_c = np.geomspace(budgets[0] / 1.5, budgets[-1] * 1.5, 60)
    for i, arm in enumerate(a.name for a in cfg.arms):
        rows = [m for m in means if m["accounting"] == acc and m["arm"] == arm]
        if not rows:
            continue
        colour, f = f"C{i % 10}", fits.get((acc, arm))
        ax_c.scatter([r["flops"] for r in rows], [r["loss"] for r in rows], color=colour, alpha=0.35, s=16)
        if f is not None and f.compute is not None:
            ax_c.plot(grid_c, f.compute(grid_c), color=colour, label=f"{arm}: L(C), α_C={f.compute.alpha:.3g}")
        if f is not None and f.chinchilla is not None:
            ax_c.plot(grid_c, f.chinchilla.optimal_loss(grid_c), color=colour, ls="--", lw=0.8)
            ax_opt.plot(grid_c, f.chinchilla.optimal_n(grid_c), color=colour,
                        label=f"{arm}: Chinchilla a={f.chinchilla.optimal_exponent:.3g}")
        for j, b in enumerate(budgets):
            at = sorted((r for r in rows if r["budget_index"] == j), key=lambda r: r["params"])
            if not at:
                continue
            shade = 0.35 + 0.65 * j / max(1, len(budgets) - 1)
            best = min(at, key=lambda r: r["loss"])
            ax_c.scatter([best["flops"]], [best["loss"]], color=colour, edgecolor="black", s=36, zorder=3)
            ax_n.plot([r["params"] for r in at], [r["loss"] for r in at], "o-", color=colour, alpha=shade, ms=4,
                      label=f"{arm}" if j == len(budgets) - 1 else None)
        for m in (f.minima if f is not None else []):
            x = np.linspace(math.log(m.n_range[0]), math.log(m.n_range[1]), 30)
            ax_n.plot(np.exp(x), np.polyval(m.coeffs, x), ":", color=colour, lw=0.8)
            if m.bracketed:
                ax_n.scatter([m.n_opt], [m.loss_opt], marker="x", color=colour, s=40, zorder=3)
            ax_opt.scatter([m.budget], [m.n_opt], color=colour if m.bracketed else "none", edgecolor=colour, s=30)
    ax_c.set(xscale="log", yscale="log", xlabel=f"training FLOPs ({acc})", ylabel="held-out loss (nats/target token)",
             title="loss vs compute (ringed: best size per budget; dashed: Chinchilla optimum)")
    ax_n.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="held-out loss",
             title="IsoFLOP profiles (darker: larger budget; x: parabola minimum)")
    ax_opt.set(xscale="log", yscale="log", xlabel=f"training FLOPs ({acc})", ylabel="compute-optimal N*",
               title="N*(C) (dots: IsoFLOP minima, hollow: outside the sizes tried)")
    for ax in (ax_c, ax_n, ax_opt):
        ax.title.set_fontsize("small")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


def _fits_record(fits: Mapping[tuple[str, str], ArmFit], level: float) -> dict:
    out = {}
    for (acc, arm), f in fits.items():
        out.setdefault(acc, {})[arm] = {
            "points": f.n_points, "n_boot": f.n_boot, "errors": f.errors, "failed_refits": f.failed,
            "compute_law": asdict(f.compute) if f.compute else None,
            "chinchilla": (asdict(f.chinchilla) | {"optimal_exponent": f.chinchilla.optimal_exponent})
            if f.chinchilla else None,
            "isoflop_minima": [asdict(m) for m in f.minima], "isoflop_exponent": f.isoflop_exponent,
            "intervals": {name: f.ci(name, level) for name in f.boot}, "level": level,
        }
    return out


def write_scaling_report(cfg: ScalingConfig, out: str | Path) -> Path:
    """Write ``out/scaling.md`` with its plots, ``points.jsonl`` and ``fits.json`` from the sweep's folder;
    returns the report's path."""
    out = Path(out)
    points, notes = collect_points(cfg, out)
    (out / POINTS_FILE).write_text("".join(json.dumps(asdict(p)) + "\n" for p in points))
    means = seed_means(points)
    fits = fit_arms(cfg, means)
    (out / FITS_FILE).write_text(json.dumps(_fits_record(fits, cfg.fit.level), indent=2, default=float) + "\n")
    budgets = cfg.budgets()
    sizes = cfg.model_sizes()
    md = [f"# Scaling: {cfg.name}" + (f" ({cfg.profile} profile)" if cfg.profile else ""), "",
          f"Arms {', '.join(a.name for a in cfg.arms)}; {len(sizes)} sizes ({', '.join(s.name for s in sizes)}) from the "
          f"rule of `sizes`; {len(budgets)} budgets from {budgets[0]:.3g} to {budgets[-1]:.3g} FLOPs "
          f"({budgets[-1] / budgets[0]:.0f}x), each spent by {cfg.grid.sizes_per_budget} sizes; seeds "
          f"{', '.join(map(str, cfg.seeds))}; scale `{Path(cfg.scale).name}`. Metric: held-out loss on the target "
          f"tokens of the world's test split (`python -m omnifuse.eval.heldout {' '.join(cfg.heldout_args)}`), "
          f"fitted per arm on the seed means of each point. Points: [{POINTS_FILE}]({POINTS_FILE}); fits: "
          f"[{FITS_FILE}]({FITS_FILE}).", ""]
    shas = {p.labels_sha for p in points}
    if len(shas) == 1 and points:
        md += [f"Every point scored the same {points[0].n_tokens} target tokens (labels `{shas.pop()}`).", ""]
    elif points:
        md += [f"**The points did not all score the same labels** ({len(shas)} label sets: "
               f"{', '.join(sorted(shas))}); losses of different label sets are not comparable.", ""]
    if notes:
        md += ["Not in the fits:", "", *(f"- {n}" for n in notes), ""]
    for acc in cfg.accountings:
        md += [f"## Accounting: {acc}", "", f"**{ACCOUNTING_LABELS[acc]}.**", ""]
        rows = constants_rows(cfg, acc, fits)
        if not rows:
            md += ["(no evaluated points)", ""]
            continue
        md += [f"### Fitted constants ({cfg.fit.level:.0%} bootstrap intervals) — {acc}", "",
               "`L(C) = E + A (C/c0)^-α_C` on the best size of each budget; `L(N, D) = E + A (N/n0)^-α + "
               "B (D/d0)^-β` on every point (n0, d0: geometric means of N and D, in fits.json); `a`: exponent of "
               "the compute-optimal `N*(C) ∝ C^a`, from Chinchilla (β/(α+β)) and from the IsoFLOP parabolas' "
               "minima. N counts every parameter of the final model (a bolt-on arm's frozen encoders and LM "
               "included); D the non-padding training slots of its fusion phases; C its training FLOPs under this "
               "accounting.", "", markdown_table(CONSTANT_COLUMNS, rows), ""]
        fname = f"scaling_{acc}.png"
        plot_scaling(cfg, acc, means, fits, out / fname)
        md += [f"![scaling {acc}]({fname})", ""]
        md += [f"### Verdict — {acc}", "", verdict(cfg, acc, fits, means), ""]
        table = [[m["arm"], m["size"], f"{m['budget']:.3g}", m["seeds"], f"{m['flops']:.4g}", f"{m['params']:.4g}",
                  f"{m['tokens']:.4g}", m["loss"], m["accuracy"]] for m in means if m["accounting"] == acc]
        md += [f"### Points — {acc}", "", markdown_table(
            ["arm", "size", "budget", "seeds", "C (FLOPs)", "N", "D (slots)", "held-out loss", "QA accuracy"], table), ""]
    md += timing_section(out)
    path = out / REPORT_FILE
    path.write_text("\n".join(md))
    return path


__all__ = ["write_scaling_report", "collect_points", "seed_means", "fit_arms", "verdict", "PointResult"]
