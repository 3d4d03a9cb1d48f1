"""The scaling sweep (issue 12): the fits recover known laws, the size rule and IsoFLOP grid, the shipped
config builds and plans, the held-out loss scores the same labels for every arm, and the report is
written from a fabricated sweep folder."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from omnifuse.scaling.config import (
    ScalingConfig, SizeRule, budget_label, estimate_cost, load_scaling, scaling_from_dict, to_study,
)
from omnifuse.scaling.fit import fit_arm, fit_chinchilla, fit_compute_law, isoflop_minima
from omnifuse.study.budget import allocate
from omnifuse.study.config import ALL_IN, FUSION_STAGE, StudyConfigError
from omnifuse.study.plan import arm_runs, planned_arm_runs, stage_run

NATIVE = "configs/fusion/native.yaml"  # any existing YAML: nothing here trains


# --------------------------------------------------------------------------- synthetic laws


def chinchilla_truth(n, d, E=1.0, A=2.0, alpha=0.4, B=3.0, beta=0.3, n0=1e5, d0=1e7):
    return E + A * (n / n0) ** -alpha + B * (d / d0) ** -beta


def optimal_n_truth(c, E=1.0, A=2.0, alpha=0.4, B=3.0, beta=0.3, n0=1e5, d0=1e7, k=6.0):
    """argmin_N of chinchilla_truth(N, C / (k N)), written out (not through omnifuse.scaling.fit)."""
    g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    return n0 * g * (c / (k * n0 * d0)) ** (beta / (alpha + beta))


def isoflop_points(noise: float, seed: int = 0, **law):
    """An IsoFLOP grid around the true optimum: 6 budgets over 100x, 5 sizes each spread 16x around
    N*(C); D = C / (6 N); multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.geomspace(1e13, 1e15, 6):
        n_opt = optimal_n_truth(c, **law)
        for n in n_opt * np.geomspace(0.25, 4.0, 5):
            d = c / (6 * n)
            rows.append((c, n, d, chinchilla_truth(n, d, **law) * math.exp(rng.normal(0, noise)), c))
    return (np.array(col) for col in zip(*rows))


def test_compute_law_recovers_its_exponent_and_the_bootstrap_interval_holds_it():
    rng = np.random.default_rng(1)
    c = np.geomspace(1e11, 1e13, 8)  # 100x
    loss = (1.5 + 2.0 * (c / 1e12) ** -0.3) * np.exp(rng.normal(0, 0.003, len(c)))
    law = fit_compute_law(c, loss)
    assert law.alpha == pytest.approx(0.3, abs=0.05)
    assert law.E == pytest.approx(1.5, rel=0.1)
    assert float(law(1e12)) == pytest.approx(3.5, rel=0.01)  # E + A at c = 1e12
    # every point its own budget: the frontier is all of them; one (N, D) for all: no Chinchilla fit
    fit = fit_arm(c, np.full(8, 1e5), np.full(8, 1e7), loss, c, n_boot=150, seed=0)
    lo, hi = fit.ci("alpha_C")
    assert lo < 0.3 < hi and hi - lo < 0.3
    assert fit.failed["alpha_C"] < 15 and fit.chinchilla is None and "6 distinct" in fit.errors["chinchilla"]


def test_chinchilla_fit_recovers_both_exponents_and_the_compute_optimal_size():
    c, n, d, loss, budget = isoflop_points(noise=0.002)
    law = fit_chinchilla(n, d, loss, c)
    assert law.alpha == pytest.approx(0.4, abs=0.05)
    assert law.beta == pytest.approx(0.3, abs=0.05)
    assert law.k == pytest.approx(6.0)
    assert law.optimal_exponent == pytest.approx(0.3 / 0.7, abs=0.04)
    for cc in (1e13, 1e14, 1e15):
        assert float(law.optimal_n(cc)) == pytest.approx(optimal_n_truth(cc), rel=0.25)
    # the IsoFLOP parabolas bracket the true optimum at every budget and give the same exponent
    minima = isoflop_minima(n, loss, budget)
    assert len(minima) == 6 and all(m.bracketed for m in minima)
    for m in minima:
        assert m.n_opt == pytest.approx(optimal_n_truth(m.budget), rel=0.35)
    fit = fit_arm(c, n, d, loss, budget, n_boot=100, seed=3)
    assert fit.isoflop_exponent == pytest.approx(0.3 / 0.7, abs=0.06)
    for name, truth in (("alpha", 0.4), ("beta", 0.3), ("a_opt", 0.3 / 0.7)):
        lo, hi = fit.ci(name)
        assert lo <= truth <= hi, (name, lo, hi)
    assert fit.failed["alpha"] < 10


