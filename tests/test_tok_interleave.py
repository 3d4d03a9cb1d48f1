"""Interleaving segments and media into one slot stream: layout, positions, targets, budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnifuse.tokenizers import budget
from omnifuse.tokenizers.audio import log_mel
from omnifuse.tokenizers.image import normalize_pixels, patchify
from omnifuse.tokenizers.interleave import Interleaver, next_position
from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT
from omnifuse.tokenizers.text import (
    AUD_END_ID,
    AUD_ID,
    BOS_ID,
    EOS_ID,
    IMG_END_ID,
    IMG_ID,
    PAD_ID,
    ROW_ID,
    TextTokenizer,
    train_tokenizer,
)

TEXTS = [
    "A red circle is left of a blue square.",
    "How many beeps are there? 2",
    "Is there a green triangle? yes no",
    "Do the beeps match the shapes?",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer(train_tokenizer(TEXTS, 200, tmp_path_factory.mktemp("spm") / "tok.model"))


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_text_only_stream_is_1d(tok):
    il = Interleaver(tok)
    s = il.encode([{"text": "How many beeps are there?"}, {"text": "2", "target": True}], {})
    n = len(s)
    assert n == 2 + len(tok.encode("How many beeps are there?")) + len(tok.encode("2"))
    ar = torch.arange(n)
    torch.testing.assert_close(s.positions, torch.stack([ar, ar, ar], dim=1))
    assert (s.modality == TEXT).all() and s.tokens[0] == BOS_ID and s.tokens[-1] == EOS_ID
    assert s.image_patches.shape == (0, 192) and s.audio_patches.shape == (0, 64)
    k = len(tok.encode("2"))
    assert s.target.tolist() == [False] * (n - k - 1) + [True] * (k + 1)  # answer + EOS are targets


def test_mrope_positions_small_image(tok):
    """Exact (t, h, w) table: BOS, <img>, a 2x3 grid with <row>s, </img>, text, EOS."""
    il = Interleaver(tok, patch=8)
    img = rgb(16, 24)
    s = il.encode([{"media": "image", "file": "0.png"}, {"text": "red", "target": True}], {"0.png": img})
    red = tok.encode("red")
    t0 = 2
    expected = [
        (BOS_ID, TEXT, (0, 0, 0)),
        (IMG_ID, TEXT, (1, 1, 1)),
        (PAD_ID, IMAGE, (t0, t0, t0)), (PAD_ID, IMAGE, (t0, t0, t0 + 1)), (PAD_ID, IMAGE, (t0, t0, t0 + 2)),
        (ROW_ID, TEXT, (t0, t0, t0 + 3)),
        (PAD_ID, IMAGE, (t0, t0 + 1, t0)), (PAD_ID, IMAGE, (t0, t0 + 1, t0 + 1)), (PAD_ID, IMAGE, (t0, t0 + 1, t0 + 2)),
        (ROW_ID, TEXT, (t0, t0 + 1, t0 + 3)),
        (IMG_END_ID, TEXT, (6, 6, 6)),  # max(t0, t0+1, t0+3) + 1
    ]
    expected += [(i, TEXT, (7 + k, 7 + k, 7 + k)) for k, i in enumerate(red)]
    expected += [(EOS_ID, TEXT, (7 + len(red),) * 3)]
    assert s.tokens.tolist() == [e[0] for e in expected]
    assert s.modality.tolist() == [e[1] for e in expected]
    assert [tuple(p) for p in s.positions.tolist()] == [e[2] for e in expected]
    assert s.target.tolist() == [False] * 11 + [True] * (len(red) + 1)
    # patches are the normalised image's patches in raster order
    np.testing.assert_allclose(s.image_patches.numpy(), patchify(normalize_pixels(img), 8).reshape(6, 192))
    assert next_position(s) == 8 + len(red)


def test_mrope_tall_grid_resumes_after_rows(tok):
    """A grid with more rows than columns: text resumes at t0 + rows (the largest h), not t0 + cols + 1."""
    s = Interleaver(tok, patch=8).encode([{"media": "image", "file": "a"}], {"a": rgb(40, 8)}, bos=False, eos=False)
    # <img> (0,0,0); grid t0=1, 5 rows x 1 col; <row> at w = t0 + 1; </img> at max(h) + 1 = 1 + 4 + 1
    assert s.positions[1:-1, 1].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert s.positions[1:-1, 2].tolist() == [1, 2] * 5
    assert s.positions[-1].tolist() == [6, 6, 6]


def test_audio_block_positions_are_freq_by_time(tok):
    spec = np.zeros((32, 20), np.float32)  # 4 bands x 3 time steps at P=8
    s = Interleaver(tok, patch=8).encode([{"media": "audio", "file": "1.npy"}], {"1.npy": spec}, bos=False, eos=False)
    assert s.tokens[0] == AUD_ID and s.tokens[-1] == AUD_END_ID
    aud = s.modality == AUDIO
    assert int(aud.sum()) == 12 and s.audio_patches.shape == (12, 64)
    pos = s.positions[aud]
    assert pos[:, 0].unique().tolist() == [1]
    assert pos[:, 1].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]  # h = t0 + frequency band
    assert pos[:, 2].tolist() == [1, 2, 3] * 4  # w = t0 + time step
    assert (s.tokens == ROW_ID).sum() == 4
    assert s.positions[-1].tolist() == [5, 5, 5]  # t0 + max(rows - 1, cols) + 1 = 1 + 3 + 1


def test_1d_ablation(tok):
    segs = [{"text": "Is there a"}, {"media": "image", "file": "0"}, {"media": "audio", "file": "1"}, {"text": "yes", "target": True}]
    media = {"0": rgb(16, 16), "1": np.zeros((32, 9), np.float32)}
    m = Interleaver(tok, positions="mrope").encode(segs, media)
    d = Interleaver(tok, positions="1d").encode(segs, media)
    for f in ("tokens", "modality", "target", "image_patches", "audio_patches"):
        torch.testing.assert_close(getattr(m, f), getattr(d, f))
    ar = torch.arange(len(d))
    torch.testing.assert_close(d.positions, torch.stack([ar, ar, ar], dim=1))
    assert not torch.equal(m.positions, d.positions)
    assert next_position(d) == len(d)
    t = Interleaver(tok, positions="mrope").encode(segs[:1], {})  # text only: the schemes agree
    torch.testing.assert_close(t.positions, Interleaver(tok, positions="1d").encode(segs[:1], {}).positions)
    with pytest.raises(ValueError, match="positions"):
        Interleaver(tok, positions="2d")


def test_two_images_and_audio_sample(tok):
    """A world-like sample: counts, slot layout, targets and the budget agree."""
    t = np.arange(16_000) / 16_000
    spec = log_mel(0.5 * np.sin(2 * np.pi * 440 * t)).numpy()  # (32, 63)
    segs = [
        {"media": "image", "file": "0.png"},
        {"media": "image", "file": "1.png"},
        {"media": "audio", "file": "2.npy"},
        {"text": "Do the beeps match the shapes?", "target": False},
        {"text": "yes", "target": True},
    ]
    media = {"0.png": rgb(48, 48, 0), "1.png": rgb(48, 48, 1), "2.npy": spec}
    il = Interleaver(tok, patch=8)
    s = il.encode(segs, media)
    q, a = tok.encode(segs[3]["text"]), tok.encode("yes")
    img_block = budget.image_slots(48, 48, 8, structural=True)  # 36 + 6 <row> + 2
    aud_block = budget.audio_slots(63, 8, structural=True)  # 32 + 4 <row> + 2
    assert (img_block, aud_block) == (44, 38)
    assert len(s) == 1 + 2 * img_block + aud_block + len(q) + len(a) + 1
    assert int((s.modality == IMAGE).sum()) == 72 == s.image_patches.shape[0]
    assert int((s.modality == AUDIO).sum()) == 32 == s.audio_patches.shape[0]
    assert s.tokens.tolist().count(IMG_ID) == 2 and s.tokens.tolist().count(IMG_END_ID) == 2
    assert s.tokens.tolist().count(AUD_ID) == 1 and s.tokens.tolist().count(ROW_ID) == 6 + 6 + 4
    assert (s.tokens[s.modality != TEXT] == PAD_ID).all()
    assert s.tokens[s.target].tolist() == a + [EOS_ID]
    assert s.image_patches.dtype == torch.float32 and -1 <= float(s.image_patches.min()) <= float(s.image_patches.max()) <= 1
    # positions never decrease in t and the text after the media resumes at max + 1
    assert (s.positions[1:, 0] >= s.positions[:-1, 0]).all()
    first_q = 1 + 2 * img_block + aud_block
    assert s.positions[first_q].tolist() == [int(s.positions[:first_q].max()) + 1] * 3
    # prompt helper: the prefix of the training stream, and exactly its targets as the answer
    prompt, answer = il.encode_prompt(segs, media)
    assert answer == a + [EOS_ID]
    assert len(prompt) == len(s) - len(answer) and not prompt.target.any()
    torch.testing.assert_close(prompt.tokens, s.tokens[: len(prompt)])
    torch.testing.assert_close(prompt.positions, s.positions[: len(prompt)])
    assert next_position(prompt) == int(s.positions[len(prompt), 0])


@pytest.mark.parametrize(
    "kw, shape",
    [
        (dict(pixel_shuffle=True), (96, 80)),
        (dict(anyres_base=32, max_tiles=4), (70, 40)),
        (dict(anyres_base=32, max_tiles=4, pixel_shuffle=True), (70, 40)),
        (dict(image_size=(24, 24)), (96, 80)),
        (dict(patch=16), (50, 33)),
    ],
)
def test_stream_matches_budget(tok, kw, shape):
    il = Interleaver(tok, **kw)
    s = il.encode([{"media": "image", "file": "x"}], {"x": rgb(*shape)}, bos=False, eos=False)
    patch = kw.get("patch", 8)
    opts = dict(pixel_shuffle=kw.get("pixel_shuffle", False), size=kw.get("image_size"),
                anyres_base=kw.get("anyres_base"), max_tiles=kw.get("max_tiles", 4))
    assert len(s) == budget.image_slots(*shape, patch, structural=True, **opts) == il.image_slots(*shape)
    assert s.image_patches.shape == (budget.image_slots(*shape, patch, **opts), il.image_patch_dim)
    assert len(s) == int(s.positions.shape[0]) and s.positions.min() == 0


def test_eos_target_follows_last_text_segment(tok):
    il = Interleaver(tok)
    s = il.encode([{"text": "red", "target": True}, {"text": "Is there a", "target": False}], {})
    assert not bool(s.target[-1]) and s.target.any()
    s = il.encode([{"text": "Is there a"}], {}, bos=False, eos=False)
    assert s.tokens.tolist() == tok.encode("Is there a")


def test_bad_samples_raise(tok):
    il = Interleaver(tok)
    with pytest.raises(ValueError, match="0.png"):
        il.encode([{"media": "image", "file": "0.png"}], {})
    with pytest.raises(ValueError, match="unknown media kind"):
        il.encode([{"media": "video", "file": "v"}], {"v": rgb(8, 8)})
    with pytest.raises(ValueError, match="neither"):
        il.encode([{"caption": "x"}], {})
    with pytest.raises(ValueError, match="no target"):
        il.encode_prompt([{"text": "x"}], {})


def test_interleaver_pickles_for_loader_workers(tok):
    import pickle

    il = Interleaver(tok, pixel_shuffle=True)
    il2 = pickle.loads(pickle.dumps(il))
    segs, media = [{"media": "image", "file": "x"}, {"text": "red", "target": True}], {"x": rgb(32, 32)}
    a, b = il.encode(segs, media), il2.encode(segs, media)
    for f in ("tokens", "modality", "positions", "target", "image_patches"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f))
    assert il2.image_patch_dim == 4 * 3 * 8 * 8


# -- media modes (data.media) -------------------------------------------------------------------

MIXED = [
    {"text": "Is there a"},
    {"media": "image", "file": "0.png"},
    {"media": "audio", "file": "1.npy"},
    {"text": "red circle?", "target": False},
    {"text": "yes", "target": True},
]


def mixed_media() -> dict:
    return {"0.png": rgb(16, 24), "1.npy": np.zeros((32, 20), np.float32)}


@pytest.mark.parametrize("positions", ["mrope", "1d"])
def test_marker_stream_is_the_text_stream_with_markers(tok, positions):
    """marker: each medium is exactly `<img></img>` / `<aud></aud>`; every slot TEXT; positions 0, 1, 2, …"""
    s = Interleaver(tok, media="marker", positions=positions).encode(MIXED, mixed_media())
    q1, q2, a = tok.encode("Is there a"), tok.encode("red circle?"), tok.encode("yes")
    tokens = [BOS_ID, *q1, IMG_ID, IMG_END_ID, AUD_ID, AUD_END_ID, *q2, *a, EOS_ID]
    assert s.tokens.tolist() == tokens
    assert (s.modality == TEXT).all()
    ar = torch.arange(len(tokens))
    torch.testing.assert_close(s.positions, torch.stack([ar, ar, ar], dim=1))  # text-only: 1-D RoPE
    assert s.target.tolist() == [False] * (len(tokens) - len(a) - 1) + [True] * (len(a) + 1)
    assert s.image_patches.shape == (0, 192) and s.audio_patches.shape == (0, 64)
    # the inline stream with every patch and <row> slot deleted holds the same tokens
    inline = Interleaver(tok, positions=positions).encode(MIXED, mixed_media())
    keep = (inline.modality == TEXT) & (inline.tokens != ROW_ID)
    assert inline.tokens[keep].tolist() == tokens and inline.target[keep].tolist() == s.target.tolist()


def test_drop_stream_is_the_stream_without_media_segments(tok):
    il = Interleaver(tok, media="drop")
    s = il.encode(MIXED, mixed_media())
    text_only = Interleaver(tok).encode([seg for seg in MIXED if "media" not in seg], {})
    for f in ("tokens", "modality", "positions", "target", "image_patches", "audio_patches"):
        torch.testing.assert_close(getattr(s, f), getattr(text_only, f))
    assert not set(s.tokens.tolist()) & {IMG_ID, IMG_END_ID, AUD_ID, AUD_END_ID, ROW_ID, PAD_ID}
    ar = torch.arange(len(s))
    torch.testing.assert_close(s.positions, torch.stack([ar, ar, ar], dim=1))


def test_media_modes_prompt_and_budget(tok):
    media = mixed_media()
    for mode, per_medium in (("inline", None), ("marker", 2), ("drop", 0)):
        il = Interleaver(tok, media=mode)
        s = il.encode(MIXED, media)
        img, aud = il.image_slots(16, 24), il.audio_slots(20)
        if per_medium is not None:
            assert img == aud == per_medium and il.image_slots(16, 24, structural=False) == 0
        n_text = len(Interleaver(tok).encode([seg for seg in MIXED if "media" not in seg], {}))
        assert len(s) == n_text + img + aud  # the budget is what the stream holds, in every mode
        prompt, answer = il.encode_prompt(MIXED, media)
        assert answer == tok.encode("yes") + [EOS_ID]
        torch.testing.assert_close(prompt.tokens, s.tokens[: len(prompt)])
        torch.testing.assert_close(prompt.positions, s.positions[: len(prompt)])
    # a missing file is a bad sample in every mode (the same samples are bad whatever the mode)
    for mode in ("marker", "drop"):
        with pytest.raises(ValueError, match="0.png"):
            Interleaver(tok, media=mode).encode(MIXED, {"1.npy": media["1.npy"]})
    with pytest.raises(ValueError, match="media must be one of"):
        Interleaver(tok, media="blank")
