"""Benchmark metrics on plain Python lists: answers, POPE, CHAIR, BLEU, perplexity, probes.

Everything here is model-independent: a benchmark suite generates or scores answers, then hands
strings (and the scene ground truth) to these functions. Where torchmetrics has the metric it
is used (binary accuracy / precision / recall / F1, BLEU); the rest is a few lines of counting.

Conventions
-----------
* A ratio whose denominator is empty (no samples, no mentions, no eligible pairs) is ``nan``,
  never 0: "not measured" must not read as "perfect" in a table.
* Answers are compared after :func:`normalize_answer`, never raw.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import torch
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, BinaryPrecision, BinaryRecall
from torchmetrics.text import BLEUScore

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
_NUMBER_TO_DIGIT = {word: str(i) for i, word in enumerate(NUMBER_WORDS)}
_ARTICLES = {"a", "an", "the"}
_PUNCT = string.punctuation
_EDGE_PUNCT = re.compile(rf"^[{re.escape(_PUNCT)}\s]+|[{re.escape(_PUNCT)}\s]+$")
_NAN = float("nan")


# --------------------------------------------------------------------------- answers


def normalize_answer(s: str) -> str:
    """Canonical form of a short answer, applied to predictions and references alike.

    The rule, in order:
      1. lowercase, and turn every whitespace run into one space;
      2. strip punctuation and spaces at both ends ("Red." -> "red", "(yes)" -> "yes");
         punctuation inside the answer is kept ("3.5", "left-of" stay as they are);
      3. drop the articles a / an / the as whole words ("the red" -> "red");
      4. number words zero..twenty become digits, as whole words ("two" -> "2");
      5. join the remaining words with single spaces.

    ``None`` normalises to ``""``.
    """
    if s is None:
        return ""
    s = " ".join(str(s).lower().split())
    s = _EDGE_PUNCT.sub("", s)
    words = [_NUMBER_TO_DIGIT.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(pred: str, ref: str) -> bool:
    """``normalize_answer(pred) == normalize_answer(ref)``."""
    return normalize_answer(pred) == normalize_answer(ref)


def accuracy_by_type(records: Iterable[Mapping]) -> dict:
    """Accuracy overall and per question type.

    Args:
        records: each has ``"qtype"`` (str) and ``"correct"`` (bool, or a float in [0, 1]).

    Returns:
        ``{"overall": {"accuracy", "correct", "n"}, "by_type": {qtype: {"accuracy", "correct",
        "n"}}}`` with ``by_type`` sorted by question type; accuracy is ``nan`` when ``n == 0``.
        ``correct`` is the sum of per-record scores (a float when scores are fractional).
    """
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        sums[r["qtype"]] += float(r["correct"])
        counts[r["qtype"]] += 1

    def cell(total: float, n: int) -> dict:
        return {"accuracy": total / n if n else _NAN, "correct": total, "n": n}

    by_type = {q: cell(sums[q], counts[q]) for q in sorted(counts)}
    overall = cell(sum(sums.values()), sum(counts.values()))
    return {"overall": overall, "by_type": by_type}


# --------------------------------------------------------------------------- POPE


def parse_yes_no(answer: str) -> str | None:
    """``"yes"`` / ``"no"`` if the normalised answer's first word is one of them, else None.

    Used for POPE *labels* (which must be exactly yes or no); predictions are read by
    :func:`pope_reads_yes`."""
    words = normalize_answer(answer).split()
    if not words:
        return None
    first = words[0].strip(_PUNCT)
    return first if first in ("yes", "no") else None


POPE_NEGATIVE_WORDS = ("No", "not", "no")  # the POPE reference's test, case-sensitive as there


def pope_reads_yes(answer: str) -> tuple[bool, bool]:
    """How the POPE reference evaluation reads a free-form answer: ``(is_yes, parsed)``.

    The rule of POPE's ``evaluate.py`` (Li et al. 2023, RUCAIBox/POPE; the same in LLaVA's
    ``eval_pope.py``): keep the text before the first ``"."``, delete commas, split on single
    spaces; the answer is **no** if one of the words is exactly ``No``, ``no`` or ``not``, and
    **yes** otherwise. So an answer that says neither (``"I cannot tell"``, ``""``) counts as
    yes. ``parsed`` is False for those: the first sentence holds none of the negative words and
    no ``yes`` (any case, edge punctuation stripped), so the yes was a default, not an answer.
    """
    words = answer.split(".", 1)[0].replace(",", "").split(" ")
    negative = any(w in POPE_NEGATIVE_WORDS for w in words)
    says_yes = any(w.strip(_PUNCT).lower() == "yes" for w in words)
    return not negative, negative or says_yes


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE object-probing scores; "yes" (the object is there) is the positive class.

    Predictions are read as the POPE reference reads them (:func:`pope_reads_yes`): anything
    without a ``no``/``not`` word in its first sentence is a yes. How many predictions held
    neither a yes nor a no (and were read as yes by that default) is reported as ``unparsed``,
    so that a model which rambles is visible. Labels must be exactly yes or no.

    Returns:
        ``dict(accuracy, precision, recall, f1, yes_ratio, n, unparsed, tp, fp, tn, fn)``;
        yes_ratio is the share of predictions read as "yes". With no positive predictions,
        precision (and F1) is 0, torchmetrics' convention.
    """
    if len(preds) != len(labels):
        raise ValueError(f"pope_metrics: {len(preds)} predictions for {len(labels)} labels")
    n = len(preds)
    if n == 0:
        return dict(accuracy=_NAN, precision=_NAN, recall=_NAN, f1=_NAN, yes_ratio=_NAN, n=0,
                    unparsed=0, tp=0, fp=0, tn=0, fn=0)
    target = []
    for lab in labels:
        parsed = parse_yes_no(lab)
        if parsed is None:
            raise ValueError(f"pope_metrics: label {lab!r} is neither yes nor no")
        target.append(parsed == "yes")
    read = [pope_reads_yes(p) for p in preds]
    pred_t = torch.tensor([is_yes for is_yes, _ in read], dtype=torch.long)  # (N,)
    target_t = torch.tensor(target, dtype=torch.long)  # (N,)

    scores = {
        name: float(metric()(pred_t, target_t))
        for name, metric in [("accuracy", BinaryAccuracy), ("precision", BinaryPrecision),
                             ("recall", BinaryRecall), ("f1", BinaryF1Score)]
    }
    tp = int(((pred_t == 1) & (target_t == 1)).sum())
    fp = int(((pred_t == 1) & (target_t == 0)).sum())
    tn = int(((pred_t == 0) & (target_t == 0)).sum())
    fn = int(((pred_t == 0) & (target_t == 1)).sum())
    return dict(**scores, yes_ratio=float(pred_t.float().mean()), n=n,
                unparsed=sum(not parsed for _, parsed in read), tp=tp, fp=fp, tn=tn, fn=fn)


