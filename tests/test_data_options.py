"""The data options of WorldDataModule: ``data.tasks`` (which world tasks reach the model) and
``data.media`` (inline patches, markers only, or no media), asserted on real packed batches."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from omnifuse.data.datamodule import WorldDataModule, shards_of
from omnifuse.data.packing import IGNORE
from omnifuse.data.stream import BadSamplePolicy, iter_samples
from omnifuse.data.world import TASKS
from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT
from omnifuse.tokenizers.text import AUD_END_ID, AUD_ID, IMG_END_ID, IMG_ID, ROW_ID


def module(world, **kw) -> WorldDataModule:
    dm = WorldDataModule(world_dir=str(world), row_len=256, batch_size=4, num_workers=0, shuffle_buffer=16,
                         pack_pool=8, **kw)
    dm.setup("fit")
    return dm


def split_tasks(world, split: str) -> Counter:
    return Counter(s.task for s in iter_samples(shards_of(world, split), BadSamplePolicy("error")))


def doc_tasks(batches) -> Counter:
    """Task of every document of the batches (from the label of its target slots)."""
    out = Counter()
    for b in batches:
        for row_doc, row_task in zip(b["doc_ids"], b["label_task"]):
            for d in row_doc[row_doc >= 0].unique().tolist():
                tasks = row_task[(row_doc == d) & (row_task >= 0)].unique().tolist()
                assert len(tasks) == 1, tasks  # every document here has a target
                out[TASKS[tasks[0]]] += 1
    return out


def test_tasks_filter_reaches_the_batches_and_counts_the_rest(small_world):
    keep = ["text", "audio_qa"]
    dm = module(small_world, tasks=keep)
    stream = dm._stream(shards_of(small_world, "test"), train=False)
    batches = list(stream)
    have = split_tasks(small_world, "test")
    assert doc_tasks(batches) == Counter({t: n for t, n in have.items() if t in keep})
    assert stream.filtered == Counter({t: n for t, n in have.items() if t not in keep})
    assert not stream.policy.skipped and stream.policy.seen == sum(have.values())
    assert not any((b["modality"] == IMAGE).any() for b in batches)  # text and audio QA have no image

    # the training stream (shuffled, repeating) is filtered too
    train = dm._stream(dm.train_shards(), train=True)
    seen = doc_tasks(b for _, b in zip(range(3), train))
    assert set(seen) <= set(keep) and sum(seen.values()) > 0


def test_unknown_task_names_are_a_startup_error_listing_the_valid_ones(small_world):
    with pytest.raises(ValueError, match=r"data.tasks: unknown task\(s\) \['VQA'\].*valid tasks: caption, audio_caption"):
        WorldDataModule(world_dir=str(small_world), tasks=["text", "VQA"])
    with pytest.raises(ValueError, match="data.tasks"):
        WorldDataModule(world_dir=str(small_world), tasks=[])
    with pytest.raises(ValueError, match="data.media must be one of inline, marker, drop"):
        WorldDataModule(world_dir=str(small_world), media="none")


@pytest.mark.parametrize("mode", ["marker", "drop"])
def test_media_modes_on_real_batches(small_world, mode):
    """No patch or <row> slot, positions 0, 1, 2, … in every document; markers once per medium."""
    split = "val"
    samples = list(iter_samples(shards_of(small_world, split), BadSamplePolicy("error")))
    n_img = sum(seg.get("media") == "image" for s in samples for seg in s.segments)
    n_aud = sum(seg.get("media") == "audio" for s in samples for seg in s.segments)
    assert n_img > 0 and n_aud > 0
    dm = module(small_world, media=mode)
    batches = list(dm._stream(shards_of(small_world, split), train=False))
    tokens = torch.cat([b["tokens"][b["doc_ids"] >= 0] for b in batches])
    assert all((b["modality"] == TEXT).all() for b in batches)
    assert all(b["image_patches"].shape[0] == 0 and b["audio_patches"].shape[0] == 0 for b in batches)
    assert int((tokens == ROW_ID).sum()) == 0
    expect_img, expect_aud = (n_img, n_aud) if mode == "marker" else (0, 0)
    assert int((tokens == IMG_ID).sum()) == int((tokens == IMG_END_ID).sum()) == expect_img
    assert int((tokens == AUD_ID).sum()) == int((tokens == AUD_END_ID).sum()) == expect_aud
    docs = 0
    for b in batches:
        for doc_ids, pos in zip(b["doc_ids"], b["positions"]):
            for d in doc_ids[doc_ids >= 0].unique():
                p = pos[doc_ids == d]  # (n, 3)
                ar = torch.arange(p.shape[0])
                torch.testing.assert_close(p, torch.stack([ar, ar, ar], dim=1))
                docs += 1
    assert docs == len(samples)
    # labels still point at targets only (answers, captions, prose), never at a marker
    labels = torch.cat([b["labels"][b["labels"] != IGNORE] for b in batches])
    assert not set(labels.tolist()) & {IMG_ID, IMG_END_ID, AUD_ID, AUD_END_ID}
