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

from omnifuse.model.arm import FusionArm
from omnifuse.model.config import DecoderConfig
from omnifuse.model.decoder import IGNORE_INDEX, Decoder, lm_loss
from omnifuse.model.encoders import EncoderConfig, PatchEncoder, checked_encoder_field
from omnifuse.model.media import MediaLayout, group_patches, media_layout
from omnifuse.tokenizers.stream import AUDIO, IMAGE
from omnifuse.tokenizers.text import PAD_ID


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
        for name, want in (("image_encoder", self.image_patch_dim), ("audio_encoder", self.audio_patch_dim)):
            value = checked_encoder_field(
                "FlamingoConfig", name, getattr(self, name), want, self.patch, self.encoder_layer, "encoder_layer"
            )
            setattr(self, name, value)

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


def kept_slots(b: int, l: int, row: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` bool: the input slots the LM stream keeps. A medium's interior (its patches and
    ``<row>`` tokens, between the opening slot ``start`` and the closing slot ``end`` of batch row
    ``row``; ``(M,)`` each) leaves the stream; its markers stay."""
    interior = torch.zeros(b, l + 1, dtype=torch.long, device=row.device)
    interior.index_put_((row, start + 1), torch.ones_like(row), accumulate=True)
    interior.index_put_((row, end), -torch.ones_like(row), accumulate=True)
    return torch.cumsum(interior, dim=1)[:, :l] == 0  # (B, L)


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
            each, zero padding; one all-zero medium when the batch has none).
        media_mask: ``(B, S, T)`` bool, True where a stream slot may attend a media token.
        medium: ``(B, S)`` long, the row-local index of the medium each slot attends (-1: none).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor | None
    kept: torch.Tensor
    valid: torch.Tensor
    media: torch.Tensor
    media_mask: torch.Tensor
    medium: torch.Tensor


class Flamingo(FusionArm, nn.Module):
    """The Flamingo arm; see the module docstring. Same calls as :class:`NativeFusion`: ``forward``
    and ``loss`` are its own (the LM stream is not the input stream), ``generate`` is
    :class:`~omnifuse.model.arm.FusionArm`'s with the decode hooks overridden.

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
        # the encoders are frozen feature extractors in every Flamingo recipe
        self.image_encoder = PatchEncoder(cfg.image_encoder).requires_grad_(False) if cfg.image_encoder else None
        self.audio_encoder = PatchEncoder(cfg.audio_encoder).requires_grad_(False) if cfg.audio_encoder else None
        eps = cfg.decoder.norm_eps
        self.image_resampler = (
            PerceiverResampler(self.image_encoder.width, cfg.resampler, eps) if self.image_encoder else None
        )
        self.audio_resampler = (
            PerceiverResampler(self.audio_encoder.width, cfg.resampler, eps) if self.audio_encoder else None
        )
        self._init_fusion()
        # decoding state (FusionArm.generate's hooks): cache size until the prompt, then the
        # cross-attention mask and the LM-stream positions of the new slots
        self._cache_size: tuple[int, int] | None = None
        self._step_mask: torch.Tensor | None = None
        self._new_positions: torch.Tensor | None = None
        self._decoded = 0

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
    ) -> tuple[torch.Tensor, MediaLayout]:
        """Resampled tokens of every ``kind`` (IMAGE or AUDIO) item of the batch ``(M, R, D_media)``
        and the items' layout (:func:`~omnifuse.model.media.media_layout`)."""
        name = "image" if kind == IMAGE else "audio"
        encoder, resampler = (
            (self.image_encoder, self.image_resampler) if kind == IMAGE else (self.audio_encoder, self.audio_resampler)
        )
        layout = media_layout(tokens, modality, kind)
        if encoder is None:
            if layout.n_items:
                raise ValueError(f"the batch has {name} media but FlamingoConfig.{name}_encoder is None")
            r, dm = self.cfg.resampler.n_latents, self.cfg.resampler.dim
            return self.decoder.tok_embeddings.weight.new_zeros(0, r, dm), layout
        if patches is None:
            patches = self.decoder.tok_embeddings.weight.new_zeros(0, encoder.cfg.patch_dim)
        grouped, grid, mask = group_patches(patches, layout)  # (M, n, patch_dim), (M, n, 2), (M, n); checks N
        if not layout.n_items:
            # one dummy item, sliced away: every trainable parameter stays in each step's graph (DDP)
            dummy = grouped.new_zeros(1, 1, encoder.width)  # (1, 1, d_enc)
            return resampler(dummy, torch.ones(1, 1, dtype=torch.bool, device=dummy.device))[:0], layout
        with torch.no_grad():  # frozen feature extractor: no graph through the encoder
            features = encoder.patch_features(grouped, grid, mask, layer=self.cfg.encoder_layer)  # (M, n, d_enc)
        return resampler(features, mask), layout  # (M, R, D_media)

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
        docs = doc_ids if doc_ids is not None else torch.zeros_like(tokens)
        img, img_layout = self._media_tokens(IMAGE, tokens, modality, image_patches)
        aud, aud_layout = self._media_tokens(AUDIO, tokens, modality, audio_patches)

        # every medium of the batch, ordered by (row, opening slot); markers around no patch
        # (a generated <img>, a marker-mode pair) are not media and stay in the stream as text
        items = torch.cat([img, aud.to(img.dtype)])  # (M, R, D_media)
        row = torch.cat([img_layout.row, aud_layout.row])  # (M,)
        start = torch.cat([img_layout.start, aud_layout.start])
        end = torch.cat([img_layout.end, aud_layout.end])
        order = torch.argsort(row * l + start)
        items, row, start, end = items[order], row[order], start[order], end[order]

        kept = kept_slots(b, l, row, start, end)  # (B, L)
        opens = torch.zeros(b, l, dtype=torch.bool, device=tokens.device)
        opens[row, start] = True  # (B, L) where each medium sits

        # each row's media tokens; a batch without media gets one zero medium that no slot may see,
        # so the gated blocks run (and stay in the graph) on every batch and change nothing
        per_row = torch.bincount(row, minlength=b)  # (B,)
        rank = torch.arange(row.shape[0], device=row.device) - (torch.cumsum(per_row, 0) - per_row)[row]  # (M,)
        n_media = max(int(per_row.max()) if row.numel() else 0, 1)
        r, dm = self.cfg.resampler.n_latents, self.cfg.resampler.dim
        media = items.new_zeros(b, n_media, r, dm)
        media[row, rank] = items  # (B, n_media, R, D_media)
        media = media.view(b, n_media * r, dm)  # (B, T, D_media)
        media_doc = torch.full((b, n_media), -2, dtype=docs.dtype, device=docs.device)  # -2: no medium
        media_doc[row, rank] = docs[row, start]

        # each slot's medium: the most recent one of its row, if that is in the slot's document
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

        # positions 0, 1, 2, ... within each document of the stream (documents are contiguous)
        ar = torch.arange(s, device=tokens.device).expand(b, s)  # (B, S)
        first = torch.ones_like(valid)
        first[:, 1:] = lm_docs[:, 1:] != lm_docs[:, :-1]
        doc_start = torch.where(first, ar, 0).cummax(dim=1).values  # (B, S)
        positions = (ar - doc_start).unsqueeze(-1).expand(b, s, 3)  # (B, S, 3)

        column_medium = torch.arange(n_media * r, device=tokens.device) // r  # (T,)
        media_mask = lm_medium.unsqueeze(-1) == column_medium.view(1, 1, -1)  # (B, S, T); -1 matches none
        lm_doc_ids = None if doc_ids is None and bool(valid.all()) else lm_docs
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
        """A packed batch -> ``(mean loss over labelled slots, per-slot losses (B, L))``; refuses a
        label on a slot the LM stream does not have (targets are text, never inside a medium)."""
        stream = self.lm_stream(
            batch["tokens"], batch["modality"], batch.get("image_patches"), batch.get("audio_patches"),
            batch.get("doc_ids"),
        )
        labels = batch["labels"]
        if bool(((labels != IGNORE_INDEX) & ~stream.kept).any()):
            raise ValueError("a patch or <row> slot carries a label: Flamingo's LM stream has no such slot")
        return lm_loss(self._scatter(self._lm_logits(stream), stream), labels)

    # ---- cached decoding (hooks of FusionArm.generate) -----------------------------------------

    def _setup_generation(self, batch_size: int, total_len: int) -> None:
        # the cross-attention caches are sized by the prompt's media: allocated by _prefill
        self._cache_size = (batch_size, total_len)

    def _prefill(self, tokens, modality, positions, image_patches, audio_patches, lengths) -> torch.Tensor:
        """The prompt's LM stream through the caches -> logits ``(B, V)`` after each row's last
        prompt slot. Allocates the caches: self-attention for the stream, cross-attention for the
        media tokens (filled here, read by every decode step)."""
        b, l = tokens.shape
        if tuple(positions.shape) != (b, l, 3):
            raise ValueError(f"positions must have shape {(b, l, 3)}, got {tuple(positions.shape)}")
        stream = self.lm_stream(tokens, modality, image_patches, audio_patches)
        real = torch.arange(l, device=tokens.device)[None, :] < lengths[:, None]  # (B, L) prompt, not padding
        n_real = (stream.kept & real).sum(dim=1)  # (B,) each row's prompt slots in the LM stream (left-aligned)
        batch, total = self._cache_size
        self.decoder.setup_caches(batch, total, encoder_max_seq_len=stream.media.shape[1])
        # one document per row, padding and filler after it: causal attention is the rule (doc_ids None)
        h = self.decoder.hidden(
            self.decoder.embed(stream.tokens), stream.positions, lengths=n_real,
            encoder_input=stream.media, encoder_mask=stream.media_mask,
        )  # (B, S, D)
        rows = torch.arange(b, device=tokens.device)
        # a new slot attends what the prompt's last slot attends: the row's last medium, or none
        self._step_mask = stream.media_mask[rows, n_real - 1].unsqueeze(1)  # (B, 1, T)
        new = torch.arange(total - l, device=tokens.device)  # the LM stream goes on at n_real, n_real + 1, …
        self._new_positions = (n_real[:, None] + new).view(b, -1, 1).expand(b, new.shape[0], 3)  # (B, T_new, 3)
        self._decoded = 0
        return self.decoder.output(h[rows, n_real - 1])  # (B, V): the head on each row's last slot only

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new text slot per row at its next LM-stream position (``positions``, numbered in
        the input's scheme, are not used); the media keys and values come from the gated blocks'
        caches, filled by the prompt's forward."""
        pos = self._new_positions[:, self._decoded : self._decoded + 1]  # (B, 1, 3)
        self._decoded += 1
        return self.decoder(self.decoder.embed(tokens), pos, encoder_mask=self._step_mask)[:, -1]  # (B, V)

    def _teardown_generation(self) -> None:
        self._cache_size, self._step_mask, self._new_positions = None, None, None
        self.decoder.teardown_caches()

    # ---- accounting -------------------------------------------------------------------------

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters (tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
