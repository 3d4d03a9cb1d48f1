"""Configs check themselves; every decoder variant (GQA, QK-norm, tied/untied, 1-D) builds and runs."""

import pytest
import torch

from omnifuse.model import DecoderConfig, NativeConfig, NativeFusion, default_mrope_sections


def tiny(**kw) -> DecoderConfig:
    base = dict(vocab_size=40, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=32)
    return DecoderConfig(**{**base, **kw})


def test_defaults():
    cfg = DecoderConfig(vocab_size=10, dim=64, n_layers=1, n_heads=2)
    assert cfg.n_kv_heads == 2 and cfg.ffn_hidden == 256 and cfg.head_dim == 32
    assert cfg.mrope_sections == (4, 6, 6)
    assert default_mrope_sections(128) == (16, 24, 24)  # Qwen2-VL
    assert sum(default_mrope_sections(16)) == 8
    ncfg = NativeConfig(decoder=tiny(), patch=4)
    assert ncfg.image_patch_dim == 48 and ncfg.audio_patch_dim == 16
    assert NativeConfig(decoder=dict(vocab_size=10, dim=32, n_layers=1, n_heads=2)).decoder.dim == 32


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(dim=66), "divisible by n_heads"),
        (dict(n_kv_heads=3), "divisible by n_kv_heads"),
        (dict(mrope_sections=(4, 4, 4)), "sum to 12"),
        (dict(mrope_sections=(8, 8)), "three non-negative"),
        (dict(positions="2d"), "positions must be one of"),
        (dict(attention="xformers"), "attention must be one of"),
        (dict(vocab_size=0), "vocab_size must be a positive int"),
        (dict(n_heads=64), "must be even for RoPE"),
        (dict(rope_base=1.0), "rope_base"),
    ],
)
def test_invalid_decoder_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


@pytest.mark.parametrize(
    "kw, msg",
    [(dict(patch=0), "patch must be a positive int"), (dict(aux_loss="clip"), "aux_loss must be one of")],
)
def test_invalid_native_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        NativeConfig(decoder=tiny(), **kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_kv_heads=4),  # MHA
        dict(n_kv_heads=1),  # MQA
        dict(qk_norm=False),
        dict(tie_embeddings=False),
        dict(positions="1d"),
        dict(mrope_sections=(8, 0, 0)),
    ],
)
def test_variants_build_and_run(kw):
    torch.manual_seed(0)
    model = NativeFusion(NativeConfig(decoder=tiny(**kw), patch=2, modality_embedding=kw.get("qk_norm", True)))
    tokens = torch.randint(0, 40, (2, 9))
    modality = torch.zeros(2, 9, dtype=torch.long)
    modality[0, 2:4] = 1
    positions = torch.arange(9).view(1, 9, 1).expand(2, 9, 3)
    logits = model(tokens, modality, positions, torch.randn(2, 12), None)
    assert logits.shape == (2, 9, 40) and torch.isfinite(logits).all()
    tied = model.decoder.output.weight is model.decoder.tok_embeddings.weight
    assert tied == kw.get("tie_embeddings", True)
    logits.sum().backward()


def test_param_and_flop_accounting():
    model = NativeFusion(NativeConfig(decoder=tiny(), patch=2))
    cfg = model.cfg.decoder
    untied = NativeFusion(NativeConfig(decoder=tiny(tie_embeddings=False), patch=2))
    assert untied.num_params() - model.num_params() == cfg.vocab_size * cfg.dim
    # tying does not change compute: the head matmul is charged either way
    assert untied.flops_per_token(32) == model.flops_per_token(32)
    n = model.num_params() - cfg.vocab_size * cfg.dim - 3 * cfg.dim + cfg.vocab_size * cfg.dim
    assert model.flops_per_token(32) == 6 * n + 12 * cfg.n_layers * cfg.dim * 32
    model.decoder.requires_grad_(False)
    assert model.num_params(trainable_only=True) == model.num_params() - model.decoder.num_params()
