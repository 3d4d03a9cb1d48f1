"""Held-out loss: mean cross-entropy on the target tokens of a world split, the same for every arm.

    python -m omnifuse.eval.heldout --ckpt RUN [--split test] [--limit N] [--out FILE] [--device cuda]

The scaling sweep's metric (:mod:`omnifuse.scaling`). The first ``limit`` samples of ``split``, in
shard order (no shuffle), are tokenized in the run's own media mode and positions, packed into the
run's rows (``data.row_len``, ``data.batch_size``) and passed through the run's ``compute_loss``; the
loss is the sum of the per-slot losses over every labelled slot divided by their number, in nats per
target token. Only the targets carry labels (answers, captions, prose: ``target: true`` segments),
and their token ids do not depend on the arm, so two runs on the same world score **the same labels**:
``labels_sha`` (a hash of every sample's label ids, in sample order) and ``n_tokens`` say so, and the
scaling report checks that they agree. Packing does not change a document's loss (attention is
block-causal within documents), so neither does the row length.

Every sample is scored (``data.tasks`` of the run is ignored: a LLaVA stage-1 run trained on captions
is still scored on everything); a sample longer than a row is an error naming it, as in training.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from omnifuse.data.datamodule import Tokenize, shards_of
from omnifuse.data.packing import IGNORE, Doc, RowPacker, collate_rows, labels_of
from omnifuse.data.stream import BadSamplePolicy, iter_samples
from omnifuse.data.world import TASKS

HELDOUT_FILE = "heldout.json"


def heldout_docs(world_dir: str | Path, split: str, interleaver, limit: int | None = None,
                 image_size: int | None = None) -> list[Doc]:
    """The first ``limit`` samples of ``world_dir/split`` (all when None), tokenized by ``interleaver``;
    a bad sample is an error naming its shard and key."""
    samples = iter_samples(shards_of(world_dir, split), BadSamplePolicy("error"), image_size)
    tokenize = Tokenize(interleaver)
    return [tokenize(s) for s in itertools.islice(samples, limit)]


def labels_fingerprint(docs: Iterable[Doc]) -> tuple[str, int]:
    """``(sha256 prefix, count)`` of every document's label ids in order: equal for two arms exactly
    when they score the same target tokens of the same samples."""
    h, n = hashlib.sha256(), 0
    for doc in docs:
        labels = labels_of(doc.stream)
        ids = labels[labels != IGNORE]
        h.update(ids.numpy().astype("int64").tobytes())
        h.update(b"|")
        n += int(ids.numel())
    return h.hexdigest()[:16], n


def packed_batches(docs: list[Doc], row_len: int, batch_size: int, pool: int = 64) -> Iterator[dict]:
    """``docs`` packed into rows of ``row_len`` (:class:`~omnifuse.data.packing.RowPacker`), ``batch_size``
    rows per batch, the last batch possibly smaller."""
    rows: list[dict] = []
    for row in RowPacker(row_len, pool)(docs):
        rows.append(row)
        if len(rows) == batch_size:
            yield collate_rows(rows)
            rows = []
    if rows:
        yield collate_rows(rows)


@torch.no_grad()
def heldout_loss(module: torch.nn.Module, batches: Iterable[dict], device: str | torch.device = "cpu") -> dict:
    """Sum of ``module.compute_loss``'s per-slot losses over the labelled slots of ``batches``, divided by
    their number: ``{"loss", "n_tokens", "by_task": {task: {"loss", "n_tokens"}}}`` (tasks by
    ``label_task``). ``module`` must give per-slot losses (a fusion arm's LightningModule)."""
    module.eval()
    total, count = 0.0, 0
    by_task = torch.zeros(len(TASKS), dtype=torch.float64)
    n_task = torch.zeros(len(TASKS), dtype=torch.long)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        _, per_slot = module.compute_loss(batch)
        if per_slot is None:
            raise ValueError(f"{type(module).__name__}.compute_loss gives no per-slot losses: not a fusion arm")
        labelled = batch["labels"] != IGNORE  # (B, L)
        per_slot = per_slot.double()
        total += float(per_slot[labelled].sum())
        count += int(labelled.sum())
        task = batch["label_task"][labelled].cpu()
        by_task.index_add_(0, task, per_slot[labelled].cpu())
        n_task.index_add_(0, task, torch.ones_like(task))
    if count == 0:
        raise ValueError("no labelled slot in the held-out batches")
    return {"loss": total / count, "n_tokens": count,
            "by_task": {t: {"loss": float(by_task[i] / n_task[i]), "n_tokens": int(n_task[i])}
                        for i, t in enumerate(TASKS) if n_task[i] > 0}}


def evaluate_heldout(run_dir: str | Path, split: str = "test", limit: int | None = None, device: str = "cpu",
                     checkpoint: str | Path | None = None, data: str | Path | None = None) -> dict:
    """The held-out loss of a ``train.py`` run on ``split`` of its world (or of ``data``), with what it was
    measured on: ``{"loss", "n_tokens", "by_task", "labels_sha", "split", "n_samples", "limit", "step",
    "checkpoint", "world"}``."""
    from omnifuse.eval.loading import load_run, world_identity

    run = load_run(run_dir, checkpoint)
    world = Path(data) if data else run.world_dir
    cfg = run.config["data"]
    docs = heldout_docs(world, split, run.interleaver, limit, cfg.get("image_size"))
    sha, n_labels = labels_fingerprint(docs)
    module = run.module.to(device)
    result = heldout_loss(module, packed_batches(docs, int(cfg["row_len"]), int(cfg["batch_size"]),
                                                 int(cfg.get("pack_pool", 64))), device)
    if result["n_tokens"] != n_labels:  # every document must reach a row
        raise RuntimeError(f"{run_dir}: {n_labels} labelled tokens in the documents but {result['n_tokens']} scored")
    return {**result, "labels_sha": sha, "split": split, "n_samples": len(docs), "limit": limit,
            "step": int(run.compute.get("global_step", -1)), "checkpoint": str(run.checkpoint),
            "world": world_identity(world)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omnifuse.eval.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run directory written by train.py fit")
    p.add_argument("--checkpoint", help="a checkpoint of that run (default: its last)")
    p.add_argument("--split", default="test", help="world split (default: test)")
    p.add_argument("--limit", type=int, help="the first N samples of the split (default: all)")
    p.add_argument("--data", help="world folder (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", help=f"write the result here (JSON; default: RUN/{HELDOUT_FILE})")
    args = p.parse_args(argv)
    result = evaluate_heldout(args.ckpt, args.split, args.limit, args.device, args.checkpoint, args.data)
    out = Path(args.out) if args.out else Path(args.ckpt) / HELDOUT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"held-out loss {result['loss']:.4f} nats/token over {result['n_tokens']} target tokens of "
          f"{result['n_samples']} {args.split} samples -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
