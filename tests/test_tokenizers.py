"""Text, image and audio tokenizers and the token budget (omnifuse.tokenizers)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from omnifuse.tokenizers import budget
from omnifuse.tokenizers.audio import (
    AUDIO_NORM_SCALE,
    AUDIO_NORM_SHIFT,
    SILENCE,
    AudioTokenizer,
    log_mel,
    normalize_log_mel,
    patchify_spectrogram,
)
from omnifuse.tokenizers.image import (
    ImageTokenizer,
    anyres_images,
    normalize_pixels,
    patchify,
    pixel_shuffle,
    resize,
)
from omnifuse.tokenizers.text import (
    AUD_END_ID,
    AUD_ID,
    BOS_ID,
    EOS_ID,
    IMG_END_ID,
    IMG_ID,
    NUM_SPECIAL,
    PAD_ID,
    ROW_ID,
    TextTokenizer,
    iter_world_texts,
    train_tokenizer,
)
from omnifuse.tokenizers.text import main as text_main

COLORS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]


def world_texts(n: int = 400) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        c1, c2 = rng.choice(COLORS, 2)
        s1, s2 = rng.choice(SHAPES, 2)
        out.append(f"A {c1} {s1} is left of a {c2} {s2}.")
        out.append(f"How many shapes are there? {int(rng.integers(1, 5))}")
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    path = train_tokenizer(world_texts(), 300, tmp_path_factory.mktemp("spm") / "tok.model")
    return TextTokenizer(path)


# ---------------------------------------------------------------- text


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.img_id, tok.img_end_id, tok.aud_id, tok.aud_end_id, tok.row_id) == (4, 5, 6, 7, 8)
    assert [tok.piece(i) for i in range(NUM_SPECIAL)] == [
        "<pad>", "<unk>", "<s>", "</s>", "<img>", "</img>", "<aud>", "</aud>", "<row>"
    ]
    assert NUM_SPECIAL < tok.vocab_size <= 300


@pytest.mark.parametrize("text", ["<img>", "</img>", "<aud>", "</aud>", "<row>", "<s>", "</s>", "<pad>", "a <img> b <row>"])
def test_specials_cannot_be_injected(tok, text):
    ids = tok.encode(text)
    assert not set(ids) & set(range(NUM_SPECIAL)), (text, ids)
    assert tok.decode(ids) == text  # spelled out, round-trips as plain characters


@pytest.mark.parametrize(
    "text",
    ["A red circle is left of a blue star.", "How many shapes are there? 3", "zebra ~ {x} #42 qq!", "red"],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and all(i >= NUM_SPECIAL for i in ids)  # no BOS/EOS added, no unknowns for ASCII
    assert tok.decode(ids) == text


def test_decode_skips_specials(tok):
    ids = tok.encode("red circle")
    wrapped = [BOS_ID, IMG_ID, ROW_ID, IMG_END_ID, AUD_ID, AUD_END_ID, *ids, EOS_ID, PAD_ID, PAD_ID]
    assert tok.decode(wrapped) == "red circle"


def test_training_is_deterministic(tmp_path):
    a = train_tokenizer(world_texts(), 300, tmp_path / "a.model")
    b = train_tokenizer(world_texts(), 300, tmp_path / "b.model")
    assert a.read_bytes() == b.read_bytes()


def test_unigram_also_keeps_ids(tmp_path):
    t = TextTokenizer(train_tokenizer(world_texts(), 300, tmp_path / "u.model", model_type="unigram"))
    assert t.piece(ROW_ID) == "<row>" and t.encode("<row>") != [ROW_ID]
    assert t.decode(t.encode("A red circle.")) == "A red circle."


def test_foreign_model_is_rejected(tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(world_texts(50)), model_writer=model, vocab_size=60, hard_vocab_limit=False, minloglevel=2
    )
    (tmp_path / "x.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="special ids"):
        TextTokenizer(tmp_path / "x.model")


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, sample in samples.items():
            for name, data in [(f"{key}.json", json.dumps(sample).encode()), (f"{key}.0.png", b"\x89PNG not read")]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_train_cli_reads_world_shards(tmp_path, capsys):
    (tmp_path / "world" / "train").mkdir(parents=True)
    texts = world_texts(100)
    samples = {
        f"{i:06d}": {
            "task": "vqa",
            "segments": [{"media": "image", "file": "0.png"}, {"text": q, "target": False}, {"text": "red", "target": True}],
            "meta": {"split": "train"},
        }
        for i, q in enumerate(texts)
    }
    _write_shard(tmp_path / "world" / "train" / "shard-000000.tar", samples)
    assert list(iter_world_texts(tmp_path / "world"))[:3] == [texts[0], "red", texts[1]]
    text_main(["train", "--data", str(tmp_path / "world"), "--vocab-size", "200", "--out", str(tmp_path / "t.model")])
    assert "vocab_size=" in capsys.readouterr().out
    t = TextTokenizer(tmp_path / "t.model")
    assert t.decode(t.encode(texts[5])) == texts[5]


# ---------------------------------------------------------------- image

CLASSIC = np.array([[10, 20, 150, 160], [30, 40, 170, 180], [190, 200, 5, 15], [210, 220, 25, 35]], dtype=np.uint8)


def test_patchify_classic_example():
    g = patchify(CLASSIC, 2)
    assert g.shape == (2, 2, 4) and g.dtype == np.uint8
    np.testing.assert_array_equal(g[0, 0], [10, 20, 30, 40])
    np.testing.assert_array_equal(g[0, 1], [150, 160, 170, 180])
    np.testing.assert_array_equal(g[1, 0], [190, 200, 210, 220])
    np.testing.assert_array_equal(g[1, 1], [5, 15, 25, 35])


def test_patchify_rgb_order_and_padding():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    g = patchify(img, 4)  # padded to 8x8
    assert g.shape == (2, 2, 48)
    np.testing.assert_array_equal(g[0, 1], np.pad(img[0:4, 4:7], ((0, 0), (0, 1), (0, 0))).reshape(-1))
    np.testing.assert_array_equal(g[1, 0].reshape(4, 4, 3)[:1], img[4:5, 0:4])  # (P, P, C) order
    assert (g[1, 0].reshape(4, 4, 3)[1:] == 0).all() and (g[1, 1].reshape(4, 4, 3)[:, 3:] == 0).all()


def test_patchify_resize_option():
    img = np.full((30, 50, 3), 200, np.uint8)
    g = patchify(img, 8, size=(16, 24))
    assert g.shape == (2, 3, 192) and (g == 200).all()
    assert resize(img.astype(np.float32), 16, 24).dtype == np.float32


def test_pixel_normalisation():
    x = normalize_pixels(np.array([[[0, 255, 51]]], np.uint8))
    np.testing.assert_allclose(x, [[[-1.0, 1.0, 51 / 255 * 2 - 1]]], rtol=1e-6)
    np.testing.assert_allclose(normalize_pixels(np.array([[[0.0, 1.0, 0.5]]])), [[[-1.0, 1.0, 0.0]]])


def test_pixel_shuffle_order_and_shapes():
    grid = np.arange(4 * 6 * 2).reshape(4, 6, 2)  # (rows, cols, D)
    s = pixel_shuffle(grid)
    assert s.shape == (2, 3, 8)
    np.testing.assert_array_equal(s[1, 2], np.concatenate([grid[2, 4], grid[2, 5], grid[3, 4], grid[3, 5]]))
    odd = pixel_shuffle(np.ones((3, 3, 1)))
    assert odd.shape == (2, 2, 4)
    np.testing.assert_array_equal(odd[1, 1], [1, 0, 0, 0])  # zero patches past the edge
    tok = ImageTokenizer(patch=8, pixel_shuffle=True)
    grids = tok(np.zeros((48, 40, 3), np.uint8))
    assert [g.shape for g in grids] == [(3, 3, 4 * 192)] and tok.patch_dim == 768
    assert budget.image_slots(48, 40, 8, pixel_shuffle=True) == 9


def test_anyres_layout_and_tiles():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (100, 60, 3), dtype=np.uint8)
    layout = budget.anyres_layout(100, 60, 32, 6)
    assert layout == budget.AnyresLayout(96, 58, (3, 2), thumbnail=True)
    images = anyres_images(img, 32, 6)
    assert len(images) == 7 and all(im.shape == (32, 32, 3) for im in images)
    np.testing.assert_array_equal(images[0], resize(img, 32, 32))  # thumbnail first
    scaled = resize(img, 96, 58)
    np.testing.assert_array_equal(images[1], scaled[:32, :32])  # tiles in raster order
    np.testing.assert_array_equal(images[2][:, :26], scaled[:32, 32:58])
    assert (images[2][:, 26:] == 0).all()  # zero padding right of the resized image
    np.testing.assert_array_equal(images[6][:, :26], scaled[64:96, 32:58])

    tok = ImageTokenizer(patch=8, anyres_base=32, max_tiles=6)
    grids = tok(img)
    assert [g.shape for g in grids] == [(4, 4, 192)] * 7
    np.testing.assert_allclose(grids[1][0, 0], normalize_pixels(scaled[:8, :8]).reshape(-1))
    assert tok.grid_shapes(100, 60) == [(4, 4)] * 7
    assert budget.image_slots(100, 60, 8, anyres_base=32, max_tiles=6) == 7 * 16


def test_anyres_small_image_and_tile_limit():
    small = ImageTokenizer(patch=8, anyres_base=32)(np.zeros((20, 20, 3), np.uint8))
    assert [g.shape for g in small] == [(3, 3, 192)]  # fits one tile: a single grid, no thumbnail
    layout = budget.anyres_layout(100, 60, 32, 1)
    assert layout == budget.AnyresLayout(32, 19, (1, 1), thumbnail=False)  # shrunk to fit one tile
    grids = ImageTokenizer(patch=8, anyres_base=32, max_tiles=1)(np.zeros((100, 60, 3), np.uint8))
    assert [g.shape for g in grids] == [(4, 3, 192)]
    with pytest.raises(ValueError, match="multiple of patch"):
        ImageTokenizer(patch=8, anyres_base=30)


def test_image_tokenizer_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        ImageTokenizer()(np.zeros((8, 8, 4), np.uint8))


# ---------------------------------------------------------------- audio


def test_spectrogram_patches():
    spec = np.arange(32 * 63, dtype=np.float32).reshape(32, 63)  # (n_mels, frames)
    g = patchify_spectrogram(spec, 8)
    assert g.shape == (4, 8, 64)  # (freq bands, time steps, P*P)
    np.testing.assert_array_equal(g[1, 2], spec[8:16, 16:24].reshape(-1))  # (freq, time) order
    np.testing.assert_array_equal(g[0, 7].reshape(8, 8)[:, 7], np.full(8, SILENCE, np.float32))  # padded frame


def test_audio_tokenizer_normalisation_and_real_log_mel():
    t = np.arange(16_000) / 16_000
    spec = log_mel(0.9 * np.sin(2 * np.pi * 1000 * t))  # (32, 63)
    g = AudioTokenizer(patch=8)(spec)
    assert g.shape == (4, 8, 64) and g.dtype == np.float32
    assert -1.01 < g.min() and g.max() < 1.1  # the documented range of the fixed normalisation
    np.testing.assert_allclose(normalize_log_mel(np.array([SILENCE])), [(SILENCE + AUDIO_NORM_SHIFT) / AUDIO_NORM_SCALE])
    assert abs(float(normalize_log_mel(np.array([SILENCE]))[0]) + 1.0) < 0.01
    assert budget.audio_slots(spec.shape[1], 8) == 32 == budget.audio_slots(budget.audio_frames(1.0), 8)
    assert AudioTokenizer(patch=4)(torch.zeros(32, 10)).shape == (8, 3, 16)
    with pytest.raises(ValueError, match="32, frames"):
        AudioTokenizer()(np.zeros((40, 10)))


# ---------------------------------------------------------------- budget


@pytest.mark.parametrize(
    "argv, expected",
    [
        ("--image 336x336 --patch 14", 576),
        ("--image 224x224 --patch 14", 256),
        ("--image 336 --patch 14 --pixel-shuffle", 144),
        ("--image 672x1008 --patch 14 --anyres 336 --max-tiles 6", 7 * 576),
        ("--image 200x300 --patch 14 --anyres 336", 15 * 22),  # fits one tile: a single native grid
        ("--image 336 --patch 14 --video 60", 34_560),
        ("--image 336 --patch 14 --context 4096", 7),
        ("--image 48x48 --patch 8 --structural", 36 + 6 + 2),
        ("--image 48x48 --resize 32x32", 16),
        ("--audio 1.0 --patch 8", 32),
        ("--audio 1.0 --patch 8 --structural", 32 + 4 + 2),
        ("--audio 10 --patch 16", 2 * 40),  # 1 + 160000 // 256 = 626 frames -> 40 time steps
        ("--audio 1.0 --patch 8 --context 100", 3),
    ],
)
def test_budget_cli(capsys, argv, expected):
    assert budget.main(argv.split()) == 0
    assert capsys.readouterr().out.strip() == str(expected)


def test_budget_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit) as e:
        budget.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--pixel-shuffle" in out and "576" in out
    with pytest.raises(SystemExit):
        budget.main(["--audio", "1", "--video", "3"])
    with pytest.raises(SystemExit):
        budget.main(["--image", "3x"])


def test_budget_functions():
    assert budget.image_slots(336, 336, 14) == 576
    assert budget.image_slots(336, 336, 14, structural=True) == 576 + 24 + 2
    assert budget.grid_shape(50, 17, 8) == (7, 3)
    assert budget.audio_frames(1.0) == 63