def test_fits_refuse_too_few_points():
    with pytest.raises(ValueError, match=">= 3 points"):
        fit_compute_law([1e11, 1e12], [3.0, 2.0])
    with pytest.raises(ValueError, match=">= 6 distinct"):
        fit_chinchilla([1e5] * 6, [1e7] * 6, [2.0] * 6)


# --------------------------------------------------------------------------- sizes and grid


def scaling_dict(**over) -> dict:
    """A sweep with a native arm and a two-phase bolt-on arm on two parts; 5 sizes, 4 budgets over 30x."""
    d = {
        "kind": "scaling", "name": "t", "out_dir": "runs/t", "scale": "configs/scale/tiny.yaml",
        "world_dir": "worlds/tiny", "seeds": [0], "accountings": [ALL_IN],
        "sizes": {"count": 5}, "grid": {"budget_min": 1e11, "budget_max": 3e12, "budgets": 4, "sizes_per_budget": 3},
        "stages": {"lm": {"configs": [NATIVE], "share": 0.2, "args": ["--data.media", "marker"]},
                   "clip": {"configs": [NATIVE], "share": 0.1, "args": ["--data.batch_size", "16"]}},
        "arms": [
            {"name": "native", "phases": [{"configs": [NATIVE]}]},
            {"name": "late", "parts": {"model.lm_ckpt": "lm", "model.image_encoder_ckpt": "clip"}, "phases": [
                {"name": "stage1", "configs": [NATIVE], "budget_fraction": 0.25},
                {"name": "stage2", "configs": [NATIVE], "budget_fraction": 0.75, "init_from_previous": "model.init_from",
                 "args": ["--init_stage", "null"]},
            ]},
        ],
        "fit": {"n_boot": 60},
    }
    d.update(over)
    return d


def test_sizes_follow_the_width_depth_rule_and_match_the_decoder():
    from omnifuse.model.config import DecoderConfig
    from omnifuse.model.decoder import Decoder

    sizes = SizeRule(count=5).sizes()
    assert [s.dim for s in sizes] == [32, 48, 64, 96, 128]  # heads 2, 3, 4, 6, 8 of 16
    assert [s.n_layers for s in sizes] == [1, 2, 2, 3, 4]  # dim / 32
    assert [s.n_kv_heads for s in sizes] == [1, 1, 2, 3, 4]
    assert [s.ffn_hidden for s in sizes] == [96, 144, 192, 288, 384]  # 3 x dim
    assert [s.name for s in sizes] == ["d32x1", "d48x2", "d64x2", "d96x3", "d128x4"]
    for s in sizes:  # the analytic count is the built decoder's
        dec = Decoder(DecoderConfig(vocab_size=768, dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads,
                                    n_kv_heads=s.n_kv_heads, ffn_hidden=s.ffn_hidden))
        assert s.matmul_params(768) == dec.matmul_params()
    args = sizes[2].train_args()
    assert args[args.index("--model.model.decoder.dim") + 1] == "64"
    assert args[args.index("--model.model.decoder.n_kv_heads") + 1] == "2"
    assert args[args.index("--encoder.n_layers") + 1] == "2"  # the parts' encoder at the same size
    with pytest.raises(StudyConfigError, match="same width"):
        SizeRule(count=5, heads_growth=1.1).sizes()  # 2, 2.2 -> 2: two sizes of width 32


