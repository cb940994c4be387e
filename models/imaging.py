"""Image decoding and the ADM centre crop, without torch: what decode worker processes import (they start fast).

`decode_crop` is the whole per-image CPU path of the features stage: original bytes -> RGB -> ADM centre crop 256
-> uint8 (256, 256, 3), or the reason it failed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_SIZE = 256  # ADM centre crop and pixel-decoder output


def load_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image; raises ValueError on anything that is not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from e


def adm_center_crop(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """ADM centre crop: BOX-halve while the short side >= 2*size, BICUBIC to short side `size`, centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def decode_crop(data: bytes | None) -> np.ndarray | str:
    """Image bytes -> uint8 (256, 256, 3) ADM centre crop, or the message saying why not."""
    if data is None:
        return "no image member (jpg/png/webp/bmp/gif/tif) in this sample"
    try:
        return np.asarray(adm_center_crop(load_rgb(data)), dtype=np.uint8)
    except ValueError as e:
        return str(e)


def decode_item(item: tuple) -> tuple:
    """(key, cls, bytes or None) -> (key, cls, uint8 (256, 256, 3) or the error message): a decode worker's task
    (defined here so that a worker process imports only this module, not torch)."""
    key, cls, data = item
    return key, cls, decode_crop(data)


def worker_init(close_fds: tuple[int, ...] = ()) -> None:
    """Start of a forked decode worker: drop file descriptors it must not hold (the output directory's lock, which a
    forked child would otherwise keep held after its parent dies) and die with the parent (Linux PR_SET_PDEATHSIG)."""
    import os
    import signal

    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: orphans end when their queue closes
        pass
