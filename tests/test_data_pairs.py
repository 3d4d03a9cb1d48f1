"""Pair batches for the contrastive stages: which media get which caption, patches identical to the
packed stream's, duplicate-free batches, exact resume, and the data.format option."""

from __future__ import annotations

from collections import Counter

import random

import pytest
import torch

from omnifuse.data.datamodule import WorldDataModule, shards_of
from omnifuse.data.pairs import (
    CaptionsTooRepetitive,
    Pair,
    PairBatcher,
    PairTokenize,
    SimilarGroups,
    caption_counts,
    check_batch_fits_captions,
    collate_pairs,
    describe_image,
    media_captions,
    one_word_keys,
    upsample_factor,
)
from omnifuse.data.stream import BadSamplePolicy, iter_samples
from omnifuse.data.world import audio_caption_of, caption_of
from omnifuse.model.media import group_patches, media_layout
from omnifuse.tokenizers.stream import AUDIO, IMAGE
from omnifuse.tokenizers.text import BOS_ID, EOS_ID, PAD_ID


def module(world, **kw) -> WorldDataModule:
    kw = {"row_len": 256, "batch_size": 16, "num_workers": 0, "shuffle_buffer": 16, **kw}
    dm = WorldDataModule(world_dir=str(world), **kw)
    dm.setup("fit")
    return dm


def samples(world, split="train"):
    return list(iter_samples(shards_of(world, split), BadSamplePolicy("error")))


def test_every_world_task_gets_its_ground_truth_caption(small_world):
    seen = Counter()
    for s in samples(small_world):
        images, undescribed_img = media_captions(s, "image")
        clips, undescribed_aud = media_captions(s, "audio")
        assert undescribed_img == undescribed_aud == 0, s.key  # every world medium is described
        m = s.meta
        if s.task == "caption":
            assert images == [("0.png", m["caption"])] and m["caption"] == caption_of(m["objects"])
        elif s.task == "audio_caption":
            assert clips == [("0.npy", audio_caption_of(m["events"]))]
        elif s.task == "multi_image":
            assert images == [("0.png", caption_of(m["images"][0]["objects"])),
                              ("1.png", caption_of(m["images"][1]["objects"]))]
        elif s.task == "crossmodal":
            assert images == [("0.png", caption_of(m["objects"]))]
            assert clips == [("1.npy", audio_caption_of(m["events"]))]
        elif s.task == "text":
            assert images == clips == []
        elif m["qtype"] == "ocr":
            want = f"a sign with the word {m['sign']['word']}."
            assert images == [("0.png", want + (" " + caption_of(m["objects"]) if m["objects"] else ""))]
        elif m["qtype"] == "chart":
            assert images[0][1].startswith("a chart where the ") and images[0][1].count(" bar is ") == len(m["bars"])
        seen[s.task if s.task != "vqa" else m["qtype"]] += 1
    assert {"caption", "audio_caption", "multi_image", "crossmodal", "ocr", "chart", "digit"} <= set(seen)


def test_describe_image_wording():
    objs = [{"shape": "circle", "color": "red", "size": "big", "x": 30, "y": 5},
            {"shape": "digit", "digit": 7, "color": "white", "size": "small", "x": 3, "y": 9}]
    bars = [{"color": "red", "value": 3}, {"color": "blue", "value": 5}]
    assert describe_image(objs) == "a small white digit 7 and a big red circle."
    assert describe_image([], sign={"word": "cat"}) == "a sign with the word cat."
    assert describe_image([], bars=bars) == "a chart where the red bar is 3 and the blue bar is 5."
    assert describe_image([]) is None


