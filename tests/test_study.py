"""The study (issue 11): budget -> steps for every arm under both accountings, the plan, the report,
and a study killed with SIGKILL and started again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, subprocess_env
from omnifuse.study.budget import allocate, pretraining_flops, steps_for
from omnifuse.study.config import ALL_IN, FUSION_STAGE, StudyConfigError, select_arms, study_from_dict
from omnifuse.study.plan import count_train_runs, planned_arm_runs, stage_run
from omnifuse.study.runner import curve_checkpoints, resume_checkpoint, train_state

FUSION = "configs/fusion/native.yaml"  # any existing YAML: the plan tests never train


def study_dict(**over) -> dict:
    """A study with the three arm shapes: native (no parts), a two-phase bolt-on arm sharing its budget
    0.25 / 0.75, a one-phase bolt-on arm; both bolt-on arms use the three stages."""
    parts = {"model.lm_ckpt": "lm", "model.image_encoder_ckpt": "clip", "model.audio_encoder_ckpt": "clap"}
    d = {
        "name": "t", "out_dir": "runs/t", "scale": "configs/scale/tiny.yaml", "world_dir": "worlds/tiny",
        "seeds": [0, 1], "budget_flops": 1.2e12, "accountings": [FUSION_STAGE, ALL_IN],
        "stages": {s: {"configs": [FUSION], "steps": 10} for s in ("lm", "clip", "clap")},
        "arms": [
            {"name": "native", "phases": [{"configs": [FUSION]}]},
            {"name": "llava", "parts": parts, "phases": [
                {"name": "stage1", "configs": [FUSION], "budget_fraction": 0.25},
                {"name": "stage2", "configs": [FUSION], "budget_fraction": 0.75, "init_from_previous": "model.init_from"},
            ]},
            {"name": "flamingo", "parts": parts, "phases": [{"configs": [FUSION]}]},
        ],
    }
    d.update(over)
    return d


FPS = {"native": {"fusion": 1e10}, "llava": {"stage1": 3e9, "stage2": 1.5e10}, "flamingo": {"fusion": 8e9}}
STAGE_FLOPS = {"lm": 2e11, "clip": 3e11, "clap": 1e11}  # 6e11 pretraining for an arm using all three


def allocations(cfg, stage_flops=STAGE_FLOPS, fps=FPS):
    return {a.name: {acc: allocate(a, acc, cfg.budget_flops, stage_flops, fps[a.name]) for acc in cfg.accountings}
            for a in cfg.arms}


# --------------------------------------------------------------------------- budget -> steps


def test_steps_for_rounds_and_never_goes_below_one():
    assert steps_for(1e12, 1e10) == 100
    assert steps_for(1.26e11, 1e10) == 13  # 12.6 -> 13
    assert steps_for(1.24e11, 1e10) == 12
    assert steps_for(1e3, 1e10) == 1  # less than a step still trains one
    with pytest.raises(ValueError):
        steps_for(1e12, 0.0)
    with pytest.raises(ValueError):
        steps_for(0.0, 1e10)


def test_budget_to_steps_for_every_arm_under_both_accountings():
    cfg = study_from_dict(study_dict(), ROOT)
    al = allocations(cfg)
    # fusion-stage: every arm's multimodal stage(s) spend B = 1.2e12; pretraining is free
    assert al["native"][FUSION_STAGE].steps == (120,)  # 1.2e12 / 1e10
    assert al["llava"][FUSION_STAGE].steps == (100, 60)  # 0.25 * 1.2e12 / 3e9, 0.75 * 1.2e12 / 1.5e10
    assert al["flamingo"][FUSION_STAGE].steps == (150,)  # 1.2e12 / 8e9
    assert al["llava"][FUSION_STAGE].pretraining_flops == 0.0
    # all-in: the bolt-on arms get B - (2e11 + 3e11 + 1e11) = 6e11; native, without parts, all of B
    assert al["native"][ALL_IN].steps == (120,)
    assert al["llava"][ALL_IN].pretraining_flops == pytest.approx(6e11)
    assert al["llava"][ALL_IN].fusion_budget == pytest.approx(6e11)
    assert al["llava"][ALL_IN].steps == (50, 30)  # 0.25 * 6e11 / 3e9, 0.75 * 6e11 / 1.5e10
    assert al["flamingo"][ALL_IN].steps == (75,)  # 6e11 / 8e9
    # the phases' budgets add up to the arm's
    assert sum(p.flops for p in al["llava"][ALL_IN].phases) == pytest.approx(6e11)


def test_a_stage_two_parts_come_from_is_charged_once():
    cfg = study_dict()
    cfg["arms"][2]["parts"] = {"model.lm_ckpt": "lm", "model.other_lm_ckpt": "lm"}
    arm = study_from_dict(cfg, ROOT).arm("flamingo")
    assert pretraining_flops(arm, STAGE_FLOPS) == 2e11


@pytest.mark.parametrize("budget", [6e11, 5e11])  # pretraining equal to, or above, the budget
def test_all_in_with_nothing_left_is_reported_not_trained(budget):
    cfg = study_from_dict(study_dict(budget_flops=budget), ROOT)
    al = allocations(cfg)
    for arm in ("llava", "flamingo"):
        a = al[arm][ALL_IN]
        assert not a.feasible and a.phases == () and a.fusion_budget <= 0
        assert "nothing is left for the fusion stage" in a.note and f"{budget:.4g}" in a.note
        assert al[arm][FUSION_STAGE].feasible  # the other accounting still trains them
    runs = planned_arm_runs(cfg, 0, al)
    assert not [r for r in runs if "@all_in" in r.rel]
    assert {r.rel for r in runs} == {"native", "llava@fusion_stage.stage1", "llava@fusion_stage.stage2",
                                     "flamingo@fusion_stage"}


# --------------------------------------------------------------------------- the plan


def test_plan_shares_stages_per_seed_and_native_across_accountings():
    cfg = study_from_dict(study_dict(), ROOT)
    assert cfg.needed_stages() == ["lm", "clip", "clap"]
    for seed in cfg.seeds:
        stages = [stage_run(cfg, seed, s) for s in cfg.needed_stages()]
        assert [r.key for r in stages] == [f"seed{seed}/stages/{s}" for s in ("lm", "clip", "clap")]
        runs = {r.rel: r for r in planned_arm_runs(cfg, seed, allocations(cfg))}
        # native: one run serves both tables; the bolt-on arms one chain per accounting
        assert runs["native"].accountings == (FUSION_STAGE, ALL_IN)
        assert sorted(runs) == sorted(["native", "llava@fusion_stage.stage1", "llava@fusion_stage.stage2",
                                       "llava@all_in.stage1", "llava@all_in.stage2", "flamingo@fusion_stage",
                                       "flamingo@all_in"])
        for rel, run in runs.items():
            args = run.train_args(cfg.scale, cfg.world_dir)
            assert args[args.index("--seed_everything") + 1] == str(seed)
            assert args[args.index("--data.seed") + 1] == str(seed)
            assert args[args.index("--trainer.default_root_dir") + 1] == rel  # relative to the seed folder
            assert run.cwd(cfg.out_dir) == Path(cfg.out_dir) / f"seed{seed}"
            if run.arm != "native":  # every bolt-on run reuses the seed's one copy of each part
                assert args[args.index("--model.lm_ckpt") + 1] == "stages/lm"
                assert args[args.index("--model.image_encoder_ckpt") + 1] == "stages/clip"
        stage2 = runs["llava@all_in.stage2"].train_args(cfg.scale, cfg.world_dir)
        assert stage2[stage2.index("--model.init_from") + 1] == "llava@all_in.stage1"
        assert runs["llava@all_in.stage2"].previous == "llava@all_in.stage1" and runs["llava@all_in.stage2"].final
        assert not runs["llava@all_in.stage1"].final
        assert runs["llava@all_in.stage1"].steps == 50 and runs["llava@fusion_stage.stage1"].steps == 100
    # per seed: 3 stages + native + llava 2 phases x 2 accountings + flamingo x 2
    assert count_train_runs(cfg) == 2 * (3 + 1 + 4 + 2)


def test_a_cheaper_ablation_row_runs_its_own_seeds_and_accountings():
    d = study_dict(seeds=[0, 1, 2])
    d["arms"].append({"name": "flamingo-every2", "parts": d["arms"][2]["parts"], "phases": [{"configs": [FUSION]}],
                      "ablation": True, "compare_to": "flamingo", "seeds": [0], "accountings": [FUSION_STAGE],
                      "curve": False})
    cfg = study_from_dict(d, ROOT)
    fps = {**FPS, "flamingo-every2": {"fusion": 8e9}}
    ablation = cfg.arm("flamingo-every2")
    for seed in cfg.seeds:
        al = {a.name: {acc: allocate(a, acc, cfg.budget_flops, STAGE_FLOPS, fps[a.name])
                       for acc in cfg.accountings_of(a)} for a in cfg.arms_in(seed)}
        rels = {r.rel for r in planned_arm_runs(cfg, seed, al)}
        assert ("flamingo-every2@fusion_stage" in rels) == (seed == 0)
        assert "flamingo-every2@all_in" not in rels
    assert count_train_runs(cfg) == 3 * (3 + 1 + 4 + 2) + 1
    assert cfg.arms_in(1) == [cfg.arm("native"), cfg.arm("llava"), cfg.arm("flamingo")] and not ablation.curve
    with pytest.raises(StudyConfigError, match="first"):  # FLOPs per step are measured on the first seed
        d["arms"][-1]["seeds"] = [1]
        study_from_dict(d, ROOT)
    with pytest.raises(StudyConfigError, match="baseline"):  # the baseline runs everything
        d["arms"][-1]["seeds"] = [0]
        d["arms"][0]["seeds"] = [0]
        study_from_dict(d, ROOT)


def test_study_config_checks_itself():
    with pytest.raises(StudyConfigError, match="sum to 1"):
        d = study_dict()
        d["arms"][1]["phases"][0]["budget_fraction"] = 0.5
        study_from_dict(d, ROOT)
    with pytest.raises(StudyConfigError, match="no stage 'clap'"):
        d = study_dict()
        del d["stages"]["clap"]
        study_from_dict(d, ROOT)
    with pytest.raises(StudyConfigError, match="seeds"):
        study_from_dict(study_dict(seeds=[]), ROOT)
    with pytest.raises(StudyConfigError, match="unknown key"):
        study_from_dict(study_dict(budget=1.0), ROOT)
    with pytest.raises(StudyConfigError, match="baseline"):
        study_from_dict(study_dict(baseline="nope"), ROOT)
    with pytest.raises(StudyConfigError, match="accountings"):
        study_from_dict(study_dict(accountings=["both"]), ROOT)
    with pytest.raises(StudyConfigError, match="first phase"):
        d = study_dict()
        d["arms"][1]["phases"][0]["init_from_previous"] = "model.init_from"
        study_from_dict(d, ROOT)
    with pytest.raises(StudyConfigError, match="not found"):
        study_from_dict(study_dict(scale="configs/scale/nope.yaml"), ROOT)
    assert study_from_dict(study_dict(budget_flops="2.0e9"), ROOT).budget_flops == 2e9  # YAML reads 2.0e9 as text
    cfg = select_arms(study_from_dict(study_dict(), ROOT), ["native", "flamingo"])
    assert [a.name for a in cfg.arms] == ["native", "flamingo"]
    with pytest.raises(StudyConfigError, match="baseline"):
        select_arms(cfg, ["flamingo"])


@pytest.mark.parametrize("name", ["smoke", "tiny"])
def test_shipped_study_configs_build(name):
    cfg = study_from_dict(yaml.safe_load((ROOT / f"configs/study/{name}.yaml").read_text()), ROOT)
    assert cfg.baseline == "native"
    if name == "tiny":
        assert len(cfg.seeds) >= 3


def test_curve_checkpoints_are_evenly_spaced_and_end_at_the_last(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (3, 6, 9):
        (ckpts / f"step-{step:06d}.ckpt").touch()
    (ckpts / "last.ckpt").touch()  # step 10: max_steps is not a multiple of checkpoint_every
    pick = lambda k: [s for s, _ in curve_checkpoints(tmp_path, 10, k)]  # noqa: E731
    assert pick(0) == [] and pick(1) == [10] and pick(2) == [6, 10] and pick(4) == [3, 6, 9, 10]


def test_a_run_killed_between_its_step_checkpoint_and_last_ckpt_resumes_from_the_step_one(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": 10}}))
    assert train_state(tmp_path, 10) == "fresh" and resume_checkpoint(tmp_path) is None
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in (2, 4):
        (ckpts / f"step-{step:06d}.ckpt").touch()  # last.ckpt not written yet
    assert train_state(tmp_path, 10) == "resume"
    assert resume_checkpoint(tmp_path) == (4, ckpts / "step-000004.ckpt")
    with pytest.raises(Exception, match="max_steps=10"):
        train_state(tmp_path, 12)


# --------------------------------------------------------------------------- the report


def _fake_results(acc: float, correct: list[bool], world: str = "w") -> dict:
    return {
        "headline": {"accuracy": acc, "cogent_accuracy": acc / 2, "chair_i": 0.1, "chair_s": 0.2,
                     "accuracy_minus_blind": acc - 0.3, "swap_change_rate": 0.5, "perplexity": 9.0},
        "by_qtype": {"color": {"accuracy": acc, "n": 8}, "ocr": {"accuracy": 0.5, "n": 2},
                     "audio_count": {"accuracy": 0.25, "n": 4}},
        "pope": {s: {"f1": 0.6} for s in ("random", "popular", "adversarial")},
        "cost": {"params_total": 1000, "params_trainable": 800, "decode_tokens_per_s_cached": 50.0},
        "config": {}, "world": {"hash": world}, "iid_split": "test",
        "samples": [{"id": f"test/{i}", "hash": f"h{i}", "split": "test", "correct": c} for i, c in enumerate(correct)],
    }


def test_report_tables_bootstrap_and_verdict_from_a_study_folder(tmp_path):
    """A fabricated study folder (3 seeds): native clearly ahead of flamingo under fusion_stage,
    flamingo not trainable all-in. The report must say both, from the numbers."""
    from omnifuse.eval.report import save_results
    from omnifuse.study.report import family_accuracy, run_metrics, write_study_report

    d = study_dict(out_dir=str(tmp_path), seeds=[0, 1, 2], budget_flops=5e11)
    d["arms"] = [d["arms"][0], d["arms"][2]]
    cfg = study_from_dict(d, ROOT)
    al = allocations(cfg)
    plan = {"seeds": {}}
    n = 60
    for seed in cfg.seeds:
        runs = planned_arm_runs(cfg, seed, al)
        plan["seeds"][str(seed)] = {
            "stage_flops": STAGE_FLOPS,
            "allocations": {a: {acc: {"phases": [vars(p) for p in x.phases], "note": x.note,
                                      "pretraining_flops": x.pretraining_flops, "fusion_budget": x.fusion_budget}
                                for acc, x in per.items()} for a, per in al.items()},
            "runs": [{"key": r.key, "arm": r.arm, "accountings": list(r.accountings)} for r in runs],
        }
        for r in runs:
            run_dir = tmp_path / r.key
            run_dir.mkdir(parents=True)
            (run_dir / "compute.json").write_text(json.dumps(
                {"train_flops": 5e11, "tokens_seen": {"text": 900, "pad": 100}, "train_seconds": 10.0}))
            good = r.arm == "native"
            correct = [(i % 10 < (8 if good else 3)) != (i == seed) for i in range(n)]
            save_results(_fake_results(sum(correct) / n, correct), run_dir / "eval")
            curve = run_dir / "curve" / "step-000005"
            curve.mkdir(parents=True)
            (curve / "results.json").write_text(json.dumps({"headline": {"accuracy": 0.1}}))
            (curve / "point.json").write_text(json.dumps({"step": 5, "train_flops": 2.5e11}))
    (tmp_path / "plan.json").write_text(json.dumps(plan))

    assert family_accuracy({"color": {"accuracy": 1.0, "n": 3}, "shape": {"accuracy": 0.0, "n": 1}},
                           ("color", "shape", "count")) == 0.75
    m = run_metrics(_fake_results(0.5, [True]))
    assert m["acc_image"] == 0.5 and m["acc_ocr"] == 0.5 and m["acc_audio"] == 0.25 and m["acc_chart"] is None

    text = write_study_report(cfg, tmp_path).read_text()
    fusion, all_in = text.split("## Accounting: all_in")
    assert "## Accounting: fusion_stage" in fusion and "fusion-stage matched" in fusion
    assert "all-in matched" in all_in
    assert "| native | 3 |" in fusion and "| flamingo | 3 |" in fusion and " ± " in fusion
    # native 0.8 vs flamingo 0.3 on the same 60 samples: the paired CI excludes 0, in native's favour
    assert "| accuracy | native | flamingo | 3 | 60 |" in fusion
    assert "the interval excludes 0, native is ahead" in fusion
    assert "the seed intervals do not overlap" in fusion
    # all-in: 6e11 of pretraining against a budget of 5e11
    assert "not trained: not trained under all_in" in all_in and "flamingo was not trained" in all_in.replace("*", "")
    assert (tmp_path / "accuracy_vs_flops_fusion_stage.png").stat().st_size > 0
    assert "| 0 | flamingo | all_in | 6e+11 | -1e+11 | not trained" in text


# --------------------------------------------------------------------------- end to end: kill and resume


def test_a_killed_study_resumes_without_retraining_finished_runs(small_world, tmp_path):
    """smoke.yaml's native arms on a smaller model: SIGKILL the study while its second run trains,
    start it again; the first run is kept as it was, the second resumes, the study completes."""
    d = yaml.safe_load((ROOT / "configs/study/smoke.yaml").read_text())
    d["arms"] = [a for a in d["arms"] if a["name"] in ("native", "native-1d")]
    small = ["--data.row_len", "256", "--data.batch_size", "2", "--data.num_workers", "0",
             "--data.shuffle_buffer", "16", "--data.pack_pool", "8",
             "--model.model.decoder.dim", "32", "--model.model.decoder.n_layers", "2",
             "--model.model.decoder.n_heads", "2", "--model.model.decoder.n_kv_heads", "1",
             "--model.model.decoder.ffn_hidden", "64"]
    d.update(out_dir=str(tmp_path / "study"), world_dir=str(small_world), budget_flops=2.4e9,  # ~16 steps
             train_args=[*d["train_args"], *small])
    d["eval"].update(args=["--limit", "3", "--no-pope", "--no-cogent"], curve_points=0, checkpoints_per_phase=8)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(d))
    cmd = [sys.executable, "-m", "omnifuse.study", "run", str(config)]
    out = tmp_path / "study" / "seed0"

    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    second = out / "native-1d" / "checkpoints"
    deadline = time.time() + 400
    while not list(second.glob("step-*.ckpt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert list(second.glob("step-*.ckpt")), (tmp_path / "first.log").read_text()[-3000:]
    first = out / "native"
    kept = {p: p.stat().st_mtime_ns for p in (first / "checkpoints" / "last.ckpt", first / "compute.json",
                                              first / "eval" / "results.json")}
    time.sleep(1.0)  # the orphaned train.py (if any) would keep writing: it must be dead

    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "seed0/native" in proc.stdout and "finished earlier, kept" in proc.stdout
    for path, mtime in kept.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    steps = json.loads((tmp_path / "study" / "plan.json").read_text())["seeds"]["0"]["allocations"]["native-1d"]
    planned = steps[FUSION_STAGE]["phases"][0]["steps"]
    compute = json.loads((out / "native-1d" / "compute.json").read_text())
    assert compute["global_step"] == planned
    # killed right after its first step checkpoint, the second run resumes from it (a second launch, a second log)
    assert "seed0/native-1d" in proc.stdout and "resuming from step" in proc.stdout, proc.stdout[-3000:]
    assert (out / "native-1d" / "logs" / "csv" / "version_1").is_dir()
    report = (tmp_path / "study" / "report.md").read_text()
    assert "## Accounting: fusion_stage" in report and "| native | 1 |" in report
    assert (tmp_path / "study" / "compare" / "compare.md").is_file()