def test_isoflop_grid_budgets_windows_steps_and_parts():
    cfg = scaling_from_dict(scaling_dict(), ROOT)
    budgets = cfg.budgets()
    assert budgets == pytest.approx([1e11, 3.107e11, 9.655e11, 3e12], rel=1e-3)  # log-spaced, 30x
    assert cfg.compute_range() == pytest.approx(30.0) and cfg.compute_range() >= 30 - 1e-9
    # the window of 3 sizes slides from the smallest sizes to the largest
    assert [list(cfg.grid.window(j, 5)) for j in range(4)] == [[0, 1, 2], [1, 2, 3], [1, 2, 3], [2, 3, 4]]
    points = cfg.points()
    assert len(points) == 2 * 4 * 3
    assert points[0].name == "native-d32x1-C1e11" and budget_label(3.107e11) == "3.1e11"
    # each size's parts: share x the smallest budget that size is trained at
    assert cfg.smallest_budget(0) == pytest.approx(1e11) and cfg.smallest_budget(3) == pytest.approx(budgets[1])
    biggest = next(p for p in points if p.size_index == 4)
    assert cfg.part_budget("lm", biggest) == pytest.approx(0.2 * 3e12) and cfg.part_name("lm", biggest) == "lm-d128x4"

    study = to_study(cfg, ROOT)
    assert len(study.arms) == 24 and study.warmup_fraction == 0.1
    assert sorted(study.stages) == sorted(f"{p}-d{d}" for p in ("lm", "clip") for d in
                                          ("32x1", "48x2", "64x2", "96x3", "128x4"))
    assert study.stages["clip-d96x3"].budget_flops == pytest.approx(0.1 * budgets[1])
    late = study.arm("late-d64x2-C9.7e11")
    assert late.parts == {"model.lm_ckpt": "lm-d64x2", "model.image_encoder_ckpt": "clip-d64x2"}
    assert study.budget_of(late) == pytest.approx(budgets[2])
    assert late.args[late.args.index("--model.model.decoder.dim") + 1] == "64"

    # steps per point = budget / measured FLOPs per step (here: stand-ins proportional to 6 N slots)
    fps = {a.name: {p.name: 6.0 * 4096 * int(a.name.split("-d")[1].split("x")[0]) ** 2 * 40 for p in a.phases}
           for a in study.arms}
    stage_flops = {name: s.budget_flops for name, s in study.stages.items()}
    native = study.arm("native-d48x2-C3.1e11")
    al = allocate(native, ALL_IN, study.budget_of(native), stage_flops, fps[native.name])
    assert al.steps == (round(budgets[1] / fps[native.name]["fusion"]),)
    al = allocate(late, ALL_IN, study.budget_of(late), stage_flops, fps[late.name])
    pre = 0.3 * budgets[0]  # lm 0.2 + clip 0.1 of d64x2's smallest budget (budget 0: sizes 0-2)
    assert al.pretraining_flops == pytest.approx(pre)
    assert al.steps == (round(0.25 * (budgets[2] - pre) / fps[late.name]["stage1"]),
                        round(0.75 * (budgets[2] - pre) / fps[late.name]["stage2"]))
    # every run warms up over a tenth of its steps
    runs = arm_runs(study, 0, late, al, (ALL_IN,))
    assert [r.warmup_steps for r in runs] == [max(1, round(0.1 * s)) for s in al.steps]
    assert "--model.optim.warmup_steps" in runs[0].train_args(study.scale, study.world_dir)
    assert stage_run(study, 0, "lm-d64x2", steps=40).warmup_steps == 4


def test_parts_per_point_give_every_size_and_budget_its_own_parts_at_a_share_of_that_budget():
    by_size = scaling_from_dict(scaling_dict(), ROOT)
    cfg = scaling_from_dict(scaling_dict(parts_per="point"), ROOT)
    budgets = cfg.budgets()
    study = to_study(cfg, ROOT)
    late_points = [p for p in cfg.points() if p.arm == "late"]
    # one LM and one CLIP per bolt-on point (12), where parts per size train one per size (5)
    assert len(study.stages) == 2 * len(late_points) == 24 and len(to_study(by_size, ROOT).stages) == 10
    late = study.arm("late-d64x2-C9.7e11")
    assert late.parts == {"model.lm_ckpt": "lm-d64x2-C9.7e11", "model.image_encoder_ckpt": "clip-d64x2-C9.7e11"}
    assert study.stages["lm-d64x2-C9.7e11"].budget_flops == pytest.approx(0.2 * budgets[2])
    assert study.stages["clip-d64x2-C1e11"].budget_flops == pytest.approx(0.1 * budgets[0])
    # a part's size arguments are its point's
    args = study.stages["lm-d64x2-C9.7e11"].args
    assert args[args.index("--model.model.decoder.dim") + 1] == "64"
    fps = {ph.name: 1e9 for ph in late.phases}
    al = allocate(late, ALL_IN, study.budget_of(late), {n: st.budget_flops for n, st in study.stages.items()}, fps)
    assert al.pretraining_flops == pytest.approx(0.3 * budgets[2])  # the point's own parts, charged under all_in
    with pytest.raises(StudyConfigError, match="parts_per"):
        scaling_from_dict(scaling_dict(parts_per="budget"), ROOT)


