"""Reports: files are written and the tables carry the numbers given."""

import numpy as np
import pytest

from omnifuse.eval.report import compare_runs, load_results, save_results, write_report
from omnifuse.eval.stats import paired_bootstrap

WORLD = {"hash": "0123456789abcdef", "preset": "tiny", "seed": 0}


def _sample(split, i, correct, qtype="color"):
    return {"id": f"{split}/{i:04d}", "hash": f"h-{split}-{i}", "split": split, "correct": bool(correct), "qtype": qtype}


def _results(name, fusion, seed, acc, flops, correct, cogent=(), pope_adv=()):
    qtypes = ["color", "count", "shape"]
    return {
        "name": name, "fusion": fusion, "iid_split": "test", "world": dict(WORLD),
        "config": {"seed_everything": seed, "model": {"fusion": fusion},
                   "trainer": {"default_root_dir": f"runs/{name}"}},
        "headline": {"accuracy": acc, "cogent_accuracy": 0.5, "pope_adversarial_accuracy": 0.7,
                     "pope_adversarial_f1": 0.8125, "chair_i": 0.125},
        "by_qtype": {"color": {"accuracy": 0.9375, "n": 16}, "count": {"accuracy": 0.4375, "n": 16}},
        "pope": {"random": {"accuracy": 0.85, "precision": 0.9, "recall": 0.8, "f1": 0.8471,
                            "yes_ratio": 0.4444, "n": 90, "unparsed": 2},
                 "adversarial": {"accuracy": 0.7, "precision": 0.65, "recall": 0.9, "f1": 0.8125,
                                 "yes_ratio": 0.69, "n": 90, "unparsed": 0}},
        "captions": {"chair_i": 0.125, "chair_s": 0.3, "recall": 0.66, "bleu": 0.4321, "n": 20},
        "probes": {"blind": {"accuracy": 0.3125, "n": 16},
                   "swapped": {"change_rate": 0.55, "correct_change_rate": 0.45, "n_pairs": 20}},
        "splits": {"iid": {"accuracy": 0.75, "n": 40}, "cogent": {"accuracy": 0.5, "n": 40}},
        "text": {"perplexity": 12.34, "n_tokens": 1000},
        "cost": {"params_total": 1234567, "train_flops": flops, "visual_slots_per_image": 36},
        "samples": ([_sample("test", i, c, qtypes[i % 3]) for i, c in enumerate(correct)]
                    + [_sample("cogent", i, c) for i, c in enumerate(cogent)]
                    + [_sample("pope-adversarial", i, c, "pope") for i, c in enumerate(pope_adv)]),
    }


