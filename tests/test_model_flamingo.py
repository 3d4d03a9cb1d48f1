"""The Flamingo arm: exactly the LM at init (on the marker stream, packed and unpacked), which slot
sees which medium, packed = unpacked, cached = uncached decoding, config checks."""

import numpy as np
import pytest
import torch

from omnifuse.data.packing import Doc, build_row, collate_rows
from omnifuse.model import Decoder, DecoderConfig
from omnifuse.model.encoders import EncoderConfig
from omnifuse.model.flamingo import Flamingo, FlamingoConfig, ResamplerConfig
from omnifuse.tokenizers.interleave import Interleaver
from omnifuse.tokenizers.text import EOS_ID

V = 48
P = 2  # patch side: image patches 3*P*P = 12 values, audio patches P*P = 4
N_MELS = 4


class CharTokenizer:
    """Stand-in for the SentencePiece model: one id per lowercase letter, after the specials."""

    vocab_size = V

    def encode(self, text: str) -> list[int]:
        return [9 + (ord(c) - ord("a")) % (V - 9) for c in text if c.isalpha()]


def interleaver(media: str) -> Interleaver:
    return Interleaver(CharTokenizer(), patch=P, n_mels=N_MELS, media=media)


def image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def spectrogram(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(-4.0, 2.0, (N_MELS, frames)).astype(np.float32)


# Three documents: media in the middle, an image after some text, text only.
DOCS = [
    ([{"text": "ab"}, {"media": "image", "file": "0.png"}, {"text": "cd"}, {"media": "audio", "file": "1.npy"},
      {"text": "ef", "target": True}], {"0.png": image(4, 4, 0), "1.npy": spectrogram(4, 1)}),
    ([{"text": "gh"}, {"media": "image", "file": "0.png"}, {"text": "ij", "target": True}], {"0.png": image(6, 4, 2)}),
    ([{"text": "klm"}, {"text": "no", "target": True}], {}),
]


def streams(media: str):
    il = interleaver(media)
    return [il.encode(segments, files) for segments, files in DOCS]


def config(decoder_kw: dict | None = None, **kw) -> FlamingoConfig:
    decoder = DecoderConfig(vocab_size=V, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                            max_seq_len=128, attention="sdpa", **(decoder_kw or {}))
    enc = dict(dim=16, n_layers=2, n_heads=2, max_rows=4, max_cols=4)
    base = dict(
        decoder=decoder, patch=P,
        image_encoder=EncoderConfig(patch_dim=3 * P * P, **enc), audio_encoder=EncoderConfig(patch_dim=P * P, **enc),
        resampler=ResamplerConfig(n_latents=3, n_layers=2, n_heads=2), cross_every=2,
    )
    return FlamingoConfig(**{**base, **kw})


def models(seed: int = 0, **kw) -> tuple[Flamingo, Decoder]:
    """A Flamingo model and the plain LM whose weights it carries."""
    cfg = config(**kw)
    torch.manual_seed(seed)
    lm = Decoder(cfg.decoder).eval()
    model = Flamingo(cfg).eval()
    model.load_pretrained(lm=lm.state_dict())
    return model, lm


def open_gates(model: Flamingo, alpha: float = 0.7) -> None:
    for layer in model.cross_attention_layers():
        layer.ca_scale.scale.data.fill_(alpha)
        layer.mlp_scale.scale.data.fill_(-alpha)


def batch_of(docs, row_len: int) -> dict[str, torch.Tensor]:
    return collate_rows([build_row([Doc(s, task=0) for s in docs], row_len)])


def call(model, b, doc_ids=True):
    return model(b["tokens"], b["modality"], b["positions"], b["image_patches"], b["audio_patches"],
                 b["doc_ids"] if doc_ids else None)


# ---- exact at init ----------------------------------------------------------------------------


@torch.no_grad()
def test_closed_gates_give_the_lm_logits_exactly_on_the_marker_stream_unpacked():
    model, lm = models()
    inline, marker = streams("inline")[0], streams("marker")[0]
    kept = model.lm_stream(inline.tokens[None], inline.modality[None], inline.image_patches,
                           inline.audio_patches).kept[0]
    assert torch.equal(inline.tokens[kept], marker.tokens)  # the stream the LM stage trained on
    logits = model(inline.tokens[None], inline.modality[None], inline.positions[None], inline.image_patches,
                   inline.audio_patches)[0]  # (L, V)
    ref = lm(lm.embed(marker.tokens[None]), marker.positions[None])[0]  # (S, V)
    assert torch.equal(logits[kept], ref)
    assert torch.equal(logits[~kept], torch.zeros_like(logits[~kept]))  # patch and <row> slots
    open_gates(model)  # the test can fail: with open gates the media change the logits
    opened = model(inline.tokens[None], inline.modality[None], inline.positions[None], inline.image_patches,
                   inline.audio_patches)[0][kept]
    first_medium = int((marker.tokens == 4).nonzero()[0])  # <img>
    assert torch.equal(opened[:first_medium], ref[:first_medium])  # nothing before the first medium
    assert (opened[first_medium:] - ref[first_medium:]).abs().amax(dim=-1).min() > 1e-6


@torch.no_grad()
def test_closed_gates_give_the_lm_logits_exactly_on_the_marker_stream_packed():
    model, lm = models(seed=1)
    inline, marker = streams("inline"), streams("marker")
    row_len = sum(map(len, inline)) + 5  # five padding slots at the end
    b = batch_of(inline, row_len)
    removed = row_len - 5 - sum(map(len, marker))
    ref_b = batch_of(marker, row_len - removed)
    logits = call(model, b)  # (1, L, V)
    stream = model.lm_stream(b["tokens"], b["modality"], b["image_patches"], b["audio_patches"], b["doc_ids"])
    assert torch.equal(stream.tokens, ref_b["tokens"]) and torch.equal(stream.doc_ids, ref_b["doc_ids"])
    ref = lm(lm.embed(ref_b["tokens"]), ref_b["positions"], ref_b["doc_ids"])  # (1, S, V)
    real = ref_b["doc_ids"][0] >= 0  # padding slots are compared by nobody
    assert torch.equal(logits[0][stream.kept[0]][real], ref[0][real])


# ---- where the media go -----------------------------------------------------------------------


def test_media_mask_on_a_hand_built_packed_row():
    """Which medium each LM slot sees: the last marker of its own document at or before it."""
    model, _ = models()
    b = batch_of(streams("inline"), 64)
    s = model.lm_stream(b["tokens"], b["modality"], b["image_patches"], b["audio_patches"], b["doc_ids"])
    # doc 0: <s> a b <img> </img> c d <aud> </aud> e f </s>   media 0 (image), 1 (audio)
    # doc 1: <s> g h <img> </img> i j </s>                    media 2 (image)
    # doc 2: <s> k l m n o </s>                               none; then padding
    expected = ([-1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1, 1]
                + [-1, -1, -1, 2, 2, 2, 2, 2]
                + [-1] * 7)
    n = len(expected)
    assert s.medium[0, :n].tolist() == expected
    assert (s.medium[0, n:] == -1).all()  # padding sees nothing
    r = 3  # latents per medium
    assert s.media.shape == (1, 3 * r, 32) and s.media_mask.shape == (1, s.tokens.shape[1], 3 * r)
    want = torch.zeros_like(s.media_mask)
    for q, m in enumerate(s.medium[0].tolist()):
        if m >= 0:
            want[0, q, m * r:(m + 1) * r] = True
    assert torch.equal(s.media_mask, want)
    # 1-D positions restart at 0 in every document
    assert s.positions[0, :n, 0].tolist() == list(range(12)) + list(range(8)) + list(range(7))
    assert torch.equal(s.positions[..., 0], s.positions[..., 1]) and torch.equal(s.positions[..., 0], s.positions[..., 2])


@torch.no_grad()
def test_a_medium_reaches_its_marker_and_the_slots_after_it_only():
    model, _ = models(seed=2)
    open_gates(model)
    inline = streams("inline")[0]
    args = (inline.tokens[None], inline.modality[None], inline.positions[None])
    base = model(*args, inline.image_patches, inline.audio_patches)[0]
    changed = model(*args, inline.image_patches + 1.0, inline.audio_patches)[0]
    kept = (inline.modality == 0) & (inline.tokens != 8)
    diff = (changed - base).abs().amax(dim=-1)[kept]  # (S,) over the LM stream
    img_at = 3  # <s> a b <img>
    assert diff[:img_at].max() == 0
    assert (diff[img_at:] > 1e-7).all()


@torch.no_grad()
def test_packed_rows_equal_documents_alone():
    model, _ = models(seed=3)
    open_gates(model)
    docs = streams("inline")
    packed = call(model, batch_of(docs, sum(map(len, docs)) + 3))[0]  # (L, V)
    start = 0
    for doc in docs:
        alone = call(model, batch_of([doc], len(doc)), doc_ids=False)[0]  # (S, V)
        torch.testing.assert_close(packed[start:start + len(doc)], alone, atol=2e-5, rtol=1e-4)
        start += len(doc)


# ---- decoding -----------------------------------------------------------------------------------


@torch.no_grad()
def test_cached_generation_equals_uncached_and_is_the_greedy_argmax():
    model, _ = models(seed=6, decoder_kw={"tie_embeddings": False})  # untied: a varied greedy continuation
    open_gates(model, 1.5)
    for part in model.fusion_modules():  # strong media: the two rows (different audio) answer differently
        for module in part.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(3.0)
    il = interleaver("inline")
    segments, files = DOCS[0]
    prompts = [il.encode(segments[:4], files, eos=False), il.encode(segments[:4], {**files, "1.npy": spectrogram(4, 9)},
                                                                  eos=False)]
    b = collate_rows([{"tokens": p.tokens, "modality": p.modality, "positions": p.positions,
                       "image_patches": p.image_patches, "audio_patches": p.audio_patches} for p in prompts])
    args = (b["tokens"], b["modality"], b["positions"], b["image_patches"], b["audio_patches"])
    cached = model.generate(*args, max_new_tokens=8, use_cache=True)
    uncached = model.generate(*args, max_new_tokens=8, use_cache=False)
    assert cached.shape == (2, 8)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0].tolist())) > 1  # not a constant continuation
    assert not torch.equal(cached[0], cached[1])  # the media (cached in the gated blocks) matter
    # (a generated marker would open a medium in the forward below; this seed generates none)
    assert not any(t in (4, 5, 6, 7) for t in cached.flatten().tolist())
    # teacher-forced forward over prompt + answer: each new token is the argmax before it
    n = b["tokens"].shape[1]
    tokens = torch.cat([b["tokens"], cached], dim=1)
    modality = torch.cat([b["modality"], torch.zeros_like(cached)], dim=1)
    positions = torch.cat([b["positions"], b["positions"][:, -1:].expand(2, 8, 3) + 1], dim=1)
    logits = model(tokens, modality, positions, b["image_patches"], b["audio_patches"])
    assert torch.equal(logits[:, n - 1:-1].argmax(-1), cached)
    assert not model.decoder.caches_are_enabled()  # torn down, cross-attention caches included
    assert all(layer.attn.kv_cache is None for layer in model.cross_attention_layers())


