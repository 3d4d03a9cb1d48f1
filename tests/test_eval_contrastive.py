"""eval.py --suite contrastive: the zero-shot classifier, R@k and the modality gap against hand
computations, ground truth read from world samples, and a CLIP stage run evaluated through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, train_stage
from omnifuse.data.samples import Sample
from omnifuse.eval.contrastive import (
    TASKS, ContrastiveSuite, classifier_weights, evaluate_run, initial_model, media_labels, modality_gap,
    caption_family, linear_probe, recall_at_k, retrieval, wilson_interval, zero_shot_task,
)

# --------------------------------------------------------------------------- zero-shot classifier


def test_classifier_weights_normalise_each_prompt_then_the_mean():
    # (T=2 templates, C=2 classes, E=2): prompts of very different norms
    prompts = torch.tensor([[[3.0, 4.0], [0.0, -2.0]],     # template 0: class A, class B
                            [[10.0, 0.0], [-1.0, 0.0]]])   # template 1
    w = classifier_weights(prompts)
    # by hand: A = normalise((0.6, 0.8) + (1, 0)) = (1.6, 0.8) / sqrt(3.2); B = normalise((0, -1) + (-1, 0))
    a = torch.tensor([1.6, 0.8]) / math.sqrt(3.2)
    b = torch.tensor([-1.0, -1.0]) / math.sqrt(2.0)
    torch.testing.assert_close(w, torch.stack([a, b]))
    # averaging the raw prompts first would weigh the long one: (13, 4) -> another direction
    raw = F.normalize(prompts.mean(0), dim=-1)
    assert not torch.allclose(w[0], raw[0], atol=1e-3)
    # one template: its normalised prompt
    torch.testing.assert_close(classifier_weights(prompts[1:]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


def test_zero_shot_task_per_template_and_ensemble_on_a_known_case():
    media = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]), dim=-1)  # truths A, B, A
    prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],    # "good": A -> x, B -> y
                            [[2.0, 0.0], [0.0, 5.0]],    # "good too" (other norms)
                            [[0.0, 1.0], [1.0, 0.0]]])   # "swapped": every answer wrong
    res, preds = zero_shot_task(media, ["A", "B", "A"], ["A", "B"], prompts, ["good", "good too", "swapped"])
    assert res["templates"] == {"good": 1.0, "good too": 1.0, "swapped": 0.0}
    assert preds["swapped"] == ["B", "A", "B"]
    # ensemble: A = normalise((1,0)+(1,0)+(0,1)) ∝ (2, 1), B ∝ (1, 2): every medium on its side
    assert res["ensemble"] == 1.0 and preds["ensemble"] == ["A", "B", "A"]
    assert (res["n"], res["n_classes"], res["chance"]) == (3, 2, 0.5)
    assert res["majority"] == pytest.approx(2 / 3)
    assert res["best_template"] == "good" and res["worst_template"] == "swapped"
    assert res["class_counts"] == {"A": 2, "B": 1} and res["classes_without_items"] == []
    lo, hi = res["ensemble_ci95"]
    assert (lo, hi) == pytest.approx(wilson_interval(3, 3)) and 0 < lo < 1 and hi == pytest.approx(1.0)
    # a class no medium shows stays in the classifier and is listed
    res, _ = zero_shot_task(media, ["A", "B", "A"], ["A", "B", "C"],
                            torch.cat([prompts, torch.tensor([[[-1.0, -1.0]]] * 3)], dim=1), ["g", "g2", "s"])
    assert res["classes_without_items"] == ["C"] and res["chance"] == pytest.approx(1 / 3)


def test_a_caption_family_is_one_row_of_the_sweep_and_joins_the_ensemble_prompt_by_prompt():
    media = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]), dim=-1)  # truths A, B, A
    prompts = torch.tensor([[[0.0, 1.0], [1.0, 0.0]],    # "swapped": every answer wrong
                            [[1.0, 0.0], [0.0, 1.0]],    # family prompt 1: right
                            [[1.0, 0.2], [0.2, 1.0]]])   # family prompt 2: right
    res, preds = zero_shot_task(media, ["A", "B", "A"], ["A", "B"], prompts, ["swapped", "f1", "f2"], family=2)
    label, best = "every world caption (2 templates)", "best world caption (2 templates)"
    assert res["templates"] == {"swapped": 0.0, label: 1.0, best: 1.0}
    assert preds[label] == ["A", "B", "A"] and res["best_template"] == label
    # ensemble over the 3 prompts: A ∝ (0,1)+(1,0)+(1,0.2)/|.|, B mirrored: A's side wins for A's media
    assert res["ensemble"] == 1.0


def test_the_best_caption_row_reads_a_class_the_family_mean_does_not():
    """The medium is e1 and A's family holds e1 itself; B's two captions straddle e1 (0.95 e1 +- 0.31 e3), so
    B's *mean* is e1 and wins the mean row, while A's *best* caption (cosine 1) beats B's best (0.95)."""
    e = torch.eye(3)
    prompts = torch.stack([torch.stack([e[0], 0.95 * e[0] + 0.312 * e[2]]),  # family prompt 1: (A, B)
                           torch.stack([e[1], 0.95 * e[0] - 0.312 * e[2]])])  # family prompt 2
    res, preds = zero_shot_task(e[:1], ["A"], ["A", "B"], prompts, ["f1", "f2"], family=2)
    assert res["templates"] == {"every world caption (2 templates)": 0.0, "best world caption (2 templates)": 1.0}
    assert preds["best world caption (2 templates)"] == ["A"] and preds["every world caption (2 templates)"] == ["B"]
    assert res["ensemble"] == 0.0  # the ensemble stays the mean of every prompt: the row is beside it, not in it
    # no family: no best-caption row
    res, _ = zero_shot_task(e[:1], ["A"], ["A", "B"], prompts, ["t1", "t2"])
    assert set(res["templates"]) == {"t1", "t2"}