def test_scaling_config_checks_itself():
    with pytest.raises(StudyConfigError, match="sizes_per_budget"):
        scaling_from_dict(scaling_dict(grid={"budget_min": 1e11, "budget_max": 3e12, "budgets": 4,
                                             "sizes_per_budget": 2}), ROOT)
    with pytest.raises(StudyConfigError, match="no stage 'clap'"):
        d = scaling_dict()
        d["arms"][1]["parts"]["model.audio_encoder_ckpt"] = "clap"
        scaling_from_dict(d, ROOT)
    with pytest.raises(StudyConfigError, match="shares sum to 1"):
        scaling_from_dict(scaling_dict(stages={"lm": {"configs": [NATIVE], "share": 0.6},
                                               "clip": {"configs": [NATIVE], "share": 0.4}}), ROOT)
    with pytest.raises(StudyConfigError, match="no profile 'gpu'"):
        scaling_from_dict(scaling_dict(), ROOT, profile="gpu")
    with pytest.raises(StudyConfigError, match="unknown key"):
        scaling_from_dict(scaling_dict(sizes={"count": 5, "width": 3}), ROOT)


def test_study_derives_a_budget_stage_steps_and_shares_measurements_between_points(tmp_path):
    """A budget stage's steps come from its measured FLOPs per step; the points of one arm and size differ
    only in budget, so their phases are measured once."""
    from omnifuse.study.runner import Study

    cfg = scaling_from_dict(scaling_dict(out_dir=str(tmp_path)), ROOT)
    calls = []

    def measure(args, batches):
        calls.append(args)
        return 1e7 * int(args[args.index("--model.model.decoder.dim") + 1])

    study = Study(to_study(cfg, ROOT), measure=measure)
    steps = study.stage_steps()
    assert steps["lm-d32x1"] == round(0.2 * 1e11 / 32e7) == 62
    assert len(calls) == 10  # 2 parts x 5 sizes
    fps = study.flops_per_step(0)
    assert len(calls) == 10 + 5 * (1 + 2)  # native 1 phase + late 2 phases, once per size
    assert fps["late-d96x3-C3e12"]["stage2"] == 96e7
    assert study.stage_steps(measure=False) == steps and len(calls) == 25  # read back from flops_per_step.json


# --------------------------------------------------------------------------- the shipped config


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_shipped_scaling_config_builds_and_plans(profile, tmp_path):
    from omnifuse.scaling.runner import ScalingStudy
    from omnifuse.study.__main__ import main

    path = ROOT / "configs/study/scaling.yaml"
    cfg = load_scaling(path, base=ROOT, profile=profile, out_dir=str(tmp_path))
    assert cfg.profile == profile and [a.name for a in cfg.arms] == ["native", "llava", "flamingo"]
    sizes = cfg.model_sizes()
    assert len(sizes) >= 5 and cfg.grid.sizes_per_budget >= 3 and cfg.grid.budgets >= 4
    assert cfg.compute_range() >= 30
    assert all(s.n_layers >= 2 for s in sizes)  # LLaVA reads its encoders' penultimate block
    study = to_study(cfg, ROOT)
    assert study.baseline.startswith("native-")
    if profile == "cpu":
        tiny = yaml.safe_load((ROOT / "configs/scale/tiny.yaml").read_text())["model"]["init_args"]["model"]["decoder"]
        assert sizes[0].dim <= tiny["dim"] // 4 and sizes[-1].dim == tiny["dim"]  # from well under tiny, up to it
        est = estimate_cost(cfg)
        assert est.total_s <= 3 * 3600
        # as the YAML header says: 15 native + 30 LLaVA phases + 15 Flamingo + 45 parts (parts_per: point)
        assert cfg.parts_per == "point" and est.launches == 105 and est.train_flops == pytest.approx(6.6e13, rel=0.01)
    else:
        assert sizes[-1].dim > load_scaling(path, base=ROOT, profile="cpu").model_sizes()[-1].dim  # larger sizes
        assert "--device" in cfg.heldout_args
    text = ScalingStudy(cfg).describe()
    assert "45 points" in text and text.count("C=") == 5 and "estimated time" in text
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(path), "--profile", profile, "--out", str(tmp_path)]) == 0
    assert "scaling sweep scaling-" + profile in out.getvalue()
    assert not any(tmp_path.iterdir())  # planning trains, measures and writes nothing


