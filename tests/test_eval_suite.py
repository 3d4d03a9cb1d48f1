"""The world suite's scoring and grounding probes, on toy models whose answers are known.

No training: the "models" are a few lines of rules behind the shared model interface
(``forward(tokens, modality, positions, image_patches, audio_patches, doc_ids=None)`` → logits
``(B, S, V)``, and a greedy ``generate`` with NativeFusion's contract). Each reads the prompt the
way a real model would see it (slots, image patches in row-major order), so every number the suite
reports for it — accuracy, blind / shuffled / swapped probes, candidate scores, NLL — is known in
advance and asserted exactly.

- ``MeanReader`` ("looking"): de-normalises the mean of the row's image patches and names the
  nearest palette colour; with no image in the row it falls back to ``"blue"``.
- ``FirstPatchReader``: names the colour of the row's *first* image patch only (top-left).
- ``BlindModel``: always ``"red"``, whatever the media.

After the prompt text ``QUESTION`` the model spells its colour word then EOS; after
``CAPTION_PROMPT`` it spells ``"a {colour} square."`` then EOS. Its logits put ``HIGH`` on the next
token of that answer while the answer so far has been followed, and ``HIGH`` on EOS once it has
been left; everywhere else (and on rows with neither cue) the logits are 0, i.e. uniform.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from omnifuse.data.samples import Sample
from omnifuse.eval import suite as suite_mod
from omnifuse.eval.suite import Scorer, WorldSuite, headline, shuffle_patches, without_media
from omnifuse.tokenizers.interleave import Interleaver, next_position
from omnifuse.tokenizers.stream import IMAGE, TEXT
from omnifuse.tokenizers.text import EOS_ID, NUM_SPECIAL, TextTokenizer, train_tokenizer

PATCH = 8
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
COLOURS = list(PALETTE)
QUESTION = "what color is the square?"
CAPTION_PROMPT = "describe the image."
HIGH = 10.0
BLIND_FALLBACK = "blue"  # what MeanReader answers with no image in its row

# colours of the QA set: red 3, green 2, blue 2, yellow 1; consecutive pairs (the swapped probe
# pairs neighbours of one question group) differ except the first (red, red)
QA_COLOURS = ["red", "red", "green", "blue", "yellow", "blue", "green", "red"]
N_ELIGIBLE_PAIRS = 6


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    lines = []
    for c in COLOURS:
        lines += [QUESTION, c, f"the square is {c}.", f"a {c} square.", f"is the square {c}? yes",
                  f"is the square {c}? no", CAPTION_PROMPT, "yes", "no", "red square"]
    path = train_tokenizer(lines * 10, 160, tmp_path_factory.mktemp("spm") / "tok.model")
    return TextTokenizer(path)


@pytest.fixture(scope="module")
def il(tok) -> Interleaver:
    return Interleaver(tok, patch=PATCH)


def solid(colour: str, size: int = 16) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = PALETTE[colour]
    return img


def quadrants(c0: str, c1: str, c2: str, c3: str) -> np.ndarray:
    """16×16 image whose four 8×8 patches (raster order) are c0, c1, c2, c3."""
    img = np.zeros((16, 16, 3), np.uint8)
    img[:8, :8], img[:8, 8:], img[8:, :8], img[8:, 8:] = (PALETTE[c] for c in (c0, c1, c2, c3))
    return img


def vqa(key: str, answer: str, image: np.ndarray | None = None) -> Sample:
    return Sample(
        key=key, shard="toy", task="vqa",
        segments=[{"media": "image", "file": "0.png"}, {"text": QUESTION, "target": False},
                  {"text": answer, "target": True}],
        meta={"split": "test", "qtype": "color", "answer": answer, "candidates": list(COLOURS)},
        media={"0.png": solid(answer) if image is None else image},
    )


def caption(key: str, colour: str) -> Sample:
    return Sample(
        key=key, shard="toy", task="caption",
        segments=[{"media": "image", "file": "0.png"}, {"text": CAPTION_PROMPT, "target": False},
                  {"text": f"a {colour} square.", "target": True}],
        meta={"split": "test", "qtype": "caption",
              "objects": [{"shape": "square", "color": colour, "size": "large", "x": 0, "y": 0}]},
        media={"0.png": solid(colour)},
    )


def text_sample(key: str) -> Sample:
    return Sample(key=key, shard="toy", task="text", segments=[{"text": "the square is red.", "target": True}],
                  meta={"split": "test", "qtype": "text"}, media={})


def qa_samples() -> list[Sample]:
    return [vqa(f"q{i}", c) for i, c in enumerate(QA_COLOURS)]


def frac(colour: str) -> float:
    return QA_COLOURS.count(colour) / len(QA_COLOURS)


# --------------------------------------------------------------------------- toy models


def patch_rgb(patches: torch.Tensor) -> torch.Tensor:
    """(N, 3·P²) normalised patches → (N, 3) mean RGB in 0..255 (undoing (x/255 - 0.5)/0.5)."""
    x = patches.view(patches.shape[0], PATCH * PATCH, 3)  # (N, P², 3), (P, P, C) order
    return (x * 0.5 + 0.5).mul(255).mean(dim=1)


def nearest(rgb: torch.Tensor) -> str:
    d = {c: float(((rgb - torch.tensor(v, dtype=torch.float32)) ** 2).sum()) for c, v in PALETTE.items()}
    return min(d, key=d.get)


class ToyLM(nn.Module):
    """Rule-based LM with the shared model interface (module docstring)."""

    def __init__(self, tok: TextTokenizer):
        super().__init__()
        self.tok, self.vocab = tok, tok.vocab_size
        self.cues = [(tok.encode(QUESTION), "{c}"), (tok.encode(CAPTION_PROMPT), "a {c} square.")]
        self.forward_calls: list[dict] = []
        self.generate_calls: list[dict] = []
        self.generate_batches: list[int] = []

    def colour(self, patches: torch.Tensor) -> str:  # patches (Ni_row, 3·P²) of one row
        raise NotImplementedError

    def answer_of(self, row: list[int], patches: torch.Tensor) -> tuple[int, list[int]] | None:
        """(slot where the answer starts, answer ids + EOS) after the last cue in ``row``, or None."""
        best = None
        for cue, template in self.cues:
            for j in range(len(row) - len(cue) + 1):
                if row[j : j + len(cue)] == cue and (best is None or j + len(cue) > best[0]):
                    best = (j + len(cue), template)
        if best is None:
            return None
        start, template = best
        return start, self.tok.encode(template.format(c=self.colour(patches))) + [EOS_ID]

    def forward(self, tokens, modality, positions, image_patches, audio_patches, doc_ids=None):
        self.forward_calls.append(dict(tokens=tokens.clone(), modality=modality.clone(), positions=positions.clone(),
                                       image_patches=image_patches.clone(), audio_patches=audio_patches.clone()))
        b, s = tokens.shape
        counts = (modality == IMAGE).sum(dim=1).tolist()
        assert image_patches.shape[0] == sum(counts)
        per_row = torch.split(image_patches, counts)  # row-major order of (B, S)
        logits = torch.zeros(b, s, self.vocab)
        for r in range(b):
            found = self.answer_of(tokens[r].tolist(), per_row[r])
            if found is None:
                continue
            start, ans = found
            for i in range(start - 1, s):  # slot i predicts slot i+1
                so_far = tokens[r, start : i + 1].tolist()
                k = len(so_far)
                logits[r, i, ans[k] if k < len(ans) and so_far == ans[:k] else EOS_ID] = HIGH
        return logits  # (B, S, V)

    @torch.no_grad()
    def generate(self, tokens, modality, positions, image_patches=None, audio_patches=None, max_new_tokens=32,
                 eos_id=None, use_cache=True, lengths=None):
        """FusionArm.generate's contract: right-padded rows (``lengths``), each decoded alone: greedy,
        new TEXT slots at max(prompt positions)+1, …; stops when every row has emitted eos_id
        (kept); finished rows padded with it. Each row is recorded in ``generate_calls`` as the
        one-row call it stands for; ``generate_batches`` records the batch sizes."""
        self.generate_batches.append(tokens.shape[0])
        lengths = [tokens.shape[1]] * tokens.shape[0] if lengths is None else lengths.tolist()
        counts = (modality == IMAGE).sum(dim=1).tolist()
        per_row = torch.split(image_patches, counts)  # row-major order of (B, S)
        rows = [self._generate_row(tokens[r : r + 1, :n], modality[r : r + 1, :n], positions[r : r + 1, :n],
                                   per_row[r], max_new_tokens, eos_id, use_cache) for r, n in enumerate(lengths)]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [eos_id] * (width - len(r)) for r in rows], dtype=torch.long)

    def _generate_row(self, tokens, modality, positions, image_patches, max_new_tokens, eos_id, use_cache):
        self.generate_calls.append(dict(tokens=tokens.clone(), modality=modality.clone(), positions=positions.clone(),
                                        image_patches=image_patches.clone(), max_new_tokens=max_new_tokens,
                                        eos_id=eos_id, use_cache=use_cache))
        next_pos = int(positions.amax()) + 1
        out = []
        for k in range(max_new_tokens):
            nxt = int(self(tokens, modality, positions, image_patches, image_patches[:0])[0, -1].argmax())
            out.append(nxt)
            if nxt == eos_id:
                break
            tokens = torch.cat([tokens, torch.tensor([[nxt]])], 1)
            modality = torch.cat([modality, torch.full((1, 1), TEXT)], 1)
            positions = torch.cat([positions, torch.full((1, 1, 3), next_pos + k)], 1)
        return out


class MeanReader(ToyLM):
    def colour(self, patches):
        return nearest(patch_rgb(patches).mean(0)) if len(patches) else BLIND_FALLBACK


class FirstPatchReader(ToyLM):
    def colour(self, patches):
        return nearest(patch_rgb(patches[:1])[0]) if len(patches) else BLIND_FALLBACK


class BlindModel(ToyLM):
    def colour(self, patches):
        return "red"


class FormatBreaker(MeanReader):
    """Looks like MeanReader; without media it *generates* an out-of-format word ("square") while
    its likelihood still prefers ``PRIOR`` among the candidates (logit HIGH/2 on that token at the
    first answer slot): the blind probe's generated and ranked readings part ways."""

    PRIOR = "red"

    def colour(self, patches):
        return super().colour(patches) if len(patches) else "square"

    def forward(self, tokens, modality, positions, image_patches, audio_patches, doc_ids=None):
        logits = super().forward(tokens, modality, positions, image_patches, audio_patches, doc_ids)
        for r in range(tokens.shape[0]):
            found = self.answer_of(tokens[r].tolist(), image_patches[:0])
            if found is not None and not (modality[r] == IMAGE).any():
                logits[r, found[0] - 1, self.tok.encode(self.PRIOR)[0]] = HIGH / 2
        return logits


