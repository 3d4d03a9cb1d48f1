"""Data-path benchmark: world generation speed, loader throughput, packing efficiency.

    python bench/data.py [--presets tiny small] [--batches 40] [--json out.json]
    python bench/data.py --cache-passes 3 --world worlds/tiny [--json out.json]

For each preset it generates a fresh world into a temporary folder (timed), trains its tokenizer,
then streams the training split through the real loader (decode, tokenize, pack) in one process
(per-worker figures) and reports the packing efficiency: the share of slots that are not padding.

``--cache-passes N`` instead streams an existing world's training split N times through one reader,
with the document cache off (``data.cache_mb 0``: every pass reads, decodes and tokenizes) and on
(the default: later passes replay the tokenized documents), alternating, and prints the loader's
microseconds per sample of each pass side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnifuse.data.datamodule import Tokenize, build_interleaver, shards_of  # noqa: E402
from omnifuse.data.stream import PackedShardStream  # noqa: E402
from omnifuse.data.world import generate_world  # noqa: E402
from omnifuse.tokenizers.text import iter_world_texts, train_tokenizer  # noqa: E402


def bench_preset(preset: str, batches: int, row_len: int, batch_size: int, root: Path) -> dict:
    world = root / preset
    t0 = time.perf_counter()
    info = generate_world(world, preset=preset, seed=0, progress=False)
    gen_s = time.perf_counter() - t0
    n_samples = sum(info["summary"]["samples"].values())
    train_tokenizer(iter_world_texts(world, "train"), 512, world / "tokenizer.model")
    _, il = build_interleaver(world, 8, "mrope")
    stream = PackedShardStream(shards_of(world, "train"), Tokenize(il), row_len, repeat=True,
                               shuffle_buffer=256, batch_size=batch_size)
    it = iter(stream)
    next(it)  # warm-up: first shard open, buffers fill
    docs = slots = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        docs += int(sum(int(r.max()) + 1 for r in b["doc_ids"]))
        slots += int((b["doc_ids"] >= 0).sum())
    load_s = time.perf_counter() - t0
    return {
        "preset": preset,
        "samples": n_samples,
        "gen_seconds": gen_s,
        "gen_samples_per_s": n_samples / gen_s,
        "loader_samples_per_s_per_worker": docs / load_s,
        "loader_slots_per_s_per_worker": slots / load_s,
        "packing_efficiency": stream.packer.efficiency,
        "row_len": row_len,
    }


def bench_cache(world: Path, passes: int, row_len: int, batch_size: int, rounds: int = 2) -> list[dict]:
    """Per pass: µs per sample of one reader with the document cache off and on (rows included)."""
    _, il = build_interleaver(world, 8, "mrope")
    shards = shards_of(world, "train")
    per_pass = sum(1 for _ in PackedShardStream(shards, Tokenize(il), row_len, repeat=False, shuffle_buffer=0)._docs())
    times: dict[str, list[list[float]]] = {"off": [], "on": []}
    for _ in range(rounds):
        for mode in ("off", "on"):
            stream = PackedShardStream(shards, Tokenize(il), row_len, repeat=True, shuffle_buffer=256,
                                       batch_size=batch_size, cache_mb=0 if mode == "off" else 4096)
            marks, docs, t0 = [], 0, time.perf_counter()
            for b in stream:
                docs += int(sum(int(r.max()) + 1 for r in b["doc_ids"]))
                if docs >= (len(marks) + 1) * per_pass:
                    marks.append(time.perf_counter())
                    if len(marks) == passes:
                        break
            times[mode].append([(m - prev) * 1e6 / per_pass for prev, m in zip([t0, *marks], marks)])
    rows = []
    for k in range(passes):
        off = min(r[k] for r in times["off"])
        on = min(r[k] for r in times["on"])
        rows.append({"pass": k + 1, "samples": per_pass, "us_per_sample_cache_off": off,
                     "us_per_sample_cache_on": on, "off_over_on": off / on})
    return rows


def print_table(rows: list[dict], cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--batches", type=int, default=40, help="batches timed per preset")
    p.add_argument("--row-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--cache-passes", type=int, help="instead: passes over --world's training split, cache off vs on")
    p.add_argument("--world", default="worlds/tiny", help="existing world for --cache-passes")
    p.add_argument("--rounds", type=int, default=2, help="--cache-passes: off/on runs each (fastest kept)")
    args = p.parse_args(argv)
    if args.cache_passes:
        rows = bench_cache(Path(args.world), args.cache_passes, args.row_len, args.batch_size, args.rounds)
        print_table(rows, list(rows[0]))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            rows.append(bench_preset(preset, args.batches, args.row_len, args.batch_size, Path(tmp)))
    print_table(rows, ["preset", "samples", "gen_seconds", "gen_samples_per_s", "loader_samples_per_s_per_worker",
                       "loader_slots_per_s_per_worker", "packing_efficiency"])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
