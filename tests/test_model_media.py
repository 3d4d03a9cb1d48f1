"""Media layout: grouping a packed batch's patch slots per image / clip, with grid coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnifuse.model.media import group_patches, media_layout, ungroup
from omnifuse.tokenizers.interleave import _StreamBuilder
from omnifuse.tokenizers.stream import AUDIO, IMAGE
from omnifuse.tokenizers.text import AUD_END_ID, AUD_ID, IMG_END_ID, IMG_ID

D_IMG, D_AUD = 3, 2


def coded_grid(item: int, rows: int, cols: int, d: int) -> np.ndarray:
    """A (rows, cols, d) grid whose every feature holds 100*item + 10*row + col."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.repeat((100 * item + 10 * r + c)[..., None], d, axis=-1).astype(np.float32)


def stream(media: list[tuple[int, int, int, int]]):
    """A document: text, then each (kind, item code, rows, cols) medium wrapped in its markers, then text."""
    b = _StreamBuilder("mrope", D_IMG, D_AUD)
    b.text([20, 21])
    for kind, code, rows, cols in media:
        opener, closer, d = (IMG_ID, IMG_END_ID, D_IMG) if kind == IMAGE else (AUD_ID, AUD_END_ID, D_AUD)
        b.token(opener)
        b.grid(coded_grid(code, rows, cols, d), kind)
        b.token(closer)
        b.text([22])
    return b.build()


def batch(*rows):
    """Pack streams (lists of streams per row) into a (B, L) batch, padding with pad id 0 / TEXT."""
    docs = [[s for s in row] for row in rows]
    length = max(sum(len(s) for s in row) for row in docs) + 3
    tokens = torch.zeros(len(docs), length, dtype=torch.long)
    modality = torch.zeros_like(tokens)
    img, aud = [], []
    for i, row in enumerate(docs):
        at = 0
        for s in row:
            tokens[i, at : at + len(s)] = s.tokens
            modality[i, at : at + len(s)] = s.modality
            img.append(s.image_patches)
            aud.append(s.audio_patches)
            at += len(s)
    return tokens, modality, torch.cat(img), torch.cat(aud)


def test_layout_groups_patches_per_item_with_grid_coordinates():
    row0 = [stream([(IMAGE, 1, 2, 3), (AUDIO, 2, 4, 2)]), stream([(IMAGE, 3, 3, 3)])]
    row1 = [stream([(AUDIO, 4, 1, 5), (IMAGE, 5, 2, 2), (IMAGE, 6, 1, 1)])]
    tokens, modality, img, aud = batch(row0, row1)

    lay = media_layout(tokens, modality, IMAGE)
    assert lay.n_items == 4
    assert lay.counts.tolist() == [6, 9, 4, 1]
    assert lay.row.tolist() == [0, 0, 1, 1]
    assert (tokens[lay.row, lay.start] == IMG_ID).all() and (tokens[lay.row, lay.end] == IMG_END_ID).all()
    grouped, grid, mask = group_patches(img, lay)
    assert grouped.shape == (4, 9, D_IMG) and mask.sum(1).tolist() == [6, 9, 4, 1]
    for m, (code, rows, cols) in enumerate([(1, 2, 3), (3, 3, 3), (5, 2, 2), (6, 1, 1)]):
        n = rows * cols
        expect = torch.from_numpy(coded_grid(code, rows, cols, D_IMG).reshape(n, D_IMG))
        torch.testing.assert_close(grouped[m, :n], expect)
        assert torch.equal(grouped[m, n:], torch.zeros(9 - n, D_IMG))
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        assert torch.equal(grid[m, :n], torch.stack([r.flatten(), c.flatten()], 1))
    torch.testing.assert_close(ungroup(grouped, mask), img)

    alay = media_layout(tokens, modality, AUDIO)
    assert alay.counts.tolist() == [8, 5] and alay.row.tolist() == [0, 1]
    agrouped, agrid, amask = group_patches(aud, alay)
    torch.testing.assert_close(agrouped[0, :8], torch.from_numpy(coded_grid(2, 4, 2, D_AUD).reshape(8, D_AUD)))
    assert agrid[1, :5].tolist() == [[0, c] for c in range(5)]
    torch.testing.assert_close(ungroup(agrouped, amask), aud)


def test_layout_of_a_batch_without_media_is_empty():
    tokens, modality, img, _ = batch([stream([])])
    lay = media_layout(tokens, modality, IMAGE)
    grouped, grid, mask = group_patches(img, lay)
    assert lay.n_items == 0 and grouped.shape == (0, 0, D_IMG) and mask.shape == (0, 0)


def test_broken_layout_is_refused():
    tokens, modality, _, _ = batch([stream([(IMAGE, 1, 2, 2)])])
    no_close = tokens.clone()
    no_close[no_close == IMG_END_ID] = 30
    with pytest.raises(ValueError, match="unbalanced"):
        media_layout(no_close, modality, IMAGE)
    stray = modality.clone()
    stray[0, 0] = IMAGE  # a patch slot before <img>
    with pytest.raises(ValueError, match="outside its media markers"):
        media_layout(tokens, stray, IMAGE)


def test_markers_around_no_patch_are_text_not_items():
    """A generated ``<img>`` / ``</aud>``, or a ``data.media: marker`` pair, encloses no patch: the
    layout of the real items around it is unchanged."""
    row = [stream([(IMAGE, 1, 2, 3), (AUDIO, 2, 2, 2)])]
    tokens, modality, img, aud = batch(row)
    # text after the media: stray markers, a marker-mode pair, and an opener in the row's last slot
    tail = torch.tensor([[IMG_ID, 30, IMG_END_ID, AUD_END_ID, IMG_ID, AUD_ID, AUD_END_ID, 30, IMG_ID]])
    stray, strays_mod = torch.cat([tokens, tail], 1), torch.cat([modality, torch.zeros_like(tail)], 1)
    for kind in (IMAGE, AUDIO):
        want = media_layout(tokens, modality, kind)
        got = media_layout(stray, strays_mod, kind)
        for field in ("item", "grid", "row", "start", "end", "counts"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (kind, field)
    before = tokens.clone()
    before[0, 0] = IMG_END_ID  # a stray closer before the item does not close it
    assert torch.equal(media_layout(before, modality, IMAGE).end, media_layout(tokens, modality, IMAGE).end)
