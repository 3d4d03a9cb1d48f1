"""Where the media are in a batch of slot streams: which patch belongs to which image or clip, and
its place in that item's grid.

The native arm embeds every patch slot on its own, so it never needs this. The bolt-on arms run an
encoder over *one media item at a time* (a ViT sees a whole image), so they need the patches of a
batch grouped per item. The stream layout (``omnifuse.tokenizers.interleave``) makes the grouping
exact without any extra field in the batch::

    <img> P P P <row> P P P <row> </img>          (audio: <aud> … </aud>, rows = mel bands)

- an item starts at an opening token (``<img>`` / ``<aud>``) directly followed by a patch of its
  kind and ends at the first closing token after it. Marker tokens that enclose no patch are
  plain text, not items: a model may *generate* ``<img>``, and ``data.media: marker`` streams
  hold ``<img></img>`` pairs with nothing inside;
- a patch's grid row is the number of ``<row>`` tokens between the opening token and the patch;
- its column is the number of patches of the same kind since the last opening or ``<row>`` token.

``image_patches`` / ``audio_patches`` of a batch hold the patch slots in row-major order of
``(B, L)`` (docs/ARCHITECTURE.md), which is also the order of :attr:`MediaLayout.item`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT
from omnifuse.tokenizers.text import AUD_END_ID, AUD_ID, IMG_END_ID, IMG_ID, ROW_ID

_OPEN_CLOSE = {IMAGE: (IMG_ID, IMG_END_ID), AUDIO: (AUD_ID, AUD_END_ID)}


@dataclass
class MediaLayout:
    """The media items of one kind in a ``(B, L)`` batch (``M`` items, ``N`` patch slots).

    Attributes:
        item: ``(N,)`` long, the item each patch slot belongs to (row-major slot order).
        grid: ``(N, 2)`` long, ``(row, col)`` of each patch in its item's grid.
        row: ``(M,)`` long, the batch row holding each item.
        start: ``(M,)`` long, slot index (within its row) of the item's opening token.
        end: ``(M,)`` long, slot index of the item's closing token.
        counts: ``(M,)`` long, patches per item.
    """

    item: torch.Tensor
    grid: torch.Tensor
    row: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    counts: torch.Tensor

    @property
    def n_items(self) -> int:
        return int(self.row.shape[0])


def media_layout(tokens: torch.Tensor, modality: torch.Tensor, kind: int) -> MediaLayout:
    """Group the ``kind`` (IMAGE or AUDIO) patch slots of ``tokens, modality (B, L)`` into items.

    Raises ValueError when the stream breaks the layout (a patch outside ``<img> … </img>``, an
    unclosed item), naming the batch row. Markers around no patch are not items (module docstring).
    """
    if kind not in _OPEN_CLOSE:
        raise ValueError(f"media kind must be IMAGE ({IMAGE}) or AUDIO ({AUDIO}), got {kind}")
    open_id, close_id = _OPEN_CLOSE[kind]
    b, l = tokens.shape
    flat_tok, flat_mod = tokens.reshape(-1), modality.reshape(-1)  # (B*L,)
    is_text = flat_mod == TEXT
    is_patch = flat_mod == kind
    patch_next = torch.zeros_like(is_patch)
    patch_next[:-1] = is_patch[1:]  # (B*L,) the next slot is a patch of this kind
    patch_next[l - 1 :: l] = False  # a row's last slot has no next slot in its row
    opens = is_text & (flat_tok == open_id) & patch_next  # (B*L,)
    rows_tok = is_text & (flat_tok == ROW_ID)

    open_idx = opens.nonzero().squeeze(1)  # (M,) flat index of each opening token
    all_closes = (is_text & (flat_tok == close_id)).nonzero().squeeze(1)  # closing tokens, stray ones included
    after = torch.searchsorted(all_closes, open_idx)  # (M,) the first closing token after each opener
    name = "<img>" if kind == IMAGE else "<aud>"
    if bool((after >= all_closes.shape[0]).any()):
        raise ValueError(f"unbalanced {name} markers in the batch: an item is never closed")
    close_idx = all_closes[after]  # (M,)
    if bool((close_idx[:-1] > open_idx[1:]).any()):
        raise ValueError(f"unbalanced {name} markers in the batch: an item opens before the previous one closes")
    if bool((open_idx // l != close_idx // l).any()):
        raise ValueError("a media item spans two batch rows")

    item_of_slot = torch.cumsum(opens.long(), 0) - 1  # (B*L,) last opened item at each slot
    patch_slots = is_patch.nonzero().squeeze(1)  # (N,)
    item = item_of_slot[patch_slots]  # (N,)
    if patch_slots.numel():
        inside = (item >= 0) & (patch_slots < close_idx[item.clamp_min(0)])
        if not bool(inside.all()):
            bad_row = int(patch_slots[~inside][0]) // l
            raise ValueError(f"batch row {bad_row} has a patch slot outside its media markers")

    n_rows_seen = torch.cumsum(rows_tok.long(), 0)  # (B*L,)
    grid_row = n_rows_seen[patch_slots] - n_rows_seen[open_idx[item]]  # (N,) <row> tokens since the opening
    boundary = opens | rows_tok  # a grid row starts after each of these
    segment = torch.cumsum(boundary.long(), 0) - 1  # (B*L,) index of the last boundary
    n_patches_seen = torch.cumsum(is_patch.long(), 0)  # (B*L,) inclusive
    at_boundary = n_patches_seen[boundary.nonzero().squeeze(1)]  # (n_boundaries,)
    grid_col = n_patches_seen[patch_slots] - at_boundary[segment[patch_slots]] - 1  # (N,)

    counts = torch.bincount(item, minlength=open_idx.shape[0]) if item.numel() else open_idx.new_zeros(open_idx.shape)
    return MediaLayout(
        item=item,
        grid=torch.stack([grid_row, grid_col], dim=1),  # (N, 2)
        row=open_idx // l,
        start=open_idx % l,
        end=close_idx % l,
        counts=counts,
    )


def group_patches(patches: torch.Tensor, layout: MediaLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``patches (N, d)`` in slot order -> ``(M, n_max, d)`` per item, ``grid (M, n_max, 2)``, and
    ``mask (M, n_max)`` bool (True = a real patch; padding is zeros at the end of each item)."""
    n, d = patches.shape
    if n != layout.item.shape[0]:
        raise ValueError(f"{n} patches for a layout of {layout.item.shape[0]} patch slots")
    m = layout.n_items
    n_max = int(layout.counts.max()) if m else 0
    offsets = torch.cumsum(layout.counts, 0) - layout.counts  # (M,) first patch of each item
    rank = torch.arange(n, device=patches.device) - offsets[layout.item]  # (N,) index within the item
    out = patches.new_zeros(m, n_max, d)
    out[layout.item, rank] = patches  # (M, n_max, d)
    grid = layout.grid.new_zeros(m, n_max, 2)
    grid[layout.item, rank] = layout.grid  # (M, n_max, 2)
    mask = torch.zeros(m, n_max, dtype=torch.bool, device=patches.device)
    mask[layout.item, rank] = True
    return out, grid, mask


def ungroup(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`group_patches`: ``features (M, n_max, D)`` -> ``(N, D)`` in slot order."""
    return features[mask]  # boolean indexing walks items, then patches: the slot order


def scatter_media(h: torch.Tensor, slots: torch.Tensor, media: torch.Tensor, name: str) -> torch.Tensor:
    """Overwrite ``h[slots]`` (``slots (B, L)`` bool) with ``media (N, D)``, given in row-major slot
    order (the order of a batch's ``image_patches`` / ``audio_patches``); ``name`` labels the error
    raised when ``N`` differs from the number of slots."""
    if not torch.compiler.is_compiling():  # the count check syncs; eager runs (and tests) do it
        n = int(slots.sum())
        if media.shape[0] != n:
            raise ValueError(f"the batch has {n} {name} slots but {media.shape[0]} {name} patches")
    # autocast may hand back bf16 media for an fp32 stream; masked_scatter fills in row-major order
    return h.masked_scatter(slots.unsqueeze(-1), media.to(h.dtype))  # (B, L, D)
