"""In-training evaluation of the generator: FD-DINOv2 (and FID when Inception weights are present) of K class-balanced
EMA samples against a `fid-ref` artifact, as the official generator training keeps its best-by-gFID checkpoint.

Samples are made by `pipeline.sampling.generate` (sample i depends only on (seed, i)), each process generates its
share of the K indices, and features are gathered in index order by a sum of zero-padded (K, D) tables (adding
zeros is exact), so every process computes the same statistics, bit for bit, whatever the world size. The numbers
are a monitor, not the protocol of `flatdino fid` (K samples, the fid-ref split); the name of every metric says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from models.encoder import FeatureEncoder, PixelDecoder, load_rae
from pipeline import metrics
from pipeline.manifest import ArtifactError, UserError, file_sha256, require_complete

REFERENCE = "reference.npz"
METRICS = ("fd_dinov2", "fid")  # what --eval-metric may choose


class EvalSetup(NamedTuple):
    ref_fingerprint: str
    encoder: FeatureEncoder
    inception: torch.nn.Module | None
    inception_info: dict
    stats: dict  # space -> GaussianStats of the reference


def open_eval(ref_dir: Path, rae_dir: Path, inception_weights: Path | None, device: torch.device) -> EvalSetup:
    """The fid-ref's statistics, the DINOv2 encoder they were made with, and Inception when its weights are here."""
    m = require_complete(ref_dir, "fid_ref")
    encoder = FeatureEncoder(load_rae(rae_dir)).to(device).eval()
    want = m.extra["encoder"].get("fingerprint")
    if want != encoder.fingerprint:
        raise ArtifactError(f"--eval-ref {ref_dir} holds DINOv2 statistics of encoder {str(want)[:12]}, but --rae "
                            f"{rae_dir} belongs to encoder {encoder.fingerprint[:12]}; make the fid-ref with --encoder "
                            f"{rae_dir} (the encoder the VAE was trained on)")
    with np.load(ref_dir / REFERENCE, allow_pickle=False) as z:
        stats = {s: metrics.GaussianStats(z[f"{s}.mu"], z[f"{s}.sigma"]) for s in m.extra["spaces"]}
    inception, info = None, {"available": False, "reason": "the fid-ref has no Inception statistics"}
    if "pool" in stats:
        try:
            weights = metrics.resolve_inception_weights(inception_weights, download=False)
            inception = metrics.load_inception(weights, device)
            info = {"available": True, "sha256": file_sha256(weights)}
            if m.extra["inception"].get("sha256") not in (None, info["sha256"]):
                raise UserError(f"--eval-ref {ref_dir} was made with other Inception weights than {weights}")
        except metrics.MetricUnavailable as e:
            info = {"available": False, "reason": str(e)}
    return EvalSetup(m.fingerprint, encoder, inception, info, stats)


def _gather(local: dict[int, np.ndarray], k: int, dim: int, rt) -> np.ndarray:
    """Rows of every process in index order: a (K, D) float64 table that each process fills with its own rows and
    zeros elsewhere, summed over processes (exact: x + 0 = x)."""
    table = torch.zeros(k, dim, dtype=torch.float64, device=rt.device)
    for i, row in local.items():
        table[i] = torch.from_numpy(row).to(rt.device, torch.float64)
    return rt.all_reduce_sum_(table).cpu().numpy()


@torch.no_grad()
def evaluate(setup: EvalSetup, chain, how, num_samples: int, num_classes: int, rt, batch_size: int = 32) -> dict:
    """{"fd_dinov2": ..., "fid": ... or absent} of `num_samples` class-balanced samples of `chain` (its EMA DiT)."""
    from models.flow import class_balanced_labels
    from pipeline.sampling import generate

    per_class = max(1, num_samples // num_classes)
    labels = class_balanced_labels(num_classes, per_class)
    k = len(labels)
    mine = [i for b in range(rt.rank * batch_size, k, rt.world * batch_size) for i in range(b, min(b + batch_size, k))]
    cls_rows, pool_rows = {}, {}
    for s in range(0, len(mine), batch_size):
        idx = mine[s : s + batch_size]
        images = generate(chain, how, idx, labels[idx], rt.device)  # (b, 256, 256, 3) uint8
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(rt.device)
        cls = setup.encoder.encode_images(x).cls.double().cpu().numpy()
        cls_rows.update(zip(idx, cls))
        if setup.inception is not None:
            pool_rows.update(zip(idx, metrics.inception_features(setup.inception, images, batch_size).pool))
    dino = _gather(cls_rows, k, setup.encoder.dim, rt)
    out = {"fd_dinov2": metrics.frechet_from_stats(metrics.feature_stats(dino), setup.stats["dino_cls"]), "samples": k}
    if setup.inception is not None:
        out["fid"] = metrics.frechet_from_stats(metrics.feature_stats(_gather(pool_rows, k, 2048, rt)),
                                                setup.stats["pool"])
    return out


def decoders(vae_dir: Path, rae_dir: Path, device: torch.device):
    """(FlatDINO, its config, PixelDecoder) for decoding samples; refused unless the pixel decoder belongs to the
    encoder the VAE was trained on."""
    from pipeline.artifacts import load_flatdino
    from pipeline.sampling import check_decoder

    vae, vae_cfg, vae_m = load_flatdino(vae_dir, "best", device)
    rae = load_rae(rae_dir)
    check_decoder(rae, vae_m, str(rae_dir))
    return vae.eval(), vae_cfg, PixelDecoder(rae).to(device).eval()


def live_chain(trainer, vae_dir: Path, rae_dir: Path, kappa: float, mean, std, num_classes: int):
    """A sampling Chain around a trainer's live EMA model (loaded once, kept on the trainer)."""
    from pipeline.sampling import Chain

    if getattr(trainer, "_chain", None) is None:
        device = trainer.rt.device
        vae, vae_cfg, pixels = decoders(vae_dir, rae_dir, device)
        stats = (mean.to(device), std.to(device)) if mean is not None else (None, None)
        trainer._chain = Chain(trainer.ema, vae, pixels, kappa, *stats, num_classes, tuple(vae_cfg.latent_shape),
                               {}, {})
    return trainer._chain


def grid_event(trainer, chain, out: Path, seed: int, every: int, num_classes: int):
    """Every `every` steps (main process): 8 classes x 4 EMA samples through the decoders, a PNG under `out` and an
    image in the trackers."""
    from models.flow import class_balanced_labels
    from PIL import Image

    from pipeline.grids import save_grid
    from pipeline.sampling import Sampling, generate
    from pipeline.train import Event

    def fn(step: int) -> None:
        if not trainer.rt.is_main:
            return None
        classes, per = min(8, num_classes), 4
        labels = class_balanced_labels(classes, per)
        images = generate(chain(), Sampling(seed=seed), list(range(len(labels))), labels, trainer.rt.device)
        path = save_grid(out / f"step-{step:09d}.png", [images[c * per : (c + 1) * per] for c in range(classes)])
        trainer.log_image("samples", np.asarray(Image.open(path)), step)
        return None

    return Event("samples", every, fn)
