"""Token budget: how many slots an image, a clip, a video or a document costs (DESIGN §3.3).

The functions here are the *only* place where slot counts are computed: the image tokenizer
asks :func:`image_grid_shapes` / :func:`anyres_layout` what to cut, and the interleaver's streams
are checked against :func:`image_slots` / :func:`audio_slots` in the tests, so a budget answer is
exactly what a stream will contain.

Counts are patch slots only, unless ``structural=True``, which adds the text slots the
interleaver wraps around a media block: ``<img>``/``<aud>``, ``</img>``/``</aud>`` and one
``<row>`` after every row of every grid.

CLI::

    python -m omnifuse.tokenizers.budget --image 336x336 --patch 14                  # 576
    python -m omnifuse.tokenizers.budget --image 336x336 --patch 14 --pixel-shuffle  # 144
    python -m omnifuse.tokenizers.budget --image 672x1008 --patch 14 --anyres 336    # thumbnail + 2×3 tiles
    python -m omnifuse.tokenizers.budget --audio 1.0 --patch 8                       # 1 s of log-mel
    python -m omnifuse.tokenizers.budget --image 336 --patch 14 --video 60           # 34560
    python -m omnifuse.tokenizers.budget --image 336 --patch 14 --context 4096       # images that fit
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from omnifuse.tokenizers.audio import HOP, N_MELS, SAMPLE_RATE


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def grid_shape(height: int, width: int, patch: int, *, pixel_shuffle: bool = False) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid of a ``height×width`` array (zero-padded to a multiple of P)."""
    if patch < 1 or height < 1 or width < 1:
        raise ValueError(f"need patch, height, width >= 1, got patch={patch}, {height}x{width}")
    rows, cols = _ceil_div(height, patch), _ceil_div(width, patch)
    if pixel_shuffle:  # 2×2 patches → 1 slot, odd edges padded
        rows, cols = _ceil_div(rows, 2), _ceil_div(cols, 2)
    return rows, cols


@dataclass(frozen=True)
class AnyresLayout:
    """How AnyRes cuts an image: resize to ``height×width``, pad to ``grid*base``, cut ``grid`` tiles.

    ``thumbnail`` is False exactly when the image is a single tile (nothing to summarise).
    """

    height: int
    width: int
    grid: tuple[int, int]  # (tiles down, tiles across)
    thumbnail: bool

    @property
    def n_tiles(self) -> int:
        return self.grid[0] * self.grid[1]


