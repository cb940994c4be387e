"""PNG image grids for looking at what a stage produced (reconstructions, samples, originals side by side).

Images are uint8 NHWC arrays, the same layout as the ADM `samples.npz`. A grid is a list of rows; rows may have
different lengths (short rows are padded with the background colour). PNGs are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.manifest import atomic_write_bytes

PAD = 2
BACKGROUND = 255


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"grid images must be uint8, got {images.dtype}")
    if images.ndim == 3:  # (N, H, W) grayscale
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"grid images must be (N, H, W, 3), got {images.shape}")
    return images


def grid(rows: Sequence[np.ndarray], pad: int = PAD, background: int = BACKGROUND) -> np.ndarray:
    """Tile rows of images (each (n_i, H, W, 3) uint8) into one (R*(H+pad)+pad, C*(W+pad)+pad, 3) uint8 array."""
    rows = [_as_nhwc(r) for r in rows]
    if not rows or not any(len(r) for r in rows):
        raise ValueError("a grid needs at least one image")
    h, w = next(r for r in rows if len(r)).shape[1:3]
    if any(r.shape[1:3] != (h, w) for r in rows if len(r)):
        raise ValueError("all images of a grid must have the same height and width")
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            out[top : top + h, left : left + w] = image
    return out


def tile(images: np.ndarray, cols: int, pad: int = PAD) -> np.ndarray:
    """Tile (N, H, W, 3) images row-major into rows of `cols`."""
    images = _as_nhwc(images)
    return grid([images[i : i + cols] for i in range(0, len(images), cols)], pad)


def downscale(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (N, H, W, 3) uint8 images to (N, size, size, 3) with a box filter (for compact grids of many images)."""
    images = _as_nhwc(images)
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BOX)) for im in images])


def png_bytes(array: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as PNG, deterministically."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def save_grid(path: str | Path, rows: Sequence[np.ndarray], size: int | None = None, pad: int = PAD) -> Path:
    """Write a grid of `rows` as a PNG atomically; `size` downsizes each image first. Returns the path."""
    if size is not None:
        rows = [downscale(r, size) if len(r) else r for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(grid(rows, pad)))
    return path
