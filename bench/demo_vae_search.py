"""The demo VAE's search harness (issue 17): train one FlatDINO variant on a features artifact in-process, report
held-out Huber (standardised units) and the round-trip PSNR through a pixel decoder.

Same model classes, loss, optimiser groups and WSD schedule as `flatdino train-vae --variant demo
--standardize-features`, without checkpoints, logs or resume, so a variant costs only its updates. PSNR compares
decoder(FlatDINO(features)) with decoder(features) on the val split (the pixel decoder's own output, which is
37.8-41 dB from the originals on the digits, so at these levels it tracks `flatdino reconstruct`'s figure).

    python bench/demo_vae_search.py NAME [key=value ...]   e.g.   pos=0   lr=1e-3   steps=4000   heads=16

Keys: width depth heads mlp (encoder; ddepth dheads for the decoder), pos (encoder positional embedding 1/0),
pinit (its init std), lv (logvar_init), steps batch lr b2 (Adam beta2) dfrac (decay fraction of the updates), wd T F
kl seed, feats (features artifact), dec (pixel decoder dir); the last line printed is the run's summary. Run it
alone: the 2-core timings mean nothing next to another job.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.flatdino as fd  # noqa: E402
from models.encoder import PixelDecoder, load_rae  # noqa: E402
from pipeline.image_metrics import psnr  # noqa: E402
from pipeline.runtime import Runtime  # noqa: E402
from pipeline.train_data import FeatureData  # noqa: E402
from stages.train_vae import ADAM_BETAS, ADAM_EPS, LR_FINAL, LR_INIT, Config  # noqa: E402

DEFAULTS = dict(width=64, depth=1, heads=4, mlp=0, ddepth=0, dheads=0, pos=1, pinit=0.02, steps=4042, batch=64,
                lr=2e-3, dfrac=0.25, wd=0.02, T=8, F=32, kl=-1.0, seed=0, lv=fd.PRESETS["demo"].logvar_init,
                b2=ADAM_BETAS[1], feats="shards/features/demo", dec="shards/decoder/demo")


def parse(argv: list[str]) -> dict:
    a = dict(DEFAULTS)
    for kv in argv:
        k, v = kv.split("=", 1)
        if k not in a:
            sys.exit(f"unknown key {k!r}; keys: {', '.join(a)}")
        a[k] = type(a[k])(v)
    return a


def main() -> None:
    name, a = sys.argv[1], parse(sys.argv[2:])
    torch.manual_seed(a["seed"])
    w, mlp = a["width"], a["mlp"] or 4 * a["width"]
    fd.SIZES["search-enc"] = fd.ViTSize(w, a["depth"], a["heads"], mlp)
    fd.SIZES["search-dec"] = fd.ViTSize(w, a["ddepth"] or a["depth"], a["dheads"] or a["heads"], mlp)
    data = FeatureData(Path(a["feats"]), 0, 8 << 30, 2)
    train = torch.from_numpy(data.cache["train"].reshape(-1, data.num_patches, data.dim).astype(np.float32))
    val = torch.from_numpy(data.cache["val"][:, 0].astype(np.float32))
    cfg = fd.FlatDINOConfig(encoder="search-enc", decoder="search-dec", num_tokens=a["T"], latent_dim=a["F"],
                            feature_dim=data.dim, num_patches=data.num_patches, standardize=True,
                            encoder_pos_embed=bool(a["pos"]), logvar_init=a["lv"])
    model = fd.FlatDINO(cfg)
    if a["pos"]:
        with torch.no_grad():
            model.encoder.pos_embed.mul_(a["pinit"] / 0.02)
    model.set_feature_stats(*data.feature_stats(Runtime()))  # train-vae's statistics, same float64 reduction
    opt = torch.optim.AdamW(fd.param_groups(model, a["wd"]), lr=LR_INIT, betas=(ADAM_BETAS[0], a["b2"]), eps=ADAM_EPS)
    clip = Config.__dataclass_fields__["grad_clip"].default
    n, g, total = len(train), a["batch"], a["steps"]
    warmup, decay = n // g, round(a["dfrac"] * total)
    beta = fd.default_kl_weight(a["T"], a["F"]) if a["kl"] < 0 else a["kl"]
    rng = np.random.default_rng(a["seed"])
    order, at = rng.permutation(n), 0

    def held_out() -> tuple[float, torch.Tensor]:
        model.eval()
        with torch.no_grad():
            rec = model.decode(model.encode(val).mu)
            h = F.huber_loss(model.loss_units(rec), model.loss_units(val)).item()
        model.train()
        return h, rec

    t0 = time.time()
    for step in range(total):
        if at + g > n:
            order, at = rng.permutation(n), 0
        x = train[order[at : at + g]]
        at += g
        for group in opt.param_groups:
            group["lr"] = fd.wsd_lr(step, total, warmup, decay, LR_INIT, a["lr"], LR_FINAL)
        out = model(x, torch.randn(g, a["T"], a["F"]))
        loss = fd.vae_loss(model.loss_units(out.recon), model.loss_units(x), out.posterior, beta)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if (step + 1) % 500 == 0 or step + 1 == total:
            print(f"update {step + 1}: train Huber {loss.recon.item():.4f}, val {held_out()[0]:.4f}, "
                  f"{time.time() - t0:.0f} s", flush=True)
    seconds = time.time() - t0
    h, rec = held_out()
    decoder = PixelDecoder(load_rae(a["dec"])).eval()
    with torch.no_grad():
        ref, got = decoder.to_uint8(decoder(val).float()), decoder.to_uint8(decoder(rec).float())
    line = (f"{name}: val Huber {h:.4f}, round-trip PSNR {psnr(got, ref).mean().item():.2f} dB vs the pixel decoder, "
            f"{seconds:.0f} s train | {json.dumps({k: a[k] for k in a if a[k] != DEFAULTS[k]})}")
    print(line)


if __name__ == "__main__":
    main()
