"""Image → grids of flattened P×P×C patches (DESIGN §3.3).

A *grid* is an array ``(rows, cols, D)``: patch ``(r, c)`` covers pixels
``[r*P:(r+1)*P, c*P:(c+1)*P]`` and its feature vector is those pixels flattened in
``(P, P, C)`` order (row within the patch, column within the patch, channel), so
``D = P*P*C``. Grids are read in raster order (row by row) when they become slots.

Options of :class:`ImageTokenizer`:

- ``size``: resize to ``(H, W)`` first (default: keep the native size). Either way the image is
  zero-padded at the bottom/right up to a multiple of P.
- ``normalize``: pixels to floats in [-1, 1]: ``(x/255 - 0.5) / 0.5`` for uint8 input; float input
  is taken to be in [0, 1] already and only gets ``(x - 0.5) / 0.5``. Padding is applied *after*
  normalisation, so padded pixels are 0 (mid-grey), not -1.
- ``pixel_shuffle``: 2×2 neighbouring patches → one slot whose feature is the four patches
  concatenated in the order ``(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)`` (top-left,
  top-right, bottom-left, bottom-right): 4× fewer slots, ``4*D`` features. An odd number of rows
  or columns is padded with zero patches first.
- ``anyres_base``: AnyRes tiling (LLaVA-NeXT). An image larger than ``base×base`` becomes a
  thumbnail (the whole image resized to ``base×base``) followed by ``gh×gw`` tiles of
  ``base×base`` in raster order, each its own grid; see :func:`omnifuse.tokenizers.budget.anyres_layout`
  for how the tile grid is chosen. An image that fits in one tile is a single grid.

The slot counts of every option are computed by :mod:`omnifuse.tokenizers.budget` with the same
arithmetic; the tests check that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from omnifuse.tokenizers.budget import anyres_layout, image_grid_shapes


def pad_to_multiple(img: np.ndarray, multiple: int, value: float = 0) -> np.ndarray:
    """Pad an ``(H, W, C)`` array at the bottom/right so H and W are multiples of ``multiple``."""
    h, w = img.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return img
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=value)


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased) resize of an ``(H, W, C)`` array; uint8 stays uint8 (rounded)."""
    if img.shape[:2] == (height, width):
        return img
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]  # (1, C, H, W)
    y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    y = y[0].permute(1, 2, 0).numpy()  # (height, width, C)
    if img.dtype == np.uint8:
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return y.astype(img.dtype, copy=False)


def normalize_pixels(img: np.ndarray) -> np.ndarray:
    """Pixels to float32 in [-1, 1]: uint8 → ``(x/255 - 0.5)/0.5``; float (assumed in [0, 1]) → ``(x - 0.5)/0.5``."""
    x = img.astype(np.float32)
    if img.dtype == np.uint8:
        x = x / 255.0
    return (x - 0.5) / 0.5


def patchify(img: np.ndarray, patch: int, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """Cut an image into a grid of flattened patches.

    Args:
        img: ``(H, W, C)`` (or ``(H, W)``, taken as C=1) uint8 or float array.
        patch: patch side P.
        size: optional ``(H', W')`` to resize to before cutting.
    Returns:
        ``(ceil(H/P), ceil(W/P), P*P*C)`` array of ``img``'s dtype; patch ``[r, c]`` is
        ``img[r*P:(r+1)*P, c*P:(c+1)*P, :]`` flattened in (P, P, C) order, zero-padded past the edge.
    """
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"patchify expects an (H, W, C) image, got shape {img.shape}")
    if patch < 1:
        raise ValueError(f"patch must be >= 1, got {patch}")
    if size is not None:
        img = resize(img, *size)
    img = pad_to_multiple(img, patch)
    h, w, c = img.shape
    rows, cols = h // patch, w // patch
    x = img.reshape(rows, patch, cols, patch, c)  # (rows, P, cols, P, C)
    x = x.transpose(0, 2, 1, 3, 4)  # (rows, cols, P, P, C)
    return np.ascontiguousarray(x.reshape(rows, cols, patch * patch * c))  # (rows, cols, P*P*C)


