"""Opening a run: weights-only checkpoints (config dataclasses allowed, anything else refused before
it runs) and the run's relative paths resolved from any working directory."""

from __future__ import annotations

import builtins
import json
import os
import pickle

import lightning as L
import pytest
import torch
import yaml

from omnifuse.eval.loading import (
    LAUNCH_FILE, UnsafeCheckpoint, allowed_checkpoint_globals, load_checkpoint_module, module_class, resolve_world,
    run_path_candidates,
)
from omnifuse.model.config import DecoderConfig, NativeConfig
from omnifuse.training.module import NativeLM, OptimConfig


def tiny_module(**kw) -> NativeLM:
    cfg = NativeConfig(DecoderConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32,
                                     max_seq_len=32), patch=4)
    torch.manual_seed(0)
    return NativeLM(cfg, OptimConfig(lr=1e-3, warmup_steps=2), **kw)


def lightning_checkpoint(module: L.LightningModule, **extra) -> dict:
    """What Lightning's checkpoint holds for a module built in Python (hparams as dataclass objects)."""
    return {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__, "global_step": 0, "epoch": 0, **extra}


def test_config_dataclasses_load_weights_only(tmp_path):
    module = tiny_module()
    path = tmp_path / "ok.ckpt"
    torch.save(lightning_checkpoint(module), path)
    # weights-only with torch's defaults alone refuses the config objects: the allow-list is needed
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert set(allowed_checkpoint_globals(path)) == {NativeConfig, DecoderConfig, OptimConfig}
    loaded = load_checkpoint_module(NativeLM, path)
    assert isinstance(loaded.cfg, NativeConfig) and loaded.cfg == module.cfg and loaded.optim_cfg == module.optim_cfg
    for k, v in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


