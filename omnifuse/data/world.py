"""The generated world: deterministic scenes, sounds, questions and prose, written as shards.

    python -m omnifuse.data.world --out worlds/tiny --preset tiny --seed 0

writes ``DIR/world.json`` and one folder of webdataset shards per split (``SPLITS``). A sample
is ``KEY.json`` = ``{"task", "segments", "meta"}`` plus media ``KEY.<i>.png`` (RGB) and
``KEY.<i>.npy`` (float32 log-mel, ``(32, frames)``), where ``i`` is the media's index among the
sample's segments (DESIGN §3.1, docs/ARCHITECTURE.md).

Why the world looks the way it does:

- every answer is exact ground truth from ``meta`` (objects, events, bars, sign word), so
  grounding and hallucination are measurable;
- a **co-occurrence prior** (``PRIOR``: e.g. a red circle usually comes with a blue square)
  gives a blind model something to guess from; the adversarial POPE split asks about the
  partner of an object that is present, half the time with the partner absent;
- ``HELDOUT_PAIRS`` colour×shape pairs never appear in train, val, test or POPE (not as an
  object and not in any text); the ``cogent`` split has one in every scene;
- splits draw from independent generators (``np.random.default_rng([seed, split_index])``),
  so a split's content does not depend on the other splits' counts, and the same seed gives
  byte-identical shards (fixed tar mtime/owner, fixed PNG options).

Text conventions: lowercase, numbers as digits, questions ≤ 12 words, answers one or two words;
an object is always named ``"<size> <color> <shape>"`` (digits: ``"<size> <color> digit <n>"``).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from omnifuse.data import render, sounds
from omnifuse.data.render import DIGIT_POOL_SPLIT
from omnifuse.data.sounds import PITCHES, SOUND_KINDS

WORLD_VERSION = 1
CANVAS = 48
MAX_OBJECTS = 4
SHARD_MAXCOUNT = 2000
TAR_MTIME = 0.0  # webdataset's TarWriter stamps time.time() unless told otherwise

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
DIGIT = "digit"  # shape name of a handwritten-digit object
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "ring": "rings", DIGIT: "digits"}
COLORS = tuple(render.COLOR_RGB)
SIZES = ("small", "big")
RELATIONS = ("left of", "right of", "above", "below")
WORDS = ("cat", "dog", "sun", "map", "box", "cup", "hat", "key", "pen", "bus", "fox", "owl",
         "egg", "jar", "car", "tree", "fish", "bird", "moon", "lamp", "book", "door", "boat", "cake")
ORDINALS = ("first", "second", "third", "fourth")
NUMBERS = tuple(str(i) for i in range(10))
YES_NO = ("yes", "no")

# anchor → partner: when the anchor is drawn, the partner is added with probability p.
PRIOR = (
    (("red", "circle"), ("blue", "square"), 0.85),
    (("yellow", "star"), ("green", "triangle"), 0.85),
    (("purple", "ring"), ("orange", "cross"), 0.85),
    (("white", "triangle"), ("purple", "square"), 0.85),
)
ANCHOR_WEIGHT = 3.0  # anchors are drawn this many times more often than other pairs
# One pair per shape, none of them in PRIOR; absent from every split but cogent.
HELDOUT_PAIRS = (
    ("green", "circle"), ("orange", "square"), ("blue", "triangle"),
    ("red", "star"), ("yellow", "ring"), ("purple", "cross"),
)

TASKS = ("caption", "audio_caption", "vqa", "audio_qa", "crossmodal", "multi_image", "text", "pope")
SPLITS = ("train", "val", "test", "cogent", "pope-random", "pope-popular", "pope-adversarial")
QTYPES = {
    "caption": ("caption",),
    "audio_caption": ("audio_caption",),
    "vqa": ("color", "shape", "count", "spatial", "exists", "size", "ocr", "chart", "digit"),
    "audio_qa": ("audio_count", "audio_pitch", "audio_kind", "audio_order"),
    "crossmodal": ("cross_match", "cross_more"),
    "multi_image": ("multi_more", "multi_same", "multi_which"),
    "text": ("text",),
    "pope": ("pope",),
}
# Mix of the iid splits (train, val, test): VQA first, colour and shape most of all.
TASK_MIX = {"caption": 0.14, "audio_caption": 0.05, "vqa": 0.52, "audio_qa": 0.10,
            "crossmodal": 0.05, "multi_image": 0.05, "text": 0.09}
VQA_MIX = {"color": 0.22, "shape": 0.22, "count": 0.12, "spatial": 0.10, "exists": 0.12,
           "size": 0.08, "ocr": 0.05, "chart": 0.05, "digit": 0.04}
AUDIO_QA_MIX = {"audio_count": 0.3, "audio_pitch": 0.25, "audio_kind": 0.25, "audio_order": 0.2}
COGENT_MIX = {"caption": 0.2, "color": 0.16, "shape": 0.16, "size": 0.12, "exists": 0.14,
              "count": 0.1, "spatial": 0.12}
N_OBJECTS_P = (0.2, 0.3, 0.3, 0.2)  # P(1..4 objects)
CAPTION_PROMPT = "describe the image."  # same prompts as omnifuse.data.samples' community layouts
AUDIO_CAPTION_PROMPT = "describe the sound."
POPULAR_TOP_K = 6

_TINY = {"train": 8000, "val": 500, "test": 1000, "cogent": 500,
         "pope-random": 300, "pope-popular": 300, "pope-adversarial": 300}
PRESETS = {
    "tiny": _TINY,
    "small": {k: 10 * v for k, v in _TINY.items()},
    "base": {k: 50 * v for k, v in _TINY.items()},
}

Pair = tuple[str, str]  # (color, shape)
PARTNER = {a: b for a, b, _ in PRIOR}
PRIOR_P = {a: p for a, _, p in PRIOR}
ALL_PAIRS = tuple((c, s) for s in SHAPES for c in COLORS)
IID_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)


# ----------------------------------------------------------------------------- text helpers

def phrase(obj: dict) -> str:
    """``"big red circle"``; a digit object is ``"small white digit 7"``."""
    if obj["shape"] == DIGIT:
        return f"{obj['size']} {obj['color']} digit {obj['digit']}"
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def _join(items: list[str]) -> str:
    items = [f"a {x}" for x in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_of(objects: list[dict]) -> str:
    """Every object, left to right: ``"a big red circle and a small blue square."``."""
    return _join([phrase(o) for o in sorted(objects, key=lambda o: (o["x"], o["y"]))]) + "."


def audio_caption_of(events: list[dict]) -> str:
    """Events in order: ``"a low tone, then a high chirp."``."""
    return ", then ".join(f"a {e['pitch']} {e['kind']}" for e in events) + "."


def relation_holds(a: dict, rel: str, b: dict) -> bool:
    return {"left of": a["x"] < b["x"], "right of": a["x"] > b["x"],
            "above": a["y"] < b["y"], "below": a["y"] > b["y"]}[rel]


def _pair_dict(p: Pair) -> dict:
    return {"color": p[0], "shape": p[1]}


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- generator

class SplitGenerator:
    """Draws the samples of one split from its own generator (module docstring)."""

    MIN_SEP = 5  # pixels between two centres on an axis before a spatial relation is asked

    def __init__(self, split: str, seed: int, canvas: int = CANVAS, popular: Sequence[Pair] = ()):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.split, self.canvas = split, canvas
        self.rng = np.random.default_rng([seed, SPLITS.index(split)])
        self.popular = tuple(popular)
        self.pairs = IID_PAIRS
        w = np.array([ANCHOR_WEIGHT if p in PARTNER else 1.0 for p in IID_PAIRS])
        self.weights = w / w.sum()
        self._pope_answers: np.ndarray | None = None  # set by balance_pope
        self.digit_pool = np.arange(0, DIGIT_POOL_SPLIT) if split == "train" else np.arange(DIGIT_POOL_SPLIT, 1797)

    # -- small draws
    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def pick_mix(self, mix: dict[str, float]) -> str:
        keys = list(mix)
        cum = np.cumsum([mix[k] for k in keys])
        return keys[min(int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right")), len(keys) - 1)]

    # -- scenes
    def sample_pairs(self, n: int | None = None, forced: Sequence[Pair] = (), exclude: Sequence[Pair] = (),
                     pairs: Sequence[Pair] | None = None, prior: bool = True) -> list[Pair]:
        """Distinct (color, shape) pairs of a scene; the prior may add partners (and grow n)."""
        rng = self.rng
        if n is None:
            n = int(rng.choice(4, p=N_OBJECTS_P)) + 1
        pool = list(pairs) if pairs is not None else list(self.pairs)
        exclude = set(exclude) | {p for p in ALL_PAIRS if p not in pool}  # the prior stays inside the pool
        ok = [i for i, p in enumerate(pool) if p not in exclude]
        w = np.array([ANCHOR_WEIGHT if pool[i] in PARTNER else 1.0 for i in ok])
        w /= w.sum()
        chosen = list(forced)
        n = max(n, len(chosen))
        for p in list(chosen):
            if prior and p in PARTNER and PARTNER[p] not in exclude and PARTNER[p] not in chosen \
                    and len(chosen) < MAX_OBJECTS and rng.random() < PRIOR_P[p]:
                chosen.append(PARTNER[p])
                n = max(n, len(chosen))
        while len(chosen) < n:
            p = pool[ok[int(rng.choice(len(ok), p=w))]]
            if p in chosen:
                continue
            chosen.append(p)
            if prior and p in PARTNER and PARTNER[p] not in chosen and PARTNER[p] not in exclude \
                    and len(chosen) < MAX_OBJECTS and rng.random() < PRIOR_P[p]:
                chosen.append(PARTNER[p])
                n = max(n, len(chosen))
        return chosen

    def layout(self, objects: list[dict], blocked: tuple[int, int, int, int] | None = None) -> bool:
        """Give each object a non-overlapping centre (x, y) in place; False if it does not fit."""
        placed: list[tuple[float, float, float]] = []
        for obj in objects:
            for attempt in range(80):
                if attempt == 40 and obj["size"] == "big":
                    obj["size"] = "small"  # crowded: shrink before giving up
                r = render.object_radius(obj)
                lo, hi = int(np.ceil(r)) + 1, self.canvas - int(np.ceil(r)) - 1
                x, y = int(self.rng.integers(lo, hi + 1)), int(self.rng.integers(lo, hi + 1))
                if any((x - px) ** 2 + (y - py) ** 2 < (r + pr + 1.5) ** 2 for px, py, pr in placed):
                    continue
                if blocked is not None:
                    bx0, by0, bx1, by1 = blocked
                    dx, dy = max(bx0 - x, 0, x - bx1), max(by0 - y, 0, y - by1)
                    if dx * dx + dy * dy < (r + 1.5) ** 2:
                        continue
                obj["x"], obj["y"] = x, y
                placed.append((x, y, r))
                break
            else:
                return False
        return True

    def objects(self, pairs: list[Pair], blocked=None) -> list[dict] | None:
        objs = [{"shape": s, "color": c, "size": self.pick(SIZES), "x": 0, "y": 0} for c, s in pairs]
        return objs if self.layout(objs, blocked) else None

    def scene(self, **kw) -> list[dict]:
        """Objects of a scene (see ``sample_pairs`` for the keywords), laid out."""
        while True:
            objs = self.objects(self.sample_pairs(**kw))
            if objs is not None:
                return objs

    def digit_object(self) -> dict:
        idx = int(self.pick(self.digit_pool))
        return {"shape": DIGIT, "color": self.pick(COLORS), "size": self.pick(SIZES), "x": 0, "y": 0,
                "digit": int(render.digit_images()[1][idx]), "digit_index": idx}

    def draw(self, objects: list[dict], sign: dict | None = None, bars: list[dict] | None = None) -> bytes:
        canvas = render.background(self.rng, self.canvas)
        if sign is not None:
            render.draw_sign(canvas, sign, self.rng)
        if bars is not None:
            render.draw_chart(canvas, bars, self.rng)
        for obj in objects:
            render.draw_object(canvas, obj, self.rng)
        return render.png_bytes(canvas)

    def clip(self, count: int | None = None, events: list[dict] | None = None) -> tuple[list[dict], bytes]:
        from omnifuse.tokenizers.audio import log_mel

        events = events if events is not None else sounds.sample_events(self.rng, count)
        wave = sounds.synthesize(events, self.rng)
        return events, _npy_bytes(log_mel(wave).numpy().astype(np.float32))

    # -- sample assembly
    def sample(self, task: str, qtype: str, media: list[tuple[str, bytes]], texts: list[tuple[str, bool]],
               **meta) -> dict:
        segments, files = [], {}
        for i, (ext, data) in enumerate(media):
            name = f"{i}.{ext}"
            segments.append({"media": "image" if ext == "png" else "audio", "file": name})
            files[name] = data
        segments += [{"text": t, "target": tgt} for t, tgt in texts]
        return {"task": task, "segments": segments, "meta": {"split": self.split, "qtype": qtype, **meta},
                "files": files}

    def qa(self, task: str, qtype: str, media, question: str, answer: str, candidates: Sequence[str], **meta) -> dict:
        assert answer in candidates, (qtype, answer, candidates)
        assert len(question.split()) <= 12, question
        return self.sample(task, qtype, media, [(question, False), (answer, True)],
                           answer=answer, candidates=list(candidates), question=question, **meta)

    # -- tasks
    def make(self, index: int) -> dict:
        """Sample number ``index`` of this split (task drawn from the split's mix)."""
        if self.split.startswith("pope-"):
            return self.pope(self.split.removeprefix("pope-"), index)
        if self.split == "cogent":
            return self.cogent()
        task = self.pick_mix(TASK_MIX)
        if task == "vqa":
            return getattr(self, f"vqa_{self.pick_mix(VQA_MIX)}")()
        if task == "audio_qa":
            return self.audio_qa(self.pick_mix(AUDIO_QA_MIX))
        return getattr(self, task)()

    def caption(self, objs: list[dict] | None = None, **meta) -> dict:
        if objs is None:
            objs = self.scene()
            if self.rng.random() < 0.15 and len(objs) < MAX_OBJECTS:
                digit = self.digit_object()
                objs = objs + [digit]
                if not self.layout(objs):
                    return self.caption()
        cap = caption_of(objs)
        return self.sample("caption", "caption", [("png", self.draw(objs))], [(CAPTION_PROMPT, False), (cap, True)],
                           caption=cap, objects=objs, **meta)

    def audio_caption(self) -> dict:
        events, spec = self.clip()
        cap = audio_caption_of(events)
        return self.sample("audio_caption", "audio_caption", [("npy", spec)],
                           [(AUDIO_CAPTION_PROMPT, False), (cap, True)], caption=cap, events=events)

    def _unique(self, objs: list[dict], field: str) -> list[dict]:
        c = Counter(o[field] for o in objs)
        return [o for o in objs if c[o[field]] == 1]

    def vqa_color(self, objs=None, target=None, **meta) -> dict:
        while target is None:
            objs = self.scene()
            cands = self._unique(objs, "shape")
            target = self.pick(cands) if cands else None
        q = f"what color is the {target['shape']}?"
        return self.qa("vqa", "color", [("png", self.draw(objs))], q, target["color"], COLORS,
                       objects=objs, target=_pair_dict((target["color"], target["shape"])), **meta)

    def vqa_shape(self, objs=None, target=None, **meta) -> dict:
        while target is None:
            objs = self.scene()
            cands = self._unique(objs, "color")
            target = self.pick(cands) if cands else None
        q = f"what shape is the {target['color']} object?"
        return self.qa("vqa", "shape", [("png", self.draw(objs))], q, target["shape"], SHAPES,
                       objects=objs, target=_pair_dict((target["color"], target["shape"])), **meta)

    def vqa_size(self, objs=None, target=None, **meta) -> dict:
        if target is None:
            objs = self.scene()
            target = self.pick(objs)
        q = f"what size is the {target['color']} {target['shape']}?"
        return self.qa("vqa", "size", [("png", self.draw(objs))], q, target["size"], SIZES,
                       objects=objs, target=_pair_dict((target["color"], target["shape"])), **meta)

    def vqa_count(self, objs=None, **meta) -> dict:
        objs = objs if objs is not None else self.scene()
        if self.rng.random() < 0.5:
            q, ans = "how many objects are there?", str(len(objs))
        else:
            shape = self.pick(objs)["shape"] if self.rng.random() < 0.7 else self.pick(SHAPES)
            q, ans = f"how many {PLURALS[shape]} are there?", str(sum(o["shape"] == shape for o in objs))
        return self.qa("vqa", "count", [("png", self.draw(objs))], q, ans, NUMBERS[: MAX_OBJECTS + 1],
                       objects=objs, **meta)

    def _spatial_pairs(self, objs: list[dict], first: dict | None = None) -> list[tuple[dict, dict, str]]:
        out = []
        for a in objs if first is None else [first]:
            for b in objs:
                if a is b:
                    continue
                if abs(a["x"] - b["x"]) >= self.MIN_SEP:
                    out.append((a, b, "x"))
                if abs(a["y"] - b["y"]) >= self.MIN_SEP:
                    out.append((a, b, "y"))
        return out

    def vqa_spatial(self, objs=None, first=None, **meta) -> dict:
        cands = self._spatial_pairs(objs, first) if objs is not None else []
        while not cands:
            objs = self.scene(n=int(self.rng.integers(2, MAX_OBJECTS + 1)))
            cands = self._spatial_pairs(objs)
        a, b, axis = self.pick(cands)
        rel = self.pick(RELATIONS[:2] if axis == "x" else RELATIONS[2:])
        q = f"is the {a['color']} {a['shape']} {rel} the {b['color']} {b['shape']}?"
        ans = "yes" if relation_holds(a, rel, b) else "no"
        return self.qa("vqa", "spatial", [("png", self.draw(objs))], q, ans, YES_NO, objects=objs,
                       relation=rel, subject=_pair_dict((a["color"], a["shape"])),
                       reference=_pair_dict((b["color"], b["shape"])), **meta)

    def exists_question(self, probe: Pair) -> str:
        return f"is there a {probe[0]} {probe[1]} in the image?"

    def vqa_exists(self) -> dict:
        """Half present objects, half absent ones; absent probes are often the prior's partner."""
        objs = self.scene()
        present = [(o["color"], o["shape"]) for o in objs]
        if self.rng.random() < 0.5:
            probe = self.pick(present)
        else:
            partners = [PARTNER[p] for p in present if p in PARTNER and PARTNER[p] not in present]
            if partners and self.rng.random() < 0.5:
                probe = self.pick(partners)
            else:
                probe = self.pick([p for p in self.pairs if p not in present])
        ans = "yes" if probe in present else "no"
        return self.qa("vqa", "exists", [("png", self.draw(objs))], self.exists_question(probe), ans, YES_NO,
                       objects=objs, probe=_pair_dict(probe))

    def vqa_ocr(self) -> dict:
        word = self.pick(WORDS)
        w, h = render.sign_size(word)
        x = int(self.rng.integers(w // 2 + 1, self.canvas - (w - w // 2) - 1))
        y = int(self.rng.integers(h // 2 + 1, self.canvas - (h - h // 2) - 1))
        sign = {"word": word, "x": x, "y": y, "w": w, "h": h}
        box = (x - w // 2, y - h // 2, x - w // 2 + w, y - h // 2 + h)
        objs: list[dict] = []
        if self.rng.random() < 0.5:
            objs = self.objects(self.sample_pairs(n=1, prior=False), blocked=box) or []
        return self.qa("vqa", "ocr", [("png", self.draw(objs, sign=sign))], "what word is on the sign?", word, WORDS,
                       objects=objs, sign=sign)

    def vqa_chart(self) -> dict:
        n = int(self.rng.integers(2, 5))
        colors = [COLORS[i] for i in self.rng.permutation(len(COLORS))[:n]]
        values = [int(v) for v in self.rng.integers(1, 6, n)]
        bars = [{"color": c, "value": v} for c, v in zip(colors, values)]
        forms = ["value"]
        if values.count(max(values)) == 1:
            forms.append("tallest")
        if values.count(min(values)) == 1:
            forms.append("shortest")
        form = self.pick(forms)
        if form == "value":
            bar = self.pick(bars)
            q, ans, cands = f"how tall is the {bar['color']} bar?", str(bar["value"]), NUMBERS[1:6]
        else:
            pick = max if form == "tallest" else min
            q, ans, cands = f"which bar is {form}?", pick(bars, key=lambda b: b["value"])["color"], COLORS
        return self.qa("vqa", "chart", [("png", self.draw([], bars=bars))], q, ans, cands, objects=[], bars=bars,
                       form=form)

    def vqa_digit(self) -> dict:
        while True:
            objs = [self.digit_object()]
            if self.rng.random() < 0.5:
                c, s = self.sample_pairs(n=1, prior=False)[0]
                objs.append({"shape": s, "color": c, "size": "small", "x": 0, "y": 0})
            if self.layout(objs):
                break
        return self.qa("vqa", "digit", [("png", self.draw(objs))], "what digit is shown?", str(objs[0]["digit"]),
                       NUMBERS, objects=objs)

    def audio_qa(self, qtype: str) -> dict:
        if qtype == "audio_order":
            k1, k2 = (SOUND_KINDS[i] for i in self.rng.permutation(len(SOUND_KINDS))[:2])
            others = [k for k in SOUND_KINDS if k not in (k1, k2)]
            kinds = [k1, k2] + [self.pick(others) for _ in range(int(self.rng.integers(0, 3)))]
            kinds = [kinds[i] for i in self.rng.permutation(len(kinds))]
            pitches = [self.pick(PITCHES) for _ in kinds]
            events, spec = self.clip(events=sounds.place_events(self.rng, kinds, pitches))
            a, b = (k1, k2) if self.rng.random() < 0.5 else (k2, k1)
            q = f"which comes first, the {a} or the {b}?"
            ans = a if kinds.index(a) < kinds.index(b) else b
            return self.qa("audio_qa", qtype, [("npy", spec)], q, ans, [a, b], events=events)
        events, spec = self.clip()
        if qtype == "audio_count":
            q, ans, cands = "how many sounds are there?", str(len(events)), NUMBERS[1:5]
        else:
            i = int(self.rng.integers(len(events)))
            if qtype == "audio_pitch":
                q, ans, cands = f"what pitch is the {ORDINALS[i]} sound?", events[i]["pitch"], PITCHES
            else:
                q, ans, cands = f"what is the {ORDINALS[i]} sound?", events[i]["kind"], SOUND_KINDS
        return self.qa("audio_qa", qtype, [("npy", spec)], q, ans, cands, events=events)

    def crossmodal(self) -> dict:
        objs = self.scene()
        n = len(objs)
        if self.rng.random() < 0.5:
            qtype, q = "cross_match", "does the number of sounds match the number of shapes?"
            m = n if self.rng.random() < 0.5 else self.pick([k for k in range(1, 5) if k != n])
            ans = "yes" if m == n else "no"
        else:
            qtype, q = "cross_more", "are there more sounds than shapes?"
            m = self.pick([k for k in range(1, 5) if k != n])
            ans = "yes" if m > n else "no"
        events, spec = self.clip(count=m)
        return self.qa("crossmodal", qtype, [("png", self.draw(objs)), ("npy", spec)], q, ans, YES_NO,
                       objects=objs, events=events)

    def multi_image(self) -> dict:
        form = self.pick(("multi_more", "multi_same", "multi_which"))
        want_same = self.rng.random() < 0.5  # multi_same: balanced yes/no
        while True:
            a, b = self.scene(), self.scene()
            pa, pb = {(o["color"], o["shape"]) for o in a}, {(o["color"], o["shape"]) for o in b}
            if form == "multi_more" and len(a) != len(b):
                q = "which image has more shapes?"
                ans, cands = ("first" if len(a) > len(b) else "second"), ("first", "second")
                break
            if form == "multi_same" and (len(a) == len(b)) == want_same:
                q = "do the two images have the same number of shapes?"
                ans, cands = ("yes" if len(a) == len(b) else "no"), YES_NO
                break
            only = sorted(pa ^ pb)
            if form == "multi_which" and only:
                p = self.pick(only)
                q = f"which image has a {p[0]} {p[1]}?"
                ans, cands = ("first" if p in pa else "second"), ("first", "second")
                break
        objs = [{**o, "image": 0} for o in a] + [{**o, "image": 1} for o in b]
        return self.qa("multi_image", form, [("png", self.draw(a)), ("png", self.draw(b))], q, ans, cands,
                       objects=objs, images=[{"objects": a}, {"objects": b}])

    # -- prose
    def text(self) -> dict:
        kinds = [self.pick(("scene", "habit", "sound", "chart", "scene")) for _ in range(int(self.rng.integers(2, 4)))]
        prose = " ".join(getattr(self, f"_prose_{k}")() for k in kinds)
        return self.sample("text", "text", [], [(prose, True)], kinds=kinds)

    def _prose_scene(self) -> str:
        objs = self.scene()
        out = f"one picture shows {caption_of(objs)}"
        pairs = self._spatial_pairs(objs)
        if pairs:
            a, b, axis = self.pick(pairs)
            rel = next(r for r in (RELATIONS[:2] if axis == "x" else RELATIONS[2:]) if relation_holds(a, r, b))
            out += f" the {a['color']} {a['shape']} is {rel} the {b['color']} {b['shape']}."
        n = len(objs)
        return out + f" there {'is' if n == 1 else 'are'} {n} object{'s' if n > 1 else ''}."

    def _prose_habit(self) -> str:
        a, b, _ = self.pick(PRIOR)
        form = int(self.rng.integers(3))
        if form == 0:
            return f"a {a[0]} {a[1]} usually comes with a {b[0]} {b[1]}."
        if form == 1:
            return f"where there is a {a[0]} {a[1]}, there is often a {b[0]} {b[1]}."
        return f"a {a[0]} {a[1]} is mostly seen with a {b[0]} {b[1]}, but not always."

    def _prose_sound(self) -> str:
        events = sounds.sample_events(self.rng)
        n = len(events)
        return f"a clip has {n} sound{'s' if n > 1 else ''}: {audio_caption_of(events)}"

    def _prose_chart(self) -> str:
        n = int(self.rng.integers(2, 5))
        colors = [COLORS[i] for i in self.rng.permutation(len(COLORS))[:n]]
        values = [int(v) for v in self.rng.integers(1, 6, n)]
        bars = ", ".join(f"the {c} bar is {v}" for c, v in zip(colors, values))
        return f"in a chart, {bars}."

    # -- compositional split
    def cogent(self) -> dict:
        """A scene with one held-out pair whose shape and colour are unique in it; ask about it."""
        held = self.pick(HELDOUT_PAIRS)
        others = [p for p in IID_PAIRS if p[0] != held[0] and p[1] != held[1]]
        qtype = self.pick_mix(COGENT_MIX)
        n = int(self.rng.integers(2 if qtype == "spatial" else 1, MAX_OBJECTS + 1))
        while True:
            objs = self.objects(self.sample_pairs(n=n, forced=[held], pairs=others))
            if objs is not None and (qtype != "spatial" or self._spatial_pairs(objs, objs[0])):
                break
        target = objs[0]
        meta = {"heldout": _pair_dict(held)}
        if qtype == "caption":
            return self.caption(objs, **meta)
        if qtype == "exists":
            present = {(o["color"], o["shape"]) for o in objs}
            probe = held if self.rng.random() < 0.5 else self.pick([p for p in HELDOUT_PAIRS if p not in present])
            ans = "yes" if probe in present else "no"
            return self.qa("vqa", "exists", [("png", self.draw(objs))], self.exists_question(probe), ans, YES_NO,
                           objects=objs, probe=_pair_dict(probe), **meta)
        if qtype == "count":
            return self.vqa_count(objs, **meta)
        if qtype == "spatial":
            return self.vqa_spatial(objs, first=target, **meta)
        return getattr(self, f"vqa_{qtype}")(objs, target, **meta)

    # -- POPE
    def pope(self, variant: str, index: int) -> dict:
        """Balanced yes/no object probes (``index`` parity after a fixed shuffle decides the answer)."""
        yes = bool(self._pope_answers[index]) if self._pope_answers is not None else index % 2 == 0
        if variant == "adversarial":
            anchor, partner, _ = self.pick(PRIOR)
            if yes:
                objs = self.scene(forced=[anchor, partner], prior=False)
            else:
                objs = self.scene(forced=[anchor], exclude=[partner], prior=False)
            probe = partner
        else:
            objs = self.scene()
            present = [(o["color"], o["shape"]) for o in objs]
            if yes:
                probe = self.pick(present)
            elif variant == "popular":
                pool = [p for p in self.popular if p not in present][:POPULAR_TOP_K]
                probe = self.pick(pool)
            else:
                probe = self.pick([p for p in self.pairs if p not in present])
        ans = "yes" if yes else "no"
        return self.qa("pope", "pope", [("png", self.draw(objs))], self.exists_question(probe), ans, YES_NO,
                       objects=objs, probe=_pair_dict(probe), variant=variant)

    def balance_pope(self, count: int) -> None:
        """Fix the yes/no sequence of a POPE split: exactly half yes (one more if odd), shuffled."""
        answers = np.array([1] * ((count + 1) // 2) + [0] * (count // 2))
        self._pope_answers = answers[self.rng.permutation(count)]


# ----------------------------------------------------------------------------- world

def object_frequencies(seed: int, n_scenes: int = 4000) -> tuple[list[Pair], dict]:
    """Popularity ranking of iid pairs and the measured prior, from scenes of a dedicated stream."""
    gen = SplitGenerator("train", seed)
    gen.rng = np.random.default_rng([seed, 1000])  # independent of every split's stream
    freq: Counter = Counter()
    with_partner: Counter = Counter()
    for _ in range(n_scenes):
        pairs = gen.sample_pairs()
        freq.update(pairs)
        with_partner.update(a for a in pairs if a in PARTNER and PARTNER[a] in pairs)
    ranking = sorted(IID_PAIRS, key=lambda p: (-freq[p], p))
    measured = {f"{a[0]} {a[1]}": round(with_partner[a] / max(freq[a], 1), 3) for a in PARTNER}
    return ranking, measured


def resolve_counts(preset: str, counts: dict | None = None) -> dict[str, int]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
    out = dict(PRESETS[preset])
    for split, n in (counts or {}).items():
        if split not in SPLITS:
            raise ValueError(f"counts names unknown split {split!r}; expected one of {SPLITS}")
        if int(n) < 0:
            raise ValueError(f"counts[{split!r}] must be >= 0, got {n}")
        out[split] = int(n)
    return out


def _encode(key: str, s: dict) -> dict:
    doc = {"task": s["task"], "segments": s["segments"], "meta": s["meta"]}
    out = {"__key__": key, "json": json.dumps(doc, separators=(",", ":")).encode("utf-8")}
    out.update(s["files"])
    return out


def generate_world(out_dir: str | Path, preset: str = "tiny", seed: int = 0, progress: bool = True,
                   counts: dict | None = None, maxcount: int = SHARD_MAXCOUNT) -> dict:
    """Write every split's shards and ``world.json`` under ``out_dir``; return world.json's content.

    Args:
        out_dir: destination folder (created; existing shards of a split are replaced).
        preset: ``tiny``, ``small`` or ``base`` (``PRESETS``: samples per split).
        seed: world seed; the same seed gives byte-identical shards and world.json.
        progress: show a tqdm bar and print a summary.
        counts: optional per-split overrides of the preset's counts (tests use small ones).
        maxcount: samples per shard.
    """
    import torch

    # torch.stft with its default intra-op threads fights numpy for the cores (10x slower on 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _generate(Path(out_dir), preset, seed, progress, resolve_counts(preset, counts), maxcount)
    finally:
        torch.set_num_threads(threads)


def _generate(out_dir: Path, preset: str, seed: int, progress: bool, counts: dict[str, int], maxcount: int) -> dict:
    import webdataset as wds
    from tqdm import tqdm

    popular, measured = object_frequencies(seed)
    per_task = {s: Counter() for s in SPLITS}
    per_qtype = {s: Counter() for s in SPLITS}
    words = {s: {"all": 0, "target": 0} for s in SPLITS}
    shards: dict[str, int] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=sum(counts.values()), unit="sample", desc="world", disable=not progress)
    for split in SPLITS:
        d = out_dir / split
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("shard-*.tar"):
            old.unlink()
        n = counts[split]
        shards[split] = 0
        if n == 0:
            continue
        gen = SplitGenerator(split, seed, popular=popular)
        if split.startswith("pope-"):
            gen.balance_pope(n)
        bar.set_postfix_str(split)
        with wds.ShardWriter(str(d / "shard-%06d.tar"), maxcount=maxcount, verbose=0, encoder=False,
                             mtime=TAR_MTIME, user="omnifuse", group="omnifuse") as sink:
            for i in range(n):
                s = gen.make(i)
                per_task[split][s["task"]] += 1
                per_qtype[split][f"{s['task']}/{s['meta']['qtype']}"] += 1
                for seg in s["segments"]:
                    if "text" in seg:
                        k = len(seg["text"].split())
                        words[split]["all"] += k
                        words[split]["target"] += k if seg["target"] else 0
                sink.write(_encode(f"{split}-{i:08d}", s))
                bar.update(1)
            shards[split] = sink.shard
    bar.close()

    world = {
        "version": WORLD_VERSION,
        "vocabulary": {
            "shapes": list(SHAPES), "digit_shape": DIGIT, "plurals": PLURALS, "colors": list(COLORS),
            "sizes": list(SIZES), "relations": list(RELATIONS), "sound_kinds": list(SOUND_KINDS),
            "pitches": list(PITCHES), "pitch_hz": sounds.PITCH_HZ, "words": list(WORDS),
            "ordinals": list(ORDINALS), "numbers": list(NUMBERS),
        },
        "grammar": {
            "object": "<size> <color> <shape>",
            "digit_object": "<size> <color> digit <n>",
            "caption": "a <object>[, a <object>] and a <object>. (objects left to right)",
            "audio_caption": "a <pitch> <kind>[, then a <pitch> <kind>]. (events in time order)",
            "caption_prompt": CAPTION_PROMPT, "audio_caption_prompt": AUDIO_CAPTION_PROMPT,
            "exists_question": "is there a <color> <shape> in the image?",
        },
        "tasks": list(TASKS), "splits": list(SPLITS), "qtypes": {k: list(v) for k, v in QTYPES.items()},
        "heldout_pairs": [_pair_dict(p) for p in HELDOUT_PAIRS],
        "cooccurrence": {
            "pairs": [{"anchor": _pair_dict(a), "partner": _pair_dict(b), "p": p} for a, b, p in PRIOR],
            "anchor_weight": ANCHOR_WEIGHT,
            "measured_p_partner_given_anchor": measured,
        },
        "popular_objects": [_pair_dict(p) for p in popular[:POPULAR_TOP_K * 2]],
        "settings": {
            "preset": preset, "seed": seed, "canvas": [CANVAS, CANVAS, 3], "counts": counts,
            "shard_maxcount": maxcount, "max_objects": MAX_OBJECTS, "n_objects_p": list(N_OBJECTS_P),
            "sample_rate": sounds.SAMPLE_RATE, "clip_seconds": sounds.CLIP_SECONDS,
            "spectrogram": "float32 natural-log mel (32, frames) from omnifuse.tokenizers.audio.log_mel",
            "digit_pool": {"train": [0, DIGIT_POOL_SPLIT], "other": [DIGIT_POOL_SPLIT, 1797]},
            "task_mix": TASK_MIX, "vqa_mix": VQA_MIX, "audio_qa_mix": AUDIO_QA_MIX, "cogent_mix": COGENT_MIX,
        },
        "summary": {
            "samples": counts, "shards": shards,
            "tasks": {s: dict(sorted(per_task[s].items())) for s in SPLITS},
            "qtypes": {s: dict(sorted(per_qtype[s].items())) for s in SPLITS},
            "words": words,
        },
    }
    (out_dir / "world.json").write_text(json.dumps(world, indent=1) + "\n")
    if progress:
        _print_summary(out_dir, world, time.perf_counter() - t0)
    return world


def _print_summary(out_dir: Path, world: dict, seconds: float) -> None:
    s = world["summary"]
    print(f"world written to {out_dir} in {seconds:.1f}s (preset {world['settings']['preset']}, "
          f"seed {world['settings']['seed']})")
    for split in SPLITS:
        tasks = ", ".join(f"{t} {n}" for t, n in s["tasks"][split].items())
        print(f"  {split:17s} {s['samples'][split]:7d} samples  {s['shards'][split]:3d} shards  "
              f"{s['words'][split]['all']:8d} words  [{tasks}]")


def _split_count(text: str) -> tuple[str, int]:
    split, _, n = text.partition("=")
    if split not in SPLITS or not n.isdigit():
        raise argparse.ArgumentTypeError(f"expected SPLIT=N with SPLIT in {SPLITS}, got {text!r}")
    return split, int(n)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m omnifuse.data.world",
        description="Generate omnifuse's synthetic world: scenes (shapes, digits, signs, charts), sounds, "
                    "questions and prose, as webdataset shards per split plus DIR/world.json. "
                    "Deterministic: the same --seed gives byte-identical shards.",
        epilog="Presets (samples in train/val/test/cogent/each pope split): "
               + "; ".join(f"{k}: {v['train']}/{v['val']}/{v['test']}/{v['cogent']}/{v['pope-random']}"
                           for k, v in PRESETS.items()),
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (DIR/world.json, DIR/<split>/*.tar)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="tiny", help="world size (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    parser.add_argument("--count", action="append", default=[], metavar="SPLIT=N", type=_split_count,
                        help="override one split's sample count, e.g. --count train=500 (repeatable)")
    parser.add_argument("--maxcount", type=int, default=SHARD_MAXCOUNT, help="samples per shard (default: 2000)")
    parser.add_argument("--vocab-size", type=int, default=768,
                        help="then train DIR/tokenizer.model (SentencePiece, this upper bound on the vocabulary) "
                             "on the train split's text; 0 skips it (default: 768)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar and no summary")
    args = parser.parse_args(argv)
    world = generate_world(args.out, preset=args.preset, seed=args.seed, progress=not args.no_progress,
                           counts=dict(args.count), maxcount=args.maxcount)
    if args.vocab_size > 0:
        from omnifuse.tokenizers.text import iter_world_texts, train_tokenizer

        path = train_tokenizer(iter_world_texts(args.out, "train"), args.vocab_size, args.out / "tokenizer.model")
        print(f"wrote {path}")
    return world


if __name__ == "__main__":
    main()
