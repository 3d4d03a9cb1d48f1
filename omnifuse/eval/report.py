"""Markdown reports and plots for one run (``write_report``) and for many (``compare_runs``).

The results dict
----------------
One evaluated run is one JSON-able dict. Every section is optional: a section that was not run
is absent and its table is left out of the report (the report lists what is missing). Keys:

``name``        str, the run's label (default in tables: ``run<i>``)
``run_dir``     str, where the checkpoint came from
``fusion``      str, ``"native" | "llava" | "flamingo"`` (else read from the config's ``fusion`` leaf)
``config``      dict, the resolved training config (nested, as saved beside the checkpoints);
                :func:`omnifuse.eval.stats.group_runs` groups runs by it, ignoring seeds and paths
``headline``    ``{metric: float}``, the few numbers that go in the ablation table, in display
                order. Suggested names: ``accuracy`` (exact match over all QA samples; the
                metric the comparison plots use by default), ``cogent_accuracy``,
                ``pope_adversarial_f1``, ``chair_i``, ``chair_s``, ``caption_recall``, ``bleu``,
                ``blind_accuracy``, ``swap_change_rate``, ``perplexity``
``by_qtype``    ``{qtype: {"accuracy": float, "n": int}}`` (``accuracy_by_type(...)["by_type"]``)
``pope``        ``{split: pope_metrics(...)}``, split in ``random | popular | adversarial``
``captions``    ``chair(...)`` merged with ``{"bleu": float}``
``probes``      ``{probe: {metric: float}}``, e.g. ``{"blind": {"accuracy", "n"},
                "swapped": answer_change_rate(...), "shuffled": {"accuracy", "n"}}``
``splits``      ``{split: {"accuracy": float, "n": int}}``, e.g. ``iid`` and ``cogent``
                (compositional: colour×shape pairs unseen in training)
``contrastive`` ``{section: {metric: float} | float}``, e.g. ``{"zero_shot": {template: acc},
                "retrieval": {"R@1": …}, "modality_gap": float}``
``text``        ``{"perplexity": float, "nll": float, "n_tokens": int}``
``cost``        ``{"params_total", "params_trainable", "visual_slots_per_image",
                "train_flops", "train_tokens_per_s", "decode_tokens_per_s"}``; ``params_total``
                and ``train_flops`` are the comparison table's params and FLOPs columns
``compute``     dict, the compute record logged by training (tokens by modality, FLOPs by stage)
``learning_curve`` str, file name (in the report's folder) of the run's loss/accuracy curve PNG
``samples``     ``[{"id": str, "correct": bool | float, "qtype": str, "split": str?}]``, one
                record per scored QA sample; ``id`` must name the same sample in every run
                (e.g. ``"test/000123"``): the paired bootstrap pairs runs by it

:func:`save_results` writes ``results.json`` with the samples moved to ``samples.jsonl``
(one JSON record per line) and :func:`load_results` reads both back. NaN is written as JSON
``NaN`` (Python's json reads it back).

Plots use matplotlib's object API (``Figure`` + ``savefig`` to PNG, i.e. the Agg renderer),
never ``pyplot``, so nothing global is switched and no display is needed.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from omnifuse.eval.stats import group_runs, mean_ci, paired_bootstrap

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.md"
COMPARE_FILE = "compare.md"
POPE_COLUMNS = ["accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unparsed"]
CAPTION_COLUMNS = ["chair_i", "chair_s", "recall", "bleu", "n_mentioned", "n_hallucinated", "n"]


# --------------------------------------------------------------------------- I/O


def save_results(results: Mapping, out_dir: str | Path) -> Path:
    """Write ``results.json`` (without samples) and ``samples.jsonl``; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in results.items() if k != "samples"}
    path = out / RESULTS_FILE
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    if "samples" in results:
        with open(out / SAMPLES_FILE, "w") as f:
            for s in results["samples"]:
                f.write(json.dumps(s) + "\n")
    return path


