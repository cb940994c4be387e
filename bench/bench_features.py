"""Benchmark: does decoding + writing hide behind the encoder in `flatdino features`? And is memory flat?

Side by side in one run, same batch size and precision:
  1. bare encoder: preprocess + DINOv2 forward on already-decoded uint8 crops (the model's ceiling);
  2. end to end: `features.run` on an images artifact (decode, ADM crop, forward, float16, tar write, fsync), timed
     by the stage itself from its first batch (the one-time weight load is reported separately).
Prints images/s of both and their ratio (target >= 0.9), then peak RSS of end-to-end runs on N and 2N images in
fresh subprocesses (flat memory means the ratio stays near 1).

    .venv/bin/python bench/bench_features.py [--encoder-preset tiny|dinov2-b-xl] [--images 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.encoder import FeatureEncoder, adm_center_crop, init_rae_dir, load_rae, pil_to_uint8  # noqa: E402
from pipeline.runtime import Runtime, autocast  # noqa: E402
from pipeline.shards import ImageShards, load_rgb  # noqa: E402
from stages import features, images  # noqa: E402


def make_artifacts(root: Path, n: int, preset: str) -> tuple[Path, Path]:
    """A folder of n random-ish 400x300 JPEGs (realistic decode cost) as an images artifact, and an encoder dir."""
    import numpy as np
    from PIL import Image

    folder = root / "folder"
    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"c{i % 10}" / f"{i:05d}.jpg", quality=90)
    images.run(images.Config(out=root / "images", source=str(folder), shard_size=128, val_fraction=0.0))
    return root / "images", init_rae_dir(root / "encoder", preset, 0)


def bare_encoder(images_dir: Path, encoder_dir: Path, batch: int, precision: str) -> float:
    art = ImageShards(images_dir)
    crops = [pil_to_uint8(adm_center_crop(load_rgb(data))) for _, _, _, data, _ in art.iter("train")]
    enc = FeatureEncoder(load_rae(encoder_dir)).eval()
    x = torch.stack(crops)
    with torch.no_grad(), autocast(precision, torch.device("cpu")):
        enc.encode_images(x[:batch])  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(x), batch):
            enc.encode_images(x[s : s + batch]).patches.to(torch.float16)
    return len(x) / (time.perf_counter() - t0)


def end_to_end(images_dir: Path, encoder_dir: Path, out: Path, batch: int, precision: str) -> tuple[float, float]:
    """(loop images/s, wall images/s): the stage's own timing of its decode -> forward -> write loop, which excludes
    the one-time weight load (the bare encoder run just before warmed the kernels), and the whole call's rate."""
    cfg = features.Config(images=images_dir, encoder=str(encoder_dir), out=out, views=1, batch_size=batch,
                          precision=precision, num_workers=2)
    t0 = time.perf_counter()
    m = features.run(cfg, rt=Runtime())
    return m.timings["images_per_second"], m.counts["written"] / (time.perf_counter() - t0)


def peak_rss_mb(n: int, preset: str, batch: int) -> float:
    code = (f"import resource, sys, tempfile, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r});"
            f"import bench_features as b; r = pathlib.Path(tempfile.mkdtemp());"
            f"i, e = b.make_artifacts(r, {n}, {preset!r});"
            f"b.features.run(b.features.Config(images=i, encoder=str(e), out=r/'f', views=1, batch_size={batch}));"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder-preset", default="tiny", choices=["tiny", "dinov2-b-xl"])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--skip-memory", action="store_true", help="skip the peak-RSS runs (N and 2N images)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        imgs, enc = make_artifacts(root, args.images, args.encoder_preset)
        bare = bare_encoder(imgs, enc, args.batch_size, args.precision)
        e2e, e2e_wall = end_to_end(imgs, enc, root / "features", args.batch_size, args.precision)
    sizes = () if args.skip_memory else (args.images, 2 * args.images)
    rss = {n: peak_rss_mb(n, args.encoder_preset, args.batch_size) for n in sizes}
    result = {"encoder": args.encoder_preset, "batch": args.batch_size, "precision": args.precision,
              "bare_encoder_img_s": round(bare, 2), "end_to_end_img_s": round(e2e, 2),
              "end_to_end_with_load_img_s": round(e2e_wall, 2),
              "ratio_end_to_end_over_bare": round(e2e / bare, 3),
              "peak_rss_mb": {str(k): round(v, 1) for k, v in rss.items()}}
    if rss:
        result["rss_ratio_2n_over_n"] = round(rss[2 * args.images] / rss[args.images], 3)
    print(f"features ({args.encoder_preset}, batch {args.batch_size}, {args.precision}): bare encoder {bare:.1f} img/s, "
          f"end to end {e2e:.1f} img/s, ratio {e2e / bare:.2f} (target >= 0.9); with the one-time weight load "
          f"{e2e_wall:.1f} img/s")
    if rss:
        print(f"peak RSS: {rss[args.images]:.0f} MB for {args.images} images, {rss[2 * args.images]:.0f} MB for "
              f"{2 * args.images} (ratio {rss[2 * args.images] / rss[args.images]:.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