class TableLM(nn.Module):
    """Fixed random logits per slot index: ``logits[b, i] = table[i]`` (for target_nll by hand)."""

    def __init__(self, vocab: int, max_len: int = 256, seed: int = 0):
        super().__init__()
        self.table = torch.randn(max_len, vocab, generator=torch.Generator().manual_seed(seed)) * 3

    def forward(self, tokens, modality, positions, image_patches, audio_patches, doc_ids=None):
        b, s = tokens.shape
        return self.table[:s][None].expand(b, s, -1).clone()


def make_suite(model, il, tmp_path, split="test") -> WorldSuite:
    return WorldSuite(Scorer(model, il), tmp_path, split=split, seed=0, progress=False)


def mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs)


# --------------------------------------------------------------------------- sanity of the fixtures


def test_toy_tokenizer_and_readers(tok, il):
    """The exact numbers below rely on: every colour one distinct piece, and the readers seeing
    exactly the pixels (normalisation undone)."""
    ids = {c: tok.encode(c) for c in COLOURS}
    assert all(len(v) == 1 and v[0] >= NUM_SPECIAL for v in ids.values())
    assert len({v[0] for v in ids.values()}) == len(COLOURS)
    assert len(tok.encode("red square")) == 2 and tok.encode("red square")[0] == ids["red"][0]
    assert tok.decode(tok.encode(QUESTION)) == QUESTION
    for c, rgb in PALETTE.items():
        prompt, answer = il.encode_prompt(vqa("k", c).segments, vqa("k", c).media)
        assert answer == ids[c] + [EOS_ID]
        assert prompt.image_patches.shape == (4, 3 * PATCH * PATCH)  # 16×16 image, P=8: a 2×2 grid
        assert torch.allclose(patch_rgb(prompt.image_patches), torch.tensor(rgb, dtype=torch.float32).expand(4, 3),
                              atol=1e-3)


