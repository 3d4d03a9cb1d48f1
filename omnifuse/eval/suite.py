"""The world benchmark suite (DESIGN §6): QA by type, captions, POPE, grounding probes,
compositional split, text perplexity and cost, for any model with the shared interface
(``forward(tokens, modality, positions, image_patches, audio_patches)`` → logits, and a KV-cached
``generate``).

Answers are read two ways: free greedy generation (the headline) and likelihood ranking of the
question type's candidate answers (``rank`` metrics). Both use the same prompt: the sample's
segments before its first target segment. Generation is batched: the prompts a benchmark asks
(answers, blind and shuffled probes, swapped pairs, captions, POPE) are built a few batches at a
time (``CHUNK_BATCHES``) and decoded ``batch_size`` at a time, sorted by length and right-padded
(:func:`prompt_batch`), each row as if alone (``FusionArm.generate``).

What is read (:func:`load_samples`): the folder name is the split. Every sample's ``meta`` is
checked as it is read (:func:`check_meta`: ``qtype``; ``split``, equal to the folder's when
present; ``answer`` among ``candidates`` for questions), and a sample whose ``task`` the suite does
not know is an error naming its shard and key unless ``allow_unknown_tasks``. Every sample read and
not scored is counted with its reason (``results["unscored"]``): nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from omnifuse.data.datamodule import shards_of
from omnifuse.data.samples import BadSample, Sample
from omnifuse.data.stream import BadSamplePolicy, iter_samples
from omnifuse.eval.metrics import (
    accuracy_by_type, answer_change_rate, bleu, chair, exact_match, perplexity, pope_metrics, pope_reads_yes,
)
from omnifuse.tokenizers.interleave import next_position
from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT, Stream
from omnifuse.tokenizers.text import EOS_ID, PAD_ID, SPECIAL_IDS, UNK_ID

QA_TASKS = ("vqa", "audio_qa", "crossmodal", "multi_image")
CAPTION_TASKS = ("caption", "audio_caption")
POPE_TASK = "pope"
KNOWN_TASKS = (*QA_TASKS, *CAPTION_TASKS, "text", POPE_TASK)
QUESTION_TASKS = (*QA_TASKS, POPE_TASK)  # samples whose meta carries answer + candidates
COGENT_SPLIT = "cogent"
POPE_SPLITS = ("pope-random", "pope-popular", "pope-adversarial")
UNSCORED_EXAMPLES = 5  # sample ids kept per unscored reason
CHUNK_BATCHES = 4  # the suite builds and generates the prompts of this many batches' worth of samples at a time


def has_split(world_dir: Path, split: str) -> bool:
    return any(Path(world_dir, split).glob("*.tar"))


def check_meta(sample: Sample, split: str) -> None:
    """Raise :class:`BadSample` (shard, key, field) unless ``sample.meta`` has what the suite reads.

    Always ``qtype``; ``split`` too, except in community-layout samples (``meta.source ==
    "community"``, which have no split), and when present it must equal the folder's ``split``;
    for a question (:data:`QUESTION_TASKS`) a string ``answer`` and a list ``candidates`` holding it
    (after answer normalisation); for POPE an answer of yes or no.
    """
    meta = sample.meta

    def bad(field: str, reason: str) -> BadSample:
        return BadSample(sample.shard, sample.key, f"json.meta.{field}", reason, "meta")

    if not isinstance(meta, dict):
        raise BadSample(sample.shard, sample.key, "json.meta", "must be an object", "meta")
    if not isinstance(meta.get("qtype"), str):
        raise bad("qtype", "missing (every sample names its question type, or its task for captions/text)")
    if "split" not in meta and meta.get("source") != "community":
        raise bad("split", "missing")
    if "split" in meta and meta["split"] != split:
        raise bad("split", f"says {meta['split']!r} but the sample is in the {split!r} folder (the folder is the split)")
    if sample.task in QUESTION_TASKS:
        answer, candidates = meta.get("answer"), meta.get("candidates")
        if not isinstance(answer, str):
            raise bad("answer", f"a {sample.task} question needs its answer (a string), got {answer!r}")
        if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
            raise bad("candidates", f"a {sample.task} question needs a non-empty list of candidate answers, got {candidates!r}")
        if not any(exact_match(c, answer) for c in candidates):
            raise bad("candidates", f"the answer {answer!r} is not among the candidates {candidates}")
        if sample.task == POPE_TASK and answer not in ("yes", "no"):
            raise bad("answer", f"a POPE answer is 'yes' or 'no', got {answer!r}")


def load_samples(world_dir: Path, split: str, limit: int | None = None) -> list[Sample]:
    """The first ``limit`` samples of ``world_dir/split/*.tar``, each checked by :func:`check_meta`."""
    samples = []
    for s in iter_samples(shards_of(world_dir, split), BadSamplePolicy("error")):
        check_meta(s, split)
        samples.append(s)
        if limit is not None and len(samples) >= limit:
            break
    return samples


def sample_hash(sample: Sample) -> str:
    """Content fingerprint of a sample (task, segments, meta and media bytes): two runs' records
    with one id are paired by the bootstrap only if their hashes agree (the same sample)."""
    h = hashlib.sha256(json.dumps([sample.task, sample.segments, sample.meta], sort_keys=True, default=str).encode())
    for name in sorted(sample.media):
        h.update(name.encode())
        h.update(np.ascontiguousarray(sample.media[name]).tobytes())
    return h.hexdigest()[:16]


def caption_lexicon(vocab: dict) -> tuple[list[str], list[str]]:
    """(object names, colours) that CHAIR reads captions with: the world's shapes plus its digit
    object (``vocabulary.digit_shape``), so that every object a scene graph can hold is also a
    word CHAIR can recognise (else recall's denominator counts objects no caption can mention)."""
    shapes = list(vocab["shapes"])
    if vocab.get("digit_shape") and vocab["digit_shape"] not in shapes:
        shapes.append(vocab["digit_shape"])
    return shapes, list(vocab["colors"])


def as_batch(stream: Stream) -> dict[str, torch.Tensor]:
    """A one-row batch (B=1) of one stream."""
    return {
        "tokens": stream.tokens[None],
        "modality": stream.modality[None],
        "positions": stream.positions[None],
        "image_patches": stream.image_patches,
        "audio_patches": stream.audio_patches,
    }


def prompt_batch(prompts: Sequence[Stream]) -> dict[str, torch.Tensor]:
    """Prompts of any lengths as one right-padded batch, in ``FusionArm.generate``'s form:
    ``tokens, modality (B, L)``, ``positions (B, L, 3)``, ``image_patches``, ``audio_patches`` (every
    row's, in row-major slot order) and ``lengths (B,)``. Padding slots hold the pad id, TEXT and
    position 0; no patch belongs to them."""
    b, width = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((b, width), PAD_ID, dtype=torch.long)
    modality = torch.full((b, width), TEXT, dtype=torch.long)
    positions = torch.zeros(b, width, 3, dtype=torch.long)
    for i, p in enumerate(prompts):
        n = len(p)
        tokens[i, :n], modality[i, :n], positions[i, :n] = p.tokens, p.modality, p.positions
    return {
        "tokens": tokens,
        "modality": modality,
        "positions": positions,
        "image_patches": torch.cat([p.image_patches for p in prompts]),
        "audio_patches": torch.cat([p.audio_patches for p in prompts]),
        "lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
    }


def without_media(segments: Sequence[dict]) -> list[dict]:
    return [s for s in segments if "media" not in s]


class Scorer:
    """Greedy answers, candidate ranking and target NLL for one model + interleaver.

    ``batch_size``: prompts decoded together by :meth:`generate_ids_many` (1: one at a time).
    """

    def __init__(self, model: torch.nn.Module, interleaver, max_new_tokens: int = 24, use_cache: bool = True,
                 batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.il, self.max_new_tokens, self.use_cache = model, interleaver, max_new_tokens, use_cache
        self.batch_size = batch_size
        self.tokenizer = interleaver.text

    def prompt(self, sample: Sample, segments: Sequence[dict] | None = None) -> tuple[Stream, list[int]]:
        return self.il.encode_prompt(segments if segments is not None else sample.segments, sample.media)

    @torch.no_grad()
    def generate_ids_many(self, prompts: Sequence[Stream], max_new_tokens: int | None = None, eos: bool = True,
                          use_cache: bool | None = None) -> list[list[int]]:
        """Greedy ids of every prompt (cut before EOS when ``eos``), in the prompts' order.

        Prompts are sorted by length and decoded ``batch_size`` at a time (little padding per
        batch); a row's ids are those its prompt gets alone.
        """
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: ties keep their order
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        out: list[list[int]] = [[] for _ in prompts]
        for rows in batches:
            b = prompt_batch([prompts[i] for i in rows])
            ids = self.model.generate(
                b["tokens"], b["modality"], b["positions"], b["image_patches"], b["audio_patches"],
                max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                eos_id=EOS_ID if eos else None,
                use_cache=self.use_cache if use_cache is None else use_cache,
                lengths=b["lengths"],
            ).tolist()
            for i, row in zip(rows, ids):
                out[i] = row[: row.index(EOS_ID)] if eos and EOS_ID in row else row
        return out

    def generate_ids(self, prompt: Stream, max_new_tokens: int | None = None, eos: bool = True,
                     use_cache: bool | None = None) -> list[int]:
        return self.generate_ids_many([prompt], max_new_tokens, eos, use_cache)[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of generated ids without the special ones. The model's output layer may be wider than
        the tokenizer (``data.vocab_size`` is an upper bound on the pieces SentencePiece learns): an
        id with no piece reads as ``<unk>`` (" ⁇ "), so such an answer never matches a reference."""
        n = self.tokenizer.vocab_size
        return self.tokenizer.decode([UNK_ID if i >= n else i for i in ids if i not in SPECIAL_IDS]).strip()

    def generate(self, prompt: Stream) -> str:
        return self.decode(self.generate_ids(prompt))

    def generate_many(self, prompts: Sequence[Stream]) -> list[str]:
        """:meth:`generate` of every prompt, batched (:meth:`generate_ids_many`)."""
        return [self.decode(ids) for ids in self.generate_ids_many(prompts)]

    @torch.no_grad()
    def candidate_logprobs(self, prompt: Stream, candidates: Sequence[str]) -> torch.Tensor:
        """(C,) total log-probability of each candidate answer (its tokens, then EOS) after the prompt."""
        ids = [self.tokenizer.encode(c) + [EOS_ID] for c in candidates]
        n, s0 = len(ids), len(prompt)
        width = s0 + max(len(c) for c in ids)
        start = next_position(prompt)
        tokens = torch.zeros(n, width, dtype=torch.long)
        modality = torch.full((n, width), TEXT, dtype=torch.long)
        positions = torch.zeros(n, width, 3, dtype=torch.long)
        tokens[:, :s0], modality[:, :s0], positions[:, :s0] = prompt.tokens, prompt.modality, prompt.positions
        for i, c in enumerate(ids):
            tokens[i, s0 : s0 + len(c)] = torch.tensor(c)
        positions[:, s0:] = (start + torch.arange(width - s0)).view(1, -1, 1)  # (1, W-s0, 1) text positions
        logits = self.model(
            tokens, modality, positions, prompt.image_patches.repeat(n, 1), prompt.audio_patches.repeat(n, 1)
        )  # (C, W, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        scores = torch.zeros(n)
        for i, c in enumerate(ids):
            idx = torch.arange(s0 - 1, s0 - 1 + len(c))
            scores[i] = logp[i, idx, torch.tensor(c)].sum()
        return scores

    @torch.no_grad()
    def target_nll(self, stream: Stream) -> tuple[float, int]:
        """Summed NLL of the stream's target slots, and their count (teacher forcing)."""
        logits = self.model(**as_batch(stream))[0]  # (S, V)
        tgt = stream.target[1:]
        nll = F.cross_entropy(logits[:-1][tgt].float(), stream.tokens[1:][tgt], reduction="sum")
        return float(nll), int(tgt.sum())


def shuffle_patches(stream: Stream, rng: random.Random) -> Stream:
    """The same image patches, dealt to the image slots in a random order."""
    perm = list(range(stream.image_patches.shape[0]))
    rng.shuffle(perm)
    return Stream(stream.tokens, stream.modality, stream.positions, stream.target,
                  stream.image_patches[perm], stream.audio_patches)


def question_text(sample: Sample) -> str:
    return " ".join(s["text"] for s in sample.segments if "text" in s and not s.get("target"))


class WorldSuite:
    """Runs every benchmark of the world suite and returns the results dict of
    :mod:`omnifuse.eval.report`.

    ``allow_unknown_tasks``: a sample whose task is not in :data:`KNOWN_TASKS` is counted in
    ``results["unscored"]`` instead of stopping the run with an error naming it.
    """

    def __init__(self, scorer: Scorer, world_dir: Path, split: str = "test", limit: int | None = None,
                 seed: int = 0, progress: bool = True, allow_unknown_tasks: bool = False):
        self.scorer, self.world_dir, self.split, self.limit = scorer, Path(world_dir), split, limit
        self.seed, self.progress, self.allow_unknown_tasks = seed, progress, allow_unknown_tasks
        self.unscored: dict[tuple[str, str], list[str]] = defaultdict(list)  # (split, reason) -> sample ids

    def _bar(self, items, desc):
        return tqdm(items, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    # -- what gets scored ---------------------------------------------------------------------
    def route(self, samples: list[Sample], split: str, scored: Sequence[str]) -> list[Sample]:
        """The samples whose task is in ``scored``; every other one is counted as unscored with
        its reason, and an unknown task is an error unless ``allow_unknown_tasks``."""
        kept = []
        for s in samples:
            if s.task in scored:
                kept.append(s)
                continue
            if s.task not in KNOWN_TASKS:
                if not self.allow_unknown_tasks:
                    raise BadSample(s.shard, s.key, "json.task",
                                    f"unknown task {s.task!r} (the world suite scores {', '.join(KNOWN_TASKS)}); "
                                    "pass --allow-unknown-tasks to count such samples as unscored instead", "json")
                reason = f"unknown task {s.task!r}"
            else:
                reason = f"task {s.task!r} is not scored in the {split!r} split"
            self.unscored[(split, reason)].append(f"{split}/{s.key}")
        return kept

    def unscored_summary(self) -> dict:
        """``{"n": total, "reasons": [{"split", "reason", "n", "examples": [ids]}]}``."""
        reasons = [{"split": sp, "reason": r, "n": len(ids), "examples": ids[:UNSCORED_EXAMPLES]}
                   for (sp, r), ids in self.unscored.items()]
        return {"n": sum(r["n"] for r in reasons), "reasons": reasons}

    # -- question answering ----------------------------------------------------------------
    def _chunk(self) -> int:
        """Samples whose prompts are built and generated together: a few batches' worth, so that
        the batches are full and sorted by length while no more than that many prompts (and their
        media) are held at once."""
        return CHUNK_BATCHES * self.scorer.batch_size

    def _generate_each(self, n: int, prompt: Callable[[int], Stream], desc: str) -> list[str]:
        """The generated text of ``prompt(i)`` for ``i < n``, built and decoded chunk by chunk."""
        out: list[str] = []
        for start in self._bar(range(0, n, self._chunk()), desc):
            out += self.scorer.generate_many([prompt(i) for i in range(start, min(n, start + self._chunk()))])
        return out

    def qa(self, samples: list[Sample], split: str) -> list[dict]:
        """One record per QA sample: generated and ranked answers, correctness, and the probes.

        On the iid split, the blind probe asks again with the media removed, twice: free
        generation (``blind_prediction``; a model that never saw a question without its media may
        fall out of the answer format, which measures format breakdown) and likelihood ranking of
        the candidates (``blind_ranked``: the language prior, the fair baseline). A chunk's prompts
        (answers and probes; the shuffled probe draws its permutations in sample order) are
        generated in one batched pass.
        """
        rng = random.Random(self.seed)
        qa = [s for s in samples if s.task in QA_TASKS]
        records = []
        for start in self._bar(range(0, len(qa), self._chunk()), f"QA {split}"):
            records += self._qa_chunk(qa[start : start + self._chunk()], split, rng)
        return records

    def _qa_chunk(self, qa: list[Sample], split: str, rng: random.Random) -> list[dict]:
        probes = split == self.split  # grounding probes on the iid split only
        prompts = [self.scorer.prompt(s)[0] for s in qa]
        blind = [self.scorer.prompt(s, without_media(s.segments))[0] for s in qa] if probes else []
        shuffled = {i: shuffle_patches(p, rng) for i, p in enumerate(prompts)
                    if probes and p.image_patches.shape[0] > 1}
        texts = self.scorer.generate_many([*prompts, *blind, *shuffled.values()])
        preds, blind_preds = texts[: len(qa)], texts[len(qa) : len(qa) + len(blind)]
        shuffled_preds = dict(zip(shuffled, texts[len(qa) + len(blind) :]))
        records = []
        for i, s in enumerate(qa):
            ref, pred, cands = s.meta["answer"], preds[i], s.meta["candidates"]
            rec = {"id": f"{split}/{s.key}", "hash": sample_hash(s), "split": split, "task": s.task,
                   "qtype": s.meta["qtype"], "question": question_text(s), "reference": ref, "prediction": pred,
                   "correct": exact_match(pred, ref)}
            ranked = cands[int(self.scorer.candidate_logprobs(prompts[i], cands).argmax())]
            rec["ranked"], rec["correct_rank"] = ranked, exact_match(ranked, ref)
            if probes:
                rec["blind_prediction"] = blind_preds[i]
                rec["blind_correct"] = exact_match(rec["blind_prediction"], ref)
                rec["blind_ranked"] = cands[int(self.scorer.candidate_logprobs(blind[i], cands).argmax())]
                rec["blind_correct_rank"] = exact_match(rec["blind_ranked"], ref)
                if i in shuffled_preds:
                    rec["shuffled_prediction"] = shuffled_preds[i]
                    rec["shuffled_correct"] = exact_match(rec["shuffled_prediction"], ref)
            records.append(rec)
        return records

    def swapped(self, samples: list[Sample], records: list[dict]) -> dict:
        """Same question on a different scene whose answer differs: does the answer follow the media?"""
        by_id = {r["id"]: r for r in records}
        groups = defaultdict(list)
        for s in samples:
            if s.task in QA_TASKS and f"{self.split}/{s.key}" in by_id:
                groups[(s.meta["qtype"], question_text(s))].append(s)
        orig, pairs, ref_o, ref_s = [], [], [], []  # pairs: (a's segments over b's media, b's media)
        for group in groups.values():
            for a, b in zip(group, group[1:]):
                if exact_match(a.meta["answer"], b.meta["answer"]):
                    continue
                media_b = [seg for seg in b.segments if "media" in seg]
                media_a = [seg for seg in a.segments if "media" in seg]
                if [m["media"] for m in media_a] != [m["media"] for m in media_b]:
                    continue
                it = iter(media_b)
                pairs.append(([next(it) if "media" in seg else seg for seg in a.segments], b.media))
                orig.append(by_id[f"{self.split}/{a.key}"]["prediction"])
                ref_o.append(a.meta["answer"])
                ref_s.append(b.meta["answer"])
        swapped = self._generate_each(len(pairs), lambda i: self.scorer.il.encode_prompt(*pairs[i])[0], "swapped")
        return answer_change_rate(orig, swapped, ref_o, ref_s)

    # -- captions, POPE, text ---------------------------------------------------------------
    def captions(self, samples: list[Sample], vocab: dict, split: str | None = None) -> tuple[dict, list[dict]]:
        """Caption scores of one split: CHAIR on the image captions whose scene graph is known
        (``meta.objects``), BLEU on every caption (image and audio).

        Returns ``chair(...)`` (its ``n`` counts the captions CHAIR scored, nothing else) merged
        with ``bleu`` and ``bleu_n`` (captions BLEU scored) and ``n_no_scene`` (image captions
        without ``meta.objects``: BLEU only); and one record per caption.
        """
        split = split or self.split
        preds, refs, records = [], [], []
        img_preds, img_scenes, no_scene = [], [], 0
        caps = [s for s in samples if s.task in CAPTION_TASKS]
        texts = self._generate_each(len(caps), lambda i: self.scorer.prompt(caps[i])[0], f"captions {split}")
        for s, pred in zip(caps, texts):
            ref = next(seg["text"] for seg in s.segments if seg.get("target"))
            preds.append(pred)
            refs.append(ref)
            if s.task == "caption":
                if "objects" in s.meta:
                    img_preds.append(pred)
                    img_scenes.append(s.meta["objects"])
                else:
                    no_scene += 1
            records.append({"id": f"{split}/{s.key}", "hash": sample_hash(s), "split": split, "task": s.task,
                            "qtype": s.task, "reference": ref, "prediction": pred, "correct": exact_match(pred, ref)})
        if not preds:
            return {}, records
        out = chair(img_preds, img_scenes, *caption_lexicon(vocab)) if img_preds else {"n": 0}
        out.update(bleu=bleu(preds, refs), bleu_n=len(preds), n_no_scene=no_scene)
        return out, records

    def pope(self, split: str) -> tuple[dict, list[dict]]:
        """POPE metrics of one split; each record's ``correct`` is the POPE reference reading of
        the answer (:func:`pope_reads_yes`) against the label, so its mean is the split's accuracy."""
        labels, records = [], []
        samples = self.route(load_samples(self.world_dir, split, self.limit), split, (POPE_TASK,))
        preds = self._generate_each(len(samples), lambda i: self.scorer.prompt(samples[i])[0], split)
        for s, pred in zip(samples, preds):
            labels.append(s.meta["answer"])
            read_yes, _ = pope_reads_yes(pred)
            records.append({"id": f"{split}/{s.key}", "hash": sample_hash(s), "split": split, "qtype": "pope",
                            "reference": s.meta["answer"], "prediction": pred,
                            "correct": read_yes == (s.meta["answer"] == "yes")})
        return pope_metrics(preds, labels), records

    def text(self, samples: list[Sample]) -> dict:
        nll, n, docs = 0.0, 0, 0
        for s in samples:
            if s.task != "text":
                continue
            a, b = self.scorer.target_nll(self.scorer.il.encode(s.segments, s.media))
            nll, n, docs = nll + a, n + b, docs + 1
        return {"perplexity": perplexity(nll, n), "nll": nll / n, "n_tokens": n, "n_samples": docs} if n else {}

    def audio_slots(self, samples: list[Sample]) -> dict:
        clip = next((s for s in samples if s.task == "audio_qa"), None)
        if clip is None:
            return {}
        prompt, _ = self.scorer.prompt(clip)
        return {"audio_slots_per_clip": sum(1 for m in prompt.modality.tolist() if m == AUDIO)}

    # -- cost -------------------------------------------------------------------------------
    def decode_speed(self, prompt: Stream, new_tokens: int = 32, repeats: int = 3) -> dict:
        """Decode tokens/s of one prompt with the KV cache (best of ``repeats``) and without it (one
        run: a full forward per token, media encoders included, is the slow reference and would
        otherwise dominate a small evaluation)."""
        out = {}
        for name, cache, n in (("cached", True, repeats), ("uncached", False, 1)):
            best = float("inf")
            for _ in range(n):
                t0 = time.perf_counter()
                ids = self.scorer.generate_ids(prompt, max_new_tokens=new_tokens, eos=False, use_cache=cache)
                best = min(best, time.perf_counter() - t0)
            out[f"decode_tokens_per_s_{name}"] = len(ids) / best
        return out

    # -- everything ---------------------------------------------------------------------------
    def run(self, vocab: dict, pope: bool = True, cogent: bool = True) -> dict:
        t0 = time.perf_counter()
        self.unscored.clear()
        test = self.route(load_samples(self.world_dir, self.split, self.limit), self.split,
                          (*QA_TASKS, *CAPTION_TASKS, "text"))
        records = self.qa(test, self.split)
        results: dict = {"iid_split": self.split}
        results["by_qtype"], results["probes"], results["splits"] = qa_tables(records)
        results["probes"]["swapped"] = self.swapped(test, records)
        all_records = list(records)
        results["captions"], caption_records = self.captions(test, vocab)
        if cogent and has_split(self.world_dir, COGENT_SPLIT):
            cg = self.route(load_samples(self.world_dir, COGENT_SPLIT, self.limit), COGENT_SPLIT,
                            (*QA_TASKS, *CAPTION_TASKS))
            cg_records = self.qa(cg, COGENT_SPLIT)
            c = accuracy_by_type(cg_records)
            results["splits"][COGENT_SPLIT] = {"accuracy": c["overall"]["accuracy"], "n": c["overall"]["n"]}
            results["compositional"] = compositional_gap(records, cg_records)
            all_records += cg_records
            results["captions_cogent"], cg_captions = self.captions(cg, vocab, COGENT_SPLIT)
            caption_records += cg_captions
        results["caption_samples"] = caption_records
        if pope:
            results["pope"] = {}
            for split in (p for p in POPE_SPLITS if has_split(self.world_dir, p)):
                results["pope"][split.split("-", 1)[1]], pope_records = self.pope(split)
                all_records += pope_records
        results["text"] = self.text(test)
        elapsed = time.perf_counter() - t0
        first_qa = next((s for s in test if s.task == "vqa"), test[0])
        prompt, _ = self.scorer.prompt(first_qa)
        # every sample evaluated once, whatever its probes cost (they are part of its evaluation)
        n_samples = len(all_records) + len(caption_records) + results["text"].get("n_samples", 0)
        results["cost"] = {
            "eval_samples": n_samples,
            "eval_seconds": elapsed,
            "eval_samples_per_s": n_samples / elapsed,
            "visual_slots_per_image": sum(1 for m in prompt.modality.tolist() if m == IMAGE),
            **self.audio_slots(test),
            **self.decode_speed(prompt),
        }
        results["unscored"] = self.unscored_summary()
        results["samples"] = all_records
        results["headline"] = headline(results)
        return results


def qa_tables(records: list[dict]) -> tuple[dict, dict, dict]:
    """``(by_qtype, probes, splits)`` of the iid QA records (see :meth:`WorldSuite.qa`).

    ``by_qtype[q]``: ``accuracy`` and ``n`` (generated), ``rank_accuracy`` (candidates ranked),
    ``blind_generated_accuracy`` and ``blind_rank_accuracy`` (media removed), and
    ``accuracy_minus_blind`` = accuracy − blind_rank_accuracy: what the media add over the
    language prior. ``probes["blind"]`` holds the same three overall; ``probes["shuffled"]`` the
    shuffled-patch accuracy beside the unshuffled one on the same samples.
    """
    acc = accuracy_by_type(records)
    by_qtype = {q: {"accuracy": v["accuracy"], "n": v["n"]} for q, v in acc["by_type"].items()}
    splits = {"iid": {"accuracy": acc["overall"]["accuracy"], "n": acc["overall"]["n"]}}

    def scored(field: str) -> dict:
        return accuracy_by_type([{**r, "correct": r[field]} for r in records if field in r])

    rank = scored("correct_rank")
    for q, v in rank["by_type"].items():
        by_qtype[q].update(rank_accuracy=v["accuracy"], rank_n=v["n"])
    if rank["overall"]["n"]:
        splits["iid"].update(rank_accuracy=rank["overall"]["accuracy"], rank_n=rank["overall"]["n"])
    probes: dict = {}
    blind_gen, blind_rank = scored("blind_correct"), scored("blind_correct_rank")
    if blind_rank["overall"]["n"]:
        on_blind = accuracy_by_type([r for r in records if "blind_correct_rank" in r])
        for q, v in blind_rank["by_type"].items():
            by_qtype[q].update(blind_generated_accuracy=blind_gen["by_type"][q]["accuracy"],
                               blind_rank_accuracy=v["accuracy"],
                               accuracy_minus_blind=on_blind["by_type"][q]["accuracy"] - v["accuracy"])
        probes["blind"] = {"rank_accuracy": blind_rank["overall"]["accuracy"],
                           "generated_accuracy": blind_gen["overall"]["accuracy"],
                           "accuracy_minus_blind": on_blind["overall"]["accuracy"] - blind_rank["overall"]["accuracy"],
                           "n": blind_rank["overall"]["n"]}
    shuffled = [r for r in records if "shuffled_correct" in r]
    if shuffled:
        sh = scored("shuffled_correct")
        probes["shuffled"] = {"accuracy": sh["overall"]["accuracy"], "n": sh["overall"]["n"],
                              "accuracy_unshuffled": accuracy_by_type(shuffled)["overall"]["accuracy"]}
    return by_qtype, probes, splits


def compositional_gap(iid: list[dict], cogent: list[dict]) -> dict:
    """cogent accuracy against iid accuracy *on the same task mix*.

    cogent holds only some question types, iid all of them; comparing overall accuracies would
    compare task mixes. Over the question types both splits have (``qtypes``), with ``w_q`` the
    share of cogent's matched questions of type ``q``::

        iid_matched = sum_q w_q * accuracy_iid(q)       cogent_matched = sum_q w_q * accuracy_cogent(q)
        gap = cogent_matched - iid_matched

    ``cogent_matched`` equals cogent's overall accuracy unless cogent has types iid lacks
    (listed in ``unmatched_qtypes``, left out of both). Returns those numbers, the weights, and
    ``n_iid`` / ``n_cogent`` (records of the matched types).
    """
    a_iid, a_cog = accuracy_by_type(iid)["by_type"], accuracy_by_type(cogent)["by_type"]
    common = [q for q in a_cog if q in a_iid]
    n_cog = sum(a_cog[q]["n"] for q in common)
    nan = float("nan")
    weights = {q: a_cog[q]["n"] / n_cog for q in common} if n_cog else {}
    iid_matched = sum(w * a_iid[q]["accuracy"] for q, w in weights.items()) if weights else nan
    cog_matched = sum(w * a_cog[q]["accuracy"] for q, w in weights.items()) if weights else nan
    return {"cogent_accuracy": cog_matched, "iid_matched_accuracy": iid_matched, "gap": cog_matched - iid_matched,
            "weights": weights, "unmatched_qtypes": [q for q in a_cog if q not in a_iid],
            "n_iid": sum(a_iid[q]["n"] for q in common), "n_cogent": n_cog}


def headline(results: dict) -> dict:
    """The few numbers of the ablation table, in display order.

    Every metric the comparison bootstraps per sample (``accuracy``, ``cogent_accuracy``,
    ``pope_<set>_accuracy``) is here, so that each p-value sits beside its metric.
    """
    h = {"accuracy": results["splits"]["iid"]["accuracy"]}
    by = results.get("by_qtype", {})
    for q in ("color", "shape"):
        if q in by:
            h[f"{q}_accuracy"] = by[q]["accuracy"]
    blind = results["probes"].get("blind")
    if blind:
        h["blind_rank_accuracy"] = blind["rank_accuracy"]
        h["accuracy_minus_blind"] = blind["accuracy_minus_blind"]
        for q in ("color", "shape"):
            if "blind_rank_accuracy" in by.get(q, {}):
                h[f"{q}_blind_rank_accuracy"] = by[q]["blind_rank_accuracy"]
        h["blind_generated_accuracy"] = blind["generated_accuracy"]
    if "rank_accuracy" in results["splits"]["iid"]:
        h["accuracy_rank"] = results["splits"]["iid"]["rank_accuracy"]
    if COGENT_SPLIT in results["splits"]:
        h["cogent_accuracy"] = results["splits"][COGENT_SPLIT]["accuracy"]
    if "compositional" in results:
        h["iid_matched_accuracy"] = results["compositional"]["iid_matched_accuracy"]
        h["compositional_gap"] = results["compositional"]["gap"]
    for name, p in (results.get("pope") or {}).items():
        h[f"pope_{name}_accuracy"] = p["accuracy"]
    if "adversarial" in results.get("pope", {}):
        h["pope_adversarial_f1"] = results["pope"]["adversarial"]["f1"]
    cap = results.get("captions", {})
    for k in ("chair_i", "chair_s", "recall", "bleu"):
        if k in cap:
            h["caption_" + k if k == "recall" else k] = cap[k]
    if "chair_i" in results.get("captions_cogent", {}):
        h["cogent_chair_i"] = results["captions_cogent"]["chair_i"]
    if results["probes"].get("swapped", {}).get("n_pairs"):
        h["swap_change_rate"] = results["probes"]["swapped"].get("change_rate")
    if "shuffled" in results["probes"]:
        h["shuffled_accuracy"] = results["probes"]["shuffled"]["accuracy"]
    if results.get("text"):
        h["perplexity"] = results["text"]["perplexity"]
    return h
