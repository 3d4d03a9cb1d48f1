"""The world generator: schema, determinism, held-out pairs, POPE, ground truth, CLI."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from omnifuse.data import world as W

COUNTS = {"train": 400, "val": 40, "test": 80, "cogent": 80,
          "pope-random": 60, "pope-popular": 60, "pope-adversarial": 61}


def _generate(path: Path, seed: int = 0) -> dict:
    return W.generate_world(path, preset="tiny", seed=seed, progress=False, counts=COUNTS, maxcount=150)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("world")
    _generate(d)
    return d


@pytest.fixture(scope="module")
def samples(world_dir) -> dict[str, list[dict]]:
    """Every sample of every split, read back through webdataset as the data loader does."""
    out = {}
    for split in W.SPLITS:
        urls = sorted(str(p) for p in (world_dir / split).glob("shard-*.tar"))
        out[split] = list(wds.WebDataset(urls, shardshuffle=False))
    return out


def _doc(raw: dict) -> dict:
    return json.loads(raw["json"])


def _pairs(objects) -> set[tuple[str, str]]:
    return {(o["color"], o["shape"]) for o in objects}


def _texts(doc: dict) -> list[str]:
    return [s["text"] for s in doc["segments"] if "text" in s]


def test_vocabulary_is_consistent():
    assert not set(W.HELDOUT_PAIRS) & ({a for a, _, _ in W.PRIOR} | {b for _, b, _ in W.PRIOR})
    assert len({s for _, s in W.HELDOUT_PAIRS}) == len(W.HELDOUT_PAIRS)  # one per shape
    assert tuple(W.TASK_MIX) + ("pope",) == W.TASKS
    assert set(W.QTYPES) == set(W.TASKS)
    for word in W.WORDS:
        assert set(word) <= set(W.render.FONT_3X5)


def test_world_json_and_layout(world_dir):
    info = json.loads((world_dir / "world.json").read_text())
    assert info["settings"]["counts"] == COUNTS
    assert info["summary"]["samples"] == COUNTS
    assert info["tasks"] == list(W.TASKS) and info["splits"] == list(W.SPLITS)
    assert {tuple(p.values()) for p in info["heldout_pairs"]} == set(W.HELDOUT_PAIRS)
    assert len(info["cooccurrence"]["pairs"]) == len(W.PRIOR)
    for split in W.SPLITS:
        assert sum(info["summary"]["tasks"][split].values()) == COUNTS[split]
        shards = sorted((world_dir / split).glob("*.tar"))
        assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(len(shards))]
    assert len(list((world_dir / "train").glob("*.tar"))) == 3  # 400 samples, 150 per shard
    # the prior is strong, as designed
    assert all(p > 0.6 for p in info["cooccurrence"]["measured_p_partner_given_anchor"].values())


def test_sample_schema(samples):
    for split, raws in samples.items():
        assert len(raws) == COUNTS[split]
        assert [r["__key__"] for r in raws] == [f"{split}-{i:08d}" for i in range(COUNTS[split])]
        for raw in raws:
            doc = _doc(raw)
            assert set(doc) == {"task", "segments", "meta"}
            task, segs, meta = doc["task"], doc["segments"], doc["meta"]
            assert task in W.TASKS and meta["split"] == split and meta["qtype"] in W.QTYPES[task]
            named = set()
            for seg in segs:
                assert ("text" in seg) ^ ("media" in seg)
                if "media" in seg:
                    named.add(seg["file"])
                    data = raw[seg["file"]]
                    if seg["media"] == "image":
                        assert seg["file"].endswith(".png")
                        img = np.asarray(Image.open(io.BytesIO(data)))
                        assert img.shape == (W.CANVAS, W.CANVAS, 3) and img.dtype == np.uint8
                    else:
                        assert seg["media"] == "audio" and seg["file"].endswith(".npy")
                        spec = np.load(io.BytesIO(data), allow_pickle=False)
                        assert spec.dtype == np.float32 and spec.shape == (32, 63) and np.isfinite(spec).all()
                else:
                    assert isinstance(seg["target"], bool)
                    assert seg["text"] == seg["text"].lower() and seg["text"].isascii()
            media_keys = {k for k in raw if k not in ("__key__", "__url__", "__local_path__", "json")}
            assert media_keys == named  # every media file is named by a segment, and vice versa
            assert any(s.get("target") for s in segs)
            if "answer" in meta:  # a question: media…, question, answer
                assert [("text" in s, s.get("target")) for s in segs[-2:]] == [(True, False), (True, True)]
                assert all("media" in s for s in segs[:-2])
                assert segs[-1]["text"] == meta["answer"] and meta["answer"] in meta["candidates"]
                assert len(segs[-2]["text"].split()) <= 12 and len(meta["answer"].split()) <= 2
            if task in ("caption", "vqa", "crossmodal", "multi_image", "pope"):
                for o in meta["objects"]:
                    assert {"shape", "color", "size", "x", "y"} <= set(o)
                    assert 0 <= o["x"] < W.CANVAS and 0 <= o["y"] < W.CANVAS
            if task in ("audio_caption", "audio_qa", "crossmodal"):
                assert all({"kind", "pitch", "onset"} <= set(e) for e in meta["events"])


def test_same_seed_same_bytes_other_seed_differs(world_dir, tmp_path):
    _generate(tmp_path / "again", seed=0)
    files = sorted(p.relative_to(world_dir) for p in world_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for rel in files:
        assert (world_dir / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    W.generate_world(tmp_path / "other", seed=1, progress=False, counts={s: 20 for s in W.SPLITS})
    a = (world_dir / "train" / "shard-000000.tar").read_bytes()
    assert a != (tmp_path / "other" / "train" / "shard-000000.tar").read_bytes()


def test_split_does_not_depend_on_other_counts(world_dir, tmp_path):
    counts = {s: 0 for s in W.SPLITS} | {"test": COUNTS["test"]}
    W.generate_world(tmp_path, progress=False, counts=counts, maxcount=150)
    assert (tmp_path / "test" / "shard-000000.tar").read_bytes() == (world_dir / "test" / "shard-000000.tar").read_bytes()


def test_heldout_pairs_only_in_cogent(samples):
    phrases = [f"{c} {s}" for c, s in W.HELDOUT_PAIRS]
    for split, raws in samples.items():
        for raw in raws:
            doc = _doc(raw)
            objs = doc["meta"].get("objects", [])
            if split == "cogent":
                held = doc["meta"]["heldout"]
                assert (held["color"], held["shape"]) in _pairs(objs) & set(W.HELDOUT_PAIRS)
                continue
            assert not _pairs(objs) & set(W.HELDOUT_PAIRS), (split, raw["__key__"])
            for text in _texts(doc):
                assert not any(p in text for p in phrases), (split, raw["__key__"], text)


def test_pope_balance_and_answers(samples, world_dir):
    popular = {(p["color"], p["shape"]) for p in json.loads((world_dir / "world.json").read_text())["popular_objects"]}
    partners = {b: a for a, b, _ in W.PRIOR}
    for variant in ("random", "popular", "adversarial"):
        docs = [_doc(r) for r in samples[f"pope-{variant}"]]
        answers = Counter(d["meta"]["answer"] for d in docs)
        assert answers["yes"] == (len(docs) + 1) // 2 and answers["no"] == len(docs) // 2
        for d in docs:
            m = d["meta"]
            probe = (m["probe"]["color"], m["probe"]["shape"])
            assert m["candidates"] == ["yes", "no"] and d["task"] == "pope"
            assert m["answer"] == ("yes" if probe in _pairs(m["objects"]) else "no")
            assert _texts(d)[0] == f"is there a {probe[0]} {probe[1]} in the image?"
            if variant == "adversarial":  # the probe is the prior's partner of an object present
                assert partners[probe] in _pairs(m["objects"])
            if variant == "popular" and m["answer"] == "no":
                assert probe in popular


def _check_vqa(m: dict, q: str) -> None:
    objs, ans, qt = m["objects"], m["answer"], m["qtype"]
    if qt == "color":
        shape = q.removeprefix("what color is the ").removesuffix("?")
        assert [o["color"] for o in objs if o["shape"] == shape] == [ans]
    elif qt == "shape":
        color = q.removeprefix("what shape is the ").removesuffix(" object?")
        assert [o["shape"] for o in objs if o["color"] == color] == [ans]
    elif qt == "size":
        t = m["target"]
        assert [o["size"] for o in objs if (o["color"], o["shape"]) == (t["color"], t["shape"])] == [ans]
    elif qt == "count":
        if q == "how many objects are there?":
            assert ans == str(len(objs))
        else:
            plural = q.split()[2]
            shape = next(s for s, p in W.PLURALS.items() if p == plural)
            assert ans == str(sum(o["shape"] == shape for o in objs))
    elif qt == "spatial":
        find = {(o["color"], o["shape"]): o for o in objs}
        a, b = find[tuple(m["subject"].values())], find[tuple(m["reference"].values())]
        assert ans == ("yes" if W.relation_holds(a, m["relation"], b) else "no")
    elif qt == "exists":
        assert ans == ("yes" if tuple(m["probe"].values()) in _pairs(objs) else "no")
    elif qt == "ocr":
        assert ans == m["sign"]["word"]
    elif qt == "chart":
        values = {b["color"]: b["value"] for b in m["bars"]}
        if m["form"] == "value":
            assert ans == str(values[q.split()[4]])
        else:
            pick = max if m["form"] == "tallest" else min
            assert values[ans] == pick(values.values()) and list(values.values()).count(values[ans]) == 1
    elif qt == "digit":
        assert ans == str(objs[0]["digit"])


def test_ground_truth(samples):
    seen = Counter()
    for split, raws in samples.items():
        for raw in raws:
            doc = _doc(raw)
            m, texts = doc["meta"], _texts(doc)
            seen[(doc["task"], m["qtype"])] += 1
            if doc["task"] == "vqa":
                _check_vqa(m, texts[0])
            elif doc["task"] == "caption":
                assert texts[-1] == m["caption"] == W.caption_of(m["objects"])
                for o in m["objects"]:
                    assert f"{o['color']} {o['shape']}" in m["caption"]
            elif doc["task"] == "audio_caption":
                assert texts[-1] == W.audio_caption_of(m["events"])
            elif doc["task"] == "audio_qa":
                ev, ans = m["events"], m["answer"]
                assert [e["onset"] for e in ev] == sorted(e["onset"] for e in ev)
                if m["qtype"] == "audio_count":
                    assert ans == str(len(ev))
                elif m["qtype"] in ("audio_pitch", "audio_kind"):
                    e = ev[W.ORDINALS.index(texts[0].split()[-2])]
                    assert ans == e["pitch" if m["qtype"] == "audio_pitch" else "kind"]
                else:
                    kinds = [e["kind"] for e in ev]
                    assert ans == min(m["candidates"], key=kinds.index)
            elif doc["task"] == "crossmodal":
                n, k = len(m["objects"]), len(m["events"])
                assert m["answer"] == ("yes" if (n == k if m["qtype"] == "cross_match" else k > n) else "no")
            elif doc["task"] == "multi_image":
                a, b = (img["objects"] for img in m["images"])
                if m["qtype"] == "multi_more":
                    assert m["answer"] == ("first" if len(a) > len(b) else "second") and len(a) != len(b)
                elif m["qtype"] == "multi_same":
                    assert m["answer"] == ("yes" if len(a) == len(b) else "no")
                else:
                    color, shape = texts[0].removesuffix("?").split()[-2:]
                    assert ((color, shape) in _pairs(a)) != ((color, shape) in _pairs(b))
                    assert m["answer"] == ("first" if (color, shape) in _pairs(a) else "second")
    # every question type of the iid mix shows up even in this small world
    for task, qtypes in W.QTYPES.items():
        for qt in qtypes:
            assert seen[(task, qt)] > 0, (task, qt)


def test_train_and_test_use_disjoint_digit_images(samples):
    idx = {s: {o["digit_index"] for r in samples[s] for o in _doc(r)["meta"].get("objects", []) if o["shape"] == "digit"}
           for s in ("train", "test")}
    assert idx["train"] and idx["test"] and not idx["train"] & idx["test"]


def test_cli_writes_world(tmp_path, capsys):
    counts = [f"--count={s}=5" for s in W.SPLITS]
    info = W.main(["--out", str(tmp_path), "--seed", "3", "--vocab-size", "0", *counts])
    assert json.loads((tmp_path / "world.json").read_text()) == info
    assert info["settings"]["seed"] == 3 and info["summary"]["samples"]["train"] == 5
    assert "world written to" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        W.main(["--out", str(tmp_path), "--count", "nosplit=3"])
