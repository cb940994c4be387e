"""Shard planning, deterministic webdataset tars, and readers for the images and features artifacts.

The plan is a pure function of (number of samples, shard size): shard k covers global indices [k*S, (k+1)*S), and
rank r of W takes shards r::W, so outputs never depend on the world size (STYLE.md P7). Tars are written with fixed
metadata (mtime 0, uid/gid 0, sorted members), so the same samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch

from models.imaging import load_rgb  # noqa: F401  (re-exported for the stages)
from pipeline.manifest import ArtifactError, _fsync_dir, file_sha256, require_complete

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # what PIL decodes; every reader knows them


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


INDEX_SUFFIX = ".idx.npz"  # next to each shard: its members' offsets, sizes and block CRCs (written at commit)
CRC_BLOCK = 1 << 16  # member data is checked in 64 KiB blocks, so a partial read (one view) is checked too
INDEX_VERSION = 2


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes what passes through (the shard's sha256 without reading it back)."""

    def __init__(self, f):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self.f.write(b)
        self.sha.update(memoryview(b)[:n])
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos


def npy_head(data: bytes | memoryview) -> int:
    """Bytes before the array data of an .npy member (0 when it is not one)."""
    view = memoryview(data)
    if bytes(view[:6]) != b"\x93NUMPY" or len(view) < 10:
        return 0
    if view[6] == 1:
        return 10 + int.from_bytes(view[8:10], "little")
    return 12 + int.from_bytes(view[8:12], "little")


def _block_of(pos: int, head: int) -> int:
    """The block holding byte `pos` of a member whose blocks are [0, head) (if head) then CRC_BLOCK-sized from head:
    aligning blocks on the array data makes a view of (V, N, D) float16 features whole blocks (N D 2 = 3 or 6 x 64 KiB
    at 112 / 224 px), so reading one view reads nothing else."""
    if head and pos < head:
        return 0
    return (pos - head) // CRC_BLOCK + (1 if head else 0)


def _block_range(k: int, head: int, size: int) -> tuple[int, int]:
    if head:
        if k == 0:
            return 0, head
        k -= 1
    return head + k * CRC_BLOCK, min(head + (k + 1) * CRC_BLOCK, size)


def block_crcs(data: bytes | memoryview, head: int = 0) -> list[int]:
    """CRC32 of each block of a member (see `_block_of`; at least one, for empty data)."""
    view = memoryview(data)
    n = _block_of(max(len(view) - 1, 0), head) + 1
    return [zlib.crc32(view[slice(*_block_range(k, head, len(view)))]) for k in range(n)]