def test_generated_ids_beyond_the_tokenizer_read_as_unknown(tok, il):
    """The model's output layer can be wider than the tokenizer: an id with no piece (an untrained
    model emits them) decodes as <unk> instead of stopping the evaluation, and matches no answer."""
    scorer = Scorer(MeanReader(tok), il)
    red = tok.encode("red")
    assert scorer.decode(red + [EOS_ID]) == "red"
    text = scorer.decode(red + [tok.vocab_size, tok.vocab_size + 7])
    assert text.startswith("red") and "\u2047" in text  # SentencePiece's " ⁇ " for <unk>
    assert not suite_mod.exact_match(text, "red")


# --------------------------------------------------------------------------- QA and the blind / shuffled probes


def test_qa_looking_model(tok, il, tmp_path):
    model = MeanReader(tok)
    samples = qa_samples()
    records = make_suite(model, il, tmp_path).qa(samples + [caption("c0", "red"), text_sample("t0")], "test")
    assert len(records) == len(QA_COLOURS)  # caption and text samples are not QA
    assert [r["id"] for r in records] == [f"test/q{i}" for i in range(len(QA_COLOURS))]
    assert [r["prediction"] for r in records] == QA_COLOURS
    assert [r["ranked"] for r in records] == QA_COLOURS
    assert all(r["question"] == QUESTION and r["qtype"] == "color" and r["task"] == "vqa" for r in records)
    assert mean(r["correct"] for r in records) == 1.0
    assert mean(r["correct_rank"] for r in records) == 1.0
    # blind probe: media removed, the looking model falls back to its prior
    assert [r["blind_prediction"] for r in records] == [BLIND_FALLBACK] * len(QA_COLOURS)
    assert mean(r["blind_correct"] for r in records) == frac(BLIND_FALLBACK) == 0.25
    assert [r["blind_ranked"] for r in records] == [BLIND_FALLBACK] * len(QA_COLOURS)
    assert mean(r["blind_correct_rank"] for r in records) == 0.25
    # shuffled probe: a mean over patches does not care about their order
    assert [r["shuffled_prediction"] for r in records] == QA_COLOURS
    assert mean(r["shuffled_correct"] for r in records) == 1.0

    # what the model was handed: a one-row prompt per row, EOS as the stop token, the scorer's budget;
    # the 24 prompts (answer, blind, shuffled per sample; swapped not run here) in one batch
    gens = model.generate_calls
    assert len(gens) == 3 * len(QA_COLOURS) and model.generate_batches == [3 * len(QA_COLOURS)]
    assert all(g["eos_id"] == EOS_ID and g["max_new_tokens"] == 24 and g["tokens"].shape[0] == 1 for g in gens)
    blind_calls = [g for g in gens if not (g["modality"] == IMAGE).any()]
    assert len(blind_calls) == len(QA_COLOURS)
    for g in blind_calls:
        assert g["image_patches"].shape[0] == 0
        assert g["tokens"][0].tolist() == il.encode_prompt(without_media(samples[0].segments), {})[0].tokens.tolist()


