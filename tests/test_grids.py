"""pipeline.grids: pixel-exact layout, ragged rows, downscaling and the PNG round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline import grids


def _images(n: int, h: int = 4, w: int = 6) -> np.ndarray:
    return np.stack([np.full((h, w, 3), 10 * (i + 1), np.uint8) for i in range(n)])


def test_grid_places_every_image_and_pads_ragged_rows():
    a, b = _images(3), _images(1) + 100
    out = grids.grid([a, b], pad=2, background=255)
    assert out.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    for j in range(3):
        np.testing.assert_array_equal(out[2:6, 2 + j * 8 : 8 + j * 8], a[j])
    np.testing.assert_array_equal(out[8:12, 2:8], b[0])
    assert (out[8:12, 10:] == 255).all()  # the short row is padded with background
    assert (out[:2] == 255).all() and (out[:, :2] == 255).all()


def test_tile_is_row_major_and_grayscale_is_expanded():
    imgs = _images(5)
    out = grids.tile(imgs, cols=2, pad=0)
    assert out.shape == (3 * 4, 2 * 6, 3)
    np.testing.assert_array_equal(out[4:8, 6:12], imgs[3])
    gray = grids.tile(imgs[..., 0], cols=5, pad=0)
    np.testing.assert_array_equal(gray, grids.tile(imgs, cols=5, pad=0))


def test_downscale_box_filter_matches_block_means():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    got = grids.downscale(x, 4)
    want = x.reshape(2, 4, 2, 4, 2, 3).astype(np.float64).mean((2, 4))
    assert np.abs(got.astype(np.float64) - want).max() <= 1
    assert grids.downscale(x, 8) is not None and (grids.downscale(x, 8) == x).all()


def test_save_grid_round_trips_through_png(tmp_path):
    rows = [_images(2), _images(2) + 50]
    path = grids.save_grid(tmp_path / "sub" / "g.png", rows)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), grids.grid(rows))
    assert grids.png_bytes(grids.grid(rows)) == path.read_bytes()  # deterministic encoding
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        grids.grid([np.zeros((1, 4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="same height"):
        grids.grid([_images(1), _images(1, h=5)])
    with pytest.raises(ValueError, match="at least one"):
        grids.grid([])
