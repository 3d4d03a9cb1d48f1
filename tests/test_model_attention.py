"""Block-causal attention by document id: a packed document equals the document run alone,
with the SDPA boolean mask and with flex_attention's BlockMask, and the two agree."""

import pytest
import torch
from torchtune.modules.attention_utils import create_block_causal_mask

from omnifuse.model import DecoderConfig, NativeConfig, NativeFusion, block_causal_bool_mask
from omnifuse.tokenizers.stream import AUDIO, IMAGE

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def test_bool_mask_matches_torchtune_block_causal():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    ref = create_block_causal_mask([torch.tensor([3, 2, 1]), torch.tensor([6])])
    assert torch.equal(block_causal_bool_mask(doc_ids), ref)


def model_for(attention: str) -> NativeFusion:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=40, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                        max_seq_len=64, attention=attention)
    return NativeFusion(NativeConfig(decoder=cfg, patch=2)).eval()


def doc(n: int, media: dict[int, int], seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 40, (n,), generator=g)
    modality = torch.zeros(n, dtype=torch.long)
    for i, m in media.items():
        modality[i] = m
    positions = torch.arange(n).view(n, 1).expand(n, 3)
    return tokens, modality, positions


def test_packed_equals_unpacked_and_backends_agree():
    # row 0: doc A (image) + doc B (audio) + 3 padding slots; row 1: doc C alone
    a, b, c = doc(7, {2: IMAGE, 3: IMAGE}, 1), doc(6, {1: AUDIO, 2: AUDIO, 3: AUDIO}, 2), doc(16, {5: IMAGE}, 3)
    pad = (torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    row0 = [torch.cat([x, y, z]) for x, y, z in zip(a, b, pad)]
    tokens = torch.stack([row0[0], c[0]])
    modality = torch.stack([row0[1], c[1]])
    positions = torch.stack([row0[2], c[2]])
    doc_ids = torch.tensor([[0] * 7 + [1] * 6 + [-1] * 3, [0] * 16])
    img = torch.randn(3, 12)  # row-major: A's two patches, then C's one
    aud = torch.randn(3, 4)

    outs = {}
    for attention in ("sdpa", "flex"):
        model = model_for(attention)
        with torch.no_grad():
            packed = model(tokens, modality, positions, img, aud, doc_ids)
            alone_a = model(a[0][None], a[1][None], a[2][None], img[:2], None)
            alone_b = model(b[0][None], b[1][None], b[2][None], None, aud)
            alone_c = model(c[0][None], c[1][None], c[2][None], img[2:], None)
        torch.testing.assert_close(packed[0, :7], alone_a[0])
        torch.testing.assert_close(packed[0, 7:13], alone_b[0])
        torch.testing.assert_close(packed[1], alone_c[0])
        outs[attention] = packed
    torch.testing.assert_close(outs["sdpa"], outs["flex"])


def test_flex_refuses_cpu_backward_with_a_message():
    model = model_for("flex").train()
    tokens, modality, positions = doc(8, {}, 0)
    with pytest.raises(ValueError, match="attention='sdpa'"):
        model(tokens[None], modality[None], positions[None]).sum().backward()
