"""The loader's document cache (``data.cache_mb``): a training stream reads each shard once and
replays its tokenized documents on later passes, and its batches are exactly those of a stream that
reads the tars every pass."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest
import torch

import omnifuse.data.stream as stream_module
from omnifuse.data.datamodule import WorldDataModule, shards_of

PASSES = 3


def module(world, **kw) -> WorldDataModule:
    # the on-disk token cache is off unless a test names its folder: the shared world is read by many tests
    kw = {"row_len": 256, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 16, "pack_pool": 8,
          "token_cache": None, **kw}
    dm = WorldDataModule(world_dir=str(world), **kw)
    dm.setup("fit")
    return dm


@pytest.fixture
def shard_reads(monkeypatch) -> Counter:
    """How many times each shard is opened and read from its tar."""
    reads: Counter = Counter()
    real = stream_module.iter_samples

    def counting(shards, policy, image_size=None):
        reads.update(shards)
        return real(shards, policy, image_size)

    monkeypatch.setattr(stream_module, "iter_samples", counting)
    return reads


def batches_over_passes(dm: WorldDataModule, n_batches: int) -> list[dict]:
    stream = dm._stream(dm.train_shards(), train=True)
    return list(islice(iter(stream), n_batches))


def one_pass_batches(dm: WorldDataModule) -> int:
    stream = dm._stream(dm.train_shards(), train=False)
    return sum(1 for _ in stream)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), f"batch {i}, {k}"
            else:
                assert x[k] == y[k], f"batch {i}, {k}"


def test_cached_stream_gives_the_same_batches_and_reads_each_shard_once(small_world, shard_reads):
    n = PASSES * one_pass_batches(module(small_world))
    shard_reads.clear()
    cached = batches_over_passes(module(small_world), n)
    train = shards_of(small_world, "train")
    assert set(shard_reads) == set(train) and all(shard_reads[s] == 1 for s in train), shard_reads
    shard_reads.clear()
    uncached = batches_over_passes(module(small_world, cache_mb=0), n)
    assert all(shard_reads[s] >= PASSES for s in train), shard_reads
    assert_same_batches(cached, uncached)
    # the replays were used: the later passes hold documents, not only the first one
    assert sum(int(b["doc_ids"].max()) + 1 for b in cached) > (PASSES - 1) * 4 * len(cached) // PASSES


def test_a_cache_too_small_for_a_shard_reads_every_pass(small_world, shard_reads):
    n = PASSES * one_pass_batches(module(small_world))
    shard_reads.clear()
    small = batches_over_passes(module(small_world, cache_mb=0.01), n)  # 10 KiB: no shard fits
    assert all(shard_reads[s] >= PASSES for s in shards_of(small_world, "train")), shard_reads
    assert_same_batches(small, batches_over_passes(module(small_world, cache_mb=0), n))


def test_replayed_passes_count_the_filtered_tasks_again(small_world, shard_reads):
    stream = module(small_world, tasks=["vqa", "caption"])._stream(shards_of(small_world, "train"), train=True)
    shard = shards_of(small_world, "train")[0]
    cache = stream_module._DocCache(2**30)
    first = list(stream._shard_docs(shard, cache))
    once = Counter(stream.filtered)
    replay = list(stream._shard_docs(shard, cache))
    assert shard_reads[shard] == 1 and replay == first and len(first) > 0
    assert sum(once.values()) > 0 and stream.filtered == once + once


def test_pair_batches_with_hard_negatives_are_the_same_cached(small_world, shard_reads):
    kw = dict(format="image_pairs", hard_negatives=True, row_len=64)
    n = PASSES * one_pass_batches(module(small_world, **kw))
    shard_reads.clear()
    cached = batches_over_passes(module(small_world, **kw), n)
    assert set(shard_reads) == set(shards_of(small_world, "train")) and all(v == 1 for v in shard_reads.values())
    assert_same_batches(cached, batches_over_passes(module(small_world, cache_mb=0, **kw), n))


def test_negative_cache_size_is_a_startup_error(small_world):
    with pytest.raises(ValueError, match="data.cache_mb"):
        WorldDataModule(world_dir=str(small_world), cache_mb=-1)