def test_caption_families_enumerate_the_other_attributes():
    vocab = {"sizes": ["small", "big"], "colors": ["red", "blue", "green"], "shapes": ["circle", "star"]}
    shape = caption_family("shape", vocab)
    assert len(shape) == 6 and "a big green {}." in shape and all(t.count("{}") == 1 for t in shape)
    assert caption_family("size", vocab)[0] == "a {} red circle." and len(caption_family("size", vocab)) == 6
    assert "a small {} star." in caption_family("color", vocab) and len(caption_family("color", vocab)) == 4
    assert caption_family("digit", vocab)[0].format(7) == "a small red digit 7."
    assert caption_family("word", vocab) == [] and caption_family("shape", {}) == []


def test_linear_probe_separates_what_the_embedding_holds_and_not_what_it_does_not():
    g = torch.Generator().manual_seed(0)
    labels = ["A", "B", "C"] * 40
    centres = {"A": torch.tensor([1.0, 0.0, 0.0]), "B": torch.tensor([0.0, 1.0, 0.0]), "C": torch.tensor([0.0, 0.0, 1.0])}
    x = torch.stack([centres[c] for c in labels]) + 0.1 * torch.randn(len(labels), 3, generator=g)
    res = linear_probe(x[:90], labels[:90], x[90:], labels[90:])
    assert res["accuracy"] == 1.0 and res["train_accuracy"] == 1.0 and (res["n"], res["n_train"]) == (30, 90)
    assert res["classes"] == ["A", "B", "C"] and res["ci95"] == pytest.approx(list(wilson_interval(30, 30)))
    # labels the features do not carry: held-out accuracy near chance (1/3)
    noise = torch.randn(600, 3, generator=g)
    shuffled = ["A", "B", "C"] * 200
    assert linear_probe(noise[:300], shuffled[:300], noise[300:], shuffled[300:])["accuracy"] < 0.45
    # a test class the probe never saw counts as wrong; one training class is no probe
    assert linear_probe(x[:90], labels[:90], x[:2], ["A", "D"])["accuracy"] == 0.5
    assert linear_probe(x[:3], ["A"] * 3, x[:3], ["A"] * 3) == {}


