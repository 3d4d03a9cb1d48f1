"""Reports: files are written and the tables carry the numbers given."""

import numpy as np

from omnifuse.eval.report import compare_runs, load_results, save_results, write_report


def _results(name, fusion, seed, acc, flops, correct):
    qtypes = ["color", "count", "shape"]
    return {
        "name": name, "fusion": fusion,
        "config": {"seed_everything": seed, "model": {"fusion": fusion},
                   "trainer": {"default_root_dir": f"runs/{name}"}},
        "headline": {"accuracy": acc, "pope_adversarial_f1": 0.8125, "chair_i": 0.125},
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
        "samples": [{"id": f"test/{i:04d}", "correct": bool(c), "qtype": qtypes[i % 3]}
                    for i, c in enumerate(correct)],
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
    assert "compositional gap (cogent − iid): -0.25" in md
    assert "Text-only" in md.split("## Not run")[1]
    png = tmp_path / "accuracy_by_qtype.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_load_roundtrip(tmp_path):
    r = _results("a", "native", 0, 0.5, 1e12, [1, 0])
    save_results(r, tmp_path)
    assert "samples" not in (tmp_path / "results.json").read_text()
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    assert load_results(tmp_path) == r


def test_compare_runs(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for s in range(2):
        runs.append(_results(f"native-s{s}", "native", s, 0.8 + 0.01 * s, 1e13, rng.random(200) < 0.85))
    for s in range(2):
        runs.append(_results(f"llava-s{s}", "llava", s, 0.5 + 0.01 * s, 3e13, rng.random(200) < 0.5))
    text = compare_runs(runs, tmp_path, n_boot=2000)
    assert (tmp_path / "compare.md").read_text() == text
    runs_table = text.split("## Groups")[0]
    for name in ["native-s0", "native-s1", "llava-s0", "llava-s1", "0.81", "0.51", "1e+13", "3e+13"]:
        assert name in runs_table, name
    groups_table = text.split("## Groups")[1].split("## Paired")[0]
    # mean of 0.80, 0.81 and its t-interval: 12.706 * 0.00707 / sqrt(2) = 0.06353
    assert "| native | 2 | 0.805 ± 0.06353 |" in groups_table
    boot = text.split("## Paired bootstrap")[1].split("## Plots")[0]
    row = next(line for line in boot.splitlines() if line.startswith("| native | llava |"))
    p = float(row.strip("| ").split(" | ")[-1])
    assert p < 0.01
    for png in ["compare_by_qtype.png", "accuracy_vs_flops.png"]:
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_compare_runs_without_samples(tmp_path):
    a = _results("a", "native", 0, 0.5, 1e12, [])
    b = _results("b", "llava", 0, 0.6, 2e12, [])
    text = compare_runs([a, b], tmp_path, n_boot=100)
    assert "fewer than two groups" in text and "| native | 1 | 0.5 |" in text
