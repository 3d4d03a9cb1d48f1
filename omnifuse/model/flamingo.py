"""Flamingo: a frozen language model reads media through tanh-gated cross-attention.

    image patches ─► per image ─► PatchEncoder (frozen) ─► features (M, n, d_enc)
                                  ─► PerceiverResampler (R learned latents) ─► (M, R, D_media) ─┐
    audio patches ─► per clip  ─► the audio PatchEncoder ─► its own resampler ─► (M, R, D_media) ┤
                                                                 media of each row, in order ◄───┘
    tokens ─► drop patch and <row> slots (<img></img>, <aud></aud> stay as markers)
          ─► LM stream, positions 0, 1, 2, … per document (t = h = w)
          ─► Decoder (frozen); before block i for every (i + 1) % k == 0 a gated block:
                 x = x + tanh(α_attn) · CrossAttn(norm(x), media of this slot's medium)
                 x = x + tanh(α_ff)   · FFN(norm(x))
          ─► logits of the LM stream ─► scattered back to the input's (B, L) slots

The gated block is torchtune's :class:`~torchtune.modules.TransformerCrossAttentionLayer` with two
:class:`~torchtune.modules.TanhGate` (α = 0 at init), wrapped with the frozen block by
:class:`~torchtune.modules.model_fusion.FusionLayer` (``fusion_first=True``, Flamingo's order),
which keeps the block's state-dict keys, so the LM stage's checkpoint loads unchanged. The shared
:class:`~omnifuse.model.decoder.Decoder` passes extra keyword arguments (``encoder_input``,
``encoder_mask``) to every block, so it needs no Flamingo variant. torchtune's
``DeepFusionModel`` is not used: it wants a decoder that takes token ids and builds its own
encoder call, while ours takes embeddings and the media here are grouped per item first.

Media placement (Flamingo's rule, OpenFlamingo's ``only_attend_immediate_media``): a medium sits
at its opening marker; the marker and every later slot of the same document cross-attend to the
R resampled tokens of that medium until the next medium's marker. Slots before a document's first
medium see no media: torchtune's skip mask zeroes their cross-attention and feed-forward outputs.
Packed rows hold several documents; the cross-attention mask is built per document, so no slot
sees another document's media. With every α = 0 the model computes exactly the LM on the stream
``data.media: marker`` gives it (tests/test_model_flamingo.py).

Slots removed from the LM stream (patches, ``<row>``) get all-zero logits; they never carry a
label (targets are text), and :meth:`Flamingo.loss` refuses a batch where one does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    TanhGate,
    TransformerCrossAttentionLayer,
)
from torchtune.modules.model_fusion import FusionLayer

from omnifuse.model.config import DecoderConfig
from omnifuse.model.decoder import IGNORE_INDEX, Decoder, lm_loss
from omnifuse.model.encoders import EncoderConfig, PatchEncoder
from omnifuse.model.media import group_patches, media_layout
from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT
from omnifuse.tokenizers.text import AUD_END_ID, AUD_ID, IMG_END_ID, IMG_ID, PAD_ID


def _positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclass
class ResamplerConfig:
    """The Perceiver resampler turning one medium's encoder features into ``n_latents`` tokens.

    Args:
        n_latents: learned latent queries = media tokens per image or clip (Flamingo: 64).
        n_layers: cross-attention + feed-forward layers (Flamingo: 6).
        n_heads: attention heads; ``dim`` must divide by it.
        dim: width of the latents and of the media tokens the LM cross-attends to. ``None`` ->
            the decoder's width (filled in by :class:`FlamingoConfig`).
        ffn_mult: hidden width of the GELU feed-forward, as a multiple of ``dim``.
    """

    n_latents: int = 16
    n_layers: int = 2
    n_heads: int = 4
    dim: int | None = None
    ffn_mult: int = 4

    def __post_init__(self) -> None:
        for name in ("n_latents", "n_layers", "n_heads", "ffn_mult"):
            _positive_int("ResamplerConfig", name, getattr(self, name))
        if self.dim is not None:
            _positive_int("ResamplerConfig", "dim", self.dim)
            if self.dim % self.n_heads != 0:
                raise ValueError(f"ResamplerConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")


@dataclass
class FlamingoConfig:
    """Frozen LM + frozen encoders + trained resamplers and gated cross-attention.

    Args:
        decoder: the LM (the text LM stage's decoder).
        image_encoder: the CLIP stage's image encoder; ``None``: the model takes no images.
        audio_encoder: the CLAP stage's spectrogram encoder; ``None``: the model takes no audio.
        patch: patch side ``P`` (an image patch has ``image_channels * P * P`` values, an audio
            patch ``P * P``); must agree with the encoders' ``patch_dim``.
        image_channels: channels of an image patch.
        encoder_layer: which encoder block's output is resampled (a Python index over blocks;
            -1 = the last block, as Flamingo takes its encoder's final features).
        resampler: the Perceiver resampler (one instance per modality, same shape).
        cross_every: ``k``: a gated cross-attention block goes before decoder block ``i`` when
            ``(i + 1) % k == 0`` (OpenFlamingo's ``cross_attn_every_n_layers``; 1 = every block).
        cross_heads: heads of the gated cross-attention. ``None`` -> ``decoder.n_heads``.
        cross_ffn_hidden: hidden width of its GELU feed-forward. ``None`` -> ``4 * decoder.dim``.
    """

    decoder: DecoderConfig
    image_encoder: EncoderConfig | None = None
    audio_encoder: EncoderConfig | None = None
    patch: int = 8
    image_channels: int = 3
    encoder_layer: int = -1
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    cross_every: int = 1
    cross_heads: int | None = None
    cross_ffn_hidden: int | None = None

    def __post_init__(self) -> None:
        # YAML / plain-dict construction
        if isinstance(self.decoder, dict):
            self.decoder = DecoderConfig(**self.decoder)
        for name in ("image_encoder", "audio_encoder"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, EncoderConfig(**getattr(self, name)))
        if isinstance(self.resampler, dict):
            self.resampler = ResamplerConfig(**self.resampler)
        if not isinstance(self.decoder, DecoderConfig):
            raise ValueError(f"FlamingoConfig.decoder must be a DecoderConfig, got {type(self.decoder).__name__}")
        for name in ("patch", "image_channels", "cross_every"):
            _positive_int("FlamingoConfig", name, getattr(self, name))
        d = self.decoder
        if self.cross_every > d.n_layers:
            raise ValueError(
                f"FlamingoConfig.cross_every ({self.cross_every}) exceeds decoder.n_layers ({d.n_layers}): "
                "no gated cross-attention block would be inserted"
            )
        if self.cross_heads is None:
            self.cross_heads = d.n_heads
        if self.cross_ffn_hidden is None:
            self.cross_ffn_hidden = 4 * d.dim
        _positive_int("FlamingoConfig", "cross_heads", self.cross_heads)
        _positive_int("FlamingoConfig", "cross_ffn_hidden", self.cross_ffn_hidden)
        if d.dim % self.cross_heads != 0:
            raise ValueError(f"FlamingoConfig.cross_heads ({self.cross_heads}) must divide decoder.dim ({d.dim})")
        if self.resampler.dim is None:
            self.resampler.dim = d.dim
            if d.dim % self.resampler.n_heads != 0:
                raise ValueError(
                    f"FlamingoConfig.resampler.n_heads ({self.resampler.n_heads}) must divide its dim "
                    f"(= decoder.dim = {d.dim})"
                )
        for name, patch_dim in (("image_encoder", self.image_patch_dim), ("audio_encoder", self.audio_patch_dim)):
            enc = getattr(self, name)
            if enc is None:
                continue
            if not isinstance(enc, EncoderConfig):
                raise ValueError(f"FlamingoConfig.{name} must be an EncoderConfig or None, got {type(enc).__name__}")
            if enc.patch_dim != patch_dim:
                raise ValueError(
                    f"FlamingoConfig.{name}.patch_dim is {enc.patch_dim}, but the data's patches have {patch_dim} "
                    f"values (patch={self.patch}): the encoder was trained on another patch size"
                )
            if not -enc.n_layers <= self.encoder_layer < enc.n_layers:
                raise ValueError(
                    f"FlamingoConfig.encoder_layer={self.encoder_layer} is out of range for the {enc.n_layers}-block "
                    f"{name}"
                )

    @property
    def image_patch_dim(self) -> int:
        return self.image_channels * self.patch * self.patch

    @property
    def audio_patch_dim(self) -> int:
        return self.patch * self.patch

    def cross_layers(self) -> list[int]:
        """Indices of the decoder blocks that get a gated cross-attention block before them."""
        return [i for i in range(self.decoder.n_layers) if (i + 1) % self.cross_every == 0]


def _gelu_mlp(dim: int, hidden: int) -> FeedForward:
    return FeedForward(gate_proj=nn.Linear(dim, hidden), down_proj=nn.Linear(hidden, dim), activation=nn.GELU())


class ResamplerLayer(nn.Module):
    """One Perceiver resampler layer: the latents attend to the media features concatenated with
    themselves (Flamingo App. A.1.1), then a feed-forward; both residual."""

    def __init__(self, cfg: ResamplerConfig, eps: float):
        super().__init__()
        d, hd = cfg.dim, cfg.dim // cfg.n_heads
        self.media_norm = nn.LayerNorm(d, eps=eps)
        self.latent_norm = nn.LayerNorm(d, eps=eps)
        self.attn = MultiHeadAttention(
            embed_dim=d, num_heads=cfg.n_heads, num_kv_heads=cfg.n_heads, head_dim=hd,
            q_proj=nn.Linear(d, d, bias=False), k_proj=nn.Linear(d, d, bias=False),
            v_proj=nn.Linear(d, d, bias=False), output_proj=nn.Linear(d, d, bias=False),
            is_causal=False,
        )
        self.mlp_norm = nn.LayerNorm(d, eps=eps)
        self.mlp = _gelu_mlp(d, cfg.ffn_mult * d)

    def forward(self, latents: torch.Tensor, media: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``latents (M, R, d)``, ``media (M, n, d)``, ``mask (M, R, n + R)`` or None -> ``(M, R, d)``."""
        q = self.latent_norm(latents)  # (M, R, d)
        kv = torch.cat([self.media_norm(media), q], dim=1)  # (M, n+R, d)
        latents = latents + self.attn(q, kv, mask=mask)  # (M, R, d)
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(nn.Module):
    """``features (M, n, in_dim)`` of M media items (``mask (M, n)``: real patches) -> ``(M, R, dim)``.

    The features are projected to the resampler width, R learned latents (shared by every item)
    pass ``n_layers`` :class:`ResamplerLayer`, and a final LayerNorm closes. Padding patches are
    masked out as keys, so an item's tokens do not depend on how much the batch padded it.
    """

    def __init__(self, in_dim: int, cfg: ResamplerConfig, eps: float = 1e-5):
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(in_dim, cfg.dim)
        self.latents = nn.Parameter(torch.zeros(cfg.n_latents, cfg.dim))
        self.layers = nn.ModuleList([ResamplerLayer(cfg, eps) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.dim, eps=eps)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m, n, _ = features.shape
        r = self.cfg.n_latents
        media = self.input_proj(features)  # (M, n, dim)
        latents = self.latents.to(media.dtype).expand(m, r, self.cfg.dim)  # (M, R, dim)
        if bool(mask.all()):
            attn_mask = None  # every key is real: plain bidirectional attention
        else:
            keys = torch.cat([mask, mask.new_ones(m, r)], dim=1)  # (M, n+R): latents are always keys
            attn_mask = keys[:, None, :].expand(m, r, n + r)  # (M, R, n+R)
        for layer in self.layers:
            latents = layer(latents, media, attn_mask)  # (M, R, dim)
        return self.norm(latents)


def gated_cross_attention(cfg: FlamingoConfig) -> TransformerCrossAttentionLayer:
    """Flamingo's GATED XATTN-DENSE block from torchtune's pieces: pre-norm cross-attention from
    the LM stream (queries) to media tokens (keys, values; no positions), then a GELU
    feed-forward, each output scaled by a :class:`TanhGate` whose α starts at 0."""
    d, dm, heads = cfg.decoder.dim, cfg.resampler.dim, cfg.cross_heads
    hd = d // heads
    qk_norm = cfg.decoder.qk_norm
    attn = MultiHeadAttention(
        embed_dim=d, num_heads=heads, num_kv_heads=heads, head_dim=hd,
        q_proj=nn.Linear(d, d, bias=False), k_proj=nn.Linear(dm, d, bias=False),
        v_proj=nn.Linear(dm, d, bias=False), output_proj=nn.Linear(d, d, bias=False),
        q_norm=RMSNorm(hd, eps=cfg.decoder.norm_eps) if qk_norm else None,
        k_norm=RMSNorm(hd, eps=cfg.decoder.norm_eps) if qk_norm else None,
        is_causal=False,
    )
    return TransformerCrossAttentionLayer(
        attn=attn,
        mlp=_gelu_mlp(d, cfg.cross_ffn_hidden),
        ca_norm=RMSNorm(d, eps=cfg.decoder.norm_eps),
        mlp_norm=RMSNorm(d, eps=cfg.decoder.norm_eps),
        ca_scale=TanhGate(),
        mlp_scale=TanhGate(),
    )


@dataclass
class LMStream:
    """The LM's view of a ``(B, L)`` batch: ``S`` kept slots per row, left-aligned.

    Attributes:
        tokens: ``(B, S)`` token ids; filler past a row's kept slots holds the pad id.
        positions: ``(B, S, 3)`` ``t = h = w``, counting 0, 1, 2, … within each document.
        doc_ids: ``(B, S)`` or None (one document per row and no filler).
        kept: ``(B, L)`` bool, the input slots the stream keeps (row-major order = stream order).
        valid: ``(B, S)`` bool, stream slots that are kept input slots (not filler).
        media: ``(B, T, D_media)`` the media tokens of each row (its media in order, R tokens
            each, zero padding), or None when the batch has no media.
        media_mask: ``(B, S, T)`` bool, True where a stream slot may attend a media token, or None.
        medium: ``(B, S)`` long, the row-local index of the medium each slot attends (-1: none).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor | None
    kept: torch.Tensor
    valid: torch.Tensor
    media: torch.Tensor | None
    media_mask: torch.Tensor | None
    medium: torch.Tensor


class Flamingo(nn.Module):
    """The Flamingo arm; see the module docstring. Same calls as :class:`NativeFusion`.

    Attributes: ``decoder`` (the LM; blocks in :meth:`FlamingoConfig.cross_layers` are
    ``FusionLayer``\\ s), ``image_encoder`` / ``audio_encoder`` (:class:`PatchEncoder` or None),
    ``image_resampler`` / ``audio_resampler``. Freezing is the caller's: see :meth:`lm_modules`,
    :meth:`encoder_modules`, :meth:`fusion_modules`.
    """

    def __init__(self, cfg: FlamingoConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg.decoder)
        for i in cfg.cross_layers():
            self.decoder.layers[i] = FusionLayer(self.decoder.layers[i], gated_cross_attention(cfg), fusion_first=True)
        self.image_encoder = PatchEncoder(cfg.image_encoder) if cfg.image_encoder is not None else None
        self.audio_encoder = PatchEncoder(cfg.audio_encoder) if cfg.audio_encoder is not None else None
        eps = cfg.decoder.norm_eps
        self.image_resampler = (
            PerceiverResampler(self.image_encoder.width, cfg.resampler, eps) if self.image_encoder else None
        )
        self.audio_resampler = (
            PerceiverResampler(self.audio_encoder.width, cfg.resampler, eps) if self.audio_encoder else None
        )
        self._init_fusion()

    def _init_fusion(self) -> None:
        """N(0, init_std) for the new weights (residual output projections / sqrt(2 n_blocks), GPT-2),
        zero biases; the gates stay at α = 0 (torchtune's ``TanhGate`` init)."""
        std = self.cfg.decoder.init_std
        for part in self.fusion_modules():
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        for resampler in (self.image_resampler, self.audio_resampler):
            if resampler is not None:
                nn.init.normal_(resampler.latents, std=std)
                for layer in resampler.layers:
                    for proj in (layer.attn.output_proj, layer.mlp.w2):
                        nn.init.normal_(proj.weight, std=std / math.sqrt(2 * resampler.cfg.n_layers))
        n_cross = len(self.cfg.cross_layers())
        for layer in self.cross_attention_layers():
            for proj in (layer.attn.output_proj, layer.mlp.w2):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * n_cross))

    # ---- parts --------------------------------------------------------------------------

    def cross_attention_layers(self) -> list[TransformerCrossAttentionLayer]:
        """The gated blocks, in decoder order."""
        return [layer.fusion_layer for layer in self.decoder.layers if isinstance(layer, FusionLayer)]

    def lm_modules(self) -> list[nn.Module]:
        """The LM's own modules (embedding, blocks, final norm, head), without the gated blocks."""
        blocks = [layer.layer if isinstance(layer, FusionLayer) else layer for layer in self.decoder.layers]
        return [self.decoder.tok_embeddings, *blocks, self.decoder.norm, self.decoder.output]

    def encoder_modules(self) -> list[nn.Module]:
        return [e for e in (self.image_encoder, self.audio_encoder) if e is not None]

    def fusion_modules(self) -> list[nn.Module]:
        """What Flamingo trains: the resamplers and the gated cross-attention blocks."""
        resamplers = [r for r in (self.image_resampler, self.audio_resampler) if r is not None]
        return [*resamplers, *self.cross_attention_layers()]

    def gates(self) -> dict[str, torch.Tensor]:
        """``tanh(α)`` of every gate: ``{"layer{i}/attn": ..., "layer{i}/ffn": ...}`` (0-dim
        tensors, detached), ``i`` the decoder block the gated block precedes."""
        out = {}
        for i, layer in enumerate(self.decoder.layers):
            if isinstance(layer, FusionLayer):
                out[f"layer{i}/attn"] = layer.fusion_layer.ca_scale.scale.detach().tanh()[0]
                out[f"layer{i}/ffn"] = layer.fusion_layer.mlp_scale.scale.detach().tanh()[0]
        return out

    def load_pretrained(
        self,
        lm: dict[str, torch.Tensor] | None = None,
        image_encoder: dict[str, torch.Tensor] | None = None,
        audio_encoder: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Load the stages' state dicts (``Decoder`` / ``PatchEncoder`` keys). The LM's must cover
        every LM weight and nothing else; only the gated blocks' keys may be missing."""
        if lm is not None:
            result = self.decoder.load_state_dict(lm, strict=False)
            missing = [k for k in result.missing_keys if ".fusion_layer." not in k]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"the LM state dict does not fit the decoder: missing {missing[:5]}, "
                    f"unexpected {result.unexpected_keys[:5]}"
                )
        for name, state in (("image_encoder", image_encoder), ("audio_encoder", audio_encoder)):
            if state is None:
                continue
            encoder = getattr(self, name)
            if encoder is None:
                raise ValueError(f"an {name} state dict was given but FlamingoConfig.{name} is None")
            encoder.load_state_dict(state)

    # ---- the LM stream ----------------------------------------------------------------------

    def _media_tokens(
        self, kind: int, tokens: torch.Tensor, modality: torch.Tensor, patches: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Resampled tokens of every ``kind`` item: ``(M, R, D_media)``, and each item's batch row
        and opening slot ``(M,)``."""
        name = "image" if kind == IMAGE else "audio"
        encoder = self.image_encoder if kind == IMAGE else self.audio_encoder
        resampler = self.image_resampler if kind == IMAGE else self.audio_resampler
        layout = media_layout(tokens, modality, kind)
        n_slots = int(layout.item.shape[0])
        n_patches = 0 if patches is None else int(patches.shape[0])
        if n_slots != n_patches:
            raise ValueError(f"the batch has {n_slots} {name} slots but {n_patches} {name} patches")
        if layout.n_items == 0:
            r, dm = self.cfg.resampler.n_latents, self.cfg.resampler.dim
            empty = tokens.new_zeros(0)
            return self.decoder.tok_embeddings.weight.new_zeros(0, r, dm), empty, empty
        if encoder is None:
            raise ValueError(f"the batch has {name} media but FlamingoConfig.{name}_encoder is None")
        grouped, grid, mask = group_patches(patches, layout)  # (M, n, d), (M, n, 2), (M, n)
        # the encoders are feature extractors here, never trained (Flamingo freezes its encoder)
        with torch.no_grad():
            features = encoder.patch_features(grouped, grid, mask, layer=self.cfg.encoder_layer)  # (M, n, d_enc)
        return resampler(features, mask), layout.row, layout.start  # (M, R, D_media)

    def lm_stream(
        self,
        tokens: torch.Tensor,
        modality: torch.Tensor,
        image_patches: torch.Tensor | None = None,
        audio_patches: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> LMStream:
        """Build what the LM sees from a packed or unpacked batch (docs/ARCHITECTURE.md): the
        kept slots, their positions, the media tokens and the cross-attention mask."""
        b, l = tokens.shape
        is_text = modality == TEXT
        opens = is_text & ((tokens == IMG_ID) | (tokens == AUD_ID))  # (B, L) where each medium sits
        closes = is_text & ((tokens == IMG_END_ID) | (tokens == AUD_END_ID))
        depth = torch.cumsum(opens.long(), dim=1) - torch.cumsum(closes.long(), dim=1)  # (B, L) 1 inside a medium
        kept = (depth == 0) | opens  # (B, L) a medium's interior (patches, <row>) leaves the stream
        docs = doc_ids if doc_ids is not None else torch.zeros_like(tokens)

        # media tokens of each row, in the order of their markers
        img, img_row, img_start = self._media_tokens(IMAGE, tokens, modality, image_patches)
        aud, aud_row, aud_start = self._media_tokens(AUDIO, tokens, modality, audio_patches)
        items = torch.cat([img, aud.to(img.dtype)])  # (M, R, D_media)
        row, start = torch.cat([img_row, aud_row]), torch.cat([img_start, aud_start])  # (M,)
        order = torch.argsort(row * l + start)
        items, row, start = items[order], row[order], start[order]
        per_row = torch.bincount(row, minlength=b)  # (B,)
        rank = torch.arange(row.shape[0], device=row.device) - (torch.cumsum(per_row, 0) - per_row)[row]  # (M,)
        n_media = int(per_row.max()) if row.numel() else 0
        r, dm = self.cfg.resampler.n_latents, self.cfg.resampler.dim
        media_doc = torch.full((b, max(n_media, 1)), -2, dtype=docs.dtype, device=docs.device)  # -2: no medium
        media_doc[row, rank] = docs[row, start]

        # each slot's medium: the most recent marker of its row, if it is in the slot's document
        medium = torch.cumsum(opens.long(), dim=1) - 1  # (B, L)
        own = media_doc.gather(1, medium.clamp_min(0)) == docs  # (B, L)
        medium = torch.where((medium >= 0) & own, medium, -1)  # (B, L)

        # kept slots, left-aligned (a stable sort keeps their order)
        n_kept = kept.sum(dim=1)  # (B,)
        s = int(n_kept.max())
        if s > self.cfg.decoder.max_seq_len:
            raise ValueError(f"the LM stream has {s} slots, more than decoder.max_seq_len={self.cfg.decoder.max_seq_len}")
        idx = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :s]  # (B, S)
        valid = torch.arange(s, device=tokens.device)[None, :] < n_kept[:, None]  # (B, S)
        lm_tokens = torch.where(valid, tokens.gather(1, idx), PAD_ID)  # (B, S)
        lm_docs = torch.where(valid, docs.gather(1, idx), -1)  # (B, S) filler: a padding document
        lm_medium = torch.where(valid, medium.gather(1, idx), -1)  # (B, S)
        if doc_ids is None and bool(valid.all()):
            lm_doc_ids = None
        else:
            lm_doc_ids = lm_docs

        # positions 0, 1, 2, ... within each document of the stream (documents are contiguous)
        ar = torch.arange(s, device=tokens.device).expand(b, s)  # (B, S)
        first = torch.ones_like(valid)
        first[:, 1:] = lm_docs[:, 1:] != lm_docs[:, :-1]
        doc_start = torch.where(first, ar, 0).cummax(dim=1).values  # (B, S)
        t = ar - doc_start  # (B, S)
        positions = t.unsqueeze(-1).expand(b, s, 3)  # (B, S, 3)

        if n_media == 0:
            media, media_mask = None, None
        else:
            media = items.new_zeros(b, n_media, r, dm)
            media[row, rank] = items  # (B, n_media, R, D_media)
            media = media.view(b, n_media * r, dm)  # (B, T, D_media)
            column_medium = torch.arange(n_media * r, device=tokens.device) // r  # (T,)
            media_mask = lm_medium.unsqueeze(-1) == column_medium.view(1, 1, -1)  # (B, S, T); -1 matches none
        return LMStream(lm_tokens, positions, lm_doc_ids, kept, valid, media, media_mask, lm_medium)

    # ---- forward ----------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        modality: torch.Tensor,
        positions: torch.Tensor,
        image_patches: torch.Tensor | None = None,
        audio_patches: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tokens, modality (B, L)``, patches in slot order, ``doc_ids (B, L)`` -> logits ``(B, L, V)``.

        ``positions (B, L, 3)`` is accepted for the common interface and not used: the LM stream
        is numbered 0, 1, 2, … per document after the media slots leave it (the numbering of the
        LM stage's ``data.media: marker`` stream). Removed slots get zero logits.
        """
        b, l = tokens.shape
        if tuple(positions.shape) != (b, l, 3):
            raise ValueError(f"positions must have shape {(b, l, 3)}, got {tuple(positions.shape)}")
        stream = self.lm_stream(tokens, modality, image_patches, audio_patches, doc_ids)
        return self._scatter(self._lm_logits(stream), stream)

    def _lm_logits(self, stream: LMStream) -> torch.Tensor:
        """The decoder over the LM stream: logits ``(B, S, V)``."""
        h = self.decoder.embed(stream.tokens)  # (B, S, D)
        return self.decoder(
            h, stream.positions, stream.doc_ids, encoder_input=stream.media, encoder_mask=stream.media_mask
        )

    @staticmethod
    def _scatter(logits: torch.Tensor, stream: LMStream) -> torch.Tensor:
        """LM-stream logits ``(B, S, V)`` back to the input's slots ``(B, L, V)``; removed slots get 0."""
        b, l = stream.kept.shape
        out = logits.new_zeros(b, l, logits.shape[-1])
        out[stream.kept] = logits[stream.valid]  # row-major order on both sides
        return out

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A packed batch -> ``(mean loss over labelled slots, per-slot losses (B, L))``."""
        stream = self.lm_stream(
            batch["tokens"], batch["modality"], batch.get("image_patches"), batch.get("audio_patches"),
            batch.get("doc_ids"),
        )
        labels = batch["labels"]
        if bool(((labels != IGNORE_INDEX) & ~stream.kept).any()):
            raise ValueError("a patch or <row> slot carries a label: Flamingo's LM stream has no such slot")
        return lm_loss(self._scatter(self._lm_logits(stream), stream), labels)

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        modality: torch.Tensor,
        positions: torch.Tensor,
        image_patches: torch.Tensor | None = None,
        audio_patches: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding after a prompt of one document per row, every row with the same number
        of LM-stream slots. New tokens attend the last medium of their row's prompt.

        With ``use_cache`` the prompt runs once: the self-attention caches hold its keys and
        values, and each gated block's cache holds the media's (computed once, at the prompt).
        Returns the new tokens ``(B, T)``, ``T <= max_new_tokens``; decoding stops when every row
        has produced ``eos_id`` (included), and a finished row is padded with it.
        """
        b, l = tokens.shape
        if max_new_tokens <= 0:
            return tokens.new_zeros(b, 0)
        stream = self.lm_stream(tokens, modality, image_patches, audio_patches)
        if not bool(stream.valid.all()):
            raise ValueError("generate needs prompts whose LM streams (media slots removed) have equal lengths")
        s = stream.tokens.shape[1]
        total = s + max_new_tokens
        if total > self.cfg.decoder.max_seq_len:
            raise ValueError(
                f"LM stream ({s}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={self.cfg.decoder.max_seq_len}"
            )
        done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
        # a new slot attends what the prompt's last slot attends: the row's last medium, or none
        step_mask = None if stream.media_mask is None else stream.media_mask[:, -1:]  # (B, 1, T)
        out: list[torch.Tensor] = []
        if use_cache:
            t = 0 if stream.media is None else stream.media.shape[1]
            # torchtune's cross-attention layer reads cache_pos[0]: the cache needs >= 1 slot
            self.decoder.setup_caches(b, total, encoder_max_seq_len=max(t, 1))
        try:
            logits = self._lm_logits(stream)[:, -1]  # (B, V); fills the caches when set up
            for k in range(max_new_tokens):
                nxt = logits.argmax(dim=-1)  # (B,)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                out.append(nxt)
                if bool(done.all()) or k == max_new_tokens - 1:
                    break
                if use_cache:
                    pos = torch.full((b, 1, 3), s + k, dtype=torch.long, device=tokens.device)  # (B, 1, 3)
                    h = self.decoder.embed(nxt[:, None])  # (B, 1, D)
                    # media keys/values come from the gated blocks' caches: no encoder_input
                    logits = self.decoder(h, pos, encoder_mask=step_mask)[:, -1]  # (B, V)
                else:  # the whole LM stream again; the media tokens are computed once either way
                    n = s + k + 1
                    stream.tokens = torch.cat([stream.tokens, nxt[:, None]], dim=1)  # (B, n)
                    stream.positions = torch.arange(n, device=tokens.device).view(1, n, 1).expand(b, n, 3)
                    if step_mask is not None:
                        stream.media_mask = torch.cat([stream.media_mask, step_mask], dim=1)  # (B, n, T)
                    logits = self._lm_logits(stream)[:, -1]  # (B, V)
        finally:
            if use_cache:
                self.decoder.teardown_caches()
        return torch.stack(out, dim=1)  # (B, T)

    # ---- accounting -------------------------------------------------------------------------

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters (tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
