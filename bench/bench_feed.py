"""Host-side data paths at ImageNet shapes, each old way and new way side by side in one run (issue 16).

  dit      train-dit host time per step at global batch 1024: gather the rows + draw noise/t/dropout. Old: every rank
           gathered the whole global batch from the memory map and drew its randoms on one CPU thread. New: a rank
           gathers only its share (here 8 ranks: 128 rows), in the trainer's background thread, and the draws are
           made on the device (on a CPU-only host their cost is shown apart: it is device work on a GPU).
  vae      train-vae reader on a features artifact of (2, 256, 768) float16 samples: bytes read and open() calls per
           sample used, samples/s with 4 workers from a cold page cache. Old: open + seek + read both views per
           sample + isfinite; new: one view through the shard index, files kept open, CRC-checked blocks.
  tail     features: main-thread time per image after the encoder's forward at (2, 256, 768). Old: isfinite on
           float16, npy encode, tar addfile, read-back sha256 and fsync on the main thread; new: a queue put (the
           writer thread does the rest; finiteness is checked on the device).
  decode   features: decode + ADM crop of ImageNet-like JPEGs (~440 x 430) with N worker processes vs 1.
  index    start-up: per-sample cost of reading a shard's index vs scanning every tar header.

    .venv/bin/python bench/bench_feed.py [--only dit,vae,tail,decode,index] [--rows 100000] [--samples 1024]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.manifest import Manifest, OutputDir  # noqa: E402
from pipeline.shards import (FeatureShards, encode_int, encode_npy, index_tar_shard, load_index,  # noqa: E402
                             read_member, write_tar_shard)

T, F, N, D = 32, 128, 256, 768


def median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_dit(rows: int, world: int = 8, batch: int = 1024) -> dict:
    from stages.train_dit import batch_indices, draw_step

    with tempfile.TemporaryDirectory() as tmp:
        z = np.lib.format.open_memmap(Path(tmp) / "z.npy", mode="w+", dtype=np.float32, shape=(rows, T, F))
        z[:] = np.random.default_rng(0).standard_normal((rows, T, F), dtype=np.float32)
        z.flush()
        z = np.load(Path(tmp) / "z.npy", mmap_mode="r")
        steps = iter(range(10_000))

        def old():
            s = next(steps)
            idx = batch_indices(rows, batch, s, 0)
            zz = torch.from_numpy(z[idx.numpy()])
            g = torch.Generator().manual_seed(s)
            torch.randn(zz.shape, generator=g), torch.rand(batch, generator=g), torch.rand(batch, generator=g)

        def new_gather():
            s = next(steps)
            idx = batch_indices(rows, batch, s, 0)[: batch // world]
            torch.from_numpy(z[idx.numpy()])

        def new_draws_on_this_device():
            draw_step(0, next(steps), batch, (T, F), torch.device("cpu"))

        old_t, gather_t, draws_t = median_time(old), median_time(new_gather), median_time(new_draws_on_this_device)
    return {"rows": rows, "global_batch": batch, "ranks": world, "old_ms_per_step": 1e3 * old_t,
            "new_host_ms_per_step": 1e3 * gather_t, "new_steps_per_s": 1 / gather_t,
            "ratio_old_over_new": old_t / gather_t,
            "device_draws_ms_per_step_if_run_on_this_cpu": 1e3 * draws_t}


def make_features(root: Path, n: int, shard: int = 256) -> Path:
    """A features artifact of n random (2, 256, 768) float16 samples in shards of `shard`."""
    rng = np.random.default_rng(0)
    records = []
    with OutputDir(root, "features", {"bench": n}) as od:
        for k in range(0, n, shard):
            samples = [{"__key__": f"train_{i:08d}", "feat.npy": encode_npy(rng.standard_normal((2, N, D)).astype(
                np.float16)), "cls": encode_int(i % 10)} for i in range(k, min(k + shard, n))]
            rec = write_tar_shard(root / f"features-train-{k // shard:06d}.tar", samples)
            od.commit(rec)
            records.append({**rec, "split": "train"})
        extra = {"views": 2, "num_patches": N, "dim": D, "classes": [str(c) for c in range(10)],
                 "encoder": {"fingerprint": "bench"}, "splits": {"train": n}}
        od.finish(Manifest(stage="features", shards=records, extra=extra, complete=True))
    return root


def _evict(root: Path) -> None:
    """Drop the artifact's pages from the page cache (a cold read)."""
    for p in root.glob("*.tar"):
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def bench_vae(n: int, workers: int = 4) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory() as tmp:
        root = make_features(Path(tmp) / "f", n)
        art = FeatureShards(root)
        order = np.random.default_rng(1).permutation(n)
        views = np.random.default_rng(2).integers(0, 2, n)
        table = [(root / r["name"], key, m) for r in art.shards("train")
                 for key, m in index_tar_shard(root / r["name"]).items()]  # the old reader's header scan
        opened = {"old": 0, "new": 0}
        real_open = os.open

        def old_one(i):
            path, key, members = table[i]
            opened["old"] += 2
            f = np.load(io.BytesIO(read_member(path, *members["feat.npy"])))
            read_member(path, *members["cls"])
            assert np.isfinite(f).all()
            return f[views[i]]

        def new_one(i):
            return art.get(int(i), "train", view=int(views[i]))[2]

        def run(fn):
            _evict(root)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(fn, order))
            return n / (time.perf_counter() - t0)

        def counting_open(*a, **k):
            opened["new"] += 1
            return real_open(*a, **k)

        old_rate = run(old_one)
        os.open = counting_open
        try:
            art.files.close()
            new_rate = run(new_one)
        finally:
            os.open = real_open
        member = n and art.index(art.shards("train")[0]).members[0]["feat.npy"]
        view_bytes = N * D * 2
    return {"samples": n, "workers": workers, "old_samples_per_s_cold": old_rate, "new_samples_per_s_cold": new_rate,
            "ratio_new_over_old": new_rate / old_rate, "old_bytes_per_sample_used": 2 * view_bytes + member.head,
            "new_bytes_per_sample_used": view_bytes, "bytes_ratio_new": 1.0,
            "old_opens_per_sample": opened["old"] / n, "new_opens_per_sample": opened["new"] / n}


