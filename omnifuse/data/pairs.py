"""Media–caption pairs for contrastive training (CLIP on images, CLAP on spectrograms).

Where the pairs come from. The world writes a caption for the medium of a ``caption`` /
``audio_caption`` sample, but signs, charts and most digits only appear in question samples, whose
``meta`` nonetheless describes the medium exactly (objects, sign word, bars, sound events). So
every medium of the stage's kind with a ground-truth description becomes a pair:

- ``caption`` / ``audio_caption`` samples (the world's and the community layouts): the target
  text segment;
- any other world sample: a description built from ``meta`` in the world's caption style
  (:func:`describe_image`, :func:`omnifuse.data.world.audio_caption_of`); a medium without one is
  counted, not paired.

``data.tasks`` restricts the source tasks as for every format (e.g. ``[caption]``: captions only).

Batches and false negatives. Captions are exact descriptions, so two media share a caption only
when they show the same thing (common for one-object scenes and one-event clips); in one batch
they would be each other's false negatives under CLIP's loss. :class:`PairBatcher` therefore never
puts two equal captions in one batch: a pair whose caption is already in the batch being filled
waits for the next one (counted in ``deferred``). The loss stays open_clip's ``ClipLoss`` exactly,
and no pair is dropped. Distinct captions never describe the same content, so no other false
negative exists.

A pair batch (what :class:`PairShardStream` yields)::

    patches       (M, n_max, patch_dim) float   the medium's patches, raster order, zero padding
    grid          (M, n_max, 2) long            (row, col) of each patch, as omnifuse.model.media
    mask          (M, n_max) bool               True = a real patch
    text          (M, T_max) long               <s> caption </s>, then PAD_ID
    text_lengths  (M,) long                     slots up to and including </s>
    captions      list[str]                     the caption of each row (pairwise distinct)

and with ``data.hard_negatives`` (:func:`hard_negative`, NegCLIP's swapped-word captions)::

    neg_text          (M, T') long              <s> row i's hard-negative caption </s>, then PAD_ID
    neg_text_lengths  (M,) long
    neg_mask          (M, M) bool               [i, j]: row j's negative is a negative for medium i
    neg_captions      list[str | None]

Patches come from the interleaver's own image / audio tokenizers, so an encoder trained on these
batches sees exactly the patch values and grid coordinates the bolt-on arms hand it from a packed
batch (:func:`omnifuse.model.media.group_patches`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omnifuse.data.samples import BadSample, Sample, decode_sample
from omnifuse.data.stream import PackedShardStream
from omnifuse.tokenizers.text import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger(__name__)

PAIR_FORMATS = {"image_pairs": "image", "audio_pairs": "audio"}  # data.format -> medium
CAPTION_TASKS = {"image": "caption", "audio": "audio_caption"}


@dataclass
class Pair:
    """One medium and its caption, tokenized."""

    patches: torch.Tensor  # (n, patch_dim) float, raster order
    grid: torch.Tensor  # (n, 2) long (row, col)
    text: torch.Tensor  # (T,) long: <s> caption </s>
    caption: str
    key: str = ""
    shard: str = ""
    source: str = ""  # "<task>/<qtype>" of the sample it came from (data.upsample)
    negative: torch.Tensor | None = None  # (T',) long: <s> hard-negative caption </s>
    negative_caption: str | None = None


def describe_image(objects: list[dict], sign: dict | None = None, bars: list[dict] | None = None) -> str | None:
    """A caption of a world image from its ground truth, in the world's style; None if empty.

    Objects as :func:`omnifuse.data.world.caption_of` (left to right); a sign as ``"a sign with the
    word cat."``; a chart as ``"a chart where the red bar is 3 and the blue bar is 5."`` (the
    world's prose wording).
    """
    from omnifuse.data.world import caption_of

    parts = []
    if sign:
        parts.append(f"a sign with the word {sign['word']}.")
    if bars:
        said = [f"the {b['color']} bar is {b['value']}" for b in bars]
        parts.append("a chart where " + (said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]) + ".")
    if objects:
        parts.append(caption_of(objects))
    return " ".join(parts) or None


def media_captions(sample: Sample, kind: str) -> tuple[list[tuple[str, str]], int]:
    """``([(file, caption), …], undescribed)`` for the ``kind`` media of ``sample``, in segment order;
    ``undescribed`` counts media of that kind with no ground-truth description."""
    from omnifuse.data.world import audio_caption_of

    files = [seg["file"] for seg in sample.segments if seg.get("media") == kind]
    if not files:
        return [], 0
    if sample.task == CAPTION_TASKS[kind] and len(files) == 1:
        targets = [seg["text"] for seg in sample.segments if "text" in seg and seg.get("target")]
        return ([(files[0], targets[-1].strip())], 0) if targets and targets[-1].strip() else ([], 1)
    meta = sample.meta
    out = []
    for i, file in enumerate(files):
        if kind == "audio":
            caption = audio_caption_of(meta["events"]) if len(files) == 1 and meta.get("events") else None
        elif "images" in meta:  # multi-image samples describe each image
            caption = describe_image(meta["images"][i].get("objects", [])) if i < len(meta["images"]) else None
        elif len(files) == 1 and any(k in meta for k in ("objects", "sign", "bars")):
            caption = describe_image(meta.get("objects", []), meta.get("sign"), meta.get("bars"))
        else:
            caption = None
        if caption is not None:
            out.append((file, caption))
    return out, len(files) - len(out)


def upsample_factor(upsample: dict[str, int], source: str) -> int:
    """How many times a pass sees a pair of ``source`` (``"<task>/<qtype>"``) under ``data.upsample``:
    its question type's factor, else its task's, else 1."""
    task, _, qtype = source.partition("/")
    return upsample.get(qtype, upsample.get(task, 1))


def caption_counts(shards: Iterable[str], kind: str, tasks: Iterable[str] | None = None,
                   limit: int = 5000, upsample: dict[str, int] | None = None) -> Counter:
    """How often each ``kind`` caption occurs among the first ``limit`` pairs of ``shards`` (read in
    order, media not decoded: only each sample's JSON / TXT is read), a pair of an upsampled source
    counted as often as the stream will see it. Samples that cannot be read are left to the
    training stream, which counts or rejects them under its bad-sample policy."""
    import tarfile

    counts: Counter = Counter()
    wanted = set(tasks) if tasks is not None else None
    for shard in shards:
        with tarfile.open(shard) as tar:
            raw: dict = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                if raw and key != raw["__key__"]:
                    _count(counts, _captions_of(raw, kind, wanted), upsample)
                    raw = {}
                raw.setdefault("__key__", key)
                raw["__url__"] = shard
                raw[ext] = tar.extractfile(member).read() if ext in ("json", "txt") else b""
                if sum(counts.values()) >= limit:
                    return counts
            _count(counts, _captions_of(raw, kind, wanted), upsample)
    return counts


def _count(counts: Counter, captions: tuple[str, list[str]], upsample: dict[str, int] | None) -> None:
    source, said = captions
    k = upsample_factor(upsample, source) if upsample else 1
    for caption in said:
        counts[caption] += k


def _captions_of(raw: dict, kind: str, tasks: set[str] | None) -> tuple[str, list[str]]:
    """(``"<task>/<qtype>"``, the ``kind`` captions) of one raw sample; no captions if it cannot be read."""
    if not raw:
        return "", []
    try:
        sample = decode_sample(raw, media=False)
    except BadSample:
        return "", []
    if tasks is not None and sample.task not in tasks:
        return "", []
    return pair_source(sample), [caption for _, caption in media_captions(sample, kind)[0]]


def pair_source(sample: Sample) -> str:
    """``"<task>/<qtype>"`` of a sample (what ``data.upsample`` keys on)."""
    return f"{sample.task}/{sample.meta.get('qtype', sample.task)}"


def check_batch_fits_captions(counts: Counter, batch_size: int, where: str) -> None:
    """A batch holds a caption at most once, so a caption that is a fraction ``f`` of the pairs
    needs ``batch_size <= 1 / f`` or its pairs pile up waiting (:class:`CaptionsTooRepetitive`
    after a while). Checked at start-up on :func:`caption_counts`, so the error comes before training."""
    total = sum(counts.values())
    if not total:
        raise ValueError(f"{where}: no media–caption pairs found")
    caption, n = counts.most_common(1)[0]
    if batch_size * n > total:
        raise CaptionsTooRepetitive(
            f"{where}: data.batch_size={batch_size} pairs cannot be filled with distinct captions: "
            f"{caption!r} is {n} of the first {total} pairs ({n / total:.1%}) and a batch holds it at most "
            f"once, so at most {total // n} pairs per batch keep up ({len(counts)} distinct captions); "
            f"lower data.batch_size to {total // n} or less")


SWAP_CLASSES = ("shapes", "colors", "sizes", "numbers", "words", "sound_kinds", "pitches")


def swap_classes(vocabulary: dict) -> dict[str, tuple[str, ...]]:
    """world.json's ``vocabulary`` -> ``{word: the other words of its class}`` for the classes a
    hard negative may swap (shape, colour, size, digit / number, sign word, sound kind, pitch)."""
    out: dict[str, tuple[str, ...]] = {}
    for name in SWAP_CLASSES:
        words = [str(w) for w in vocabulary.get(name, [])]
        for w in words:
            out.setdefault(w, tuple(x for x in words if x != w))
    return out


def hard_negative(caption: str, classes: dict[str, tuple[str, ...]], rng: random.Random) -> str | None:
    """``caption`` with one of its attribute words (drawn by ``rng``) replaced by another word of the
    same class: "a big red circle." -> "a big red star." (NegCLIP's swap negatives, Yuksekgonul et
    al. 2023). World captions are exact descriptions, so the result never describes the medium.
    None when the caption has no swappable word."""
    parts = re.split(r"([a-z0-9]+)", caption)  # words at odd indices, separators kept
    slots = [i for i in range(1, len(parts), 2) if classes.get(parts[i])]
    if not slots:
        return None
    i = rng.choice(slots)
    parts[i] = rng.choice(classes[parts[i]])
    return "".join(parts)


def grid_coordinates(shapes: Iterable[tuple[int, int]]) -> torch.Tensor:
    """``(row, col)`` of every patch of an item made of grids ``[(rows, cols), …]`` (AnyRes: several),
    in stream order: rows count on across grids, as ``<row>`` tokens do in
    :func:`omnifuse.model.media.media_layout`. Returns ``(n, 2)`` long."""
    coords, row0 = [], 0
    for rows, cols in shapes:
        r, c = torch.meshgrid(torch.arange(row0, row0 + rows), torch.arange(cols), indexing="ij")
        coords.append(torch.stack([r.reshape(-1), c.reshape(-1)], dim=1))  # (rows*cols, 2)
        row0 += rows
    return torch.cat(coords) if coords else torch.zeros(0, 2, dtype=torch.long)


class PairTokenize:
    """Sample -> list of :class:`Pair` of one medium (picklable: runs in the loader workers).

    ``counts`` (this worker's): ``pairs`` made, ``undescribed`` media left out.

    ``negatives`` (:func:`swap_classes`): each pair also gets a hard-negative caption
    (:func:`hard_negative`), drawn from a generator seeded by ``seed``, the shard's name, the key and
    the medium, so a pair's negative does not depend on worker count or order (exact resume).
    """

    def __init__(self, interleaver, kind: str, negatives: dict[str, tuple[str, ...]] | None = None, seed: int = 0):
        if kind not in CAPTION_TASKS:
            raise ValueError(f"pair medium must be one of {tuple(CAPTION_TASKS)}, got {kind!r}")
        self.interleaver, self.kind = interleaver, kind
        self.negatives, self.seed = negatives, seed
        self.counts: Counter = Counter()

    def text(self, caption: str) -> torch.Tensor:
        return torch.tensor([BOS_ID, *self.interleaver.text.encode(caption), EOS_ID], dtype=torch.long)

    def patches(self, medium: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoded medium -> ``patches (n, patch_dim)`` float32 and ``grid (n, 2)``, exactly as the
        interleaver cuts and normalises it for a stream."""
        grids = self.interleaver.image(medium) if self.kind == "image" else [self.interleaver.audio(medium)]
        patches = np.concatenate([g.reshape(-1, g.shape[-1]) for g in grids])  # (n, patch_dim)
        return torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)), grid_coordinates(
            g.shape[:2] for g in grids
        )

    def __call__(self, sample: Sample) -> list[Pair]:
        described, undescribed = media_captions(sample, self.kind)
        if undescribed:
            if not self.counts["undescribed"]:
                log.info("media without a ground-truth description are not paired (first: shard %s, key %s, task %s)",
                         sample.shard, sample.key, sample.task)
            self.counts["undescribed"] += undescribed
        pairs = []
        for file, caption in described:
            try:
                patches, grid = self.patches(sample.media[file])
            except (ValueError, KeyError) as e:
                raise BadSample(sample.shard, sample.key, file, str(e), "tokenize") from e
            pair = Pair(patches, grid, self.text(caption), caption, sample.key, sample.shard, pair_source(sample))
            if self.negatives is not None:
                rng = random.Random(f"{self.seed}/{Path(sample.shard).name}/{sample.key}/{file}")
                pair.negative_caption = hard_negative(caption, self.negatives, rng)
                if pair.negative_caption is None:
                    self.counts["no_negative"] += 1
                else:
                    pair.negative = self.text(pair.negative_caption)
            pairs.append(pair)
        self.counts["pairs"] += len(pairs)
        return pairs


