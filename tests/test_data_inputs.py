"""Shard reading: the project's layout, the community layouts, and every kind of bad input."""

import io
import json

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from PIL import Image

from omnifuse.data.packing import Doc
from omnifuse.data.samples import BadSample, decode_sample
from omnifuse.data.stream import BadSamplePolicy, PackedShardStream, TooManyBadSamples, iter_samples
from omnifuse.tokenizers.stream import TEXT, Stream


def png_bytes(h=48, w=48, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def own_sample(key: str, **overrides) -> dict:
    doc = {
        "task": "vqa",
        "segments": [
            {"media": "image", "file": "0.png"},
            {"media": "audio", "file": "1.npy"},
            {"text": "what color is the circle?", "target": False},
            {"text": "red", "target": True},
        ],
        "meta": {"split": "train", "qtype": "color", "answer": "red"},
    }
    sample = {"__key__": key, "json": json.dumps(doc).encode(), "0.png": png_bytes(), "1.npy": npy_bytes(np.zeros((32, 63), np.float32))}
    sample.update(overrides)
    return {k: v for k, v in sample.items() if v is not None}


def write_shard(path, samples) -> str:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def read_all(shards, mode="error", max_fraction=0.5, min_seen=1):
    policy = BadSamplePolicy(mode, max_fraction, min_seen)
    return list(iter_samples(shards, policy)), policy


def test_own_layout_decodes_media(tmp_path):
    shard = write_shard(tmp_path / "a.tar", [own_sample("k0")])
    (s,), policy = read_all([shard])
    assert s.key == "k0" and s.task == "vqa" and s.meta["answer"] == "red"
    assert s.media["0.png"].shape == (48, 48, 3) and s.media["0.png"].dtype == np.uint8
    assert tuple(s.media["0.png"][0, 0]) == (200, 10, 10)
    assert s.media["1.npy"].shape == (32, 63)
    assert policy.seen == 1 and not policy.skipped


BAD = {
    "json": own_sample("bad", json=b"{not json"),
    "missing_media": own_sample("bad", **{"1.npy": None}),
    "image": own_sample("bad", **{"0.png": b"\x89PNG but not really"}),
    "spectrogram_shape": own_sample("bad", **{"1.npy": npy_bytes(np.zeros((16, 63), np.float32))}),
}
FIELD = {"json": "json", "missing_media": "1.npy", "image": "0.png", "spectrogram_shape": "1.npy"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_sample_error_names_shard_key_and_field(tmp_path, kind):
    shard = write_shard(tmp_path / "s.tar", [own_sample("good"), BAD[kind]])
    with pytest.raises(BadSample) as err:
        read_all([shard])
    msg = str(err.value)
    assert "s.tar" in msg and "'bad'" in msg and f"field '{FIELD[kind]}'" in msg
    assert err.value.kind == kind


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_sample_skip_counts_it(tmp_path, kind):
    shard = write_shard(tmp_path / "s.tar", [own_sample("g0"), BAD[kind], own_sample("g1")])
    samples, policy = read_all([shard], mode="skip")
    assert [s.key for s in samples] == ["g0", "g1"]
    assert policy.skipped == {kind: 1} and policy.seen == 3


def test_skip_policy_stops_past_the_limit(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [own_sample("g0"), BAD["image"], BAD["json"], own_sample("g1")])
    with pytest.raises(TooManyBadSamples, match="2 of 3 samples were bad"):
        read_all([shard], mode="skip", max_fraction=0.5, min_seen=1)


def test_corrupt_tar_member(tmp_path):
    path = tmp_path / "c.tar"
    write_shard(path, [own_sample(f"k{i}") for i in range(3)])
    data = bytearray(path.read_bytes())
    data[512 + 100 : 512 + 300] = b"\xff" * 200  # garble the first member's payload header area
    data = data[: len(data) // 2]  # and truncate the archive
    path.write_bytes(bytes(data))
    with pytest.raises(BadSample) as err:
        read_all([str(path)])
    assert "c.tar" in str(err.value) and err.value.field in ("tar", "json", "0.png", "1.npy")
    _, policy = read_all([str(path)], mode="skip", max_fraction=1.0)
    assert sum(policy.skipped.values()) >= 1


def text_doc(sample) -> Doc:
    n = 300 if sample.key == "long" else 20
    tokens = torch.arange(n) % 50 + 10
    target = torch.zeros(n, dtype=torch.bool)
    target[-3:] = True
    s = Stream(tokens, torch.full((n,), TEXT), torch.arange(n)[:, None].repeat(1, 3), target, torch.zeros(0, 192), torch.zeros(0, 64))
    return Doc(s, 0, sample.key, sample.shard)


def test_sample_longer_than_a_row(tmp_path):
    shard = write_shard(tmp_path / "l.tar", [own_sample("a"), own_sample("long"), own_sample("b")])
    stream = PackedShardStream([shard], text_doc, row_len=64, repeat=False, shuffle_buffer=0, batch_size=1)
    with pytest.raises(BadSample, match="'long'.*'segments'.*longer than a row of 64"):
        list(stream)
    stream = PackedShardStream([shard], text_doc, row_len=64, repeat=False, shuffle_buffer=0, batch_size=1,
                               bad_samples="skip", max_bad_fraction=0.5)
    batches = list(stream)
    assert sum(int((b["doc_ids"] >= 0).sum()) for b in batches) == 40
    assert stream.policy.skipped == {"too_long": 1}


# -- community layouts --------------------------------------------------------------------------

def jpg_bytes(h=64, w=80) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (0, 128, 255)).save(buf, format="JPEG")
    return buf.getvalue()


def audio_bytes(fmt: str, sr=22050, seconds=0.5) -> bytes:
    t = np.arange(int(sr * seconds)) / sr
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format=fmt)
    return buf.getvalue()


def test_img2dataset_layout_becomes_a_caption_sample():
    meta = {"url": "http://x/y.jpg", "key": "000000001", "status": "success", "width": 80, "height": 64}
    raw = {"__key__": "000000001", "__url__": "s.tar", "jpg": jpg_bytes(), "txt": b"a blue square", "json": json.dumps(meta).encode()}
    s = decode_sample(raw, image_size=48)
    assert s.task == "caption"
    assert s.segments[0] == {"media": "image", "file": "jpg"} and s.segments[-1] == {"text": "a blue square", "target": True}
    assert s.media["jpg"].shape == (48, 48, 3)
    assert s.meta["status"] == "success"


@pytest.mark.parametrize("ext,fmt", [("flac", "FLAC"), ("wav", "WAV")])
def test_audio_caption_layout(ext, fmt):
    raw = {"__key__": "clip1", "__url__": "a.tar", ext: audio_bytes(fmt), "json": json.dumps({"text": "a beep"}).encode()}
    s = decode_sample(raw)
    assert s.task == "audio_caption" and s.segments[-1]["text"] == "a beep"
    spec = s.media[ext]
    assert spec.shape[0] == 32 and spec.shape[1] == 1 + 8000 // 256  # resampled to 16 kHz, 0.5 s
    raw_txt = {"__key__": "clip2", "__url__": "a.tar", ext: audio_bytes(fmt), "txt": b"a tone"}
    assert decode_sample(raw_txt).segments[-1]["text"] == "a tone"


def test_caption_sample_without_caption_is_named():
    with pytest.raises(BadSample, match="key 'k'.*field 'txt'"):
        decode_sample({"__key__": "k", "__url__": "s.tar", "jpg": jpg_bytes()})
