"""What the evaluation reads: meta checked on reading (errors name shard, key and field), the folder
is the split, and the scene-graph bookkeeping of CHAIR on a generated world."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from omnifuse.data.samples import BadSample
from omnifuse.eval.metrics import chair
from omnifuse.eval.suite import caption_lexicon, load_samples, sample_hash


def question(key: str, **meta_over) -> dict:
    meta = {"split": "test", "qtype": "color", "answer": "red", "candidates": ["red", "blue"], **meta_over}
    meta = {k: v for k, v in meta.items() if v is not None}
    doc = {"task": "vqa", "segments": [{"text": "what color is the sky?", "target": False},
                                       {"text": "red", "target": True}], "meta": meta}
    return {"__key__": key, "json": json.dumps(doc).encode()}


def write_split(root, split: str, samples: list[dict]) -> str:
    (root / split).mkdir(parents=True, exist_ok=True)
    path = root / split / "shard-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def test_valid_questions_are_read(tmp_path):
    write_split(tmp_path, "test", [question("k0"), question("k1", answer="blue")])
    samples = load_samples(tmp_path, "test")
    assert [s.meta["answer"] for s in samples] == ["red", "blue"]
    assert sample_hash(samples[0]) != sample_hash(samples[1])


@pytest.mark.parametrize("meta_over, field, reason", [
    ({"answer": None}, "json.meta.answer", "needs its answer"),
    ({"candidates": None}, "json.meta.candidates", "non-empty list"),
    ({"candidates": ["blue", "green"]}, "json.meta.candidates", "'red' is not among the candidates"),
    ({"qtype": None}, "json.meta.qtype", "missing"),
    ({"split": None}, "json.meta.split", "missing"),
    ({"split": "train"}, "json.meta.split", "says 'train' but the sample is in the 'test' folder"),
])
def test_bad_meta_is_an_error_naming_shard_key_and_field(tmp_path, meta_over, field, reason):
    shard = write_split(tmp_path, "test", [question("good"), question("bad", **meta_over)])
    with pytest.raises(BadSample) as e:
        load_samples(tmp_path, "test")
    assert (e.value.shard, e.value.key, e.value.field) == (shard, "bad", field)
    assert reason in str(e.value) and shard in str(e.value) and "'bad'" in str(e.value)


def test_community_captions_need_no_split(tmp_path):
    write_split(tmp_path, "test", [{"__key__": "c0", "txt": b"a cat on a mat", "jpg": _jpeg()}])
    (s,) = load_samples(tmp_path, "test")
    assert s.task == "caption" and s.meta["source"] == "community" and "split" not in s.meta


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_every_reference_caption_of_a_generated_world_scores_chair_0_and_recall_1(small_world):
    """A reference caption describes its own scene exactly: nothing hallucinated, every object
    recalled, digits included (they are scene objects, so CHAIR's lexicon must know them)."""
    vocab = json.loads((small_world / "world.json").read_text())["vocabulary"]
    captions, scenes = [], []
    for split in ("train", "test", "cogent"):
        for s in load_samples(small_world, split):
            if s.task == "caption":
                captions.append(next(seg["text"] for seg in s.segments if seg.get("target")))
                scenes.append(s.meta["objects"])
    n_digits = sum(o["shape"] == vocab["digit_shape"] for objects in scenes for o in objects)
    assert n_digits > 0, "the check needs digit objects in some scene"
    lexicon = caption_lexicon(vocab)
    for caption, scene in zip(captions, scenes):  # each caption alone: CHAIRi 0, recall 1
        one = chair([caption], [scene], *lexicon)
        assert (one["chair_i"], one["recall"], one["n_hallucinated"]) == (0.0, 1.0, 0), (caption, scene)
        assert one["n_recalled"] == one["n_objects"] == len(scene) > 0, (caption, scene)
    m = chair(captions, scenes, *lexicon)
    assert (m["chair_i"], m["chair_s"], m["recall"], m["n_hallucinated"]) == (0.0, 0.0, 1.0, 0)
    assert m["n"] == len(captions) and m["n_recalled"] == m["n_objects"] == sum(map(len, scenes))
    # without the digit object in the lexicon, recall's denominator counts objects no caption can name
    assert chair(captions, scenes, vocab["shapes"], vocab["colors"])["recall"] < 1.0