def load_results(path: str | Path) -> dict:
    """Read a run's results: ``path`` is ``results.json`` or the folder holding it.

    ``samples.jsonl`` beside it, if there, is loaded into ``results["samples"]``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    results = json.loads(path.read_text())
    samples = path.parent / SAMPLES_FILE
    if "samples" not in results and samples.exists():
        results["samples"] = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return results


# --------------------------------------------------------------------------- formatting


def fmt(v: Any) -> str:
    """A table cell: 4 significant digits for floats, ``n/a`` for None/NaN, ints as they are."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v) if abs(v) < 10**7 else f"{v:.3g}"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def fmt_ci(mean: float, half: float) -> str:
    """``mean ± half``; a single run (half = NaN) shows the mean alone."""
    if math.isnan(mean):
        return "n/a"
    return fmt(mean) if math.isnan(half) else f"{fmt(mean)} ± {fmt(half)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells go through :func:`fmt` unless already strings."""
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _matrix_table(rows: Mapping[str, Mapping], row_header: str, columns: Sequence[str] | None = None) -> str:
    """``{row: {column: value}}`` as a table; columns default to the union in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    return markdown_table([row_header, *columns],
                          [[name, *(r.get(c) for c in columns)] for name, r in rows.items()])


def _flatten_scalars(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten_scalars(v, key + "."))
        else:
            out[key] = v
    return out


def _kv_table(d: Mapping, key_header: str = "metric") -> str:
    return markdown_table([key_header, "value"], list(_flatten_scalars(d).items()))


def run_name(results: Mapping, index: int = 0) -> str:
    return str(results.get("name") or f"run{index}")


def run_fusion(results: Mapping) -> str:
    """``results["fusion"]``, else the config leaf named ``fusion``, else ``"?"``."""
    if results.get("fusion"):
        return str(results["fusion"])
    stack = [results.get("config") or {}]
    while stack:
        d = stack.pop()
        for k, v in d.items():
            if k == "fusion" and not isinstance(v, Mapping):
                return str(v)
            if isinstance(v, Mapping):
                stack.append(v)
    return "?"


def headline_metrics(run_results: Sequence[Mapping]) -> list[str]:
    """Union of the runs' headline metric names, in first-seen order."""
    return list(dict.fromkeys(m for r in run_results for m in (r.get("headline") or {})))


def headline_table(run_results: Sequence[Mapping]) -> str:
    """One row per run: name, fusion, params, train FLOPs, then every headline metric."""
    metrics = headline_metrics(run_results)
    rows = []
    for i, r in enumerate(run_results):
        cost, head = r.get("cost") or {}, r.get("headline") or {}
        rows.append([run_name(r, i), run_fusion(r), cost.get("params_total"), cost.get("train_flops"),
                     *(head.get(m) for m in metrics)])
    return markdown_table(["run", "fusion", "params", "train FLOPs", *metrics], rows)


# --------------------------------------------------------------------------- plots


def read_training_log(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), …]}`` from every CSV log version of a run (resumed runs
    continue in a new version); later versions win where steps repeat."""
    import csv

    series: dict[str, dict[int, float]] = {}
    versions = sorted(Path(run_dir, "logs", "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    for v in versions:
        path = v / "metrics.csv"
        if not path.exists():
            continue
        for row in csv.DictReader(open(path)):
            for k, val in row.items():
                if k not in ("step", "epoch") and val not in ("", None):
                    series.setdefault(k, {})[int(row["step"])] = float(val)
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_learning_curve(log: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """Training and validation loss against step (left axis); on the right, the fraction of
    validation documents whose every target token is right (``val/target_seq_acc``: captions and
    prose as well as answers; logs written before the rename call it ``val/answer_acc``)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if log.get(key):
            steps, values = zip(*log[key])
            ax.plot(steps, values, style, label=key, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    seq_acc = log.get("val/target_seq_acc") or log.get("val/answer_acc")
    if seq_acc:
        ax2 = ax.twinx()
        steps, values = zip(*seq_acc)
        ax2.plot(steps, values, "s--", color="tab:green", label="val/target_seq_acc", markersize=4)
        ax2.set_ylabel("validation documents with every target token right")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper center")
    ax.set_title(title)
    return _save(fig, Path(path))


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_qtype_accuracy(by_qtype_per_run: Mapping[str, Mapping[str, Mapping]], path: str | Path,
                        title: str = "accuracy per question type") -> Path:
    """Grouped bars: one group per question type, one bar per run (a single run: plain bars)."""
    qtypes = sorted({q for by in by_qtype_per_run.values() for q in by})
    runs = list(by_qtype_per_run)
    fig = Figure(figsize=(max(5.0, 0.9 * len(qtypes) * max(1, len(runs)) ** 0.5 + 2), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(runs))
    for j, run in enumerate(runs):
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(qtypes))]
        ys = [float((by_qtype_per_run[run].get(q) or {}).get("accuracy", float("nan"))) for q in qtypes]
        ax.bar(xs, ys, width=width, label=run)
    ax.set_xticks(range(len(qtypes)), qtypes, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title)
    if len(runs) > 1:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, Path(path))