def test_undescribed_media_are_counted_not_paired(small_world):
    from omnifuse.data.samples import Sample

    dm = module(small_world)
    tok = PairTokenize(dm.interleaver, "image")
    s = next(s for s in samples(small_world) if s.task == "vqa")
    bare = Sample(s.key, s.shard, "vqa", s.segments, {"split": "train", "qtype": "color"}, s.media)
    assert tok(bare) == [] and tok.counts["undescribed"] == 1


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_pair_patches_are_what_the_packed_stream_holds(small_world, kind):
    """Patch values and grid coordinates equal the arms' view of the same medium in a packed stream."""
    dm = module(small_world)
    tok = PairTokenize(dm.interleaver, kind)
    task = "caption" if kind == "image" else "audio_caption"
    s = next(s for s in samples(small_world) if s.task == task)
    (pair,) = tok(s)
    stream = dm.interleaver.encode(s.segments, s.media)
    code = IMAGE if kind == "image" else AUDIO
    layout = media_layout(stream.tokens[None], stream.modality[None], code)
    flat = stream.image_patches if kind == "image" else stream.audio_patches
    patches, grid, mask = group_patches(flat, layout)
    torch.testing.assert_close(pair.patches, patches[0][mask[0]])
    torch.testing.assert_close(pair.grid, grid[0][mask[0]])
    assert pair.text.tolist() == [BOS_ID, *dm.tokenizer.encode(s.meta["caption"]), EOS_ID]
    assert pair.patches.shape == ((36, 192) if kind == "image" else (32, 64))  # 6x6 of 8x8x3; 4 bands x 8 frames


def fake(caption: str, i: int) -> Pair:
    return Pair(torch.full((i % 3 + 1, 2), float(i)), torch.zeros(i % 3 + 1, 2, dtype=torch.long),
                torch.tensor([BOS_ID, 10 + i, EOS_ID][: 2 + i % 2]), caption, key=str(i))


def test_batcher_holds_back_repeated_captions():
    captions = ["a", "b", "a", "c", "a", "b", "d"]
    batcher = PairBatcher(3)
    batches = list(batcher(fake(c, i) for i, c in enumerate(captions)))
    assert [[p.caption for p in b] for b in batches] == [["a", "b", "c"], ["a", "b", "d"], ["a"]]
    assert [[p.key for p in b] for b in batches] == [["0", "1", "3"], ["2", "5", "6"], ["4"]]
    assert batcher.deferred == 2
    with pytest.raises(CaptionsTooRepetitive, match="batch_size=3"):
        list(PairBatcher(3, max_held=4)(fake("same", i) for i in range(10)))


