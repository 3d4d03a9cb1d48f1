"""The world benchmark suite (DESIGN §6): QA by type, captions, POPE, grounding probes,
compositional split, text perplexity and cost, for any model with the shared interface
(``forward(tokens, modality, positions, image_patches, audio_patches)`` → logits, and a KV-cached
``generate``).

Answers are read two ways: free greedy generation (the headline) and likelihood ranking of the
question type's candidate answers (``rank`` metrics). Both use the same prompt: the sample's
segments before its first target segment.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from omnifuse.data.datamodule import shards_of
from omnifuse.data.samples import Sample
from omnifuse.data.stream import BadSamplePolicy, iter_samples
from omnifuse.eval.metrics import accuracy_by_type, answer_change_rate, bleu, chair, exact_match, perplexity, pope_metrics
from omnifuse.tokenizers.interleave import next_position
from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT, Stream
from omnifuse.tokenizers.text import EOS_ID, SPECIAL_IDS

QA_TASKS = ("vqa", "audio_qa", "crossmodal", "multi_image")
CAPTION_TASKS = ("caption", "audio_caption")
POPE_SPLITS = ("pope-random", "pope-popular", "pope-adversarial")


def has_split(world_dir: Path, split: str) -> bool:
    return any(Path(world_dir, split).glob("*.tar"))


def load_samples(world_dir: Path, split: str, limit: int | None = None) -> list[Sample]:
    samples = []
    for s in iter_samples(shards_of(world_dir, split), BadSamplePolicy("error")):
        samples.append(s)
        if limit is not None and len(samples) >= limit:
            break
    return samples


def as_batch(stream: Stream) -> dict[str, torch.Tensor]:
    """A one-row batch (B=1) of one stream."""
    return {
        "tokens": stream.tokens[None],
        "modality": stream.modality[None],
        "positions": stream.positions[None],
        "image_patches": stream.image_patches,
        "audio_patches": stream.audio_patches,
    }


def without_media(segments: Sequence[dict]) -> list[dict]:
    return [s for s in segments if "media" not in s]


class Scorer:
    """Greedy answers, candidate ranking and target NLL for one model + interleaver."""

    def __init__(self, model: torch.nn.Module, interleaver, max_new_tokens: int = 24, use_cache: bool = True):
        self.model, self.il, self.max_new_tokens, self.use_cache = model, interleaver, max_new_tokens, use_cache
        self.tokenizer = interleaver.text

    def prompt(self, sample: Sample, segments: Sequence[dict] | None = None) -> tuple[Stream, list[int]]:
        return self.il.encode_prompt(segments if segments is not None else sample.segments, sample.media)

    @torch.no_grad()
    def generate_ids(self, prompt: Stream, max_new_tokens: int | None = None, eos: bool = True,
                     use_cache: bool | None = None) -> list[int]:
        b = as_batch(prompt)
        out = self.model.generate(
            b["tokens"], b["modality"], b["positions"], b["image_patches"], b["audio_patches"],
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            eos_id=EOS_ID if eos else None,
            use_cache=self.use_cache if use_cache is None else use_cache,
        )[0].tolist()
        if eos and EOS_ID in out:
            out = out[: out.index(EOS_ID)]
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in SPECIAL_IDS]).strip()

    def generate(self, prompt: Stream) -> str:
        return self.decode(self.generate_ids(prompt))

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
    :mod:`omnifuse.eval.report`."""

    def __init__(self, scorer: Scorer, world_dir: Path, split: str = "test", limit: int | None = None,
                 seed: int = 0, progress: bool = True):
        self.scorer, self.world_dir, self.split, self.limit = scorer, Path(world_dir), split, limit
        self.seed, self.progress = seed, progress

    def _bar(self, items, desc):
        return tqdm(items, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    # -- question answering ----------------------------------------------------------------
    def qa(self, samples: list[Sample], split: str) -> list[dict]:
        """One record per QA sample: generated and ranked answers, correctness, and the probes."""
        rng = random.Random(self.seed)
        records = []
        for s in self._bar(samples, f"QA {split}"):
            if s.task not in QA_TASKS:
                continue
            prompt, _ = self.scorer.prompt(s)
            ref = s.meta["answer"]
            pred = self.scorer.generate(prompt)
            rec = {"id": f"{split}/{s.key}", "split": split, "task": s.task, "qtype": s.meta["qtype"],
                   "question": question_text(s), "reference": ref, "prediction": pred,
                   "correct": exact_match(pred, ref)}
            cands = s.meta.get("candidates")
            if cands:
                ranked = cands[int(self.scorer.candidate_logprobs(prompt, cands).argmax())]
                rec["ranked"], rec["correct_rank"] = ranked, exact_match(ranked, ref)
            if split == self.split:  # grounding probes on the iid split only
                blind, _ = self.scorer.prompt(s, without_media(s.segments))
                rec["blind_prediction"] = self.scorer.generate(blind)
                rec["blind_correct"] = exact_match(rec["blind_prediction"], ref)
                if prompt.image_patches.shape[0] > 1:
                    rec["shuffled_prediction"] = self.scorer.generate(shuffle_patches(prompt, rng))
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
        orig, swapped, ref_o, ref_s = [], [], [], []
        for group in groups.values():
            for a, b in zip(group, group[1:]):
                if exact_match(a.meta["answer"], b.meta["answer"]):
                    continue
                media_b = [seg for seg in b.segments if "media" in seg]
                media_a = [seg for seg in a.segments if "media" in seg]
                if [m["media"] for m in media_a] != [m["media"] for m in media_b]:
                    continue
                it = iter(media_b)
                segs = [next(it) if "media" in seg else seg for seg in a.segments]
                prompt, _ = self.scorer.il.encode_prompt(segs, b.media)
                orig.append(by_id[f"{self.split}/{a.key}"]["prediction"])
                swapped.append(self.scorer.generate(prompt))
                ref_o.append(a.meta["answer"])
                ref_s.append(b.meta["answer"])
        return answer_change_rate(orig, swapped, ref_o, ref_s)

    # -- captions, POPE, text ---------------------------------------------------------------
    def captions(self, samples: list[Sample], vocab: dict) -> tuple[dict, list[dict]]:
        preds, refs, scenes, records = [], [], [], []
        img_preds, img_scenes = [], []
        for s in self._bar(samples, "captions"):
            if s.task not in CAPTION_TASKS:
                continue
            prompt, _ = self.scorer.prompt(s)
            pred = self.scorer.generate(prompt)
            ref = next(seg["text"] for seg in s.segments if seg.get("target"))
            preds.append(pred)
            refs.append(ref)
            if s.task == "caption":
                img_preds.append(pred)
                img_scenes.append(s.meta.get("objects", []))
            records.append({"id": f"{self.split}/{s.key}", "task": s.task, "qtype": s.task, "reference": ref,
                            "prediction": pred, "correct": exact_match(pred, ref)})
        if not preds:
            return {}, records
        out = chair(img_preds, img_scenes, vocab["shapes"], vocab["colors"]) if img_preds else {}
        out["bleu"] = bleu(preds, refs)
        out["n"] = len(preds)
        return out, records

    def pope(self, split: str) -> tuple[dict, list[dict]]:
        preds, labels, records = [], [], []
        for s in self._bar(load_samples(self.world_dir, split, self.limit), split):
            prompt, _ = self.scorer.prompt(s)
            pred = self.scorer.generate(prompt)
            preds.append(pred)
            labels.append(s.meta["answer"])
            records.append({"id": f"{split}/{s.key}", "split": split, "qtype": "pope", "reference": s.meta["answer"],
                            "prediction": pred, "correct": exact_match(pred, s.meta["answer"])})
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
        """Decode tokens/s with and without the KV cache on one prompt (best of ``repeats``)."""
        out = {}
        for name, cache in (("cached", True), ("uncached", False)):
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                ids = self.scorer.generate_ids(prompt, max_new_tokens=new_tokens, eos=False, use_cache=cache)
                best = min(best, time.perf_counter() - t0)
            out[f"decode_tokens_per_s_{name}"] = len(ids) / best
        return out

    # -- everything ---------------------------------------------------------------------------
    def run(self, vocab: dict, pope: bool = True, cogent: bool = True) -> dict:
        t0 = time.perf_counter()
        test = load_samples(self.world_dir, self.split, self.limit)
        records = self.qa(test, self.split)
        acc = accuracy_by_type(records)
        by_qtype = {q: {"accuracy": v["accuracy"], "n": v["n"]} for q, v in acc["by_type"].items()}
        ranked = [{**r, "correct": r["correct_rank"]} for r in records if "correct_rank" in r]
        rank = accuracy_by_type(ranked)
        for q, v in rank["by_type"].items():
            by_qtype[q].update(rank_accuracy=v["accuracy"], rank_n=v["n"])
        probes = {}
        blind = [r for r in records if "blind_correct" in r]
        if blind:
            b = accuracy_by_type([{**r, "correct": r["blind_correct"]} for r in blind])
            probes["blind"] = {"accuracy": b["overall"]["accuracy"], "n": b["overall"]["n"]}
            for q, v in b["by_type"].items():
                by_qtype[q]["blind_accuracy"] = v["accuracy"]
        shuffled = [r for r in records if "shuffled_correct" in r]
        if shuffled:
            sh = accuracy_by_type([{**r, "correct": r["shuffled_correct"]} for r in shuffled])
            same = accuracy_by_type(shuffled)
            probes["shuffled"] = {"accuracy": sh["overall"]["accuracy"], "n": sh["overall"]["n"],
                                  "accuracy_unshuffled": same["overall"]["accuracy"]}
        probes["swapped"] = self.swapped(test, records)
        results: dict = {"by_qtype": by_qtype, "probes": probes}
        results["splits"] = {"iid": {"accuracy": acc["overall"]["accuracy"], "n": acc["overall"]["n"]}}
        if ranked:
            results["splits"]["iid"].update(rank_accuracy=rank["overall"]["accuracy"], rank_n=rank["overall"]["n"])
        all_records = list(records)
        if cogent and has_split(self.world_dir, "cogent"):
            cg = self.qa(load_samples(self.world_dir, "cogent", self.limit), "cogent")
            c = accuracy_by_type(cg)
            results["splits"]["cogent"] = {"accuracy": c["overall"]["accuracy"], "n": c["overall"]["n"]}
            all_records += cg
        results["captions"], results["caption_samples"] = self.captions(test, vocab)
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
        n_samples = len(all_records) + len(results["caption_samples"]) + results["text"].get("n_samples", 0)
        results["cost"] = {
            "eval_samples": n_samples,
            "eval_seconds": elapsed,
            "eval_samples_per_s": n_samples / elapsed,
            "visual_slots_per_image": sum(1 for m in prompt.modality.tolist() if m == IMAGE),
            **self.audio_slots(test),
            **self.decode_speed(prompt),
        }
        results["samples"] = all_records
        results["headline"] = headline(results)
        return results


def headline(results: dict) -> dict:
    """The few numbers of the ablation table, in display order."""
    h = {"accuracy": results["splits"]["iid"]["accuracy"]}
    by = results.get("by_qtype", {})
    for q in ("color", "shape"):
        if q in by:
            h[f"{q}_accuracy"] = by[q]["accuracy"]
    for q in ("color", "shape"):
        if "blind_accuracy" in by.get(q, {}):
            h[f"{q}_blind_accuracy"] = by[q]["blind_accuracy"]
    if "blind" in results["probes"]:
        h["blind_accuracy"] = results["probes"]["blind"]["accuracy"]
    if "rank_accuracy" in results["splits"]["iid"]:
        h["accuracy_rank"] = results["splits"]["iid"]["rank_accuracy"]
    if "cogent" in results["splits"]:
        h["cogent_accuracy"] = results["splits"]["cogent"]["accuracy"]
    if "adversarial" in results.get("pope", {}):
        h["pope_adversarial_f1"] = results["pope"]["adversarial"]["f1"]
    cap = results.get("captions", {})
    for k in ("chair_i", "chair_s", "recall", "bleu"):
        if k in cap:
            h["caption_" + k if k == "recall" else k] = cap[k]
    if results["probes"].get("swapped", {}).get("n_pairs"):
        h["swap_change_rate"] = results["probes"]["swapped"].get("change_rate")
    if "shuffled" in results["probes"]:
        h["shuffled_accuracy"] = results["probes"]["shuffled"]["accuracy"]
    if results.get("text"):
        h["perplexity"] = results["text"]["perplexity"]
    return h
