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
``world``       ``{"hash", "preset", "seed"}``, identity of the world the run was trained on
                (hash of its world.json); runs of different worlds are never grouped as seeds
``world_dir``, ``data_dir``  str, the training world and the folder the samples were read from
``iid_split``   str, the folder evaluated as the iid split (``test`` by default)
``headline``    ``{metric: float}``, the few numbers that go in the ablation table, in display
                order: ``accuracy`` (exact match over the iid QA samples; the default
                ``--metric``), ``blind_rank_accuracy`` / ``accuracy_minus_blind`` /
                ``blind_generated_accuracy``, ``accuracy_rank``, ``cogent_accuracy``,
                ``iid_matched_accuracy`` / ``compositional_gap``, ``pope_<set>_accuracy``,
                ``pope_adversarial_f1``, ``chair_i``, ``chair_s``, ``caption_recall``, ``bleu``,
                ``cogent_chair_i``, ``swap_change_rate``, ``shuffled_accuracy``, ``perplexity``
``by_qtype``    ``{qtype: {"accuracy", "n", "rank_accuracy", "blind_rank_accuracy",
                "blind_generated_accuracy", "accuracy_minus_blind"}}`` (iid split)
``pope``        ``{split: pope_metrics(...)}``, split in ``random | popular | adversarial``
``captions``    iid captions: ``chair(...)`` (``n`` = captions CHAIR scored) merged with ``bleu``,
                ``bleu_n`` (captions BLEU scored, audio included) and ``n_no_scene``;
                ``captions_cogent`` the same for the compositional split
``probes``      ``{probe: {metric: float}}``: ``{"blind": {"rank_accuracy", "generated_accuracy",
                "accuracy_minus_blind", "n"}, "swapped": answer_change_rate(...),
                "shuffled": {"accuracy", "n", "accuracy_unshuffled"}}``
``splits``      ``{split: {"accuracy": float, "n": int}}``, e.g. ``iid`` and ``cogent``
                (compositional: colour×shape pairs unseen in training)
``compositional`` ``suite.compositional_gap(...)``: cogent vs iid on cogent's question types,
                iid weighted as cogent (``gap``, ``weights``, ``unmatched_qtypes``, ``n_iid``, ``n_cogent``)
``unscored``    ``{"n", "reasons": [{"split", "reason", "n", "examples"}]}``: every sample read and
                not scored (unknown task under ``--allow-unknown-tasks``, a task a split does not score)
``suite``       str, ``"world"`` or ``"contrastive"``: which sections the report expects (the
                others are not listed as "not run"); absent means ``world``
``contrastive`` a CLIP/CLAP run (``omnifuse.eval.contrastive``): ``{"modality", "split",
                "zero_shot": {task: {"n", "n_classes", "chance", "majority", "ensemble",
                "ensemble_ci95", "templates": {template: accuracy}, "best_template",
                "worst_template", "class_counts", "classes_without_items", "caption swap":
                {"accuracy", "n", "n_skipped"}}},
                "zero_shot_not_run": {task: reason}, "retrieval": {"media_to_text" |
                "text_to_media": {"R@1", "R@5", "R@10", "n", "gallery"}, "n_pairs",
                "n_distinct_captions", "curve": {"k", "media_to_text", "text_to_media"}},
                "modality_gap": {"trained", "init", "init_seed", "n", "plot"}}``
``text``        ``{"perplexity": float, "nll": float, "n_tokens": int}``
``cost``        ``{"params_total", "params_trainable", "visual_slots_per_image",
                "train_flops", "train_tokens_per_s", "decode_tokens_per_s"}``; ``params_total``
                and ``train_flops`` are the comparison table's params and FLOPs columns
