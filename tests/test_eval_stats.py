"""Statistics against formulas and clear-cut cases."""

import math

import numpy as np
import pytest
from scipy import stats as st

from omnifuse.eval.stats import arm_config, group_runs, mean_ci, paired_bootstrap


def test_mean_ci_matches_formula():
    vals = [0.61, 0.65, 0.58, 0.66]
    mean, half = mean_ci(vals)
    n = len(vals)
    s = math.sqrt(sum((v - sum(vals) / n) ** 2 for v in vals) / (n - 1))
    assert mean == pytest.approx(sum(vals) / n)
    assert half == pytest.approx(st.t.ppf(0.975, n - 1) * s / math.sqrt(n))
    # t_{0.975, 3} = 3.182446..., by hand
    assert half == pytest.approx(3.182446305 * s / 2, rel=1e-6)


def test_mean_ci_single_and_empty():
    mean, half = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(half)
    assert all(math.isnan(x) for x in mean_ci([]))


def test_bootstrap_identical_arms():
    a = [True, False, True, True, False] * 20
    res = paired_bootstrap(a, a, n_boot=2000, seed=0)
    assert res["diff"] == 0 and res["p_value"] == pytest.approx(1.0)
    assert res["ci_low"] == 0 and res["ci_high"] == 0


def test_bootstrap_different_arms_and_determinism():
    rng = np.random.default_rng(1)
    a = rng.random(300) < 0.8
    b = rng.random(300) < 0.4
    res = paired_bootstrap(a, b, n_boot=5000, seed=3)
    assert res["p_value"] < 0.01
    assert res["ci_low"] < res["diff"] < res["ci_high"]
    assert res["diff"] == pytest.approx(a.mean() - b.mean())
    assert paired_bootstrap(a, b, n_boot=5000, seed=3) == res
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])


def test_bootstrap_chunking_does_not_change_distribution():
    # 20k samples -> chunks of 200 replicates; same statistic as the formula for the mean
    rng = np.random.default_rng(0)
    a, b = rng.random(20_000) < 0.6, rng.random(20_000) < 0.5
    res = paired_bootstrap(a, b, n_boot=1000, seed=0)
    d = a.astype(float) - b.astype(float)
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert res["ci_high"] - res["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)


def _cfg(fusion, seed, root, lr=3e-4):
    return {"seed_everything": seed,
            "trainer": {"default_root_dir": root, "max_steps": 100,
                        "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": root, "name": f"s{seed}"}}],
                        "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": root + "/ckpt"}}]},
            "model": {"class_path": f"omnifuse.model.lit.{fusion.title()}Module",
                      "init_args": {"fusion": fusion, "lr": lr}},
            "data": {"init_args": {"seed": seed, "root": "world/"}}}


def test_arm_config_drops_seeds_and_paths():
    flat = arm_config(_cfg("native", 0, "runs/a"))
    assert "model.init_args.lr" in flat and "data.init_args.root" in flat
    assert not any("seed" in k or "default_root_dir" in k or "logger" in k or "dirpath" in k for k in flat)


def test_group_runs_seeds_together_fusions_apart():
    runs = [{"name": f"{f}-s{s}", "config": _cfg(f, s, f"runs/{f}-{s}")}
            for f in ["native", "llava"] for s in range(3)]
    runs.append({"name": "native-lr", "config": _cfg("native", 0, "runs/x", lr=1e-3)})
    groups = group_runs(runs)
    assert len(groups) == 3
    sizes = sorted(len(v) for v in groups.values())
    assert sizes == [1, 3, 3]
    labels = list(groups)
    assert labels[0].startswith("native") and labels[1].startswith("llava")
    assert "lr=0.001" in labels[2]
    assert [r["name"] for r in groups[labels[0]]] == ["native-s0", "native-s1", "native-s2"]
    assert len(set(labels)) == 3
    # the model class_path follows the fusion, so it does not clutter the labels
    assert list(group_runs(runs[:6])) == ["native", "llava"]