def test_wilson_interval_by_hand():
    lo, hi = wilson_interval(5, 10)
    half = 1.96 * math.sqrt(0.25 / 10 + 1.96**2 / 400) / (1 + 1.96**2 / 10)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_swapped_captions_replace_the_one_mention_of_the_class():
    from omnifuse.eval.contrastive import swapped_captions

    assert swapped_captions("a big red circle.", "red", ["red", "blue"]) == ["a big red circle.", "a big blue circle."]
    assert swapped_captions("a small white digit 7 and a big red star.", "7", ["1", "7"]) == [
        "a small white digit 1 and a big red star.", "a small white digit 7 and a big red star."]
    assert swapped_captions("a low tone, then a low hiss.", "low", ["low", "high"]) is None  # twice: ambiguous
    assert swapped_captions("a big redder circle.", "red", ["red"]) is None  # whole words only


# --------------------------------------------------------------------------- retrieval


def test_recall_at_k_by_hand_with_a_tie():
    sims = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # relevant 0: rank 1
                         [0.2, 0.8, 0.7, 0.9],    # relevant 2: 0.8 and 0.9 above -> rank 3
                         [0.4, 0.4, 0.1, 0.0]])   # relevant 1: tied with item 0 -> counted against: rank 2
    relevant = torch.zeros(3, 4, dtype=torch.bool)
    relevant[0, 0] = relevant[1, 2] = relevant[2, 1] = True
    assert recall_at_k(sims, relevant, [1, 2, 3]) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    relevant[1, 3] = True  # a second relevant item at the top: the best one counts
    assert recall_at_k(sims, relevant, [1])[1] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one relevant"):
        recall_at_k(sims, torch.zeros(3, 4, dtype=torch.bool), [1])


def test_recall_at_k_matches_torchmetrics_hit_rate_without_ties():
    from torchmetrics.retrieval import RetrievalHitRate

    g = torch.Generator().manual_seed(0)
    sims = torch.rand(20, 30, generator=g)
    relevant = torch.rand(20, 30, generator=g) < 0.1
    relevant[torch.arange(20), torch.randint(0, 30, (20,), generator=g)] = True
    ours = recall_at_k(sims, relevant, [1, 5, 10])
    indexes = torch.arange(20)[:, None].expand(20, 30)
    for k in (1, 5, 10):
        ref = RetrievalHitRate(top_k=k)(sims.flatten(), relevant.flatten(), indexes=indexes.flatten())
        assert ours[k] == pytest.approx(float(ref))


def test_retrieval_counts_an_identical_caption_as_correct():
    # pairs: (m0, "a"), (m1, "b"), (m2, "a"); distinct captions "a" -> x axis, "b" -> y axis
    media = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6]])
    text_of = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = retrieval(media, ["a", "b", "a"], text_of, ["a", "b"], ks=(1, 2), curve_k=3)
    # media -> text over the 2 distinct captions: m0 "a" first; m1 ranks "a" (0.8) over "b" (0.6); m2 "a" first
    assert r["media_to_text"] == {"R@1": pytest.approx(2 / 3), "R@2": 1.0, "n": 3, "gallery": 2}
    # text -> media, a query per pair: q0 "a" finds m0 (its twin m2 ties with wrong m1, but m0 counts);
    # q1 "b": m1 (0.6) tied with m2 (0.6, caption "a") -> rank 2; q2 "a": m0 has q2's caption -> a hit
    # (counting only m2 as right, q2 would rank 3: m0 1.0, m1 0.8 tied)
    assert r["text_to_media"] == {"R@1": pytest.approx(2 / 3), "R@2": 1.0, "n": 3, "gallery": 3}
    assert (r["n_pairs"], r["n_distinct_captions"]) == (3, 2)
    assert r["curve"]["k"] == [1, 2, 3] and r["curve"]["text_to_media"] == pytest.approx([2 / 3, 1.0, 1.0])


def test_ranks_in_query_chunks_equal_the_whole_matrix():
    from omnifuse.eval.contrastive import _ranks, query_ranks

    g = torch.Generator().manual_seed(1)
    queries, gallery = torch.randn(7, 4, generator=g), torch.randn(9, 4, generator=g)
    q_label, g_label = torch.tensor([0, 1, 2, 0, 1, 2, 0]), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    whole = query_ranks(queries @ gallery.T, q_label[:, None] == g_label[None, :])
    assert torch.equal(_ranks(queries, gallery, q_label, g_label, chunk=3), whole)