def test_profile_is_refused_for_a_study_config(capsys):
    from omnifuse.study.__main__ import main

    assert main(["plan", str(ROOT / "configs/study/smoke.yaml"), "--profile", "gpu"]) == 2
    assert "not a scaling sweep" in capsys.readouterr().err


# --------------------------------------------------------------------------- held-out loss


def test_heldout_loss_scores_the_same_labels_whatever_the_arm_layout_or_packing(small_world):
    from omnifuse.data.datamodule import build_interleaver
    from omnifuse.data.packing import build_row, collate_rows
    from omnifuse.eval.heldout import heldout_docs, heldout_loss, labels_fingerprint, packed_batches
    from omnifuse.model.config import DecoderConfig, NativeConfig
    from omnifuse.model.decoder import lm_loss
    from omnifuse.training.module import NativeLM

    docs = {}
    for positions, media in (("mrope", "inline"), ("1d", "inline"), ("1d", "marker")):  # native, LLaVA, text LM
        _, il = build_interleaver(small_world, 8, positions, media)
        docs[(positions, media)] = heldout_docs(small_world, "test", il, limit=30)
    prints = {k: labels_fingerprint(v) for k, v in docs.items()}
    assert len(set(prints.values())) == 1 and prints[("mrope", "inline")][1] > 100  # same target tokens

    torch.manual_seed(0)
    module = NativeLM(NativeConfig(DecoderConfig(vocab_size=768, max_seq_len=512, dim=32, n_layers=2, n_heads=2,
                                                 n_kv_heads=1, ffn_hidden=64, attention="sdpa")))
    native = docs[("mrope", "inline")]
    a = heldout_loss(module, packed_batches(native, 512, 4))
    b = heldout_loss(module, packed_batches(native, 256, 2))
    assert a["n_tokens"] == b["n_tokens"] == prints[("mrope", "inline")][1]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # packing does not change a document's loss
    # reference: each document alone in a row of its own (the rest padding), per-slot losses summed
    with torch.no_grad():
        batch = collate_rows([build_row([doc], 512) for doc in native])
        _, per_slot = lm_loss(module(batch), batch["labels"])
    count = int((batch["labels"] != -100).sum())
    assert a["loss"] == pytest.approx(float(per_slot.sum()) / count, rel=1e-5) and count == a["n_tokens"]
    assert sum(t["n_tokens"] for t in a["by_task"].values()) == a["n_tokens"]


# --------------------------------------------------------------------------- the report


