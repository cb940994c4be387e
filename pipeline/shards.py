"""Shard planning, deterministic webdataset tars, and readers for the images and features artifacts.

The plan is a pure function of (number of samples, shard size): shard k covers global indices [k*S, (k+1)*S), and
rank r of W takes shards r::W, so outputs never depend on the world size (STYLE.md P7). Tars are written with fixed
metadata (mtime 0, uid/gid 0, sorted members), so the same samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from pipeline.manifest import ArtifactError, _fsync_dir, require_complete
from pipeline.runtime import Dist

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass(frozen=True)
class ShardSpec:
    """One planned shard: global sample indices [start, stop) written to `name`."""

    index: int
    start: int
    stop: int
    prefix: str

    @property
    def name(self) -> str:
        return f"{self.prefix}-{self.index:06d}.tar"

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(num_samples: int, shard_size: int, prefix: str) -> list[ShardSpec]:
    """Shard k covers [k*shard_size, min((k+1)*shard_size, num_samples)); no padding, nothing dropped."""
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    return [
        ShardSpec(k, start, min(start + shard_size, num_samples), prefix)
        for k, start in enumerate(range(0, num_samples, shard_size))
    ]


def for_rank(plan: list, dist: Dist) -> list:
    """The shards this rank writes: plan[rank::world]."""
    return plan[dist.rank :: dist.world]


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_int(i: int) -> bytes:
    return str(int(i)).encode()


def decode_int(data: bytes) -> int:
    return int(data.decode().strip())


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def write_tar_shard(path: str | Path, samples: Iterable[dict]) -> dict:
    """Write samples `{"__key__": k, ext: bytes, ...}` as a deterministic webdataset tar, atomically.

    Returns the shard's record: name, count, bytes, sha256, first_key, last_key.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    keys: list[str] = []
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for sample in samples:
                    key = sample["__key__"]
                    if "." in key or "/" in key:
                        raise ValueError(f"webdataset keys may not contain '.' or '/': {key!r}")
                    keys.append(key)
                    for ext in sorted(k for k in sample if not k.startswith("__")):
                        data = sample[ext]
                        tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, bad input) must not leave a partial file behind
        raise
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    size = tmp.stat().st_size
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {"name": path.name, "count": len(keys), "bytes": size, "sha256": sha,
            "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None}


def _split_member(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, ext


def _check_end(tar: tarfile.TarFile, path: str | Path) -> None:
    """A tar cut exactly at a member boundary reads as a shorter, valid archive: require the end-of-archive marker
    (two zero blocks) that every complete tar has. Compressed tars are left to their codec's own checks."""
    if isinstance(tar.fileobj, io.BufferedReader) and os.path.getsize(path) < tar.offset + 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker after byte {tar.offset} (cut at a member boundary)")


def read_tar_shard(path: str | Path) -> Iterator[dict]:
    """Samples of a webdataset tar, members grouped by key (the part of the file name before the first dot)."""
    try:
        with tarfile.open(path, mode="r:*") as tar:
            current: dict | None = None
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                current[ext] = tar.extractfile(member).read()
            _check_end(tar, path)
            if current is not None:
                yield current
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArtifactError(f"{path}: unreadable tar shard ({e}); the file is truncated or corrupt — "
                            f"delete it (and its .record.json) and re-run the stage that wrote it") from e


def index_tar_shard(path: str | Path) -> dict[str, dict[str, tuple[int, int]]]:
    """Map key -> {ext: (data offset, size)} for random access with `read_member`."""
    index: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = _split_member(member.name)
                    index.setdefault(key, {})[ext] = (member.offset_data, member.size)
            _check_end(tar, path)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArtifactError(f"{path}: unreadable tar shard ({e}); delete it and re-run the stage that wrote it") from e
    return index


def read_member(path: str | Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ArtifactError(f"{path}: truncated (wanted {size} bytes at {offset}); re-run the stage that wrote it")
    return data


def load_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image; raises ValueError on anything that is not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from e


class _ShardedArtifact:
    """Common part of the readers: the manifest's shard records per split, in plan order."""

    stage = ""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = require_complete(self.root, self.stage)
        self._index: dict[str, list] = {}

    def shards(self, split: str) -> list[dict]:
        recs = [s for s in self.manifest.shards if s["split"] == split]
        if not recs and split not in self.splits:
            raise ArtifactError(f"{self.root}: no {split!r} split (have {self.splits})")
        return recs

    @property
    def splits(self) -> list[str]:
        return sorted({s["split"] for s in self.manifest.shards})

    def num_samples(self, split: str = "train") -> int:
        return sum(s["count"] for s in self.shards(split))

    def _iter_raw(self, split: str, start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
        """(position, sample) for stored positions [start, stop) of a split, reading only the shards needed."""
        stop = self.num_samples(split) if stop is None else stop
        pos = 0
        for rec in self.shards(split):
            if pos + rec["count"] <= start:
                pos += rec["count"]
                continue
            if pos >= stop:
                break
            path, seen = self._checked(rec), 0
            for sample in read_tar_shard(path):
                if start <= pos < stop:
                    yield pos, sample
                pos, seen = pos + 1, seen + 1
            if seen != rec["count"]:
                raise ArtifactError(f"{path}: holds {seen} samples but its manifest records {rec['count']}; "
                                    f"{self._rerun_hint(rec)}")

    def _checked(self, rec: dict) -> Path:
        """The path of a shard whose size still matches its record (a truncated or replaced shard is refused)."""
        path = self.root / rec["name"]
        if not path.is_file():
            raise ArtifactError(f"{path}: shard missing; {self._rerun_hint(rec)}")
        size = path.stat().st_size
        if "bytes" in rec and size != rec["bytes"]:
            raise ArtifactError(f"{path}: {size} bytes on disk but its manifest records {rec['bytes']} (truncated or "
                                f"replaced); {self._rerun_hint(rec)}")
        return path

    def _rerun_hint(self, rec: dict) -> str:
        return (f"re-run `flatdino {self.stage}` with the same options and --out {self.root}: it rewrites only the "
                f"damaged shard {rec['name']} (same bytes as before)")

    def _locate(self, split: str, i: int) -> tuple[Path, dict]:
        if split not in self._index:
            table = []
            for rec in self.shards(split):
                idx = index_tar_shard(self._checked(rec))
                table.extend((self.root / rec["name"], key, members) for key, members in idx.items())
            self._index[split] = table
        path, key, members = self._index[split][i]
        return path, {"__key__": key, **{ext: m for ext, m in members.items()}}


class ImageShards(_ShardedArtifact):
    """Reader of an `images` artifact (`flatdino images`): splits 'train' and 'val'."""

    stage = "images"

    @property
    def classes(self) -> list[str]:
        return self.manifest.extra["classes"]

    def iter(self, split: str = "train", start: int = 0, stop: int | None = None) -> Iterator[tuple]:
        """(position, key, cls, image bytes, ext) in stored order."""
        for pos, s in self._iter_raw(split, start, stop):
            ext = next(e for e in s if e in IMAGE_EXTS)
            yield pos, s["__key__"], decode_int(s["cls"]), s[ext], ext

    @staticmethod
    def load_rgb(data: bytes) -> Image.Image:
        return load_rgb(data)


class FeatureShards(_ShardedArtifact):
    """Reader of a `features` artifact (`flatdino features`): per sample (V, N, D) float16 + class."""

    stage = "features"

    @property
    def views(self) -> int:
        return self.manifest.extra["views"]

    @property
    def num_patches(self) -> int:
        return self.manifest.extra["num_patches"]

    @property
    def dim(self) -> int:
        return self.manifest.extra["dim"]

    @property
    def encoder_fingerprint(self) -> str:
        return self.manifest.extra["encoder"]["fingerprint"]

    def iter(self, split: str = "train", start: int = 0, stop: int | None = None) -> Iterator[tuple]:
        """(position, key, cls, feats (V, N, D) float16) in stored order."""
        for pos, s in self._iter_raw(split, start, stop):
            yield pos, s["__key__"], decode_int(s["cls"]), decode_npy(s["feat.npy"])

    def get(self, i: int, split: str = "train") -> tuple[str, int, np.ndarray]:
        """Random access to stored position `i`: (key, cls, feats (V, N, D) float16)."""
        path, members = self._locate(split, i)
        feats = decode_npy(read_member(path, *members["feat.npy"]))
        return members["__key__"], decode_int(read_member(path, *members["cls"])), feats


class PairData:
    """Rows (sample, view) of a split: DINOv2 features (N, D) + the matching uint8 crop (3, 256, 256), joined by key."""

    def __init__(self, images: ImageShards, features: FeatureShards, split: str, cache_bytes: int):
        self.images, self.features, self.split = images, features, split
        self.views = features.views
        self.num_samples = features.num_samples(split)
        self._image_index = self._index_images(images, split)
        self._cache: dict[int, tuple[np.ndarray, torch.Tensor]] = {}
        per_sample = 3 * 256 * 256 + self.views * features.num_patches * features.dim * 2
        self._cache_limit = cache_bytes // per_sample

    @staticmethod
    def _index_images(images: ImageShards, split: str) -> dict[str, tuple[Path, int, int]]:
        index = {}
        for rec in images.shards(split):
            path = images.root / rec["name"]
            for key, members in index_tar_shard(path).items():
                ext = next(e for e in members if e in IMAGE_EXTS)
                index[key] = (path, *members[ext])
        return index

    def __len__(self) -> int:
        return self.num_samples * self.views

    def _sample(self, i: int) -> tuple[np.ndarray, torch.Tensor]:
        if i in self._cache:
            return self._cache[i]
        key, _, feats = self.features.get(i, self.split)
        if key not in self._image_index:
            raise ArtifactError(f"{self.features.root}: sample {key!r} has no image in {self.images.root}; the two "
                                f"artifacts do not belong together")
        from models.encoder import adm_center_crop, pil_to_uint8

        crop = pil_to_uint8(adm_center_crop(load_rgb(read_member(*self._image_index[key]))))
        if len(self._cache) < self._cache_limit:
            self._cache[i] = (feats, crop)
        return feats, crop

    def rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Global row ids -> features float32 (B, N, D), targets uint8 (B, 3, 256, 256) (view 1 = flipped crop)."""
        feats, crops = [], []
        for r in rows:
            f, crop = self._sample(r // self.views)
            view = r % self.views
            feats.append(torch.from_numpy(f[view].astype(np.float32)))
            crops.append(crop.flip(-1) if view == 1 else crop)
        return torch.stack(feats), torch.stack(crops)