def write_tar_shard(path: str | Path, samples: Iterable[dict]) -> dict:
    """Write samples `{"__key__": k, ext: bytes, ...}` as a deterministic webdataset tar, atomically, and its index.

    The sha256 is computed while writing; the index (`<name>.idx.npz`: every member's data offset, size and 64 KiB
    block CRCs) is written after the rename and before the caller commits the record, so a committed shard always has
    one. Returns the shard's record: name, count, bytes, sha256, first_key, last_key.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    keys: list[str] = []
    members: list[tuple[str, str, int, int, list[int]]] = []
    try:
        with open(tmp, "wb") as raw:
            f = _HashingWriter(raw)
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for sample in samples:
                    key = sample["__key__"]
                    if "." in key or "/" in key:
                        raise ValueError(f"webdataset keys may not contain '.' or '/': {key!r}")
                    keys.append(key)
                    for ext in sorted(k for k in sample if not k.startswith("__")):
                        data = sample[ext]
                        info = _tarinfo(f"{key}.{ext}", len(data))
                        header = len(info.tobuf(tarfile.USTAR_FORMAT, tar.encoding, tar.errors))
                        head = npy_head(data)
                        members.append((key, ext, tar.offset + header, len(data), block_crcs(data, head), head))
                        tar.addfile(info, io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        sha, size = f.sha.hexdigest(), f.pos
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, bad input) must not leave a partial file behind
        raise
    _write_index(path, sha, size, members)
    return {"name": path.name, "count": len(keys), "bytes": size, "sha256": sha,
            "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None}


def _write_index(path: Path, sha: str, size: int, members: list) -> None:
    from pipeline.manifest import atomic_write_with

    crcs = [c for m in members for c in m[4]]
    first = np.cumsum([0] + [len(m[4]) for m in members])[:-1]
    arrays = {"version": np.int64(INDEX_VERSION), "sha256": np.array(sha), "bytes": np.int64(size),
              "key": np.array([m[0] for m in members], dtype=str), "ext": np.array([m[1] for m in members], dtype=str),
              "offset": np.array([m[2] for m in members], np.int64), "size": np.array([m[3] for m in members], np.int64),
              "crc_first": first.astype(np.int64), "crc": np.array(crcs, np.uint32),
              "head": np.array([m[5] for m in members], np.int64)}

    from pipeline.npz import npz_bytes

    blob = npz_bytes(**arrays)
    atomic_write_with(path.with_name(path.name + INDEX_SUFFIX), lambda tmp: tmp.write_bytes(blob))


class Member(NamedTuple):
    offset: int  # of the data in the tar
    size: int
    crc_first: int  # position of the member's first block CRC in ShardIndex.crc
    head: int  # bytes before an .npy member's array data (its first block); 0 otherwise


class ShardIndex(NamedTuple):
    """A shard's samples (keys in order) and, per sample, its members by extension."""

    path: Path
    keys: list[str]
    members: list[dict[str, Member]]
    crc: np.ndarray  # (blocks,) uint32

    def read(self, files: "OpenFiles", i: int, ext: str, lo: int = 0, hi: int | None = None) -> bytes:
        """Bytes [lo, hi) of member `ext` of sample i, every 64 KiB block they touch checked against its CRC."""
        m = self.members[i][ext]
        hi = m.size if hi is None else min(hi, m.size)
        b0, b1 = _block_of(lo, m.head), _block_of(max(hi - 1, lo), m.head) + 1
        start, stop = _block_range(b0, m.head, m.size)[0], _block_range(b1 - 1, m.head, m.size)[1]
        data = files.pread(self.path, m.offset + start, stop - start)
        view = memoryview(data)
        for b in range(b0, b1):
            lo_b, hi_b = _block_range(b, m.head, m.size)
            if zlib.crc32(view[lo_b - start : hi_b - start]) != int(self.crc[m.crc_first + b]):
                raise ArtifactError(f"{self.path}: sample {self.keys[i]} member {ext} fails its checksum (block {b}): "
                                    f"the shard is corrupt on disk; {rebuild_hint(self.path)}")
        return bytes(view[lo - start : hi - start])

    def sample(self, files: "OpenFiles", i: int) -> dict:
        """Every member of sample i, checked: {"__key__": key, ext: bytes}."""
        return {"__key__": self.keys[i], **{ext: self.read(files, i, ext) for ext in self.members[i]}}


def rebuild_hint(path: Path) -> str:
    return (f"delete {path.name} and its {RECORD_NAME} and {INDEX_NAME} files, then re-run the stage that wrote "
            f"{path.parent} with the same options: it rewrites only that shard (same bytes as before)")


RECORD_NAME, INDEX_NAME = "<shard>.record.json", "<shard>" + INDEX_SUFFIX


class OpenFiles:
    """Shard files kept open (at most `limit`, least recently used closed first) for `os.pread` from any thread."""

    def __init__(self, limit: int = 256):
        self.limit, self._fds, self._lock = limit, {}, threading.Lock()

    def pread(self, path: Path, offset: int, size: int) -> bytes:
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                while len(self._fds) >= self.limit:
                    os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[path] = fd  # most recently used last
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ArtifactError(f"{path}: truncated (wanted {size} bytes at {offset}); {rebuild_hint(path)}")
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def load_index(path: Path, record: dict) -> ShardIndex:
    """The index of a committed shard; a missing or stale one (another sha256, an older version, unreadable) is
    rebuilt from the tar after checking the tar's sha256 against the record, with a warning."""
    idx_path = path.with_name(path.name + INDEX_SUFFIX)
    try:
        with np.load(idx_path, allow_pickle=False) as z:
            if int(z["version"]) == INDEX_VERSION and str(z["sha256"]) == record["sha256"]:
                return _index_from_arrays(path, {k: z[k] for k in z.files})
        reason = "stale (made for other bytes or by another version)"
    except FileNotFoundError:
        reason = "missing"
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        reason = f"unreadable ({type(e).__name__})"
    logging.getLogger("flatdino.shards").warning("%s: index %s; rebuilding it from the shard", path, reason)
    return _rebuild_index(path, record, idx_path)


