"""`latents.zarr`: the contract between the latents stage and the generator (train-dit, sample).

Group layout (zarr v3)::

    mu     (N, T, F) float32   posterior means, rows ordered (sample, view), chunked along N
    label  (N,)      int64     class index
    sample (N,)      int64     position of the sample in the features artifact's split
    view   (N,)      int8      0 = ADM centre crop, 1 = its horizontal flip
    key    (N,)      str       the sample's key, joinable with every upstream artifact
    mean   (T, F)    float64   per-(token, channel) mean over all N rows   } written by `finalize_stats`
    std    (T, F)    float64   population std over all N rows              } once every row is committed

Writers own whole chunks along N (a shard of rows is a multiple of the chunk size, except the last), so concurrent
processes never share a chunk; the rows of a shard count as written only once the stage commits its record.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.manifest import ArtifactError
from pipeline.metrics import elementwise_mean_std

STORE = "latents.zarr"


@dataclass
class LatentsArtifact:
    """Open arrays of a latents.zarr group (read lazily: slice them; a damaged chunk raises ArtifactError)."""

    mu: "CheckedArray"
    label: "CheckedArray"
    sample: "CheckedArray"
    view: "CheckedArray"
    key: "CheckedArray"
    mean: np.ndarray | None
    std: np.ndarray | None
    attrs: dict

    @property
    def shape(self) -> tuple[int, int]:
        """(T, F) of one latent."""
        return tuple(self.mu.shape[1:])

    def __len__(self) -> int:
        return self.mu.shape[0]


def create_latents(path: str | Path, n: int, tokens: int, dim: int, chunk: int, attrs: dict) -> None:
    """Create (or re-open unchanged, for resume) the arrays of a latents group with N = n rows.

    The empty group is built under `<path>.tmp` and renamed into place, so a run killed while creating it leaves no
    half-made store that a resume would refuse. On resume, the `*.partial` files of chunk writes killed before zarr's
    own rename are removed (this runs on the main process before any rank writes).
    """
    path = Path(path)
    if (path / "zarr.json").exists():
        g = zarr.open_group(path, mode="r")
        if g["mu"].shape == (n, tokens, dim) and g["mu"].chunks[0] == chunk and dict(g.attrs) == attrs:
            for stale in path.rglob("*.partial"):
                stale.unlink()
            return
        raise ArtifactError(f"{path} holds latents of another shape/chunking/origin; use --overwrite or another --out")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    g = zarr.open_group(tmp, mode="w")
    # every written chunk is stored (even all-zero ones), so a missing chunk file always means a damaged store
    g.create_array("mu", shape=(n, tokens, dim), chunks=(chunk, tokens, dim), dtype="float32",
                   config={"write_empty_chunks": True})
    g.create_array("label", shape=(n,), chunks=(chunk,), dtype="int64")
    g.create_array("sample", shape=(n,), chunks=(chunk,), dtype="int64")
    g.create_array("view", shape=(n,), chunks=(chunk,), dtype="int8")
    g.create_array("key", shape=(n,), chunks=(chunk,), dtype=str)
    g.attrs.update(attrs)
    shutil.rmtree(path, ignore_errors=True)  # a store without zarr.json is an interrupted older layout: start over
    os.replace(tmp, path)


def write_rows(path: str | Path, start: int, mu: np.ndarray, label: np.ndarray, sample: np.ndarray,
               view: np.ndarray, key: np.ndarray) -> None:
    """Write rows [start, start + len(mu)); `start` must be chunk-aligned."""
    g = zarr.open_group(path, mode="r+")
    chunk = g["mu"].chunks[0]
    stop = start + len(mu)
    if start % chunk or (stop % chunk and stop != g["mu"].shape[0]):
        raise ValueError(f"rows [{start}, {stop}) are not aligned to chunks of {chunk}")
    g["mu"][start:stop] = mu.astype(np.float32)
    g["label"][start:stop] = label.astype(np.int64)
    g["sample"][start:stop] = sample.astype(np.int64)
    g["view"][start:stop] = view.astype(np.int8)
    g["key"][start:stop] = np.asarray(key, dtype=str)


def finalize_stats(path: str | Path, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-(token, channel) mean and population std of `mu` in float64, chunk by chunk in a fixed order.

    Two passes (mean, then centred second moment) so the result does not suffer from cancellation; the order of
    summation is fixed by the chunking, so it does not depend on how many processes wrote the rows. `std` is floored
    at `eps` so that normalising by it never divides by zero (the official code has no epsilon; SPEC.md 12.5).
    """
    g = zarr.open_group(path, mode="r+")
    mu = g["mu"]
    n, chunk = mu.shape[0], mu.chunks[0]
    mean, std = elementwise_mean_std(lambda: (mu[s : s + chunk] for s in range(0, n, chunk)))
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ArtifactError(_damaged(Path(path), "the per-(token, channel) statistics are not finite (a non-finite "
                                                 "row got into mu)"))
    std = np.maximum(std, eps)
    for name, arr in (("mean", mean), ("std", std)):
        g.create_array(name, shape=arr.shape, dtype="float64", overwrite=True)[...] = arr
    return mean, std


