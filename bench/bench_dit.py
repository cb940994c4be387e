"""Throughput of one DiT preset on FlatDINO latents (32x128) vs DINOv2 grids (256x768), side by side.

Measures training steps (forward + backward + AdamW) and sampling forwards per second, and prints the measured
speed-up next to the counted GMAC ratio from `stages.flops`. With `--vs-dh`, compares instead LightningDiT with the
DiT^DH of the same trunk (S -> dits-dh, ..., XL -> ditxl-dh, T -> ditt-dh) on one shape: the time ratio of a
training step next to the counted GMAC ratio. Wall-clock numbers depend on the machine: say which one when you
report them. Usage:

    python bench/bench_dit.py --preset XL --batch 64 --device cuda --precision bf16
    python bench/bench_dit.py --preset S --batch 8 --device cpu      # a quick CPU look
    python bench/bench_dit.py --preset S --batch 4 --threads 1 --vs-dh          # DiT^DH-S vs DiT-S on 32x128
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
from models.dit_dh import PRESETS as DH_PRESETS  # noqa: E402
from models.dit_dh import DiTDH  # noqa: E402
from models.flow import draw, flow_loss, guided_velocity  # noqa: E402
from pipeline.runtime import autocast  # noqa: E402
from stages.flops import dit_costs, dit_dh_costs  # noqa: E402

SHAPES = {"flat 32x128": (32, 128), "grid 256x768": (256, 768)}
SAME_TRUNK = {"S": "dits-dh", "B": "ditb-dh", "L": "ditl-dh", "XL": "ditxl-dh", "T": "ditt-dh"}


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


def bench_shape(preset: str, tokens: int, channels: int, args, device: torch.device, dh: bool = False) -> dict:
    """Training images/s and sampling forwards/s of a DiT (or, with `dh`, DiT^DH) preset on (tokens, channels)."""
    cls, presets = (DiTDH, DH_PRESETS) if dh else (DiT, PRESETS)
    cfg = dataclasses.replace(presets[preset], tokens=tokens, channels=channels, attn_backend=args.attn_backend)
    model = cls(cfg).to(device)
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


def compare_dh(args, device: torch.device, name: str) -> None:
    """LightningDiT vs DiT^DH with the same trunk on one shape: step-time ratio next to the counted GMAC ratio."""
    dh = SAME_TRUNK[args.preset]
    shape = next(v for k, v in SHAPES.items() if k.startswith(args.shape))
    rows = {args.preset: bench_shape(args.preset, *shape, args, device),
            dh: bench_shape(dh, *shape, args, device, dh=True)}
    macs = {args.preset: dit_costs(args.preset, *shape), dh: dit_dh_costs(dh, *shape)}
    print(f"DiT-{args.preset} vs DiT^DH {dh} on {shape[0]}x{shape[1]}, batch {args.batch}, {args.precision}, on {name}")
    print(f"{'model':<10} {'params':>9} {'GMACs/img':>10} {'train GMACs':>12} {'train img/s':>12} {'step s':>8}")
    for n, r in rows.items():
        print(f"{n:<10} {macs[n]['params'] / 1e6:>8.1f}M {macs[n]['gmacs']:>10.2f} {macs[n]['train_gmacs']:>12.2f} "
              f"{r['train_img_s']:>12.2f} {args.batch / r['train_img_s']:>8.3f}")
    a, b = rows[args.preset], rows[dh]
    print(f"ratio DiT^DH/DiT: training step time {a['train_img_s'] / b['train_img_s']:.2f}x, "
          f"counted train GMACs {macs[dh]['train_gmacs'] / macs[args.preset]['train_gmacs']:.2f}x, "
          f"forward GMACs {macs[dh]['gmacs'] / macs[args.preset]['gmacs']:.2f}x, "
          f"sampling time {a['sample_fwd_img_s'] / b['sample_fwd_img_s']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="XL", choices=list(PRESETS))
    p.add_argument("--vs-dh", action="store_true", help="compare with the same-trunk DiT^DH on --shape instead")
    p.add_argument("--shape", default="flat", choices=["flat", "grid"], help="the --vs-dh shape: 32x128 or 256x768")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"])
    p.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "xformers"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    if args.vs_dh:
        return compare_dh(args, device, name)
    rows = {n: bench_shape(args.preset, *shape, args, device) for n, shape in SHAPES.items()}
    macs = {n: dit_costs(args.preset, *shape)["gmacs"] for n, shape in SHAPES.items()}
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
