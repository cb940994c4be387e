"""`flatdino reconstruct`: images -> DINOv2 features -> FlatDINO (mu) -> pixel decoder, next to the originals.

Lineage: the official FlatDINO `eval/rfid_adm.py` (SPEC.md 9.2): ADM centre crop, posterior mean (`use_mean=True`),
FlatDINO decoder, frozen RAE decoder, uint8; rFID compares the reconstructions with the same images. Also written:
the direct features -> pixel decoder path (the RAE upper bound, what FlatDINO cannot beat).

Outputs (ADM npz format, `arr_0` uint8 NHWC, `arr_1` labels, row i = the i-th stored sample of the split):
`originals.npz`, `rae.npz`, `flatdino.npz`, and `grid.png` (rows: original / RAE / FlatDINO). Uses view 0 (the ADM
centre crop) of the features artifact. Work is split in chunks (rank r takes chunks r::W), committed one by one.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.encoder import FeatureEncoder, PixelDecoder, load_rae
from pipeline.config import Checked, command_from_config, config_to_dict, opt
from pipeline.grids import save_grid
from pipeline.manifest import content_identity, local_dirs, ArtifactError, Manifest, OutputDir, UserError, atomic_write_bytes, file_sha256
from pipeline.runtime import Runtime, autocast, environment, get_logger, launch, progress
from pipeline.shards import FeatureShards, ImageShards, plan_shards
from pipeline.npz import npz_bytes, rows_from_chunks, write_npz_streaming
from pipeline.shards import PairData
from pipeline.image_metrics import psnr

log = get_logger(__name__)

STAGE = "reconstruct"
OUTPUTS = ("originals", "rae", "flatdino")
GRID = "grid.png"
OWNS = ("chunk-*.npz", *(f"{k}.npz" for k in OUTPUTS), GRID)  # what this stage writes (--overwrite deletes only these)


@dataclass(frozen=True)
class Config(Checked):
    images: Path = field(metadata=opt("images artifact (flatdino images --out)", runtime=True))
    features: Path = field(metadata=opt("features artifact of those images (flatdino features --out)", runtime=True))
    vae: Path = field(metadata=opt("train-vae output directory (FlatDINO)", runtime=True))
    decoder: str = field(metadata=opt("pixel decoder: a train-decoder output or any RAE directory / hub id", runtime=True))
    out: Path = field(metadata=opt("output directory, e.g. shards/reconstruct/demo", runtime=True))
    split: str = field(default="val", metadata=opt("split to reconstruct (rFID protocol: all 50k ImageNet val)"))
    limit: int = field(default=0, metadata=opt("reconstruct only the first N stored samples (0 = all)", min=0))
    vae_weights: Literal["best", "last"] = field(default="best", metadata=opt("which FlatDINO checkpoint"))
    chunk_size: int = field(default=500, metadata=opt("images per committed chunk (the unit of resume)", min=1))
    grid_samples: int = field(default=8, metadata=opt("images shown in grid.png", min=1))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=opt("compute precision (rFID: fp32)"))
    batch_size: int = field(default=64, metadata=opt("images per forward pass", runtime=True, min=1))
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda ...", runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing artifact made with another config",
                                                        runtime=True))


def load_models(cfg: Config, images: ImageShards, features: FeatureShards, device: torch.device):
    """FlatDINO + pixel decoder, refused unless images, features, VAE and decoder belong together."""
    from pipeline.artifacts import load_flatdino

    made_from = features.manifest.inputs["images"]["fingerprint"]
    if made_from != images.manifest.fingerprint:
        raise ArtifactError(f"{cfg.features} was made from images {made_from[:12]}, not from {cfg.images} "
                            f"({images.manifest.fingerprint[:12]}); pass the matching --images")
    vae, _, vae_m = load_flatdino(cfg.vae, cfg.vae_weights, device)
    feat_fp, vae_fp = features.encoder_fingerprint, vae_m.extra["encoder"]["fingerprint"]
    if vae_fp != feat_fp:
        raise ArtifactError(f"--vae {cfg.vae} was trained on features of encoder {vae_fp[:12]}, but {cfg.features} "
                            f"comes from encoder {feat_fp[:12]}; pass matching artifacts")
    rae = load_rae(cfg.decoder)
    dec_fp = FeatureEncoder(rae).fingerprint
    if dec_fp != feat_fp:
        raise ArtifactError(f"--decoder {cfg.decoder} belongs to encoder {dec_fp[:12]}, but {cfg.features} comes from "
                            f"encoder {feat_fp[:12]}; train a decoder for that encoder or pass the matching one")
    decoder = PixelDecoder(rae).to(device).eval()
    models = {"vae": {"path": str(cfg.vae), "fingerprint": vae_m.fingerprint, "weights": cfg.vae_weights},
              "decoder": {"source": str(cfg.decoder), "fingerprint": decoder.fingerprint,
                          "encoder_fingerprint": dec_fp}}
    return vae.to(device).eval(), decoder, models


@torch.no_grad()
def reconstruct(vae, decoder: PixelDecoder, tokens: torch.Tensor, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (B, N, D) -> (RAE uint8 (B, 256, 256, 3), FlatDINO-mu uint8 (B, 256, 256, 3))."""
    device = decoder.mean.device
    tokens = tokens.to(device)
    with autocast(precision, device):
        direct = decoder(tokens).float()  # (B, 3, 256, 256)
        via = decoder(vae.decode(vae.latents(tokens)).float()).float()  # mu, not a sample (SPEC 9.2)
    return decoder.to_uint8(direct).cpu().numpy(), decoder.to_uint8(via).cpu().numpy()


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.npz"


