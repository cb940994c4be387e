"""Training readers of train-vae: stored feature shards, or image shards encoded on the fly, in a seeded order.

The order is a pure function of (seed, stream position): a fresh permutation and a random view per epoch, read as one
continuous stream, so global batch g is the slice [g G, (g + 1) G) of that stream whatever the world size.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline.manifest import ArtifactError
from pipeline.metrics import elementwise_mean_std
from pipeline.runtime import Runtime, autocast, progress, stable_seed
from pipeline.shards import FeatureShards, ImageShards, load_rgb


class StreamOrder:
    """Stream position -> (sample, view): a fresh permutation and random view per epoch, seeded by (seed, epoch)."""

    def __init__(self, seed: int, num_samples: int, views: int):
        self.seed, self.n, self.views = seed, num_samples, views
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._epochs:
            rng = np.random.default_rng(stable_seed(self.seed, "order", e))
            perm = rng.permutation(self.n)
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}
            self._epochs[e] = (perm, rng.integers(0, self.views, self.n))
        return self._epochs[e]

    def lookup(self, positions: range) -> tuple[np.ndarray, np.ndarray]:
        """(samples, views) for stream positions."""
        pairs = [self.epoch(p // self.n) for p in positions]
        samples = np.array([perm[p % self.n] for p, (perm, _) in zip(positions, pairs)], dtype=np.int64)
        views = np.array([v[p % self.n] for p, (_, v) in zip(positions, pairs)], dtype=np.int64)
        return samples, views


class TrainData:
    """Interface of the training readers: train batches by stream position, val batches by index."""

    kind: str
    path: Path
    fingerprint: str
    encoder: dict
    num_train: int
    num_val: int
    num_patches: int
    dim: int

    def setup(self, device: torch.device, precision: str) -> None:
        """Move any model the reader runs to the training device."""

    def batch(self, positions: range) -> torch.Tensor:
        """(b, N, D) float32 tokens for train stream positions."""
        raise NotImplementedError

    def val_batch(self, indices: range) -> torch.Tensor:
        """(b, N, D) float32 tokens of val samples (centre view)."""
        raise NotImplementedError


class FeatureData(TrainData):
    """Stored feature shards: train on a random view per sample and epoch, validate on view 0 (centre crop)."""

    kind = "features"

    def __init__(self, path: Path, seed: int, cache_bytes: int, num_workers: int):
        self.path, self.shards = Path(path), FeatureShards(path)
        m = self.shards.manifest
        self.fingerprint, self.encoder = m.fingerprint, m.extra["encoder"]
        self.num_patches, self.dim, self.views = self.shards.num_patches, self.shards.dim, self.shards.views
        self.num_train = self.shards.num_samples("train")
        self.num_val = self.shards.num_samples("val") if "val" in self.shards.splits else 0
        if self.num_val == 0:
            raise ArtifactError(f"{path} has no 'val' split to validate on; make the images with --val-fraction > 0")
        self.order = StreamOrder(seed, self.num_train, self.views)
        self.num_workers, self._pool = num_workers, None
        per_sample = self.views * self.num_patches * self.dim * 2
        fits = (self.num_train + self.num_val) * per_sample <= cache_bytes
        self.cache = {s: self._load_all(s) for s in ("train", "val")} if fits else None

    def _checked(self, key: str, feats: np.ndarray) -> np.ndarray:
        """`feats` if it is a (V, N, D) array, else an ArtifactError naming the sample. Finiteness is not re-checked
        on every read: `flatdino features` refuses non-finite values where they enter the artifact, and every read
        is checked against the shard's block CRCs, so a value that changed on disk is an error, not a NaN."""
        expected = (self.views, self.num_patches, self.dim)
        if feats.shape != expected:
            raise ArtifactError(f"{self.path}: sample {key} has features of shape {feats.shape}, expected "
                                f"{expected}; the artifact was not made by `flatdino features`: re-make it")
        return feats

    def _load_all(self, split: str) -> np.ndarray:
        return np.stack([self._checked(k, f) for _, k, _, f in self.shards.iter(split)])  # (n, V, N, D) float16

    def _get(self, i: int, split: str) -> np.ndarray:
        key, _, feats = self.shards.get(i, split)
        return self._checked(key, feats)

    def _feats(self, split: str, samples: np.ndarray) -> np.ndarray:
        if self.cache is not None:
            return self.cache[split][samples]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.num_workers)
        return np.stack(list(self._pool.map(lambda i: self._get(int(i), split), samples)))

    def _read_train(self, positions: range) -> np.ndarray:
        """(b, N, D) float16 of the stream positions: from RAM, or reading (and checking) only the view used, from
        shard files kept open, on `num_workers` threads (pread and CRC32 release the GIL)."""
        samples, views = self.order.lookup(positions)
        if self.cache is not None:
            return self.cache["train"][samples, views]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.num_workers)
        expected = (self.num_patches, self.dim)

        def one(sv) -> np.ndarray:
            key, _, f = self.shards.get(int(sv[0]), "train", view=int(sv[1]))
            if f.shape != expected:
                raise ArtifactError(f"{self.path}: sample {key} has a view of shape {f.shape}, expected {expected}")
            return f

        return np.stack(list(self._pool.map(one, zip(samples, views))))

    def batch(self, positions: range) -> torch.Tensor:
        return torch.from_numpy(self._read_train(positions).astype(np.float32))

    def val_batch(self, indices: range) -> torch.Tensor:
        return torch.from_numpy(self._feats("val", np.asarray(indices))[:, 0]).float()

    def feature_stats(self, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (N, D) over every train sample and view, exact float64 in a fixed order (so every rank
        computes the same bits); for models with `standardize=True`. Two passes: from RAM, or over the shards."""
        bar = progress(2 * self.num_train, "feature stats", "sample", rt)

        def chunks():
            if self.cache is not None:
                parts = (self.cache["train"][s : s + 256] for s in range(0, self.num_train, 256))
            else:
                parts = (self._checked(k, f)[None] for _, k, _, f in self.shards.iter("train"))
            for part in parts:  # (b, V, N, D) -> (b V, N, D)
                bar.update(len(part))
                yield part.reshape(-1, self.num_patches, self.dim)

        mean, std = elementwise_mean_std(chunks)
        bar.close()
        return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def random_resized_crop_box(w: int, h: int, rng: np.random.Generator, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, right, bottom) of a random-resized crop: torchvision's algorithm (10 tries, centre fallback)."""
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    cw, ch = w, h
    if w / h < ratio[0]:
        ch = round(w / ratio[0])
    elif w / h > ratio[1]:
        cw = round(h * ratio[1])
    x, y = (w - cw) // 2, (h - ch) // 2
    return x, y, x + cw, y + ch


def _area_resize(image, size: int = 256):
    """cv2 INTER_AREA-like resize to size x size: box filter when shrinking, bilinear when enlarging."""
    from PIL import Image

    shrink = image.width >= size and image.height >= size
    return image.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)