def plot_metric_vs_flops(points: Sequence[tuple[str, str, float, float]], path: str | Path,
                         metric: str = "accuracy") -> Path:
    """Scatter of ``(run, group, flops, value)`` with log-scale FLOPs; one colour per group."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    by_group: dict[str, list[tuple[str, float, float]]] = {}
    for run, group, flops, value in points:
        by_group.setdefault(group, []).append((run, flops, value))
    for group, pts in by_group.items():
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], label=group)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs training compute")
    if by_group:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, Path(path))


# --------------------------------------------------------------------------- one run


def write_report(results: Mapping, out_dir: str | Path) -> str:
    """Write ``report.md`` and ``accuracy_by_qtype.png`` for one run; returns the headline table.

    See the module docstring for the results dict; absent sections are listed, not drawn.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = run_name(results)
    headline = headline_table([results])
    md = [f"# Evaluation: {name}", ""]
    md += [f"fusion: `{run_fusion(results)}`" + (f" · run: `{results['run_dir']}`" if results.get("run_dir") else ""), ""]
    md += ["## Headline", "", headline, ""]
    missing = []

    def section(title: str, key: str, body) -> None:
        data = results.get(key)
        if not data:
            missing.append(title)
            return
        md.extend([f"## {title}", "", body(data), ""])

    def qtype_body(by: Mapping) -> str:
        plot_qtype_accuracy({name: by}, out / "accuracy_by_qtype.png", title=f"{name}: accuracy per question type")
        cols = [c for c in ("accuracy", "rank_accuracy", "blind_accuracy", "n") if any(c in v for v in by.values())]
        return (_matrix_table(by, "question type", cols)
                + "\n\n![accuracy per question type](accuracy_by_qtype.png)")

    def splits_body(splits: Mapping) -> str:
        table = _matrix_table(splits, "split", ["accuracy", "n"])
        if "iid" in splits and "cogent" in splits:
            gap = float(splits["cogent"]["accuracy"]) - float(splits["iid"]["accuracy"])
            table += f"\n\ncompositional gap (cogent − iid): {fmt(gap)}"
        return table

    def captions_body(c: Mapping) -> str:
        cols = [k for k in CAPTION_COLUMNS if k in c] + [k for k in c if k not in CAPTION_COLUMNS]
        return markdown_table(cols, [[c[k] for k in cols]])

    def probes_body(p: Mapping) -> str:
        return _matrix_table({k: (v if isinstance(v, Mapping) else {"value": v}) for k, v in p.items()}, "probe")

    section("Accuracy per question type", "by_qtype", qtype_body)
    section("POPE", "pope", lambda p: _matrix_table(p, "split", [c for c in POPE_COLUMNS
                                                                   if any(c in v for v in p.values())]))
    section("Captions (CHAIR, recall, BLEU)", "captions", captions_body)
    section("Grounding probes", "probes", probes_body)
    section("Compositional vs iid", "splits", splits_body)
    section("Contrastive encoders", "contrastive", _kv_table)
    section("Text-only (forgetting guard)", "text", _kv_table)
    section("Learning curve", "learning_curve", lambda name: f"![learning curve]({name})")
    section("Cost", "cost", _kv_table)
    section("Training compute", "compute", _kv_table)
    if missing:
        md += ["## Not run", "", ", ".join(missing), ""]
    (out / REPORT_FILE).write_text("\n".join(md))
    return headline


# --------------------------------------------------------------------------- many runs


def _sample_scores(runs: Sequence[Mapping]) -> dict[str, float]:
    """Per-sample score of a group: mean over its runs, on the ids every run scored."""
    per_run = [{str(s["id"]): float(s["correct"]) for s in (r.get("samples") or [])} for r in runs]
    if not per_run or not all(per_run):
        return {}
    ids = set(per_run[0]).intersection(*per_run[1:])
    return {i: sum(p[i] for p in per_run) / len(per_run) for i in ids}