def test_qa_blind_model(tok, il, tmp_path):
    records = make_suite(BlindModel(tok), il, tmp_path).qa(qa_samples(), "test")
    assert [r["prediction"] for r in records] == ["red"] * len(QA_COLOURS)
    assert mean(r["correct"] for r in records) == frac("red") == 3 / 8
    assert [r["ranked"] for r in records] == ["red"] * len(QA_COLOURS)
    assert mean(r["correct_rank"] for r in records) == 3 / 8
    # removing the media changes nothing for a model that never looked
    assert [r["blind_prediction"] for r in records] == [r["prediction"] for r in records]
    assert mean(r["blind_correct"] for r in records) == mean(r["correct"] for r in records) == 3 / 8
    assert mean(r["shuffled_correct"] for r in records) == 3 / 8


def test_probes_only_on_the_iid_split(tok, il, tmp_path):
    s = make_suite(MeanReader(tok), il, tmp_path, split="test")
    records = s.qa(qa_samples(), "cogent")
    assert all(r["id"].startswith("cogent/") and r["split"] == "cogent" for r in records)
    assert mean(r["correct"] for r in records) == 1.0
    assert not any(k in r for r in records for k in ("blind_prediction", "blind_correct", "shuffled_prediction"))
    swapped = s.swapped(qa_samples(), records)  # no test-split records: nothing to pair
    assert swapped["n_pairs"] == 0 and swapped["n_total"] == 0 and math.isnan(swapped["change_rate"])


def test_shuffled_probe_position_sensitive_model(tok, il, tmp_path):
    """A model reading only the top-left patch: unshuffled it is always right; shuffled, it names
    whichever patch the probe dealt first. The mean reader stays right under any shuffle."""
    layouts = [("red", "green", "blue", "yellow"), ("green", "red", "yellow", "blue"),
               ("blue", "yellow", "red", "green"), ("yellow", "blue", "green", "red")] * 2
    samples = [vqa(f"s{i}", q[0], quadrants(*q)) for i, q in enumerate(layouts)]
    first = make_suite(FirstPatchReader(tok), il, tmp_path).qa(samples, "test")
    assert mean(r["correct"] for r in first) == 1.0

    rng = random.Random(0)  # the suite's seed; one shuffle per sample, in order
    expected = []
    for s in samples:
        prompt, _ = il.encode_prompt(s.segments, s.media)
        expected.append(nearest(patch_rgb(shuffle_patches(prompt, rng).image_patches[:1])[0]))
    assert [r["shuffled_prediction"] for r in first] == expected
    acc = mean(r["shuffled_correct"] for r in first)
    assert acc == mean(e == q[0] for e, q in zip(expected, layouts)) and acc < 1.0

    looking = make_suite(MeanReader(tok), il, tmp_path).qa(samples, "test")
    # the mean of four distinct palette colours is nearest to none of them in particular, but the
    # same whatever the order: the shuffled prediction equals the unshuffled one
    assert [r["shuffled_prediction"] for r in looking] == [r["prediction"] for r in looking]


# --------------------------------------------------------------------------- swapped probe