class CaptionsTooRepetitive(RuntimeError):
    pass


class PairBatcher:
    """Pairs in, batches of ``batch_size`` pairs with pairwise-distinct captions out.

    A pair whose caption is already in the batch being filled is held back, in arrival order,
    and goes first into the next batch that lacks its caption (``deferred`` counts such pairs).
    At the end of a finite stream the last batches may be shorter. More than ``max_held`` waiting
    pairs means the captions are too repetitive for the batch size: an error, not a silent stall.
    """

    def __init__(self, batch_size: int, max_held: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.max_held = max_held if max_held is not None else 8 * batch_size
        self.deferred = 0

    def __call__(self, pairs: Iterable[Pair]) -> Iterator[list[Pair]]:
        held: list[Pair] = []
        batch: list[Pair] = []
        seen: set[str] = set()

        def refill() -> None:
            nonlocal held, batch, seen
            batch, seen, rest = [], set(), []
            for p in held:
                if len(batch) < self.batch_size and p.caption not in seen:
                    batch.append(p)
                    seen.add(p.caption)
                else:
                    rest.append(p)
            held = rest

        for pair in pairs:
            if pair.caption in seen:
                held.append(pair)
                self.deferred += 1
                if len(held) > self.max_held:
                    raise CaptionsTooRepetitive(
                        f"{len(held)} pairs wait for a batch without their caption (last: {pair.caption!r}, "
                        f"shard {pair.shard}, key {pair.key}): the captions repeat too often for data.batch_size="
                        f"{self.batch_size}; lower it"
                    )
            else:
                batch.append(pair)
                seen.add(pair.caption)
            while len(batch) == self.batch_size:
                yield batch
                refill()
        while batch or held:  # a finite stream ends: flush, each batch still duplicate-free
            if batch:
                yield batch
            refill()


def collate_pairs(pairs: list[Pair]) -> dict:
    """Pairs -> a pair batch (module docstring)."""
    m = len(pairs)
    n_max = max(p.patches.shape[0] for p in pairs)
    t_max = max(p.text.shape[0] for p in pairs)
    d = pairs[0].patches.shape[1]
    patches = torch.zeros(m, n_max, d)
    grid = torch.zeros(m, n_max, 2, dtype=torch.long)
    mask = torch.zeros(m, n_max, dtype=torch.bool)
    text = torch.full((m, t_max), PAD_ID, dtype=torch.long)
    lengths = torch.zeros(m, dtype=torch.long)
    for i, p in enumerate(pairs):
        n, t = p.patches.shape[0], p.text.shape[0]
        patches[i, :n], grid[i, :n], mask[i, :n] = p.patches, p.grid, True
        text[i, :t], lengths[i] = p.text, t
    out = {"patches": patches, "grid": grid, "mask": mask, "text": text, "text_lengths": lengths,
           "captions": [p.caption for p in pairs]}
    if any(p.negative is not None for p in pairs):
        out.update(collate_negatives(pairs))
    return out


def collate_negatives(pairs: list[Pair]) -> dict:
    """The hard negatives of a pair batch: ``neg_text (M, T')`` / ``neg_text_lengths (M,)`` (a pair
    without one gets ``<s> </s>``, never used) and ``neg_mask (M, M)`` bool, True where pair ``j``'s
    negative is a usable negative for medium ``i``: it exists and is not medium ``i``'s own caption
    (another pair's swap can land on it)."""
    m = len(pairs)
    texts = [p.negative if p.negative is not None else torch.tensor([BOS_ID, EOS_ID]) for p in pairs]
    neg = torch.full((m, max(t.shape[0] for t in texts)), PAD_ID, dtype=torch.long)
    for i, t in enumerate(texts):
        neg[i, : t.shape[0]] = t
    mask = torch.tensor([[p.negative_caption is not None and p.negative_caption != q.caption for p in pairs]
                         for q in pairs], dtype=torch.bool)
    return {"neg_text": neg, "neg_text_lengths": torch.tensor([t.shape[0] for t in texts]), "neg_mask": mask,
            "neg_captions": [p.negative_caption for p in pairs]}


def one_word_keys(caption: str) -> list[str]:
    """The caption with each word in turn replaced by ``*``: two distinct captions share a key exactly
    when they differ in one word ("a small red circle." and "a small red star." share
    "a small red *")."""
    words = caption.split(" ")
    return [" ".join([*words[:i], "*", *words[i + 1 :]]) for i in range(len(words))]


class SimilarGroups:
    """Pairs in, the same pairs out, reordered into runs of up to ``group`` pairs whose captions are
    one word from the run's first ("a small red circle.", "a small red star.", "a small blue circle."),
    so that a batch holds hard negatives both ways: media as well as captions (``data.hard_batches``).

    Why: in a batch of random captions colour, size and count already tell every pair apart, so the
    contrastive loss never asks the encoder for shape, digits or sign words (the tiny CLIP's zero-shot
    shape stayed near chance while the same encoder trained with labels reaches 0.70). NegCLIP
    (Yuksekgonul et al. 2023) adds the nearest images to each batch for the same reason; here the world's
    captions are exact, so "one word apart" is the neighbourhood.

    How: up to ``pool`` pairs wait, indexed by :func:`one_word_keys`. While the pool is full, a pair
    drawn at random by ``rng`` leaves with up to ``group - 1`` pool pairs one word from it (distinct
    captions). Every pair comes out exactly once; only the order changes. ``counts``: ``pairs`` out,
    ``grouped`` of them in a run of two or more.
    """

    def __init__(self, group: int, pool: int):
        if group < 2 or pool < group:
            raise ValueError(f"SimilarGroups needs group >= 2 and pool >= group, got group={group}, pool={pool}")
        self.group, self.pool = group, pool
        self.counts: Counter = Counter()

    def __call__(self, pairs: Iterable[Pair], rng: random.Random) -> Iterator[Pair]:
        for run in self.runs(pairs, rng):
            yield from run

    def runs(self, pairs: Iterable[Pair], rng: random.Random) -> Iterator[list[Pair]]:
        """The runs themselves (what ``__call__`` yields one pair at a time)."""
        pool: dict[int, Pair] = {}
        ids: list[int] = []  # the pool's ids, for a uniform draw (swap-remove)
        where: dict[int, int] = {}  # id -> its index in ids
        index: dict[str, dict[int, None]] = {}  # key -> ids whose caption has it (insertion-ordered)

        def take(i: int) -> Pair:
            pair = pool.pop(i)
            k, last = where.pop(i), ids.pop()
            if last != i:
                ids[k], where[last] = last, k
            for key in one_word_keys(pair.caption):
                del index[key][i]
                if not index[key]:
                    del index[key]
            return pair

        def run() -> list[Pair]:
            first = take(ids[rng.randrange(len(ids))])
            out, seen = [first], {first.caption}
            keys = one_word_keys(first.caption)
            rng.shuffle(keys)
            for key in keys:
                for j in list(index.get(key, ())):
                    if len(out) == self.group:
                        break
                    if pool[j].caption not in seen:
                        out.append(take(j))
                        seen.add(out[-1].caption)
            self.counts["pairs"] += len(out)
            self.counts["grouped"] += len(out) if len(out) > 1 else 0
            return out

        for n, pair in enumerate(pairs):
            pool[n], where[n] = pair, len(ids)
            ids.append(n)
            for key in one_word_keys(pair.caption):
                index.setdefault(key, {})[n] = None
            while len(pool) >= self.pool:
                yield run()
        while pool:
            yield run()


class PairShardStream(PackedShardStream):
    """Pair batches from webdataset shards: :class:`PackedShardStream`'s reading, task filter,
    shuffling, bad-sample policy and exact resume, with :class:`PairBatcher` in place of packing.

    ``tokenize`` is a :class:`PairTokenize`; ``row_len`` bounds a caption's slots (the text tower's
    context); a longer caption is a bad sample (``too_long``). ``pool`` is not used. ``hard_batches``
    (group size, 0 = off) and ``hard_batch_pool`` reorder the pairs with :class:`SimilarGroups` before
    batching, from a generator seeded by ``(seed, rank, worker)``, so resuming replays the same batches.

    ``upsample`` (``data.upsample``): ``{source: k}`` -- the pairs of a sample whose question type or
    task is ``source`` enter the shuffle buffer ``k`` times a pass (open_clip's per-source upsampling
    factors); a question type's factor wins over its task's. ``copies`` counts the extra pairs by
    ``"<task>/<qtype>"``. The copies go in one after another, so the shuffle buffer is what spreads
    them: with ``shuffle_buffer`` B a copy stays in it for ~B documents, so a buffer several batches
    long keeps a medium's copies out of neighbouring batches (a batch never holds a caption twice).
    """

    def __init__(self, shards: list[str], tokenize: PairTokenize, row_len: int, hard_batches: int = 0,
                 hard_batch_pool: int = 4096, upsample: dict[str, int] | None = None, **kwargs):
        super().__init__(shards, tokenize, row_len, **kwargs)
        self.batcher = PairBatcher(self.batch_size)
        self.groups = SimilarGroups(hard_batches, hard_batch_pool) if hard_batches > 1 else None
        self.upsample = dict(upsample or {})  # checked where it is set: WorldDataModule (data.upsample)
        self.copies: Counter = Counter()

    def _expand(self, docs: Iterator[list[Pair]]) -> Iterator[list[Pair]]:
        if not self.upsample:
            yield from docs
            return
        for pairs in docs:
            k = upsample_factor(self.upsample, pairs[0].source) if pairs else 1
            if k > 1:
                if pairs[0].source not in self.copies:
                    log.info("data.upsample: the pairs of %s are seen %d times a pass", pairs[0].source, k)
                self.copies[pairs[0].source] += (k - 1) * len(pairs)
            for _ in range(k):
                yield pairs

    def _pairs(self) -> Iterator[Pair]:
        for pairs in self._docs():
            for pair in pairs:
                if pair.text.shape[0] > self.row_len:
                    reason = f"caption of {pair.text.shape[0]} slots, longer than data.row_len={self.row_len}"
                    self.policy.bad(BadSample(pair.shard, pair.key, "caption", reason, "too_long"))
                    continue
                if pair.negative is not None and pair.negative.shape[0] > self.row_len:
                    # the pair stays, without its negative (a copy: the loader cache replays the original)
                    pair = dataclasses.replace(pair, negative=None, negative_caption=None)
                yield pair

    def _ordered_pairs(self) -> Iterator[Pair]:
        if self.groups is None:
            yield from self._pairs()
            return
        rank, _, worker, _ = self._reader()
        logged = False
        for pair in self.groups(self._pairs(), random.Random(f"{self.seed}/hard-batches/{rank}/{worker}")):
            c = self.groups.counts
            if not logged and c["pairs"] >= self.groups.pool:
                log.info("data.hard_batches=%d: %d of the first %d pairs came out beside captions one word from "
                         "theirs (%.0f%%)", self.groups.group, c["grouped"], c["pairs"],
                         100 * c["grouped"] / c["pairs"])
                logged = True
            yield pair

    def __iter__(self) -> Iterator[dict]:
        skip = self._skip_share()
        for n, batch in enumerate(self.batcher(self._ordered_pairs())):
            if n >= skip:
                yield collate_pairs(batch)
