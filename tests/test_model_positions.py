"""M-RoPE: equals torchtune's RoPE on text, rotates each (t, h, w) section by its own position,
and keeps RoPE's relative-position property through the whole model."""

import pytest
import torch
from torchtune.modules import RotaryPositionalEmbeddings

from omnifuse.model import DecoderConfig, MultimodalRotaryEmbedding, NativeConfig, NativeFusion
from omnifuse.tokenizers.stream import AUDIO, IMAGE


def test_text_stream_equals_torchtune_rope_exactly():
    torch.manual_seed(0)
    hd, b, s = 32, 2, 50
    ref = RotaryPositionalEmbeddings(hd, max_seq_len=256)
    mrope = MultimodalRotaryEmbedding(hd, (4, 6, 6))
    x = torch.randn(b, s, 3, hd)
    torch.testing.assert_close(mrope(x), ref(x), rtol=0, atol=0)
    pos = torch.randint(0, 200, (b, s))  # e.g. packed rows: positions restart per document
    torch.testing.assert_close(mrope(x, input_pos=pos[..., None].expand(b, s, 3)), ref(x, input_pos=pos), rtol=0, atol=0)


def test_each_section_rotates_by_its_own_component():
    torch.manual_seed(0)
    hd, b, s, sections = 32, 2, 11, (4, 6, 6)
    ref = RotaryPositionalEmbeddings(hd, max_seq_len=256)
    mrope = MultimodalRotaryEmbedding(hd, sections)
    x = torch.randn(b, s, 2, hd)
    pos = torch.randint(0, 100, (b, s, 3))
    got = mrope(x, input_pos=pos)
    lo = 0
    for c, n in enumerate(sections):  # pairs [lo, lo+n) <-> channels [2lo, 2(lo+n))
        want = ref(x, input_pos=pos[..., c])
        torch.testing.assert_close(got[..., 2 * lo : 2 * (lo + n)], want[..., 2 * lo : 2 * (lo + n)])
        lo += n


def test_1d_mode_uses_t_only():
    torch.manual_seed(0)
    ref = RotaryPositionalEmbeddings(16, max_seq_len=64)
    rope1d = MultimodalRotaryEmbedding(16, (2, 3, 3), mode="1d")
    x = torch.randn(1, 9, 2, 16)
    pos = torch.randint(0, 50, (1, 9, 3))
    torch.testing.assert_close(rope1d(x, input_pos=pos), ref(x, input_pos=pos[..., 0]), rtol=0, atol=0)


@pytest.mark.parametrize("positions", ["mrope", "1d"])
def test_shifting_all_positions_leaves_logits_unchanged(positions):
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=40, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                        max_seq_len=64, positions=positions, attention="sdpa")
    model = NativeFusion(NativeConfig(decoder=cfg, patch=2)).eval()
    with torch.no_grad():  # non-trivial QK-norm scales: would break the property if applied after RoPE
        for layer in model.decoder.layers:
            layer.attn.q_norm.scale.uniform_(0.5, 2.0)
            layer.attn.k_norm.scale.uniform_(0.5, 2.0)
    # <img> 2x2 patches </img> text <aud> 1x2 patches </aud> text, positions as the tokenizer writes them
    modality = torch.tensor([[0, 0, IMAGE, IMAGE, IMAGE, IMAGE, 0, 0, 0, AUDIO, AUDIO, 0, 0]])
    t = [0, 1, 2, 2, 2, 2, 4, 5, 6, 7, 7, 9, 10]
    h = [0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 7, 9, 10]
    w = [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    pos = torch.tensor([t, h, w]).T[None]  # (1, 13, 3)
    tokens = torch.randint(0, 40, (1, 13))
    args = (torch.randn(4, 12), torch.randn(2, 4))
    with torch.no_grad():
        base = model(tokens, modality, pos, *args)
        shifted = model(tokens, modality, pos + 37, *args)
        shifted_h = model(tokens, modality, pos + torch.tensor([0, 5, 0]), *args)
        transposed = model(tokens, modality, pos[..., [0, 2, 1]], *args)  # the image seen transposed
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shifted_h, base, rtol=1e-4, atol=1e-4)  # each component is relative alone
    change = (transposed - base).abs().amax(dim=-1)[0]  # (13,)
    assert change[:3].max() < 1e-5  # before the first slot whose (h, w) differ
    if positions == "mrope":
        assert change[3:].max() > 1e-3
    else:
        assert change.max() == 0