def test_group_labels_name_only_what_differs_within_a_fusion():
    """An arm's own defaults (LLaVA's 1-D positions) do not label it beside other fusions; a
    native ablation is labelled by what it changes."""
    def run(fusion, positions):
        return {"fusion": fusion, "config": {"model": {"positions": positions}}}

    runs = [run("NativeLM", "mrope"), run("LLaVALM", "1d"), run("FlamingoLM", "mrope")]
    assert list(group_runs(runs)) == ["NativeLM", "LLaVALM", "FlamingoLM"]
    runs.append(run("NativeLM", "1d"))
    assert list(group_runs(runs)) == ["NativeLM positions=mrope", "LLaVALM", "FlamingoLM", "NativeLM positions=1d"]


def test_group_runs_single_group_label():
    runs = [{"config": {"seed": s, "model": {"fusion": "flamingo"}}} for s in range(2)]
    assert list(group_runs(runs)) == ["flamingo"]
    assert list(group_runs([{"config": {"seed": 1}}])) == ["group0"]


def test_group_runs_ignores_keys_that_do_not_change_training():
    from omnifuse.eval.stats import group_runs

    def run(world_dir, bar, steps):
        return {"fusion": "native", "config": {"data": {"world_dir": world_dir, "preset": "tiny"},
                                               "trainer": {"enable_progress_bar": bar, "max_steps": steps}}}

    groups = group_runs([run("worlds/tiny", True, 1000), run("/tmp/elsewhere", False, 1000), run("worlds/tiny", True, 2000)])
    assert sorted(len(g) for g in groups.values()) == [1, 2]
    assert any("max_steps=2000" in name for name in groups)


def test_options_added_later_and_loader_keys_do_not_split_or_label_groups():
    """A run trained before ``data.hard_negatives`` existed lacks the key (the code had it off), and
    loader keys (workers, cache) give the same batches: neither separates two runs, neither labels them."""
    old = {"fusion": "native", "config": {"data": {"num_workers": 1}, "trainer": {"max_steps": 1000}}}
    new = {"fusion": "native", "config": {"data": {"num_workers": 0, "cache_mb": 1024, "hard_negatives": False},
                                          "trainer": {"max_steps": 1000}}}
    assert list(group_runs([old, new])) == ["native"]
    longer = {"fusion": "native", "config": {"data": {"num_workers": 0, "hard_negatives": False},
                                             "trainer": {"max_steps": 2000}}}
    assert list(group_runs([old, longer])) == ["native max_steps=1000", "native max_steps=2000"]
    on = {"fusion": "native", "config": {"data": {"hard_negatives": True}, "trainer": {"max_steps": 1000}}}
    assert list(group_runs([old, on])) == ["native hard_negatives=<unset>", "native hard_negatives=True"]


def test_runs_of_different_worlds_are_not_seeds_of_one_arm():
    """Same config but seeds and world folder; the world's identity decides (results["world"]),
    and without it the world generator's seed still counts (it is not a seed of the run)."""
    def run(seed, world_hash=None, world_seed=0):
        r = {"fusion": "native", "config": {"seed_everything": seed,
                                            "data": {"world_dir": f"worlds/w{seed}", "world_seed": world_seed}}}
        if world_hash:
            r["world"] = {"hash": world_hash}
        return r

    groups = group_runs([run(0, "aaaa1111bbbb"), run(1, "aaaa1111bbbb"), run(2, "cccc2222dddd")])
    assert {k: len(v) for k, v in groups.items()} == {"native world=aaaa1111": 2, "native world=cccc2222": 1}
    # without world identities (older results): data.world_seed separates them
    assert "data.world_seed" in arm_config(run(0)["config"]) and "seed_everything" not in arm_config(run(0)["config"])
    groups = group_runs([run(0), run(1), run(2, world_seed=7)])
    assert sorted(len(v) for v in groups.values()) == [1, 2]
    assert any("world_seed=7" in k for k in groups)
