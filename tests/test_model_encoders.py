"""Contrastive encoders: the patch ViT (shapes, padding invariance, a hand-written reference of the
blocks, FLOPs), its convolutional stem, and its config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from omnifuse.model.config import DecoderConfig
from omnifuse.model.encoders import (
    ContrastiveConfig,
    ContrastiveModel,
    EncoderConfig,
    EncoderSize,
    PatchEncoder,
    clip_loss,
    unpatchify,
)
from omnifuse.tokenizers.audio import patchify_spectrogram
from omnifuse.tokenizers.image import patchify


def tiny_encoder(seed: int = 0, **overrides) -> PatchEncoder:
    torch.manual_seed(seed)
    kw = dict(patch_dim=12, dim=16, n_layers=3, n_heads=2, ffn_hidden=24, max_rows=5, max_cols=6, embed_dim=8)
    kw.update(overrides)
    enc = PatchEncoder(EncoderConfig(**kw))
    # Non-trivial LayerNorm parameters, so the reference below must apply them the same way.
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return enc.eval()


def item(rows: int, cols: int, d: int = 12, seed: int = 1):
    """One item's patches (rows*cols, d) in raster order and their grid (rows*cols, 2)."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(rows * cols, d, generator=g)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return patches, torch.stack([r.reshape(-1), c.reshape(-1)], dim=1)


def reference_blocks(enc: PatchEncoder, patches, grid) -> list[torch.Tensor]:
    """Every block's output ``(1 + n, dim)`` for ONE unpadded item, written out from the weights."""
    cfg = enc.cfg
    x = patches @ enc.patch_embed.weight.T + enc.patch_embed.bias
    x = x + enc.row_embed.weight[grid[:, 0]] + enc.col_embed.weight[grid[:, 1]]
    x = torch.cat([enc.cls_token[None], x], dim=0)  # (S, dim)
    x = F.layer_norm(x, (cfg.dim,), enc.ln_pre.weight, enc.ln_pre.bias, cfg.norm_eps)
    outs = []
    for block in enc.layers:
        a = block.attn
        h = F.layer_norm(x, (cfg.dim,), block.sa_norm.weight, block.sa_norm.bias, cfg.norm_eps)
        q = (h @ a.q_proj.weight.T + a.q_proj.bias).view(-1, cfg.n_heads, cfg.head_dim).transpose(0, 1)
        k = (h @ a.k_proj.weight.T + a.k_proj.bias).view(-1, cfg.n_heads, cfg.head_dim).transpose(0, 1)
        v = (h @ a.v_proj.weight.T + a.v_proj.bias).view(-1, cfg.n_heads, cfg.head_dim).transpose(0, 1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(cfg.head_dim), dim=-1)  # every slot sees every slot
        o = (att @ v).transpose(0, 1).reshape(-1, cfg.dim)
        x = x + o @ a.output_proj.weight.T + a.output_proj.bias
        h = F.layer_norm(x, (cfg.dim,), block.mlp_norm.weight, block.mlp_norm.bias, cfg.norm_eps)
        x = x + block.mlp.w2(F.gelu(block.mlp.w1(h)))
        outs.append(x)
    return outs


def test_blocks_match_a_hand_written_vit():
    enc = tiny_encoder()
    patches, grid = item(3, 4)
    ref = reference_blocks(enc, patches, grid)
    mask = torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        penult = enc.patch_features(patches[None], grid[None], mask)  # default layer=-2
        first = enc.patch_features(patches[None], grid[None], mask, layer=0)
        last = enc.patch_features(patches[None], grid[None], mask, layer=-1)
        pooled = enc.embed(patches[None], grid[None], mask)
    assert penult.shape == (1, 12, 16) and pooled.shape == (1, 8)
    torch.testing.assert_close(penult[0], ref[-2][1:])  # class token dropped
    torch.testing.assert_close(first[0], ref[0][1:])
    torch.testing.assert_close(last[0], ref[-1][1:])
    cls = F.layer_norm(ref[-1][0], (16,), enc.ln_post.weight, enc.ln_post.bias, enc.cfg.norm_eps)
    torch.testing.assert_close(pooled[0], cls @ enc.proj.weight.T)


