"""Decoding and evaluation speed of every arm: KV-cached vs recomputed greedy decoding, batched vs
one prompt at a time, and the world suite's throughput.

    python bench/decode.py [--world worlds/tiny] [--scales tiny small] [--arms native llava flamingo]
        [--new-tokens 32 256] [--batch 32] [--runs runs/lm runs/tiny-llava runs/tiny-flamingo]
        [--limit 64] [--compile] [--threads 1] [--threads-probe 2] [--json out.json]

**Decode** (per arm and preset; random weights at the preset's decoder size, and its ``encoder:``
size for LLaVA's and Flamingo's frozen encoders; timing does not depend on the weights): the prompt
is the first QA sample of the world's test split in the arm's stream (native: M-RoPE, LLaVA: 1-D,
Flamingo: its LM stream without the patches). Greedy, no stop token, exactly N new tokens:
``cached`` is one prompt with the KV cache (best of ``--repeats``), ``uncached`` the same prompt
recomputed in full for every token (one run: the reference), ``batched`` the first ``--batch`` QA
prompts (different lengths, right-padded) decoded together, counted in new tokens of all rows per
second. ``--compile`` adds the cached single prompt with ``compile_decoding()`` (compile time
excluded, tokens checked against eager).

**Eval** (per trained run of ``--runs``): the world suite (``WorldSuite.run``, POPE and cogent
included, ``--limit`` samples per split, the cost section's decode-speed probe skipped) with
``--batch-size 1`` and with ``--batch``, after a warm-up, alternated ``--eval-repeats`` times (best
kept): samples/s, the seconds inside ``model.generate`` (the generation part) and whether every
answer and headline number is the same.

Threads: ``--threads 1`` on a machine whose cores other jobs use. With torch's default (one
thread per core) every small op waits for a thread that another process holds: decoding the tiny
model was 5x to over 100x slower that way on 2 loaded cores, with the load (``--threads-probe 2``
measures it; docs/PERFORMANCE.md).

On a commit before batched generation (``generate`` without ``lengths``, ``Scorer`` without
``batch_size``, no ``compile_decoding``) those columns read ``None``: the same script gives the
"before" figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnifuse.data.datamodule import build_interleaver  # noqa: E402
from omnifuse.eval.suite import QA_TASKS, Scorer, WorldSuite, load_samples  # noqa: E402
from omnifuse.model.config import DecoderConfig, NativeConfig  # noqa: E402
from omnifuse.model.encoders import EncoderConfig  # noqa: E402
from omnifuse.model.flamingo import Flamingo, FlamingoConfig, ResamplerConfig  # noqa: E402
from omnifuse.model.llava import LLaVAConfig, LLaVAFusion  # noqa: E402
from omnifuse.model.native import NativeFusion  # noqa: E402

ARMS = ("native", "llava", "flamingo")
POSITIONS = {"native": "mrope", "llava": "1d", "flamingo": "mrope"}
PATCH = 8


def preset(scale: str) -> tuple[dict, dict, dict]:
    cfg = yaml.safe_load((ROOT / "configs" / "scale" / f"{scale}.yaml").read_text())
    return cfg["model"]["init_args"]["model"]["decoder"], cfg["encoder"], cfg["data"]


def build(arm: str, scale: str, max_seq_len: int) -> torch.nn.Module:
    """The arm at the preset's sizes, random weights, eval mode."""
    dec, enc, data = preset(scale)
    decoder = DecoderConfig(vocab_size=data["vocab_size"], max_seq_len=max_seq_len, positions=POSITIONS[arm], **dec)
    enc = {k: enc[k] for k in ("dim", "n_layers", "n_heads", "ffn_hidden")}
    encoders = dict(image_encoder=EncoderConfig(patch_dim=3 * PATCH * PATCH, **enc),
                    audio_encoder=EncoderConfig(patch_dim=PATCH * PATCH, **enc))
    torch.manual_seed(0)
    if arm == "native":
        model = NativeFusion(NativeConfig(decoder, patch=PATCH))
    elif arm == "llava":
        model = LLaVAFusion(LLaVAConfig(decoder, patch=PATCH, **encoders))
    else:  # configs/fusion/flamingo.yaml's shape
        model = Flamingo(FlamingoConfig(decoder, patch=PATCH, cross_every=1,
                                        resampler=ResamplerConfig(n_latents=16, n_layers=2, n_heads=4), **encoders))
    return model.eval()


