"""``eval.py``: run the benchmark suite on a trained run, or compare evaluated runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from omnifuse.eval.gates import gate_results
from omnifuse.eval.report import (
    RESULTS_FILE, compare_runs, load_results, plot_learning_curve, read_training_log, save_results, write_report,
)

EVAL_DIR = "eval"


SUITES = ("world", "contrastive")


def evaluate(run_dir: str, *, suite: str = "world", split: str = "test", limit: int | None = None,
             out: str | None = None, data: str | None = None, checkpoint: str | None = None,
             pope: bool = True, cogent: bool = True, progress: bool = True, seed: int = 0,
             allow_unknown_tasks: bool = False, batch_size: int = 32, probe_limit: int = 8000) -> dict:
    """Evaluate one run; writes results.json, samples.jsonl, report.md and plots (the world suite
    also captions.jsonl).

    ``suite``: ``world`` (a fusion arm or the text LM: QA, captions, POPE, probes) or
    ``contrastive`` (a CLIP/CLAP stage run: zero-shot per template, retrieval, modality gap;
    :mod:`omnifuse.eval.contrastive`). A run the suite cannot evaluate is an error naming the run.
    ``results["world"]`` is the identity of the world the run was *trained* on (a hash of its
    world.json, with preset and seed): ``compare`` groups only runs of one world as seeds.
    ``batch_size``: prompts the world suite decodes together (the answers do not depend on it).
    ``probe_limit``: training samples the contrastive suite's linear probes are fitted on.
    """
    from omnifuse.eval.loading import load_run, world_identity
    from omnifuse.training.compute import param_counts

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; available: {', '.join(SUITES)}")
    torch.manual_seed(seed)
    run = load_run(run_dir, checkpoint)
    world = json.loads((run.world_dir / "world.json").read_text()) if (run.world_dir / "world.json").exists() else {}
    vocab = world.get("vocabulary", {})
    data_dir = Path(data) if data else run.world_dir
    out_dir = Path(out or Path(run_dir) / EVAL_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    captions: list[dict] | None = None
    if suite == "contrastive":
        from omnifuse.eval.contrastive import evaluate_run

        results = evaluate_run(run, data_dir, vocab, split=split, limit=limit, progress=progress, out_dir=out_dir,
                               probe_limit=probe_limit)
    else:
        from omnifuse.eval.suite import Scorer, WorldSuite
        from omnifuse.model.encoders import ContrastiveModel

        if isinstance(run.model, ContrastiveModel):
            raise ValueError(f"run {run_dir} is a contrastive stage run ({run.fusion}, {run.model.cfg.modality}): it "
                             "has no decoder to answer questions; evaluate it with --suite contrastive")
        if not vocab.get("shapes") or not vocab.get("colors"):
            raise ValueError(f"{run.world_dir}/world.json has no vocabulary.shapes/colors: CHAIR needs them")
        scorer = Scorer(run.model, run.interleaver, batch_size=batch_size)
        results = WorldSuite(scorer, data_dir, split=split, limit=limit, seed=seed, progress=progress,
                             allow_unknown_tasks=allow_unknown_tasks).run(vocab, pope=pope, cogent=cogent)
        results["suite"] = "world"
        captions = results.pop("caption_samples", [])
    results["name"] = Path(run_dir).name
    results["run_dir"] = str(run_dir)
    results["world_dir"] = str(run.world_dir)
    results["world"] = world_identity(run.world_dir)
    results["data_dir"] = str(Path(data).absolute()) if data else str(run.world_dir)
    results["fusion"] = run.fusion
    results["config"] = run.config
    results["compute"] = run.compute
    results["cost"].update(param_counts(run.model))
    results["cost"]["train_flops"] = run.compute.get("train_flops")
    results["checkpoint"] = str(run.checkpoint)
    log = read_training_log(run_dir)
    if log.get("train/loss"):
        curve_args = {}
        if suite == "contrastive":
            from omnifuse.eval.contrastive import CURVE_ACCURACIES, CURVE_ACCURACY_LABEL

            curve_args = {"accuracies": CURVE_ACCURACIES, "accuracy_label": CURVE_ACCURACY_LABEL}
        plot_learning_curve(log, out_dir / "learning_curve.png", title=f"{results['name']}: training", **curve_args)
        results["learning_curve"] = "learning_curve.png"
    results.update(gate_results(log, out_dir, title=f"{results['name']}: gate values"))  # gated arms only
    save_results(results, out_dir)
    if captions is not None:
        with open(out_dir / "captions.jsonl", "w") as f:
            for rec in captions:
                f.write(json.dumps(rec) + "\n")
    results["headline_table"] = write_report(results, out_dir)
    return results


def results_of(path: str) -> dict:
    p = Path(path)
    for candidate in (p / RESULTS_FILE, p / EVAL_DIR / RESULTS_FILE, p):
        if candidate.is_file():
            return load_results(candidate)
    raise FileNotFoundError(f"no {RESULTS_FILE} in {p} or {p / EVAL_DIR}: run `python eval.py --ckpt {p}` first")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        parser = argparse.ArgumentParser(
            prog="eval.py compare",
            description="Put evaluated runs side by side: a row per run, mean ± 95%% CI per group of seeds, "
            "and paired bootstrap p-values between groups on the same samples.",
        )
        parser.add_argument("runs", nargs="+", help="run directories (or their eval folders / results.json files)")
        parser.add_argument("--out", required=True, help="folder for compare.md and the plots")
        parser.add_argument("--metric", default="accuracy", help="headline metric of the bootstrap and the FLOPs plot")
        parser.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples")
        args = parser.parse_args(argv[1:])
        md = compare_runs([results_of(r) for r in args.runs], args.out, metric=args.metric, n_boot=args.n_boot)
        print(md)
        return
    parser = argparse.ArgumentParser(
        prog="eval.py",
        description="Run a benchmark suite on a run made by train.py and write results.json, samples.jsonl, "
        "report.md and plots. `eval.py compare RUN RUN ... --out DIR` compares evaluated runs.",
    )
    parser.add_argument("--ckpt", required=True, help="run directory written by `train.py fit` (uses checkpoints/last.ckpt)")
    parser.add_argument("--checkpoint", help="a specific .ckpt file inside the run (default: last.ckpt)")
    parser.add_argument("--suite", default="world", choices=list(SUITES),
                        help="benchmark suite: world (a fusion arm or the text LM: QA, captions, POPE, probes) or "
                        "contrastive (a CLIP/CLAP stage run: zero-shot accuracy per prompt template, retrieval R@1/5/10 "
                        "both ways, modality gap trained vs init)")
    parser.add_argument("--split", default="test", help="iid split of the world to evaluate (default: test)")
    parser.add_argument("--data", metavar="DIR", help="evaluate on these shards instead of the run's world. DIR is laid "
                        "out like a world: DIR/<split>/*.tar for the --split folder (required), and optionally "
                        "DIR/cogent/ and DIR/pope-{random,popular,adversarial}/ (skipped, and listed as not run, when "
                        "absent). Samples follow the project's schema (ARCHITECTURE 'World on disk'); the folder name "
                        "is the split, and a sample's meta.split, when present, must agree with it. The run's own "
                        "tokenizer and world vocabulary are used")
    parser.add_argument("--limit", type=int, help="at most N samples read per split (quick looks)")
    parser.add_argument("--out", help="output folder (default: RUN/eval)")
    parser.add_argument("--no-pope", action="store_true", help="skip the three POPE splits")
    parser.add_argument("--no-cogent", action="store_true", help="skip the compositional split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled-patch probe")
    parser.add_argument("--allow-unknown-tasks", action="store_true", help="count samples whose task the suite does "
                        "not know as unscored (results.json 'unscored', report.md) instead of stopping with an error")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts the world suite generates answers for "
                        "together, right-padded (default 32; 1 = one at a time; a row's answer does not depend on it)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core). On "
                        "cores other jobs are using, 1 can be many times faster: every small op of a decode step "
                        "otherwise waits for a thread another process holds (docs/PERFORMANCE.md)")
    parser.add_argument("--probe-limit", type=int, default=8000,
                        help="contrastive suite: the linear probes are fitted on the media of the first N samples of "
                             "the evaluated world's train split (default: 8000, the tiny world's whole split)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = evaluate(
        args.ckpt, suite=args.suite, split=args.split, limit=args.limit, out=args.out, data=args.data,
        checkpoint=args.checkpoint, pope=not args.no_pope, cogent=not args.no_cogent, progress=not args.quiet,
        seed=args.seed, allow_unknown_tasks=args.allow_unknown_tasks, batch_size=args.batch_size,
        probe_limit=args.probe_limit,
    )
    out = args.out or str(Path(args.ckpt) / EVAL_DIR)
    print(f"\nwrote {out}/report.md, results.json, samples.jsonl\n")
    print(results["headline_table"])
