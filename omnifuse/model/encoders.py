"""Contrastive encoders (CLIP for images, CLAP for spectrograms): a ViT over one media item's
patches, a causal text tower, and the symmetric InfoNCE loss that trains them together.

CLIP and CLAP are the same recipe here; only the patches differ (RGB ``3·P²`` or log-mel ``P²``).

    patches (M, n, patch_dim) ─► patch_embed ─► + row_embed[r] + col_embed[c] ─┐
                                              [CLS] ─────────────────────────────┴─► ln_pre ─► blocks
                                              (bidirectional, padding keys masked) ─► ln_post(CLS) ─► proj

The bolt-on arms read two things from a trained :class:`PatchEncoder`: per-patch features of a
chosen block (LLaVA-1.5 takes the penultimate block, class token dropped) and the pooled
embedding. Blocks are torchtune's :class:`~torchtune.modules.TransformerSelfAttentionLayer` around
:class:`~torchtune.modules.MultiHeadAttention` (``is_causal=False``), LayerNorm and a GELU MLP as in
CLIP's ViT. Patches arrive grouped per item by :func:`omnifuse.model.media.group_patches`, so an
image and a spectrogram are the same thing here: a grid of flattened patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import FeedForward, MultiHeadAttention, TransformerSelfAttentionLayer

from omnifuse.model.config import DecoderConfig
from omnifuse.model.decoder import Decoder

MEDIA = ("image", "audio")
STEMS = ("linear", "conv")


@dataclass
class EncoderConfig:
    """A ViT over one media item's patch grid.

    Args:
        patch_dim: values in one flattened patch (``3 * P * P`` for RGB images, ``P * P`` for
            spectrograms).
        dim: encoder width; :attr:`PatchEncoder.width` and the width of :meth:`PatchEncoder.patch_features`.
        n_layers: transformer blocks.
        n_heads: attention heads; ``dim`` must divide by it.
        ffn_hidden: the **final** hidden width of the GELU MLP. ``None`` -> ``4 * dim``.
        max_rows: grid rows the learned row position table covers (an item may have fewer).
        max_cols: grid columns the learned column position table covers.
        embed_dim: width of the pooled, projected embedding (the contrastive space). ``None`` -> ``dim``.
        norm_eps: LayerNorm epsilon.
        init_std: std of the normal init of linear weights, the class token and position tables;
            residual output projections get ``init_std / sqrt(2 * n_layers)`` (GPT-2).
        stem: how a patch becomes a ``dim``-wide token. ``"linear"``: one linear map of the flattened
            patch (ViT). ``"conv"``: :class:`ConvStem`, 3x3 stride-2 convolutions over the pixels
            (Xiao et al. 2021), which cross patch borders and are translation-equivariant.
        channels: channels of a patch (``patch_dim = channels * P * P``; 3 for RGB, 1 for a
            spectrogram); the conv stem lays the pixels back out with it.
    """

    patch_dim: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_hidden: int | None = None
    max_rows: int = 64
    max_cols: int = 64
    embed_dim: int | None = None
    norm_eps: float = 1e-5
    init_std: float = 0.02
    stem: Literal["linear", "conv"] = "linear"
    channels: int = 1

    def __post_init__(self) -> None:
        for name in ("patch_dim", "dim", "n_layers", "n_heads", "max_rows", "max_cols", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"EncoderConfig.{name} must be a positive int, got {value!r}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.dim
        if self.embed_dim is None:
            self.embed_dim = self.dim
        for name in ("ffn_hidden", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"EncoderConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"EncoderConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.norm_eps <= 0.0:
            raise ValueError(f"EncoderConfig.norm_eps must be positive, got {self.norm_eps}")
        if self.init_std <= 0.0:
            raise ValueError(f"EncoderConfig.init_std must be positive, got {self.init_std}")
        if self.stem not in STEMS:
            raise ValueError(f"EncoderConfig.stem must be one of {STEMS}, got {self.stem!r}")
        if self.stem == "conv":
            p = self.patch
            if p * p * self.channels != self.patch_dim or p < 2 or p & (p - 1):
                raise ValueError(
                    f"EncoderConfig.stem='conv' needs patch_dim = channels * P * P with P a power of two >= 2 "
                    f"(its stride-2 convolutions), got patch_dim={self.patch_dim}, channels={self.channels}"
                )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch(self) -> int:
        """Patch side ``P`` (``patch_dim = channels * P * P``)."""
        return math.isqrt(self.patch_dim // self.channels)


def checked_encoder_field(
    owner: str, name: str, value, patch_dim: int, patch: int, layer: int, layer_field: str
) -> EncoderConfig | None:
    """An arm config's encoder field (``owner.name``), checked against the arm: a dict (YAML)
    becomes an :class:`EncoderConfig`; its ``patch_dim`` must equal the data's ``patch_dim`` (from
    ``patch``) and the arm's block index ``layer`` (field ``layer_field``) must exist. ``None``
    passes (the stage run fills it in). Errors name ``owner.field``."""
    if isinstance(value, dict):
        value = EncoderConfig(**value)
    if value is None:
        return None
    if not isinstance(value, EncoderConfig):
        raise ValueError(f"{owner}.{name} must be an EncoderConfig or None, got {type(value).__name__}")
    if value.patch_dim != patch_dim:
        raise ValueError(
            f"{owner}.{name}.patch_dim is {value.patch_dim} but patch={patch} gives {patch_dim}-value "
            f"patches: the encoder was trained on another patch size (set data.patch to the stage's)"
        )
    if not -value.n_layers <= layer < value.n_layers:
        raise ValueError(
            f"{owner}.{layer_field}={layer} is out of range for the {value.n_layers}-block "
            f"{name} (use -{value.n_layers}..{value.n_layers - 1})"
        )
    return value


def unpatchify(patches: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Patches back into pixels: ``(M, n, P*P*C)`` flattened in (P, P, C) order, at ``(row, col)`` of
    ``grid`` -> ``(M, C, rows*P, cols*P)`` (the inverse of :func:`omnifuse.tokenizers.image.patchify` and
    :func:`omnifuse.tokenizers.audio.patchify_spectrogram`, C = 1). Cells without a real patch are 0,
    which is what a convolution's zero padding reads past an item's edge."""
    m, n, d = patches.shape
    if patch < 1 or d % (patch * patch):
        raise ValueError(f"patch_dim {d} is not a multiple of patch * patch = {patch * patch}")
    c = d // (patch * patch)
    real = grid[mask]  # (N, 2)
    rows, cols = (int(real[:, 0].max()) + 1, int(real[:, 1].max()) + 1) if real.numel() else (1, 1)
    item = torch.arange(m, device=grid.device).unsqueeze(1).expand(m, n)[mask]  # (N,)
    if not torch.compiler.is_compiling():
        cell = (item * rows + real[:, 0]) * cols + real[:, 1]
        if cell.unique().numel() != cell.numel():
            raise ValueError("two patches of one item share a grid cell (row, col): an item's patches must tile "
                             "one image (AnyRes tiles do: their rows count on, omnifuse.data.pairs.grid_coordinates)")
    cells = patches.new_zeros(m, rows, cols, patch, patch, c)
    cells[item, real[:, 0], real[:, 1]] = patches[mask].reshape(-1, patch, patch, c)
    return cells.permute(0, 5, 1, 3, 2, 4).reshape(m, c, rows * patch, cols * patch)


