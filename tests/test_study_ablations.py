"""Ablations are config swaps (issue 11): each ablation YAML changes exactly the keys it names, and
``data.pixel_shuffle`` reaches the native model."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import ROOT
from omnifuse.data.datamodule import WorldDataModule
from omnifuse.tokenizers.stream import IMAGE
from omnifuse.training.cli import OmniCLI


class ResolvedConfig(OmniCLI):
    """OmniCLI that composes and links the config but builds nothing (no parts needed for bolt-on arms)."""

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass


def resolved(files: list[str], extra: list[str]) -> dict[str, object]:
    """The config ``train.py`` would save for ``-c tiny.yaml -c files...``, flattened to dotted keys."""
    args = [a for f in ["configs/scale/tiny.yaml", *files] for a in ("-c", str(ROOT / f))]
    cli = ResolvedConfig(args=[*args, *extra], run=False)
    return flatten(yaml.safe_load(cli.parser.dump(cli.config, skip_validation=True)))


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# (ablation config files, the arm config files it ablates, extra train.py arguments for both). The
# native ablations replace native.yaml; the bolt-on ones are composed after their arm's file.
NO_STAGE = ["--init_stage", "null"]  # LLaVA's stage-1 hook: never triggered by composing, but keep it off
ABLATIONS = [
    (["configs/fusion/native-1d.yaml"], ["configs/fusion/native.yaml"], []),
    (["configs/fusion/native-no-modality-embedding.yaml"], ["configs/fusion/native.yaml"], []),
    (["configs/fusion/native-no-qk-norm.yaml"], ["configs/fusion/native.yaml"], []),
    (["configs/fusion/native-pixel-shuffle.yaml"], ["configs/fusion/native.yaml"], []),
    (["configs/fusion/llava.yaml", "configs/fusion/llava-linear.yaml"], ["configs/fusion/llava.yaml"], NO_STAGE),
    (["configs/fusion/llava.yaml", "configs/fusion/llava-mrope.yaml"], ["configs/fusion/llava.yaml"], NO_STAGE),
    (["configs/fusion/llava.yaml", "configs/fusion/llava-no-align.yaml"], ["configs/fusion/llava.yaml"], []),
    *((["configs/fusion/flamingo.yaml", f"configs/fusion/flamingo-every{k}.yaml"], ["configs/fusion/flamingo.yaml"], [])
      for k in (1, 2, 4)),
    (["configs/fusion/flamingo.yaml", "configs/fusion/flamingo-lm-unfrozen.yaml"], ["configs/fusion/flamingo.yaml"], []),
]


def changes(ablation: list[str], base: list[str], extra: list[str]) -> tuple[set[str], dict, dict]:
    """(keys whose resolved value differs, the keys the last ablation file names, the ablation's resolved config)."""
    named = flatten(yaml.safe_load((ROOT / ablation[-1]).read_text()))
    named.pop("model.class_path", None)  # says which arm, not what changes
    got, want = resolved(ablation, extra), resolved(base, extra)
    got.pop("config", None), want.pop("config", None)  # the -c file list itself
    return {k for k in set(got) | set(want) if got.get(k) != want.get(k)}, named, got


@pytest.mark.parametrize("ablation,base,extra", ABLATIONS, ids=[a[0][-1].split("/")[-1] for a in ABLATIONS])
def test_an_ablation_changes_exactly_the_keys_it_names(ablation, base, extra):
    missing = [f for f in ablation + base if not (ROOT / f).is_file()]
    assert not missing, f"ablation config(s) {missing} are missing"
    differ, named, got = changes(ablation, base, extra)
    assert differ, f"{ablation[-1]} changes nothing"
    assert differ <= set(named), f"{ablation[-1]} also changes {sorted(differ - set(named))}, which it does not name"
    for k in differ:
        assert got.get(k) == named[k], f"{k}: resolved {got.get(k)!r}, the file says {named[k]!r}"


def test_the_diff_sees_a_change_the_file_does_not_name(tmp_path):
    # a file naming only qk_norm, composed instead of native-1d.yaml: positions go back to mrope unnamed
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: omnifuse.training.module.NativeLM\n  init_args:\n    model:\n"
                   "      decoder:\n        qk_norm: false\n")
    differ, named, _ = changes([str(bad)], ["configs/fusion/native-1d.yaml"], [])
    assert "model.init_args.model.decoder.qk_norm" in differ and "data.positions" in differ
    assert not differ <= set(named)


def test_pixel_shuffle_reaches_the_data_and_the_native_model(small_world):
    def first_image_doc(pixel_shuffle: bool):
        dm = WorldDataModule(world_dir=str(small_world), vocab_size=768, row_len=256, batch_size=2, num_workers=0,
                             shuffle_buffer=0, pixel_shuffle=pixel_shuffle)
        dm.setup("fit")
        return dm, next(iter(dm.train_dataloader()))

    _, plain = first_image_doc(False)
    dm, shuffled = first_image_doc(True)
    patch = dm.hparams.patch
    assert plain["image_patches"].shape[1] == 3 * patch**2
    assert shuffled["image_patches"].shape[1] == 4 * 3 * patch**2  # (Ni, 4·3·P²): 2×2 patches per slot

    args = ["-c", str(ROOT / "configs/scale/tiny.yaml"), "-c", str(ROOT / "configs/fusion/native-pixel-shuffle.yaml"),
            "--data.world_dir", str(small_world), "--data.row_len", "256", "--data.batch_size", "2",
            "--data.num_workers", "0", "--model.model.decoder.dim", "32", "--model.model.decoder.n_layers", "1",
            "--model.model.decoder.n_heads", "2", "--model.model.decoder.ffn_hidden", "64",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(small_world.parent / "unused")]
    cli = OmniCLI(args=args, run=False)
    assert cli.model.cfg.pixel_shuffle
    assert cli.model.model.image_proj.in_features == 4 * 3 * patch**2
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert int((batch["modality"] == IMAGE).sum()) == batch["image_patches"].shape[0]
    loss, _ = cli.model.compute_loss(batch)
    assert torch.isfinite(loss)
