"""GPU readiness: check the CUDA paths and measure throughput in one short run (< 5 minutes on one H100).

Checks
  - bf16 autocast: DiT-XL and FlatDINO 32-bl-128 outputs under bf16 vs fp32 (relative error);
  - attention: SDPA vs xformers on the same q/k/v (agreement and speed), when xformers is installed;
  - accelerate: an Accelerator with bf16 mixed precision places a DiT step on the GPU.
Measures (bf16 unless stated)
  - DINOv2-B/14-reg features: images/s at 224 px (fp32, as the official code, and bf16);
  - FlatDINO 32-bl-128 training step: samples/s;
  - DiT-XL training step on 32x128 FlatDINO latents vs 256x768 DINOv2 grids: samples/s, the ratio, and model FLOP
    utilisation against a measured bf16 matmul peak;
  - sampling: latents/s for 50 Euler steps with CFG (2 forward passes per step).

Only torch and transformers are needed (the device image has both); random weights, so no download.

    python3 bench/gpu_check.py [--smoke]      # --smoke: tiny sizes, runs on CPU too (checks the code path)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.dit import DiT, PRESETS as DIT_PRESETS  # noqa: E402
from models.flatdino import FlatDINO, PRESETS as VAE_PRESETS, default_kl_weight, vae_loss  # noqa: E402
from models.layers import attention  # noqa: E402


def timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call after 2 warm-ups (CUDA-synchronised)."""
    for _ in range(2):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def bf16(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def randomise_zero_init(model: nn.Module) -> nn.Module:
    """adaLN-Zero makes the DiT output exactly 0 at init; perturb every parameter so comparisons mean something."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def matmul_peak(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ b, 10, device)


def forward_flops(model: nn.Module, *inputs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad(), bf16(inputs[0].device):
        model(*inputs)
    return float(fc.get_total_flops())


def check_bf16(device: torch.device, smoke: bool) -> dict:
    cfg = DIT_PRESETS["T" if smoke else "XL"]
    dit = randomise_zero_init(DiT(cfg).to(device).eval())
    x, t = torch.randn(8, cfg.tokens, cfg.channels, device=device), torch.rand(8, device=device)
    y = torch.randint(0, cfg.num_classes, (8,), device=device)
    vae = FlatDINO(VAE_PRESETS["demo" if smoke else "32-bl-128"]).to(device).eval()
    f = torch.randn(8, vae.cfg.num_patches, vae.cfg.feature_dim, device=device)
    with torch.no_grad():
        ref_d, ref_v = dit(x, t, y), vae.decode(vae.encode(f).mu)
        with bf16(device):
            low_d, low_v = dit(x, t, y).float(), vae.decode(vae.encode(f).mu).float()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {"dit_bf16_rel_err": rel(low_d, ref_d), "flatdino_bf16_rel_err": rel(low_v, ref_v)}


def check_attention(device: torch.device) -> dict:
    q, k, v = (torch.randn(16, 16, 256, 72, device=device, dtype=torch.bfloat16) for _ in range(3))
    out = {"sdpa_ms": 1e3 * timed(lambda: attention(q, k, v, "sdpa"), 20, device)}
    try:
        import xformers  # noqa: F401
    except ImportError:
        return {**out, "xformers": "not installed (pip install '.[xformers]' to compare)"}
    ref = attention(q, k, v, "sdpa").float()
    xf = attention(q, k, v, "xformers").float()
    out.update(xformers_ms=1e3 * timed(lambda: attention(q, k, v, "xformers"), 20, device),
               xformers_vs_sdpa_max_abs=float((xf - ref).abs().max()))
    return out


def check_accelerate(device: torch.device, smoke: bool) -> dict:
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type != "cuda")
    model = DiT(DIT_PRESETS["T"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    x = torch.randn(4, 32, 32, device=acc.device)
    loss = model(x, torch.rand(4, device=acc.device), torch.zeros(4, dtype=torch.long, device=acc.device)).pow(2).mean()
    acc.backward(loss + sum(p.sum() * 0 for p in model.parameters()))
    opt.step()
    return {"accelerate_device": str(acc.device), "mixed_precision": acc.mixed_precision}


def dinov2_throughput(device: torch.device, smoke: bool) -> dict:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=192 if smoke else 768, num_hidden_layers=2 if smoke else 12,
                                    num_attention_heads=3 if smoke else 12, patch_size=14, image_size=518)
    model = Dinov2WithRegistersModel(cfg).to(device).eval()
    batch = 4 if smoke else 128
    x = torch.randn(batch, 3, 224, 224, device=device)
    out = {}
    for name, ctx in (("fp32", contextlib.nullcontext), ("bf16", lambda: bf16(device))):
        def step():
            with torch.no_grad(), ctx():
                model(pixel_values=x)
        out[f"dinov2_b_img_s_{name}"] = batch / timed(step, 3 if smoke else 10, device)
    return out


def train_step_fn(model: nn.Module, batch_fn, loss_fn, device: torch.device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    inputs = batch_fn()

    def step():
        with bf16(device):
            loss = loss_fn(model, *inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def flatdino_throughput(device: torch.device, smoke: bool) -> dict:
    cfg = VAE_PRESETS["demo" if smoke else "32-bl-128"]
    model = FlatDINO(cfg).to(device).train()
    batch = 4 if smoke else 128
    beta = default_kl_weight(cfg.num_tokens, cfg.latent_dim)

    def loss_fn(m, f, noise):
        out = m(f, noise)
        return vae_loss(out.recon, f, out.posterior, beta).total

    step = train_step_fn(model, lambda: (torch.randn(batch, cfg.num_patches, cfg.feature_dim, device=device),
                                         torch.randn(batch, *cfg.latent_shape, device=device)), loss_fn, device)
    return {"flatdino_32bl128_train_samples_s": batch / timed(step, 2 if smoke else 10, device)}


def dit_throughput(device: torch.device, smoke: bool, peak: float) -> dict:
    out = {}
    base = DIT_PRESETS["T" if smoke else "XL"]
    batch = 4 if smoke else 64
    for name, (tokens, channels) in {"32x128": (32, 128), "256x768": (256, 768)}.items():
        cfg = type(base)(**{**base.__dict__, "tokens": tokens, "channels": channels})
        model = DiT(cfg).to(device).train()
        fwd = forward_flops(model, torch.randn(1, tokens, channels, device=device), torch.rand(1, device=device),
                            torch.zeros(1, dtype=torch.long, device=device))

        def loss_fn(m, x, t, y):
            return (m(x, t, y) - x).pow(2).mean()

        step = train_step_fn(model, lambda: (torch.randn(batch, tokens, channels, device=device),
                                             torch.rand(batch, device=device),
                                             torch.randint(0, cfg.num_classes, (batch,), device=device)), loss_fn, device)
        rate = batch / timed(step, 2 if smoke else 10, device)
        out[f"dit_train_samples_s_{name}"] = rate
        out[f"dit_fwd_gmacs_{name}"] = fwd / 2e9
        out[f"dit_mfu_{name}"] = 3 * fwd * rate / peak
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["dit_train_speedup_32x128_vs_256x768"] = out["dit_train_samples_s_32x128"] / out["dit_train_samples_s_256x768"]
    return out


def sampling_throughput(device: torch.device, smoke: bool) -> dict:
    from models.flow import sample

    cfg = DIT_PRESETS["T" if smoke else "XL"]
    model = DiT(cfg).to(device).eval()
    batch, steps = (4, 4) if smoke else (256, 50)
    noise = torch.randn(batch, cfg.tokens, cfg.channels, device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def run():
        with torch.no_grad(), bf16(device):
            sample(model, labels, noise, steps=steps, sampler="euler", cfg_scale=2.0, cfg_interval=(0.3, 1.0), kappa=1.0)
    return {"sampling_latents_s_euler50_cfg": batch / timed(run, 1, device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # recorded below; only affects the fp32 DINOv2 figure
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke,
                 "tf32": device.type == "cuda"}
    peak = matmul_peak(device, 512 if args.smoke else 8192)
    res["bf16_matmul_peak_tflops"] = peak / 1e12
    for name, fn in [("bf16", lambda: check_bf16(device, args.smoke)), ("attention", lambda: check_attention(device)),
                     ("accelerate", lambda: check_accelerate(device, args.smoke)),
                     ("dinov2", lambda: dinov2_throughput(device, args.smoke)),
                     ("flatdino", lambda: flatdino_throughput(device, args.smoke)),
                     ("dit", lambda: dit_throughput(device, args.smoke, peak)),
                     ("sampling", lambda: sampling_throughput(device, args.smoke))]:
        t0 = time.perf_counter()
        try:
            res.update(fn())
        except Exception as e:  # report and go on: one broken path must not hide the others' figures
            res[f"{name}_error"] = f"{type(e).__name__}: {e}"
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: done", flush=True)
    for k, v in res.items():
        print(f"  {k:42s} {v:.4g}" if isinstance(v, float) else f"  {k:42s} {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
