"""Throughput of one DiT preset on FlatDINO latents (32x128) vs DINOv2 grids (256x768), side by side.

Measures training steps (forward + backward + AdamW) and sampling forwards per second, and prints the measured
speed-up next to the counted GMAC ratio from `stages.flops`. Wall-clock numbers depend on the machine: say which
one when you report them. Usage:

    python bench/bench_dit.py --preset XL --batch 64 --device cuda --precision bf16
    python bench/bench_dit.py --preset S --batch 8 --device cpu      # a quick CPU look
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.dit import PRESETS, DiT  # noqa: E402
from models.flow import draw, flow_loss, guided_velocity  # noqa: E402
from pipeline.runtime import autocast  # noqa: E402
from stages.flops import dit_costs  # noqa: E402

SHAPES = {"flat 32x128": (32, 128), "grid 256x768": (256, 768)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_shape(preset: str, tokens: int, channels: int, args, device: torch.device) -> dict:
    cfg = dataclasses.replace(PRESETS[preset], tokens=tokens, channels=channels, attn_backend=args.attn_backend)
    model = DiT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, tokens, channels, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (args.batch,), generator=g).to(device)

    def train_step():
        d = draw(z, y, 1.0, 0.1, cfg.null_class, None)
        with autocast(args.precision, device):
            loss = flow_loss(model, z, d).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample_step():  # one guided ODE step = two forward passes (CFG)
        with torch.no_grad(), autocast(args.precision, device):
            guided_velocity(model, z, 0.5, y, 2.0, (0.0, 1.0), cfg.null_class)

    train = timed(train_step, args.warmup, args.iters, device)
    model.eval()
    samp = timed(sample_step, args.warmup, args.iters, device)
    return {"train_img_s": args.batch / train, "sample_fwd_img_s": 2 * args.batch / samp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="XL", choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"])
    p.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "xformers"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = {name: bench_shape(args.preset, *shape, args, device) for name, shape in SHAPES.items()}
    macs = {name: dit_costs(args.preset, *shape)["gmacs"] for name, shape in SHAPES.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"DiT-{args.preset}, batch {args.batch}, {args.precision}, {args.attn_backend}, on {name}")
    print(f"{'shape':<14} {'GMACs/img':>10} {'train img/s':>12} {'sample fwd img/s':>17}")
    for n in SHAPES:
        print(f"{n:<14} {macs[n]:>10.2f} {rows[n]['train_img_s']:>12.1f} {rows[n]['sample_fwd_img_s']:>17.1f}")
    flat, grid = rows["flat 32x128"], rows["grid 256x768"]
    print(f"ratio flat/grid: FLOPs {macs['grid 256x768'] / macs['flat 32x128']:.2f}x, "
          f"training {flat['train_img_s'] / grid['train_img_s']:.2f}x, "
          f"sampling {flat['sample_fwd_img_s'] / grid['sample_fwd_img_s']:.2f}x")


if __name__ == "__main__":
    main()
