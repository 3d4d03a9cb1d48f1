"""Decode raw shard samples (bytes per extension) into segments + media arrays.

Three layouts are read unchanged:

- omnifuse's own (DESIGN §3.1): ``KEY.json`` with ``task``/``segments``/``meta`` and media files
  named by the segments (``{"media": "image", "file": "0.png"}`` → ``KEY.0.png``);
- img2dataset caption shards: ``KEY.jpg`` (or png/webp) + ``KEY.txt`` [+ ``KEY.json`` metadata]
  → a one-image caption sample;
- audio-caption shards: ``KEY.flac``/``KEY.wav`` + ``KEY.json`` (``text`` or ``caption``) or
  ``KEY.txt`` → a one-clip caption sample.

Every failure raises :class:`BadSample` naming the shard, the key and the field.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from omnifuse.tokenizers.audio import N_MELS, SAMPLE_RATE, log_mel

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTS = ("flac", "wav")
CAPTION_PROMPT = "describe the image."
AUDIO_CAPTION_PROMPT = "describe the sound."


class BadSample(ValueError):
    """A sample that cannot be used; the message names shard, key and field."""

    def __init__(self, shard: str, key: str, field: str, reason: str, kind: str):
        super().__init__(f"bad sample in shard {shard!r}, key {key!r}, field {field!r}: {reason}")
        self.shard, self.key, self.field, self.reason, self.kind = shard, key, field, reason, kind


@dataclass
class Sample:
    key: str
    shard: str
    task: str
    segments: list[dict]
    meta: dict
    media: dict[str, np.ndarray] = field(default_factory=dict)  # file suffix -> image (H,W,3) u8 | log-mel (32,T) f32


def decode_sample(raw: dict, image_size: int | None = None, media: bool = True) -> Sample:
    """Turn one webdataset sample dict (``__key__``, ``__url__``, ext -> bytes) into a Sample.
    ``media=False``: segments, task and meta only (the media files' names must still be keys)."""
    key, shard = raw.get("__key__", "?"), raw.get("__url__", "?")

    def bad(field: str, reason: str, kind: str) -> BadSample:
        return BadSample(shard, key, field, reason, kind)

    doc = None
    if "json" in raw:
        try:
            doc = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad("json", f"invalid JSON ({e})", "json") from e
    if isinstance(doc, dict) and "segments" in doc:
        sample = _own_layout(doc, key, shard, bad)
    else:
        sample = _community_layout(raw, doc, key, shard, bad)
    for seg in sample.segments if media else ():
        if "media" not in seg:
            continue
        name = seg["file"]
        if name not in raw:
            raise bad(name, f"missing media file named by a {seg['media']} segment", "missing_media")
        sample.media[name] = (
            _decode_image(raw[name], name, image_size, bad) if seg["media"] == "image" else _decode_audio(raw[name], name, bad)
        )
    return sample


def _own_layout(doc: dict, key: str, shard: str, bad) -> Sample:
    segments = doc["segments"]
    if not isinstance(segments, list) or not segments:
        raise bad("json.segments", "must be a non-empty list", "json")
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict) or not (("text" in seg) ^ ("media" in seg)):
            raise bad(f"json.segments[{i}]", "a segment has exactly one of 'text' or 'media'", "json")
        if "media" in seg and (seg["media"] not in ("image", "audio") or not isinstance(seg.get("file"), str)):
            raise bad(f"json.segments[{i}]", "media must be 'image' or 'audio' with a 'file' name", "json")
    if "task" not in doc:
        raise bad("json.task", "missing", "json")
    return Sample(key, shard, doc["task"], segments, doc.get("meta", {}))


def _community_layout(raw: dict, doc, key: str, shard: str, bad) -> Sample:
    meta = doc if isinstance(doc, dict) else {}
    image = next((e for e in IMAGE_EXTS if e in raw), None)
    audio = next((e for e in AUDIO_EXTS if e in raw), None)
    if image is None and audio is None:
        raise bad("json", "neither omnifuse segments nor an image/audio caption layout", "json")
    caption = None
    if "txt" in raw:
        caption = raw["txt"].decode("utf-8", errors="strict").strip()
    elif audio is not None:
        caption = meta.get("text") or meta.get("caption")
    if not caption:
        raise bad("txt", "caption sample without a caption (.txt, or json 'text'/'caption')", "json")
    if image is not None:
        segments = [{"media": "image", "file": image}, {"text": CAPTION_PROMPT, "target": False}, {"text": caption, "target": True}]
        task = "caption"
    else:
        segments = [{"media": "audio", "file": audio}, {"text": AUDIO_CAPTION_PROMPT, "target": False}, {"text": caption, "target": True}]
        task = "audio_caption"
    return Sample(key, shard, task, segments, {"qtype": task, "source": "community", **meta})


def _decode_image(data: bytes, name: str, image_size: int | None, bad) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt data
        raise bad(name, f"unreadable image ({type(e).__name__}: {e})", "image") from e


def _decode_audio(data: bytes, name: str, bad) -> np.ndarray:
    if name.endswith("npy"):
        try:
            spec = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:
            raise bad(name, f"unreadable .npy ({type(e).__name__}: {e})", "audio") from e
        if spec.ndim != 2 or spec.shape[0] != N_MELS or spec.shape[1] < 1:
            raise bad(name, f"spectrogram has shape {spec.shape}, expected ({N_MELS}, frames)", "spectrogram_shape")
        if not np.isfinite(spec).all():
            raise bad(name, "spectrogram has non-finite values", "spectrogram_shape")
        return spec.astype(np.float32, copy=False)
    import soundfile

    try:
        wave, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise bad(name, f"unreadable audio ({type(e).__name__}: {e})", "audio") from e
    wave = wave.mean(axis=1)
    if sr != SAMPLE_RATE:
        import librosa

        wave = librosa.resample(wave, orig_sr=sr, target_sr=SAMPLE_RATE)
    return log_mel(wave).numpy()
