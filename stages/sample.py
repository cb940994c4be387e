"""`flatdino sample`: class-balanced samples from a trained DiT, decoded through FlatDINO and the RAE pixel decoder.

Lineage: the official FlatDINO `eval/gfid_adm.py` (SPEC.md 7.4, 9.1): N samples per class, EMA weights, Euler 50
steps, CFG on all channels inside a guidance interval, the training kappa, latents de-standardised when the DiT was
trained on standardised latents, FlatDINO decoder -> raw LN features -> RAE decoder -> uint8, written as the ADM
evaluator's `samples.npz` (`arr_0` uint8 NHWC, `arr_1` labels).

Determinism: sample i (global index, class-major order) gets noise from a generator seeded by (seed, i) only, so the
batch size and the number of processes do not change any output. Chunks of `chunk_size` samples are the unit of
work (rank r takes chunks r::W) and of resume; the main process assembles `samples.npz` in index order by streaming
the chunks into an uncompressed npz (no full copy in memory at 50k x 256 x 256 x 3).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.config import Checked, command_from_config, config_to_dict, opt
from pipeline.grids import save_grid
from pipeline.npz import npz_bytes, rows_from_chunks, write_npz_streaming
from pipeline.sampling import Chain, Sampling, check_cfg_interval, generate, load_chain
from pipeline.manifest import content_identity, local_dirs, Manifest, OutputDir, UserError, atomic_write_bytes, file_sha256
from pipeline.runtime import Runtime, environment, get_logger, launch, progress
from pipeline.shards import plan_shards

log = get_logger(__name__)

STAGE = "sample"
SAMPLES = "samples.npz"
GRID = "grid.png"
GRID_IMAGE_SIZE = 128  # grid thumbnails (the npz keeps full resolution)


@dataclass(frozen=True)
class Config(Checked):
    dit: Path = field(metadata=opt("train-dit output directory (uses ckpt/ema.safetensors and its config.json)", runtime=True))
    vae: Path = field(metadata=opt("train-vae output directory (FlatDINO; the same one that made the DiT's latents)", runtime=True))
    decoder: str = field(metadata=opt("pixel decoder: a train-decoder output or any RAE directory / hub id", runtime=True))
    out: Path = field(metadata=opt("output directory, e.g. shards/samples/demo", runtime=True))
    per_class: int = field(default=50, metadata=opt("samples per class (ADM protocol: 50 x 1000 classes)", min=1))
    steps: int = field(default=50, metadata=opt("ODE steps", min=1))
    sampler: Literal["euler", "heun"] = field(default="euler", metadata=opt("ODE solver"))
    cfg_scale: float = field(default=1.0, metadata=opt("classifier-free guidance scale w (1 = no guidance)", min=0))
    cfg_interval: tuple[float, float] = field(default=(0.3, 1.0), metadata=opt(
        "guide only while t_min < t < t_max (t = 0 noise, t = 1 data); (0.3, 1.0) = the official ADM-export default", min=0, max=1))
    seed: int = field(default=0, metadata=opt("noise seed; sample i depends only on (seed, i)", min=0))
    vae_weights: Literal["best", "last"] | None = field(default=None, metadata=opt(
        "FlatDINO checkpoint (default: the one that made the DiT's latents; another one is refused)"))
    latents: Path | None = field(default=None, metadata=opt(
        "latents artifact the DiT was trained on (default: the path recorded in the DiT manifest)", runtime=True))
    chunk_size: int = field(default=500, metadata=opt("samples per committed chunk (the unit of resume)", min=1))
    grid_classes: int = field(default=10, metadata=opt("classes shown in grid.png (evenly spaced when more)", min=1))
    grid_columns: int = field(default=8, metadata=opt("samples per class shown in grid.png", min=1))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=opt("compute precision (eval default fp32)"))
    batch_size: int = field(default=64, metadata=opt("samples per forward pass (does not change the output)",
                                                     runtime=True, min=1))
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda ...", runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing artifact made with another config",
                                                        runtime=True))


def sampling(cfg: Config) -> Sampling:
    return Sampling(cfg.seed, cfg.steps, cfg.sampler, cfg.cfg_scale, tuple(cfg.cfg_interval), cfg.precision)


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.npz"


def write_chunk(out: Path, chain: Chain, cfg: Config, spec, labels: torch.Tensor, device, bar) -> dict:
    """Generate samples [spec.start, spec.stop) in batches, write them as one npz chunk; returns its record."""
    images = []
    for s in range(spec.start, spec.stop, cfg.batch_size):
        idx = list(range(s, min(s + cfg.batch_size, spec.stop)))
        images.append(generate(chain, sampling(cfg), idx, labels[idx], device))
        bar.update(len(idx))
    data = npz_bytes(arr_0=np.concatenate(images), arr_1=labels[spec.start : spec.stop].numpy())
    name = chunk_name(spec.index)
    atomic_write_bytes(out / name, data)
    return {"name": name, "count": len(spec), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "start": spec.start, "stop": spec.stop}


def grid_indices(num_classes: int, per_class: int, classes: int, columns: int) -> list[list[int]]:
    """Sample indices of the grid: one row per shown class (an evenly spaced subset), its first `columns` samples."""
    shown = np.unique(np.linspace(0, num_classes - 1, min(classes, num_classes)).round().astype(int))
    return [[int(c) * per_class + j for j in range(min(columns, per_class))] for c in shown]


def assemble(out: Path, records: list[dict], n: int) -> dict:
    """Stream the chunks (in index order) into samples.npz; returns its record."""
    first = np.load(out / records[0]["name"])
    shape = first["arr_0"].shape[1:]
    parts = [lambda r=r: np.load(out / r["name"]) for r in records]
    write_npz_streaming(out / SAMPLES, {"arr_0": (np.uint8, (n, *shape)), "arr_1": (np.int64, (n,))}, parts)
    return {"name": SAMPLES, "count": n, "bytes": (out / SAMPLES).stat().st_size, "sha256": file_sha256(out / SAMPLES)}


def protocol(cfg: Config, chain: Chain, n: int) -> dict:
    """The sampling protocol, copied by `fid` into metrics.json."""
    return {"sampler": cfg.sampler, "steps": cfg.steps, "cfg_scale": cfg.cfg_scale,
            "cfg_interval": list(cfg.cfg_interval), "per_class": cfg.per_class, "num_classes": chain.num_classes,
            "num_samples": n, "seed": cfg.seed, "kappa": chain.kappa, "standardized_latents": chain.mean is not None,
            "ema": True, "precision": cfg.precision, "vae_weights": chain.models["vae"]["weights"],
            "noise": "per-sample generator seeded by (seed, global index); class-major order",
            "convention": "t=0 noise, t=1 data; CFG v_u + w (v_c - v_u) on all channels while t_min < t < t_max"}


def run(cfg: Config, rt: Runtime | None = None) -> Manifest | None:
    """Generate this rank's chunks; the main process assembles samples.npz, the grid and the manifest."""
    rt, t0 = (rt or launch()).on(cfg.device, cfg.precision), time.time()
    check_cfg_interval(cfg.cfg_interval)
    if cfg.per_class <= 0 or cfg.chunk_size <= 0 or cfg.batch_size <= 0:
        raise UserError("--per-class, --chunk-size and --batch-size must be positive")
    device = rt.device
    chain = load_chain(cfg.dit, cfg.vae, cfg.decoder, device, cfg.latents, cfg.vae_weights)
    config = {**config_to_dict(cfg, semantic_only=True),
              **content_identity({"models": chain.models, "inputs": chain.inputs})}
    with OutputDir(cfg.out, STAGE, config, overwrite=cfg.overwrite, rt=rt, owns=("chunk-*.npz", SAMPLES, GRID),
                   inputs=[cfg.dit, cfg.vae, cfg.latents, *local_dirs(cfg.decoder)]) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        from models.flow import class_balanced_labels

        labels = class_balanced_labels(chain.num_classes, cfg.per_class)  # (N,)
        n = len(labels)
        plan = plan_shards(n, cfg.chunk_size, "chunk")
        committed = od.committed()
        todo = [s for s in rt.share(plan) if chunk_name(s.index) not in committed]
        bar = progress(sum(len(s) for s in todo), "sample", "img", rt)
        for spec in todo:
            od.commit(write_chunk(od.path, chain, cfg, spec, labels, device, bar))
        bar.close()
        rt.barrier()
        if not rt.is_main:
            return None
        records = od.collect([chunk_name(s.index) for s in plan])
        if records is None:
            return None
        final = assemble(od.path, records, n)
        shown = grid_indices(chain.num_classes, cfg.per_class, cfg.grid_classes, cfg.grid_columns)
        save_grid(od.path / GRID, [rows_from_chunks(od.path, records, r) for r in shown], size=GRID_IMAGE_SIZE)
        seconds = time.time() - t0
        manifest = Manifest(
            stage=STAGE, shards=[*records, final], models=chain.models, inputs=chain.inputs, versions=environment(),
            counts={"written": n, "skipped": 0, "failed": 0}, complete=True,
            fields={"arr_0": {"dtype": "uint8", "shape": [n, 256, 256, 3], "codec": "npz (ADM)"},
                    "arr_1": {"dtype": "int64", "shape": [n], "codec": "npz (ADM)"}},
            extra={**protocol(cfg, chain, n), "grid": GRID, "samples": SAMPLES},
            timings={"seconds": round(seconds, 3), "images_per_second_this_run": round(n / max(seconds, 1e-9), 3)},
        )
        return od.finish(manifest)


def _summary(m: Manifest) -> str:
    e = m.extra
    return (f"sample: {e['num_samples']} samples ({e['per_class']}/class, {e['sampler']} {e['steps']} steps, "
            f"cfg {e['cfg_scale']} in {tuple(e['cfg_interval'])}) -> {SAMPLES}, {GRID}")


cli = command_from_config(Config, run, "sample", __doc__.split("\n\n")[0], summary=_summary)
