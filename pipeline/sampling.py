"""Generation through the whole chain: DiT (EMA) -> latents -> FlatDINO decoder -> pixel decoder -> uint8 images.

One function, `generate`, used by `flatdino sample` and by train-dit's periodic sample grids, so the two cannot
drift. `load_chain` loads the three networks of finished artifacts and refuses them unless they belong together
(fingerprints: the DiT's latents, the VAE that made them, the encoder the pixel decoder belongs to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from models.encoder import FeatureEncoder, PixelDecoder, load_rae
from pipeline.artifacts import load_flatdino
from pipeline.latents_store import open_latents
from pipeline.manifest import ArtifactError, Manifest, UserError, require_complete
from pipeline.runtime import autocast


class Chain(NamedTuple):
    """The three networks and the facts that tie them together."""

    dit: torch.nn.Module
    vae: torch.nn.Module
    decoder: PixelDecoder
    kappa: float
    mean: torch.Tensor | None  # (T, F) latent mean, when the DiT was trained on standardised latents
    std: torch.Tensor | None
    num_classes: int
    latent_shape: tuple[int, int]
    models: dict  # name -> fingerprints/sha256, for the manifest
    inputs: dict


class Sampling(NamedTuple):
    """How to sample: every knob that changes the images."""

    seed: int = 0
    steps: int = 50
    sampler: Literal["euler", "heun"] = "euler"
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.3, 1.0)
    precision: str = "fp32"


def check_cfg_interval(interval: tuple[float, float]) -> None:
    """Refuse a guidance interval that guides nowhere (t_min >= t_max), before any work."""
    if not interval[0] < interval[1]:
        raise UserError(f"--cfg-interval {interval[0]} {interval[1]}: guidance applies while t_min < t < t_max "
                        "(t = 0 noise, t = 1 data), so t_min must be below t_max")


def _vae_of_latents(latents: Manifest, path: Path, asked: str | None) -> tuple[str, str]:
    """(fingerprint, weights) of the VAE run that made the latents; refuses another checkpoint than asked."""
    if "vae" not in latents.inputs:
        raise ArtifactError(f"{path}: the latents manifest does not record the VAE it was made with (inputs.vae); "
                            f"re-run `flatdino latents`")
    rec = latents.inputs["vae"]
    if asked is not None and asked != rec["weights"]:
        raise ArtifactError(f"the DiT's latents were made with the {rec['weights']!r} FlatDINO checkpoint, not "
                            f"{asked!r}; drop --vae-weights or pass --vae-weights {rec['weights']}")
    return rec["fingerprint"], rec["weights"]


def check_decoder(rae, vae_manifest: Manifest, decoder: str) -> str:
    """The pixel decoder's encoder fingerprint, refused unless it is the encoder the VAE was trained on."""
    enc_fp, want = FeatureEncoder(rae).fingerprint, vae_manifest.extra["encoder"]["fingerprint"]
    if enc_fp != want:
        raise ArtifactError(f"the VAE was trained on features of encoder {want[:12]}, but --decoder {decoder} "
                            f"belongs to encoder {enc_fp[:12]}; train a decoder for that encoder (flatdino "
                            f"train-decoder --encoder ...) or pass the matching one")
    return enc_fp


def load_chain(dit_dir: Path, vae_dir: Path, decoder: str, device: torch.device, latents: Path | None = None,
               vae_weights: str | None = None) -> Chain:
    """Load DiT (EMA), FlatDINO and pixel decoder; refuse them unless they belong together (fingerprints)."""
    from models.dit_dh import load_generator

    dit_m = require_complete(dit_dir, "train_dit")
    dit, full = load_generator(dit_dir, ema=True, device=device)
    lat_path = latents or Path(dit_m.inputs["latents"]["path"])
    lat_m = require_complete(lat_path, "latents")
    if lat_m.fingerprint != full["latents_fingerprint"]:
        raise ArtifactError(f"{dit_dir} was trained on latents {full['latents_fingerprint'][:12]}, but {lat_path} is "
                            f"{lat_m.fingerprint[:12]}; pass the DiT's latents with --latents")
    want_vae, weights = _vae_of_latents(lat_m, lat_path, vae_weights)
    vae, vae_cfg, vae_m = load_flatdino(vae_dir, weights, device)
    if vae_m.fingerprint != want_vae:
        raise ArtifactError(f"the DiT's latents were made by VAE {want_vae[:12]}, but --vae {vae_dir} is "
                            f"{vae_m.fingerprint[:12]}; pass the VAE that made {lat_path}")
    rae = load_rae(decoder)
    enc_fp = check_decoder(rae, vae_m, decoder)
    pixels = PixelDecoder(rae).to(device).eval()
    mean = std = None
    if full["standardize_latents"]:
        art = open_latents(lat_path)
        mean, std = torch.from_numpy(art.mean).to(device), torch.from_numpy(art.std).to(device)
    models = {"dit": {"path": str(dit_dir), "sha256": dit_m.models["ema"]["sha256"], "fingerprint": dit_m.fingerprint,
                      "weights": "ema"},
              "vae": {"path": str(vae_dir), "fingerprint": vae_m.fingerprint, "weights": weights,
                      "sha256": vae_m.models[weights]["sha256"]},
              "decoder": {"source": str(decoder), "fingerprint": pixels.fingerprint, "encoder_fingerprint": enc_fp}}
    inputs = {"latents": {"path": str(lat_path), "fingerprint": lat_m.fingerprint}}
    return Chain(dit.to(device), vae.to(device).eval(), pixels, float(full["flow"]["kappa"]), mean, std,
                 dit.cfg.num_classes, tuple(vae_cfg.latent_shape), models, inputs)


@torch.no_grad()
def generate(chain: Chain, how: Sampling, indices: list[int], labels: torch.Tensor, device: torch.device) -> np.ndarray:
    """Global sample indices + labels (B,) -> uint8 images (B, 256, 256, 3); sample i depends only on (seed, i)."""
    from models.flow import sample, sample_noise

    noise = sample_noise(how.seed, indices, chain.latent_shape).to(device)  # (B, T, F)
    with autocast(how.precision, device):
        z = sample(chain.dit, labels.to(device), noise, steps=how.steps, sampler=how.sampler,
                   cfg_scale=how.cfg_scale, cfg_interval=tuple(how.cfg_interval), kappa=chain.kappa)
        if chain.mean is not None:
            z = (z.double() * chain.std + chain.mean).float()  # back to the VAE's latent scale
        tokens = chain.vae.decode(z).float()  # (B, N, D) raw LN-scale features
        pixels = chain.decoder(tokens).float()  # (B, 3, 256, 256) normalised
    return chain.decoder.to_uint8(pixels).cpu().numpy()