def write_chunk(out: Path, vae, decoder: PixelDecoder, data: PairData, cfg: Config, spec, bar) -> dict:
    """Reconstruct stored samples [spec.start, spec.stop) of the split into one npz chunk; returns its record."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*OUTPUTS, "labels")}
    for s in range(spec.start, spec.stop, cfg.batch_size):
        idx = list(range(s, min(s + cfg.batch_size, spec.stop)))
        tokens, crops = data.rows([i * data.views for i in idx])  # view 0 = ADM centre crop
        rae, flat = reconstruct(vae, decoder, tokens, cfg.precision)
        parts["originals"].append(crops.permute(0, 2, 3, 1).numpy())
        parts["rae"].append(rae)
        parts["flatdino"].append(flat)
        parts["labels"].append(np.array([data.features.get(i, data.split)[1] for i in idx], np.int64))
        bar.update(len(idx))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    blob = npz_bytes(**arrays)
    atomic_write_bytes(out / chunk_name(spec.index), blob)
    orig = torch.from_numpy(arrays["originals"])
    sums = {f"psnr_{k}_sum": float(psnr(torch.from_numpy(arrays[k]), orig).sum()) for k in ("rae", "flatdino")}
    return {"name": chunk_name(spec.index), "count": len(spec), "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(), "start": spec.start, "stop": spec.stop, **sums}


def assemble(out: Path, records: list[dict], n: int) -> list[dict]:
    """Stream the chunks into originals.npz, rae.npz and flatdino.npz (ADM format); returns their records."""
    written = []
    for name in OUTPUTS:
        parts = [lambda r=r, k=name: _chunk_arrays(out / r["name"], k) for r in records]
        path = out / f"{name}.npz"
        write_npz_streaming(path, {"arr_0": (np.uint8, (n, 256, 256, 3)), "arr_1": (np.int64, (n,))}, parts)
        written.append({"name": path.name, "count": n, "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    return written


def _chunk_arrays(path: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {"arr_0": z[name], "arr_1": z["labels"]}


def run(cfg: Config, rt: Runtime | None = None) -> Manifest | None:
    """Reconstruct this rank's chunks; the main process assembles the npz files, the grid and the manifest."""
    rt, t0 = (rt or launch()).on(cfg.device, cfg.precision), time.time()
    if cfg.limit < 0 or cfg.chunk_size <= 0 or cfg.batch_size <= 0:
        raise UserError("--limit must be >= 0, --chunk-size and --batch-size positive")
    images, features = ImageShards(cfg.images), FeatureShards(cfg.features)
    device = rt.device
    vae, decoder, models = load_models(cfg, images, features, device)
    inputs = {"images": {"path": str(cfg.images), "fingerprint": images.manifest.fingerprint},
              "features": {"path": str(cfg.features), "fingerprint": features.manifest.fingerprint}}
    config = {**config_to_dict(cfg, semantic_only=True), **content_identity({"models": models, "inputs": inputs})}
    with OutputDir(cfg.out, STAGE, config, overwrite=cfg.overwrite, rt=rt, owns=OWNS,
                   inputs=[cfg.images, cfg.features, cfg.vae, *local_dirs(cfg.decoder)]) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        total = features.num_samples(cfg.split)
        n = min(cfg.limit, total) if cfg.limit else total
        if n == 0:
            raise ArtifactError(f"{cfg.features}: split {cfg.split!r} holds no samples")
        data = PairData(images, features, cfg.split, cache_bytes=0)
        plan = plan_shards(n, cfg.chunk_size, "chunk")
        committed = od.committed()
        todo = [s for s in rt.share(plan) if chunk_name(s.index) not in committed]
        bar = progress(sum(len(s) for s in todo), "reconstruct", "img", rt)
        for spec in todo:
            od.commit(write_chunk(od.path, vae, decoder, data, cfg, spec, bar))
        bar.close()
        rt.barrier()
        if not rt.is_main:
            return None
        records = od.collect([chunk_name(s.index) for s in plan])
        if records is None:
            return None
        outputs = assemble(od.path, records, n)
        shown = list(range(min(cfg.grid_samples, n)))
        save_grid(od.path / GRID, [rows_from_chunks(od.path, records, shown, k) for k in OUTPUTS], size=128)
        metrics = {f"psnr_{k}": sum(r[f"psnr_{k}_sum"] for r in records) / n for k in ("rae", "flatdino")}
        log.info("PSNR vs originals: RAE %.2f dB, FlatDINO %.2f dB (%d images)", metrics["psnr_rae"],
                 metrics["psnr_flatdino"], n)
        return od.finish(Manifest(
            stage=STAGE, shards=[*records, *outputs], models=models, inputs=inputs, versions=environment(),
            counts={"written": n, "skipped": 0, "failed": 0}, complete=True,
            fields={f"{k}.npz": {"dtype": "uint8", "shape": [n, 256, 256, 3], "codec": "npz (ADM)"} for k in OUTPUTS},
            extra={"split": cfg.split, "num_images": n, "view": 0, "latent": "posterior mean (mu)", **metrics,
                   "outputs": [f"{k}.npz" for k in OUTPUTS], "grid": GRID},
            timings={"seconds": round(time.time() - t0, 3)}))


def _summary(m: Manifest) -> str:
    e = m.extra
    return (f"reconstruct: {e['num_images']} {e['split']} images; PSNR vs originals: RAE {e['psnr_rae']:.2f} dB, "
            f"FlatDINO {e['psnr_flatdino']:.2f} dB -> {', '.join(e['outputs'])}, {GRID}")


cli = command_from_config(Config, run, "reconstruct", __doc__.split("\n\n")[0], summary=_summary)
