"""Hard-negative captions for the contrastive stages (NegCLIP's swapped words, ``data.hard_negatives``):
the swap, the loss with extra negative columns against a hand computation, the batch's mask, the
stream, the FLOPs."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from omnifuse.data.datamodule import WorldDataModule
from omnifuse.data.pairs import Pair, collate_pairs, hard_negative, swap_classes
from omnifuse.model.encoders import ContrastiveConfig, clip_loss
from test_model_encoders import reference_infonce

VOCAB = {"shapes": ["circle", "square", "star"], "colors": ["red", "blue"], "sizes": ["small", "big"],
         "numbers": ["1", "2"], "relations": ["left of"]}


def test_a_hard_negative_swaps_one_attribute_word_within_its_class():
    classes = swap_classes(VOCAB)
    assert classes["circle"] == ("square", "star") and "left" not in classes and "of" not in classes
    caption = "a big red circle and a small blue digit 2."
    seen = set()
    for seed in range(40):
        neg = hard_negative(caption, classes, random.Random(seed))
        a, b = caption.split(), neg.split()
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(diff) == 1, neg
        old, new = (w.rstrip(".") for w in diff[0])
        assert new in classes[old]
        seen.add(old)
        assert hard_negative(caption, classes, random.Random(seed)) == neg  # a pure function of the generator
    assert seen == {"big", "red", "circle", "small", "blue", "2"}  # every attribute word gets swapped some time
    assert hard_negative("describe the image.", classes, random.Random(0)) is None


def reference_negclip(media, text, negatives, mask, scale):
    """NegCLIP's loss written out: medium i against the M captions and its usable negatives; text -> media as CLIP."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    a, b, c = [unit(v) for v in media], [unit(v) for v in text], [unit(v) for v in negatives]
    dot = lambda u, v: scale * sum(x * y for x, y in zip(u, v))  # noqa: E731
    k = len(a)
    m2t = 0.0
    for i in range(k):
        cols = [dot(a[i], b[j]) for j in range(k)] + [dot(a[i], c[j]) for j in range(k) if mask[i][j]]
        m2t += -dot(a[i], b[i]) + math.log(sum(math.exp(x) for x in cols))
    t2m = sum(-dot(a[j], b[j]) + math.log(sum(math.exp(dot(a[i], b[j])) for i in range(k))) for j in range(k))
    return (m2t / k + t2m / k) / 2


def test_clip_loss_with_negatives_matches_a_hand_computed_case():
    media = [[1.0, 0.0], [0.6, 0.8], [-1.0, 2.0]]
    text = [[2.0, 0.5], [0.0, 1.0], [-0.3, 0.4]]
    negatives = [[1.0, 0.1], [0.5, -1.0], [0.2, 0.9]]
    mask = [[True, True, False], [True, False, True], [False, False, False]]
    for scale in (1.0, 1 / 0.07):
        got = clip_loss(torch.tensor(media), torch.tensor(text), torch.tensor(math.log(scale)),
                        torch.tensor(negatives), torch.tensor(mask))
        torch.testing.assert_close(got, torch.tensor(reference_negclip(media, text, negatives, mask, scale)))
        # no usable negative: CLIP's loss exactly; negatives only ever add to the media -> text side
        none = clip_loss(torch.tensor(media), torch.tensor(text), torch.tensor(math.log(scale)),
                         torch.tensor(negatives), torch.zeros(3, 3, dtype=torch.bool))
        torch.testing.assert_close(none, torch.tensor(reference_infonce(media, text, scale)))
        assert got > none


def _pair(caption, negative):
    text = torch.tensor([1, 5, 2])
    return Pair(torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.long), text, caption,
                negative=None if negative is None else torch.tensor([1, 6, 7, 2]), negative_caption=negative)


def test_a_negative_that_is_another_pairs_caption_is_masked_for_that_pair():
    batch = collate_pairs([_pair("a red star.", "a blue star."), _pair("a blue star.", "a blue circle."),
                           _pair("a sign.", None)])
    assert batch["neg_mask"].tolist() == [[True, True, False],    # medium 0: its own negative and pair 1's
                                          [False, True, False],   # medium 1: pair 0's negative is its own caption
                                          [True, True, False]]    # pair 2 has no negative: a column no one uses
    assert batch["neg_text"].shape == (3, 4) and batch["neg_text_lengths"].tolist() == [4, 4, 2]
    assert "neg_text" not in collate_pairs([_pair("a red star.", None)])


def test_the_stream_brings_negatives_to_training_batches_only_and_the_model_counts_them(small_world):
    def module(**kw):
        dm = WorldDataModule(world_dir=str(small_world), row_len=64, batch_size=8, num_workers=0, shuffle_buffer=16,
                             format="image_pairs", **kw)
        dm.setup("fit")
        return dm

    dm = module(hard_negatives=True)
    batch = next(iter(dm._stream(dm.train_shards(), train=True)))
    vocab = json.loads((small_world / "world.json").read_text())["vocabulary"]
    classes = swap_classes(vocab)
    for caption, neg in zip(batch["captions"], batch["neg_captions"]):
        if neg is not None:
            diff = [(x, y) for x, y in zip(caption.split(), neg.split()) if x != y]
            assert len(diff) == 1 and diff[0][1].rstrip(".,") in classes[diff[0][0].rstrip(".,")]
    assert sum(n is not None for n in batch["neg_captions"]) >= 6
    again = next(iter(module(hard_negatives=True)._stream(dm.train_shards(), train=True)))
    assert again["neg_captions"] == batch["neg_captions"]  # reproducible: exact resume regenerates them
    assert "neg_text" not in next(iter(dm.val_dataloader()))
    plain = next(iter(module()._stream(dm.train_shards(), train=True)))
    assert plain["captions"] == batch["captions"] and "neg_text" not in plain

    from omnifuse.model.config import DecoderConfig
    from omnifuse.model.encoders import EncoderSize
    from omnifuse.training.contrastive import ContrastiveModule

    lit = ContrastiveModule(ContrastiveConfig(
        decoder=DecoderConfig(vocab_size=768, dim=32, n_layers=2, n_heads=2, ffn_hidden=64, attention="sdpa"),
        encoder=EncoderSize(dim=32, n_layers=2, n_heads=2, ffn_hidden=64), modality="image", patch=8, embed_dim=16))
    model = lit.model
    # the loss: CLIP's on the pairs, the negatives' embeddings as extra media -> text columns under neg_mask
    media, text = model(batch)
    negatives = model.encode_text(batch["neg_text"], batch["neg_text_lengths"])
    torch.testing.assert_close(model.loss(batch), clip_loss(media, text, model.clamped_logit_scale(), negatives,
                                                            batch["neg_mask"]))
    torch.testing.assert_close(model.loss(plain), clip_loss(media, text, model.clamped_logit_scale()))
    # FLOPs: the negative captions cost what the same captions cost as the batch's own text
    m, n_max = batch["mask"].shape
    media_flops = 3 * m * model.encoder.forward_flops(n_max)
    assert lit.step_flops(batch) == pytest.approx(
        lit.step_flops(plain) + lit.step_flops({**plain, "text": batch["neg_text"]}) - media_flops, rel=1e-12)
    assert lit.step_flops(batch) > lit.step_flops(plain)
    assert int(lit.count_slots(batch)[0]) == int(batch["text_lengths"].sum() + batch["neg_text_lengths"].sum())


def test_hard_negatives_are_for_pair_formats_only(small_world):
    with pytest.raises(ValueError, match="data.hard_negatives is for the contrastive stages"):
        WorldDataModule(world_dir=str(small_world), hard_negatives=True)