def augment_image(data: bytes, seed: int, position: int) -> torch.Tensor:
    """Official AE-training augmentation: random-resized crop (0.3-1) to 256, flip p=0.5 -> uint8 (3, 256, 256)."""
    from PIL import Image

    from models.encoder import pil_to_uint8

    image = load_rgb(data)
    rng = np.random.default_rng(stable_seed(seed, "augment", position))
    image = _area_resize(image.crop(random_resized_crop_box(image.width, image.height, rng)))
    if rng.uniform() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pil_to_uint8(image)


class ImageData(TrainData):
    """Image shards encoded on the fly by the frozen DINOv2 (bilinear antialiased resize to 224, SPEC 2.2)."""

    kind = "images"

    def __init__(self, path: Path, encoder: str, seed: int, num_workers: int):
        from models.encoder import FeatureEncoder, load_rae

        self.path, self.images, self.seed = Path(path), ImageShards(path), seed
        self.model = FeatureEncoder(load_rae(encoder)).eval()
        self.fingerprint = self.images.manifest.fingerprint
        self.encoder = {"source": str(encoder), "fingerprint": self.model.fingerprint}
        self.num_patches, self.dim = self.model.num_patches, self.model.dim
        self.num_train, self.num_val = self.images.num_samples("train"), self.images.num_samples("val")
        self.order = StreamOrder(seed, self.num_train, 1)
        self.num_workers, self.device, self.precision = num_workers, torch.device("cpu"), "fp32"
        self._index: dict[str, list] = {}

    def setup(self, device: torch.device, precision: str) -> None:
        self.model.to(device)
        self.device, self.precision = device, precision

    def _bytes(self, split: str, i: int) -> bytes:
        if split not in self._index:
            self._index[split] = [data for _, _, _, data, _ in self.images.iter(split)]
        return self._index[split][i]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            return self.model.encode_images(x.to(self.device), mode="bilinear").patches.float().cpu()

    def batch(self, positions: range) -> torch.Tensor:
        samples, _ = self.order.lookup(positions)
        x = torch.stack([augment_image(self._bytes("train", int(s)), self.seed, p) for s, p in zip(samples, positions)])
        return self._encode(x)

    def val_batch(self, indices: range) -> torch.Tensor:
        from models.encoder import pil_to_uint8

        x = torch.stack([pil_to_uint8(_area_resize(load_rgb(self._bytes("val", i)))) for i in indices])
        return self._encode(x)
