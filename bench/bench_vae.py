"""FlatDINO benchmarks (prints; never asserts).

1. Training throughput (samples/s, forward + backward + AdamW step) of encoder/decoder presets at a fixed micro-batch
   on random (B, 256, 768) features, in the precision the training stage would use on this device.
2. Reconstruction quality (patch cosine similarity, MSE, Huber) of a trained VAE on the held-out split of a features
   artifact, with z = mu.

    python bench/bench_vae.py throughput --presets 32-tt-128 32-bl-128 --batch 64 --steps 5
    python bench/bench_vae.py recon --vae shards/vae/demo --features shards/features/demo
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from models.flatdino import PRESETS, FlatDINO, param_groups, vae_loss
from pipeline.runtime import autocast, resolve_device, resolve_precision


def throughput(preset: str, batch: int, steps: int, device: torch.device, precision: str) -> float:
    """Samples per second of full training updates (after one warm-up update)."""
    cfg = PRESETS[preset]
    model = FlatDINO(cfg).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-4, betas=(0.9, 0.999))
    tokens = F.layer_norm(torch.randn(batch, cfg.num_patches, cfg.feature_dim, device=device), (cfg.feature_dim,))
    noise = torch.randn(batch, *cfg.latent_shape, device=device)

    def update():
        with autocast(precision, device):
            out = model(tokens, noise)
        vae_loss(out.recon, tokens, out.posterior, cfg.default_kl_weight).total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


@torch.no_grad()
def reconstruction(vae_dir: str, features: str, split: str, batch: int, device: torch.device) -> dict:
    """Mean per-patch cosine, MSE and Huber of FlatDINO(mu) reconstructions over a split (view 0), and the posterior's
    noise against its signal: mean and median sigma = exp(logvar / 2) and mu's spread over the split (mean over
    latent dimensions of mu's std), whose ratio is the signal-to-noise of what the decoder is trained on."""
    from pipeline.shards import FeatureShards
    from pipeline.artifacts import load_flatdino

    model, _, manifest = load_flatdino(vae_dir, "best", device)
    shards, sums, n, mus, sigmas = FeatureShards(features), np.zeros(3), 0, [], []
    items = [f[0] for _, _, _, f in shards.iter(split)]
    for s in range(0, len(items), batch):
        x = torch.from_numpy(np.stack(items[s : s + batch])).float().to(device)
        out = model(x)  # z = mu; the posterior comes with it, no second encode
        recon = out.recon
        mus.append(out.posterior.mu.cpu())
        sigmas.append(torch.exp(0.5 * out.posterior.logvar).cpu())
        sums += [F.cosine_similarity(recon, x, dim=-1).mean(1).sum().item(),
                 (recon - x).square().mean((1, 2)).sum().item(),
                 F.huber_loss(recon, x, reduction="none").mean((1, 2)).sum().item()]
        n += len(x)
    sigma = torch.cat(sigmas)
    return {"samples": n, "cosine": float(sums[0] / n), "mse": float(sums[1] / n), "huber": float(sums[2] / n),
            "sigma_mean": sigma.mean().item(), "sigma_median": sigma.median().item(),
            "mu_spread": torch.cat(mus).std(dim=0).mean().item(), "best_step": manifest.extra["best_step"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--presets", nargs="+", default=["32-tt-128", "32-ss-128", "32-bb-128", "32-bl-128"])
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--precision", default="auto")
    t.add_argument("--device", default="auto")
    r = sub.add_parser("recon")
    r.add_argument("--vae", required=True)
    r.add_argument("--features", required=True)
    r.add_argument("--split", default="val")
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    if args.cmd == "throughput":
        precision = resolve_precision(args.precision, device)
        for preset in args.presets:
            rate = throughput(preset, args.batch, args.steps, device, precision)
            print(f"{preset:>10}  batch {args.batch}  {precision}  {device}: {rate:9.1f} samples/s")
    else:
        print(reconstruction(args.vae, args.features, args.split, args.batch, device))


if __name__ == "__main__":
    main()
