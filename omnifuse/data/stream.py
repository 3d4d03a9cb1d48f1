"""Streaming shards → decoded samples → slot streams → packed rows, with a bad-sample policy.

The pipeline is webdataset's own pieces (shard split by node and by worker, tar expansion,
grouping by key) followed by omnifuse's decode, tokenize and pack stages. It is deterministic in
``seed``: pass ``p`` over the shards shuffles them with ``(seed, p)`` and the document buffer with
``(seed, p, rank, worker)``, so a resumed run can regenerate exactly the rows it had consumed and
skip them (``skip_batches``).

A training stream reads its shards many times (the tiny world's 8000 samples are ~160 tiny steps;
``make demo`` trains 1000). Reading, decoding and tokenizing a sample gives the same document every
pass, so each reader keeps the documents of the shards it has read whole (up to ``cache_mb``) and
replays them on later passes: only the shard order, the shuffle buffer and the packing run again,
~34 µs a sample instead of ~410 (``bench/data.py --cache-passes``). The rows are the same as
without the cache (``tests/test_loader_cache.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from omnifuse.data.packing import RowPacker, Doc, collate_rows
from omnifuse.data.samples import BadSample, Sample, decode_sample
from omnifuse.data.token_cache import DOC, OK, TokenCache

log = logging.getLogger(__name__)


class TooManyBadSamples(RuntimeError):
    pass


@dataclass
class BadSamplePolicy:
    """``error``: the first bad sample stops the run with its shard, key and field.
    ``skip``: bad samples are skipped and counted by kind; once more than ``max_fraction`` of the
    samples seen (after ``min_seen`` samples) were bad, the run stops."""

    mode: str = "error"
    max_fraction: float = 0.01
    min_seen: int = 100
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.mode not in ("error", "skip"):
            raise ValueError(f"bad_samples must be 'error' or 'skip', got {self.mode!r}")
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_fraction}")

    def ok(self) -> None:
        self.seen += 1

    def bad(self, err: BadSample) -> None:
        """Count a bad sample, or raise it (``error`` mode / limit passed)."""
        self.seen += 1
        if self.mode == "error":
            raise err
        self.skipped[err.kind] += 1
        total = sum(self.skipped.values())
        log.warning("skipped (%d so far): %s", total, err)
        if self.seen >= self.min_seen and total > self.max_fraction * self.seen:
            raise TooManyBadSamples(
                f"{total} of {self.seen} samples were bad ({dict(self.skipped)}), more than the allowed "
                f"fraction {self.max_fraction}; last: {err}"
            )


def _tar_handler(policy: BadSamplePolicy):
    def handle(exn: Exception) -> bool:
        # webdataset appends the shard url to exn.args where it knows it
        shard = next((a for a in exn.args if isinstance(a, str) and a.endswith(".tar")), "?")
        policy.bad(BadSample(shard, "?", "tar", f"corrupt tar member ({type(exn).__name__}: {exn})", "tar"))
        return True  # continue with the next member/shard

    return handle


def iter_samples(shards: list[str], policy: BadSamplePolicy, image_size: int | None = None) -> Iterator[Sample]:
    """Decoded samples of ``shards``, in order; bad ones go to ``policy``."""
    raw_samples = wds.tarfile_to_samples(handler=_tar_handler(policy))(dict(url=u) for u in shards)
    for raw in raw_samples:
        try:
            sample = decode_sample(raw, image_size)
        except BadSample as e:
            policy.bad(e)
            continue
        policy.ok()
        yield sample


class PackedShardStream(IterableDataset):
    """Rows of packed documents from webdataset shards.

    Args:
        shards: shard paths (every rank passes the same list; each reads its own share).
        tokenize: Sample → Doc (runs in the loader workers).
        row_len: slots per row. pool: documents the packer may choose from.
        repeat: loop over the shards forever (training) or once (evaluation).
        shuffle_buffer: samples in the shuffle buffer (0 = keep shard order).
        batch_size: rows per batch (batches are made here, in the worker).
        skip_batches: batches to generate and drop before yielding (exact mid-run resume).
        tasks: keep only samples of these tasks (``None``: all); the others are counted by task in
            ``filtered`` (this reader's count) and logged at the end of each pass over the shards.
        cache_mb: a repeating stream keeps each reader's tokenized documents of the shards it has
            read whole, up to this many MiB per reader, and replays them on the next passes
            (0: read every pass from the tars). A bad sample is counted on the pass that read it.
        token_cache: a :class:`~omnifuse.data.token_cache.TokenCache` that keeps the documents of
            every shard read whole on disk, for the next run (and this run's first look at a shard
            another run has read); its bad-sample events replay through the policy as read.
    """

    def __init__(
        self,
        shards: list[str],
        tokenize: Callable[[Sample], Doc],
        row_len: int,
        *,
        pool: int = 64,
        repeat: bool = True,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 256,
        seed: int = 0,
        image_size: int | None = None,
        bad_samples: str = "error",
        max_bad_fraction: float = 0.01,
        batch_size: int = 8,
        skip_batches: int = 0,
        tasks: list[str] | None = None,
        cache_mb: float = 1024,
        token_cache: TokenCache | None = None,
    ):
        if not shards:
            raise ValueError("PackedShardStream needs at least one shard")
        self.shards, self.tokenize, self.row_len = list(shards), tokenize, row_len
        self.pool, self.repeat, self.shuffle_shards, self.shuffle_buffer = pool, repeat, shuffle_shards, shuffle_buffer
        self.seed, self.image_size = seed, image_size
        self.batch_size, self.skip_batches = batch_size, skip_batches
        self.policy = BadSamplePolicy(bad_samples, max_bad_fraction)
        self.packer = RowPacker(row_len, pool)
        self.tasks = None if tasks is None else frozenset(tasks)
        self.filtered: Counter = Counter()  # samples left out by `tasks`, by task (not bad samples)
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.cache_bytes = int(cache_mb * 2**20) if repeat else 0
        self.token_cache = token_cache

    def _reader(self) -> tuple[int, int, int, int]:
        """(rank, world, logical worker, workers).

        The DataLoader deals batches round-robin starting from worker 0, so a run resumed after
        ``skip_batches`` batches lets physical worker ``w`` play the reader that produced batch
        ``skip_batches + w`` of the uninterrupted run: logical worker ``(w + skip) % workers``.
        """
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        return rank, world, (worker + self.skip_batches) % workers, workers

    def _docs(self) -> Iterator[Doc]:
        rank, world, worker, workers = self._reader()
        if self.repeat and len(self.shards) < world * workers:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {world} rank(s) x {workers} worker(s): every reader needs "
                "at least one shard; write smaller shards or use fewer workers"
            )
        cache = _DocCache(self.cache_bytes)
        p = 0
        while True:
            shards = list(self.shards)
            if self.shuffle_shards:
                random.Random(f"{self.seed}/{p}").shuffle(shards)
            # Training splits shards by rank; a finite pass (evaluation) is read whole by every rank,
            # so that all ranks run the same number of steps (collectives would wait forever).
            mine = (list(wds.split_by_node(shards)) if self.repeat else shards)[worker::workers]
            if p == 0:  # once per training stream; evaluation passes repeat, so only at debug level
                log.log(logging.INFO if self.repeat else logging.DEBUG,
                        "rank %d worker %d/%d reads shards: %s", rank, worker, workers, ",".join(mine))
            docs = self._expand(doc for shard in mine for doc in self._shard_docs(shard, cache))
            if self.shuffle_buffer > 1:
                docs = _shuffle(docs, self.shuffle_buffer, random.Random(f"{self.seed}/{p}/{rank}/{worker}"))
            yield from docs
            if self.filtered:
                log.log(logging.INFO if self.repeat and p == 0 else logging.DEBUG,
                        "rank %d worker %d: %d samples of other tasks than data.tasks left out so far: %s",
                        rank, worker, sum(self.filtered.values()), dict(self.filtered))
            p += 1
            if not self.repeat:
                return

    def _expand(self, docs: Iterator) -> Iterator:
        """The documents of a pass as they enter the shuffle buffer (a subclass may repeat some)."""
        return docs

    def _shard_docs(self, shard: str, cache: "_DocCache") -> Iterator:
        """The documents of one shard, in order: replayed from ``cache`` or the token cache on disk,
        or read, decoded, filtered by task and tokenized (and kept in ``cache`` once the shard was
        read whole, if it fits, and in the token cache)."""
        hit = cache.get(shard)
        if hit is not None:
            docs, filtered = hit
            self.filtered.update(filtered)
            yield from docs
            return
        disk = self.token_cache
        stored = disk.load(shard) if disk is not None else None
        if stored is not None:
            docs, events, filtered = stored
            self.filtered.update(filtered)
            yield from self._replay(docs, events)
            cache.put(shard, docs, filtered)
            return
        docs, before = [], Counter(self.filtered)
        record = disk is not None and disk.writable  # a token cache that cannot write keeps nothing
        policy = _Recorder(self.policy) if record else self.policy
        samples = iter_samples([shard], policy, self.image_size)
        if self.tasks is not None:
            samples = self._keep_tasks(samples)
        for sample in samples:
            try:
                doc = self.tokenize(sample)
            except BadSample as e:
                policy.bad(e)
                continue
            if cache.room or record:
                docs.append(doc)
            if record:
                policy.events.append(DOC)
            yield doc
        filtered = self.filtered - before
        cache.put(shard, docs, filtered)
        if record:
            disk.save(shard, docs, policy.events, filtered)

    def _replay(self, docs: list, events: list) -> Iterator:
        """A stored shard's documents, with its bad-sample events counted (or raised) in their order."""
        docs_left = iter(docs)
        for event in events:
            if event == DOC:
                yield next(docs_left)
            elif event == OK:
                self.policy.ok()
            else:
                self.policy.bad(event)

    def _keep_tasks(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        from omnifuse.data.world import TASKS

        for sample in samples:
            # a task the world does not know is a bad sample (Tokenize says so), not a filtered one
            if sample.task in TASKS and sample.task not in self.tasks:
                self.filtered[sample.task] += 1
                continue
            yield sample

    def _checked(self, docs: Iterator[Doc]) -> Iterator[Doc]:
        for doc in docs:
            if len(doc.stream) > self.row_len:
                reason = f"{len(doc.stream)} slots, longer than a row of {self.row_len}"
                self.policy.bad(BadSample(doc.shard, doc.key, "segments", reason, "too_long"))
                continue
            yield doc

    def _skip_share(self) -> int:
        """This reader's share of the first ``skip_batches`` batches of the uninterrupted run
        (batches are dealt round-robin over the readers)."""
        _, _, worker, workers = self._reader()
        return self.skip_batches // workers + (1 if worker < self.skip_batches % workers else 0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Batches are made here (DataLoader batch_size=None).
        skip = self._skip_share()
        rows: list[dict[str, torch.Tensor]] = []
        n = 0
        for row in self.packer(self._checked(self._docs())):
            rows.append(row)
            if len(rows) == self.batch_size:
                if n >= skip:
                    yield collate_rows(rows)
                rows, n = [], n + 1
        if rows and n >= skip:
            yield collate_rows(rows)


class _Recorder:
    """A bad-sample policy that also records its events (for the token cache to replay)."""

    def __init__(self, policy: BadSamplePolicy):
        self.policy, self.events = policy, []

    def ok(self) -> None:
        self.events.append(OK)
        self.policy.ok()

    def bad(self, err: BadSample) -> None:
        self.events.append(err)
        self.policy.bad(err)


class _DocCache:
    """One reader's tokenized documents by shard, within a byte budget (tensors' bytes; a shard that
    does not fit whole is not kept, and once one has not fit no more are tried)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.room = max_bytes, 0, max_bytes > 0
        self.shards: dict[str, tuple[list, Counter]] = {}

    def get(self, shard: str) -> tuple[list, Counter] | None:
        return self.shards.get(shard)

    def put(self, shard: str, docs: list, filtered: Counter) -> None:
        if not self.room:
            return
        size = sum(_nbytes(d) for d in docs)
        if self.bytes + size > self.max_bytes:
            self.room = False
            log.info("loader cache full at %.0f MiB (data.cache_mb): shards from %s on are read every pass",
                     self.bytes / 2**20, shard)
            return
        self.shards[shard], self.bytes = (docs, filtered), self.bytes + size


def _nbytes(obj) -> int:
    """Bytes of the tensors (and arrays) inside a document, pair or list of them."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return getattr(obj, "nbytes", 0)


def _shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf
