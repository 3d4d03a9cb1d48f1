"""The native early-fusion model: media slots come from the patches, the loss counts labelled
slots only, cached decoding equals uncached decoding, and a tiny model overfits a few samples."""

import time

import pytest
import torch
import torch.nn.functional as F

from omnifuse.model import DecoderConfig, NativeConfig, NativeFusion, lm_loss
from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT

V = 40


def tiny_model(seed: int = 0, **kw) -> NativeFusion:
    torch.manual_seed(seed)
    base = dict(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64,
                attention="sdpa")
    return NativeFusion(NativeConfig(decoder=DecoderConfig(**{**base, **kw}), patch=2))


def sample(seed: int, n: int = 14, image_at=(3, 4, 5, 6), audio_at=(9, 10)):
    """One document: tokens, modality, positions (B=1), image and audio patches."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, V, (1, n), generator=g)
    modality = torch.full((1, n), TEXT)
    modality[0, list(image_at)] = IMAGE
    modality[0, list(audio_at)] = AUDIO
    tokens[modality != TEXT] = 0  # pad id in media slots
    positions = torch.arange(n).view(1, n, 1).expand(1, n, 3).clone()
    img = torch.rand(len(image_at), 12, generator=g)
    aud = torch.randn(len(audio_at), 4, generator=g)
    return tokens, modality, positions, img, aud


def test_media_slots_come_from_the_patches_causally():
    model = tiny_model().eval()
    tokens, modality, positions, img, aud = sample(0)
    with torch.no_grad():
        base = model(tokens, modality, positions, img, aud)
        img2 = img.clone()
        img2[1] += 1.0  # the second image slot: index 4
        aud2 = aud.clone()
        aud2[0] -= 1.0  # the first audio slot: index 9
        by_img = model(tokens, modality, positions, img2, aud)
        by_aud = model(tokens, modality, positions, img, aud2)
        tokens2 = tokens.clone()
        tokens2[0, 4] = 7  # the token id under a media slot is ignored
        by_tok = model(tokens2, modality, positions, img, aud)
    for changed, at in ((by_img, 4), (by_aud, 9)):
        diff = (changed - base).abs().amax(dim=-1)[0]  # (S,)
        assert diff[:at].max() == 0
        assert (diff[at:] > 1e-6).all()
    torch.testing.assert_close(by_tok, base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="4 image slots but 3 image patches"):
        model(tokens, modality, positions, img[:3], aud)


def test_loss_counts_only_labelled_slots():
    model = tiny_model().eval()
    t0, m0, p0, img, aud = sample(1)
    t1, m1, p1, _, _ = sample(2, n=6, image_at=(), audio_at=())
    # one row: document 0 (14 slots, answer = its last 4 text slots) then document 1 (no labels)
    tokens, modality, positions = torch.cat([t0, t1], 1), torch.cat([m0, m1], 1), torch.cat([p0, p1], 1)
    doc_ids = torch.tensor([[0] * 14 + [1] * 6])
    labels = torch.full((1, 20), -100)
    labels[0, 10:13] = tokens[0, 11:14]  # slot i predicts slot i+1 inside the answer
    batch = dict(tokens=tokens, modality=modality, positions=positions, doc_ids=doc_ids, labels=labels,
                 image_patches=img, audio_patches=aud)
    with torch.no_grad():
        loss, per_slot = model.loss(batch)
        logits = model(tokens, modality, positions, img, aud, doc_ids)
    # hand computation
    logp = F.log_softmax(logits[0].double(), dim=-1)
    want = -torch.stack([logp[i, labels[0, i]] for i in (10, 11, 12)]).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert per_slot.shape == (1, 20) and (per_slot[labels == -100] == 0).all()
    # tokens that are not targets and come after them, or in another document, change nothing
    other = dict(batch, tokens=tokens.clone())
    other["tokens"][0, 14:] = torch.randint(3, V, (6,))
    other["tokens"][0, 13] = 5  # after the last labelled slot (12)
    with torch.no_grad():
        torch.testing.assert_close(model.loss(other)[0], loss, rtol=0, atol=0)
    # a slot without a label counts for nothing, whatever the logits: no labels -> 0, not NaN
    none = lm_loss(logits, torch.full_like(labels, -100))[0]
    assert none.item() == 0.0


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=1, qk_norm=False, tie_embeddings=False, positions="1d")])
def test_cached_decoding_equals_full_forward(kw):
    model = tiny_model(init_std=0.3, **kw).eval()  # a large init makes greedy choices vary
    tokens, modality, positions, img, aud = sample(3)
    with torch.no_grad():
        full = model(tokens, modality, positions, img, aud)  # (1, 14, V)
        dec = model.decoder
        dec.setup_caches(1, 20)
        h = model.embed(tokens, modality, img, aud)
        pre = dec(h[:, :9], positions[:, :9])  # prefill, then one slot at a time
        steps = [dec(h[:, i : i + 1], positions[:, i : i + 1]) for i in range(9, 14)]
        dec.teardown_caches()
    torch.testing.assert_close(torch.cat([pre, *steps], dim=1), full, rtol=1e-5, atol=1e-5)
    assert not dec.caches_are_enabled()

    with torch.no_grad():
        cached = model.generate(tokens, modality, positions, img, aud, max_new_tokens=12)
        uncached = model.generate(tokens, modality, positions, img, aud, max_new_tokens=12, use_cache=False)
    assert cached.shape == (1, 12) and torch.equal(cached, uncached)
    assert len(set(cached[0].tolist())) > 1  # not a degenerate constant stream


def test_generate_batch_and_eos():
    model = tiny_model(init_std=0.3).eval()
    a, b = sample(4), sample(5, image_at=(1, 2, 7, 8), audio_at=(11, 12))
    tokens, modality, positions = (torch.cat([x, y]) for x, y in zip(a[:3], b[:3]))
    img, aud = torch.cat([a[3], b[3]]), torch.cat([a[4], b[4]])
    both = model.generate(tokens, modality, positions, img, aud, max_new_tokens=10)
    alone = [model.generate(*s, max_new_tokens=10) for s in (a, b)]
    assert torch.equal(both, torch.cat(alone))
    assert torch.equal(both, model.generate(tokens, modality, positions, img, aud, max_new_tokens=10, use_cache=False))
    eos = int(alone[0][0, 2])  # stop at the third token of row 0
    out = model.generate(*a, max_new_tokens=10, eos_id=eos)
    first = alone[0][0].tolist().index(eos)
    assert out.shape == (1, first + 1) and int(out[0, -1]) == eos
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(*a, max_new_tokens=60)


def test_tiny_model_overfits_mixed_samples():
    model = tiny_model(seed=0).train()
    docs = [sample(10 + i, n=12, image_at=(2, 3, 4, 5)[: 4 - i], audio_at=(8,) * (i % 2)) for i in range(4)]
    tokens, modality, positions = (torch.cat(x) for x in zip(*(d[:3] for d in docs)))
    labels = torch.full_like(tokens, -100)
    nxt_text = torch.zeros_like(modality, dtype=torch.bool)
    nxt_text[:, :-1] = modality[:, 1:] == TEXT
    labels[:, :-1] = tokens[:, 1:]
    labels[~nxt_text] = -100
    labels[:, :6] = -100  # the prompt, including the media, is not a target
    batch = dict(tokens=tokens, modality=modality, positions=positions, labels=labels,
                 image_patches=torch.cat([d[3] for d in docs]), audio_patches=torch.cat([d[4] for d in docs]))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(300):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05, f"loss {loss.item():.3f} after {step + 1} steps"
    assert time.perf_counter() - start < 30


def test_bf16_autocast_train_step_and_generate():
    model = tiny_model()
    tokens, modality, positions, img, aud = sample(6)
    labels = torch.roll(tokens, -1, 1).masked_fill(modality != TEXT, -100)
    batch = dict(tokens=tokens, modality=modality, positions=positions, labels=labels,
                 image_patches=img, audio_patches=aud)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(batch)
        out = model.generate(tokens, modality, positions, img, aud, max_new_tokens=4)
    loss.backward()
    assert torch.isfinite(loss) and out.shape == (1, 4)
    assert model.image_proj.weight.grad.abs().sum() > 0 and model.audio_proj.weight.grad.abs().sum() > 0


def test_text_only_model_is_the_decoder_over_token_embeddings():
    """patch_projections=False, modality_embedding=False: no weight the LM never uses, logits =
    Decoder(tok_embeddings(tokens)), the same parameters as the native model minus its projections."""
    base = dict(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64,
                attention="sdpa")
    torch.manual_seed(0)
    lm = NativeFusion(NativeConfig(decoder=DecoderConfig(**base), patch=2, modality_embedding=False,
                                   patch_projections=False)).eval()
    native = NativeFusion(NativeConfig(decoder=DecoderConfig(**base), patch=2, modality_embedding=False))
    assert lm.image_proj is None and lm.audio_proj is None and lm.modality_embeddings is None
    projections = (12 * 64 + 64) + (4 * 64 + 64)  # image (3·2², D) and audio (2², D) linear layers
    assert lm.num_params() == native.num_params() - projections == sum(p.numel() for p in lm.decoder.parameters())
    assert lm.flops_per_token(14) == lm.decoder.flops_per_token(14)
    tokens, _, positions, _, _ = sample(1)
    text = torch.full_like(tokens, TEXT)
    with torch.no_grad():
        reference = lm.decoder(lm.decoder.tok_embeddings(tokens), positions)
        torch.testing.assert_close(lm(tokens, text, positions), reference, rtol=0, atol=0)
        torch.testing.assert_close(lm(tokens, text, positions, torch.zeros(0, 12), torch.zeros(0, 4)), reference,
                                   rtol=0, atol=0)
    _, modality, _, img, aud = sample(1)
    with pytest.raises(ValueError, match="6 media slots and 6 patches.*patch_projections"):
        lm(tokens, modality, positions, img, aud)
