"""The contrastive benchmark (DESIGN §6): a CLIP / CLAP stage run on its own.

    python eval.py --ckpt runs/clip --suite contrastive [--split test] [--limit N] [--out DIR]

Three measurements on the media of one split (default ``test``) of the world, each medium with its
ground-truth caption (:func:`omnifuse.data.pairs.media_captions`, the pairs the stage trains on):

**Zero-shot classification** (Radford et al. 2021; open_clip ``zero_shot_classifier``). For a task
with classes ``c`` and prompt templates ``t`` (:data:`TEMPLATES`, written in the world's caption
language), the ensemble classifier's weight of class ``c`` is
``normalise(mean_t normalise(text(t.format(c))))``; a single template's weight is
``normalise(text(t.format(c)))``. A medium is assigned the class of largest cosine. Tasks and
their ground truth (:func:`media_labels`): images -- ``color``, ``shape`` and ``size`` of
single-object scenes (no sign, no chart), ``digit`` of images with exactly one handwritten digit
(scikit-learn's digits; other shapes may be present), ``word`` of signs; clips -- ``kind`` and
``pitch`` of single-event clips. Classes are the training world's vocabulary. Counting is not a
task: the captions never state a number of objects or sounds, so no template could say one in the
language the text tower learned. Accuracy is reported per template and for the ensemble, with
``n``, the chance rate ``1/C`` and the majority-class rate (classes are not balanced). An image task's
caption family (every caption the world can say of a one-object scene of the class, :data:`FAMILY_FILLERS`)
gives two more rows: its mean (as above) and its best caption (a class scores ``max_t cos(medium,
text(t.format(c)))``: the class of the medium's closest world caption; :func:`zero_shot_task`). Beside it, a
diagnostic (``"caption swap"``): each medium's own caption against copies with the class word
swapped for every other class -- the rest of the caption right -- tells a task the encoder does not
see from one that context-free prompts do not reach.

**Retrieval** both ways over every (medium, caption) pair of the split, R@1/5/10
(:func:`recall_at_k`: a query scores a hit when a correct item ranks in the top k; ties with a
wrong item count against the query). Captions repeat (two single-object scenes of one colour,
shape and size have the same caption), and a repeated caption is the *right* answer for every
medium it describes:

- media -> text: the gallery holds each **distinct** caption once (identical strings embed
  identically, so copies would only tie with each other and push the other captions down); the
  query's hit is its caption;
- text -> media: a query per pair (its caption), the gallery every medium; **any medium whose
  caption is identical to the query's counts as correct**.

**Modality gap** (Liang et al. 2022): the distance between the centroids of the L2-normalised media
embeddings and of the L2-normalised caption embeddings (one per pair), for the trained model and for
the same config initialised with the run's seed (what training started from).

Every sample read is accounted for: media without a ground-truth caption, samples without a
medium of the run's kind, and labels that are not among a task's classes are counted in
``results["unscored"]``; classes of a task that no medium of the split shows are listed.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from omnifuse.data.datamodule import shards_of
from omnifuse.data.pairs import PairTokenize, media_captions
from omnifuse.data.samples import Sample
from omnifuse.data.stream import BadSamplePolicy, iter_samples
from omnifuse.eval.suite import UNSCORED_EXAMPLES, check_meta, sample_hash
from omnifuse.model.encoders import ContrastiveConfig, ContrastiveModel
from omnifuse.tokenizers.text import BOS_ID, EOS_ID, PAD_ID

KS = (1, 5, 10)
CURVE_K = 50  # R@k for k = 1..CURVE_K is kept for the plot
ENSEMBLE = "ensemble"
SWAP = "caption swap"  # the diagnostic of ContrastiveSuite.caption_swap
# what the learning-curve plot draws on its right axis (ContrastiveModule.validation_step logs them)
CURVE_ACCURACIES = ("val/acc_media_to_text", "val/acc_text_to_media")
CURVE_ACCURACY_LABEL = "validation in-batch top-1 (chance 1/batch)"

# Prompt templates per task, in the world's caption language ("a big red circle.", "a small white
# digit 7.", "a sign with the word cat.", "a low tone, then a high chirp."), plus one phrase the
# world never says ("a photo of ...", "a sound of ...") to show what words outside the captions do.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("{}", "a {}.", "a {} object.", "a {} shape.", "a big {} circle.", "a small {} square.",
              "a photo of a {} object."),
    "shape": ("{}", "a {}.", "a {} shape.", "a big red {}.", "a small blue {}.", "a photo of a {}."),
    "size": ("{}", "a {} object.", "a {} shape.", "a {} red circle.", "a {} blue square.", "a photo of a {} object."),
    "digit": ("{}", "digit {}", "a digit {}.", "a small white digit {}.", "a big red digit {}.",
              "a photo of the number {}."),
    "word": ("{}", "the word {}", "a sign with the word {}.", "a photo of a {}."),
    # one-event clips: every caption the world can say of the class (the other attribute's values) is
    # a template, so the ensemble averages the other attribute out; plus generic phrasings
    "kind": ("{}", "a {}.", "a low {}.", "a mid {}.", "a high {}.", "a sound of a {}."),
    "pitch": ("{}", "a {} sound.", "a {} tone.", "a {} buzz.", "a {} hiss.", "a {} chirp.", "a {} knock.",
              "a sound of {} pitch."),
}
TASKS = {"image": ("color", "shape", "size", "digit", "word"), "audio": ("kind", "pitch")}
# Image tasks also get a family of templates built from the world's vocabulary: every caption the
# world can say of a one-object scene of the class, the object's other attributes enumerated ("a big
# red {}.", "a big blue {}.", ... for shape), the same rule as the audio templates above (there
# written out). Its prompts join the ensemble one by one, and the report shows two rows for it: the
# family's own ensemble, and the class of the medium's best caption of the family (``zero_shot_task``).
FAMILY_FILLERS = {  # task -> (vocabulary keys of the other attributes, caption pattern with {} for the class)
    "color": (("sizes", "shapes"), "a {0} {{}} {1}."),
    "shape": (("sizes", "colors"), "a {0} {1} {{}}."),
    "size": (("colors", "shapes"), "a {{}} {0} {1}."),
    "digit": (("sizes", "colors"), "a {0} {1} digit {{}}."),
}
# task -> key of world.json's "vocabulary" holding its classes
CLASS_VOCAB = {"color": "colors", "shape": "shapes", "size": "sizes", "digit": "numbers", "word": "words",
               "kind": "sound_kinds", "pitch": "pitches"}


@dataclass
class Item:
    """One medium of the split: its patches, caption and zero-shot ground truth."""

    id: str  # "<split>/<key>/<file>"
    hash: str  # content of the whole sample (omnifuse.eval.suite.sample_hash)
    patches: torch.Tensor  # (n, patch_dim)
    grid: torch.Tensor  # (n, 2) (row, col)
    caption: str
    labels: dict[str, str] = field(default_factory=dict)  # task -> class name


# --------------------------------------------------------------------------- ground truth


def media_labels(sample: Sample, kind: str, file: str, digit_shape: str = "digit") -> dict[str, str]:
    """Zero-shot ground truth of one medium (``file``) of ``sample`` (module docstring): a dict
    ``{task: class}`` holding only the tasks whose answer this medium determines."""
    meta = sample.meta
    files = [seg["file"] for seg in sample.segments if seg.get("media") == kind]
    if kind == "audio":
        events = meta.get("events") if len(files) == 1 else None
        if events and len(events) == 1:
            return {"kind": str(events[0]["kind"]), "pitch": str(events[0]["pitch"])}
        return {}
    if "images" in meta:  # multi-image samples describe each image
        i = files.index(file)
        objects = meta["images"][i].get("objects", []) if i < len(meta["images"]) else None
        sign = bars = None
    elif len(files) == 1:
        objects, sign, bars = meta.get("objects"), meta.get("sign"), meta.get("bars")
    else:
        return {}
    labels: dict[str, str] = {}
    objects = objects or []
    if sign:
        labels["word"] = str(sign["word"])
    digits = [o for o in objects if o["shape"] == digit_shape]
    if len(digits) == 1 and "digit" in digits[0]:
        labels["digit"] = str(digits[0]["digit"])
    if len(objects) == 1 and not digits and not sign and not bars:
        obj = objects[0]
        labels.update(color=str(obj["color"]), shape=str(obj["shape"]), size=str(obj["size"]))
    return labels


def read_items(world_dir: Path, split: str, interleaver, kind: str, limit: int | None = None,
               image_size: int | None = None, progress: bool = False,
               unscored: dict | None = None, digit_shape: str = "digit") -> tuple[list[Item], int]:
    """Every ``kind`` medium with a ground-truth caption in the first ``limit`` samples of
    ``world_dir/split``, cut into patches exactly as the stage's pair batches are
    (:class:`omnifuse.data.pairs.PairTokenize`). Each sample's meta is checked
    (:func:`omnifuse.eval.suite.check_meta`). Returns ``(items, samples read)``; samples and media
    left out are appended to ``unscored[(split, reason)]`` as ids."""
    tokenize = PairTokenize(interleaver, kind)
    unscored = unscored if unscored is not None else defaultdict(list)
    items, n_read = [], 0
    samples = iter_samples(shards_of(world_dir, split), BadSamplePolicy("error"), image_size)
    for sample in tqdm(samples, desc=f"read {split}", disable=not progress, leave=False, dynamic_ncols=True):
        check_meta(sample, split)
        n_read += 1
        sid = f"{split}/{sample.key}"
        if not any(seg.get("media") == kind for seg in sample.segments):
            unscored[(split, f"no {kind} medium")].append(sid)
        else:
            described, undescribed = media_captions(sample, kind)
            if undescribed:
                unscored[(split, f"{kind} without a ground-truth caption")].append(sid)
            h = sample_hash(sample)
            for file, caption in described:
                patches, grid = tokenize.patches(sample.media[file])
                items.append(Item(f"{sid}/{file}", h, patches, grid, caption,
                                  media_labels(sample, kind, file, digit_shape)))
        if limit is not None and n_read >= limit:
            break
    return items, n_read


# --------------------------------------------------------------------------- embeddings


def _chunks(n: int, size: int):
    return (range(i, min(i + size, n)) for i in range(0, n, size))


def stack_items(items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Items -> zero-padded ``patches (M, n_max, patch_dim)``, ``grid (M, n_max, 2)`` and ``mask (M, n_max)``
    (True = a real patch)."""
    n_max = max(it.patches.shape[0] for it in items)
    patches = torch.zeros(len(items), n_max, items[0].patches.shape[1])
    grid = torch.zeros(len(items), n_max, 2, dtype=torch.long)
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    for j, it in enumerate(items):
        n = it.patches.shape[0]
        patches[j, :n], grid[j, :n], mask[j, :n] = it.patches, it.grid, True
    return patches, grid, mask