``compute``     dict, the compute record logged by training (tokens by modality, FLOPs by stage)
``learning_curve`` str, file name (in the report's folder) of the run's loss/accuracy curve PNG
``samples``     ``[{"id", "hash", "split", "correct", "qtype", …}]``, one record per scored QA and
                POPE sample (contrastive suite: one per medium, zero-shot task and template,
                ``{"id", "hash", "split", "task", "template", "truth", "prediction", "correct"}``); ``id`` (``"<split>/<key>"``) and ``hash`` (content of the sample) must
                name the same sample in every run compared: the paired bootstrap pairs by id and
                refuses ids whose hashes differ; ``correct`` is the score the metric averages
                (:func:`per_sample_metric` says which records make which headline metric)

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

from omnifuse.eval.gates import gate_section
from omnifuse.eval.stats import group_runs, mean_ci, paired_bootstrap

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.md"
COMPARE_FILE = "compare.md"
POPE_COLUMNS = ["accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unparsed"]
CAPTION_COLUMNS = ["chair_i", "chair_s", "recall", "bleu", "n_mentioned", "n_hallucinated", "n", "bleu_n"]
QTYPE_COLUMNS = ["accuracy", "rank_accuracy", "blind_rank_accuracy", "blind_generated_accuracy", "accuracy_minus_blind", "n"]


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


def plot_learning_curve(log: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, title: str = "",
                        accuracies: Sequence[str] | None = None, accuracy_label: str | None = None) -> Path:
    """Training and validation loss against step (left axis); on the right, the fraction of
    validation documents whose every target token is right (``val/target_seq_acc``: captions and
    prose as well as answers; logs written before the rename call it ``val/answer_acc``), or the
    logged metrics named by ``accuracies`` (values in [0, 1]) under ``accuracy_label``."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if log.get(key):
            steps, values = zip(*log[key])
            ax.plot(steps, values, style, label=key, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    if accuracies is None:
        seq_acc = log.get("val/target_seq_acc") or log.get("val/answer_acc")
        right = {"val/target_seq_acc": seq_acc} if seq_acc else {}
        accuracy_label = "validation documents with every target token right"
    else:
        right = {k: log[k] for k in accuracies if log.get(k)}
    if right:
        ax2 = ax.twinx()
        for (key, series), color in zip(right.items(), ("tab:green", "tab:purple", "tab:brown", "tab:olive")):
            steps, values = zip(*series)
            ax2.plot(steps, values, "s--", color=color, label=key, markersize=4)
        ax2.set_ylabel(accuracy_label or "accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right" if accuracies is None else "center right")
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


def plot_zero_shot_templates(zero_shot: Mapping[str, Mapping], path: str | Path, title: str = "") -> Path:
    """One panel per zero-shot task: a horizontal bar per prompt template and one for the ensemble
    (black), the caption-swap diagnostic in grey when present, with the chance rate (dashed) and the
    majority-class rate (dotted)."""
    tasks = list(zero_shot)
    cols = min(3, max(1, len(tasks)))
    rows = math.ceil(len(tasks) / cols)
    height = max(len(r["templates"]) for r in zero_shot.values()) * 0.28 + 1.2
    fig = Figure(figsize=(4.6 * cols, height * rows))
    for i, task in enumerate(tasks):
        r = zero_shot[task]
        ax = fig.add_subplot(rows, cols, i + 1)
        labels = [repr(t) for t in r["templates"]] + ["ensemble"]
        values = [float(v) for v in r["templates"].values()] + [float(r["ensemble"])]
        colors = ["tab:blue"] * (len(labels) - 1) + ["black"]
        if r.get("caption swap"):  # the diagnostic, drawn apart
            labels.append("(caption swap)")
            values.append(float(r["caption swap"]["accuracy"]))
            colors.append("tab:gray")
        ys = list(range(len(labels)))[::-1]
        ax.barh(ys, values, color=colors)
        ax.set_yticks(ys, labels, fontsize="small")
        ax.axvline(float(r["chance"]), color="tab:red", linestyle="--", label="chance 1/C")
        ax.axvline(float(r["majority"]), color="tab:orange", linestyle=":", label="majority class")
        ax.set_xlim(0, 1)
        ax.set_title(f"{task} (n={r['n']}, {r['n_classes']} classes)", fontsize="medium")
        ax.set_xlabel("zero-shot accuracy")
        if i == 0:
            ax.legend(fontsize="x-small", loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_retrieval_curve(retrieval: Mapping, path: str | Path, title: str = "") -> Path:
    """R@k against k (log scale) for media -> text and text -> media, k = 1, 5, 10 marked."""
    curve = retrieval["curve"]
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    for key, label in (("media_to_text", "media → text"), ("text_to_media", "text → media")):
        ax.plot(curve["k"], curve[key], "-", label=f"{label} (n={retrieval[key]['n']}, gallery {retrieval[key]['gallery']})")
        marked = [(k, v) for k, v in zip(curve["k"], curve[key]) if k in (1, 5, 10)]
        if marked:
            ax.plot(*zip(*marked), "o", color=ax.lines[-1].get_color(), markersize=4)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel("R@k (a correct item in the top k)")
    ax.set_title(title or "retrieval")
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, Path(path))


def contrastive_section(c: Mapping, out: Path, name: str) -> str:
    """Markdown of a contrastive run's results (``results["contrastive"]``); draws
    ``zero_shot_templates.png`` and ``retrieval_recall.png`` into ``out``."""
    medium = {"image": "image", "audio": "clip"}.get(c.get("modality"), "medium")
    parts: list[str] = []
    zs = c.get("zero_shot") or {}
    if zs:
        rows = []
        for task, r in zs.items():
            lo, hi = r.get("ensemble_ci95", (float("nan"), float("nan")))
            best, worst = r["best_template"], r["worst_template"]
            swap = r.get("caption swap") or {}
            probe = r.get("linear_probe") or {}
            rows.append([task, r["n"], r["n_classes"], r["chance"], r["majority"],
                         f"{fmt(r['ensemble'])} [{fmt(lo)}, {fmt(hi)}]",
                         f"{fmt(r['templates'][best])} `{best}`", f"{fmt(r['templates'][worst])} `{worst}`",
                         f"{fmt(swap['accuracy'])} (n={swap['n']})" if swap else "n/a",
                         f"{fmt(probe['accuracy'])} (fit on {probe['n_train']})" if probe else "n/a"])
        sweep = [[task, f"`{t}`", acc] for task, r in zs.items()
                 for t, acc in [*r["templates"].items(), ("ensemble", r["ensemble"])]]
        plot_zero_shot_templates(zs, out / "zero_shot_templates.png", title=f"{name}: zero-shot accuracy per template")
        parts += ["### Zero-shot classification", "",
                  "Per class, every template's prompt is embedded and L2-normalised, the embeddings averaged and "
                  "normalised again (the ensemble); a single template's classifier is its normalised prompt. "
                  "Prediction: the class of largest cosine. `chance` = 1/classes; `majority` = the share of the most "
                  "frequent true class; the ensemble's interval is a 95% Wilson interval. `caption swap` is a "
                  "diagnostic, not zero-shot: each item's own caption against the same caption with the class word "
                  "swapped for every other class (the rest of the caption right), so a task at chance with a high "
                  "caption swap is one the encoder sees but context-free prompts do not reach. `linear probe`: "
                  "logistic regression on the frozen media embeddings, fitted on the training split's media "
                  "(CLIP's linear-probe evaluation): whether the embedding holds the class at all.", "",
                  markdown_table(["task", "n", "classes", "chance", "majority", "ensemble [95% CI]", "best template",
                                  "worst template", "caption swap", "linear probe"], rows), "",
                  "Template sweep:", "", markdown_table(["task", "template", "accuracy"], sweep), "",
                  "![zero-shot accuracy per template](zero_shot_templates.png)", ""]
        absent = {task: r["classes_without_items"] for task, r in zs.items() if r.get("classes_without_items")}
        if absent:
            parts += ["Classes no item of the split shows (in the classifier, never a true class): "
                      + "; ".join(f"{task}: {', '.join(cls)}" for task, cls in absent.items()), ""]
    if c.get("zero_shot_not_run"):
        parts += ["Zero-shot tasks not run: " + "; ".join(f"{t} ({why})" for t, why in c["zero_shot_not_run"].items()), ""]
    ret = c.get("retrieval")
    if ret:
        ks = [k for k in ret["media_to_text"] if k.startswith("R@")]
        rows = [[label, ret[key]["n"], ret[key]["gallery"], *(ret[key][k] for k in ks)]
                for key, label in (("media_to_text", f"{medium} → text"), ("text_to_media", f"text → {medium}"))]
        plot_retrieval_curve(ret, out / "retrieval_recall.png", title=f"{name}: retrieval")
        parts += ["### Retrieval", "",
                  f"{ret['n_pairs']} ({medium}, caption) pairs, {ret['n_distinct_captions']} distinct captions. "
                  f"{medium} → text: the gallery holds each distinct caption once, the hit is the query's caption. "
                  f"text → {medium}: a query per pair, the gallery every {medium}; any {medium} whose caption is "
                  "identical to the query counts as correct. Ties with a wrong item count against the query.", "",
                  markdown_table(["direction", "queries", "gallery", *ks], rows), "",
                  "![retrieval R@k](retrieval_recall.png)", ""]
    gap = c.get("modality_gap")
    if gap:
        rows = [["trained", gap["trained"], gap["n"]]]
        if "init" in gap:
            rows.append([f"init (seed {gap.get('init_seed')})", gap["init"], gap["n"]])
        parts += ["### Modality gap", "",
                  f"Distance between the centroids of the L2-normalised {medium} and caption embeddings "
                  "(Liang et al. 2022), one caption per pair.", "",
                  markdown_table(["model", "gap", "n"], rows), ""]
        if gap.get("plot"):
            parts += [f"![modality gap]({gap['plot']})", ""]
    return "\n".join(parts).rstrip()


# --------------------------------------------------------------------------- one run


def write_report(results: Mapping, out_dir: str | Path) -> str:
    """Write ``report.md`` and its plots for one run; returns the headline table.

    See the module docstring for the results dict; ``results["suite"]`` says which sections are
    expected, and expected sections that are absent are listed, not drawn.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = run_name(results)
    headline = headline_table([results])
    md = [f"# Evaluation: {name}", ""]
    md += [f"fusion: `{run_fusion(results)}`" + (f" · run: `{results['run_dir']}`" if results.get("run_dir") else ""), ""]
    md += ["## Headline", "", headline, ""]
    missing = []
    suite = str(results.get("suite") or "world")

    def section(title: str, key: str, body, suites: Sequence[str] = ("world",)) -> None:
        if suite not in suites:
            return
        data = results.get(key)
        if not data:
            missing.append(title)
            return
        md.extend([f"## {title}", "", body(data), ""])

    def qtype_body(by: Mapping) -> str:
        plot_qtype_accuracy({name: by}, out / "accuracy_by_qtype.png", title=f"{name}: accuracy per question type")
        cols = [c for c in QTYPE_COLUMNS if any(c in v for v in by.values())]
        return (_matrix_table(by, "question type", cols)
                + "\n\nblind: the media removed; `blind_rank_accuracy` ranks the question's candidates by likelihood "
                "(the language prior), `blind_generated_accuracy` generates freely (it also measures whether the model "
                "keeps the answer format without media); `accuracy_minus_blind` = accuracy − blind_rank_accuracy."
                + "\n\n![accuracy per question type](accuracy_by_qtype.png)")

    def splits_body(splits: Mapping) -> str:
        table = _matrix_table(splits, "split", ["accuracy", "n"])
        comp = results.get("compositional")
        if comp:
            weights = ", ".join(f"{q} {w:.2f}" for q, w in comp["weights"].items())
            table += (f"\n\ncompositional gap (cogent − iid on cogent's question types, weighted as in cogent): "
                      f"{fmt(comp['gap'])} (cogent {fmt(comp['cogent_accuracy'])} on {comp['n_cogent']} questions vs "
                      f"iid {fmt(comp['iid_matched_accuracy'])} on {comp['n_iid']}; weights: {weights})")
            if comp.get("unmatched_qtypes"):
                table += f"; cogent types absent from iid, left out: {', '.join(comp['unmatched_qtypes'])}"
        if "iid" in splits and "cogent" in splits:
            gap = float(splits["cogent"]["accuracy"]) - float(splits["iid"]["accuracy"])
            table += (f"\n\nunmatched difference (cogent − iid over all of iid's question types, a different task "
                      f"mix): {fmt(gap)}")
        return table

    def captions_body(_: Mapping) -> str:
        rows = {split: results[key] for split, key in (("iid", "captions"), ("cogent", "captions_cogent"))
                if results.get(key)}
        cols = [k for k in CAPTION_COLUMNS if any(k in c for c in rows.values())]
        cols += list(dict.fromkeys(k for c in rows.values() for k in c if k not in cols))
        return (_matrix_table(rows, "split", cols)
                + "\n\n`n`: image captions CHAIR scored (those with a scene graph); `bleu_n`: captions BLEU scored "
                "(image and audio).")

    def probes_body(p: Mapping) -> str:
        return _matrix_table({k: (v if isinstance(v, Mapping) else {"value": v}) for k, v in p.items()}, "probe")

    def unscored_body(u: Mapping) -> str:
        if not u.get("n"):
            return "none: every sample read was scored"
        rows = [[r["split"], r["reason"], r["n"], ", ".join(r["examples"])] for r in u["reasons"]]
        return f"{u['n']} samples read and not scored:\n\n" + markdown_table(["split", "reason", "n", "examples"], rows)

    section("Accuracy per question type", "by_qtype", qtype_body)
    section("POPE", "pope", lambda p: _matrix_table(p, "split", [c for c in POPE_COLUMNS
                                                                   if any(c in v for v in p.values())]))
    section("Captions (CHAIR, recall, BLEU)", "captions", captions_body)
    section("Grounding probes", "probes", probes_body)
    section("Compositional vs iid", "splits", splits_body)
    section("Contrastive encoders", "contrastive", lambda c: contrastive_section(c, out, name), ("contrastive",))
    section("Text-only (forgetting guard)", "text", _kv_table)
    everywhere = ("world", "contrastive")
    section("Learning curve", "learning_curve", lambda name: f"![learning curve]({name})", everywhere)
    if results.get("gates"):  # gated arms only (omnifuse.eval.gates)
        md.extend(gate_section(results["gates"]))
    section("Cost", "cost", _kv_table, everywhere)
    section("Training compute", "compute", _kv_table, everywhere)
    if "unscored" in results:
        md.extend(["## Samples not scored", "", unscored_body(results["unscored"]), ""])
    if missing:
        md += ["## Not run", "", ", ".join(missing), ""]
    (out / REPORT_FILE).write_text("\n".join(md))
    return headline


# --------------------------------------------------------------------------- many runs


def per_sample_metric(metric: str, iid_split: str = "test") -> tuple[str, str] | None:
    """``(split, field)`` of the sample records whose mean is headline ``metric``, or None when the
    metric is not a mean over per-sample scores (F1, CHAIR, perplexity…).

    ``accuracy`` / ``accuracy_rank``: the iid split's QA records, ``correct`` / ``correct_rank``;
    ``cogent_accuracy``: the cogent split's; ``pope_<set>_accuracy``: the ``pope-<set>`` split's.
    """
    if metric in ("accuracy", "accuracy_rank"):
        return iid_split, "correct" if metric == "accuracy" else "correct_rank"
    if metric == "cogent_accuracy":
        return "cogent", "correct"
    m = re.fullmatch(r"pope_(\w+)_accuracy", metric)
    return (f"pope-{m.group(1)}", "correct") if m else None


def _run_scores(run: Mapping, metric: str) -> dict[str, tuple[str | None, float]]:
    """``{sample id: (content hash, score)}`` of one run for ``metric`` ({} if it has none)."""
    where = per_sample_metric(metric, str(run.get("iid_split") or "test"))
    if where is None:
        return {}
    split, field = where
    return {str(s["id"]): (s.get("hash"), float(s[field])) for s in (run.get("samples") or [])
            if s.get("split") == split and field in s}


def _same_sample(metric: str, sample_id: str, hashes: Mapping[str, str | None]) -> str:
    """The one content hash ``hashes`` (owner name -> hash) agree on, else a ValueError."""
    if None in hashes.values():
        missing = [k for k, h in hashes.items() if h is None]
        raise ValueError(f"{metric}: sample {sample_id!r} of {', '.join(missing)} has no content hash, so pairing "
                         "cannot check it is the same sample: evaluate those runs again with this eval.py")
    if len(set(hashes.values())) > 1:
        raise ValueError(
            f"{metric}: sample {sample_id!r} has different content in "
            + ", ".join(f"{k} (hash {h})" for k, h in hashes.items())
            + ": those runs were evaluated on different samples under the same ids (another world, or other --data)."
            " Paired tests need runs evaluated on the same samples."
        )
    return next(iter(hashes.values()))


def group_sample_scores(members: Sequence[tuple[str, Mapping]], metric: str) -> dict[str, tuple[str, float]]:
    """Per-sample score of a group of seeds for ``metric``: the mean over its runs, on the sample
    ids every run scored, each checked to be the same sample in every run (id and content hash).
    ``members`` are ``(run name, results)``; {} when some run has no per-sample scores."""
    per_run = [(name, _run_scores(r, metric)) for name, r in members]
    if not per_run or not all(scores for _, scores in per_run):
        return {}
    ids = set(per_run[0][1]).intersection(*(set(scores) for _, scores in per_run[1:]))
    return {i: (_same_sample(metric, i, {name: scores[i][0] for name, scores in per_run}),
                sum(scores[i][1] for _, scores in per_run) / len(per_run))
            for i in sorted(ids)}


def paired_group_test(a: Mapping[str, tuple[str, float]], b: Mapping[str, tuple[str, float]], metric: str,
                      names: tuple[str, str], **boot) -> dict:
    """:func:`paired_bootstrap` of two groups' per-sample scores on the ids both have, after
    checking that each id names the same sample in both (content hash)."""
    ids = sorted(set(a) & set(b))
    for i in ids:
        _same_sample(metric, i, {names[0]: a[i][0], names[1]: b[i][0]})
    return paired_bootstrap([a[i][1] for i in ids], [b[i][1] for i in ids], **boot)


def compare_runs(run_results: Sequence[Mapping], out_dir: str | Path, metric: str = "accuracy",
                 n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> str:
    """Write ``compare.md`` and plots for several runs; returns the Markdown text.

    Sections: (1) a row per run (name, fusion, params, train FLOPs, every headline metric);
    (2) per group of seeds (:func:`group_runs`: same config but seeds and paths, same world):
    mean ± ``level`` CI half-width (Student t) of every headline metric; (3) paired bootstraps
    between every pair of groups, **one per headline metric that is a mean of per-sample scores**
    (:func:`per_sample_metric`: iid accuracy, cogent accuracy, POPE accuracy per set), each on that
    metric's own samples and labelled with the metric and its n. ``metric`` (``--metric``) is the
    headline one: stated first, and drawn against FLOPs. A group's per-sample score is the mean
    over its seeds on the ids every run scored; pairing checks that an id names the same sample in
    every run (content hash), else ValueError. Groups without ``samples`` are skipped.
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
    if metric not in metrics:
        raise ValueError(f"--metric {metric!r} is not a headline metric of these runs; they have: {', '.join(metrics)}")
    groups = group_runs(runs)
    group_of = {id(r): g for g, members in groups.items() for r in members}
    name_of = {id(r): n for n, r in zip(names, runs)}

    md = ["# Run comparison", "", f"{len(runs)} runs in {len(groups)} groups (runs differing only in "
          "seed and output paths, trained on the same world, form a group).", "", "## Runs", ""]
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
           f"One test per metric, on that metric's own samples: per-sample scores averaged over each group's "
           f"seeds, on the samples both groups scored (same id and content); {n_boot} resamples, two-sided p "
           f"for diff = 0 (seed {seed}).", ""]
    boot_metrics = [metric] * (per_sample_metric(metric) is not None)
    boot_metrics += [m for m in metrics if m != metric and per_sample_metric(m) is not None]
    brows, headline_lines, skipped = [], [], set()
    for m in boot_metrics:
        scores = {g: group_sample_scores([(name_of[id(r)], r) for r in members], m) for g, members in groups.items()}
        skipped |= {g for g, sc in scores.items() if not sc}
        for ga, gb in itertools.combinations([g for g in groups if scores[g]], 2):
            res = paired_group_test(scores[ga], scores[gb], m, (ga, gb), n_boot=n_boot, seed=seed, level=level)
            ci = f"[{fmt(res['ci_low'])}, {fmt(res['ci_high'])}]"
            brows.append([m, ga, gb, res["n"], res["diff"], ci, res["p_value"]])
            if m == metric:
                headline_lines.append(f"- **{m}** (n = {res['n']}): {ga} − {gb} = {fmt(res['diff'])}, "
                                      f"{level:.0%} CI {ci}, p = {fmt(res['p_value'])}")
    if per_sample_metric(metric) is None:
        md += [f"Headline metric `{metric}` is not a mean of per-sample scores: no paired test for it "
               f"(per-sample metrics here: {', '.join(boot_metrics) or 'none'}).", ""]
    elif headline_lines:
        md += ["Headline metric (`--metric`):", "", *headline_lines, ""]
    if brows:
        md += [markdown_table(["metric", "A", "B", "n", "diff (A − B)", f"{level:.0%} CI", "p"], brows), ""]
    else:
        md += ["(fewer than two groups with per-sample results)", ""]
    if skipped:
        md += [f"groups without per-sample results for some metric: {', '.join(g for g in groups if g in skipped)}", ""]

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