def _index_from_arrays(path: Path, a: dict) -> ShardIndex:
    keys, members = [], []
    for key, ext, off, size, first, head in zip(a["key"].tolist(), a["ext"].tolist(), a["offset"].tolist(),
                                                a["size"].tolist(), a["crc_first"].tolist(), a["head"].tolist()):
        if not keys or keys[-1] != key:
            keys.append(key)
            members.append({})
        members[-1][ext] = Member(off, size, first, head)
    return ShardIndex(path, keys, members, a["crc"])


def _rebuild_index(path: Path, record: dict, idx_path: Path) -> ShardIndex:
    sha = file_sha256(path)
    if sha != record["sha256"]:
        raise ArtifactError(f"{path}: sha256 {sha[:12]} does not match its record {record['sha256'][:12]}: the shard "
                            f"is corrupt on disk; {rebuild_hint(path)}")
    members = []
    with open(path, "rb") as f:
        for key, exts in index_tar_shard(path).items():
            for ext, (off, size) in exts.items():
                f.seek(off)
                data = f.read(size)
                members.append((key, ext, off, size, block_crcs(data, npy_head(data)), npy_head(data)))
    try:
        _write_index(path, sha, os.path.getsize(path), members)
        with np.load(idx_path, allow_pickle=False) as z:
            return _index_from_arrays(path, {k: z[k] for k in z.files})
    except OSError:  # a read-only artifact: keep the rebuilt index in memory
        first = np.cumsum([0] + [len(m[4]) for m in members])[:-1]
        return _index_from_arrays(path, {
            "key": np.array([m[0] for m in members]), "ext": np.array([m[1] for m in members]),
            "offset": np.array([m[2] for m in members]), "size": np.array([m[3] for m in members]), "crc_first": first,
            "crc": np.array([c for m in members for c in m[4]], np.uint32), "head": np.array([m[5] for m in members])})


