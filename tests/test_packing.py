import random

import pytest
import torch

from omnifuse.data.packing import IGNORE, PAD_DOC, RowPacker, Doc, build_row, collate_rows, labels_of
from omnifuse.tokenizers.stream import IMAGE, TEXT, Stream


def make_stream(n: int, n_img: int = 0, target_from: int | None = None, seed: int = 0) -> Stream:
    """n slots: BOS-like text, then n_img image slots, then text; targets from `target_from` on."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, 100, (n,), generator=g)
    modality = torch.full((n,), TEXT)
    modality[1 : 1 + n_img] = IMAGE
    tokens[modality == IMAGE] = 0
    target = torch.zeros(n, dtype=torch.bool)
    if target_from is not None:
        target[target_from:] = True
    target &= modality == TEXT
    pos = torch.arange(n).unsqueeze(1).expand(n, 3).clone()
    return Stream(tokens, modality, pos, target, torch.randn(n_img, 12, generator=g), torch.zeros(0, 4))


def test_labels_predict_next_target_only():
    s = make_stream(6, target_from=4)
    labels = labels_of(s)
    # slot 3 predicts slot 4 (target), slot 4 predicts slot 5 (target); nothing else has a label
    assert labels.tolist() == [IGNORE, IGNORE, IGNORE, int(s.tokens[4]), int(s.tokens[5]), IGNORE]


def test_build_row_layout_and_no_label_crosses_documents():
    a, b = make_stream(5, n_img=2, target_from=3, seed=1), make_stream(4, target_from=1, seed=2)
    row = build_row([Doc(a, 0), Doc(b, 3)], row_len=12)
    assert row["doc_ids"].tolist() == [0] * 5 + [1] * 4 + [PAD_DOC] * 3
    assert torch.equal(row["tokens"][:5], a.tokens) and torch.equal(row["tokens"][5:9], b.tokens)
    assert torch.equal(row["positions"][5:9], b.positions)  # positions restart per document
    # the last slot of document a must not predict the first slot of document b
    assert row["labels"][4] == IGNORE
    assert row["labels"][9:].eq(IGNORE).all()
    assert row["label_task"].tolist() == [-1, -1, 0, 0, -1, 3, 3, 3, -1, -1, -1, -1]
    assert torch.equal(row["image_patches"], a.image_patches)


def test_block_causal_mask_from_doc_ids_has_no_cross_document_edge():
    docs = [Doc(make_stream(n, seed=n), 0) for n in (7, 3, 5)]
    row = build_row(docs, row_len=16)
    d = row["doc_ids"]
    i = torch.arange(16)
    mask = (d[:, None] == d[None, :]) & (i[None, :] <= i[:, None])
    for q in range(16):
        for k in range(16):
            if mask[q, k]:
                assert d[q] == d[k]
    assert not mask[7, 6] and mask[7, 7]  # first slot of doc 1 sees only itself


def test_row_overflow_is_an_error_naming_the_sample():
    packer = RowPacker(row_len=8, pool=2)
    with pytest.raises(ValueError, match="'k42'.*longer than a row"):
        list(packer([Doc(make_stream(9), 0, key="k42")]))


def test_packing_is_efficient_and_loses_nothing():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(40, 120), rng.randint(8, 30)]) for _ in range(600)]
    docs = [Doc(make_stream(n, seed=i), 0, key=str(i)) for i, n in enumerate(lengths)]
    packer = RowPacker(row_len=512, pool=64)
    rows = list(packer(docs))
    used = sum(int((r["doc_ids"] >= 0).sum()) for r in rows)
    assert used == sum(lengths)  # every document placed exactly once
    assert packer.efficiency == pytest.approx(used / (len(rows) * 512))
    assert packer.efficiency >= 0.97
    # no document waits long: the oldest waiting one always leads the next row
    assert rows[0]["tokens"][: lengths[0]].equal(docs[0].stream.tokens)


def test_subset_sum_fills_a_row_exactly_when_a_subset_fits():
    # greedy longest-first would take 60 + 30 (= 90) and waste 10; 50 + 25 + 25 fills 100 exactly
    docs = [Doc(make_stream(n, seed=n + i), 0, key=str(i)) for i, n in enumerate([50, 60, 30, 25, 25])]
    packer = RowPacker(row_len=100, pool=5)
    row = next(iter(packer(docs)))
    assert int((row["doc_ids"] >= 0).sum()) == 100
    assert row["tokens"][:50].equal(docs[0].stream.tokens)  # the oldest document leads the row


def test_collate_keeps_patches_in_row_major_slot_order():
    a, b = make_stream(6, n_img=3, seed=3), make_stream(5, n_img=2, seed=4)
    batch = collate_rows([build_row([Doc(a, 0)], 8), build_row([Doc(b, 0)], 8)])
    assert batch["tokens"].shape == (2, 8) and batch["positions"].shape == (2, 8, 3)
    assert int((batch["modality"] == IMAGE).sum()) == batch["image_patches"].shape[0] == 5
    assert torch.equal(batch["image_patches"], torch.cat([a.image_patches, b.image_patches]))