def test_swapped_probe(tok, il, tmp_path):
    samples = qa_samples() + [caption("c0", "red")]
    model = MeanReader(tok)
    s = make_suite(model, il, tmp_path)
    records = s.qa(samples, "test")
    n_before = len(model.generate_calls)
    out = s.swapped(samples, records)
    assert out == {"change_rate": 1.0, "correct_change_rate": 1.0, "n_pairs": N_ELIGIBLE_PAIRS,
                   "n_total": N_ELIGIBLE_PAIRS}
    # the swapped prompts: each sample's question over its successor's image (equal answers skipped)
    calls = model.generate_calls[n_before:]
    pairs = [(a, b) for a, b in zip(samples[: len(QA_COLOURS)], samples[1 : len(QA_COLOURS)])
             if a.meta["answer"] != b.meta["answer"]]
    assert len(calls) == len(pairs) == N_ELIGIBLE_PAIRS
    for call, (a, b) in zip(calls, pairs):
        assert call["tokens"][0].tolist() == il.encode_prompt(a.segments, b.media)[0].tokens.tolist()
        assert nearest(patch_rgb(call["image_patches"]).mean(0)) == b.meta["answer"]

    b = make_suite(BlindModel(tok), il, tmp_path)
    out = b.swapped(samples, b.qa(samples, "test"))
    assert out == {"change_rate": 0.0, "correct_change_rate": 0.0, "n_pairs": N_ELIGIBLE_PAIRS,
                   "n_total": N_ELIGIBLE_PAIRS}


def test_swapped_probe_pairs_only_same_question(tok, il, tmp_path):
    """Two questions (different text) each of one sample: no pair within a group, nothing to swap."""
    a = vqa("a", "red")
    b = vqa("b", "green")
    b.segments[1] = {"text": "what color is it?", "target": False}
    s = make_suite(MeanReader(tok), il, tmp_path)
    out = s.swapped([a, b], s.qa([a, b], "test"))
    assert out["n_pairs"] == 0 and out["n_total"] == 0


# --------------------------------------------------------------------------- candidate ranking


def test_candidate_logprobs_exact(tok, il):
    """Scores by hand: Z = log(e^HIGH + V - 1) is each slot's log-normaliser; a followed token
    scores HIGH - Z, any other -Z."""
    model = MeanReader(tok)
    scorer = Scorer(model, il)
    z = math.log(math.exp(HIGH) + tok.vocab_size - 1)
    cands = [*COLOURS, "red square"]
    for colour in COLOURS:
        s = vqa("k", colour)
        prompt, _ = scorer.prompt(s)
        scores = scorer.candidate_logprobs(prompt, cands)
        assert scores.shape == (len(cands),)
        want = []
        for c in COLOURS:  # one piece + EOS
            want.append(2 * (HIGH - z) if c == colour else HIGH - 2 * z)
        # "red square" + EOS: right first word then leaves the answer, or wrong from the start
        want.append(2 * HIGH - 3 * z if colour == "red" else HIGH - 3 * z)
        assert scores.tolist() == pytest.approx(want, abs=1e-4)
        assert cands[int(scores.argmax())] == colour

        # the batch the model saw: the prompt repeated, candidates at next_position(prompt), +1, …
        call = model.forward_calls[-1]
        s0, n = len(prompt), len(cands)
        assert call["tokens"].shape == (n, s0 + 3)  # the longest candidate: 2 pieces + EOS
        assert (call["tokens"][:, :s0] == prompt.tokens).all()
        assert (call["positions"][:, :s0] == prompt.positions).all()
        tail = call["positions"][:, s0:]  # (C, 3, 3)
        want_pos = next_position(prompt) + torch.arange(3)
        assert (tail == want_pos.view(1, 3, 1)).all()
        assert (call["modality"][:, s0:] == TEXT).all()
        assert torch.equal(call["image_patches"], prompt.image_patches.repeat(n, 1))
        for i, c in enumerate(cands):
            ids = tok.encode(c) + [EOS_ID]
            assert call["tokens"][i, s0 : s0 + len(ids)].tolist() == ids

    # greedy ids stop before EOS; the decoded text is the word
    prompt, _ = scorer.prompt(vqa("k", "yellow"))
    assert scorer.generate_ids(prompt) == tok.encode("yellow")
    assert scorer.generate(prompt) == "yellow"
    assert len(scorer.generate_ids(prompt, max_new_tokens=5, eos=False)) == 5  # no stop token: the full budget

    blind = Scorer(BlindModel(tok), il)
    for colour in COLOURS:
        prompt, _ = blind.prompt(vqa("k", colour))
        assert COLOURS[int(blind.candidate_logprobs(prompt, COLOURS).argmax())] == "red"


# --------------------------------------------------------------------------- shuffle_patches