def _split_member(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, ext


def _check_end(tar: tarfile.TarFile, path: str | Path) -> None:
    """The archive ends where tarfile stopped reading: a tar cut exactly at a member boundary reads as a shorter,
    valid archive, and tarfile also stops quietly at a damaged header in the middle. Require the end-of-archive
    marker (two zero blocks) and nothing but zero padding after it."""
    size = os.path.getsize(path)
    if size < tar.offset + 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker after byte {tar.offset} (cut at a member boundary)")
    with open(path, "rb") as f:
        f.seek(tar.offset)
        while block := f.read(1 << 20):
            if block.count(0) != len(block):
                raise tarfile.ReadError(f"a damaged header at or after byte {tar.offset} ends the archive early")


def index_tar_shard(path: str | Path) -> dict[str, dict[str, tuple[int, int]]]:
    """Map key -> {ext: (data offset, size)} by scanning the tar's headers (any webdataset tar, ours or a user's).

    A key whose members are not adjacent, or a member that appears twice, is an error (webdataset would merge them,
    the later member silently winning)."""
    index: dict[str, dict[str, tuple[int, int]]] = {}
    last = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if key != last and key in index:
                    raise ArtifactError(f"{path}: key {key!r} appears twice (its members are not adjacent); every "
                                        f"sample must be stored once")
                if ext in index.get(key, {}):
                    raise ArtifactError(f"{path}: member {member.name!r} appears twice; every sample must be stored "
                                        f"once")
                index.setdefault(key, {})[ext] = (member.offset_data, member.size)
                last = key
            _check_end(tar, path)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArtifactError(f"{path}: unreadable tar shard ({e}); the file is truncated or corrupt") from e
    return index


def read_tar_shard(path: str | Path) -> Iterator[dict]:
    """Samples of any webdataset tar, in order (headers scanned, duplicates refused); artifact readers use the
    checked index instead."""
    index = index_tar_shard(path)
    with open(path, "rb") as f:
        for key, exts in index.items():
            sample = {"__key__": key}
            for ext, (off, size) in exts.items():
                f.seek(off)
                sample[ext] = f.read(size)
                if len(sample[ext]) != size:
                    raise ArtifactError(f"{path}: truncated at member {key}.{ext}")
            yield sample


def read_member(path: str | Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ArtifactError(f"{path}: truncated (wanted {size} bytes at {offset}); re-run the stage that wrote it")
    return data


class _ShardedArtifact:
    """Common part of the readers: the manifest's shard records per split, in plan order, read through each shard's
    index (no header scan at start-up) with every byte checked against its block CRC, from files kept open."""

    stage = ""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = require_complete(self.root, self.stage)
        self.files = OpenFiles()
        self._indices: dict[str, ShardIndex] = {}
        self._tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

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

    def index(self, rec: dict) -> ShardIndex:
        """The checked index of one committed shard (loaded once)."""
        with self._lock:
            if rec["name"] not in self._indices:
                idx = load_index(self._checked(rec), rec)
                if len(idx.keys) != rec["count"]:
                    raise ArtifactError(f"{idx.path}: holds {len(idx.keys)} samples but its manifest records "
                                        f"{rec['count']}; {self._rerun_hint(rec)}")
                self._indices[rec["name"]] = idx
            return self._indices[rec["name"]]

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
            idx = self.index(rec)
            for i in range(max(0, start - pos), min(rec["count"], stop - pos)):
                yield pos + i, idx.sample(self.files, i)
            pos += rec["count"]

    def iter_shard(self, rec: dict) -> Iterator[dict]:
        """Every sample of one committed shard, checked, in stored order."""
        idx = self.index(rec)
        for i in range(len(idx.keys)):
            yield idx.sample(self.files, i)

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

    def locate(self, split: str, i: int) -> tuple[ShardIndex, int]:
        """(shard index, position in the shard) of stored position i of a split."""
        if split not in self._tables:
            recs = self.shards(split)
            ends = np.cumsum([r["count"] for r in recs])
            self._tables[split] = (ends, recs)
        ends, recs = self._tables[split]
        k = int(np.searchsorted(ends, i, side="right"))
        if not 0 <= i < (ends[-1] if len(ends) else 0):
            raise IndexError(f"position {i} outside the {split!r} split of {self.root}")
        return self.index(recs[k]), i - (int(ends[k - 1]) if k else 0)


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

    def image(self, split: str, i: int) -> tuple[str, bytes]:
        """(key, image bytes) of stored position i."""
        idx, j = self.locate(split, i)
        ext = next(e for e in idx.members[j] if e in IMAGE_EXTS)
        return idx.keys[j], idx.read(self.files, j, ext)


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

    def get(self, i: int, split: str = "train", view: int | None = None) -> tuple[str, int, np.ndarray]:
        """Random access to stored position `i`: (key, cls, feats (V, N, D) float16), or only view `view` (N, D),
        reading (and checking) just the bytes of that view."""
        idx, j = self.locate(split, i)
        cls = decode_int(idx.read(self.files, j, "cls"))
        if view is None:
            return idx.keys[j], cls, decode_npy(idx.read(self.files, j, "feat.npy"))
        n, d = self.num_patches, self.dim
        lo = idx.members[j]["feat.npy"].head + view * n * d * 2
        raw = idx.read(self.files, j, "feat.npy", lo, lo + n * d * 2)
        return idx.keys[j], cls, np.frombuffer(raw, dtype="<f2").reshape(n, d)


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
    def _index_images(images: ImageShards, split: str) -> dict[str, tuple[ShardIndex, int, str]]:
        """key -> (shard index, position, image extension), from the images' shard indices."""
        index = {}
        for rec in images.shards(split):
            idx = images.index(rec)
            for j, (key, members) in enumerate(zip(idx.keys, idx.members)):
                index[key] = (idx, j, next(e for e in members if e in IMAGE_EXTS))
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

        idx, j, ext = self._image_index[key]
        crop = pil_to_uint8(adm_center_crop(load_rgb(idx.read(self.images.files, j, ext))))
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
