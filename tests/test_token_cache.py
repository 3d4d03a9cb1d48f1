"""The token cache on disk (``data.token_cache``): a run stores the tokenized documents of every shard
it read whole, and the next run with the same tokenizer, settings and code starts from them: the same
batches, the same bad-sample counts and errors, and not one tar read."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import omnifuse.data.stream as stream_module
from omnifuse.data.datamodule import shards_of
from omnifuse.data.samples import BadSample
from omnifuse.data.stream import PackedShardStream, TooManyBadSamples
from omnifuse.data.token_cache import TokenCache, pack_docs, pack_values, unpack_docs, unpack_values
from test_data_inputs import BAD, own_sample, text_doc, write_shard
from test_loader_cache import assert_same_batches, batches_over_passes, module, one_pass_batches, shard_reads  # noqa: F401 (fixture)


def one_pass(dm) -> list[dict]:
    """The batches of one pass over the training shards (a finite stream)."""
    return list(dm._stream(dm.train_shards(), train=False))


def n_docs(batches) -> int:
    return sum(int(row.max()) + 1 for b in batches for row in b["doc_ids"])


def cache_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.pt"))


@pytest.mark.parametrize("kw", [{}, {"format": "image_pairs", "hard_negatives": True, "row_len": 64},
                                {"format": "audio_pairs", "row_len": 64}],
                         ids=["packed", "image_pairs+negatives", "audio_pairs"])
def test_a_second_run_reads_no_tar_and_gets_the_same_batches(small_world, shard_reads, tmp_path, kw):
    train = shards_of(small_world, "train")
    n = 2 * one_pass_batches(module(small_world, **kw))
    reference = batches_over_passes(module(small_world, cache_mb=0, **kw), n)
    shard_reads.clear()
    first = batches_over_passes(module(small_world, token_cache=str(tmp_path / "tc"), **kw), n)
    assert len(cache_files(tmp_path / "tc")) == len(train) and all(shard_reads[s] == 1 for s in train)
    shard_reads.clear()
    second = batches_over_passes(module(small_world, token_cache=str(tmp_path / "tc"), **kw), n)
    assert not shard_reads, f"the second run read tars: {dict(shard_reads)}"
    assert_same_batches(first, reference)
    assert_same_batches(second, reference)
    # and without the in-memory cache (every pass from the disk cache)
    shard_reads.clear()
    assert_same_batches(batches_over_passes(module(small_world, token_cache=str(tmp_path / "tc"), cache_mb=0, **kw), n),
                        reference)
    assert not shard_reads


def test_the_default_folder_is_under_the_world_and_its_fingerprint_is_described(small_world, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(small_world, world, ignore=shutil.ignore_patterns("token-cache"))
    dm = module(world, token_cache="token-cache")
    one_pass(dm)
    (fp_dir,) = (world / "token-cache").iterdir()
    info = (fp_dir / "fingerprint.json").read_text()
    assert '"tokenizer_sha256"' in info and '"source_sha256"' in info and '"patch": 8' in info
    assert len(list(fp_dir.glob("*.pt"))) == len(shards_of(world, "train"))
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in fp_dir.iterdir())  # readable by the world's other users


@pytest.mark.parametrize("change", [{"patch": 4, "row_len": 1024}, {"positions": "1d"}, {"media": "marker"}, {"tasks": ["vqa"]},
                                    {"format": "image_pairs", "row_len": 64}])
def test_a_setting_that_changes_documents_gets_its_own_cache(small_world, tmp_path, shard_reads, change):
    one_pass(module(small_world, token_cache=str(tmp_path)))
    shard_reads.clear()
    changed = module(small_world, token_cache=str(tmp_path), **change)
    got = one_pass(changed)
    assert all(shard_reads[s] == 1 for s in shards_of(small_world, "train")), "read from another setting's cache"
    assert_same_batches(got, one_pass(module(small_world, **change)))
    assert len(list(tmp_path.iterdir())) == 2


def test_settings_that_do_not_change_documents_share_the_cache(small_world, tmp_path, shard_reads):
    one_pass(module(small_world, token_cache=str(tmp_path)))
    shard_reads.clear()
    one_pass(module(small_world, token_cache=str(tmp_path), batch_size=2, row_len=128, shuffle_buffer=4, seed=3))
    assert not shard_reads


def test_a_changed_tokenizer_or_source_is_a_new_fingerprint(small_world, monkeypatch):
    settings = module(small_world)._document_settings(train=True)
    a = TokenCache("x", settings)
    b = TokenCache("x", {**settings, "tokenizer_sha256": "0" * 64})
    monkeypatch.setattr("omnifuse.data.token_cache.source_hash", lambda: "edited")
    c = TokenCache("x", settings)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3


def test_a_rewritten_shard_is_read_again(tmp_path, shard_reads):
    shard = write_shard(tmp_path / "s.tar", [own_sample(f"k{i}") for i in range(3)])
    cache = TokenCache(tmp_path / "tc", {"test": 1})
    kw = dict(repeat=False, shuffle_buffer=0, batch_size=1, token_cache=cache)
    assert n_docs(PackedShardStream([shard], text_doc, 64, **kw)) == 3
    write_shard(tmp_path / "s.tar", [own_sample(f"k{i}") for i in range(2)])
    os.utime(shard, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    shard_reads.clear()
    assert n_docs(PackedShardStream([shard], text_doc, 64, **kw)) == 2 and shard_reads[shard] == 1


def test_bad_samples_are_counted_and_raised_as_when_read(tmp_path, shard_reads):
    shard = write_shard(tmp_path / "s.tar", [own_sample("g0"), BAD["image"], own_sample("g1"), BAD["json"],
                                             own_sample("g2")])

    def run(cache, mode="skip", max_fraction=0.5):
        stream = PackedShardStream([shard], text_doc, 64, repeat=False, shuffle_buffer=0, batch_size=1,
                                   bad_samples=mode, max_bad_fraction=max_fraction, token_cache=cache)
        stream.policy.min_seen = 1
        return [b["tokens"] for b in stream], stream.policy  # one row of the three 20-slot documents

    cache = TokenCache(tmp_path / "tc", {"test": 1})
    rows, policy = run(cache)
    assert shard_reads[shard] == 1 and len(rows) == 1
    shard_reads.clear()
    replayed, replay_policy = run(cache)
    assert not shard_reads and cache.hits == 1
    assert len(replayed) == 1 and torch.equal(rows[0], replayed[0])
    assert replay_policy.skipped == policy.skipped == {"image": 1, "json": 1} and replay_policy.seen == policy.seen == 5
    with pytest.raises(BadSample, match="s.tar.*'bad'.*'0.png'"):
        run(cache, mode="error")
    with pytest.raises(TooManyBadSamples):
        run(cache, max_fraction=0.3)
    assert not shard_reads


def test_a_shard_not_read_whole_is_not_stored(small_world, tmp_path):
    stream = module(small_world, token_cache=str(tmp_path))._stream(shards_of(small_world, "train"), train=True)
    next(iter(stream))
    assert not cache_files(tmp_path)


def test_a_damaged_cache_file_is_read_from_the_tar_with_a_warning(small_world, tmp_path, shard_reads, caplog):
    reference = one_pass(module(small_world))
    one_pass(module(small_world, token_cache=str(tmp_path)))
    damaged = cache_files(tmp_path)[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    shard_reads.clear()
    assert_same_batches(one_pass(module(small_world, token_cache=str(tmp_path))), reference)
    assert sum(shard_reads.values()) == 1 and "cannot read" in caplog.text and damaged.name in caplog.text


def test_an_unwritable_folder_warns_once_and_the_run_goes_on(small_world, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    got = one_pass(module(small_world, token_cache=str(blocker / "tc")))
    assert_same_batches(got, one_pass(module(small_world)))
    assert caplog.text.count("cannot write") == 1


def test_documents_survive_packing_exactly(small_world):
    dm = module(small_world, format="image_pairs", hard_negatives=True, row_len=64)
    stream = dm._stream(dm.train_shards(), train=True)
    pairs = list(stream._shard_docs(shards_of(small_world, "train")[0], stream_module._DocCache(0)))
    docs = list(module(small_world)._stream(dm.train_shards(), train=False)._shard_docs(
        shards_of(small_world, "train")[0], stream_module._DocCache(0)))
    first = next(i for i, doc in enumerate(pairs) if doc)
    # a pair without a negative (a caption with no word to swap) beside pairs with one
    pairs[first] = [dataclasses.replace(pairs[first][0], negative=None, negative_caption=None), *pairs[first][1:]]
    for original in (pairs, docs):
        back = unpack_docs(pack_docs(original))
        assert len(back) == len(original) and any(original)
        for a, b in zip(original, back):
            assert _same(a, b)
    assert any(p.negative is None for doc in pairs for p in doc) and any(p.negative is not None for doc in pairs for p in doc)


def test_a_loaded_document_is_mapped_copy_on_write(small_world, tmp_path):
    shard = shards_of(small_world, "train")[0]
    dm = module(small_world)
    docs = list(dm._stream(dm.train_shards(), train=False)._shard_docs(shard, stream_module._DocCache(0)))
    cache = TokenCache(tmp_path, {"test": 1})
    cache.save(shard, docs, ["o", "d"], Counter({"text": 2}))
    loaded, events, filtered = cache.load(shard)
    assert events == ["o", "d"] and filtered == Counter({"text": 2})
    first = loaded[0].stream.tokens
    want = first.clone()
    first.add_(1)  # a consumer writing into a loaded tensor changes its own copy, never the file
    again, _, _ = cache.load(shard)
    assert torch.equal(again[0].stream.tokens, want) and _same(again[1:], docs[1:])


def test_string_columns_are_joined_and_anything_else_kept():
    for values in (["a", None, "", "bc"], [], [None], ["x"]):
        packed = pack_values(values)
        assert "joined" in packed and unpack_values(packed) == values
    for values in (["a\x00b", "c"], [1, "a"], [["s", "k"], "o"]):  # the separator inside, or not strings
        packed = pack_values(values)
        assert packed == {"values": values} and unpack_values(packed) == values
    with pytest.raises(ValueError, match="2 joined strings for 3 values"):
        unpack_values({"joined": "a\x00b", "n": 3, "none": torch.zeros(3, dtype=torch.bool)})


def _same(a, b) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b
