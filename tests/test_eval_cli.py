"""eval.py on a checkpoint made by train.py, eval.py compare, and the world made on first use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SMALL_COUNTS, subprocess_env, tiny_train_args
from omnifuse.eval.cli import evaluate, main as eval_main
from omnifuse.eval.report import fmt
from omnifuse.eval.stats import paired_bootstrap


def train_relative(world, launch_dir, name, *extra):
    """train.py run from ``launch_dir`` with relative world and run paths, as a user types them."""
    (launch_dir / "worlds").mkdir(parents=True, exist_ok=True)
    if not (launch_dir / "worlds" / "w").exists():
        (launch_dir / "worlds" / "w").symlink_to(world, target_is_directory=True)
    args = tiny_train_args(Path("worlds/w"), Path("runs") / name, "--trainer.max_steps", "3", *extra)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=launch_dir,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return launch_dir / "runs" / name


@pytest.fixture(scope="module")
def launch_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def trained_run(small_world, launch_dir):
    return train_relative(small_world, launch_dir, "native")


def test_eval_writes_results_samples_report_and_plots(trained_run, tmp_path):
    out = tmp_path / "eval"
    results = evaluate(str(trained_run), limit=12, out=str(out), progress=False)
    for name in ("results.json", "samples.jsonl", "captions.jsonl", "report.md", "accuracy_by_qtype.png", "learning_curve.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["fusion"] == "NativeLM" and saved["cost"]["params_total"] > 0
    assert saved["cost"]["train_flops"] == pytest.approx(json.loads((trained_run / "compute.json").read_text())["train_flops"])
    assert set(saved["pope"]) == {"random", "popular", "adversarial"}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all({"id", "prediction", "reference", "correct"} <= set(s) for s in samples)
    qa = [s for s in samples if s["id"].startswith("test/")]
    assert saved["splits"]["iid"]["accuracy"] == pytest.approx(sum(s["correct"] for s in qa) / len(qa))
    report = (out / "report.md").read_text()
    assert "## Headline" in report and "## POPE" in report and "learning_curve.png" in report


@pytest.fixture(scope="module")
def other_run(small_world, launch_dir):
    """A genuinely different arm: same world, another learning rate (a group of its own) and another
    initialisation (seed_everything, which grouping ignores), so that its answers differ from
    trained_run's and the paired bootstrap has real differences to test."""
    return train_relative(small_world, launch_dir, "native-lr", "--model.optim.lr", "0.01", "--seed_everything", "1")


@pytest.mark.slow
def test_eval_cli_and_compare(trained_run, other_run, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    eval_main(["--ckpt", str(trained_run), "--limit", "8", "--out", str(a), "--quiet"])
    printed = capsys.readouterr().out
    assert "| run | fusion |" in printed and "accuracy" in printed
    eval_main(["--ckpt", str(other_run), "--limit", "8", "--out", str(b), "--quiet"])
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["world"] == rb["world"] and len(ra["world"]["hash"]) == 16  # one world: comparable
    eval_main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--n-boot", "200"])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "2 runs in 2 groups" in md and "lr=0.01" in md
    assert (tmp_path / "cmp" / "compare_by_qtype.png").exists()
    # a paired test per metric, on that metric's own samples: n = the samples both runs scored there
    samples = [json.loads(line) for line in (a / "samples.jsonl").read_text().splitlines()]
    boot = md.split("## Paired bootstrap")[1]
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in boot.splitlines()
            if line.startswith("| ") and not line.startswith("| metric")}
    want = {"accuracy": "test", "accuracy_rank": "test", "cogent_accuracy": "cogent", "pope_random_accuracy": "pope-random",
            "pope_popular_accuracy": "pope-popular", "pope_adversarial_accuracy": "pope-adversarial"}
    assert set(rows) == set(want)
    samples_b = {s["id"]: s for s in map(json.loads, (b / "samples.jsonl").read_text().splitlines())}
    assert any(s["prediction"] != samples_b[s["id"]]["prediction"] for s in samples), "the two runs answer alike"
    nonzero = []
    for metric, split in want.items():
        field = "correct_rank" if metric == "accuracy_rank" else "correct"
        mine = {s["id"]: s for s in samples if s["split"] == split}
        ids = sorted(mine)  # compare pairs the ids both runs scored, in sorted order
        assert ids and int(rows[metric][3]) == len(ids), metric
        assert all(samples_b[i]["hash"] == mine[i]["hash"] for i in ids)  # the same samples in both runs
        # the table's numbers are the bootstrap of these two runs' own per-sample scores, paired by id
        score_a = [float(mine[i][field]) for i in ids]
        score_b = [float(samples_b[i][field]) for i in ids]
        ref = paired_bootstrap(score_a, score_b, n_boot=200, seed=0)
        _, _, _, _, diff, ci, p = rows[metric]
        assert float(diff) == pytest.approx(ref["diff"], abs=5e-4), metric
        assert float(p) == pytest.approx(ref["p_value"], abs=5e-4) and 0 < ref["p_value"] <= 1, metric
        assert ci == f"[{fmt(ref['ci_low'])}, {fmt(ref['ci_high'])}]", metric
        nonzero += [metric] * (ref["diff"] != 0)
    assert nonzero, "no metric differs between the two runs: the bootstrap tested nothing"
    assert "- **accuracy** (n = " in boot