def compare_runs(run_results: Sequence[Mapping], out_dir: str | Path, metric: str = "accuracy",
                 n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> str:
    """Write ``compare.md`` and plots for several runs; returns the Markdown text.

    Sections: (1) a row per run (name, fusion, params, train FLOPs, every headline metric);
    (2) per group of seeds (:func:`group_runs`): mean ± ``level`` CI half-width (Student t) of
    every headline metric; (3) a paired bootstrap between every pair of groups on the samples
    both scored: each group's per-sample score is the mean correctness over its runs (seeds),
    on the sample ids every run of the group has; groups without ``samples`` are skipped.
    Plots: ``compare_by_qtype.png`` (accuracy per question type, a bar per run) and
    ``{metric}_vs_flops.png`` (headline ``metric`` against ``cost.train_flops``, log x).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = list(run_results)
    names = [run_name(r, i) for i, r in enumerate(runs)]
    if len(set(names)) < len(names):  # table rows and plot legends need unique names
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    metrics = headline_metrics(runs)
    groups = group_runs(runs)
    group_of = {id(r): g for g, members in groups.items() for r in members}

    md = ["# Run comparison", "", f"{len(runs)} runs in {len(groups)} groups (runs differing only in "
          "seed and output paths form a group).", "", "## Runs", ""]
    rows = []
    for name, r in zip(names, runs):
        cost, head = r.get("cost") or {}, r.get("headline") or {}
        rows.append([name, group_of[id(r)], run_fusion(r), cost.get("params_total"), cost.get("train_flops"),
                     *(head.get(m) for m in metrics)])
    md += [markdown_table(["run", "group", "fusion", "params", "train FLOPs", *metrics], rows), ""]

    md += [f"## Groups (mean ± {level:.0%} CI over seeds)", ""]
    grows = []
    for g, members in groups.items():
        cells = []
        for m in metrics:
            vals = [float(v) for r in members
                    if isinstance(v := (r.get("headline") or {}).get(m), (int, float))]
            cells.append(fmt_ci(*mean_ci(vals, level)) if vals else "n/a")
        grows.append([g, len(members), *cells])
    md += [markdown_table(["group", "runs", *metrics], grows), ""]

    md += ["## Paired bootstrap between groups", "",
           f"Per-sample correctness, averaged over each group's seeds, on the samples both groups "
           f"scored; {n_boot} resamples of sample ids, two-sided p for diff = 0 (seed {seed}).", ""]
    scores = {g: _sample_scores(members) for g, members in groups.items()}
    brows, skipped = [], [g for g, s in scores.items() if not s]
    for ga, gb in itertools.combinations([g for g in groups if scores[g]], 2):
        ids = sorted(set(scores[ga]) & set(scores[gb]))
        if not ids:
            brows.append([ga, gb, 0, "n/a", "n/a", "n/a"])
            continue
        res = paired_bootstrap([scores[ga][i] for i in ids], [scores[gb][i] for i in ids],
                               n_boot=n_boot, seed=seed, level=level)
        brows.append([ga, gb, res["n"], res["diff"], f"[{fmt(res['ci_low'])}, {fmt(res['ci_high'])}]",
                      res["p_value"]])
    if brows:
        md += [markdown_table(["A", "B", "samples", "diff (A − B)", f"{level:.0%} CI", "p"], brows), ""]
    else:
        md += ["(fewer than two groups with per-sample results)", ""]
    if skipped:
        md += [f"groups without per-sample results: {', '.join(skipped)}", ""]

    by_qtype = {n: r["by_qtype"] for n, r in zip(names, runs) if r.get("by_qtype")}
    if by_qtype:
        plot_qtype_accuracy(by_qtype, out / "compare_by_qtype.png")
        md += ["## Plots", "", "![accuracy per question type](compare_by_qtype.png)", ""]
    points = [(n, group_of[id(r)], float(r["cost"]["train_flops"]), float(r["headline"][metric]))
              for n, r in zip(names, runs)
              if (r.get("cost") or {}).get("train_flops") and (r.get("headline") or {}).get(metric) is not None]
    if points:
        fname = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + "_vs_flops.png"
        plot_metric_vs_flops(points, out / fname, metric=metric)
        if not by_qtype:
            md += ["## Plots", ""]
        md += [f"![{metric} vs training FLOPs]({fname})", ""]
    text = "\n".join(md)
    (out / COMPARE_FILE).write_text(text)
    return text