def test_padding_patches_change_no_real_feature():
    enc = tiny_encoder()
    small, small_grid = item(2, 3, seed=2)  # 6 real patches
    big, big_grid = item(3, 4, seed=3)  # 12 real patches
    patches = torch.zeros(2, 12, 12)
    grid = torch.zeros(2, 12, 2, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    patches[0, :6], grid[0, :6], mask[0, :6] = small, small_grid, True
    patches[1], grid[1], mask[1] = big, big_grid, True
    patches[0, 6:] = 50 * torch.randn(6, 12)  # garbage padding values and coordinates
    grid[0, 6:] = torch.tensor([4, 5])
    with torch.no_grad():
        feats = enc.patch_features(patches, grid, mask)
        pooled = enc.embed(patches, grid, mask)
        alone = enc.patch_features(small[None], small_grid[None], torch.ones(1, 6, dtype=torch.bool))
        alone_pooled = enc.embed(small[None], small_grid[None], torch.ones(1, 6, dtype=torch.bool))
        big_alone = enc.embed(big[None], big_grid[None], torch.ones(1, 12, dtype=torch.bool))
    torch.testing.assert_close(feats[0, :6], alone[0])
    torch.testing.assert_close(pooled[0], alone_pooled[0])
    torch.testing.assert_close(pooled[1], big_alone[0])
    torch.testing.assert_close(feats[0, :6], reference_blocks(enc, small, small_grid)[-2][1:])
    assert torch.isfinite(feats).all()


def test_position_tables_are_read_by_grid():
    """The same patches at other grid coordinates give other features (positions matter)."""
    enc = tiny_encoder()
    patches, grid = item(2, 2)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        a = enc.patch_features(patches[None], grid[None], mask)
        b = enc.patch_features(patches[None], (grid + 1)[None], mask)
    assert (a - b).abs().max() > 1e-3


def test_forward_flops_match_torch_flop_counter():
    enc = tiny_encoder()
    patches, grid = item(3, 4)
    counter = FlopCounterMode(display=False)
    # The flop counter sees attention only as the math backend's bmm's (the fused CPU kernel is not counted).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        enc.embed(patches[None], grid[None], torch.ones(1, 12, dtype=torch.bool))
    assert enc.forward_flops(12) == counter.get_total_flops()
    cfg = enc.cfg
    s = 13  # 12 patches + CLS
    block_weights = cfg.n_layers * (4 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.ffn_hidden)
    expected = 2 * 12 * 12 * 16 + 2 * block_weights * s + 4 * cfg.n_layers * cfg.dim * s * s + 2 * 16 * 8
    assert enc.forward_flops(12) == expected


def test_bad_inputs_name_the_field():
    enc = tiny_encoder()
    patches, grid = item(2, 2)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="patch_dim"):
        enc.embed(torch.zeros(1, 4, 7), grid[None], mask)
    with pytest.raises(ValueError, match="max_rows=5"):
        enc.embed(patches[None], (grid + torch.tensor([5, 0]))[None], mask)
    with pytest.raises(ValueError, match="layer=3 is out of range"):
        enc.patch_features(patches[None], grid[None], mask, layer=3)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"dim": 0}, "EncoderConfig.dim"),
        ({"dim": 18, "n_heads": 4}, "divisible by n_heads"),
        ({"embed_dim": -1}, "EncoderConfig.embed_dim"),
        ({"max_cols": 0}, "EncoderConfig.max_cols"),
        ({"norm_eps": 0.0}, "EncoderConfig.norm_eps"),
    ],
)
def test_encoder_config_refuses_bad_settings(overrides, field):
    kw = dict(patch_dim=12, dim=16, n_layers=2, n_heads=2)
    kw.update(overrides)
    with pytest.raises(ValueError, match=field):
        EncoderConfig(**kw)


def test_encoder_config_defaults():
    cfg = EncoderConfig(patch_dim=12, dim=16, n_layers=2, n_heads=2)
    assert (cfg.ffn_hidden, cfg.embed_dim, cfg.head_dim) == (64, 16, 8)
    assert PatchEncoder(cfg).width == 16


# ----------------------------------------------------------------------------- contrastive pair


