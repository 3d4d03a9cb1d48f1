"""The study report: ``OUT/report.md`` and ``OUT/<metric>_vs_flops_<accounting>.png``.

One section per accounting (never mixed), each saying which it is:

- per arm, mean ± 95% CI over seeds (:func:`omnifuse.eval.stats.mean_ci`) of the metrics of
  :data:`QUALITY_COLUMNS` (read from each final run's ``eval/results.json`` by :func:`run_metrics`)
  and of the cost columns (parameters, FLOPs under both accountings, train and decode tokens/s);
- paired bootstrap of each arm against its reference arm (the baseline, or ``compare_to``) on every
  per-sample metric, with the grouping and pairing of ``eval.py compare``
  (:func:`omnifuse.eval.report.group_sample_scores`, :func:`~omnifuse.eval.report.paired_group_test`);
- the headline metric against cumulative training FLOPs of every arm (the curve evaluations);
- a verdict written from those numbers only (:func:`verdict`).

A run's FLOPs: *fusion-stage* = the ``train_flops`` of its arm's phases (frozen forwards included);
*all-in* = that plus the ``train_flops`` of the stage runs its parts come from, each counted once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from omnifuse.data.world import QTYPES
from omnifuse.eval.report import (
    fmt, fmt_ci, group_sample_scores, load_results, markdown_table, paired_group_test, per_sample_metric,
)
from omnifuse.eval.stats import group_runs, mean_ci
from omnifuse.study.config import ACCOUNTING_LABELS, StudyConfig
from omnifuse.study.plan import CURVE_DIR, EVAL_DIR, PLAN_FILE, POINT_FILE, TIMINGS_FILE, read_json

REPORT_FILE = "report.md"
LEVEL = 0.95

# Question-type families of the accuracy columns (the world's types, omnifuse.data.world.QTYPES)
QTYPE_FAMILIES = {
    "image": tuple(q for q in QTYPES["vqa"] if q not in ("ocr", "chart")),
    "ocr": ("ocr",),
    "chart": ("chart",),
    "audio": QTYPES["audio_qa"],
    "crossmodal": QTYPES["crossmodal"],
    "multi_image": QTYPES["multi_image"],
}
POPE_SETS = ("random", "popular", "adversarial")
# (column, meaning) of the quality table, in order; see run_metrics
QUALITY_COLUMNS = (
    ("accuracy", "exact-match accuracy over the iid QA questions"),
    *((f"acc_{f}", f"accuracy on the {f} question types ({', '.join(q)})") for f, q in QTYPE_FAMILIES.items()),
    ("cogent_accuracy", "accuracy on the compositional split (colour×shape pairs unseen in training)"),
    *((f"pope_{s}_f1", f"POPE {s} F1") for s in POPE_SETS),
    ("chair_i", "CHAIRi: hallucinated object mentions / all mentions (lower is better)"),
    ("chair_s", "CHAIRs: captions with a hallucinated object (lower is better)"),
    ("accuracy_minus_blind", "accuracy − blind (media removed, candidates ranked) accuracy: what the media add"),
    ("swap_change_rate", "answers that change when the media are swapped for another sample's"),
    ("perplexity", "text-only perplexity on held-out world prose (forgetting guard; lower is better)"),
)
COST_COLUMNS = ("params_total", "params_trainable", "flops_fusion_stage", "flops_all_in", "train_tokens_per_s",
                "decode_tokens_per_s")
LOWER_IS_BETTER = {"chair_i", "chair_s", "perplexity"}


# --------------------------------------------------------------------------- numbers of one run


def family_accuracy(by_qtype: Mapping[str, Mapping], qtypes: Sequence[str]) -> float | None:
    """Accuracy over the questions of ``qtypes`` (each type weighted by its ``n``), or None if none."""
    n = sum(int(by_qtype[q]["n"]) for q in qtypes if q in by_qtype)
    if not n:
        return None
    return sum(float(by_qtype[q]["accuracy"]) * int(by_qtype[q]["n"]) for q in qtypes if q in by_qtype) / n


def run_metrics(results: Mapping) -> dict[str, float | None]:
    """The quality columns of one evaluated run (None where the suite did not measure it)."""
    head, by = results.get("headline") or {}, results.get("by_qtype") or {}
    pope = results.get("pope") or {}
    out: dict[str, float | None] = {"accuracy": head.get("accuracy")}
    out.update({f"acc_{f}": family_accuracy(by, q) for f, q in QTYPE_FAMILIES.items()})
    out["cogent_accuracy"] = head.get("cogent_accuracy")
    out.update({f"pope_{s}_f1": (pope.get(s) or {}).get("f1") for s in POPE_SETS})
    for k in ("chair_i", "chair_s", "accuracy_minus_blind", "swap_change_rate", "perplexity"):
        out[k] = head.get(k)
    return out


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v)) else None


# --------------------------------------------------------------------------- reading the study


class StudyRuns:
    """What the study's folder holds: its plan, and per accounting and arm the chains of runs (one per seed)."""

    def __init__(self, cfg: StudyConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.plan = read_json(out / PLAN_FILE)
        if not self.plan.get("seeds"):
            raise FileNotFoundError(f"{out / PLAN_FILE} has no seeds: run the study first")

    def seeds(self) -> list[str]:
        return list(self.plan["seeds"])

    def allocation(self, seed: str, arm: str, acc: str) -> dict:
        return self.plan["seeds"][seed]["allocations"][arm][acc]

    def chain(self, seed: str, arm: str, acc: str) -> list[dict]:
        """The phase runs (plan records) of ``arm`` serving ``acc`` for ``seed``, in order."""
        return [r for r in self.plan["seeds"][seed]["runs"] if r["arm"] == arm and acc in r["accountings"]]

    def compute(self, run: Mapping) -> dict:
        return read_json(self.out / run["key"] / "compute.json")

    def results(self, run: Mapping) -> dict | None:
        path = self.out / run["key"] / EVAL_DIR
        return load_results(path) if (path / "results.json").is_file() else None

    def pretraining_flops(self, seed: str, arm: str) -> float:
        """FLOPs of the stage runs ``arm``'s parts come from, each once."""
        stage_flops = self.plan["seeds"][seed]["stage_flops"]
        return float(sum(stage_flops[s] for s in set(self.cfg.arm(arm).parts.values())))

    def chain_cost(self, seed: str, arm: str, acc: str) -> dict[str, float | None]:
        chain = self.chain(seed, arm, acc)
        computes = [self.compute(r) for r in chain]
        fusion = sum(float(c.get("train_flops") or 0.0) for c in computes)
        slots = sum(sum((c.get("tokens_seen") or {}).values()) for c in computes)
        seconds = sum(float(c.get("train_seconds") or 0.0) for c in computes)
        final = self.results(chain[-1]) or {}
        cost = final.get("cost") or {}
        return {
            "params_total": _number(cost.get("params_total")),
            "params_trainable": _number(cost.get("params_trainable")),
            "flops_fusion_stage": fusion,
            "flops_all_in": fusion + self.pretraining_flops(seed, arm),
            "train_tokens_per_s": slots / seconds if seconds else None,
            "decode_tokens_per_s": _number(cost.get("decode_tokens_per_s_cached")),
        }

    def curve(self, seed: str, arm: str, acc: str, metric: str) -> list[tuple[float, float]]:
        """``[(cumulative FLOPs under acc, metric)]`` of the chain's curve evaluations, in order."""
        points: list[tuple[float, float]] = []
        before = self.pretraining_flops(seed, arm) if acc == "all_in" else 0.0
        for run in self.chain(seed, arm, acc):
            for folder in sorted((self.out / run["key"] / CURVE_DIR).glob("step-*")):
                point, res = read_json(folder / POINT_FILE), read_json(folder / "results.json")
                value = _number((res.get("headline") or {}).get(metric))
                if point and value is not None:
                    points.append((before + float(point["train_flops"]), value))
            before += float(self.compute(run).get("train_flops") or 0.0)
        return points


# --------------------------------------------------------------------------- the report


def _ci_cell(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    return fmt_ci(*mean_ci(vals, LEVEL)) if vals else "n/a"


def ordered_arms(cfg: StudyConfig) -> list[str]:
    return [a.name for a in cfg.arms if not a.ablation] + [a.name for a in cfg.arms if a.ablation]


def bootstrap_rows(cfg: StudyConfig, members: Mapping[str, Mapping[str, tuple[str, dict]]]) -> list[dict]:
    """Paired bootstrap of every arm against its reference on each per-sample metric (headline first).
    ``members[arm][seed]`` = ``(run name, results)``; the reference contributes the runs of the seeds
    the arm has (an ablation run on one seed meets the reference's run of that seed); arms without
    results are skipped."""
    metrics = [cfg.eval.metric, "cogent_accuracy", *(f"pope_{s}_accuracy" for s in POPE_SETS)]
    metrics = [m for i, m in enumerate(metrics) if per_sample_metric(m) is not None and m not in metrics[:i]]
    rows = []
    for arm in ordered_arms(cfg):
        ref = cfg.reference_of(cfg.arm(arm))
        if arm == ref or not members.get(arm) or not members.get(ref):
            continue
        mine = list(members[arm].values())
        theirs = [members[ref][seed] for seed in members[arm] if seed in members[ref]]
        if not theirs:
            continue
        for m in metrics:
            a, b = group_sample_scores(theirs, m), group_sample_scores(mine, m)
            if not a or not b:
                continue
            res = paired_group_test(a, b, m, (ref, arm), n_boot=cfg.eval.n_boot, seed=0, level=LEVEL)
            if res["n"]:
                rows.append({"metric": m, "a": ref, "b": arm, "seeds": len(mine), **res})
    return rows


def verdict(cfg: StudyConfig, acc: str, seed_values: Mapping[str, list[float]], boots: Sequence[dict],
            notes: Mapping[str, str]) -> str:
    """A paragraph from the numbers: for each main arm against the baseline on the headline metric,
    the seed means ± CI and whether they overlap, and the paired difference's CI and whether it
    excludes 0. Nothing here is decided in advance; with one seed the seed spread is said unknown."""
    m, base = cfg.eval.metric, cfg.baseline
    lines = []
    n_seeds = len(seed_values.get(base, []))
    for arm in [a.name for a in cfg.arms if not a.ablation and a.name != base and acc in cfg.accountings_of(a)]:
        if arm in notes:
            lines.append(f"**{arm}** was not trained under this accounting ({notes[arm]}): there is nothing to "
                         f"compare with {base} here.")
            continue
        if not seed_values.get(arm) or not seed_values.get(base):
            lines.append(f"**{arm}**: no evaluated runs, no comparison.")
            continue
        (ma, ha), (mb, hb) = mean_ci(seed_values[base], LEVEL), mean_ci(seed_values[arm], LEVEL)
        text = f"**{base} vs {arm}** ({m}): {fmt_ci(ma, ha)} vs {fmt_ci(mb, hb)} over {n_seeds} seed(s)"
        if math.isnan(ha) or math.isnan(hb):
            text += " (one seed: the spread over seeds is unknown)"
        else:
            overlap = (ma - ha) <= (mb + hb) and (mb - hb) <= (ma + ha)
            text += "; the seed intervals " + ("overlap" if overlap else "do not overlap")
        boot = next((b for b in boots if b["metric"] == m and b["a"] == base and b["b"] == arm), None)
        if boot is not None:
            ci = f"[{fmt(boot['ci_low'])}, {fmt(boot['ci_high'])}]"
            text += (f". Paired over {boot['n']} test samples, {base} − {arm} = {fmt(boot['diff'])}, "
                     f"{LEVEL:.0%} CI {ci}, p = {fmt(boot['p_value'])}: ")
            if boot["ci_low"] > 0:
                text += f"the interval excludes 0, {base} is ahead at this scale and budget."
            elif boot["ci_high"] < 0:
                text += f"the interval excludes 0, {arm} is ahead at this scale and budget."
            else:
                text += "the interval includes 0, the difference is within the noise of this test set."
        lines.append(text)
    ablations = []
    for b in boots:
        if b["metric"] != m or not cfg.arm(b["b"]).ablation:
            continue
        side = (f"{b['a']} ahead" if b["ci_low"] > 0 else f"{b['b']} ahead" if b["ci_high"] < 0
                else "the interval includes 0")
        ablations.append(f"{b['b']} vs {b['a']}: {b['a']} − {b['b']} = {fmt(b['diff'])} "
                         f"[{fmt(b['ci_low'])}, {fmt(b['ci_high'])}] ({side}; {b['seeds']} seed(s))")
    if ablations:
        lines.append(f"Ablations ({m}, paired): " + "; ".join(ablations) + ".")
    scope = (f"Scope: {n_seeds} seed(s) of one scale preset (`{Path(cfg.scale).stem}`) on one generated world, one "
             f"budget ({cfg.budget_flops:.3g} FLOPs). The seed interval measures training noise, the paired interval "
             "test-sample noise with the seeds averaged; neither says how the gap moves with scale or budget.")
    return "\n\n".join([*lines, scope])


def plot_curves(curves: Mapping[str, Mapping[str, list[tuple[float, float]]]], path: Path, metric: str,
                title: str) -> Path:
    """``curves[arm][seed]`` = [(cumulative FLOPs, metric)]: the seeds as faint points, their mean
    (point by point, over the seeds that have it) as a line; log FLOPs."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for i, (arm, per_seed) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        n = max((len(p) for p in per_seed.values()), default=0)
        for pts in per_seed.values():
            if pts:
                ax.scatter([x for x, _ in pts], [y for _, y in pts], color=colour, alpha=0.3, s=12)
        mean = []
        for j in range(n):
            at = [pts[j] for pts in per_seed.values() if len(pts) > j]
            mean.append((sum(x for x, _ in at) / len(at), sum(y for _, y in at) / len(at)))
        if mean:
            ax.plot([x for x, _ in mean], [y for _, y in mean], "o-", color=colour, label=arm, markersize=4)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize="medium")
    if curves:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def accounting_section(cfg: StudyConfig, runs: StudyRuns, acc: str) -> list[str]:
    metric = cfg.eval.metric
    md = [f"## Accounting: {acc}", "", f"**{ACCOUNTING_LABELS[acc]}.** Budget {cfg.budget_flops:.4g} FLOPs per arm.", ""]
    quality_rows, cost_rows, notes = [], [], {}
    members: dict[str, dict[str, tuple[str, dict]]] = {}
    seed_values: dict[str, list[float]] = {}
    curves: dict[str, dict[str, list]] = {}
    split_groups = []
    for arm in [a for a in ordered_arms(cfg) if acc in cfg.accountings_of(cfg.arm(a))]:
        label = arm + (" (ablation)" if cfg.arm(arm).ablation else "")
        per_seed_metrics, per_seed_cost = [], []
        for seed in [s for s in runs.seeds() if int(s) in cfg.seeds_of(cfg.arm(arm))]:
            alloc = runs.allocation(seed, arm, acc)
            if not alloc["phases"]:
                notes[arm] = alloc["note"]
                continue
            chain = runs.chain(seed, arm, acc)
            res = runs.results(chain[-1]) if chain else None
            if res is None:
                continue
            members.setdefault(arm, {})[seed] = (f"{arm}/seed{seed}", res)
            per_seed_metrics.append(run_metrics(res))
            per_seed_cost.append(runs.chain_cost(seed, arm, acc))
            curves.setdefault(arm, {})[seed] = runs.curve(seed, arm, acc, metric)
        if arm in notes and not per_seed_metrics:
            quality_rows.append([label, 0, f"not trained: {notes[arm]}", *([""] * (len(QUALITY_COLUMNS) - 1))])
            continue
        results = [r for _, r in members.get(arm, {}).values()]
        if len(results) > 1 and len(group_runs(results)) > 1:
            split_groups.append(arm)
        seed_values[arm] = [v for r in results if (v := _number((r.get("headline") or {}).get(metric))) is not None]
        quality_rows.append([label, len(per_seed_metrics),
                             *(_ci_cell([_number(m[c]) for m in per_seed_metrics]) for c, _ in QUALITY_COLUMNS)])
        cost_rows.append([label, *(_ci_cell([c[k] for c in per_seed_cost]) for k in COST_COLUMNS)])

    md += [f"### Quality (mean ± {LEVEL:.0%} CI over seeds) — {acc}", "",
           markdown_table(["arm", "seeds", *(c for c, _ in QUALITY_COLUMNS)], quality_rows), ""]
    md += [f"### Cost (mean ± {LEVEL:.0%} CI over seeds) — {acc}", "",
           "FLOPs under both accountings for every arm: `flops_fusion_stage` (the arm's multimodal stage(s), frozen "
           "forwards included), `flops_all_in` (plus the pretraining stages its parts come from, each once). This "
           f"table's runs were matched on **{acc}**. `train_tokens_per_s`: slots (padding included) per second "
           "inside training steps, over the arm's phases; `decode_tokens_per_s`: greedy decoding with the KV cache "
           "(eval.py, one prompt, 32 new tokens, best of 3).", "",
           markdown_table(["arm", *COST_COLUMNS], cost_rows), ""]
    boots = bootstrap_rows(cfg, members)
    md += [f"### Paired bootstrap — {acc}", "",
           f"Per-sample scores averaged over each arm's seeds (`seeds`: the seeds of B, and A's runs of the same "
           f"seeds), on the test samples both arms scored (same id and content); {cfg.eval.n_boot} resamples; "
           "diff = A − B, two-sided p for diff = 0.", ""]
    if boots:
        md += [markdown_table(["metric", "A", "B", "seeds", "n", "diff (A − B)", f"{LEVEL:.0%} CI", "p"],
                              [[b["metric"], b["a"], b["b"], b["seeds"], b["n"], b["diff"],
                                f"[{fmt(b['ci_low'])}, {fmt(b['ci_high'])}]", b["p_value"]] for b in boots]), ""]
    else:
        md += ["(no pair of arms with per-sample results)", ""]
    fname = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + f"_vs_flops_{acc}.png"
    if any(pts for per in curves.values() for pts in per.values()):
        plot_curves(curves, runs.out / fname, metric, f"{metric} vs cumulative training FLOPs ({acc})")
        md += [f"### {metric} vs cumulative training FLOPs — {acc}", "",
               f"Curve evaluations (`eval.py {' '.join(cfg.eval.curve_args)}`) at {cfg.eval.curve_points} checkpoint(s) "
               "per phase" + (f" of seed(s) {', '.join(map(str, cfg.eval.curve_seeds))}" if cfg.eval.curve_seeds
                              is not None else "") + "; x = FLOPs spent so far under this accounting"
               + (" (the bolt-on arms start at their pretraining FLOPs)" if acc == "all_in" else "")
               + "; faint points are seeds, lines their means.", "", f"![{metric} vs FLOPs]({fname})", ""]
    md += [f"### Verdict — {acc}", "", verdict(cfg, acc, seed_values, boots, notes), ""]
    if split_groups:
        md += [f"Note: `eval.py compare` puts the seeds of {', '.join(split_groups)} in more than one group (their "
               "saved configs differ in more than seeds and output paths); this report groups them by arm.", ""]
    return md


def allocation_section(cfg: StudyConfig, runs: StudyRuns) -> list[str]:
    rows = []
    for seed in runs.seeds():
        for arm in cfg.arms_in(int(seed)):
            for acc in cfg.accountings_of(arm):
                a = runs.allocation(seed, arm.name, acc)
                steps = ", ".join(f"{p['name']} {p['steps']} × {p['flops_per_step']:.4g}" for p in a["phases"])
                rows.append([seed, arm.name, acc, a["pretraining_flops"], a["fusion_budget"],
                             steps or f"not trained: {a['note']}"])
    return ["## Budget → steps", "",
            f"Each phase's FLOPs per step were measured on {cfg.measure_batches} real training batches "
            "(`module.step_flops`, built as `train.py` builds it); steps = phase budget / FLOPs per step, rounded.", "",
            markdown_table(["seed", "arm", "accounting", "pretraining FLOPs charged", "fusion budget",
                            "phase: steps × FLOPs/step"], rows), ""]


def timing_section(out: Path) -> list[str]:
    """Where the time went: ``timings.jsonl`` (one line per child process) summed by kind."""
    path = out / TIMINGS_FILE
    if not path.is_file():
        return []
    kinds: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        what = rec["what"]
        kind = ("train (stages)" if what.startswith("train ") and "/stages/" in what else
                "train (arms)" if what.startswith("train ") else what.split(" (")[0].split(" seed")[0])
        k = kinds.setdefault(kind, [0, 0.0, 0.0])
        k[0] += 1
        k[1] += float(rec["wall_s"])
        k[2] += float(rec["cpu_s"])
    total = sum(k[1] for k in kinds.values())
    rows = [[kind, int(n), f"{wall / 60:.1f}", f"{cpu / 60:.1f}", f"{wall / total:.0%}" if total else "n/a"]
            for kind, (n, wall, cpu) in kinds.items()]
    return ["## Where the time went", "",
            "Every `train.py` / `eval.py` process of this folder (a resumed study adds its processes; CPU = user + "
            "system seconds of the process and its children, which on a shared machine is closer to what the "
            "work costs than the wall time).", "",
            markdown_table(["kind", "processes", "wall (min)", "CPU (min)", "share of wall"], rows), ""]


def write_study_report(cfg: StudyConfig, out: str | Path) -> Path:
    """Write ``out/report.md`` (and its PNGs) from the study's folder; returns the path."""
    out = Path(out)
    runs = StudyRuns(cfg, out)
    md = [f"# Study: {cfg.name}", "",
          f"Arms: {', '.join(ordered_arms(cfg))}; seeds {', '.join(runs.seeds())}; scale `{Path(cfg.scale).name}`; "
          f"budget {cfg.budget_flops:.4g} FLOPs; baseline {cfg.baseline}. "
          f"All runs side by side: [compare/compare.md](compare/compare.md).", "",
          "Columns: " + "; ".join(f"`{c}` {d}" for c, d in QUALITY_COLUMNS) + ".", ""]
    for acc in cfg.accountings:
        md += accounting_section(cfg, runs, acc)
    md += allocation_section(cfg, runs)
    md += timing_section(out)
    path = out / REPORT_FILE
    path.write_text("\n".join(md))
    return path


__all__ = ["write_study_report", "run_metrics", "family_accuracy", "verdict", "bootstrap_rows"]