def test_modality_gap_by_hand():
    media = torch.tensor([[2.0, 0.0], [0.0, 3.0]])    # normalised: (1,0), (0,1) -> centroid (.5, .5)
    text = torch.tensor([[-1.0, 0.0], [0.0, -5.0]])   # (-1,0), (0,-1) -> (-.5, -.5)
    assert modality_gap(media, text) == pytest.approx(math.sqrt(2.0))
    assert modality_gap(media, media * 7) == pytest.approx(0.0)


# --------------------------------------------------------------------------- ground truth


def _sample(task, media, meta):
    segs = [{"media": kind, "file": f"{i}.{'png' if kind == 'image' else 'npy'}"} for i, kind in enumerate(media)]
    return Sample("k", "s.tar", task, segs + [{"text": "x", "target": True}], {"split": "test", "qtype": task, **meta})


def obj(shape, color="red", size="big", **kw):
    return {"shape": shape, "color": color, "size": size, "x": 5, "y": 5, **kw}


def test_media_labels_from_world_meta():
    one = _sample("caption", ["image"], {"objects": [obj("circle")]})
    assert media_labels(one, "image", "0.png") == {"color": "red", "shape": "circle", "size": "big"}
    two = _sample("caption", ["image"], {"objects": [obj("circle"), obj("square", "blue")]})
    assert media_labels(two, "image", "0.png") == {}  # colour, shape and size are ambiguous
    digit = _sample("vqa", ["image"], {"objects": [obj("digit", digit=7), obj("star")]})
    assert media_labels(digit, "image", "0.png") == {"digit": "7"}
    lone_digit = _sample("vqa", ["image"], {"objects": [obj("digit", digit=3)]})
    assert media_labels(lone_digit, "image", "0.png") == {"digit": "3"}  # not a shape class
    sign = _sample("vqa", ["image"], {"objects": [obj("ring")], "sign": {"word": "cat"}})
    assert media_labels(sign, "image", "0.png") == {"word": "cat"}
    chart = _sample("vqa", ["image"], {"objects": [], "bars": [{"color": "red", "value": 2}]})
    assert media_labels(chart, "image", "0.png") == {}
    multi = _sample("multi_image", ["image", "image"],
                    {"images": [{"objects": [obj("star", "green", "small")]}, {"objects": [obj("star"), obj("ring")]}]})
    assert media_labels(multi, "image", "0.png") == {"color": "green", "shape": "star", "size": "small"}
    assert media_labels(multi, "image", "1.png") == {}
    clip = _sample("audio_caption", ["audio"], {"events": [{"kind": "hiss", "pitch": "low"}]})
    assert media_labels(clip, "audio", "0.npy") == {"kind": "hiss", "pitch": "low"}
    clips = _sample("audio_qa", ["audio"], {"events": [{"kind": "hiss", "pitch": "low"}] * 2})
    assert media_labels(clips, "audio", "0.npy") == {}


# --------------------------------------------------------------------------- runs


def test_initial_model_is_what_train_py_starts_from(small_world, tmp_path):
    """train.py seeds (seed_everything) and then builds the module: initial_model rebuilds exactly
    those weights from the config and the seed."""
    from omnifuse.training.cli import OmniCLI

    args = ["-c", str(ROOT / "configs/scale/tiny.yaml"), "-c", str(ROOT / "configs/stage/clap.yaml"),
            "--data.world_dir", str(small_world), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--model.model.decoder.dim", "32", "--model.model.decoder.n_layers", "1",
            "--model.model.decoder.n_heads", "2", "--model.model.decoder.n_kv_heads", "1",
            "--encoder.dim", "32", "--encoder.n_layers", "1", "--encoder.n_heads", "2", "--seed_everything", "7"]
    cli = OmniCLI(args=args, run=False)
    torch.manual_seed(123)  # whatever the caller's state: initial_model seeds and restores it
    state = torch.random.get_rng_state()
    init = initial_model(cli.model.cfg, 7)
    assert torch.equal(torch.random.get_rng_state(), state)
    want = cli.model.model.state_dict()
    got = init.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not torch.equal(initial_model(cli.model.cfg, 8).encoder.patch_embed.weight, got["encoder.patch_embed.weight"])


@pytest.fixture(scope="module")
def clip_run(small_world, tmp_path_factory) -> Path:
    return train_stage(small_world, tmp_path_factory.mktemp("contrastive") / "runs" / "clip", "clip")