def anyres_layout(height: int, width: int, base: int, max_tiles: int) -> AnyresLayout:
    """Choose the AnyRes tile grid of a ``height×width`` image (LLaVA-NeXT's rule, simplified).

    Among tile grids ``gh×gw`` with ``gh*gw <= max_tiles``, take the one that keeps the most
    resolution, i.e. the largest scale ``s = min(gh*base/height, gw*base/width, 1)`` (aspect ratio
    kept, never upscaled), ties broken by fewer tiles. The image is resized by ``s`` and covered
    with ``ceil(h'/base) × ceil(w'/base)`` tiles. An image that fits in one tile (after that
    resize) is a single grid with no thumbnail; otherwise a ``base×base`` thumbnail comes first.
    """
    if base < 1 or max_tiles < 1:
        raise ValueError(f"anyres needs base >= 1 and max_tiles >= 1, got base={base}, max_tiles={max_tiles}")
    if height <= base and width <= base:
        return AnyresLayout(height, width, (1, 1), thumbnail=False)
    best: tuple[float, int, int, int] | None = None  # (-scale, tiles, gh, gw): smallest is best
    for gh in range(1, max_tiles + 1):
        for gw in range(1, max_tiles // gh + 1):
            scale = min(gh * base / height, gw * base / width, 1.0)
            key = (-scale, gh * gw, gh, gw)
            if best is None or key < best:
                best = key
    scale = -best[0]
    h2 = max(1, min(round(height * scale), best[2] * base))
    w2 = max(1, min(round(width * scale), best[3] * base))
    grid = (_ceil_div(h2, base), _ceil_div(w2, base))
    return AnyresLayout(h2, w2, grid, thumbnail=grid != (1, 1))


def image_grid_shapes(
    height: int,
    width: int,
    patch: int,
    *,
    pixel_shuffle: bool = False,
    size: tuple[int, int] | None = None,
    anyres_base: int | None = None,
    max_tiles: int = 4,
) -> list[tuple[int, int]]:
    """``(rows, cols)`` of every grid an image becomes, in stream order (AnyRes: thumbnail, then tiles)."""
    if size is not None:
        height, width = size
    if anyres_base is None:
        return [grid_shape(height, width, patch, pixel_shuffle=pixel_shuffle)]
    layout = anyres_layout(height, width, anyres_base, max_tiles)
    if not layout.thumbnail:
        return [grid_shape(layout.height, layout.width, patch, pixel_shuffle=pixel_shuffle)]
    tile = grid_shape(anyres_base, anyres_base, patch, pixel_shuffle=pixel_shuffle)
    return [tile] * (1 + layout.n_tiles)


def grids_slots(grids: Sequence[tuple[int, int]], *, structural: bool = False) -> int:
    """Slots of a media block made of ``grids``: patches, plus open/close and ``<row>`` tokens if ``structural``."""
    n = sum(r * c for r, c in grids)
    if structural:
        n += 2 + sum(r for r, _ in grids)
    return n


def image_slots(
    height: int,
    width: int,
    patch: int,
    *,
    pixel_shuffle: bool = False,
    structural: bool = False,
    size: tuple[int, int] | None = None,
    anyres_base: int | None = None,
    max_tiles: int = 4,
) -> int:
    """Slots one image costs (patch slots; ``structural`` adds ``<img>``, ``</img>``, ``<row>``s)."""
    grids = image_grid_shapes(
        height, width, patch, pixel_shuffle=pixel_shuffle, size=size, anyres_base=anyres_base, max_tiles=max_tiles
    )
    return grids_slots(grids, structural=structural)


def audio_frames(seconds: float, *, sample_rate: int = SAMPLE_RATE, hop: int = HOP) -> int:
    """Frames of :func:`omnifuse.tokenizers.audio.log_mel` for a clip: ``1 + samples // hop`` (centred STFT)."""
    return 1 + int(round(seconds * sample_rate)) // hop


def audio_grid_shape(n_mels: int, frames: int, patch: int) -> tuple[int, int]:
    """``(rows, cols)`` = (frequency bands, time steps) of a ``(n_mels, frames)`` spectrogram's patch grid."""
    return grid_shape(n_mels, frames, patch)


def audio_slots(frames: int, patch: int, *, n_mels: int = N_MELS, structural: bool = False) -> int:
    """Slots one spectrogram of ``frames`` frames costs (``structural`` adds ``<aud>``, ``</aud>``, ``<row>``s)."""
    return grids_slots([audio_grid_shape(n_mels, frames, patch)], structural=structural)


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected HxW or N, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m omnifuse.tokenizers.budget",
        description=(
            "How many sequence slots an image, an audio clip or a video costs, before any model runs. "
            "Prints one integer: slots per item (x frames for --video), or with --context how many items fit."
        ),
        epilog=(
            "examples:\n"
            "  --image 336x336 --patch 14                 -> 576\n"
            "  --image 224x224 --patch 14                 -> 256\n"
            "  --image 336x336 --patch 14 --pixel-shuffle -> 144\n"
            "  --image 672x1008 --patch 14 --anyres 336 --max-tiles 6   -> (1 thumbnail + 6 tiles) x 576 = 4032\n"
            "  --audio 1.0 --patch 8                      -> 32 (32 mel bins x 63 frames)\n"
            "  --image 336 --patch 14 --video 60          -> 34560\n"
            "  --image 336 --patch 14 --context 4096      -> 7\n"
            "HxW is height x width in pixels; H alone means HxH."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", type=_size, metavar="HxW", help="image size in pixels (height x width, or N for NxN)")
    what.add_argument("--audio", type=float, metavar="SECONDS", help="audio clip length, cut as a log-mel spectrogram")
    p.add_argument("--patch", type=int, default=8, help="patch side P in pixels / (mel bins, frames) (default: 8)")
    p.add_argument("--pixel-shuffle", action="store_true", help="images: merge 2x2 patches into one slot (4x fewer)")
    p.add_argument("--anyres", type=int, metavar="BASE", help="images: AnyRes tiling with BASExBASE tiles + a thumbnail")
    p.add_argument("--max-tiles", type=int, default=4, help="AnyRes: most tiles per image, thumbnail not counted (default: 4)")
    p.add_argument("--resize", type=_size, metavar="HxW", help="images: resize to HxW before patching")
    p.add_argument("--n-mels", type=int, default=N_MELS, help=f"audio: mel bins (default: {N_MELS})")
    p.add_argument("--hop", type=int, default=HOP, help=f"audio: STFT hop in samples (default: {HOP})")
    p.add_argument("--sample-rate", type=int, default=SAMPLE_RATE, help=f"audio: sample rate in Hz (default: {SAMPLE_RATE})")
    p.add_argument(
        "--structural", action="store_true",
        help="count the interleaver's structural tokens too (<img>/</img> or <aud>/</aud> and one <row> per row)",
    )
    p.add_argument("--video", type=int, metavar="FRAMES", help="images: a video of FRAMES frames, each tokenized as an image")
    p.add_argument("--context", type=int, metavar="N", help="print how many such items fit in a context of N slots")
    p.add_argument("-v", "--verbose", action="store_true", help="print the breakdown to stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.video is not None and args.image is None:
        raise SystemExit("--video needs --image (the frame size)")
    if args.image is None and (args.pixel_shuffle or args.anyres or args.resize):
        raise SystemExit("--pixel-shuffle, --anyres and --resize apply to --image only")

    if args.image is not None:
        h, w = args.image
        grids = image_grid_shapes(
            h, w, args.patch, pixel_shuffle=args.pixel_shuffle, size=args.resize,
            anyres_base=args.anyres, max_tiles=args.max_tiles,
        )
        what = f"image {h}x{w}"
    else:
        frames = audio_frames(args.audio, sample_rate=args.sample_rate, hop=args.hop)
        grids = [audio_grid_shape(args.n_mels, frames, args.patch)]
        what = f"audio {args.audio:g}s = ({args.n_mels} mels, {frames} frames)"
    per_item = grids_slots(grids, structural=args.structural)
    item = per_item * (args.video or 1)
    answer = item if args.context is None else args.context // item

    if args.verbose:
        print(f"{what}, patch {args.patch}: grids {grids} -> {per_item} slots per item", file=sys.stderr)
        if args.video:
            print(f"video: {args.video} frames x {per_item} = {item} slots", file=sys.stderr)
        if args.context is not None:
            print(f"context {args.context}: {answer} x {item} slots fit", file=sys.stderr)
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