def test_shuffle_patches_keeps_the_multiset_and_changes_the_order(il):
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # 16 distinct patches
    s = vqa("k", "red", img)
    prompt, _ = il.encode_prompt(s.segments, s.media)
    before = prompt.image_patches.clone()
    n = before.shape[0]
    assert n == 16
    changed = 0
    for seed in range(10):
        sh = shuffle_patches(prompt, random.Random(seed))
        sh.validate()
        assert sorted(map(tuple, sh.image_patches.tolist())) == sorted(map(tuple, before.tolist()))
        for f in ("tokens", "modality", "positions", "target", "audio_patches"):
            assert torch.equal(getattr(sh, f), getattr(prompt, f)), f
        changed += not torch.equal(sh.image_patches, before)
        assert torch.equal(prompt.image_patches, before)  # the input stream is left alone
    assert changed == 10  # 16! orders: identity would be a fluke
    # seeded: the same seed deals the same order
    assert torch.equal(shuffle_patches(prompt, random.Random(3)).image_patches,
                       shuffle_patches(prompt, random.Random(3)).image_patches)


# --------------------------------------------------------------------------- target NLL


def test_target_nll_matches_hand_cross_entropy(tok, il):
    s = vqa("k", "green")
    stream = il.encode(s.segments, s.media)
    model = TableLM(tok.vocab_size)
    nll, n = Scorer(model, il).target_nll(stream)

    toks, tgt = stream.tokens.tolist(), stream.target.tolist()
    want, count = 0.0, 0
    for i in range(len(toks) - 1):  # slot i predicts slot i + 1
        if tgt[i + 1]:
            row = model.table[i].tolist()
            m = max(row)
            want += m + math.log(sum(math.exp(x - m) for x in row)) - row[toks[i + 1]]
            count += 1
    assert n == count == len(tok.encode("green")) + 1  # the answer and its EOS
    assert nll == pytest.approx(want, rel=1e-6)

    # a uniform model: log V per target token
    nll_u, n_u = Scorer(BlindModel(tok), il).target_nll(il.encode(text_sample("t").segments, {}))
    assert n_u == len(tok.encode("the square is red.")) + 1
    assert nll_u == pytest.approx(n_u * math.log(tok.vocab_size), rel=1e-6)


# --------------------------------------------------------------------------- the whole run and its headline


@pytest.mark.parametrize("model_cls", [MeanReader, BlindModel])
def test_run_headline(model_cls, tok, il, tmp_path, monkeypatch):
    test_split = qa_samples() + [caption("c0", "green"), text_sample("t0")]
    monkeypatch.setattr(suite_mod, "load_samples", lambda world_dir, split, limit=None: list(test_split))
    vocab = {"shapes": ["square", "circle"], "colors": COLOURS}
    results = make_suite(model_cls(tok), il, tmp_path).run(vocab, pope=False, cogent=False)
    h = results["headline"]
    if model_cls is MeanReader:
        assert h["accuracy"] == h["color_accuracy"] == h["accuracy_rank"] == 1.0
        assert h["blind_rank_accuracy"] == h["color_blind_rank_accuracy"] == frac(BLIND_FALLBACK)
        assert h["blind_generated_accuracy"] == frac(BLIND_FALLBACK)
        assert h["accuracy_minus_blind"] == 1.0 - frac(BLIND_FALLBACK)
        assert h["swap_change_rate"] == 1.0
        assert h["shuffled_accuracy"] == 1.0
        assert h["bleu"] == pytest.approx(1.0) and h["chair_i"] == 0.0 and h["caption_recall"] == 1.0
    else:
        assert h["accuracy"] == h["color_accuracy"] == h["accuracy_rank"] == frac("red")
        assert h["blind_rank_accuracy"] == h["color_blind_rank_accuracy"] == h["blind_generated_accuracy"] == frac("red")
        assert h["accuracy_minus_blind"] == 0.0  # the media add nothing to a model that never looks
        assert h["swap_change_rate"] == 0.0
        assert h["chair_i"] == 1.0 and h["caption_recall"] == 0.0  # "a red square." of a green one
    # the text sample sits where no cue is: uniform logits, perplexity = vocabulary size
    assert h["perplexity"] == pytest.approx(tok.vocab_size, rel=1e-5)
    assert results["probes"]["swapped"]["n_pairs"] == N_ELIGIBLE_PAIRS
    assert results["probes"]["blind"]["n"] == results["splits"]["iid"]["n"] == len(QA_COLOURS)
    assert results["captions"]["n"] == results["captions"]["bleu_n"] == 1
    assert results["unscored"] == {"n": 0, "reasons": []}
    assert results["cost"]["visual_slots_per_image"] == 4
    assert results["cost"]["decode_tokens_per_s_cached"] > 0 and results["cost"]["decode_tokens_per_s_uncached"] > 0
    assert [r["id"] for r in results["samples"]] == [f"test/q{i}" for i in range(len(QA_COLOURS))]
    assert headline(results) == h


def test_headline_omits_unmeasured_probes():
    results = {"splits": {"iid": {"accuracy": 0.5, "n": 4, "rank_accuracy": 0.25, "rank_n": 8}},
               "by_qtype": {"color": {"accuracy": 0.5, "n": 4}},
               "probes": {"swapped": {"change_rate": float("nan"), "n_pairs": 0}}}
    h = headline(results)
    assert h == {"accuracy": 0.5, "color_accuracy": 0.5, "accuracy_rank": 0.25}


