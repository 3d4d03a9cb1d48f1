"""Segments + decoded media → one :class:`~omnifuse.tokenizers.stream.Stream` (DESIGN §3.3).

Layout of a sample ``[text, image, text(target)]``::

    <s> q q q <img> P P P <row> P P P <row> </img> q q a a </s>

- BOS first (``bos=True``), EOS last (``eos=True``).
- text segment → its SentencePiece ids (no BOS/EOS of its own).
- image → ``<img>``, then for every grid (one, or AnyRes thumbnail + tiles) its rows of patch
  slots each followed by ``<row>``, then ``</img>``.
- audio (a ``(n_mels, frames)`` log-mel) → ``<aud>``, rows = frequency bands (low to high), each
  row's patches over time followed by ``<row>``, then ``</aud>``.
- Patch slots have modality IMAGE/AUDIO and token id ``PAD_ID`` (0); every token slot, structural
  ones included, is TEXT.
- Targets: every token of a segment with ``"target": true``; the final EOS is a target when the
  last *text* segment is a target. Media and structural slots never are.

Positions (``positions="mrope"``, the default; Qwen2-VL's M-RoPE rule). A counter ``p`` holds the
next free position, always ``max(positions so far) + 1``:

- a token slot (text, BOS/EOS, ``<img>``, ``</img>``, ``<aud>``, ``</aud>``) gets ``(p, p, p)``, then
  ``p += 1``;
- a grid of ``rows × cols`` patches starts at ``t0 = p``: patch ``(r, c)`` gets
  ``(t0, t0 + r, t0 + c)``, and the ``<row>`` closing row ``r`` gets ``(t0, t0 + r, t0 + cols)``
  (it sits one column past the row's last patch); afterwards
  ``p = t0 + max(rows - 1, cols) + 1``;
- so ``<img>`` at ``(p, p, p)`` is followed by the grid at ``t0 = p + 1``, and ``</img>`` and the
  text after it resume at ``max + 1``. AnyRes grids follow one another the same way.

A text-only stream therefore has ``t = h = w = 0, 1, 2, …`` (1-D RoPE exactly). With
``positions="1d"`` (the ablation) every slot gets ``t = h = w = slot index``. In both schemes the
next slot after a stream (generation) goes at :func:`next_position`.

Media modes (``media=``, the ``data.media`` option; eval builds prompts the same way):

- ``"inline"`` (default): the layout above.
- ``"marker"``: a medium becomes just its two marker tokens, ``<img> </img>`` or ``<aud> </aud>``,
  with no patch and no ``<row>`` slot: the stream of a text-only language model that knows *where*
  a medium was (the markers Flamingo's LM stream keeps) but has never seen one.
- ``"drop"``: media segments are removed entirely (the stream of ``without_media`` segments).

In ``marker`` and ``drop`` modes every slot is a token slot, so positions are ``0, 1, 2, …``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from omnifuse.tokenizers.audio import N_MELS, AudioTokenizer
from omnifuse.tokenizers.budget import audio_grid_shape, grids_slots
from omnifuse.tokenizers.image import ImageTokenizer
from omnifuse.tokenizers.stream import AUDIO, IMAGE, TEXT, Stream
from omnifuse.tokenizers.text import (
    AUD_END_ID,
    AUD_ID,
    BOS_ID,
    EOS_ID,
    IMG_END_ID,
    IMG_ID,
    PAD_ID,
    ROW_ID,
    TextTokenizer,
)

PositionScheme = Literal["mrope", "1d"]
POSITION_SCHEMES = ("mrope", "1d")
MediaMode = Literal["inline", "marker", "drop"]
MEDIA_MODES = ("inline", "marker", "drop")
MARKERS = {"image": (IMG_ID, IMG_END_ID), "audio": (AUD_ID, AUD_END_ID)}


def next_position(stream: Stream) -> int:
    """Position component of the slot that would follow ``stream`` (``max + 1``; 0 when empty).

    A text slot appended to the stream (e.g. a generated token) gets ``(n, n, n)`` with ``n`` this
    value, then ``n + 1``, … — in both position schemes.
    """
    return int(stream.positions.max()) + 1 if len(stream) else 0


class _StreamBuilder:
    """Accumulates slots in numpy chunks; owns the position rule (module docstring)."""

    def __init__(self, scheme: PositionScheme, image_dim: int, audio_dim: int):
        self.scheme = scheme
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # tokens, modality, pos, target
        self.patches: dict[int, list[np.ndarray]] = {IMAGE: [], AUDIO: []}
        self.dims = {IMAGE: image_dim, AUDIO: audio_dim}
        self.p = 0  # next free M-RoPE position = max(positions so far) + 1

    def text(self, ids: Sequence[int], target: bool = False) -> None:
        """Token slots (text or structural) at ``(p, p, p), (p+1, …), …``."""
        n = len(ids)
        if n == 0:
            return
        pos = np.repeat(np.arange(self.p, self.p + n)[:, None], 3, axis=1)  # (n, 3)
        self.chunks.append((np.asarray(ids, np.int64), np.full(n, TEXT), pos, np.full(n, target)))
        self.p += n

    def token(self, tok: int, target: bool = False) -> None:
        self.text([tok], target)

    def grid(self, grid: np.ndarray, modality: int) -> None:
        """A ``(rows, cols, D)`` grid: rows of patch slots, each row followed by ``<row>``."""
        rows, cols, d = grid.shape
        if d != self.dims[modality]:
            raise ValueError(f"grid feature width {d} != expected {self.dims[modality]}")
        t0 = self.p
        r, c = np.meshgrid(np.arange(rows), np.arange(cols + 1), indexing="ij")  # (rows, cols+1): column cols is <row>
        pos = np.stack([np.full_like(r, t0), t0 + r, t0 + c], axis=-1).reshape(-1, 3)  # (rows*(cols+1), 3)
        is_row = (c == cols).reshape(-1)  # (rows*(cols+1),)
        tokens = np.where(is_row, ROW_ID, PAD_ID)
        mod = np.where(is_row, TEXT, modality)
        self.chunks.append((tokens, mod, pos, np.zeros(len(tokens), bool)))
        self.patches[modality].append(grid.reshape(rows * cols, d))  # (rows*cols, D), raster order
        self.p = t0 + max(rows - 1, cols) + 1

    def _patches(self, modality: int) -> torch.Tensor:
        parts = self.patches[modality]
        if not parts:
            return torch.zeros(0, self.dims[modality], dtype=torch.float32)
        return torch.from_numpy(np.concatenate(parts, axis=0).astype(np.float32, copy=False))  # (N, D)

    def build(self) -> Stream:
        if self.chunks:
            tokens, modality, positions, target = (np.concatenate(x) for x in zip(*self.chunks))
        else:
            tokens, modality, target = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
            positions = np.zeros((0, 3), np.int64)
        if self.scheme == "1d":  # ablation: every slot numbered as a flat sequence
            positions = np.repeat(np.arange(len(tokens))[:, None], 3, axis=1)  # (S, 3)
        s = Stream(
            tokens=torch.from_numpy(tokens.astype(np.int64)),  # (S,)
            modality=torch.from_numpy(modality.astype(np.int64)),  # (S,)
            positions=torch.from_numpy(positions.astype(np.int64)),  # (S, 3)
            target=torch.from_numpy(target.astype(bool)),  # (S,)
            image_patches=self._patches(IMAGE),  # (Ni, D_img)
            audio_patches=self._patches(AUDIO),  # (Na, P*P)
        )
        s.validate()
        return s


class Interleaver:
    """Tokenize one sample (segments + decoded media) into a :class:`Stream`.

    Args:
        text: the trained :class:`TextTokenizer` (fixed special ids).
        patch: image patch side P (image slot width ``3*P*P``, ×4 with ``pixel_shuffle``).
        audio_patch: spectrogram patch side (default: ``patch``); audio slot width ``audio_patch**2``.
        image_size: resize every image to ``(H, W)`` first (default: native size, zero-padded to P).
        normalize: pixels to [-1, 1] and log-mel through the fixed normalisation of
            :func:`omnifuse.tokenizers.audio.normalize_log_mel`.
        pixel_shuffle: 2×2 image patches → one slot (see :mod:`omnifuse.tokenizers.image`).
        anyres_base: AnyRes tile side (a multiple of ``patch``); ``None`` disables tiling.
        max_tiles: AnyRes tile limit (thumbnail not counted).
        n_mels: mel bins of the spectrograms (rows of the audio grid = ``ceil(n_mels/audio_patch)``).
        positions: ``"mrope"`` (2-D multimodal RoPE, module docstring) or ``"1d"`` (ablation).
        media: ``"inline"`` (patch slots), ``"marker"`` (``<img></img>`` / ``<aud></aud>`` only) or
            ``"drop"`` (media segments removed); see the module docstring.
    """

    def __init__(
        self,
        text: TextTokenizer,
        *,
        patch: int = 8,
        audio_patch: int | None = None,
        image_size: tuple[int, int] | None = None,
        normalize: bool = True,
        pixel_shuffle: bool = False,
        anyres_base: int | None = None,
        max_tiles: int = 4,
        n_mels: int = N_MELS,
        positions: PositionScheme = "mrope",
        media: MediaMode = "inline",
    ):
        if positions not in POSITION_SCHEMES:
            raise ValueError(f"positions must be one of {POSITION_SCHEMES}, got {positions!r}")
        if media not in MEDIA_MODES:
            raise ValueError(f"media must be one of {MEDIA_MODES}, got {media!r}")
        self.text = text
        self.positions = positions
        self.media = media
        self.image = ImageTokenizer(
            patch=patch, size=image_size, normalize=normalize, pixel_shuffle=pixel_shuffle,
            anyres_base=anyres_base, max_tiles=max_tiles,
        )
        self.audio = AudioTokenizer(patch=audio_patch or patch, normalize=normalize, n_mels=n_mels)

    @property
    def image_patch_dim(self) -> int:
        """Width of a row of ``Stream.image_patches``."""
        return self.image.patch_dim

    @property
    def audio_patch_dim(self) -> int:
        """Width of a row of ``Stream.audio_patches``."""
        return self.audio.patch_dim

    def image_slots(self, height: int, width: int, *, structural: bool = True) -> int:
        """Slots an image of this size adds to a stream (from :mod:`omnifuse.tokenizers.budget`)."""
        if self.media != "inline":
            return self._media_slots_not_inline(structural)
        return grids_slots(self.image.grid_shapes(height, width), structural=structural)

    def audio_slots(self, frames: int, *, structural: bool = True) -> int:
        """Slots a ``(n_mels, frames)`` spectrogram adds to a stream."""
        if self.media != "inline":
            return self._media_slots_not_inline(structural)
        return grids_slots([audio_grid_shape(self.audio.n_mels, frames, self.audio.patch)], structural=structural)

    def _media_slots_not_inline(self, structural: bool) -> int:
        # marker: the two marker tokens (structural slots); drop: nothing
        return 2 if self.media == "marker" and structural else 0

    def encode(
        self,
        segments: Sequence[Mapping[str, Any]],
        media: Mapping[str, Any],
        *,
        bos: bool = True,
        eos: bool = True,
    ) -> Stream:
        """Tokenize ``segments`` (DESIGN §3.1) with ``media[segment["file"]]`` decoded arrays.

        ``media`` values: images ``(H, W, 3)`` uint8 (or float in [0, 1]); audio ``(n_mels, frames)``
        float log-mel (numpy or torch). Raises ValueError on a malformed segment or missing file.
        """
        b = _StreamBuilder(self.positions, self.image_patch_dim, self.audio_patch_dim)
        if bos:
            b.token(BOS_ID)
        last_text_target = False
        for i, seg in enumerate(segments):
            if "text" in seg:
                last_text_target = bool(seg.get("target", False))
                b.text(self.text.encode(seg["text"]), last_text_target)
            elif "media" in seg:
                kind, file = seg["media"], seg.get("file")
                if kind not in MARKERS:
                    raise ValueError(f"segment {i}: unknown media kind {kind!r} (expected 'image' or 'audio')")
                # checked in every mode, so that the same samples are bad whatever data.media says
                if file not in media:
                    raise ValueError(f"segment {i} needs media file {file!r}, not among {sorted(media)}")
                if self.media == "drop":
                    continue
                opening, closing = MARKERS[kind]
                b.token(opening)
                if self.media == "inline" and kind == "image":
                    for grid in self.image(np.asarray(media[file])):
                        b.grid(grid, IMAGE)
                elif self.media == "inline":
                    b.grid(self.audio(media[file]), AUDIO)
                b.token(closing)
            else:
                raise ValueError(f"segment {i} has neither 'text' nor 'media': {dict(seg)}")
        if eos:
            b.token(EOS_ID, target=last_text_target)
        return b.build()

    def encode_prompt(
        self, segments: Sequence[Mapping[str, Any]], media: Mapping[str, Any]
    ) -> tuple[Stream, list[int]]:
        """Split a sample at its first target segment, for evaluation.

        Returns ``(prompt, answer)``: ``prompt`` is the stream of the segments before the first
        target segment (BOS, no EOS, no targets); ``answer`` is that segment's ids followed by EOS
        when it is the last text segment — exactly the target tokens the training stream holds
        for it. Continue the prompt at :func:`next_position`.
        """
        first = next((i for i, s in enumerate(segments) if "text" in s and s.get("target", False)), None)
        if first is None:
            raise ValueError("encode_prompt: the sample has no target segment")
        prompt = self.encode(segments[:first], media, bos=True, eos=False)
        answer = self.text.encode(segments[first]["text"])
        if not any("text" in s for s in segments[first + 1 :]):
            answer.append(EOS_ID)
        return prompt, answer

    def __repr__(self) -> str:
        return (
            f"Interleaver(vocab={self.text.vocab_size}, image={self.image}, audio={self.audio}, "
            f"positions={self.positions!r}, media={self.media!r})"
        )
