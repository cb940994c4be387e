"""`flatdino latents`: FlatDINO posterior means for every sample and view, in `latents.zarr`, plus exact statistics.

Rows are ordered (sample, view) over one split of a features artifact. The plan is a pure function of the number of
samples: shard k covers samples [k*S, (k+1)*S), i.e. rows [k*S*V, (k+1)*S*V), which is exactly one zarr chunk along
N, so concurrent writers never share a chunk and the bytes do not depend on the number of processes. A shard counts
as written only once its record (`latents-<k>.record.json`, with the sha256 of its rows) is committed. When every
shard is in, the main process computes the per-(token, channel) mean and population std over all rows in float64, in
chunk order (two passes), with std floored at `std_eps` (the official `compute_stats.py` has no epsilon; SPEC 12.5).

Lineage: official `compute_stats.py` (Welford in float64 over ImageNet-train mu). Departures: stats come from the same
pass that stores the latents (ADM centre crop and its flip, as stored by `flatdino features`, bicubic-AA to 224)
rather than a separate cv2-bilinear pass without flips, so they describe exactly the rows the generator trains on.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.config import Checked, command_from_config, config_to_dict, opt
from pipeline.latents_store import STORE, create_latents, finalize_stats, write_rows
from pipeline.manifest import ArtifactError, Manifest, OutputDir, atomic_write_json
from pipeline.artifacts import load_flatdino
from pipeline.runtime import Runtime, autocast, environment, get_logger, launch, progress
from pipeline.shards import FeatureShards, ShardSpec, plan_shards

log = get_logger(__name__)

RECORD = ".record.json"


@dataclass(frozen=True)
class Config(Checked):
    features: Path = field(metadata=opt("features artifact (flatdino features --out)", runtime=True))
    vae: Path = field(metadata=opt("FlatDINO run directory (flatdino train-vae --out)", runtime=True))
    out: Path = field(metadata=opt("output directory; latents go to <out>/latents.zarr", runtime=True))
    weights: Literal["best", "last"] = field(default="best", metadata=opt(
        "which checkpoint: best validation loss (what the official downstream scripts restore) or last"))
    split: str = field(default="train", metadata=opt("split of the features artifact to encode"))
    shard_samples: int = field(default=512, metadata=opt("samples per shard = one zarr chunk of samples x views rows", min=1))
    batch_size: int = field(default=64, metadata=opt("samples per encoder forward", min=1))
    std_eps: float = field(default=1e-6, metadata=opt("floor on the stored std (normalising divides by it)", min=0, min_open=True))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=opt("encoder compute precision"))
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda ... (ignored under accelerate)", runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing artifact made with another config",
                                                        runtime=True))


def check_compatible(feats: FeatureShards, vae_manifest: Manifest, vae_cfg, features: Path, vae: Path) -> None:
    """Refuse features from another encoder (or of another shape) than the VAE was trained on."""
    want, have = vae_manifest.extra["encoder"]["fingerprint"], feats.encoder_fingerprint
    if want != have:
        raise ArtifactError(f"{features} was made by encoder {have[:12]}, but the VAE in {vae} was trained on "
                            f"features of encoder {want[:12]}; encode the images with that encoder (flatdino "
                            "features --encoder ...) or train a VAE on these features")
    if (feats.num_patches, feats.dim) != (vae_cfg.num_patches, vae_cfg.feature_dim):
        raise ArtifactError(f"{features} holds ({feats.num_patches}, {feats.dim}) features, the VAE expects "
                            f"({vae_cfg.num_patches}, {vae_cfg.feature_dim})")


@torch.no_grad()
def encode_mu(model, feats: np.ndarray, device: torch.device, precision: str) -> np.ndarray:
    """(b, V, N, D) float16 features -> (b * V, T, F) float32 posterior means, rows in (sample, view) order."""
    tokens = torch.from_numpy(feats).float().flatten(0, 1).to(device)  # (b*V, N, D)
    with autocast(precision, device):
        mu = model.latents(tokens)  # posterior means (tanh(mu) for -tanh models)
    return mu.float().cpu().numpy()


def encode_shard(model, feats: FeatureShards, cfg: Config, shard: ShardSpec, device, precision) -> dict[str, np.ndarray]:
    """All rows of one shard: mu, label, sample, view, key."""
    mus, labels, keys = [], [], []
    items = list(feats.iter(cfg.split, shard.start, shard.stop))
    for b in range(0, len(items), cfg.batch_size):
        batch = items[b : b + cfg.batch_size]
        mus.append(encode_mu(model, np.stack([f for _, _, _, f in batch]), device, precision))
        labels += [c for _, _, c, _ in batch]
        keys += [k for _, k, _, _ in batch]
    v = feats.views
    mu = np.concatenate(mus)
    bad = np.flatnonzero(~np.isfinite(mu).reshape(len(mu), -1).all(axis=1))
    if len(bad):  # non-finite values never enter the artifact
        key = keys[bad[0] // v]
        idx, _ = feats.locate(cfg.split, shard.start + bad[0] // v)
        raise ArtifactError(f"the VAE gives non-finite latents for sample {key} (view {bad[0] % v}) of features shard "
                            f"{idx.path.name}, {len(bad)} row(s) in this latents shard; its features passed their "
                            f"checksums, so the VAE itself is broken (a diverged checkpoint?): check {cfg.vae} or "
                            f"use --weights best/last; nothing of this shard was written")
    samples = np.arange(shard.start, shard.stop)
    return {"mu": mu, "label": np.repeat(labels, v), "sample": np.repeat(samples, v),
            "view": np.tile(np.arange(v), len(samples)), "key": np.repeat(np.asarray(keys, dtype=str), v)}


def committed(out: Path) -> dict[str, dict]:
    """Shard records already committed (`latents-<k>.record.json` next to the store)."""
    return {p.name[: -len(RECORD)]: json.loads(p.read_text()) for p in sorted(out.glob("latents-*" + RECORD))}


def write_shard(out: Path, shard: ShardSpec, views: int, rows: dict[str, np.ndarray]) -> dict:
    """Write one shard's rows (whole chunks) into the store, then commit its record."""
    start = shard.start * views
    write_rows(out / STORE, start, rows["mu"], rows["label"], rows["sample"], rows["view"], rows["key"])
    name = f"latents-{shard.index:06d}"
    mu = np.ascontiguousarray(rows["mu"], dtype=np.float32)
    record = {"name": name, "rows": [start, start + len(mu)], "count": len(mu),
              "sha256": hashlib.sha256(mu.tobytes() + rows["label"].astype(np.int64).tobytes()).hexdigest(),
              "first_key": str(rows["key"][0]), "last_key": str(rows["key"][-1])}
    atomic_write_json(out / (name + RECORD), record)
    return record