@torch.no_grad()
def embed_media(model: ContrastiveModel, items: Sequence[Item], batch_size: int = 256,
                progress: bool = False, desc: str = "embed media") -> torch.Tensor:
    """L2-normalised media embeddings ``(N, E)`` (float32, CPU), in ``items`` order."""
    out = []
    for idx in tqdm(list(_chunks(len(items), batch_size)), desc=desc, disable=not progress, leave=False,
                    dynamic_ncols=True):
        patches, grid, mask = stack_items([items[i] for i in idx])
        out.append(F.normalize(model.encode_media(patches, grid, mask).float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, model.cfg.embed_dim)


@torch.no_grad()
def embed_texts(model: ContrastiveModel, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised embeddings ``(N, E)`` of ``texts``, each encoded ``<s> text </s>`` as in training."""
    out = []
    for idx in _chunks(len(texts), batch_size):
        ids = [[BOS_ID, *tokenizer.encode(texts[i]), EOS_ID] for i in idx]
        tokens = torch.full((len(ids), max(map(len, ids))), PAD_ID, dtype=torch.long)  # (M, T)
        for j, row in enumerate(ids):
            tokens[j, : len(row)] = torch.tensor(row)
        lengths = torch.tensor([len(row) for row in ids])
        out.append(F.normalize(model.encode_text(tokens, lengths).float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, model.cfg.embed_dim)


def initial_model(cfg: ContrastiveConfig, seed: int) -> ContrastiveModel:
    """The model a run of ``cfg`` started from: built right after seeding torch with the run's
    ``seed_everything`` (as train.py does), without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ContrastiveModel(cfg)
    return model.eval()


# --------------------------------------------------------------------------- metrics


def swapped_captions(caption: str, truth: str, classes: Sequence[str]) -> list[str] | None:
    """``caption`` with its one mention of ``truth`` (as a whole word) replaced by each class, in
    ``classes`` order; None unless the caption names ``truth`` exactly once."""
    pattern = re.compile(rf"(?<!\w){re.escape(truth)}(?!\w)")
    if len(pattern.findall(caption)) != 1:
        return None
    return [pattern.sub(c, caption) for c in classes]


def classifier_weights(prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """Zero-shot classifier ``(C, E)`` from prompt embeddings ``(T, C, E)`` (template, class):
    each prompt embedding L2-normalised, averaged over templates, L2-normalised again (open_clip's
    ``zero_shot_classifier``). With one template this is the normalised prompt embedding."""
    return F.normalize(F.normalize(prompt_embeddings, dim=-1).mean(dim=0), dim=-1)


def query_ranks(sims: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Rank ``(Q,)`` of each query's best relevant gallery item: 1 + the number of irrelevant items
    scoring **at least** as high (ties are broken against the query). ``sims (Q, G)``, ``relevant
    (Q, G)`` bool; every query needs a relevant item."""
    if sims.shape != relevant.shape or sims.dim() != 2:
        raise ValueError(f"sims and relevant must both be (Q, G), got {tuple(sims.shape)} and {tuple(relevant.shape)}")
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant gallery item")
    best = sims.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    return 1 + ((sims >= best) & ~relevant).sum(dim=1)  # (Q,)


def recall_at_k(sims: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Hit rate at ``k`` (CLIP's retrieval "R@k"): the fraction of queries (rows of ``sims (Q, G)``)
    with a relevant gallery item (``relevant (Q, G)`` bool) among their ``k`` highest scores, ties
    counted against the query (:func:`query_ranks`)."""
    rank = query_ranks(sims, relevant)
    return {k: float((rank <= k).float().mean()) for k in ks}


def _ranks(queries: torch.Tensor, gallery: torch.Tensor, query_label: torch.Tensor, gallery_label: torch.Tensor,
           chunk: int = 1024) -> torch.Tensor:
    """:func:`query_ranks` of cosine retrieval where an item is relevant to a query when their labels
    agree, ``chunk`` queries at a time (a base-preset split would not fit one ``(Q, G)`` matrix)."""
    out = []
    for start in range(0, len(queries), chunk):
        rows = slice(start, start + chunk)
        sims = queries[rows] @ gallery.T  # (q, G)
        out.append(query_ranks(sims, query_label[rows, None] == gallery_label[None, :]))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def retrieval(media: torch.Tensor, captions: Sequence[str], text_of: torch.Tensor, distinct: Sequence[str],
              ks: Sequence[int] = KS, curve_k: int = CURVE_K) -> dict:
    """Retrieval both ways (module docstring). ``media (N, E)`` normalised, ``captions`` the N pairs'
    captions, ``text_of (G, E)`` normalised embeddings of the ``distinct`` captions (G of them).

    media -> text: N queries, gallery the G distinct captions, relevant = the query's caption.
    text -> media: a query per pair (its caption), gallery the N media, relevant = every medium
    whose caption is identical to the query's (so a duplicate caption's other media count as correct).

    Returns ``{"media_to_text": {"R@k": …, "n", "gallery"}, "text_to_media": {…}, "n_pairs",
    "n_distinct_captions", "curve": {"k": [1..K], "media_to_text": […], "text_to_media": […]}}``.
    """
    index = {c: g for g, c in enumerate(distinct)}
    cap = torch.tensor([index[c] for c in captions], dtype=torch.long)  # (N,) distinct-caption index of each pair
    n, g = len(captions), len(distinct)
    ranks = {"media_to_text": _ranks(media, text_of, cap, torch.arange(g)),
             "text_to_media": _ranks(text_of[cap], media, cap, cap)}
    ks_curve = list(range(1, min(curve_k, max(g, n)) + 1))
    out: dict = {}
    for name, rank in ranks.items():
        out[name] = {**{f"R@{k}": float((rank <= k).float().mean()) for k in ks}, "n": n,
                     "gallery": g if name == "media_to_text" else n}
    out["n_pairs"], out["n_distinct_captions"] = n, g
    out["curve"] = {"k": ks_curve, **{name: [float((rank <= k).float().mean()) for k in ks_curve]
                                      for name, rank in ranks.items()}}
    return out


def modality_gap(media: torch.Tensor, text: torch.Tensor) -> float:
    """Liang et al. (2022): ``|| mean(normalise(media)) - mean(normalise(text)) ||_2`` over ``(N, E)`` rows."""
    return float((F.normalize(media.float(), dim=-1).mean(0) - F.normalize(text.float(), dim=-1).mean(0)).norm())


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95% at ``z = 1.96``); NaNs when n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def linear_probe(train_x: torch.Tensor, train_y: Sequence[str], test_x: torch.Tensor, test_y: Sequence[str],
                 l2: float = 1e-3, max_iter: int = 200) -> dict:
    """CLIP's linear-probe evaluation (Radford et al. 2021, §3.2): multinomial logistic regression
    on frozen embeddings, fitted by L-BFGS with an L2 penalty ``l2 * |W|²`` on the training media,
    scored on the test media. Classes are those of the training labels; a test item of another class
    counts as wrong. Returns ``{"accuracy", "ci95", "n", "n_train", "train_accuracy", "classes"}``;
    ``{}`` with fewer than two training classes. Says whether the embedding holds the class at all,
    whatever the text tower makes of it."""
    classes = sorted(set(train_y))
    if len(classes) < 2 or not len(test_y):
        return {}
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in train_y])
    y_test = torch.tensor([index.get(c, -1) for c in test_y])
    x, x_test = train_x.double(), test_x.double()
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        correct = int(((x_test @ w + b).argmax(1) == y_test).sum())
        train_acc = float(((x @ w + b).argmax(1) == y).double().mean())
    n = len(test_y)
    return {"accuracy": correct / n, "ci95": list(wilson_interval(correct, n)), "n": n, "n_train": len(train_y),
            "train_accuracy": train_acc, "classes": classes}


def caption_family(task: str, vocab: Mapping) -> list[str]:
    """The templates of every caption the world can say of a one-object scene of ``task``'s class
    (:data:`FAMILY_FILLERS`; ``[]`` for a task without one or a vocabulary that lacks a filler)."""
    if task not in FAMILY_FILLERS:
        return []
    keys, pattern = FAMILY_FILLERS[task]
    a, b = ([str(w) for w in vocab.get(k) or []] for k in keys)
    return [pattern.format(x, y) for x in a for y in b]


def family_label(n: int) -> str:
    return f"every world caption ({n} templates)"


def family_best_label(n: int) -> str:
    return f"best world caption ({n} templates)"


def zero_shot_task(media: torch.Tensor, truths: Sequence[str], classes: Sequence[str],
                   prompt_embeddings: torch.Tensor, templates: Sequence[str],
                   family: int = 0) -> tuple[dict, dict[str, list[str]]]:
    """Accuracy of each template's classifier and of the ensemble on ``media (N, E)`` (normalised)
    with true classes ``truths``; ``prompt_embeddings (T, C, E)``. The last ``family`` templates are a
    caption family (:func:`caption_family`): in the ensemble one by one, and in the per-template results
    twice: as their own ensemble (:func:`family_label`, the mean of the class's captions), and as the
    class of the medium's most similar caption of the family (:func:`family_best_label`: a class scores
    its best caption, the max over the enumerated other attributes). The mean asks one vector to stand
    for "a circle of any colour and size"; the max asks only that the medium's own caption be the
    closest, as in retrieval. Returns the task's results and ``{template or "ensemble": predictions}``."""
    truth = torch.tensor([classes.index(t) for t in truths])  # (N,)
    single = len(templates) - family
    classifiers = {t: classifier_weights(prompt_embeddings[i : i + 1]) for i, t in enumerate(templates[:single])}
    if family:
        classifiers[family_label(family)] = classifier_weights(prompt_embeddings[single:])
    classifiers[ENSEMBLE] = classifier_weights(prompt_embeddings)
    scores = {name: media @ w.T for name, w in classifiers.items()}  # (N, C) each
    if family:
        captions = F.normalize(prompt_embeddings[single:], dim=-1)  # (F, C, E)
        scores[family_best_label(family)] = torch.einsum("ne,fce->nfc", media, captions).amax(dim=1)  # (N, C)
    accuracy, predictions = {}, {}
    for name, score in scores.items():
        pred = score.argmax(dim=1)  # (N,)
        accuracy[name] = float((pred == truth).float().mean())
        predictions[name] = [classes[i] for i in pred.tolist()]
    n = len(truths)
    counts = Counter(truths)
    per_template = {t: accuracy[t] for t in scores if t != ENSEMBLE}
    best, worst = max(per_template, key=per_template.get), min(per_template, key=per_template.get)
    k = round(accuracy[ENSEMBLE] * n)
    return {
        "n": n,
        "n_classes": len(classes),
        "chance": 1 / len(classes),
        "majority": max(counts.values()) / n,
        ENSEMBLE: accuracy[ENSEMBLE],
        "ensemble_ci95": list(wilson_interval(k, n)),
        "templates": per_template,
        "best_template": best,
        "worst_template": worst,
        "class_counts": {c: counts.get(c, 0) for c in classes},
        "classes_without_items": [c for c in classes if not counts.get(c)],
    }, predictions


# --------------------------------------------------------------------------- the suite


class ContrastiveSuite:
    """Zero-shot classification, retrieval and modality gap of one CLIP/CLAP model (module docstring).

    Args:
        model: the trained :class:`ContrastiveModel` (eval mode).
        init: the same config at initialisation (:func:`initial_model`), for the modality gap.
        interleaver: the run's interleaver (patches cut as in training; its text tokenizer).
        world_dir: folder holding ``<split>/*.tar``.
        templates: task -> prompt templates (each with one ``{}``); default :data:`TEMPLATES`.
        caption_families: add each image task's caption family (:func:`caption_family`) to its
            templates (default: when ``templates`` is the default).
        probe_split, probe_limit: the split (of ``world_dir``) and how many of its samples the linear
            probe (:func:`linear_probe`) is fitted on; ``None`` or a missing split: no probe.
        image_size: images are resized to this side when read (the run's ``data.image_size``).
    """

    def __init__(self, model: ContrastiveModel, init: ContrastiveModel | None, interleaver, world_dir: Path,
                 split: str = "test", limit: int | None = None, progress: bool = True,
                 templates: Mapping[str, Sequence[str]] | None = None, image_size: int | None = None,
                 batch_size: int = 256, caption_families: bool | None = None, probe_split: str | None = "train",
                 probe_limit: int = 8000):
        self.model, self.init, self.il = model, init, interleaver
        self.world_dir, self.split, self.limit, self.progress = Path(world_dir), split, limit, progress
        self.templates = {k: tuple(v) for k, v in (templates or TEMPLATES).items()}
        self.caption_families = templates is None if caption_families is None else caption_families
        self.probe_split, self.probe_limit = probe_split, probe_limit
        for task, ts in self.templates.items():
            bad = [t for t in ts if t.count("{}") != 1]
            if bad or not ts:
                raise ValueError(f"templates of task {task!r} must each hold one '{{}}' (and be at least one): {bad}")
        self.image_size, self.batch_size = image_size, batch_size
        self.kind = model.cfg.modality
        self.unscored: dict[tuple[str, str], list[str]] = defaultdict(list)

    def unscored_summary(self) -> dict:
        reasons = [{"split": sp, "reason": r, "n": len(ids), "examples": ids[:UNSCORED_EXAMPLES]}
                   for (sp, r), ids in self.unscored.items()]
        return {"n": sum(r["n"] for r in reasons), "reasons": reasons}

    def zero_shot(self, items: Sequence[Item], media: torch.Tensor, vocab: Mapping) -> tuple[dict, dict, list[dict]]:
        """``(results per task, tasks not run -> reason, sample records)``."""
        tokenizer = self.il.text
        results, not_run, records = {}, {}, []
        for task in TASKS[self.kind]:
            classes = [str(c) for c in vocab.get(CLASS_VOCAB[task]) or []]
            templates = self.templates.get(task)
            if not templates:
                not_run[task] = "no prompt templates for this task"
                continue
            if not classes:
                not_run[task] = f"the world's vocabulary has no {CLASS_VOCAB[task]!r} (its classes)"
                continue
            chosen = []
            for i, it in enumerate(items):
                if task not in it.labels:
                    continue
                if it.labels[task] in classes:
                    chosen.append(i)
                else:
                    self.unscored[(self.split, f"{task}: true class {it.labels[task]!r} is not among the "
                                               f"world's {CLASS_VOCAB[task]}")].append(it.id)
            if not chosen:
                not_run[task] = f"no {self.kind} of the {self.split!r} split has a {task} label"
                continue
            family = caption_family(task, vocab) if self.caption_families else []
            templates = (*templates, *family)
            prompts = [t.format(c) for t in templates for c in classes]
            emb = embed_texts(self.model, tokenizer, prompts, self.batch_size)  # (T*C, E)
            emb = emb.view(len(templates), len(classes), -1)  # (T, C, E)
            truths = [items[i].labels[task] for i in chosen]
            results[task], preds = zero_shot_task(media[chosen], truths, classes, emb, templates, family=len(family))
            swap, swap_preds = self.caption_swap([items[i] for i in chosen], media[chosen], task, classes)
            if swap:
                results[task][SWAP] = swap
                preds[SWAP] = swap_preds
            for name, p in preds.items():
                for j, i in enumerate(chosen):
                    if p[j] is not None:
                        records.append({"id": items[i].id, "hash": items[i].hash, "split": self.split, "task": task,
                                        "template": name, "truth": truths[j], "prediction": p[j],
                                        "correct": p[j] == truths[j]})
        return results, not_run, records

    def linear_probes(self, zero_shot: dict, items: Sequence[Item], media: torch.Tensor, vocab: Mapping) -> None:
        """Adds ``linear_probe`` (:func:`linear_probe`, fitted on ``probe_split``) to each zero-shot task."""
        if not self.probe_split or not zero_shot or not any((self.world_dir / self.probe_split).glob("*.tar")):
            return
        train, _ = read_items(self.world_dir, self.probe_split, self.il, self.kind, self.probe_limit, self.image_size,
                              self.progress, defaultdict(list), str(vocab.get("digit_shape") or "digit"))
        train_media = embed_media(self.model, train, self.batch_size, self.progress, desc="embed probe media")
        for task, r in zero_shot.items():
            fit = [i for i, it in enumerate(train) if task in it.labels]
            test = [i for i, it in enumerate(items) if task in it.labels and it.labels[task] in r["class_counts"]]
            probe = linear_probe(train_media[fit], [train[i].labels[task] for i in fit],
                                 media[test], [items[i].labels[task] for i in test])
            if probe:
                r["linear_probe"] = {**probe, "split": self.probe_split}

    def caption_swap(self, items: Sequence[Item], media: torch.Tensor, task: str,
                     classes: Sequence[str]) -> tuple[dict, list[str | None]]:
        """The diagnostic beside zero-shot: each medium's own caption against the same caption with
        its class word swapped for every other class (:func:`swapped_captions`); the prediction is
        the class of the closest variant. The rest of the caption (the other attributes) is right,
        so this separates "the encoder does not see the class" from "a prompt without context does
        not reach it". Returns ``({"accuracy", "n", "n_skipped"}, predictions)`` (None where the
        caption does not name the class exactly once); ``({}, …)`` when no caption does."""
        variants, kept = [], []
        for j, it in enumerate(items):
            v = swapped_captions(it.caption, it.labels[task], classes)
            if v is not None:
                variants += v
                kept.append(j)
        preds: list[str | None] = [None] * len(items)
        if not kept:
            return {}, preds
        emb = embed_texts(self.model, self.il.text, variants, self.batch_size)
        emb = emb.view(len(kept), len(classes), -1)  # (n, C, E)
        scores = torch.einsum("ne,nce->nc", media[kept], emb)  # (n, C)
        for j, c in zip(kept, scores.argmax(dim=1).tolist()):
            preds[j] = classes[c]
        correct = sum(preds[j] == items[j].labels[task] for j in kept)
        return {"accuracy": correct / len(kept), "n": len(kept), "n_skipped": len(items) - len(kept)}, preds

    def run(self, vocab: Mapping, seed: int | None = None) -> dict:
        """The results dict (``omnifuse.eval.report``) with ``suite: "contrastive"``."""
        t0 = time.perf_counter()
        self.unscored.clear()
        items, n_read = read_items(self.world_dir, self.split, self.il, self.kind, self.limit, self.image_size,
                                   self.progress, self.unscored, str(vocab.get("digit_shape") or "digit"))
        if not items:
            raise ValueError(f"no {self.kind} with a ground-truth caption among the {n_read} samples read from "
                             f"{self.world_dir / self.split}: nothing to evaluate a {self.kind} contrastive model on")
        media = embed_media(self.model, items, self.batch_size, self.progress)
        captions = [it.caption for it in items]
        distinct = list(dict.fromkeys(captions))
        text_of = embed_texts(self.model, self.il.text, distinct, self.batch_size)  # (G, E)
        index = {c: g for g, c in enumerate(distinct)}
        cap = torch.tensor([index[c] for c in captions])  # (N,)
        zero_shot, not_run, records = self.zero_shot(items, media, vocab)
        self.linear_probes(zero_shot, items, media, vocab)
        gap = {"trained": modality_gap(media, text_of[cap]), "n": len(items)}
        embeddings = {"trained": (media, text_of[cap])}
        if self.init is not None:
            init_media = embed_media(self.init, items, self.batch_size, self.progress, desc="embed media (init)")
            init_text = embed_texts(self.init, self.il.text, distinct, self.batch_size)[cap]
            gap["init"] = modality_gap(init_media, init_text)
            gap["init_seed"] = seed
            embeddings["init"] = (init_media, init_text)
        contrastive = {
            "modality": self.kind,
            "split": self.split,
            "zero_shot": zero_shot,
            "zero_shot_not_run": not_run,
            "retrieval": retrieval(media, captions, text_of, distinct),
            "modality_gap": gap,
        }
        elapsed = time.perf_counter() - t0
        results = {
            "suite": "contrastive",
            "iid_split": self.split,
            "contrastive": contrastive,
            "cost": {"eval_samples": n_read, "eval_media": len(items), "eval_seconds": elapsed},
            "unscored": self.unscored_summary(),
            "samples": records,
            "embeddings": embeddings,  # tensors for the gap plot; the caller pops them before saving
        }
        results["headline"] = headline(contrastive)
        return results


def headline(contrastive: Mapping) -> dict:
    """Ensemble zero-shot accuracy per task, R@k both ways, modality gap trained and at init."""
    h = {f"zero_shot_{task}": r[ENSEMBLE] for task, r in contrastive["zero_shot"].items()}
    for direction in ("media_to_text", "text_to_media"):
        for k in KS:
            h[f"{direction}_R@{k}"] = contrastive["retrieval"][direction][f"R@{k}"]
    h["modality_gap"] = contrastive["modality_gap"]["trained"]
    if "init" in contrastive["modality_gap"]:
        h["modality_gap_init"] = contrastive["modality_gap"]["init"]
    return h


def plot_modality_gap(embeddings: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path,
                      title: str = "") -> Path:
    """One panel per model (``init``, ``trained``): media and caption embeddings (normalised)
    projected on the first two principal components of both together, centroids joined by a line
    (Liang et al. 2022, Fig. 1)."""
    from matplotlib.figure import Figure

    names = [n for n in ("init", "trained") if n in embeddings]
    fig = Figure(figsize=(4.2 * len(names), 4))
    for j, name in enumerate(names):
        media, text = embeddings[name]
        both = torch.cat([media, text]).double()  # (2N, E)
        centred = both - both.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy = (centred @ v[:2].T).numpy()  # (2N, 2)
        m, t = xy[: len(media)], xy[len(media):]
        ax = fig.add_subplot(1, len(names), j + 1)
        ax.scatter(m[:, 0], m[:, 1], s=6, alpha=0.5, label="media")
        ax.scatter(t[:, 0], t[:, 1], s=6, alpha=0.5, label="captions")
        cm, ct = m.mean(0), t.mean(0)
        ax.plot([cm[0], ct[0]], [cm[1], ct[1]], "k-o", markersize=4)
        ax.set_title(f"{name}: gap {modality_gap(media, text):.3f}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def _as_int_seed(config: Mapping, run_dir) -> int:
    seed = config.get("seed_everything")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{Path(run_dir) / 'config.yaml'}: seed_everything is {seed!r}, not an int: the model at "
                         "initialisation (modality gap at init) cannot be rebuilt")
    return seed


def evaluate_run(run, data_dir: Path, vocab: Mapping, split: str = "test", limit: int | None = None,
                 progress: bool = True, out_dir: Path | None = None, probe_limit: int = 8000) -> dict:
    """The contrastive suite on a loaded run (:func:`omnifuse.eval.loading.load_run`); writes the
    modality-gap plot into ``out_dir`` when given. A run that is not a CLIP/CLAP stage run is an
    error naming the run and what it is."""
    if not isinstance(run.model, ContrastiveModel):
        raise ValueError(
            f"run {run.run_dir} is a {run.fusion} run (model.class_path {run.config['model']['class_path']}), not a "
            "contrastive stage: --suite contrastive evaluates CLIP/CLAP runs (ContrastiveModule, trained with "
            "configs/stage/clip.yaml or clap.yaml); evaluate this run with --suite world"
        )
    seed = _as_int_seed(run.config, run.run_dir)
    init = initial_model(run.model.cfg, seed)
    suite = ContrastiveSuite(run.model, init, run.interleaver, data_dir, split=split, limit=limit, progress=progress,
                             image_size=(run.config.get("data") or {}).get("image_size"), probe_limit=probe_limit)
    results = suite.run(vocab, seed)
    embeddings = results.pop("embeddings")
    if out_dir is not None:
        plot_modality_gap(embeddings, Path(out_dir) / "modality_gap.png",
                          title=f"{Path(run.run_dir).name}: {suite.kind} vs caption embeddings ({split})")
        results["contrastive"]["modality_gap"]["plot"] = "modality_gap.png"
    return results