def tiny_pair(modality: str = "image", **overrides) -> ContrastiveModel:
    torch.manual_seed(0)
    kw = dict(
        decoder=DecoderConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, ffn_hidden=64, attention="sdpa"),
        encoder=EncoderSize(dim=32, n_layers=2, n_heads=2, ffn_hidden=64), modality=modality, patch=2, embed_dim=16,
    )
    kw.update(overrides)
    return ContrastiveModel(ContrastiveConfig(**kw))


def reference_infonce(media: list[list[float]], text: list[list[float]], scale: float) -> float:
    """CLIP's loss written out with the math module: cosine logits, CE both ways, averaged."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    a, b = [unit(v) for v in media], [unit(v) for v in text]
    logits = [[scale * sum(x * y for x, y in zip(ai, bj)) for bj in b] for ai in a]
    k = len(a)
    m2t = sum(-logits[i][i] + math.log(sum(math.exp(logits[i][j]) for j in range(k))) for i in range(k)) / k
    t2m = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(k))) for j in range(k)) / k
    return (m2t + t2m) / 2


def test_clip_loss_matches_a_hand_computed_3x3_case():
    media = [[1.0, 0.0], [0.6, 0.8], [-1.0, 2.0]]
    text = [[2.0, 0.5], [0.0, 1.0], [-0.3, 0.4]]
    for scale in (1.0, 1 / 0.07, 100.0):
        got = clip_loss(torch.tensor(media), torch.tensor(text), torch.tensor(math.log(scale)))
        torch.testing.assert_close(got, torch.tensor(reference_infonce(media, text, scale)))
    # a perfectly aligned batch at a high temperature costs almost nothing; a shuffled one a lot
    eye = torch.eye(3)
    assert clip_loss(eye, eye, torch.tensor(math.log(100.0))) < 1e-3
    assert clip_loss(eye, eye[[1, 2, 0]], torch.tensor(math.log(100.0))) > 50


def pair_batch(model: ContrastiveModel, m: int = 4, n: int = 5, t: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t + 1, (m,), generator=g)
    text = torch.randint(9, model.cfg.decoder.vocab_size, (m, t), generator=g)
    text[torch.arange(t)[None, :] >= lengths[:, None]] = 0  # padding after </s>
    r, c = torch.meshgrid(torch.arange(1), torch.arange(n), indexing="ij")
    return {
        "patches": torch.randn(m, n, model.cfg.patch_dim, generator=g),
        "grid": torch.stack([r.reshape(-1), c.reshape(-1)], dim=1).expand(m, n, 2).clone(),
        "mask": torch.ones(m, n, dtype=torch.bool),
        "text": text,
        "text_lengths": lengths,
    }


def test_logit_scale_starts_at_clip_value_and_is_clamped_at_100():
    model = tiny_pair()
    batch = pair_batch(model)
    torch.testing.assert_close(model.clamped_logit_scale().exp(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) ~ 22026
    torch.testing.assert_close(model.clamped_logit_scale().exp(), torch.tensor(100.0))
    loss = model.loss(batch)
    with torch.no_grad():
        media, text = model(batch)
    torch.testing.assert_close(loss, clip_loss(media, text, torch.tensor(math.log(100.0))))
    loss.backward()
    assert model.logit_scale.grad == 0  # past the clamp the temperature gets no gradient
    model.zero_grad()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.loss(batch).backward()
    assert model.logit_scale.grad != 0


def test_text_tower_pools_the_eos_slot_and_ignores_padding():
    model = tiny_pair().eval()
    batch = pair_batch(model)
    with torch.no_grad():
        pooled = model.encode_text(batch["text"], batch["text_lengths"])
        for i, n in enumerate(batch["text_lengths"].tolist()):
            ids = batch["text"][i : i + 1, :n]  # the caption alone, no padding
            pos = torch.arange(n).view(1, n, 1).expand(1, n, 3)
            h = model.text.hidden(model.text.embed(ids), pos)[0, n - 1]
            torch.testing.assert_close(pooled[i], h @ model.text_proj.weight.T)
    assert pooled.shape == (4, 16)


def test_contrastive_training_lowers_the_loss():
    model = tiny_pair("audio")
    batch = pair_batch(model, m=6)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.loss(batch).item()
    for _ in range(30):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
    assert first > 1.5 and loss.item() < 0.5 * first


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"modality": "video"}, "ContrastiveConfig.modality"),
        ({"patch": 0}, "ContrastiveConfig.patch"),
        ({"init_logit_scale": 5.0}, "max_logit_scale"),
        ({"decoder": DecoderConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, tie_embeddings=False)},
         "tie_embeddings"),
        ({"encoder": EncoderSize(dim=30, n_layers=1, n_heads=4)}, "divisible by n_heads"),
    ],
)
def test_contrastive_config_refuses_bad_settings(overrides, field):
    kw = dict(decoder=DecoderConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2),
              encoder=EncoderSize(dim=32, n_layers=1, n_heads=2))
    kw.update(overrides)
    with pytest.raises(ValueError, match=field):
        ContrastiveConfig(**kw)


def test_contrastive_config_patch_width_per_modality():
    kw = dict(decoder={"vocab_size": 50, "dim": 32, "n_layers": 1, "n_heads": 2},
              encoder={"dim": 24, "n_layers": 1, "n_heads": 2}, patch=4)
    image, audio = ContrastiveConfig(modality="image", **kw), ContrastiveConfig(modality="audio", **kw)
    assert (image.patch_dim, audio.patch_dim, image.embed_dim) == (48, 16, 24)
    enc = audio.encoder_config()
    assert (enc.patch_dim, enc.dim, enc.ffn_hidden, enc.embed_dim) == (16, 24, 96, 24)


def test_unpatchify_inverts_patchify_for_images_and_spectrograms():
    from omnifuse.tokenizers.audio import patchify_spectrogram
    from omnifuse.tokenizers.image import patchify

    img = torch.rand(12, 8, 3)
    grid = torch.tensor([[r, c] for r in range(3) for c in range(2)])
    cut = torch.from_numpy(patchify(img.numpy(), 4)).reshape(6, 48)
    back = unpatchify(cut[None], grid[None], torch.ones(1, 6, dtype=torch.bool), 4)
    assert back.shape == (1, 3, 12, 8) and torch.equal(back[0], img.permute(2, 0, 1))
    spec = torch.rand(8, 12)
    cut = torch.from_numpy(patchify_spectrogram(spec, 4)).reshape(6, 16)
    grid = torch.tensor([[r, c] for r in range(2) for c in range(3)])
    back = unpatchify(cut[None], grid[None], torch.ones(1, 6, dtype=torch.bool), 4)
    assert torch.equal(back[0, 0], spec)
    # a padding patch (mask False) leaves its cell at zero, whatever it holds
    two = torch.stack([cut, cut.flip(0)])
    mask = torch.tensor([[True] * 6, [True] * 5 + [False]])
    back = unpatchify(two, torch.stack([grid, grid]), mask, 4)
    assert (back[1, 0, 4:, 8:] == 0).all() and torch.equal(back[0, 0], spec)

    grid = torch.tensor([[[0, 0], [0, 0]]])
    with pytest.raises(ValueError, match="share a grid cell"):
        unpatchify(torch.zeros(1, 2, 16), grid, torch.ones(1, 2, dtype=torch.bool), 4)


def conv_encoder(seed: int = 0) -> PatchEncoder:
    """A conv-stem encoder over RGB patches of side 4 (patch_dim 48)."""
    return tiny_encoder(seed, patch_dim=48, stem="conv", channels=3)


def test_conv_stem_is_a_convolution_over_the_laid_out_pixels():
    enc = conv_encoder()
    stem = enc.patch_embed
    img = torch.randn(12, 16, 3)  # a 3 x 4 grid of 4x4 patches
    patches = torch.from_numpy(patchify(img.numpy(), 4)).reshape(1, 12, 48)
    _, grid = item(3, 4)
    with torch.no_grad():
        tokens = stem(patches, grid[None], torch.ones(1, 12, dtype=torch.bool))
        x = img.permute(2, 0, 1)[None]  # (1, 3, 12, 16)
        convs = [m for m in stem.net if isinstance(m, torch.nn.Conv2d)]
        for conv in convs[:-1]:
            x = F.gelu(F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1))
        x = F.conv2d(x, convs[-1].weight, convs[-1].bias)  # (1, dim, 3, 4)
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]  # log2(4) stride-2 layers, then 1x1
    assert tokens.shape == (1, 12, 16)
    torch.testing.assert_close(tokens[0], x[0].permute(1, 2, 0).reshape(12, 16))


def test_conv_stem_padding_patches_change_no_real_feature():
    enc = conv_encoder()
    small, small_grid = item(2, 3, d=48, seed=2)
    big, big_grid = item(3, 4, d=48, seed=3)
    patches = torch.zeros(2, 12, 48)
    grid = torch.zeros(2, 12, 2, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    patches[0, :6], grid[0, :6], mask[0, :6] = small, small_grid, True
    patches[1], grid[1], mask[1] = big, big_grid, True
    patches[0, 6:] = 50 * torch.randn(6, 48)  # garbage padding values; coordinates that collide with real ones
    grid[0, 6:] = torch.tensor([1, 1])
    with torch.no_grad():
        pooled = enc.embed(patches, grid, mask)
        alone = enc.embed(small[None], small_grid[None], torch.ones(1, 6, dtype=torch.bool))
        big_alone = enc.embed(big[None], big_grid[None], torch.ones(1, 12, dtype=torch.bool))
        feats = enc.patch_features(patches, grid, mask)
        feats_alone = enc.patch_features(small[None], small_grid[None], torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(pooled[0], alone[0])
    torch.testing.assert_close(pooled[1], big_alone[0])
    torch.testing.assert_close(feats[0, :6], feats_alone[0])


def test_conv_stem_flops_match_torch_flop_counter():
    enc = conv_encoder()
    patches, grid = item(3, 4, d=48)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        enc.embed(patches[None], grid[None], torch.ones(1, 12, dtype=torch.bool))
    assert enc.forward_flops(12) == counter.get_total_flops()
    # by hand: 4x4 patches -> 3 -> 8 channels (2x2 cells), -> 16 (1 cell), 1x1 16 -> 16, per patch
    assert enc.embed_flops(1) == 2 * 9 * 3 * 8 * 4 + 2 * 9 * 8 * 16 + 2 * 16 * 16
    linear = tiny_encoder(patch_dim=48)
    assert enc.forward_flops(12) - enc.embed_flops(12) == linear.forward_flops(12) - linear.embed_flops(12)


@pytest.mark.parametrize("overrides", [{"patch_dim": 12, "channels": 3},  # 12 = 3 * 2 * 2: P = 2 is fine ...
                                       {"patch_dim": 27, "channels": 3},  # ... P = 3 is not a power of two
                                       {"patch_dim": 50, "channels": 3},  # not 3 * P * P
                                       {"stem": "resnet"}])
def test_encoder_config_checks_the_stem(overrides):
    kw = dict(patch_dim=48, dim=16, n_layers=1, n_heads=2, stem="conv", channels=3)
    kw.update(overrides)
    if kw["patch_dim"] == 12:
        assert EncoderConfig(**kw).patch == 2
        return
    with pytest.raises(ValueError, match="EncoderConfig.stem"):
        EncoderConfig(**kw)


def test_contrastive_config_passes_the_stem_and_channels():
    kw = dict(decoder={"vocab_size": 50, "dim": 32, "n_layers": 1, "n_heads": 2},
              encoder={"dim": 24, "n_layers": 1, "n_heads": 2}, patch=4, stem="conv")
    image, audio = ContrastiveConfig(modality="image", **kw).encoder_config(), \
        ContrastiveConfig(modality="audio", **kw).encoder_config()
    assert (image.stem, image.channels, image.patch, audio.channels, audio.patch) == ("conv", 3, 4, 1, 4)
    assert ContrastiveConfig(modality="image", **{**kw, "stem": "linear"}).encoder_config().stem == "linear"
    model = ContrastiveModel(ContrastiveConfig(modality="audio", **kw))
    assert isinstance(model.encoder.patch_embed, torch.nn.Module) and hasattr(model.encoder.patch_embed, "net")