def run(cfg: Config, rt: Runtime | None = None) -> Manifest | None:
    """Encode this rank's shards; the main process finishes the statistics and the manifest when all are in."""
    rt, t0 = (rt or launch()).on(cfg.device, cfg.precision), time.time()
    feats = FeatureShards(cfg.features)
    device = rt.device
    model, vae_cfg, vae_m = load_flatdino(cfg.vae, cfg.weights, device)
    check_compatible(feats, vae_m, vae_cfg, cfg.features, cfg.vae)
    n, v = feats.num_samples(cfg.split), feats.views
    plan = plan_shards(n, cfg.shard_samples, "latents")
    config = {**config_to_dict(cfg, semantic_only=True), "features_fingerprint": feats.manifest.fingerprint,
              "vae_fingerprint": vae_m.fingerprint}
    with OutputDir(cfg.out, "latents", config, overwrite=cfg.overwrite, rt=rt, owns=(STORE, STORE + ".tmp"),
                   inputs=[cfg.features, cfg.vae]) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        attrs = {"latent_shape": list(vae_cfg.latent_shape), "vae": vae_m.fingerprint,
                 "features": feats.manifest.fingerprint, "views": v, "split": cfg.split}
        if rt.is_main:
            create_latents(od.path / STORE, n * v, *vae_cfg.latent_shape, cfg.shard_samples * v, attrs)
        rt.barrier()
        done = committed(od.path)
        todo = [s for s in rt.share(plan) if f"latents-{s.index:06d}" not in done]
        bar = progress(sum(len(s) for s in todo), "latents", "sample", rt)
        for shard in todo:
            write_shard(od.path, shard, v, encode_shard(model, feats, cfg, shard, device, rt.precision))
            bar.update(len(shard))
        bar.close()
        rt.barrier()
        if not rt.is_main:
            return None
        return _finish(od, cfg, feats, vae_m, vae_cfg, plan, time.time() - t0)


def _finish(od: OutputDir, cfg: Config, feats: FeatureShards, vae_m: Manifest, vae_cfg, plan, seconds):
    done = committed(od.path)
    missing = [s.index for s in plan if f"latents-{s.index:06d}" not in done]
    if missing:
        log.info("%d shards still missing (other ranks); run again to finish", len(missing))
        return None
    mean, std = finalize_stats(od.path / STORE, cfg.std_eps)
    shards = [done[f"latents-{s.index:06d}"] for s in plan]
    rows = sum(s["count"] for s in shards)
    manifest = Manifest(
        stage="latents", shards=shards, versions=environment(), complete=True,
        counts={"written": rows, "skipped": 0, "failed": 0},
        inputs={"features": {"path": str(cfg.features), "fingerprint": feats.manifest.fingerprint},
                "vae": {"path": str(cfg.vae), "fingerprint": vae_m.fingerprint, "weights": cfg.weights}},
        models={"vae": {"path": f"{cfg.vae}/{cfg.weights}/model.safetensors",
                        "sha256": vae_m.models[cfg.weights]["sha256"]}},
        fields={"mu": {"dtype": "float32", "shape": [rows, *vae_cfg.latent_shape], "codec": "zarr"},
                "mean": {"dtype": "float64", "shape": list(vae_cfg.latent_shape), "codec": "zarr"},
                "std": {"dtype": "float64", "shape": list(vae_cfg.latent_shape), "codec": "zarr"}},
        extra={"classes": feats.manifest.extra["classes"], "latent_shape": list(vae_cfg.latent_shape),
               "views": feats.views, "num_samples": feats.num_samples(cfg.split), "rows": rows, "split": cfg.split,
               "std_eps": cfg.std_eps, "encoder": vae_m.extra["encoder"],
               "stats_summary": {"mean_abs_mean": float(np.abs(mean).mean()), "mean_std": float(std.mean()),
                                 "min_std": float(std.min()), "max_std": float(std.max())}},
        timings={"seconds": round(seconds, 3), "rows_per_second": round(rows / max(seconds, 1e-9), 2)},
    )
    return od.finish(manifest)


def _summary(m: Manifest) -> str:
    s = m.extra["stats_summary"]
    return (f"latents: {m.extra['rows']} rows of {tuple(m.extra['latent_shape'])}; per-dim std mean {s['mean_std']:.4g} "
            f"(min {s['min_std']:.3g}, max {s['max_std']:.3g}), |mean| {s['mean_abs_mean']:.3g}")


cli = command_from_config(Config, run, "latents", __doc__.split("\n\n")[0], summary=_summary)
