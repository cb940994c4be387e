"""Shared fixtures: tiny artifacts built inside the test session, offline, from real classes with random weights."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.runtime import Runtime

# (width, height) of the fixture images: square, landscape, portrait, larger than 2x256 (BOX halving) and tiny.
SIZES = [(256, 256), (320, 240), (200, 300), (600, 540), (64, 48), (1030, 520)]


def make_image_folder(root: Path, per_class: int = 8, classes=("cat", "dog", "fish"), seed: int = 0) -> Path:
    """An ImageFolder tree of random JPEG/PNG images of several sizes; returns its root."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = SIZES[(i + c) % len(SIZES)]
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            pixels[..., c] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]  # class-dependent structure
            fmt, ext = ("JPEG", "JPEG") if i % 2 == 0 else ("PNG", "png")
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format=fmt)
            (root / name / f"img_{i:03d}.{ext}").write_bytes(buf.getvalue())
    return root


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matmuls: intra-op threads only add contention on a shared CPU (use via `usefixtures`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory) -> Path:
    """A random-weight tiny RAE directory (DINOv2-reg 192-wide, 2 layers; 2-layer pixel decoder)."""
    from models.encoder import init_rae_dir

    return init_rae_dir(tmp_path_factory.mktemp("encoder"), "tiny", seed=0)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder") / "data")


@pytest.fixture(scope="session")
def images_artifact(tmp_path_factory, image_folder) -> Path:
    """24 images in 3 classes, shards of 5, 25% held out as val."""
    from stages import images

    out = tmp_path_factory.mktemp("images") / "art"
    images.run(images.Config(out=out, source=str(image_folder), shard_size=5, val_fraction=0.25))
    return out


@pytest.fixture(scope="session")
def features_artifact(tmp_path_factory, images_artifact, encoder_dir) -> Path:
    """Two-view features of `images_artifact` from the tiny encoder."""
    from stages import features

    out = tmp_path_factory.mktemp("features") / "art"
    features.run(features.Config(images=images_artifact, encoder=str(encoder_dir), out=out, views=2, batch_size=4,
                                 num_workers=2), rt=Runtime())
    return out


class Killed(Exception):
    """Stands in for a kill in the middle of a training step."""


@pytest.fixture
def crash_at(monkeypatch):
    """`crash_at(step)`: the shared trainer raises `Killed` when it starts update `step` (0-based), as if the process
    died there; checkpoints written before stay on disk."""
    from pipeline.train import Trainer

    real = Trainer.update

    def arm(step: int):
        def update(self, s, *a, **k):
            if s == step:
                raise Killed(f"killed at update {step}")
            return real(self, s, *a, **k)

        monkeypatch.setattr(Trainer, "update", update)
        return lambda: monkeypatch.setattr(Trainer, "update", real)

    return arm