class ConvStem(nn.Module):
    """The convolutional stem of ``EncoderConfig.stem="conv"`` (Xiao et al. 2021, "Early convolutions
    help transformers see better"): the patches laid back out as pixels (:func:`unpatchify`), then
    ``log2(P)`` 3x3 stride-2 convolutions with GELU (widths doubling up to ``dim``) and a 1x1
    convolution, so each patch's cell of the output is its ``dim``-wide token. Unlike the linear
    patch embedding it sees across patch borders and is translation-equivariant (by whole patches).
    ``(M, n, patch_dim)`` -> ``(M, n, dim)``; rows of padding patches are arbitrary."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.patch = cfg.patch
        n = self.patch.bit_length() - 1  # stride-2 convolutions: P = 2 ** n
        self.widths = [cfg.channels] + [max(cfg.dim >> (n - 1 - i), 1) for i in range(n)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(self.widths, self.widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
        layers.append(nn.Conv2d(self.widths[-1], cfg.dim, 1))
        self.net = nn.Sequential(*layers)
        self.dim = cfg.dim

    def forward(self, patches: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.net(unpatchify(patches, grid, mask, self.patch))  # (M, dim, rows, cols)
        h = h.permute(0, 2, 3, 1)  # (M, rows, cols, dim)
        item = torch.arange(h.shape[0], device=h.device).unsqueeze(1)  # (M, 1)
        return h[item, grid[..., 0], grid[..., 1]]  # (M, n, dim); padding rows read a real cell

    def flops_per_patch(self) -> int:
        """Multiply-add FLOPs (x2) of the convolutions per patch: a stride-2 layer ``i`` has
        ``(P / 2**(i+1))**2`` output cells per patch, each ``2 * 9 * c_in * c_out``; the 1x1 layer one."""
        flops, cells = 0, self.patch * self.patch
        for c_in, c_out in zip(self.widths, self.widths[1:]):
            cells //= 4
            flops += 2 * 9 * c_in * c_out * cells
        return flops + 2 * self.widths[-1] * self.dim


class PatchEncoder(nn.Module):
    """ViT over one media item's patches (an image or a spectrogram); see the module docstring.

    Inputs of every call: ``patches (M, n, patch_dim)`` float, ``grid (M, n, 2)`` long ``(row, col)``
    of each patch in its item, ``mask (M, n)`` bool (True = a real patch). Padding patches are
    masked out as attention keys, so they never change a real patch's features or the pooled
    embedding; their own rows of the output are arbitrary.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.width = cfg.dim
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.dim) if cfg.stem == "linear" else ConvStem(cfg)
        self.cls_token = nn.Parameter(torch.zeros(cfg.dim))
        self.row_embed = nn.Embedding(cfg.max_rows, cfg.dim)
        self.col_embed = nn.Embedding(cfg.max_cols, cfg.dim)
        self.ln_pre = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList([self._block(cfg) for _ in range(cfg.n_layers)])
        self.ln_post = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.dim, cfg.embed_dim, bias=False)
        self.reset_parameters()

    @staticmethod
    def _block(cfg: EncoderConfig) -> TransformerSelfAttentionLayer:
        attn = MultiHeadAttention(
            embed_dim=cfg.dim,
            num_heads=cfg.n_heads,
            num_kv_heads=cfg.n_heads,
            head_dim=cfg.head_dim,
            q_proj=nn.Linear(cfg.dim, cfg.dim),
            k_proj=nn.Linear(cfg.dim, cfg.dim),
            v_proj=nn.Linear(cfg.dim, cfg.dim),
            output_proj=nn.Linear(cfg.dim, cfg.dim),
            pos_embeddings=None,  # positions are the learned row/col tables added at the input
            is_causal=False,
        )
        mlp = FeedForward(
            gate_proj=nn.Linear(cfg.dim, cfg.ffn_hidden),
            down_proj=nn.Linear(cfg.ffn_hidden, cfg.dim),
            activation=nn.GELU(),
        )
        return TransformerSelfAttentionLayer(
            attn=attn,
            mlp=mlp,
            sa_norm=nn.LayerNorm(cfg.dim, eps=cfg.norm_eps),
            mlp_norm=nn.LayerNorm(cfg.dim, eps=cfg.norm_eps),
        )

    def reset_parameters(self) -> None:
        """N(0, init_std) for linear weights, class token and position tables; zero biases;
        residual output projections scaled by 1/sqrt(2 * n_layers); LayerNorms at (1, 0)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, mean=0.0, std=std)
        for layer in self.layers:
            for proj in (layer.attn.output_proj, layer.mlp.w2):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))

    # ---- forward ---------------------------------------------------------------------------

    def _check(self, patches: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> None:
        if patches.dim() != 3 or patches.shape[-1] != self.cfg.patch_dim:
            raise ValueError(
                f"patches must have shape (M, n, {self.cfg.patch_dim}) for EncoderConfig.patch_dim="
                f"{self.cfg.patch_dim}, got {tuple(patches.shape)}"
            )
        m, n, _ = patches.shape
        if tuple(grid.shape) != (m, n, 2) or tuple(mask.shape) != (m, n):
            raise ValueError(
                f"grid must be {(m, n, 2)} and mask {(m, n)} for patches {tuple(patches.shape)}, "
                f"got {tuple(grid.shape)} and {tuple(mask.shape)}"
            )
        if torch.compiler.is_compiling() or not m:
            return
        real = grid[mask]  # (N, 2) coordinates of the real patches (padding may hold anything)
        if real.numel() and (bool((real < 0).any()) or int(real[:, 0].max()) >= self.cfg.max_rows
                             or int(real[:, 1].max()) >= self.cfg.max_cols):
            raise ValueError(
                f"grid coordinates (max row {int(real[:, 0].max())}, max col {int(real[:, 1].max())}) exceed "
                f"EncoderConfig.max_rows={self.cfg.max_rows} / max_cols={self.cfg.max_cols}"
            )

    def _tokens(self, patches: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor):
        """Embedded sequence ``(M, 1 + n, dim)`` (CLS first) and the attention mask, or None when
        no item has padding (plain bidirectional SDPA)."""
        self._check(patches, grid, mask)
        m, n, _ = patches.shape
        grid = torch.where(mask.unsqueeze(-1), grid, torch.zeros_like(grid))  # padding -> a valid index
        tokens = self.patch_embed(patches) if self.cfg.stem == "linear" else self.patch_embed(patches, grid, mask)
        h = tokens + self.row_embed(grid[..., 0]) + self.col_embed(grid[..., 1])  # (M, n, dim)
        cls = self.cls_token.to(h.dtype).expand(m, 1, self.width)  # (M, 1, dim)
        h = self.ln_pre(torch.cat([cls, h], dim=1))  # (M, 1+n, dim)
        if torch.compiler.is_compiling() or not bool(mask.all()):
            keys = torch.cat([mask.new_ones(m, 1), mask], dim=1)  # (M, 1+n): CLS is always a key
            attn_mask = keys[:, None, :].expand(m, n + 1, n + 1)  # (M, 1+n, 1+n) True = may attend
        else:
            attn_mask = None
        return h, attn_mask

    def _layer_index(self, layer: int) -> int:
        n = self.cfg.n_layers
        if not -n <= layer < n:
            raise ValueError(f"layer={layer} is out of range for an encoder of {n} blocks (use -{n}..{n - 1})")
        return layer % n

    def patch_features(
        self, patches: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor, layer: int = -2
    ) -> torch.Tensor:
        """Output of block ``layer`` (a Python index over the block outputs; -2 = penultimate, as
        LLaVA-1.5) with the class token dropped: ``(M, n, dim)``, no final norm. Rows of padding
        patches are arbitrary; callers select real ones with ``mask`` (e.g.
        :func:`omnifuse.model.media.ungroup`). Blocks after ``layer`` are not run."""
        last = self._layer_index(layer)
        h, attn_mask = self._tokens(patches, grid, mask)
        for block in self.layers[: last + 1]:
            h = block(h, mask=attn_mask)  # (M, 1+n, dim)
        return h[:, 1:]  # (M, n, dim)

    def embed(self, patches: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(M, embed_dim)``: the class token after all blocks, LayerNorm,
        projection. Not L2-normalised (the contrastive loss normalises)."""
        h, attn_mask = self._tokens(patches, grid, mask)
        for block in self.layers:
            h = block(h, mask=attn_mask)  # (M, 1+n, dim)
        return self.proj(self.ln_post(h[:, 0]))  # (M, embed_dim)

    def forward(self, patches: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`embed`."""
        return self.embed(patches, grid, mask)

    # ---- accounting ------------------------------------------------------------------------

    def block_matmul_params(self) -> int:
        """Weight-matrix entries each token of the sequence multiplies through in the blocks (biases
        and norms are additions, not multiply-adds)."""
        return sum(p.numel() for p in self.layers.parameters() if p.dim() == 2)

    def embed_flops(self, n_patches: int) -> int:
        """Forward FLOPs of turning ``n_patches`` patches into tokens: ``2 * patch_dim * dim`` a patch
        (linear stem) or :meth:`ConvStem.flops_per_patch`."""
        per_patch = 2 * self.cfg.patch_dim * self.cfg.dim if self.cfg.stem == "linear" else \
            self.patch_embed.flops_per_patch()
        return per_patch * n_patches

    def forward_flops(self, n_patches: int) -> int:
        """Forward FLOPs of one item of ``n_patches`` patches (sequence ``S = n_patches + 1``):
        :meth:`embed_flops` (``2 * patch_dim * dim * n`` for the linear stem) + ``2 * block_matmul_params * S`` +
        ``4 * n_layers * dim * S²`` (QK^T and AV, full bidirectional attention) + ``2 * dim * embed_dim``
        (pooled projection). One multiply-add = 2 FLOPs, as in ``omnifuse.training.compute``;
        training costs 3x this (forward + backward)."""
        if n_patches < 0:
            raise ValueError(f"n_patches must be non-negative, got {n_patches}")
        cfg, s = self.cfg, n_patches + 1
        return (
            self.embed_flops(n_patches)
            + 2 * self.block_matmul_params() * s
            + 4 * cfg.n_layers * cfg.dim * s * s
            + 2 * cfg.dim * cfg.embed_dim
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- contrastive pair


def clip_loss(media: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              negatives: torch.Tensor | None = None, negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): ``media, text (M, E)`` paired row by row, not normalised;
    ``logit_scale`` a scalar (already clamped) whose ``exp`` multiplies the cosine similarities.

    ``logits = exp(logit_scale) * norm(media) @ norm(text).T``; the loss is the mean of the
    cross-entropies of ``logits`` (media -> text) and ``logits.T`` (text -> media) with the
    diagonal as targets. Every off-diagonal pair is a negative, so a batch must not hold two
    pairs that are each other's positives (the pair batches never repeat a caption).

    ``negatives (M, E)``: hard-negative captions (NegCLIP, Yuksekgonul et al. 2023), extra columns of
    the media -> text side only: medium ``i`` is scored against the M captions and the M negatives,
    ``negative_mask[i, j]`` (bool, default all True) saying which negatives count for it. The
    text -> media side is unchanged.
    """
    if media.shape != text.shape or media.dim() != 2:
        raise ValueError(f"media and text embeddings must both be (M, E), got {tuple(media.shape)} and {tuple(text.shape)}")
    media = F.normalize(media.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    scale = logit_scale.float().exp()
    logits = scale * media @ text.T  # (M, M)
    target = torch.arange(media.shape[0], device=media.device)
    media_logits = logits
    if negatives is not None:
        if negatives.shape != text.shape:
            raise ValueError(f"negatives must be (M, E) like text, got {tuple(negatives.shape)}")
        extra = scale * media @ F.normalize(negatives.float(), dim=-1).T  # (M, M)
        if negative_mask is not None:
            extra = extra.masked_fill(~negative_mask, float("-inf"))
        media_logits = torch.cat([logits, extra], dim=1)  # (M, 2M)
    return 0.5 * (F.cross_entropy(media_logits, target) + F.cross_entropy(logits.T, target))


@dataclass
class EncoderSize:
    """The ``encoder:`` block of a scale preset: a media encoder's size, whatever its patches.

    Args: as :class:`EncoderConfig` (``ffn_hidden=None`` -> ``4 * dim``).
    """

    dim: int
    n_layers: int
    n_heads: int
    ffn_hidden: int | None = None


@dataclass
class ContrastiveConfig:
    """A CLIP/CLAP pair: a :class:`PatchEncoder` over one medium and a text tower.

    Args:
        decoder: the text tower, the shared :class:`~omnifuse.model.Decoder` (causal, as CLIP's
            text transformer), sized by the scale preset's decoder block; its output head is never
            used, so ``tie_embeddings`` must be true (an untied head would be dead weight).
        encoder: the media encoder's size (the scale preset's ``encoder:`` block; required, the
            ``None`` default only lets the CLI fill it by a link).
        modality: ``"image"`` (patches of ``image_channels * P²`` values) or ``"audio"`` (``P²``).
        patch: patch side ``P`` (linked from ``data.patch``).
        image_channels: channels of an image patch.
        embed_dim: width of the shared embedding space. ``None`` -> ``encoder.dim``.
        max_rows, max_cols: grid size the encoder's position tables cover.
        init_logit_scale: initial log of the inverse temperature (CLIP: ``log(1 / 0.07)``).
        max_logit_scale: the clamp: ``exp(logit_scale) <= exp(max_logit_scale)`` (CLIP: 100).
        stem: the media encoder's patch embedding, ``"linear"`` (ViT) or ``"conv"`` (:class:`ConvStem`;
            ``EncoderConfig.stem``).
    """

    decoder: DecoderConfig
    encoder: EncoderSize | None = None
    modality: Literal["image", "audio"] = "image"
    patch: int = 8
    image_channels: int = 3
    embed_dim: int | None = None
    max_rows: int = 64
    max_cols: int = 64
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    stem: Literal["linear", "conv"] = "linear"

    def __post_init__(self) -> None:
        if isinstance(self.decoder, dict):  # YAML / plain-dict construction
            self.decoder = DecoderConfig(**self.decoder)
        if isinstance(self.encoder, dict):
            self.encoder = EncoderSize(**self.encoder)
        if not isinstance(self.decoder, DecoderConfig):
            raise ValueError(f"ContrastiveConfig.decoder must be a DecoderConfig, got {type(self.decoder).__name__}")
        if self.encoder is None:
            raise ValueError(
                "ContrastiveConfig.encoder is not set: the scale preset's top-level `encoder:` block (dim, n_layers, "
                "n_heads, ffn_hidden) sizes the media encoder (train.py links it into model.model.encoder)"
            )
        if not isinstance(self.encoder, EncoderSize):
            raise ValueError(f"ContrastiveConfig.encoder must be an EncoderSize, got {type(self.encoder).__name__}")
        if not self.decoder.tie_embeddings:
            raise ValueError(
                "ContrastiveConfig.decoder.tie_embeddings must be true: the text tower pools a hidden state "
                "and never uses the output head, so an untied head would be untrained dead weight"
            )
        if self.modality not in MEDIA:
            raise ValueError(f"ContrastiveConfig.modality must be one of {MEDIA}, got {self.modality!r}")
        if not isinstance(self.patch, int) or self.patch <= 0:
            raise ValueError(f"ContrastiveConfig.patch must be a positive int, got {self.patch!r}")
        if self.embed_dim is None:
            self.embed_dim = self.encoder.dim
        if self.max_logit_scale < self.init_logit_scale:
            raise ValueError(
                f"ContrastiveConfig.init_logit_scale ({self.init_logit_scale}) is above max_logit_scale "
                f"({self.max_logit_scale}): the clamp would hold it from the first step"
            )
        self.encoder_config()  # the media encoder's own checks, with the patch width filled in

    @property
    def patch_dim(self) -> int:
        return self.image_channels * self.patch**2 if self.modality == "image" else self.patch**2

    def encoder_config(self) -> EncoderConfig:
        """The media encoder's full config (what :class:`PatchEncoder` and the bolt-on arms build)."""
        e = self.encoder
        return EncoderConfig(
            patch_dim=self.patch_dim, dim=e.dim, n_layers=e.n_layers, n_heads=e.n_heads, ffn_hidden=e.ffn_hidden,
            max_rows=self.max_rows, max_cols=self.max_cols, embed_dim=self.embed_dim,
            norm_eps=self.decoder.norm_eps, init_std=self.decoder.init_std, stem=self.stem,
            channels=self.image_channels if self.modality == "image" else 1,
        )


class ContrastiveModel(nn.Module):
    """CLIP / CLAP: ``encoder`` (:class:`PatchEncoder`) and ``text`` (:class:`Decoder`) -> one space.

    The text of a caption is ``<s> ids </s>``; its embedding is the text tower's final hidden
    state (after the final norm) at the ``</s>`` slot, projected by ``text_proj``. Causal
    attention makes padding after ``</s>`` irrelevant to it.
    """

    def __init__(self, cfg: ContrastiveConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = PatchEncoder(cfg.encoder_config())
        self.text = Decoder(cfg.decoder)
        self.text_proj = nn.Linear(cfg.decoder.dim, cfg.embed_dim, bias=False)
        nn.init.normal_(self.text_proj.weight, std=cfg.decoder.dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    def encode_media(self, patches: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``patches (M, n, patch_dim)``, ``grid (M, n, 2)``, ``mask (M, n)`` -> ``(M, E)``, not normalised."""
        return self.encoder.embed(patches, grid, mask)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``tokens (M, T)`` (``<s> … </s>`` then padding), ``lengths (M,)`` (slots up to and
        including ``</s>``) -> ``(M, E)``, not normalised."""
        m, t = tokens.shape
        if tuple(lengths.shape) != (m,):
            raise ValueError(f"lengths must have shape ({m},), got {tuple(lengths.shape)}")
        if not torch.compiler.is_compiling() and m and (int(lengths.min()) < 1 or int(lengths.max()) > t):
            raise ValueError(f"text lengths must lie in 1..{t}, got {lengths.min().item()}..{lengths.max().item()}")
        positions = torch.arange(t, device=tokens.device).view(1, t, 1).expand(m, t, 3)  # (M, T, 3): t = h = w
        h = self.text.hidden(self.text.embed(tokens), positions)  # (M, T, D)
        pooled = h[torch.arange(m, device=tokens.device), lengths - 1]  # (M, D) at </s>
        return self.text_proj(pooled)  # (M, E)

    def clamped_logit_scale(self) -> torch.Tensor:
        """``logit_scale`` clamped at ``max_logit_scale`` (no gradient past the clamp, as open_clip)."""
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A pair batch (``omnifuse.data.pairs``) -> ``(media (M, E), text (M, E))`` embeddings."""
        media = self.encode_media(batch["patches"], batch["grid"], batch["mask"])
        text = self.encode_text(batch["text"], batch["text_lengths"])
        return media, text

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Symmetric InfoNCE of a pair batch (:func:`clip_loss`) at the clamped temperature, with
        the batch's hard-negative captions when it has them (``neg_text``, ``data.hard_negatives``)."""
        media, text = self(batch)
        if "neg_text" not in batch:
            return clip_loss(media, text, self.clamped_logit_scale())
        negatives = self.encode_text(batch["neg_text"], batch["neg_text_lengths"])
        return clip_loss(media, text, self.clamped_logit_scale(), negatives, batch["neg_mask"])

    # ---- accounting ------------------------------------------------------------------------

    def num_params(self) -> int:
        """Parameters (the text tower's tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters())
