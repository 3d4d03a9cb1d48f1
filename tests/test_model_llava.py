"""The LLaVA arm: projectors against hand computations, media slots filled by encoder + projector per
item, cached = uncached decoding, frozen encoders stay frozen, configs refuse contradictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from omnifuse.model.config import DecoderConfig
from omnifuse.model.encoders import EncoderConfig
from omnifuse.model.llava import LLaVAConfig, LLaVAFusion, build_projector
from omnifuse.tokenizers.interleave import _StreamBuilder
from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT
from omnifuse.tokenizers.text import AUD_END_ID, AUD_ID, IMG_END_ID, IMG_ID

V, P = 40, 2
D_IMG, D_AUD = 3 * P * P, P * P


def tiny_cfg(projector: str = "mlp2x_gelu", **decoder) -> LLaVAConfig:
    dec = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=96,
               attention="sdpa", positions="1d")
    return LLaVAConfig(
        decoder=DecoderConfig(**{**dec, **decoder}),
        image_encoder=EncoderConfig(patch_dim=D_IMG, dim=24, n_layers=3, n_heads=2, max_rows=8, max_cols=8),
        audio_encoder=EncoderConfig(patch_dim=D_AUD, dim=16, n_layers=2, n_heads=2, max_rows=8, max_cols=8),
        patch=P,
        projector=projector,
    )


def tiny_model(seed: int = 0, projector: str = "mlp2x_gelu", **decoder) -> LLaVAFusion:
    torch.manual_seed(seed)
    return LLaVAFusion(tiny_cfg(projector, **decoder))


def document(media: list[tuple[int, int, int]], seed: int):
    """Text, then each (kind, rows, cols) medium in its markers followed by text; 1-D positions.
    Returns the stream and, per medium, its (rows, cols, d) patch grid."""
    rng = np.random.default_rng(seed)
    b = _StreamBuilder("1d", D_IMG, D_AUD)
    b.text(rng.integers(10, V, 3).tolist())
    grids = []
    for kind, rows, cols in media:
        opener, closer, d = (IMG_ID, IMG_END_ID, D_IMG) if kind == IMAGE else (AUD_ID, AUD_END_ID, D_AUD)
        g = rng.standard_normal((rows, cols, d)).astype(np.float32)
        grids.append((kind, g))
        b.token(opener)
        b.grid(g, kind)
        b.token(closer)
        b.text(rng.integers(10, V, 2).tolist())
    return b.build(), grids


def packed(rows: list[list]):
    """Rows of streams -> a (B, L) batch (padding: pad id, TEXT, own doc id -1) + patches in slot order."""
    length = max(sum(len(s) for s in row) for row in rows) + 2
    n = len(rows)
    tokens = torch.zeros(n, length, dtype=torch.long)
    modality = torch.zeros_like(tokens)
    positions = torch.zeros(n, length, 3, dtype=torch.long)
    doc_ids = torch.full_like(tokens, -1)
    img, aud = [], []
    for i, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row):
            sl = slice(at, at + len(s))
            tokens[i, sl], modality[i, sl], positions[i, sl], doc_ids[i, sl] = s.tokens, s.modality, s.positions, k
            img.append(s.image_patches)
            aud.append(s.audio_patches)
            at += len(s)
    return tokens, modality, positions, doc_ids, torch.cat(img), torch.cat(aud)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_projector_maps_features_to_decoder_width(kind):
    torch.manual_seed(0)
    proj = build_projector(kind, 24, 32)
    x = torch.randn(7, 24)
    out = proj(x)
    if kind == "linear":
        want = x @ proj.weight.T + proj.bias
        assert sum(p.numel() for p in proj.parameters()) == 24 * 32 + 32
    else:
        w1, b1, w2, b2 = proj[0].weight, proj[0].bias, proj[2].weight, proj[2].bias
        want = gelu(x @ w1.T + b1) @ w2.T + b2
        assert sum(p.numel() for p in proj.parameters()) == 24 * 32 + 32 + 32 * 32 + 32
    assert out.shape == (7, 32)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="projector must be one of"):
        build_projector("mlp3x", 24, 32)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_embedding_is_encoder_then_projector_per_item(kind):
    model = tiny_model(projector=kind).eval()
    rows = [
        [document([(IMAGE, 2, 3), (AUDIO, 3, 2)], seed=1), document([(IMAGE, 1, 2)], seed=2)],
        [document([(AUDIO, 2, 4), (IMAGE, 3, 3)], seed=3)],
    ]
    tokens, modality, positions, doc_ids, img, aud = packed([[s for s, _ in row] for row in rows])
    with torch.no_grad():
        h = model.embed(tokens, modality, img, aud)  # (B, L, D)
    assert h.shape == (*tokens.shape, 32)

    # the reference, one item at a time: its patch grid through the encoder alone (no padding), block
    # -2, CLS dropped, through the projector; the slots are the item's patch slots in raster order
    want = model.decoder.tok_embeddings(tokens).detach().clone()  # text slots: tok_embeddings(token), nothing added
    for i, row in enumerate(rows):
        at = 0
        for stream, grids in row:
            slots = {IMAGE: (stream.modality == IMAGE).nonzero().squeeze(1).tolist(),
                     AUDIO: (stream.modality == AUDIO).nonzero().squeeze(1).tolist()}
            used = {IMAGE: 0, AUDIO: 0}
            for kind_, g in grids:
                r, c, d = g.shape
                enc, proj = ((model.image_encoder, model.image_projector) if kind_ == IMAGE
                             else (model.audio_encoder, model.audio_projector))
                patches = torch.from_numpy(g.reshape(1, r * c, d))
                rr, cc = torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij")
                grid = torch.stack([rr.flatten(), cc.flatten()], -1)[None]  # (1, r*c, 2)
                with torch.no_grad():
                    feats = enc.patch_features(patches, grid, torch.ones(1, r * c, dtype=torch.bool), layer=-2)[0]
                    mine = slots[kind_][used[kind_] : used[kind_] + r * c]
                    want[i, [at + s for s in mine]] = proj(feats)
                used[kind_] += r * c
            at += len(stream)
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)

    # a medium's features reach only its own slots: changing one clip leaves every other slot alone
    aud2 = aud.clone()
    aud2[:6] += 1.0  # the first clip (3 x 2 patches)
    with torch.no_grad():
        h2 = model.embed(tokens, modality, img, aud2)
    changed = (h2 - h).abs().amax(-1) > 0  # (B, L)
    first_clip = (modality == AUDIO).flatten().nonzero().squeeze(1)[:6]
    expect = torch.zeros(tokens.numel(), dtype=torch.bool)
    expect[first_clip] = True
    assert torch.equal(changed.flatten(), expect)

    with pytest.raises(ValueError, match="patches for a layout of"):
        model.embed(tokens, modality, img[:-1], aud)


def test_forward_is_the_decoder_on_the_embedding_and_packing_keeps_documents_apart():
    model = tiny_model().eval()
    a, _ = document([(IMAGE, 2, 2), (AUDIO, 2, 2)], seed=5)
    b, _ = document([(AUDIO, 1, 3)], seed=6)
    tokens, modality, positions, doc_ids, img, aud = packed([[a, b]])
    with torch.no_grad():
        logits = model(tokens, modality, positions, img, aud, doc_ids)
        want = model.decoder(model.embed(tokens, modality, img, aud), positions, doc_ids)
        alone = [model(*packed([[s]])[:3], s.image_patches, s.audio_patches) for s in (a, b)]
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    torch.testing.assert_close(logits[0, : len(a)], alone[0][0, : len(a)], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0, len(a) : len(a) + len(b)], alone[1][0, : len(b)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_cached_generation_equals_uncached(kind):
    model = tiny_model(projector=kind, init_std=0.3).eval()  # a large init makes greedy choices vary
    docs = [document([(IMAGE, 2, 3), (AUDIO, 2, 2)], seed=7), document([(AUDIO, 2, 3), (IMAGE, 2, 2)], seed=8)]
    assert len(docs[0][0]) == len(docs[1][0])  # generate takes rows of equal length
    tokens, modality, positions, _, img, aud = packed([[s] for s, _ in docs])
    n = len(docs[0][0])
    tokens, modality, positions = tokens[:, :n], modality[:, :n], positions[:, :n]
    cached = model.generate(tokens, modality, positions, img, aud, max_new_tokens=12)
    uncached = model.generate(tokens, modality, positions, img, aud, max_new_tokens=12, use_cache=False)
    assert cached.shape == (2, 12) and torch.equal(cached, uncached)
    assert len(set(cached.flatten().tolist())) > 2  # not a degenerate constant stream
    alone = model.generate(tokens[:1], modality[:1], positions[:1], docs[0][0].image_patches,
                           docs[0][0].audio_patches, max_new_tokens=12)
    assert torch.equal(alone, cached[:1])
    assert not model.decoder.caches_are_enabled()


def test_encoders_are_frozen_and_projectors_learn():
    model = tiny_model().train()
    s, _ = document([(IMAGE, 2, 2), (AUDIO, 2, 2)], seed=9)
    tokens, modality, positions, doc_ids, img, aud = packed([[s]])
    labels = torch.roll(tokens, -1, 1).masked_fill(torch.roll(modality, -1, 1) != TEXT, -100)
    batch = dict(tokens=tokens, modality=modality, positions=positions, doc_ids=doc_ids, labels=labels,
                 image_patches=img, audio_patches=aud)
    assert all(not p.requires_grad for enc in model.encoders() for p in enc.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss, _ = model.loss(batch)
    loss.backward()
    for enc in model.encoders():
        assert all(p.grad is None for p in enc.parameters())
    for proj in model.projectors():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if "encoder" in k:
            assert torch.equal(after[k], v), k
    assert not torch.equal(after["image_projector.0.weight"], before["image_projector.0.weight"])
    # a batch without audio still puts the audio projector in the graph (zero gradient), for DDP
    t, _ = document([(IMAGE, 1, 2)], seed=10)
    tokens, modality, positions, doc_ids, img, aud = packed([[t]])
    model.zero_grad(set_to_none=True)
    logits = model(tokens, modality, positions, img, None, doc_ids)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.audio_projector.parameters())


def test_encoder_flops_per_item():
    model = tiny_model()
    rows = [[document([(IMAGE, 2, 3), (AUDIO, 3, 2)], seed=1)[0], document([(IMAGE, 2, 3)], seed=2)[0]]]
    tokens, modality, *_ = packed(rows)
    want = 2 * model.image_encoder.forward_flops(6) + model.audio_encoder.forward_flops(6)
    assert model.encoder_forward_flops(tokens, modality) == want
    assert model.projector_params() == (24 * 32 + 32 + 32 * 32 + 32, 16 * 32 + 32 + 32 * 32 + 32)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(patch=3), "image_encoder.patch_dim"),
        (dict(feature_layer=3), "feature_layer"),
        (dict(feature_layer=-4), "feature_layer"),
        (dict(projector="mlp3x"), "projector"),
        (dict(patch=0), "patch"),
    ],
)
def test_config_refuses_contradictions(change, field):
    base = tiny_cfg()
    kw = dict(decoder=base.decoder, image_encoder=base.image_encoder, audio_encoder=base.audio_encoder, patch=P)
    with pytest.raises(ValueError, match=f"LLaVAConfig.{field}"):
        LLaVAConfig(**{**kw, **change})
    with pytest.raises(ValueError, match="LLaVAConfig.image_encoder is None"):
        LLaVAFusion(LLaVAConfig(decoder=base.decoder, audio_encoder=base.audio_encoder, patch=P))
    from_dicts = LLaVAConfig(decoder=vars(base.decoder), image_encoder=vars(base.image_encoder),
                             audio_encoder=vars(base.audio_encoder), patch=P)
    assert from_dicts == base
