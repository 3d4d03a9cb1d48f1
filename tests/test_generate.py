"""Batched, KV-cached greedy decoding against the reference: every arm's tiny model decodes prompts
of different lengths (text only, images, audio) in one right-padded batch, and each row's tokens
equal those of a full recompute of that prompt alone (the decoding eval did before batching).

Also: the prompt's pass through the cache is the plain forward bit for bit, the padding is never
read, each row stops at its own EOS, and the suite's batching keeps answers and their order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnifuse.eval.suite import Scorer, prompt_batch
from omnifuse.model import DecoderConfig, NativeConfig, NativeFusion
from omnifuse.model.encoders import EncoderConfig
from omnifuse.model.flamingo import Flamingo, FlamingoConfig, ResamplerConfig
from omnifuse.model.llava import LLaVAConfig, LLaVAFusion
from omnifuse.tokenizers.interleave import Interleaver
from omnifuse.tokenizers.stream import TEXT

V, P, N_MELS = 48, 2, 4
NEW = 10  # new tokens per prompt


class CharTokenizer:
    """Stand-in for the SentencePiece model: one id per lowercase letter, after the specials."""

    vocab_size = V

    def encode(self, text: str) -> list[int]:
        return [9 + (ord(c) - ord("a")) % (V - 9) for c in text if c.isalpha()]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i - 9) for i in ids)


def image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def spectrogram(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(-4.0, 2.0, (N_MELS, frames)).astype(np.float32)


# Prompts of different lengths: text only (short and long), one image (two sizes), audio, both.
PROMPTS = [
    ([{"text": "ab"}], {}),
    ([{"media": "image", "file": "0.png"}, {"text": "what"}], {"0.png": image(4, 4, 0)}),
    ([{"text": "klmnopqrstuvwxyzabcdef"}], {}),
    ([{"text": "gh"}, {"media": "image", "file": "0.png"}, {"text": "ij"}], {"0.png": image(6, 4, 2)}),
    ([{"media": "audio", "file": "0.npy"}, {"text": "its sound"}], {"0.npy": spectrogram(6, 3)}),
    ([{"text": "x"}, {"media": "image", "file": "0.png"}, {"media": "audio", "file": "1.npy"}, {"text": "yz"}],
     {"0.png": image(4, 6, 4), "1.npy": spectrogram(4, 5)}),
]


def prompts(positions: str):
    il = Interleaver(CharTokenizer(), patch=P, n_mels=N_MELS, positions=positions)
    return [il.encode(segments, files, eos=False) for segments, files in PROMPTS]


def decoder_cfg(**kw) -> DecoderConfig:
    base = dict(vocab_size=V, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=128,
                attention="sdpa", init_std=1.0, tie_embeddings=False)  # a large init: greedy choices vary
    return DecoderConfig(**{**base, **kw})


def encoders() -> dict:
    enc = dict(dim=16, n_layers=2, n_heads=2, max_rows=4, max_cols=4, init_std=0.3)
    return dict(image_encoder=EncoderConfig(patch_dim=3 * P * P, **enc),
                audio_encoder=EncoderConfig(patch_dim=P * P, **enc))


def native() -> NativeFusion:
    torch.manual_seed(0)
    return NativeFusion(NativeConfig(decoder=decoder_cfg(), patch=P)).eval()


def llava() -> LLaVAFusion:
    torch.manual_seed(1)
    return LLaVAFusion(LLaVAConfig(decoder=decoder_cfg(positions="1d"), patch=P, **encoders())).eval()


def flamingo() -> Flamingo:
    torch.manual_seed(2)
    cfg = FlamingoConfig(decoder=decoder_cfg(), patch=P, cross_every=2,
                         resampler=ResamplerConfig(n_latents=3, n_layers=2, n_heads=2), **encoders())
    model = Flamingo(cfg).eval()
    with torch.no_grad():
        for layer in model.cross_attention_layers():  # open gates and strong media: the media change the answer
            layer.ca_scale.scale.fill_(1.5)
            layer.mlp_scale.scale.fill_(-1.5)
        for part in model.fusion_modules():
            for module in part.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.mul_(3.0)
    return model


ARMS = {"native": (native, "mrope"), "llava": (llava, "1d"), "flamingo": (flamingo, "mrope")}


def alone(model, p, eos_id=None, use_cache=False) -> list[int]:
    """The reference: one prompt, no padding; by default a full recompute at every step."""
    out = model.generate(p.tokens[None], p.modality[None], p.positions[None], p.image_patches, p.audio_patches,
                         max_new_tokens=NEW, eos_id=eos_id, use_cache=use_cache)
    return out[0].tolist()


def batched(model, ps, eos_id=None, use_cache=True, pad_token=None) -> torch.Tensor:
    b = prompt_batch(ps)
    if pad_token is not None:  # what sits in the padding must not matter
        b["tokens"][~(torch.arange(b["tokens"].shape[1]) < b["lengths"][:, None])] = pad_token
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in b.items()}
    return model.generate(b["tokens"], b["modality"], b["positions"], b["image_patches"], b["audio_patches"],
                          max_new_tokens=NEW, eos_id=eos_id, use_cache=use_cache, lengths=b["lengths"]).cpu()


@pytest.mark.parametrize("arm", list(ARMS))
@torch.no_grad()
def test_batched_cached_generation_equals_each_prompt_recomputed_alone(arm):
    build, positions = ARMS[arm]
    model, ps = build(), prompts(positions)
    assert len({len(p) for p in ps}) == len(ps)  # every prompt a different length
    want = [alone(model, p) for p in ps]
    assert len({tuple(w) for w in want}) == len(ps)  # the prompts (media included) lead to different answers
    assert all(len(set(w)) > 1 for w in want)  # not constant continuations
    got = batched(model, ps)
    assert got.tolist() == want
    # the padding is never read; the cache is torn down; today's one-at-a-time cached decoding agrees too
    assert torch.equal(batched(model, ps, pad_token=7), got)
    assert not model.decoder.caches_are_enabled()
    assert [alone(model, p, use_cache=True) for p in ps] == want
    # the recomputing path takes padded rows too (the reference of the cache on a batch)
    assert torch.equal(batched(model, ps, use_cache=False), got)
    # another order, another batch: each row's tokens are its prompt's
    order = [3, 0, 5, 1]
    assert batched(model, [ps[i] for i in order]).tolist() == [want[i] for i in order]


@pytest.mark.parametrize("arm", list(ARMS))
@torch.no_grad()
def test_each_row_stops_at_its_own_eos(arm):
    build, positions = ARMS[arm]
    model, ps = build(), prompts(positions)
    want = [alone(model, p) for p in ps]
    eos = want[2][3]  # the fourth token of row 2: rows stop at its first occurrence, if any
    got = batched(model, ps, eos_id=eos).tolist()
    for w, g in zip(want, got):
        n = w.index(eos) + 1 if eos in w else len(w)
        assert g[:n] == w[:n] and all(t == eos for t in g[n:])
    assert len(got[0]) == max(w.index(eos) + 1 if eos in w else len(w) for w in want)
    # every row done: the loop stops early
    stop = [w[0] for w in want]
    if len(set(stop)) == 1:
        assert batched(model, ps, eos_id=stop[0]).shape == (len(ps), 1)


@torch.no_grad()
def test_the_prompt_pass_through_the_cache_is_the_plain_forward():
    """Prompt logits through the KV cache are the uncached forward's, bit for bit (the same mask and
    kernel); the decode step after a right-padded prompt continues each row at its own offset."""
    model, ps = native(), prompts("mrope")
    b = prompt_batch(ps)
    dec = model.decoder
    h = model.embed(b["tokens"], b["modality"], b["image_patches"], b["audio_patches"])
    plain = dec(h, b["positions"])  # (B, L, V)
    dec.setup_caches(len(ps), b["tokens"].shape[1] + 2)
    cached = dec(h, b["positions"], lengths=b["lengths"])
    assert torch.equal(cached, plain)
    # one more slot per row: row r's token at offset lengths[r], seeing its own prompt only
    nxt = torch.tensor([[11], [12], [13], [14], [15], [16]])
    pos = torch.stack([p.positions.amax() + 1 for p in ps]).view(-1, 1, 1).expand(-1, 1, 3)
    step = dec(model.embed_text(nxt), pos)[:, 0]  # (B, V)
    dec.teardown_caches()
    for r, p in enumerate(ps):
        tokens = torch.cat([p.tokens, nxt[r]])[None]
        modality = torch.cat([p.modality, torch.tensor([TEXT])])[None]
        positions = torch.cat([p.positions, pos[r]])[None]
        ref = model(tokens, modality, positions, p.image_patches, p.audio_patches)[0, -1]
        torch.testing.assert_close(step[r], ref, rtol=1e-4, atol=1e-4)  # logits of size ~10: float noise
    with pytest.raises(ValueError, match="lengths must lie in"):
        dec.setup_caches(2, 20)
        try:
            dec(torch.zeros(2, 3, 32), torch.zeros(2, 3, 3, dtype=torch.long), lengths=torch.tensor([3, 4]))
        finally:
            dec.teardown_caches()


@torch.no_grad()
def test_embed_text_is_embed_on_text_slots():
    tokens = torch.randint(9, V, (3, 5))
    text = torch.full_like(tokens, TEXT)
    for model in (native(), llava()):
        assert torch.equal(model.embed_text(tokens), model.embed(tokens, text))


@torch.no_grad()
def test_scorer_batches_keep_every_answer_and_its_order():
    """Scorer.generate_ids_many sorts prompts by length and decodes batch_size at a time; the
    answers come back in the prompts' order, the same whatever the batch size."""
    model, ps = native(), prompts("mrope")
    il = Interleaver(CharTokenizer(), patch=P, n_mels=N_MELS)
    many = [ps[i] for i in (2, 0, 5, 2, 1, 3, 4, 0)]  # repeated lengths, not sorted
    want = [alone(model, p, use_cache=True) for p in many]
    for bs in (1, 3, 32):
        assert Scorer(model, il, max_new_tokens=NEW, batch_size=bs).generate_ids_many(many, eos=False) == want
    with pytest.raises(ValueError, match="batch_size"):
        Scorer(model, il, batch_size=0)


# compiling takes tens of seconds per arm on CPU: there the native arm stands for all (bench/decode.py
# --compile runs every arm); on a GPU every arm
@pytest.mark.parametrize("arm", list(ARMS) if torch.cuda.is_available() else ["native"])
@torch.no_grad()
def test_compiled_decode_step_gives_the_same_tokens(arm):
    build, positions = ARMS[arm]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, ps = build().to(device), prompts(positions)
    want = batched(model, ps)
    model.compile_decoding()
    try:
        assert torch.equal(batched(model, ps), want)
        assert torch.equal(batched(model, ps[:3]), want[:3])  # another batch and cache size: compiled again
    finally:
        model.compile_decoding(False)