@torch.no_grad()
def test_generation_stops_at_eos_and_runs_without_media():
    model, lm = models(seed=5)
    text_only = streams("inline")[2]
    args = (text_only.tokens[None], text_only.modality[None], text_only.positions[None], text_only.image_patches,
            text_only.audio_patches)
    out = model.generate(*args, max_new_tokens=6)
    # no media: the plain LM's greedy continuation
    tokens = text_only.tokens[None]
    for k in range(out.shape[1]):
        pos = torch.arange(tokens.shape[1]).view(1, -1, 1).expand(1, -1, 3)
        nxt = lm(lm.embed(tokens), pos)[:, -1].argmax(-1)
        assert int(nxt) == int(out[0, k])
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    first = int(out[0, 0])
    stopped = model.generate(*args, max_new_tokens=6, eos_id=first)
    assert stopped.tolist() == [[first]]
    assert EOS_ID != first or stopped.shape[1] == 1


# ---- parts and checks ---------------------------------------------------------------------------


def test_gated_blocks_go_before_every_kth_block_and_start_closed():
    model, _ = models(cross_every=2)
    assert model.cfg.cross_layers() == [1, 3]
    assert [type(layer).__name__ for layer in model.decoder.layers] == [
        "TransformerSelfAttentionLayer", "FusionLayer", "TransformerSelfAttentionLayer", "FusionLayer"]
    assert set(model.gates()) == {"layer1/attn", "layer1/ffn", "layer3/attn", "layer3/ffn"}
    assert all(float(g) == 0.0 for g in model.gates().values())
    every, _ = models(cross_every=1)
    assert len(every.cross_attention_layers()) == 4
    # the LM's keys are unchanged by the wrapping: a plain Decoder loads the fused decoder's LM part
    lm_keys = set(Decoder(model.cfg.decoder).state_dict())
    fused_keys = set(model.decoder.state_dict())
    assert lm_keys <= fused_keys and all(".fusion_layer." in k for k in fused_keys - lm_keys)
    lm_params = {id(p) for m in model.lm_modules() for p in m.parameters()}
    fusion_params = {id(p) for m in model.fusion_modules() for p in m.parameters()}
    enc_params = {id(p) for m in model.encoder_modules() for p in m.parameters()}
    everything = {id(p) for p in model.parameters()}
    assert lm_params | fusion_params | enc_params == everything
    assert not (lm_params & fusion_params) and not (enc_params & fusion_params) and not (lm_params & enc_params)