def pixel_shuffle(grid: np.ndarray) -> np.ndarray:
    """Merge 2×2 neighbouring patches into one slot (order: TL, TR, BL, BR; module docstring).

    ``(rows, cols, D)`` → ``(ceil(rows/2), ceil(cols/2), 4*D)``; odd edges get zero patches.
    """
    rows, cols, d = grid.shape
    grid = np.pad(grid, ((0, rows % 2), (0, cols % 2), (0, 0)))
    r2, c2 = grid.shape[0] // 2, grid.shape[1] // 2
    x = grid.reshape(r2, 2, c2, 2, d)  # (r2, 2, c2, 2, D): [i, di, j, dj]
    x = x.transpose(0, 2, 1, 3, 4)  # (r2, c2, di, dj, D)
    return np.ascontiguousarray(x.reshape(r2, c2, 4 * d))  # (r2, c2, 4*D)


def anyres_images(img: np.ndarray, base: int, max_tiles: int) -> list[np.ndarray]:
    """AnyRes split: ``[thumbnail, tile_00, tile_01, …]`` (raster order), each ``base×base``.

    An image that fits in one tile comes back alone (resized only if ``max_tiles`` forced it
    down). Otherwise the image is resized to the layout's size (aspect ratio kept, never
    upscaled), zero-padded to ``gh*base × gw*base`` and cut; the thumbnail is the whole
    (unpadded) image resized to ``base×base``.
    """
    h, w = img.shape[:2]
    layout = anyres_layout(h, w, base, max_tiles)
    if not layout.thumbnail:
        return [resize(img, layout.height, layout.width)]
    scaled = resize(img, layout.height, layout.width)
    scaled = np.pad(scaled, ((0, layout.grid[0] * base - layout.height), (0, layout.grid[1] * base - layout.width), (0, 0)))
    tiles = [
        scaled[i * base : (i + 1) * base, j * base : (j + 1) * base]
        for i in range(layout.grid[0])
        for j in range(layout.grid[1])
    ]
    return [resize(img, base, base), *tiles]


@dataclass
class ImageTokenizer:
    """Image → list of patch grids ``(rows, cols, D)`` float32 (one grid unless AnyRes)."""

    patch: int = 8
    size: tuple[int, int] | None = None
    normalize: bool = True
    pixel_shuffle: bool = False
    anyres_base: int | None = None
    max_tiles: int = 4
    channels: int = 3

    def __post_init__(self) -> None:
        if self.patch < 1:
            raise ValueError(f"ImageTokenizer.patch must be >= 1, got {self.patch}")
        if self.anyres_base is not None:
            if self.anyres_base % self.patch:
                raise ValueError(f"anyres_base {self.anyres_base} must be a multiple of patch {self.patch}")
            if self.max_tiles < 1:
                raise ValueError(f"max_tiles must be >= 1, got {self.max_tiles}")
            if self.size is not None:
                raise ValueError("ImageTokenizer: set either size (resize) or anyres_base (tiling), not both")
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))

    @property
    def patch_dim(self) -> int:
        """Feature width of one image slot: ``P*P*C``, ×4 with pixel shuffle."""
        return self.patch * self.patch * self.channels * (4 if self.pixel_shuffle else 1)

    def grid_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The ``(rows, cols)`` of every grid an image of this size becomes (from the budget)."""
        return image_grid_shapes(
            height, width, self.patch, pixel_shuffle=self.pixel_shuffle, size=self.size,
            anyres_base=self.anyres_base, max_tiles=self.max_tiles,
        )

    def __call__(self, img: np.ndarray) -> list[np.ndarray]:
        img = np.asarray(img)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3 or img.shape[2] != self.channels:
            raise ValueError(f"ImageTokenizer expects an (H, W, {self.channels}) image, got shape {img.shape}")
        if self.size is not None:
            img = resize(img, *self.size)
        images = [img] if self.anyres_base is None else anyres_images(img, self.anyres_base, self.max_tiles)
        grids = []
        for im in images:
            im = normalize_pixels(im) if self.normalize else im.astype(np.float32)
            g = patchify(im, self.patch)  # (rows, cols, P*P*C)
            if self.pixel_shuffle:
                g = pixel_shuffle(g)  # (rows/2, cols/2, 4*P*P*C)
            grids.append(g)
        return grids