# --------------------------------------------------------------------------- CHAIR


def _words(text: str) -> list[str]:
    """Lowercase words of a caption; punctuation separates words and is dropped."""
    return re.sub(rf"[{re.escape(_PUNCT)}]", " ", text.lower()).split()


def _phrase_lexicon(canonical: Iterable[str], synonyms: Mapping[str, str], plurals: bool
                    ) -> dict[tuple[str, ...], str]:
    """Surface phrase (tuple of words) -> canonical name, with plural forms when asked."""
    lex: dict[tuple[str, ...], str] = {}
    canonical = list(canonical)
    pairs = [(c, c) for c in canonical]
    pairs += [(surface, canon) for surface, canon in synonyms.items() if canon in canonical]
    for surface, canon in pairs:
        words = tuple(_words(surface))
        if not words:
            continue
        lex[words] = canon
        if plurals:
            last = words[-1]
            forms = {last + "s", last + "es"}
            if last.endswith("y"):
                forms.add(last[:-1] + "ies")
            for form in forms:
                lex.setdefault(words[:-1] + (form,), canon)
    return lex


def _match_at(words: list[str], i: int, lex: Mapping[tuple[str, ...], str], max_len: int
              ) -> tuple[str, int] | None:
    """Longest lexicon phrase starting at ``words[i]``: (canonical, length) or None."""
    for length in range(min(max_len, len(words) - i), 0, -1):
        canon = lex.get(tuple(words[i:i + length]))
        if canon is not None:
            return canon, length
    return None