def test_report_table_plot_and_verdict_from_a_fabricated_sweep(tmp_path):
    """Every point of a sweep folder written by hand from two known laws: native lower than `late` at
    every size and budget, by a margin that grows with compute. The report must fit both, draw them and
    say so."""
    from omnifuse.scaling.report import write_scaling_report

    cfg = scaling_from_dict(scaling_dict(out_dir=str(tmp_path), sizes={"count": 6},
                                         grid={"budget_min": 1e11, "budget_max": 3e12, "budgets": 5,
                                               "sizes_per_budget": 4}), ROOT)
    study = to_study(cfg, ROOT)
    rng = np.random.default_rng(0)
    fps = {a.name: {p.name: 6.0 * a_params(cfg, a.name) * 4096 for p in a.phases} for a in study.arms}
    stage_flops = {name: s.budget_flops for name, s in study.stages.items()}
    al = {a.name: {ALL_IN: allocate(a, ALL_IN, study.budget_of(a), stage_flops, fps[a.name])} for a in study.arms}
    runs = planned_arm_runs(study, 0, al)
    plan = {"seeds": {"0": {
        "stage_flops": stage_flops,
        "allocations": {a: {acc: {"phases": [vars(p) for p in x.phases], "note": x.note,
                                  "pretraining_flops": x.pretraining_flops, "fusion_budget": x.fusion_budget}
                            for acc, x in per.items()} for a, per in al.items()},
        "runs": [{"key": r.key, "arm": r.arm, "accountings": list(r.accountings)} for r in runs]}}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    for run in runs:
        arm, n = run.arm.split("-d")[0], a_params(cfg, run.arm)
        run_dir = tmp_path / run.key
        run_dir.mkdir(parents=True)
        steps = next(p.steps for p in al[run.arm][ALL_IN].phases if p.name == run.phase)
        d = steps * 4096
        (run_dir / "compute.json").write_text(json.dumps({
            "train_flops": steps * fps[run.arm][run.phase], "params_total": n, "global_step": steps,
            "tokens_seen": {"text": d, "pad": 0}}))
        if run.final:
            total_d = sum(p.steps for p in al[run.arm][ALL_IN].phases) * 4096
            loss = chinchilla_truth(n, total_d, E=1.0 if arm == "native" else 1.05, B=3.0 if arm == "native" else 3.6,
                                    n0=1e6) * math.exp(rng.normal(0, 0.002))
            (run_dir / "heldout.json").write_text(json.dumps({"loss": loss, "n_tokens": 5000, "labels_sha": "abc"}))
            (run_dir / "eval").mkdir()
            (run_dir / "eval" / "results.json").write_text(json.dumps({"headline": {"accuracy": 0.5}}))

    text = write_scaling_report(cfg, tmp_path).read_text()
    assert "## Accounting: all_in" in text and "same 5000 target tokens" in text
    table = [line for line in text.splitlines() if line.startswith("| native | 20 |") or line.startswith("| late | 20 |")]
    assert len(table) == 2  # 5 budgets x 4 sizes per arm, one row of constants each
    fits = json.loads((tmp_path / "fits.json").read_text())["all_in"]
    assert fits["native"]["chinchilla"]["alpha"] == pytest.approx(0.4, abs=0.1)
    assert fits["native"]["chinchilla"]["beta"] == pytest.approx(0.3, abs=0.1)
    assert fits["late"]["compute_law"]["alpha"] > 0
    verdict = text.split("### Verdict — all_in")[1].split("### Points")[0]
    assert verdict.count("native has the lower loss") == 2  # at the smallest and at the largest budget
    assert "Shukor et al. 2025" in verdict and "early fusion is better at lower parameter counts" in verdict
    assert "late: consistent at the smallest budget" in verdict
    # late pays for its parts out of each budget: a fixed cost that weighs less as compute grows
    assert "native's lead shrinks with compute" in verdict
    assert (tmp_path / "scaling_all_in.png").stat().st_size > 10_000
    assert len((tmp_path / "points.jsonl").read_text().splitlines()) == 40


def a_params(cfg: ScalingConfig, point: str) -> float:
    """A point's parameter count in the fabricated sweep: its decoder's matmul parameters."""
    size = next(p.size for p in cfg.points() if p.name == point)
    return float(size.matmul_params(768))


def test_fusion_stage_accounting_keeps_parts_free():
    cfg = scaling_from_dict(scaling_dict(accountings=[FUSION_STAGE, ALL_IN]), ROOT)
    est_both = estimate_cost(cfg, cost=_cost())
    est_all_in = estimate_cost(scaling_from_dict(scaling_dict(), ROOT), cost=_cost())
    # under fusion_stage the bolt-on points spend their whole budget on fusion: more FLOPs than all_in alone
    late_points = [p for p in cfg.points() if p.arm == "late"]
    assert est_both.train_flops == pytest.approx(est_all_in.train_flops + sum(p.budget for p in late_points))


def _cost():
    from omnifuse.scaling.config import CostModel

    return CostModel(flops_per_s=1e10)


def test_a_replicate_whose_extra_overflows_is_counted_as_failed_not_raised():
    """The CPU sweep's first report stopped on an OverflowError from N*(C) of a degenerate bootstrap refit."""
    from omnifuse.scaling.fit import fit_arm

    rng = np.random.default_rng(0)
    n = np.repeat([1e5, 2e5, 4e5], 3)
    d = np.tile([1e6, 2e6, 4e6], 3)
    c = 6 * n * d
    loss = 2.0 + 50 * n ** -0.3 + 80 * d ** -0.3 + rng.normal(0, 1e-3, len(n))

    def overflow(_laws):
        return 10.0 ** 400  # a Python float power past the range: OverflowError

    fit = fit_arm(c, n, d, loss, c, n_boot=5, seed=0, extra={"boom": overflow})
    assert fit.failed["boom"] == 5 and fit.boot["boom"].size == 0
    assert fit.boot["alpha_C"].size > 0