# --------------------------------------------------------------------------- blind: generated vs ranked


def test_blind_probe_ranked_is_the_prior_when_generation_breaks_format(tok, il, tmp_path, monkeypatch):
    """Free generation without media leaves the answer format (0 right, chance is not 0); ranking the
    candidates reads the language prior ("red": 3 of 8). accuracy − blind uses the ranked one."""
    model = FormatBreaker(tok)
    records = make_suite(model, il, tmp_path).qa(qa_samples(), "test")
    assert [r["prediction"] for r in records] == QA_COLOURS
    assert [r["blind_prediction"] for r in records] == ["square"] * len(QA_COLOURS)
    assert [r["blind_ranked"] for r in records] == ["red"] * len(QA_COLOURS)

    monkeypatch.setattr(suite_mod, "load_samples", lambda world_dir, split, limit=None: qa_samples())
    results = make_suite(model, il, tmp_path).run({"shapes": ["square"], "colors": COLOURS}, pope=False, cogent=False)
    blind = results["probes"]["blind"]
    assert blind == {"rank_accuracy": 3 / 8, "generated_accuracy": 0.0, "accuracy_minus_blind": 1 - 3 / 8,
                     "n": len(QA_COLOURS)}
    assert results["by_qtype"]["color"] == {
        "accuracy": 1.0, "n": 8, "rank_accuracy": 1.0, "rank_n": 8, "blind_generated_accuracy": 0.0,
        "blind_rank_accuracy": 3 / 8, "accuracy_minus_blind": 1 - 3 / 8}
    h = results["headline"]
    assert (h["blind_rank_accuracy"], h["blind_generated_accuracy"], h["accuracy_minus_blind"]) == (3 / 8, 0.0, 5 / 8)


# --------------------------------------------------------------------------- what is read, what is scored


def audio_caption(key: str) -> Sample:
    return Sample(key=key, shard="toy", task="audio_caption",
                  segments=[{"media": "audio", "file": "0.npy"}, {"text": "describe the sound.", "target": False},
                            {"text": "a high tone.", "target": True}],
                  meta={"split": "test", "qtype": "audio_caption", "events": []},
                  media={"0.npy": np.zeros((32, 16), np.float32)})


def test_caption_n_counts_only_what_chair_scored(tok, il, tmp_path):
    """An audio caption gets BLEU but no CHAIR; a caption without a scene graph neither counts in n."""
    no_scene = caption("c2", "blue")
    del no_scene.meta["objects"]
    samples = [caption("c0", "red"), audio_caption("a0"), caption("c1", "green"), no_scene]
    out, records = make_suite(MeanReader(tok), il, tmp_path).captions(samples, {"shapes": ["square"], "colors": COLOURS})
    assert out["n"] == 2 and out["bleu_n"] == 4 and out["n_no_scene"] == 1
    assert (out["n_mentioned"], out["n_objects"], out["chair_i"], out["recall"]) == (2, 2, 0.0, 1.0)
    assert [r["id"] for r in records] == ["test/c0", "test/a0", "test/c1", "test/c2"]
    assert len({r["hash"] for r in records}) == 4


def vqa_tagged(key: str, task: str) -> Sample:
    s = vqa(key, "red")
    s.task = task
    return s


def test_unknown_task_is_an_error_naming_shard_and_key(tok, il, tmp_path, monkeypatch):
    split = [vqa("q0", "red"), vqa_tagged("q1", "VQA"), vqa("q2", "green"), vqa_tagged("q3", "VQA")]
    monkeypatch.setattr(suite_mod, "load_samples", lambda world_dir, split_, limit=None: list(split))
    vocab = {"shapes": ["square"], "colors": COLOURS}
    with pytest.raises(suite_mod.BadSample, match=r"shard 'toy', key 'q1', field 'json.task'.*unknown task 'VQA'"):
        make_suite(MeanReader(tok), il, tmp_path).run(vocab, pope=False, cogent=False)

    suite = WorldSuite(Scorer(MeanReader(tok), il), tmp_path, progress=False, allow_unknown_tasks=True)
    results = suite.run(vocab, pope=False, cogent=False)
    assert results["splits"]["iid"]["n"] == 2
    assert results["unscored"] == {"n": 2, "reasons": [
        {"split": "test", "reason": "unknown task 'VQA'", "n": 2, "examples": ["test/q1", "test/q3"]}]}