def parse_mentions(caption: str, shapes: Sequence[str], colors: Sequence[str],
                   synonyms: Mapping[str, str] | None = None) -> list[tuple[str | None, str]]:
    """Object mentions of one caption, as unique ``(color, shape)`` pairs in order of first use.

    A mention is a shape word (singular or plural: "circle", "circles", "boxes"; multi-word
    names allowed). If the phrase directly before it is a colour word, the mention is
    ``(color, shape)``, else ``(None, shape)`` (a shape-only mention). ``synonyms`` maps extra
    surface words to a canonical shape or colour (``{"ball": "circle", "crimson": "red"}``).
    Repeated mentions of the same pair count once, as in CHAIR (Rohrbach et al., 2018).
    """
    synonyms = dict(synonyms or {})
    shape_lex = _phrase_lexicon(shapes, synonyms, plurals=True)
    color_lex = _phrase_lexicon(colors, synonyms, plurals=False)
    max_len = max((len(k) for k in [*shape_lex, *color_lex]), default=1)
    words = _words(caption)
    mentions: list[tuple[str | None, str]] = []
    prev_color: str | None = None  # colour phrase that ended right before position i
    i = 0
    while i < len(words):
        shape = _match_at(words, i, shape_lex, max_len)
        if shape is not None:
            mention = (prev_color, shape[0])
            if mention not in mentions:
                mentions.append(mention)
            prev_color, i = None, i + shape[1]
            continue
        color = _match_at(words, i, color_lex, max_len)
        if color is not None:
            prev_color, i = color[0], i + color[1]
            continue
        prev_color, i = None, i + 1
    return mentions


def _mention_matches(mention: tuple[str | None, str], obj: Mapping) -> bool:
    color, shape = mention
    return obj["shape"] == shape and (color is None or obj["color"] == color)


def chair(captions: Sequence[str], scene_objects: Sequence[Sequence[Mapping]],
          shapes: Sequence[str], colors: Sequence[str],
          synonyms: Mapping[str, str] | None = None) -> dict:
    """CHAIR hallucination scores of captions against their scene graphs.

    Mentions come from :func:`parse_mentions` (unique per caption). A ``(color, shape)`` mention
    is hallucinated when no scene object has that colour and shape; a shape-only mention when
    no scene object has that shape. A scene object is *recalled* when some mention of its
    caption matches it (a shape-only mention matches every object of that shape).

    Returns:
        ``chair_i`` = hallucinated mentions / mentions, ``chair_s`` = captions with at least one
        hallucination / captions, ``recall`` = recalled scene objects / scene objects, plus the
        counts ``n_mentioned``, ``n_hallucinated``, ``n_objects``, ``n_recalled``, ``n`` (captions).
        Empty denominators give ``nan``.
    """
    if len(captions) != len(scene_objects):
        raise ValueError(f"chair: {len(captions)} captions for {len(scene_objects)} scenes")
    n_mentioned = n_hallucinated = n_bad_captions = n_objects = n_recalled = 0
    for caption, objects in zip(captions, scene_objects):
        mentions = parse_mentions(caption, shapes, colors, synonyms)
        hallucinated = [m for m in mentions if not any(_mention_matches(m, o) for o in objects)]
        n_mentioned += len(mentions)
        n_hallucinated += len(hallucinated)
        n_bad_captions += bool(hallucinated)
        n_objects += len(objects)
        n_recalled += sum(any(_mention_matches(m, o) for m in mentions) for o in objects)
    n = len(captions)
    return dict(
        chair_i=n_hallucinated / n_mentioned if n_mentioned else _NAN,
        chair_s=n_bad_captions / n if n else _NAN,
        recall=n_recalled / n_objects if n_objects else _NAN,
        n_mentioned=n_mentioned, n_hallucinated=n_hallucinated,
        n_objects=n_objects, n_recalled=n_recalled, n=n,
    )