def test_collate_pads_patches_and_text():
    batch = collate_pairs([fake("x", 0), fake("y", 1), fake("z", 2)])
    assert batch["patches"].shape == (3, 3, 2) and batch["text"].shape == (3, 3)
    assert batch["mask"].sum(1).tolist() == [1, 2, 3]
    assert batch["text_lengths"].tolist() == [2, 3, 2]
    assert batch["text"][0].tolist() == [BOS_ID, 10, PAD_ID]
    torch.testing.assert_close(batch["patches"][1], torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    assert batch["captions"] == ["x", "y", "z"]


@pytest.mark.parametrize("fmt, width", [("image_pairs", 192), ("audio_pairs", 64)])
def test_pair_batches_from_the_datamodule(small_world, fmt, width):
    dm = module(small_world, format=fmt)
    batches = list(dm.test_dataloader())
    kind = "image" if fmt == "image_pairs" else "audio"
    expected = sum(len(media_captions(s, kind)[0]) for s in samples(small_world, "test"))
    assert sum(len(b["captions"]) for b in batches) == expected  # every medium once, none dropped
    for b in batches:
        assert len(set(b["captions"])) == len(b["captions"])  # no false negatives inside a batch
        m = len(b["captions"])
        assert b["patches"].shape[0] == m and b["patches"].shape[2] == width
        ends = b["text"][torch.arange(m), b["text_lengths"] - 1]
        assert (ends == EOS_ID).all() and (b["text"][:, 0] == BOS_ID).all()
    assert max(len(b["captions"]) for b in batches) == 16


def test_pair_stream_resumes_exactly(small_world):
    dm = module(small_world, format="image_pairs", batch_size=8)
    whole = dm._stream(dm.train_shards(), train=True)
    first = [b for _, b in zip(range(5), whole)]
    resumed = dm._stream(dm.train_shards(), train=True, skip_batches=3)
    again = [b for _, b in zip(range(2), resumed)]
    for a, b in zip(first[3:], again):
        assert a["captions"] == b["captions"]
        torch.testing.assert_close(a["patches"], b["patches"])


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_caption_counts_read_only_the_json_and_match_the_decoded_samples(small_world, kind):
    want = Counter(c for s in samples(small_world) for _, c in media_captions(s, kind)[0])
    assert caption_counts(shards_of(small_world, "train"), kind) == want
    only = Counter(c for s in samples(small_world) if s.task == "caption" for _, c in media_captions(s, kind)[0])
    assert caption_counts(shards_of(small_world, "train"), kind, tasks=["caption"]) == only
    assert sum(caption_counts(shards_of(small_world, "train"), kind, limit=5).values()) in range(5, 8)


def test_a_batch_larger_than_the_captions_allow_fails_at_start_up(small_world):
    counts = Counter({"a low tone.": 4, "a dog.": 2, "a bell.": 2})  # "a low tone." is half the pairs
    check_batch_fits_captions(counts, 2, "w")
    with pytest.raises(CaptionsTooRepetitive, match=r"'a low tone.' is 4 of the first 8 pairs \(50.0%\).*"
                                                    r"lower data.batch_size to 2 or less"):
        check_batch_fits_captions(counts, 3, "w")
    counts = caption_counts(shards_of(small_world, "train"), "audio")
    fits = sum(counts.values()) // counts.most_common(1)[0][1]
    module(small_world, format="audio_pairs", batch_size=fits)
    with pytest.raises(CaptionsTooRepetitive, match=f"{small_world}/train: data.batch_size={fits + 1} pairs cannot be filled"):
        module(small_world, format="audio_pairs", batch_size=fits + 1)


def test_pairs_respect_data_tasks(small_world):
    dm = module(small_world, format="image_pairs", tasks=["caption"])
    captions = [c for b in dm.test_dataloader() for c in b["captions"]]
    assert sorted(captions) == sorted(s.meta["caption"] for s in samples(small_world, "test") if s.task == "caption")


def test_format_option_is_checked(small_world):
    with pytest.raises(ValueError, match="data.format must be one of packed, image_pairs, audio_pairs"):
        WorldDataModule(world_dir=str(small_world), format="pairs")
    with pytest.raises(ValueError, match="data.media must be inline"):
        WorldDataModule(world_dir=str(small_world), format="audio_pairs", media="marker")


def words_apart(a: str, b: str) -> int:
    x, y = a.split(" "), b.split(" ")
    return sum(u != v for u, v in zip(x, y)) if len(x) == len(y) else 99


def test_one_word_keys_are_shared_exactly_by_captions_one_word_apart():
    caps = ["a small red circle.", "a small red star.", "a big red star.", "a big blue circle.",
            "a small red circle and a big blue star.", "a small red circle and a big blue ring."]
    for a in caps:
        for b in caps:
            shared = set(one_word_keys(a)) & set(one_word_keys(b))
            assert bool(shared) == (words_apart(a, b) <= 1), (a, b)
    assert one_word_keys("a big star.") == ["* big star.", "a * star.", "a big *"]


def test_similar_groups_reorder_every_pair_into_runs_one_word_apart():
    colours, shapes, sizes = ["red", "blue", "green"], ["circle", "star", "ring", "cross"], ["small", "big"]
    caps = [f"a {z} {c} {s}." for z in sizes for c in colours for s in shapes] * 2  # each caption twice
    random.Random(0).shuffle(caps)
    pairs = [fake(c, i) for i, c in enumerate(caps)]
    groups = SimilarGroups(group=4, pool=16)
    runs = list(groups.runs(iter(pairs), random.Random(1)))
    out = [p for r in runs for p in r]
    assert sorted(p.key for p in out) == sorted(p.key for p in pairs)  # a permutation: each pair once
    assert groups.counts["pairs"] == len(pairs)
    for r in runs:
        assert len(r) <= groups.group  # never longer than asked
        assert len({p.caption for p in r}) == len(r)  # and never the same caption twice
        assert all(words_apart(r[0].caption, p.caption) == 1 for p in r[1:])
    # 48 pairs in a pool of 16, 24 captions with 6 neighbours each: most runs are full (only the last
    # pairs, drained from an emptying pool, find few neighbours)
    assert sum(len(r) == 4 for r in runs) >= 6 and groups.counts["grouped"] >= 40
    assert groups.counts["grouped"] == sum(len(r) for r in runs if len(r) > 1)
    assert [p.key for p in groups(iter(pairs), random.Random(1))] == [p.key for p in out]  # same order flat
    again = list(SimilarGroups(group=4, pool=16)(iter(pairs), random.Random(1)))
    assert [p.key for p in again] == [p.key for p in out]  # the generator alone decides the order
    with pytest.raises(ValueError, match="group >= 2 and pool >= group"):
        SimilarGroups(group=4, pool=3)


def test_hard_batches_from_the_datamodule_resume_exactly_and_are_checked(small_world):
    def neighbours(batches):  # captions one word from the caption before them
        return sum(words_apart(a, b) == 1 for batch in batches
                   for a, b in zip(batch["captions"], batch["captions"][1:]))

    dm = module(small_world, format="image_pairs", batch_size=8, hard_batches=4, hard_batch_pool=256)
    stream = dm._stream(dm.train_shards(), train=True)
    first = [b for _, b in zip(range(5), stream)]
    for b in first:
        assert len(set(b["captions"])) == len(b["captions"]) == 8
    assert stream.groups.counts["grouped"] >= 15  # of the 40 pairs out so far
    assert neighbours(first) >= 5
    random_batches = module(small_world, format="image_pairs", batch_size=8)._stream(dm.train_shards(), train=True)
    assert random_batches.groups is None and neighbours(b for _, b in zip(range(5), random_batches)) <= 1
    assert dm._stream(dm.train_shards(), train=False).groups is None  # validation keeps random batches
    resumed = dm._stream(dm.train_shards(), train=True, skip_batches=3)
    for a, b in zip(first[3:], [b for _, b in zip(range(2), resumed)]):
        assert a["captions"] == b["captions"]
        torch.testing.assert_close(a["patches"], b["patches"])
    with pytest.raises(ValueError, match="data.hard_batches is for the contrastive stages"):
        WorldDataModule(world_dir=str(small_world), hard_batches=4)
    with pytest.raises(ValueError, match="data.hard_batch_pool >= it"):
        WorldDataModule(world_dir=str(small_world), format="image_pairs", hard_batches=8, hard_batch_pool=4)


def test_upsample_factor_takes_the_question_type_before_the_task():
    up = {"vqa": 2, "digit": 5}
    assert upsample_factor(up, "vqa/digit") == 5 and upsample_factor(up, "vqa/shape") == 2
    assert upsample_factor(up, "caption/caption") == 1


def test_upsample_sees_a_sources_pairs_k_times_a_pass_and_only_in_training(small_world):
    up = {"shape": 3, "caption": 2}
    dm = module(small_world, format="image_pairs", batch_size=8, shuffle_buffer=512, upsample=up)
    stream = dm._stream(dm.train_shards(), train=True)
    stream.repeat = False  # one pass over the shards, then the batcher flushes
    batches = list(stream)
    want, copies = Counter(), Counter()
    for s in samples(small_world):
        k = {"shape": 3, "caption": 2}.get(s.meta["qtype"], 1)
        for _, caption in media_captions(s, "image")[0]:
            want[caption] += k
            copies[f"{s.task}/{s.meta['qtype']}"] += k - 1
    assert Counter(c for b in batches for c in b["captions"]) == want  # every pair k times, nothing else
    assert copies["vqa/shape"] > 0 and copies["caption/caption"] > 0
    assert stream.copies == +copies
    for b in batches:
        assert len(set(b["captions"])) == len(b["captions"])  # copies never meet in one batch
    # the start-up check counts what the stream will see
    assert caption_counts(shards_of(small_world, "train"), "image", upsample=up) == want
    assert dm._stream(dm.train_shards(), train=False).upsample == {}  # validation scores the world's mix
    resumed = dm._stream(dm.train_shards(), train=True, skip_batches=3)
    again = dm._stream(dm.train_shards(), train=True)
    for a, b in zip([b for _, b in zip(range(5), again)][3:], [b for _, b in zip(range(2), resumed)]):
        assert a["captions"] == b["captions"]


def test_upsample_option_is_checked(small_world):
    with pytest.raises(ValueError, match="data.upsample is for the contrastive stages"):
        WorldDataModule(world_dir=str(small_world), upsample={"digit": 2})
    with pytest.raises(ValueError, match="'digits' is neither a world task nor a question type"):
        WorldDataModule(world_dir=str(small_world), format="image_pairs", upsample={"digits": 2})
    with pytest.raises(ValueError, match="the factor of 'digit' must be an integer >= 1, got 0"):
        WorldDataModule(world_dir=str(small_world), format="image_pairs", upsample={"digit": 0})