def test_load_pretrained_refuses_a_state_dict_that_does_not_fit():
    model, lm = models()
    state = lm.state_dict()
    with pytest.raises(ValueError, match="missing"):
        model.load_pretrained(lm={k: v for k, v in state.items() if "layers.0.attn.q_proj" not in k})
    with pytest.raises(ValueError, match="unexpected"):
        model.load_pretrained(lm={**state, "extra.weight": torch.zeros(1)})
    no_audio = Flamingo(config(audio_encoder=None))
    with pytest.raises(ValueError, match="audio_encoder"):
        no_audio.load_pretrained(audio_encoder=model.audio_encoder.state_dict())
    b = batch_of(streams("inline")[:1], 40)
    with pytest.raises(ValueError, match="audio media but FlamingoConfig.audio_encoder is None"):
        call(no_audio, b)


def test_loss_refuses_a_label_on_a_removed_slot():
    model, _ = models()
    b = batch_of(streams("inline")[:1], 40)
    loss, per_slot = model.loss(b)
    assert per_slot.shape == (1, 40) and torch.isfinite(loss)
    patch = int((b["modality"][0] != 0).nonzero()[0])
    b["labels"][0, patch] = 9
    with pytest.raises(ValueError, match="patch or <row> slot carries a label"):
        model.loss(b)


def test_config_checks_itself():
    with pytest.raises(ValueError, match="image_encoder.patch_dim"):
        config(patch=4)
    with pytest.raises(ValueError, match="cross_every"):
        config(cross_every=5)
    with pytest.raises(ValueError, match="encoder_layer"):
        config(encoder_layer=2)
    with pytest.raises(ValueError, match="cross_heads"):
        config(cross_heads=3)
    with pytest.raises(ValueError, match="ResamplerConfig.n_latents"):
        ResamplerConfig(n_latents=0)
    cfg = config()
    from dataclasses import asdict

    again = FlamingoConfig(**asdict(cfg))  # YAML-style nested dicts
    assert again == cfg and again.resampler.dim == 32 and again.cross_ffn_hidden == 128