def test_eval_cli_contrastive_suite_end_to_end(clip_run, tmp_path, capsys):
    from omnifuse.eval.cli import main

    out = tmp_path / "eval"
    main(["--ckpt", str(clip_run), "--suite", "contrastive", "--limit", "60", "--probe-limit", "150", "--out",
          str(out), "--quiet"])
    assert "media_to_text_R@1" in capsys.readouterr().out
    for name in ("results.json", "samples.jsonl", "report.md", "zero_shot_templates.png", "retrieval_recall.png",
                 "modality_gap.png", "learning_curve.png"):
        assert (out / name).exists(), name
    res = json.loads((out / "results.json").read_text())
    assert res["suite"] == "contrastive" and res["fusion"] == "ContrastiveModule" and res["cost"]["params_total"] > 0
    c = res["contrastive"]
    assert c["modality"] == "image" and set(c["zero_shot"]) | set(c["zero_shot_not_run"]) == set(TASKS["image"])
    assert c["zero_shot"], "60 test samples hold single-object scenes"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all({"id", "hash", "split", "task", "template", "truth", "prediction", "correct"} <= set(s) for s in samples)
    for task, r in c["zero_shot"].items():
        assert r["n"] > 0 and r["chance"] == pytest.approx(1 / r["n_classes"])
        assert all(0.0 <= v <= 1.0 for v in [r["ensemble"], r["majority"], *r["templates"].values()])
        assert sum(r["class_counts"].values()) == r["n"]
        for template in [*r["templates"], "ensemble"]:
            recs = [s for s in samples if s["task"] == task and s["template"] == template]
            assert len(recs) == r["n"]
            want = r["ensemble"] if template == "ensemble" else r["templates"][template]
            assert want == pytest.approx(sum(s["correct"] for s in recs) / len(recs))
        swap = r["caption swap"]  # single-object captions, digits and signs name their class once
        recs = [s for s in samples if s["task"] == task and s["template"] == "caption swap"]
        assert swap["n"] == len(recs) == r["n"] - swap["n_skipped"] and swap["n"] > 0
        assert swap["accuracy"] == pytest.approx(sum(s["correct"] for s in recs) / len(recs))
    ret = c["retrieval"]
    for direction in ("media_to_text", "text_to_media"):
        rk = [ret[direction][f"R@{k}"] for k in (1, 5, 10)]
        assert all(0.0 <= v <= 1.0 for v in rk) and rk == sorted(rk) and ret[direction]["n"] == ret["n_pairs"]
    assert ret["n_distinct_captions"] <= ret["n_pairs"] == c["modality_gap"]["n"] == res["cost"]["eval_media"]
    gap = c["modality_gap"]
    assert 0.0 <= gap["trained"] <= 2.0 and 0.0 <= gap["init"] <= 2.0 and gap["init_seed"] == 0
    assert res["headline"]["modality_gap_init"] == gap["init"]
    assert res["unscored"]["n"] > 0  # audio-only and text samples read: counted, with reasons
    from omnifuse.data.datamodule import build_interleaver
    from omnifuse.eval.contrastive import read_items

    probe_items, _ = read_items(Path(res["world_dir"]), "train", build_interleaver(res["world_dir"], 8, "mrope")[1],
                                "image", limit=150)  # --probe-limit 150: the probes fit these media only
    all_items, _ = read_items(Path(res["world_dir"]), "train", build_interleaver(res["world_dir"], 8, "mrope")[1],
                              "image")
    assert any("linear_probe" in r for r in c["zero_shot"].values()) and len(probe_items) < len(all_items)
    for task, r in c["zero_shot"].items():
        if "linear_probe" in r:
            assert r["linear_probe"]["n_train"] == sum(task in it.labels for it in probe_items), task
    report = (out / "report.md").read_text()
    for text in ("## Contrastive encoders", "Template sweep", "### Retrieval", "### Modality gap",
                 "zero_shot_templates.png", "learning_curve.png", "## Samples not scored"):
        assert text in report, text
    assert "POPE" not in report  # the world suite's sections are not listed as "not run"