def qa_prompts(world: Path, arm: str, n: int) -> list:
    _, il = build_interleaver(world, PATCH, POSITIONS[arm])
    samples = [s for s in load_samples(world, "test", limit=4 * n + 20) if s.task in QA_TASKS][:n]
    return [il.encode_prompt(s.segments, s.media)[0] for s in samples]


def supports_batches(model) -> bool:
    return "lengths" in inspect.signature(model.generate).parameters


@torch.no_grad()
def generate(model, prompts: list, new_tokens: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    """Seconds and tokens of one greedy generation of ``prompts`` (one prompt: the plain call)."""
    if len(prompts) == 1:
        p = prompts[0]
        args, kw = (p.tokens[None], p.modality[None], p.positions[None], p.image_patches, p.audio_patches), {}
    else:
        from omnifuse.eval.suite import prompt_batch

        b = prompt_batch(prompts)
        args = (b["tokens"], b["modality"], b["positions"], b["image_patches"], b["audio_patches"])
        kw = {"lengths": b["lengths"]}
    t0 = time.perf_counter()
    out = model.generate(*args, max_new_tokens=new_tokens, use_cache=use_cache, **kw)
    return time.perf_counter() - t0, out


def best(model, prompts, new_tokens, use_cache, repeats) -> tuple[float, torch.Tensor]:
    runs = [generate(model, prompts, new_tokens, use_cache) for _ in range(repeats)]
    return min(t for t, _ in runs), runs[0][1]


def decode_rows(args) -> list[dict]:
    rows = []
    longest = max(args.new_tokens)
    for scale in args.scales:
        for arm in args.arms:
            prompts = qa_prompts(args.world, arm, args.batch)
            model = build(arm, scale, max(len(p) for p in prompts) + longest)
            generate(model, prompts[:1], 4, True)  # warm-up
            params = sum(p.numel() for p in model.parameters())
            for n in args.new_tokens:
                cached, ids = best(model, prompts[:1], n, True, args.repeats)
                uncached, ref = best(model, prompts[:1], n, False, 1)
                row = {"arm": arm, "scale": scale, "params": params, "prompt_slots": len(prompts[0]), "new_tokens": n,
                       "cached_tokens_per_s": n / cached, "uncached_tokens_per_s": n / uncached,
                       "cached_over_uncached": uncached / cached, "same_tokens": torch.equal(ids, ref),
                       "batch": None, "batched_tokens_per_s": None, "batched_over_cached": None}
                if supports_batches(model):
                    t, _ = best(model, prompts, n, True, args.repeats)
                    row.update(batch=len(prompts), batched_tokens_per_s=len(prompts) * n / t,
                               batched_over_cached=len(prompts) * n / t / row["cached_tokens_per_s"])
                if args.compile and hasattr(model, "compile_decoding"):
                    model.compile_decoding()
                    generate(model, prompts[:1], n, True)  # compiles (not timed)
                    t, got = best(model, prompts[:1], n, True, args.repeats)
                    model.compile_decoding(False)
                    row.update(compiled_tokens_per_s=n / t, compiled_over_cached=cached / t,
                               compiled_same_tokens=torch.equal(got, ids))
                rows.append(row)
                print(f"  {arm} {scale} {n}: {row['cached_tokens_per_s']:.0f} tok/s cached, "
                      f"{row['cached_over_uncached']:.2f}x uncached", file=sys.stderr, flush=True)
    return rows


def thread_rows(args) -> list[dict]:
    """Cached decoding of the first arm's prompt at the first preset with 1 thread and with
    ``--threads-probe`` threads, alternated (best of ``--repeats`` each)."""
    arm, scale, n = args.arms[0], args.scales[0], min(args.new_tokens)
    prompts = qa_prompts(args.world, arm, 1)
    model = build(arm, scale, len(prompts[0]) + n)
    times = {1: [], args.threads_probe: []}
    before = torch.get_num_threads()
    for _ in range(args.repeats):
        for k in times:
            torch.set_num_threads(k)
            generate(model, prompts, 4, True)  # warm-up at this thread count
            times[k].append(generate(model, prompts, n, True)[0])
    torch.set_num_threads(before)
    return [{"arm": arm, "scale": scale, "new_tokens": n, "threads": k, "cached_tokens_per_s": n / min(t),
             "over_one_thread": min(times[1]) / min(t)} for k, t in times.items()]


def eval_rows(args) -> list[dict]:
    from omnifuse.eval.loading import load_run

    rows = []
    for run_dir in args.runs:
        run = load_run(run_dir)
        world = json.loads((run.world_dir / "world.json").read_text())
        batched = "batch_size" in inspect.signature(Scorer).parameters
        inner = run.model.generate
        spent = [0.0]

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        run.model.generate = timed  # instance attribute: the generation part's seconds
        sizes = (1, args.batch) if batched else (None,)

        def evaluate(bs, limit):
            scorer = Scorer(run.model, run.interleaver, **({"batch_size": bs} if bs else {}))
            suite = WorldSuite(scorer, run.world_dir, limit=limit, progress=False)
            suite.decode_speed = lambda prompt: {}  # the cost probe is not the suite's throughput
            spent[0] = 0.0
            t0 = time.perf_counter()
            res = suite.run(world["vocabulary"])
            return time.perf_counter() - t0, spent[0], res

        for bs in sizes:  # warm-up: first calls of a shape are slow (kernel selection, allocations)
            evaluate(bs, 2)
        timings = {bs: [] for bs in sizes}
        results = {}
        for _ in range(args.eval_repeats):  # alternated, so that machine noise hits both alike
            for bs in sizes:
                seconds, gen, results[bs] = evaluate(bs, args.limit)
                timings[bs].append((seconds, gen))
        for bs in sizes:
            seconds, gen = min(timings[bs])
            n = results[bs]["cost"]["eval_samples"]
            rows.append({"run": Path(run_dir).name, "fusion": run.fusion, "batch_size": bs or 1,
                         "samples": n, "seconds": seconds, "samples_per_s": n / seconds,
                         "generate_seconds": gen, "generate_share": gen / seconds})
            print(f"  {rows[-1]['run']} batch {bs}: {n / seconds:.2f} samples/s", file=sys.stderr, flush=True)
        del run.model.generate
        if batched:
            one, many = results[1], results[args.batch]
            same = (one["samples"] == many["samples"] and one["caption_samples"] == many["caption_samples"]
                    and one["headline"] == many["headline"])
            rows[-1]["over_one_at_a_time"] = rows[-1]["samples_per_s"] / rows[-2]["samples_per_s"]
            rows[-1]["generate_over_one_at_a_time"] = rows[-2]["generate_seconds"] / rows[-1]["generate_seconds"]
            rows[-1]["same_answers"] = rows[-2]["same_answers"] = same
    return rows


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=ROOT / "worlds" / "tiny", help="a generated world (prompts)")
    parser.add_argument("--scales", nargs="+", default=["tiny", "small"], help="presets of configs/scale/")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--batch", type=int, default=32, help="prompts decoded together (decode and eval)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of a cached generation (best kept)")
    parser.add_argument("--compile", action="store_true", help="also time compile_decoding() (compile time excluded)")
    parser.add_argument("--runs", nargs="*", default=None,
                        help="trained runs for the eval part (default: runs/lm runs/tiny-llava runs/tiny-flamingo "
                        "where present; none: skip)")
    parser.add_argument("--limit", type=int, default=64, help="samples per split in the eval part")
    parser.add_argument("--eval-repeats", type=int, default=2, help="timed runs of the suite per batch size, "
                        "alternated (best kept)")
    parser.add_argument("--skip-decode", action="store_true", help="only the eval part")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--threads-probe", type=int, metavar="K",
                        help="also time cached decoding (first arm and preset) with 1 and with K threads, alternated")
    parser.add_argument("--json", type=Path, help="write the rows and the machine here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.runs is None:
        args.runs = [str(p) for p in (ROOT / "runs" / r for r in ("lm", "tiny-llava", "tiny-flamingo")) if p.exists()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    out = {"commit": commit.strip(), "machine": platform.machine(), "processor": platform.processor(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "args": {
               k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if not args.skip_decode:
        out["decode"] = decode_rows(args)
        print("## Decode\n\n" + table(out["decode"]) + "\n")
    if args.threads_probe:
        out["threads_probe"] = thread_rows(args)
        print("## Threads\n\n" + table(out["threads_probe"]) + "\n")
    if args.runs:
        out["eval"] = eval_rows(args)
        print("## Eval (world suite)\n\n" + table(out["eval"]) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