class _Touch:
    """Unpickling it creates a file: the kind of payload a shared checkpoint could carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        code = f"open({self.path!r}, 'w').write('pwned')"
        return builtins.exec, (code,)


class _NotADataclass:
    pass


@pytest.mark.parametrize("payload, global_name", [
    (lambda marker: _Touch(marker), "builtins.exec"),
    (lambda marker: _NotADataclass(), f"{__name__}._NotADataclass"),
])
def test_a_checkpoint_that_runs_code_is_refused(tmp_path, payload, global_name):
    marker = tmp_path / "marker"
    module = tiny_module()
    path = tmp_path / "evil.ckpt"
    torch.save(lightning_checkpoint(module, callbacks={"x": payload(marker)}), path)
    # the payload is real: loading it the old way runs it
    if global_name == "builtins.exec":
        torch.load(path, weights_only=False)
        assert marker.read_text() == "pwned"
        marker.unlink()
    with pytest.raises(UnsafeCheckpoint, match=rf"{path}.*{global_name}"):
        load_checkpoint_module(NativeLM, path)
    assert not marker.exists()


def test_eval_of_a_run_whose_checkpoint_runs_code_is_refused(tmp_path, capsys):
    """The path a researcher takes: `eval.py --ckpt RUN` on a run someone sent, whose last.ckpt carries
    a payload. It stops with UnsafeCheckpoint naming the file and the global, before the payload runs."""
    from omnifuse.eval.cli import main as eval_main

    marker = tmp_path / "marker"
    run = make_run(tmp_path / "sent-run", {"model": {"class_path": "omnifuse.training.module.NativeLM"},
                                            "data": {"world_dir": "worlds/tiny"}})
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save(lightning_checkpoint(tiny_module(), callbacks={"x": _Touch(marker)}), ckpt)
    with pytest.raises(UnsafeCheckpoint) as e:
        eval_main(["--ckpt", str(run), "--quiet"])
    msg = str(e.value)
    assert str(ckpt) in msg and "'builtins.exec'" in msg and "refusing to open it" in msg
    assert not marker.exists()


def test_a_compiled_runs_checkpoint_loads_uncompiled(tmp_path):
    """README: a run trained with --model.compile true writes a checkpoint that eval's loader opens into
    an uncompiled module: the same keys and tensors, no `_orig_mod.` / `_forward.` copies."""
    compiled = tiny_module(compile=True)
    compiled.configure_model()  # Lightning's hook: compiles self.model in place (lazily; nothing is run)
    assert compiled.model._compiled_call_impl is not None
    path = tmp_path / "compiled.ckpt"
    torch.save(lightning_checkpoint(compiled), path)
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert list(saved) == list(tiny_module().state_dict())
    # Lightning's load_from_checkpoint calls configure_model, which compiles a compile=True module
    assert NativeLM.load_from_checkpoint(path, weights_only=False).model._compiled_call_impl is not None
    loaded = load_checkpoint_module(NativeLM, path)
    assert loaded.model._compiled_call_impl is None and loaded.compile_model is False
    for k, v in compiled.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_an_omnifuse_global_that_is_not_a_dataclass_is_refused(tmp_path):
    """Only dataclasses of omnifuse.* pass: a function of the package reached by REDUCE does not."""
    import omnifuse.eval.loading as loading

    class Call:
        def __reduce__(self):
            return loading.find_checkpoint, (str(tmp_path),)

    path = tmp_path / "fn.ckpt"
    torch.save({"state_dict": {}, "x": Call()}, path)
    with pytest.raises(UnsafeCheckpoint, match="omnifuse.eval.loading.find_checkpoint"):
        allowed_checkpoint_globals(path)


def test_config_class_path_must_be_an_omnifuse_lightning_module(tmp_path):
    cfg = tmp_path / "config.yaml"
    assert module_class({"model": {"class_path": "omnifuse.training.module.NativeLM"}}, cfg) is NativeLM
    with pytest.raises(ValueError, match="os.system.*not an omnifuse"):
        module_class({"model": {"class_path": "os.system"}}, cfg)
    with pytest.raises(ValueError, match="not a LightningModule"):
        module_class({"model": {"class_path": "omnifuse.model.config.NativeConfig"}}, cfg)
    with pytest.raises(ValueError, match=r"config.yaml: key 'model', field 'class_path'"):
        module_class({}, cfg)


# --------------------------------------------------------------------------- paths


def make_world(path):
    path.mkdir(parents=True)
    (path / "tokenizer.model").write_bytes(b"x")
    return path


def make_run(run_dir, config, launch_cwd=None):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if launch_cwd is not None:
        (run_dir / LAUNCH_FILE).write_text(json.dumps({"cwd": str(launch_cwd)}))
    return run_dir


def test_world_resolved_from_the_recorded_launch_directory(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    world = make_world(proj / "worlds" / "tiny")
    config = {"data": {"world_dir": "worlds/tiny"}, "trainer": {"default_root_dir": "/abs/elsewhere"}}
    run = make_run(tmp_path / "shared" / "run", config, launch_cwd=proj)
    monkeypatch.chdir(tmp_path)
    assert resolve_world(run, config) == world


def test_world_resolved_from_the_runs_own_location(tmp_path, monkeypatch):
    """No launch.json (an older run, or the project moved): the run at /x/runs/a with
    default_root_dir runs/a was launched from /x."""
    proj = tmp_path / "moved" / "proj"
    world = make_world(proj / "worlds" / "tiny")
    config = {"data": {"world_dir": "worlds/tiny"}, "trainer": {"default_root_dir": "runs/a"}}
    run = make_run(proj / "runs" / "a", config, launch_cwd=tmp_path / "gone")
    monkeypatch.chdir(tmp_path)
    assert run_path_candidates(run, config, "worlds/tiny") == [
        tmp_path / "gone" / "worlds/tiny", proj / "worlds/tiny", tmp_path / "worlds/tiny"]
    assert resolve_world(os.path.relpath(run, tmp_path), config) == world
    # absolute paths are taken as they are
    assert run_path_candidates(run, config, str(world)) == [world]


def test_missing_world_error_names_every_path_looked_for(tmp_path, monkeypatch):
    config = {"data": {"world_dir": "worlds/tiny"}, "trainer": {"default_root_dir": "runs/a"}}
    run = make_run(tmp_path / "runs" / "a", config, launch_cwd=tmp_path / "launch")
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(FileNotFoundError) as e:
        resolve_world(run, config)
    msg = str(e.value)
    for where in (tmp_path / "launch", tmp_path, tmp_path / "runs"):
        assert str(where / "worlds/tiny" / "tokenizer.model") in msg
    assert "data.world_dir" in msg