class CheckedArray:
    """A read-only view of a zarr array whose read errors name the store and say how to rebuild it."""

    def __init__(self, array: zarr.Array, store: Path):
        self._array, self._store = array, store

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return self._array[key]
        except Exception as e:  # zarr/numcodecs raise many types for a damaged chunk (zstd, shape, OSError...)
            raise ArtifactError(_damaged(self._store, f"cannot read {self._array.basename}[{key}] "
                                                      f"({type(e).__name__}: {e})")) from e

    def __getattr__(self, name: str) -> Any:
        return getattr(self._array, name)

    def __len__(self) -> int:
        return self._array.shape[0]


def _damaged(store: Path, what: str) -> str:
    return (f"{store}: {what}; the latents store is damaged. Re-run `flatdino latents` with the same options and "
            f"--overwrite (or into a new --out) to rebuild it")


def missing_chunks(array: zarr.Array, store: Path) -> list[str]:
    """Chunk files of `array` (chunked along axis 0 only) that are absent from the store on disk."""
    encode = array.metadata.chunk_key_encoding.encode_chunk_key
    n_chunks = -(-array.shape[0] // array.chunks[0])
    rest = (0,) * (array.ndim - 1)
    keys = [f"{array.basename}/{encode((i, *rest))}" for i in range(n_chunks)]
    return [k for k in keys if not (store / k).is_file()]


def open_latents(path: str | Path) -> LatentsArtifact:
    """Open a latents group; `path` is the artifact directory or the `.zarr` itself.

    A finished store (mean/std written) must have every `mu` chunk on disk: zarr would read a deleted chunk as zeros.
    Reads that fail on a damaged chunk raise ArtifactError naming the store.
    """
    path = Path(path)
    if path.suffix != ".zarr":
        path = path / STORE
    if not (path / "zarr.json").exists():
        raise ArtifactError(f"{path}: no latents store; run `flatdino latents` (make latents) first")
    g = zarr.open_group(path, mode="r")
    stats = [CheckedArray(g[k], path)[...] if k in g else None for k in ("mean", "std")]
    if stats[0] is not None and (gone := missing_chunks(g["mu"], path)):
        raise ArtifactError(_damaged(path, f"{len(gone)} chunk file(s) missing ({', '.join(gone[:3])})"))
    arrays = [CheckedArray(g[k], path) for k in ("mu", "label", "sample", "view", "key")]
    return LatentsArtifact(*arrays, np.asarray(stats[0]) if stats[0] is not None else None,
                           np.asarray(stats[1]) if stats[1] is not None else None, dict(g.attrs))
