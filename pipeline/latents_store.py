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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.manifest import ArtifactError

STORE = "latents.zarr"


@dataclass
class LatentsArtifact:
    """Open arrays of a latents.zarr group (zarr arrays are read lazily, slice them)."""

    mu: zarr.Array
    label: zarr.Array
    sample: zarr.Array
    view: zarr.Array
    key: zarr.Array
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
    """Create (or re-open unchanged, for resume) the arrays of a latents group with N = n rows."""
    path = Path(path)
    if (path / "zarr.json").exists():
        g = zarr.open_group(path, mode="r")
        if g["mu"].shape == (n, tokens, dim) and g["mu"].chunks[0] == chunk and dict(g.attrs) == attrs:
            return
        raise ArtifactError(f"{path} holds latents of another shape/chunking/origin; use --overwrite or another --out")
    g = zarr.open_group(path, mode="w")
    g.create_array("mu", shape=(n, tokens, dim), chunks=(chunk, tokens, dim), dtype="float32")
    g.create_array("label", shape=(n,), chunks=(chunk,), dtype="int64")
    g.create_array("sample", shape=(n,), chunks=(chunk,), dtype="int64")
    g.create_array("view", shape=(n,), chunks=(chunk,), dtype="int8")
    g.create_array("key", shape=(n,), chunks=(chunk,), dtype=str)
    g.attrs.update(attrs)


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
    total = np.zeros(mu.shape[1:], np.float64)
    for s in range(0, n, chunk):
        total += mu[s : s + chunk].astype(np.float64).sum(0)
    mean = total / n
    m2 = np.zeros_like(mean)
    for s in range(0, n, chunk):
        m2 += ((mu[s : s + chunk].astype(np.float64) - mean) ** 2).sum(0)
    std = np.maximum(np.sqrt(m2 / n), eps)
    for name, arr in (("mean", mean), ("std", std)):
        g.create_array(name, shape=arr.shape, dtype="float64", overwrite=True)[...] = arr
    return mean, std


def open_latents(path: str | Path) -> LatentsArtifact:
    """Open a latents group; `path` is the artifact directory or the `.zarr` itself."""
    path = Path(path)
    if path.suffix != ".zarr":
        path = path / STORE
    if not (path / "zarr.json").exists():
        raise ArtifactError(f"{path}: no latents store; run `flatdino latents` (make latents) first")
    g = zarr.open_group(path, mode="r")
    stats = [np.asarray(g[k][...]) if k in g else None for k in ("mean", "std")]
    return LatentsArtifact(g["mu"], g["label"], g["sample"], g["view"], g["key"], stats[0], stats[1], dict(g.attrs))