def test_write_report(tmp_path):
    r = _results("native-s0", "native", 0, 0.6875, 3.2e12, [1, 0, 1])
    del r["text"]
    headline = write_report(r, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "0.6875" in headline and "native-s0" in headline and "3.2e+12" in headline
    assert headline in md
    for number in ["0.9375", "0.4375", "0.8471", "0.4444", "0.4321", "0.3125", "0.55", "36", "1234567"]:
        assert number in md, number
    assert "| random |" in md and "| adversarial |" in md
    assert "unmatched difference (cogent − iid over all of iid's question types, a different task mix): -0.25" in md
    assert "Text-only" in md.split("## Not run")[1]
    png = tmp_path / "accuracy_by_qtype.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_compositional_blind_and_unscored(tmp_path):
    r = _results("a", "native", 0, 0.5, 1e12, [1])
    r["compositional"] = {"cogent_accuracy": 0.372, "iid_matched_accuracy": 0.601, "gap": 0.372 - 0.601,
                          "weights": {"color": 0.6, "shape": 0.4}, "unmatched_qtypes": [], "n_iid": 222, "n_cogent": 401}
    r["by_qtype"]["color"].update(blind_rank_accuracy=0.25, blind_generated_accuracy=0.0, accuracy_minus_blind=0.6875)
    r["captions_cogent"] = {"chair_i": 0.75, "chair_s": 0.5, "recall": 0.25, "bleu": 0.125, "n": 8, "bleu_n": 8}
    r["unscored"] = {"n": 3, "reasons": [{"split": "test", "reason": "unknown task 'VQA'", "n": 3,
                                          "examples": ["test/a", "test/b", "test/c"]}]}
    write_report(r, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert ("compositional gap (cogent − iid on cogent's question types, weighted as in cogent): -0.229 (cogent 0.372 "
            "on 401 questions vs iid 0.601 on 222; weights: color 0.60, shape 0.40)") in md
    assert "| color | 0.9375 | 0.25 | 0 | 0.6875 | 16 |" in md  # accuracy, blind ranked / generated, gap, n
    assert "| cogent | 0.75 | 0.5 | 0.25 | 0.125 |" in md
    unscored = md.split("## Samples not scored")[1]
    assert "3 samples read and not scored" in unscored and "| test | unknown task 'VQA' | 3 | test/a, test/b, test/c |" in unscored


def test_save_load_roundtrip(tmp_path):
    r = _results("a", "native", 0, 0.5, 1e12, [1, 0])
    save_results(r, tmp_path)
    assert "samples" not in (tmp_path / "results.json").read_text()
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    assert load_results(tmp_path) == r


def _four_runs(rng):
    runs = []
    for s in range(2):
        runs.append(_results(f"native-s{s}", "native", s, 0.8 + 0.01 * s, 1e13, rng.random(200) < 0.85,
                             cogent=rng.random(60) < 0.6, pope_adv=rng.random(90) < 0.7))
    for s in range(2):
        runs.append(_results(f"llava-s{s}", "llava", s, 0.5 + 0.01 * s, 3e13, rng.random(200) < 0.5,
                             cogent=rng.random(60) < 0.55, pope_adv=rng.random(90) < 0.7))
    return runs


def _boot_rows(text):
    boot = text.split("## Paired bootstrap")[1].split("## Plots")[0]
    return {line.strip("| ").split(" | ")[0]: line.strip("| ").split(" | ") for line in boot.splitlines()
            if line.startswith("| ") and not line.startswith("| metric")}


def test_compare_runs(tmp_path):
    runs = _four_runs(np.random.default_rng(0))
    text = compare_runs(runs, tmp_path, n_boot=2000)
    assert (tmp_path / "compare.md").read_text() == text
    runs_table = text.split("## Groups")[0]
    for name in ["native-s0", "native-s1", "llava-s0", "llava-s1", "0.81", "0.51", "1e+13", "3e+13"]:
        assert name in runs_table, name
    groups_table = text.split("## Groups")[1].split("## Paired")[0]
    # mean of 0.80, 0.81 and its t-interval: 12.706 * 0.00707 / sqrt(2) = 0.06353
    assert "| native | 2 | 0.805 ± 0.06353 |" in groups_table
    # one test per metric, each on its own samples, labelled with metric and n
    rows = _boot_rows(text)
    assert set(rows) == {"accuracy", "cogent_accuracy", "pope_adversarial_accuracy"}
    for metric, split, n in [("accuracy", "test", 200), ("cogent_accuracy", "cogent", 60),
                             ("pope_adversarial_accuracy", "pope-adversarial", 90)]:
        metric_, a, b, n_, diff, ci, p = rows[metric]
        assert (a, b, int(n_)) == ("native", "llava", n)

        def group_scores(members):  # per-sample mean over the group's seeds, in id order
            per = [[s["correct"] for s in r["samples"] if s["split"] == split] for r in members]
            return np.mean(np.asarray(per, dtype=float), axis=0)

        ref = paired_bootstrap(group_scores(runs[:2]), group_scores(runs[2:]), n_boot=2000, seed=0)
        assert float(diff) == pytest.approx(ref["diff"], abs=5e-4) and float(p) == pytest.approx(ref["p_value"], abs=5e-4)
        assert ci == f"[{ref['ci_low']:.4g}, {ref['ci_high']:.4g}]"
    assert float(rows["accuracy"][-1]) < 0.01
    # the headline metric is stated first
    assert "- **accuracy** (n = 200): native − llava = " in text.split("## Paired bootstrap")[1].split("| metric")[0]
    for png in ["compare_by_qtype.png", "accuracy_vs_flops.png"]:
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_compare_metric_chooses_the_headline_test(tmp_path):
    runs = _four_runs(np.random.default_rng(1))
    text = compare_runs(runs, tmp_path, metric="cogent_accuracy", n_boot=500)
    head = text.split("## Paired bootstrap")[1].split("| metric")[0]
    assert "- **cogent_accuracy** (n = 60): native − llava" in head and "**accuracy**" not in head
    assert list(_boot_rows(text))[0] == "cogent_accuracy"
    assert (tmp_path / "cogent_accuracy_vs_flops.png").exists()
    text = compare_runs(runs, tmp_path, metric="chair_i", n_boot=100)
    assert "Headline metric `chair_i` is not a mean of per-sample scores: no paired test for it" in text
    with pytest.raises(ValueError, match="'bogus' is not a headline metric.*accuracy"):
        compare_runs(runs, tmp_path, metric="bogus")


def test_compare_refuses_to_pair_different_samples(tmp_path):
    runs = _four_runs(np.random.default_rng(2))
    runs[3]["samples"][5]["hash"] = "other-content"  # llava-s1 saw another sample under test/0005
    with pytest.raises(ValueError, match=r"accuracy: sample 'test/0005' has different content in llava-s0 .*llava-s1"):
        compare_runs(runs, tmp_path, n_boot=100)
    runs = _four_runs(np.random.default_rng(2))
    for r in runs[2:]:
        r["samples"][7]["hash"] = "other-content"  # the llava group, both seeds: differs from native
    with pytest.raises(ValueError, match=r"sample 'test/0007' has different content in native \(hash h-test-7\)"):
        compare_runs(runs, tmp_path, n_boot=100)
    runs = _four_runs(np.random.default_rng(2))
    del runs[0]["samples"][0]["hash"]
    with pytest.raises(ValueError, match="no content hash"):
        compare_runs(runs, tmp_path, n_boot=100)


def test_compare_keeps_runs_of_different_worlds_apart(tmp_path):
    runs = _four_runs(np.random.default_rng(3))[:2]  # two seeds of native...
    runs[1]["world"] = {"hash": "fedcba9876543210", "preset": "tiny", "seed": 1}  # ...but of another world
    for s in runs[1]["samples"]:
        s["hash"] += "-w1"
    with pytest.raises(ValueError, match="different content"):
        compare_runs(runs, tmp_path, n_boot=100)
    for r in runs:
        r["samples"] = []
    text = compare_runs(runs, tmp_path, n_boot=100)
    assert "2 runs in 2 groups" in text
    assert "native world=01234567" in text and "native world=fedcba98" in text


def test_compare_runs_without_samples(tmp_path):
    a = _results("a", "native", 0, 0.5, 1e12, [])
    b = _results("b", "llava", 0, 0.6, 2e12, [])
    text = compare_runs([a, b], tmp_path, n_boot=100)
    assert "fewer than two groups" in text and "| native | 1 | 0.5 |" in text
