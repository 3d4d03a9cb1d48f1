"""Models: the shared decoder, multimodal positions, and the fusion arms built on them."""

from omnifuse.model.attention import SelfAttention, block_causal_bool_mask, build_attention_mask
from omnifuse.model.config import DecoderConfig, NativeConfig, default_mrope_sections
from omnifuse.model.decoder import IGNORE_INDEX, Decoder, lm_loss
from omnifuse.model.encoders import EncoderConfig, PatchEncoder
from omnifuse.model.native import NativeFusion
from omnifuse.model.positions import MultimodalRotaryEmbedding

__all__ = [
    "IGNORE_INDEX",
    "Decoder",
    "DecoderConfig",
    "EncoderConfig",
    "MultimodalRotaryEmbedding",
    "NativeConfig",
    "NativeFusion",
    "PatchEncoder",
    "SelfAttention",
    "block_causal_bool_mask",
    "build_attention_mask",
    "default_mrope_sections",
    "lm_loss",
]