def bench_tail(n: int = 256) -> dict:
    from stages.features import ShardWriter

    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((2, N, D)).astype(np.float16) for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()  # old: everything on the main thread
        samples = []
        for i, f in enumerate(feats):
            assert np.isfinite(f).all()
            samples.append({"__key__": f"k{i:08d}", "feat.npy": encode_npy(f), "cls": encode_int(0)})
        rec = write_tar_shard(Path(tmp) / "old.tar", samples)
        import hashlib

        hashlib.sha256((Path(tmp) / "old.tar").read_bytes()).hexdigest()  # the old read-back hash
        old = (time.perf_counter() - t0) / n
        writer = ShardWriter(Path(tmp) / "new.tar")
        t0 = time.perf_counter()
        for i, f in enumerate(feats):
            writer.put((f"k{i:08d}", 0, f))
        main = (time.perf_counter() - t0) / n
        new_rec = writer.close()
        assert new_rec["sha256"] == rec["sha256"]  # the same bytes
    return {"images": n, "old_main_thread_ms_per_image": 1e3 * old, "new_main_thread_ms_per_image": 1e3 * main,
            "ratio_old_over_new": old / main}


def _jpegs(n: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        h, w = 427, 442
        base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        img = (base + rng.normal(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_decode(n: int = 192) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from models.imaging import decode_item

    data = _jpegs(n)
    rates = {}
    for workers in (1, 2):
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(decode_item, [("w", 0, None)] * workers))
            t0 = time.perf_counter()
            list(pool.map(decode_item, [(str(i), 0, d) for i, d in enumerate(data)], chunksize=8))
            rates[workers] = n / (time.perf_counter() - t0)
    return {"images": n, "mean_jpeg_kb": sum(map(len, data)) / n / 1024, "images_per_s_1_process": rates[1],
            "images_per_s_2_processes": rates[2], "scaling_2_over_1": rates[2] / rates[1]}


def bench_index(n: int = 2048) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_features(Path(tmp) / "f", n, shard=512)
        recs = FeatureShards(root).shards("train")
        scan = median_time(lambda: [index_tar_shard(root / r["name"]) for r in recs], 3)
        idx = median_time(lambda: [load_index(root / r["name"], r) for r in recs], 3)
    return {"samples": n, "scan_us_per_sample": 1e6 * scan / n, "index_us_per_sample": 1e6 * idx / n,
            "ratio_scan_over_index": scan / idx}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="dit,vae,tail,decode,index")
    ap.add_argument("--rows", type=int, default=100_000, help="latent rows of the train-dit memory map")
    ap.add_argument("--samples", type=int, default=1024, help="feature samples of the train-vae artifact")
    args = ap.parse_args()
    torch.set_num_threads(2)
    benches = {"dit": lambda: bench_dit(args.rows), "vae": lambda: bench_vae(args.samples), "tail": bench_tail,
               "decode": bench_decode, "index": bench_index}
    for name in args.only.split(","):
        result = benches[name]()
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