def test_a_world_lacking_classes_is_counted_not_silent(small_world):
    """A true class missing from the world's vocabulary is counted as unscored with its reason; a
    task whose class list is missing, or that no medium has a label for, is listed as not run."""
    from omnifuse.data.datamodule import build_interleaver
    from omnifuse.eval.contrastive import Item

    model = initial_model(_tiny_config("image"), 0)
    _, il = build_interleaver(small_world, 8, "mrope")
    vocab = json.loads((small_world / "world.json").read_text())["vocabulary"]
    vocab = {**vocab, "colors": [c for c in vocab["colors"] if c != "red"]}
    vocab.pop("words")
    labels = [{"color": "red", "shape": "circle", "size": "big"}, {"color": "blue", "shape": "star", "size": "small"},
              {"color": "green", "shape": "ring", "size": "big"}, {"word": "cat"}]
    items = [Item(f"test/k{i}/0.png", "h", torch.zeros(1, 192), torch.zeros(1, 2, dtype=torch.long), "c", lab)
             for i, lab in enumerate(labels)]
    media = F.normalize(torch.randn(len(items), model.cfg.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    suite = ContrastiveSuite(model, None, il, small_world, progress=False)
    results, not_run, records = suite.zero_shot(items, media, vocab)
    assert results["color"]["n"] == 2 and results["shape"]["n"] == results["size"]["n"] == 3
    assert "red" not in results["color"]["class_counts"]
    assert "'words'" in not_run["word"] and "no image" in not_run["digit"]
    summary = suite.unscored_summary()
    assert summary["n"] == 1 and "true class 'red' is not among the world's colors" in summary["reasons"][0]["reason"]
    assert summary["reasons"][0]["examples"] == ["test/k0/0.png"]
    assert {r["task"] for r in records} == {"color", "shape", "size"}


def test_suites_refuse_the_other_kind_of_run(clip_run):
    from omnifuse.eval.cli import evaluate
    from omnifuse.eval.loading import Run

    native = Run(Path("runs/tiny-native"), {"model": {"class_path": "omnifuse.training.module.NativeLM"}},
                 SimpleNamespace(model=torch.nn.Linear(1, 1)), Path("."), None, None, {}, Path("x.ckpt"))
    with pytest.raises(ValueError, match=r"runs/tiny-native is a NativeLM run .* --suite world"):
        evaluate_run(native, Path("."), {})
    with pytest.raises(ValueError, match="contrastive stage run .* --suite contrastive"):
        evaluate(str(clip_run), suite="world", progress=False)


def _tiny_config(modality: str):
    from omnifuse.model.config import DecoderConfig
    from omnifuse.model.encoders import ContrastiveConfig, EncoderSize

    return ContrastiveConfig(decoder=DecoderConfig(vocab_size=768, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                                   ffn_hidden=64, tie_embeddings=True),
                             encoder=EncoderSize(32, 1, 2, 64), modality=modality)


def test_audio_tasks_on_an_untrained_clap(small_world):
    """The CLAP path without training: kind and pitch of single-event clips, retrieval over clips."""
    from omnifuse.data.datamodule import build_interleaver

    cfg = _tiny_config("audio")
    model = initial_model(cfg, 0)
    _, il = build_interleaver(small_world, 8, "mrope")
    vocab = json.loads((small_world / "world.json").read_text())["vocabulary"]
    res = ContrastiveSuite(model, initial_model(cfg, 1), il, small_world, progress=False).run(vocab, seed=1)
    c = res["contrastive"]
    assert set(c["zero_shot"]) == {"kind", "pitch"} and c["modality"] == "audio"
    assert c["zero_shot"]["kind"]["n"] == c["zero_shot"]["pitch"]["n"] > 0
    assert c["zero_shot"]["kind"]["n_classes"] == len(vocab["sound_kinds"])
    probe = c["zero_shot"]["kind"]["linear_probe"]  # fitted on the world's train split, scored on every test clip
    assert probe["split"] == "train" and probe["n"] == c["zero_shot"]["kind"]["n"] and probe["n_train"] > probe["n"]
    assert 0.0 <= probe["accuracy"] <= 1.0
    reasons = {r["reason"] for r in res["unscored"]["reasons"]}
    assert "no audio medium" in reasons
    assert c["retrieval"]["n_pairs"] == res["cost"]["eval_media"] > 0
