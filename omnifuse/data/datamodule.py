"""The one LightningDataModule every omnifuse model trains on.

It streams webdataset shards (the generated world, and any extra shards in the project's or the
community layouts), tokenizes in the loader workers and packs documents into fixed-length rows.
When ``world_dir`` does not exist yet, ``prepare_data`` generates the world and trains its text
tokenizer there, so a fresh clone trains with one command.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from omnifuse.data.packing import Doc
from omnifuse.data.pairs import PAIR_FORMATS, PairShardStream, PairTokenize, caption_counts, check_batch_fits_captions, swap_classes
from omnifuse.data.samples import BadSample, Sample
from omnifuse.data.stream import PackedShardStream
from omnifuse.data.token_cache import TokenCache, file_hash

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"


def shards_of(world_dir: str | Path, split: str) -> list[str]:
    """Sorted shard paths of one split of a world folder."""
    shards = sorted(glob.glob(str(Path(world_dir) / split / "*.tar")))
    if not shards:
        raise FileNotFoundError(f"no shards in {Path(world_dir) / split} (expected *.tar)")
    return shards


def ensure_world(world_dir: str | Path, preset: str = "tiny", seed: int = 0, vocab_size: int = 1024) -> Path:
    """Generate the world and train its tokenizer unless ``world_dir`` already holds them."""
    from omnifuse.data.world import generate_world
    from omnifuse.tokenizers.text import iter_world_texts, train_tokenizer

    world_dir = Path(world_dir)
    if not (world_dir / "world.json").exists():
        log.info("world %s not found: generating preset %r with seed %d", world_dir, preset, seed)
        generate_world(world_dir, preset=preset, seed=seed, progress=True)
    if not (world_dir / TOKENIZER_FILE).exists():
        log.info("training a %d-piece text tokenizer on %s/train", vocab_size, world_dir)
        train_tokenizer(iter_world_texts(world_dir, "train"), vocab_size, world_dir / TOKENIZER_FILE)
    return world_dir


class Tokenize:
    """Sample → Doc, picklable so that it runs inside loader workers."""

    def __init__(self, interleaver):
        from omnifuse.data.world import TASKS

        self.interleaver, self.tasks = interleaver, {t: i for i, t in enumerate(TASKS)}

    def __call__(self, sample: Sample) -> Doc:
        if sample.task not in self.tasks:
            raise BadSample(sample.shard, sample.key, "json.task", f"unknown task {sample.task!r}", "json")
        try:
            stream = self.interleaver.encode(sample.segments, sample.media)
        except (ValueError, KeyError) as e:
            raise BadSample(sample.shard, sample.key, "segments", str(e), "tokenize") from e
        return Doc(stream, self.tasks[sample.task], sample.key, sample.shard)


class WorldDataModule(L.LightningDataModule):
    """Streams, tokenizes and packs shards for training, validation and testing.

    Args:
        world_dir: world folder (generated here when missing, from ``preset`` and ``world_seed``).
        preset: world size preset for generation (tiny, small, base).
        world_seed: seed of the world generator (not of training).
        vocab_size: SentencePiece vocabulary size when the tokenizer is trained here.
        extra_train_shards: more training shards (globs), in the project's or the community layouts.
        row_len: slots per packed row (the context length).
        batch_size: rows per batch (pairs per batch for the pair formats).
        num_workers: loader worker processes (tokenization runs there).
        shuffle_buffer: samples in each worker's shuffle buffer.
        pack_pool: documents the packer chooses each row from (see RowPacker).
        seed: seed of shard order and shuffle buffers.
        patch: patch size P for images and spectrograms.
        image_size: images are resized to this square side (the world's canvases already are).
        positions: ``mrope`` (2-D multimodal positions) or ``1d`` (every slot numbered flatly).
        bad_samples: ``error`` (stop at the first bad sample) or ``skip`` (skip and count).
        max_bad_fraction: under ``skip``, the share of bad samples past which the run stops.
        val_split, test_split: world splits used by ``validate`` and ``test``.
        tasks: train, validate and test only on samples of these world tasks
            (``omnifuse.data.world.TASKS``); the others are filtered out and counted (logged per
            reader and pass), not bad samples. ``None``: every task.
        pixel_shuffle: 2×2 neighbouring image patches become one slot of 4× the width (a quarter of the
            image slots); the native arm's patch projection follows through the CLI link to
            ``model.model.pixel_shuffle``. See :mod:`omnifuse.tokenizers.image`.
        media: how media segments enter the stream: ``inline`` (patch slots), ``marker`` (just
            ``<img></img>`` / ``<aud></aud>``) or ``drop`` (removed); see
            :mod:`omnifuse.tokenizers.interleave`.
        format: ``packed`` (rows of packed documents, every fusion arm) or ``image_pairs`` /
            ``audio_pairs`` (batches of ``batch_size`` media–caption pairs with distinct captions,
            for the contrastive stages; see :mod:`omnifuse.data.pairs`).
        hard_negatives: pair formats only: each pair also brings a hard-negative caption, its own with
            one attribute word (shape, colour, size, digit, sign word, sound kind, pitch; the world's
            vocabulary in world.json) swapped for another of its class, scored as an extra negative
            of the media -> text loss (NegCLIP). Makes the encoder tell apart what a batch of random
            captions rarely asks it to (see :func:`omnifuse.data.pairs.hard_negative`).
        hard_batches: pair formats only: build training batches from runs of this many pairs whose
            captions are one word apart ("a small red circle." beside "a small red star."), so the
            batch holds hard negatives both ways, media and captions (0 or 1: random batches; see
            :class:`omnifuse.data.pairs.SimilarGroups`). Every pair is still seen once a pass.
        hard_batch_pool: pairs waiting to be grouped (the neighbourhood searched for each run). The run
            logs the share of its first pairs that came out beside a neighbour (tiny world: 72% with 4096).
        upsample: pair formats only: ``{source: k}``, training pairs from samples of that world question
            type (``digit``, ``ocr``, ...) or task (``caption``, ...) are seen ``k`` times a pass, a data-mix
            knob as open_clip's per-source upsampling factors (a question type's factor wins over its
            task's). The copies enter the shuffle buffer together, so give it room (``shuffle_buffer``
            of a few thousand) to spread them over many batches. Validation is not upsampled.
        cache_mb: MiB of tokenized training documents each reader (training process or loader worker) keeps and replays on its
            later passes over the shards, instead of reading, decoding and tokenizing them again (the
            same batches either way; 0 turns it off). The tiny world's train split takes ~200 MiB.
        token_cache: folder (relative to ``world_dir`` unless absolute) where the tokenized documents
            of every shard read whole are kept on disk, under ``<fingerprint>/``, so that later runs
            (and resumed ones) start from them instead of the tars: the same documents, bad-sample
            counts and batches, without the ~410 µs a sample of reading, decoding and tokenizing
            (:mod:`omnifuse.data.token_cache`). The fingerprint covers the tokenizer, every data
            setting a document depends on and the data path's source code; deleting the folder is
            always safe. ``null``: no token cache (read the tars).
    """

    def __init__(
        self,
        world_dir: str = "worlds/tiny",
        preset: str = "tiny",
        world_seed: int = 0,
        vocab_size: int = 1024,
        extra_train_shards: list[str] | None = None,
        row_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 1,
        shuffle_buffer: int = 256,
        pack_pool: int = 64,
        seed: int = 0,
        patch: int = 8,
        image_size: int = 48,
        positions: str = "mrope",
        bad_samples: str = "error",
        max_bad_fraction: float = 0.01,
        val_split: str = "val",
        test_split: str = "test",
        tasks: list[str] | None = None,
        media: str = "inline",
        format: str = "packed",
        pixel_shuffle: bool = False,
        hard_negatives: bool = False,
        hard_batches: int = 0,
        hard_batch_pool: int = 4096,
        upsample: dict[str, int] | None = None,
        cache_mb: float = 1024,
        token_cache: str | None = "token-cache",
    ):
        from omnifuse.data.world import QTYPES, TASKS
        from omnifuse.tokenizers.interleave import MEDIA_MODES

        super().__init__()
        if positions not in ("mrope", "1d"):
            raise ValueError(f"data.positions must be 'mrope' or '1d', got {positions!r}")
        if media not in MEDIA_MODES:
            raise ValueError(f"data.media must be one of {', '.join(MEDIA_MODES)}, got {media!r}")
        if format != "packed" and format not in PAIR_FORMATS:
            raise ValueError(f"data.format must be one of packed, {', '.join(PAIR_FORMATS)}, got {format!r}")
        if format != "packed" and media != "inline":
            raise ValueError(f"data.format={format} pairs each medium's patches with its caption: data.media must be "
                             f"inline, got {media!r}")
        if hard_negatives and format == "packed":
            raise ValueError("data.hard_negatives is for the contrastive stages' pair formats (data.format=image_pairs "
                             "or audio_pairs), not data.format=packed")
        if hard_batches < 0 or (hard_batches > 1 and hard_batch_pool < hard_batches):
            raise ValueError(f"data.hard_batches must be >= 0 and data.hard_batch_pool >= it, got {hard_batches} "
                             f"and {hard_batch_pool}")
        if hard_batches > 1 and format == "packed":
            raise ValueError("data.hard_batches is for the contrastive stages' pair formats (data.format=image_pairs "
                             "or audio_pairs), not data.format=packed")
        if upsample:
            if format == "packed":
                raise ValueError("data.upsample is for the contrastive stages' pair formats (data.format=image_pairs "
                                 "or audio_pairs), not data.format=packed")
            sources = set(TASKS) | {q for qs in QTYPES.values() for q in qs}
            for source, k in upsample.items():
                if source not in sources:
                    raise ValueError(f"data.upsample: {source!r} is neither a world task nor a question type; "
                                     f"valid: {', '.join(sorted(sources))}")
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise ValueError(f"data.upsample: the factor of {source!r} must be an integer >= 1, got {k!r}")
        if tasks is not None:
            unknown = [t for t in tasks if t not in TASKS]
            if unknown or not tasks:
                raise ValueError(
                    f"data.tasks: unknown task(s) {unknown} (or an empty list); valid tasks: {', '.join(TASKS)}"
                )
        if cache_mb < 0:
            raise ValueError(f"data.cache_mb must be >= 0 (0: no cache), got {cache_mb}")
        if row_len < 16 or batch_size < 1 or num_workers < 0:
            raise ValueError(f"row_len >= 16, batch_size >= 1 and num_workers >= 0 needed, got {row_len}, {batch_size}, {num_workers}")
        self.save_hyperparameters()
        self.world_dir = Path(world_dir)
        self.tokenizer = None
        self.interleaver = None
        self._pairs_checked = False

    # -- set-up ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        h = self.hparams
        ensure_world(self.world_dir, h.preset, h.world_seed, h.vocab_size)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.interleaver is None:
            self.tokenizer, self.interleaver = build_interleaver(self.world_dir, h.patch, h.positions, h.media,
                                                                 h.pixel_shuffle)
        if h.format != "packed" and stage in ("fit", None) and not self._pairs_checked:
            shards = self.train_shards()
            counts = caption_counts(shards, PAIR_FORMATS[h.format], h.tasks, limit=5000, upsample=h.upsample)
            check_batch_fits_captions(counts, h.batch_size, f"data.format={h.format} on {self.world_dir}/train")
            self._pairs_checked = True

    # -- loaders -----------------------------------------------------------------------------
    def train_shards(self) -> list[str]:
        shards = shards_of(self.world_dir, "train")
        for pattern in self.hparams.extra_train_shards or []:
            extra = sorted(glob.glob(pattern))
            if not extra:
                raise FileNotFoundError(f"data.extra_train_shards: {pattern!r} matches no file")
            shards += extra
        return shards

    def _stream(self, shards: list[str], *, train: bool, skip_batches: int = 0) -> PackedShardStream:
        h = self.hparams
        extra = {}
        if h.format == "packed":
            stream_class, tokenize = PackedShardStream, Tokenize(self.interleaver)
        else:
            negatives = None  # training batches only: validation scores the plain CLIP loss
            if h.hard_negatives and train:
                negatives = swap_classes(json.loads((self.world_dir / "world.json").read_text())["vocabulary"])
            stream_class = PairShardStream
            tokenize = PairTokenize(self.interleaver, PAIR_FORMATS[h.format], negatives, seed=h.seed)
            if train and h.hard_batches > 1:  # validation keeps random batches: the plain CLIP loss
                extra = {"hard_batches": h.hard_batches, "hard_batch_pool": h.hard_batch_pool}
            if train and h.upsample:  # validation scores the world's own mix
                extra["upsample"] = dict(h.upsample)
        token_cache = None
        if h.token_cache:
            token_cache = TokenCache(self.world_dir / h.token_cache, self._document_settings(train))
        return stream_class(
            shards,
            tokenize,
            h.row_len,
            pool=h.pack_pool,
            repeat=train,
            shuffle_shards=train,
            shuffle_buffer=h.shuffle_buffer if train else 0,
            seed=h.seed,
            image_size=h.image_size,
            bad_samples=h.bad_samples,
            max_bad_fraction=h.max_bad_fraction,
            batch_size=h.batch_size,
            skip_batches=skip_batches,
            tasks=h.tasks,
            cache_mb=h.cache_mb,
            token_cache=token_cache,
            **extra,
        )

    def _document_settings(self, train: bool) -> dict:
        """Everything besides the code that a tokenized document depends on (the token cache's
        fingerprint): the tokenizer's bytes and the data settings that change a document."""
        h = self.hparams
        settings = {
            "tokenizer_sha256": file_hash(self.world_dir / TOKENIZER_FILE),
            "format": h.format, "patch": h.patch, "image_size": h.image_size, "positions": h.positions,
            "media": h.media, "pixel_shuffle": h.pixel_shuffle, "tasks": sorted(h.tasks) if h.tasks else None,
            "hard_negatives": None,
        }
        if h.format != "packed" and h.hard_negatives and train:  # negatives drawn from (seed, shard, key)
            settings["hard_negatives"] = {"seed": h.seed, "world_json_sha256": file_hash(self.world_dir / "world.json")}
        return settings

    def _loader(self, stream: PackedShardStream, workers: int) -> DataLoader:
        # pinned batches let the trainer's copy to a GPU run without holding up the host
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                          pin_memory=self._on_cuda())

    def _on_cuda(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        # Exact resume: the stream is a pure function of the seed, so a resumed run regenerates
        # the batches it had already trained on and drops them.
        skip = 0
        if self.trainer is not None:
            skip = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return self._loader(self._stream(self.train_shards(), train=True, skip_batches=skip), self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._stream(shards_of(self.world_dir, self.hparams.val_split), train=False), 0)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._stream(shards_of(self.world_dir, self.hparams.test_split), train=False), 0)


def build_interleaver(world_dir: str | Path, patch: int, positions: str, media: str = "inline",
                      pixel_shuffle: bool = False):
    """The text tokenizer of a world and the interleaver built on it (``media``, ``pixel_shuffle``: see
    the DataModule's options of those names)."""
    from omnifuse.tokenizers.interleave import Interleaver
    from omnifuse.tokenizers.text import TextTokenizer

    path = Path(world_dir) / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python -m omnifuse.tokenizers.text train --data {world_dir} ...`")
    tokenizer = TextTokenizer(path)
    return tokenizer, Interleaver(tokenizer, patch=patch, positions=positions, media=media, pixel_shuffle=pixel_shuffle)