def test_eval_of_a_folder_that_is_not_a_run_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        evaluate(str(tmp_path), progress=False)


def test_training_generates_a_missing_world(tmp_path, monkeypatch):
    from omnifuse.data import world
    from omnifuse.data.datamodule import ensure_world

    monkeypatch.setitem(world.PRESETS, "tiny", dict(SMALL_COUNTS, train=60))
    out = ensure_world(tmp_path / "fresh", preset="tiny", seed=0, vocab_size=512)
    info = json.loads((out / "world.json").read_text())
    assert info["settings"]["preset"] == "tiny"
    assert (out / "tokenizer.model").exists() and list((out / "train").glob("*.tar"))


def test_eval_on_other_shards_skips_the_splits_they_lack(trained_run, small_world, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_world / "test", data / "test")
    results = evaluate(str(trained_run), data=str(data), limit=6, out=str(tmp_path / "eval"), progress=False)
    assert "cogent" not in results["splits"] and not results["pope"]
    assert results["splits"]["iid"]["n"] > 0
    assert "POPE" in (tmp_path / "eval" / "report.md").read_text().split("## Not run")[1]


def test_data_folder_is_the_split_and_meta_split_must_agree(trained_run, small_world, tmp_path, capsys):
    """--data DIR: DIR/test/ is required (an error naming the folder), and a sample whose meta.split
    names another split than its folder is an error naming shard, key and field; --help says so."""
    import shutil

    from omnifuse.data.samples import BadSample

    only_cogent = tmp_path / "only-cogent"
    shutil.copytree(small_world / "cogent", only_cogent / "cogent")
    with pytest.raises(FileNotFoundError, match=rf"no shards in {only_cogent / 'test'}"):
        evaluate(str(trained_run), data=str(only_cogent), out=str(tmp_path / "e0"), progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(small_world / "val", moved / "test")  # validation shards put in the test folder
    shard = sorted((moved / "test").glob("*.tar"))[0]
    with pytest.raises(BadSample, match=rf"{shard}.*field 'json.meta.split'.*says 'val' but the sample is in the "
                                        r"'test' folder"):
        evaluate(str(trained_run), data=str(moved), out=str(tmp_path / "e1"), progress=False)
    with pytest.raises(SystemExit):
        eval_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for phrase in ("DIR/<split>/*.tar for the --split folder (required)", "DIR/cogent/",
                   "DIR/pope-{random,popular,adversarial}/", "the folder name is the split",
                   "meta.split, when present, must agree with it"):
        assert phrase in help_text, phrase


def test_eval_of_a_relative_run_from_another_directory(trained_run, small_world, tmp_path, monkeypatch):
    """config.yaml says data.world_dir: worlds/w (relative to where train.py ran); evaluating from
    elsewhere, with a relative --ckpt, finds the world through RUN/launch.json."""
    import os

    assert yaml_of(trained_run)["data"]["world_dir"] == "worlds/w"
    monkeypatch.chdir(tmp_path)
    eval_main(["--ckpt", os.path.relpath(trained_run, tmp_path), "--limit", "4", "--out", "out", "--no-pope",
               "--no-cogent", "--quiet"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert Path(saved["world_dir"]).resolve() == small_world.resolve()


def yaml_of(run):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def test_unknown_tasks_in_other_shards(trained_run, small_world, tmp_path):
    """The issue's case: a shard with 2 of 4 samples tagged "VQA" is an error naming shard and key;
    with --allow-unknown-tasks both are counted, with the reason, in results.json and report.md."""
    import webdataset as wds

    from omnifuse.data.samples import BadSample

    raw = []
    for sample in wds.WebDataset(sorted(str(p) for p in (small_world / "test").glob("*.tar")), shardshuffle=False):
        doc = json.loads(sample["json"])
        if doc["task"] == "vqa":
            raw.append({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
        if len(raw) == 4:
            break
    for r in raw[1::2]:
        doc = json.loads(r["json"])
        doc["task"] = "VQA"
        r["json"] = json.dumps(doc).encode()
    (tmp_path / "data" / "test").mkdir(parents=True)
    shard = tmp_path / "data" / "test" / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for r in raw:
            sink.write(r)
    with pytest.raises(BadSample, match=rf"{shard}.*key '{raw[1]['__key__']}', field 'json.task'.*unknown task 'VQA'"):
        evaluate(str(trained_run), data=str(tmp_path / "data"), out=str(tmp_path / "e1"), progress=False)
    eval_main(["--ckpt", str(trained_run), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "e2"),
               "--allow-unknown-tasks", "--quiet"])
    saved = json.loads((tmp_path / "e2" / "results.json").read_text())
    assert saved["splits"]["iid"]["n"] == 2
    assert saved["unscored"] == {"n": 2, "reasons": [{"split": "test", "reason": "unknown task 'VQA'", "n": 2,
                                                      "examples": [f"test/{r['__key__']}" for r in raw[1::2]]}]}
    assert "| test | unknown task 'VQA' | 2 |" in (tmp_path / "e2" / "report.md").read_text()