def test_known_tasks_outside_their_split_are_counted_not_dropped(tok, il, tmp_path, monkeypatch):
    """A POPE sample in the iid split and a text sample in cogent are read but not scored: counted."""
    pope_sample = vqa_tagged("p0", "pope")
    by_split = {"test": [vqa("q0", "red"), pope_sample], "cogent": [vqa("g0", "blue"), text_sample("t0")]}
    monkeypatch.setattr(suite_mod, "load_samples", lambda world_dir, split, limit=None: list(by_split[split]))
    monkeypatch.setattr(suite_mod, "has_split", lambda world_dir, split: split in by_split)
    results = make_suite(MeanReader(tok), il, tmp_path).run({"shapes": ["square"], "colors": COLOURS}, pope=False)
    assert results["unscored"]["n"] == 2
    assert [(r["split"], r["reason"]) for r in results["unscored"]["reasons"]] == [
        ("test", "task 'pope' is not scored in the 'test' split"), ("cogent", "task 'text' is not scored in the 'cogent' split")]


def test_cogent_captions_scored_and_gap_on_matched_types(tok, il, tmp_path, monkeypatch):
    test_split = qa_samples() + [caption("c0", "red")]
    cogent_split = [vqa("g0", "green"), vqa("g1", "yellow"), caption("gc0", "blue"), caption("gc1", "yellow")]
    by_split = {"test": test_split, "cogent": cogent_split}
    monkeypatch.setattr(suite_mod, "load_samples", lambda world_dir, split, limit=None: list(by_split[split]))
    monkeypatch.setattr(suite_mod, "has_split", lambda world_dir, split: split in by_split)
    results = make_suite(BlindModel(tok), il, tmp_path).run({"shapes": ["square"], "colors": COLOURS}, pope=False)
    # the blind model says "a red square." of the blue and yellow squares: every mention hallucinated
    cg = results["captions_cogent"]
    assert (cg["n"], cg["n_mentioned"], cg["n_hallucinated"], cg["chair_i"], cg["recall"]) == (2, 2, 2, 1.0, 0.0)
    assert results["headline"]["cogent_chair_i"] == 1.0
    comp = results["compositional"]
    assert comp["cogent_accuracy"] == 0.0 and comp["iid_matched_accuracy"] == frac("red") == 3 / 8
    assert comp["gap"] == -3 / 8 and comp["weights"] == {"color": 1.0}


def qa_record(qtype: str, correct: bool) -> dict:
    return {"qtype": qtype, "correct": correct}


def test_compositional_gap_weights_iid_by_cogents_types():
    """iid: color 9/10, shape 5/10, ocr 0/10 (overall 14/30); cogent: color 3/6, shape 0/2, novel 1/2.
    Matched to cogent's types (color 6, shape 2 -> weights 0.75, 0.25):
    iid = 0.75*0.9 + 0.25*0.5 = 0.8, cogent = 3/8 = 0.375, gap = -0.425 (not 0.4 - 14/30)."""
    iid = ([qa_record("color", i < 9) for i in range(10)] + [qa_record("shape", i < 5) for i in range(10)]
           + [qa_record("ocr", False) for _ in range(10)])
    cogent = ([qa_record("color", i < 3) for i in range(6)] + [qa_record("shape", False) for _ in range(2)]
              + [qa_record("novel", i < 1) for i in range(2)])
    out = suite_mod.compositional_gap(iid, cogent)
    assert out["weights"] == {"color": 0.75, "shape": 0.25}
    assert out["iid_matched_accuracy"] == pytest.approx(0.8)
    assert out["cogent_accuracy"] == pytest.approx(0.375)
    assert out["gap"] == pytest.approx(-0.425)
    assert out["unmatched_qtypes"] == ["novel"] and out["n_iid"] == 20 and out["n_cogent"] == 8


def pope_sample(key: str, answer: str) -> Sample:
    return Sample(key=key, shard="toy", task="pope",
                  segments=[{"media": "image", "file": "0.png"}, {"text": "is there a red square?", "target": False},
                            {"text": answer, "target": True}],
                  meta={"split": "pope-random", "qtype": "pope", "answer": answer, "candidates": ["yes", "no"]},
                  media={"0.png": solid("red")})


def test_pope_record_correctness_is_the_reference_reading(tok, il, tmp_path, monkeypatch):
    """The toy has no cue for this question: it answers with whatever its uniform logits give, which
    holds no "no"/"not", so the POPE reference reads yes. Each record's correct is that reading
    against the label, and their mean is the split's accuracy (what the bootstrap resamples)."""
    samples = [pope_sample(f"p{i}", a) for i, a in enumerate(["yes", "no", "no", "yes", "no"])]
    monkeypatch.setattr(suite_mod, "load_samples", lambda world_dir, split, limit=None: list(samples))
    metrics, records = make_suite(MeanReader(tok), il, tmp_path).pope("pope-random")
    assert all(suite_mod.pope_reads_yes(r["prediction"])[0] for r in records)
    assert [r["correct"] for r in records] == [True, False, False, True, False]
    assert metrics["accuracy"] == pytest.approx(mean(r["correct"] for r in records)) == 0.4
    assert metrics["yes_ratio"] == 1.0
