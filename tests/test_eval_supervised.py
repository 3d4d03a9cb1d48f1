"""The supervised reference of the contrastive suite (omnifuse/eval/supervised.py): a learnable label
is learned, an unlearnable one is not, and the CLI runs on a trained stage."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from omnifuse.eval.contrastive import Item, stack_items
from omnifuse.eval.supervised import main, train_supervised
from omnifuse.model.encoders import EncoderConfig

CFG = EncoderConfig(patch_dim=12, dim=32, n_layers=2, n_heads=2, ffn_hidden=64)


def items(n: int, seed: int, learnable: bool) -> list[Item]:
    """Items of 3 or 4 patches; with ``learnable`` the class is which of the first three is bright, else a
    draw unrelated to the patches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        bright = int(torch.randint(3, (1,), generator=g))
        patches = torch.randn(4, 12, generator=g) * 0.1
        patches[bright] += 1.0
        label = bright if learnable else int(torch.randint(3, (1,), generator=g))
        grid = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
        out.append(Item(f"s/{i}", "", patches[: 3 + i % 2], grid[: 3 + i % 2], "", {"where": str(label)}))
    return out


def test_stack_items_pads_and_masks():
    patches, grid, mask = stack_items(items(3, 0, True))
    assert patches.shape == (3, 4, 12) and grid.shape == (3, 4, 2)
    assert mask.sum(1).tolist() == [3, 4, 3]
    assert (patches[0, 3] == 0).all() and (grid[2, 3] == 0).all()


def test_a_learnable_label_is_learned_and_a_random_one_is_not():
    learned = train_supervised(CFG, items(192, 0, True), items(64, 1, True), "where", steps=100, batch_size=32,
                               lr=3e-3, eval_every=50)
    assert learned["accuracy"] >= 0.9 and learned["n"] == 64 and learned["n_train"] == 192
    assert learned["classes"] == ["0", "1", "2"]
    assert learned["curve"][0][0] == 0 and learned["curve"][-1] == [100, learned["accuracy"]]
    assert learned["curve"][0][1] < 0.6  # untrained: near chance (1/3)
    lo, hi = learned["ci95"]
    assert lo <= learned["accuracy"] <= hi
    noise = train_supervised(CFG, items(192, 0, False), items(200, 1, False), "where", steps=100, batch_size=32,
                             lr=3e-3, eval_every=50)
    assert noise["accuracy"] < 0.45  # chance is 1/3: nothing to learn
    assert train_supervised(CFG, items(8, 0, True), items(8, 1, True), "colour") == {}  # no item has the label


def test_cli_trains_the_runs_encoder_size_on_its_world(stage_runs, tmp_path):
    out = main(["--ckpt", str(stage_runs["clip"]), "--task", "color", "--steps", "3", "--out", str(tmp_path),
                "--quiet"])
    saved = json.loads((tmp_path / "supervised.json").read_text())
    assert saved == json.loads(json.dumps(out))
    r = saved["tasks"]["color"]
    assert r["steps"] == 3 and len(r["curve"]) == 2 and r["n"] > 0 and 0 <= r["accuracy"] <= 1
    assert saved["encoder"]["dim"] > 0 and saved["world"]
    assert all(isinstance(n, int) and n > 0 for n in saved["unscored"].values())  # e.g. "train: no image medium"
    assert any(key.startswith("train: ") for key in saved["unscored"])
    with pytest.raises(SystemExit):  # not a contrastive stage: a clear error, not a crash
        main(["--ckpt", str(stage_runs["lm"]), "--out", str(tmp_path), "--quiet"])


def test_the_cnn_reference_is_translation_invariant_and_learns():
    from omnifuse.eval.supervised import ConvReference

    torch.manual_seed(0)
    cnn = ConvReference(channels=1, patch=8, width=16)  # total stride 8: one output cell per patch
    grid = torch.tensor([[[r, c] for r in range(4) for c in range(4)]])  # a 32x32 single-channel item
    full = torch.ones(1, 16, dtype=torch.bool)

    def item(y: int, x: int) -> torch.Tensor:
        pixels = torch.zeros(32, 32)
        pixels[y, x] = 1.0
        return pixels.reshape(4, 8, 4, 8).permute(0, 2, 1, 3).reshape(1, 16, 64)

    # a bright pixel moved by one patch (8 pixels, the network's stride): same max-pooled features
    ea, eb = cnn.embed(item(10, 11), grid, full), cnn.embed(item(18, 19), grid, full)
    assert ea.shape == (1, 16) and torch.allclose(ea, eb, atol=1e-6)
    assert not torch.allclose(ea, cnn.embed(torch.zeros(1, 16, 64), grid, full))  # and it is seen
    # a padding patch does not reach the pooled features, whatever it holds
    pad = torch.cat([item(10, 11), torch.full((1, 1, 64), 50.0)], 1)
    grid_pad = torch.cat([grid, torch.tensor([[[0, 0]]])], 1)
    mask = torch.cat([full, torch.tensor([[False]])], 1)
    assert torch.allclose(cnn.embed(pad, grid_pad, mask), ea, atol=1e-6)
    cnn3 = ConvReference(channels=3, patch=2, width=16)
    assert cnn3.embed(*stack_items(items(5, 0, True))).shape == (5, 16)
    rgb = dataclasses.replace(CFG, channels=3)  # patch_dim 12 = 3 x 2 x 2
    learned = train_supervised(rgb, items(192, 0, True), items(64, 1, True), "where", steps=100, batch_size=32,
                               lr=3e-3, eval_every=50, arch="cnn")
    assert learned["accuracy"] >= 0.9 and learned["arch"] == "cnn"
    with pytest.raises(ValueError, match="patch side"):  # 12 values of one channel are no square patch
        train_supervised(CFG, items(8, 0, True), items(8, 1, True), "where", arch="cnn")