# --------------------------------------------------------------------------- text metrics


def _bleu_tokens(text: str) -> str:
    """Lowercase, punctuation split off as its own token, single spaces (BLEU's whitespace split)."""
    text = re.sub(rf"([{re.escape(_PUNCT)}])", r" \1 ", text.lower())
    return " ".join(text.split())


def bleu(preds: Sequence[str], refs: Sequence[str | Sequence[str]], n_gram: int = 4,
         smooth: bool = True) -> float:
    """Corpus BLEU (uniform weights up to ``n_gram``) via ``torchmetrics.text.BLEUScore``.

    Text is lowercased and punctuation is split off as a token before torchmetrics' whitespace
    tokenizer sees it ("square." -> "square ."). ``refs[i]`` is one reference or a list of them.
    Smoothing (default on) is torchmetrics' add-one smoothing of Lin & Och (2004): n-gram
    precisions for n >= 2 become (matches + 1) / (candidates + 1). Note that torchmetrics still
    returns 0 when some n-gram order has no match at all across the corpus. BLEU is in [0, 1].
    """
    if len(preds) != len(refs):
        raise ValueError(f"bleu: {len(preds)} predictions for {len(refs)} references")
    if not preds:
        return _NAN
    targets = [[_bleu_tokens(r)] if isinstance(r, str) else [_bleu_tokens(x) for x in r]
               for r in refs]
    candidates = [_bleu_tokens(p) for p in preds]
    if not any(candidates):  # torchmetrics divides by the candidate length
        return 0.0
    return float(BLEUScore(n_gram=n_gram, smooth=smooth)(candidates, targets))


def perplexity(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``: perplexity from a summed natural-log NLL over tokens."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity: need n_tokens > 0, got {n_tokens}")
    return math.exp(total_nll / n_tokens)


# --------------------------------------------------------------------------- probes


def answer_change_rate(preds_orig: Sequence[str], preds_swapped: Sequence[str],
                       refs_orig: Sequence[str], refs_swapped: Sequence[str]) -> dict:
    """Swapped-media probe: does the answer follow the media?

    The question is asked twice, once with its own media and once with another sample's media.
    Only pairs whose (normalised) reference answers differ are *eligible*: for them a model that
    looks must change its answer. Returns ``change_rate`` = eligible pairs whose normalised
    prediction changed / eligible pairs, ``correct_change_rate`` = eligible pairs whose
    prediction changed **and** is right for the swapped media / eligible pairs, ``n_pairs``
    (eligible) and ``n_total``. A blind model scores change_rate 0.
    """
    n_total = len(preds_orig)
    if not (len(preds_swapped) == len(refs_orig) == len(refs_swapped) == n_total):
        raise ValueError("answer_change_rate: all four lists must have the same length")
    eligible = changed = correct_changed = 0
    for po, ps, ro, rs in zip(preds_orig, preds_swapped, refs_orig, refs_swapped):
        if normalize_answer(ro) == normalize_answer(rs):
            continue
        eligible += 1
        if normalize_answer(po) != normalize_answer(ps):
            changed += 1
            correct_changed += exact_match(ps, rs)
    return dict(
        change_rate=changed / eligible if eligible else _NAN,
        correct_change_rate=correct_changed / eligible if eligible else _NAN,
        n_pairs=eligible, n_total=n_total,
    )
