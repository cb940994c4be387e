"""`flatdino sample`: class-balanced samples from a trained DiT, decoded through FlatDINO and the RAE pixel decoder.

Lineage: the official FlatDINO `eval/gfid_adm.py` (SPEC.md 7.4, 9.1): N samples per class, EMA weights, Euler 50
steps, CFG on all channels inside a guidance interval, the training kappa, latents de-normalised when the DiT was
trained on normalised latents, FlatDINO decoder -> raw LN features -> RAE decoder -> uint8, written as the ADM
evaluator's `samples.npz` (`arr_0` uint8 NHWC, `arr_1` labels).

Determinism: sample i (global index, class-major order) gets noise from a generator seeded by (seed, i) only, so the
batch size and the number of processes do not change any output. Chunks of `chunk_size` samples are the unit of
work (rank r takes chunks r::W) and of resume; the main process assembles `samples.npz` in index order by streaming
the chunks into an uncompressed npz (no full copy in memory at 50k x 256 x 256 x 3).
"""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch

from models.encoder import FeatureEncoder, PixelDecoder, load_rae
from pipeline.config import command_from_config, config_to_dict, opt
from pipeline.grids import save_grid
from pipeline.latents_store import open_latents
from pipeline.manifest import ArtifactError, Manifest, OutputDir, UserError, atomic_write_bytes, atomic_write_with, \
    file_sha256, require_complete
from pipeline.runtime import (Dist, autocast, barrier, current_dist, environment, get_logger, progress,
                              stage_device)
from pipeline.shards import for_rank, plan_shards

log = get_logger(__name__)

STAGE = "sample"
SAMPLES = "samples.npz"
GRID = "grid.png"
GRID_IMAGE_SIZE = 128  # grid thumbnails (the npz keeps full resolution)


@dataclass(frozen=True)
class Config:
    dit: Path = field(metadata=opt("train-dit output directory (uses ckpt/ema.safetensors and its config.json)"))
    vae: Path = field(metadata=opt("train-vae output directory (FlatDINO; the same one that made the DiT's latents)"))
    decoder: str = field(metadata=opt("pixel decoder: a train-decoder output or any RAE directory / hub id"))
    out: Path = field(metadata=opt("output directory, e.g. shards/samples/demo"))
    per_class: int = field(default=50, metadata=opt("samples per class (ADM protocol: 50 x 1000 classes)"))
    steps: int = field(default=50, metadata=opt("ODE steps"))
    sampler: Literal["euler", "heun"] = field(default="euler", metadata=opt("ODE solver"))
    cfg_scale: float = field(default=1.0, metadata=opt("classifier-free guidance scale w (1 = no guidance)"))
    cfg_interval: tuple[float, float] = field(default=(0.3, 1.0), metadata=opt(
        "guide only while t_min < t < t_max (t = 0 noise, t = 1 data); (0.3, 1.0) = the official ADM-export default"))
    seed: int = field(default=0, metadata=opt("noise seed; sample i depends only on (seed, i)"))
    vae_weights: Literal["best", "last"] | None = field(default=None, metadata=opt(
        "FlatDINO checkpoint (default: the one that made the DiT's latents; another one is refused)"))
    latents: Path | None = field(default=None, metadata=opt(
        "latents artifact the DiT was trained on (default: the path recorded in the DiT manifest)"))
    chunk_size: int = field(default=500, metadata=opt("samples per committed chunk (the unit of resume)"))
    grid_classes: int = field(default=10, metadata=opt("classes shown in grid.png (evenly spaced when more)"))
    grid_columns: int = field(default=8, metadata=opt("samples per class shown in grid.png"))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=opt("compute precision (eval default fp32)"))
    batch_size: int = field(default=64, metadata=opt("samples per forward pass (does not change the output)",
                                                     runtime=True))
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda ...", runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing artifact made with another config",
                                                        runtime=True))


class Chain(NamedTuple):
    """The three networks and the facts that tie them together."""

    dit: torch.nn.Module
    vae: torch.nn.Module
    decoder: PixelDecoder
    kappa: float
    mean: torch.Tensor | None  # (T, F) latent mean, when the DiT was trained normalised
    std: torch.Tensor | None
    num_classes: int
    latent_shape: tuple[int, int]
    models: dict  # name -> fingerprints/sha256, for the manifest
    inputs: dict


# ------------------------------------------------------------------------------------------------ npz (ADM format)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An uncompressed .npz in memory (np.savez layout)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_npz_streaming(path: Path, names_shapes: dict[str, tuple[np.dtype, tuple]],
                        parts: list[Callable[[], dict[str, np.ndarray]]]) -> None:
    """Write an uncompressed npz whose arrays are the concatenation (axis 0) of `parts`, one part in memory at a time.

    `names_shapes` gives each array's dtype and final shape (written in the .npy header up front); each part is a
    callable returning a mapping name -> rows (called once per array). Written to a temporary file, fsynced and
    renamed. Readable by np.load and by the ADM evaluator's streaming reader.
    """
    atomic_write_with(path, lambda tmp: _write_npz_members(tmp, names_shapes, parts))


def _write_npz_members(tmp: Path, names_shapes: dict, parts: list) -> None:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, (dtype, shape) in names_shapes.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                        "shape": tuple(shape)})
                written = 0
                for part in parts:
                    arr = np.ascontiguousarray(part()[name], dtype=dtype)
                    f.write(arr.tobytes())
                    written += len(arr)
                if written != shape[0]:
                    raise ValueError(f"{name}: parts hold {written} rows, header says {shape[0]}")


# ------------------------------------------------------------------------------------------ loading and checking


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


def load_chain(cfg: Config, device: torch.device) -> Chain:
    """Load DiT (EMA), FlatDINO and pixel decoder; refuse them unless they belong together (fingerprints)."""
    from models.dit import load_dit
    from stages.train_vae import load_flatdino

    dit_m = require_complete(cfg.dit, "train_dit")
    dit, full = load_dit(cfg.dit, ema=True, device=device)
    lat_path = cfg.latents or Path(dit_m.inputs["latents"]["path"])
    lat_m = require_complete(lat_path, "latents")
    if lat_m.fingerprint != full["latents_fingerprint"]:
        raise ArtifactError(f"{cfg.dit} was trained on latents {full['latents_fingerprint'][:12]}, but {lat_path} is "
                            f"{lat_m.fingerprint[:12]}; pass the DiT's latents with --latents")
    want_vae, weights = _vae_of_latents(lat_m, lat_path, cfg.vae_weights)
    vae, vae_cfg, vae_m = load_flatdino(cfg.vae, weights, device)
    if vae_m.fingerprint != want_vae:
        raise ArtifactError(f"the DiT's latents were made by VAE {want_vae[:12]}, but --vae {cfg.vae} is "
                            f"{vae_m.fingerprint[:12]}; pass the VAE that made {lat_path}")
    rae = load_rae(cfg.decoder)
    enc_fp, want_enc = FeatureEncoder(rae).fingerprint, vae_m.extra["encoder"]["fingerprint"]
    if enc_fp != want_enc:
        raise ArtifactError(f"the VAE was trained on features of encoder {want_enc[:12]}, but --decoder {cfg.decoder} "
                            f"belongs to encoder {enc_fp[:12]}; train a decoder for that encoder (flatdino "
                            f"train-decoder --encoder ...) or pass the matching one")
    decoder = PixelDecoder(rae).to(device).eval()
    mean = std = None
    if full["normalise"]:
        art = open_latents(lat_path)
        mean, std = torch.from_numpy(art.mean).to(device), torch.from_numpy(art.std).to(device)
    models = {"dit": {"path": str(cfg.dit), "sha256": dit_m.models["ema"]["sha256"], "fingerprint": dit_m.fingerprint,
                      "weights": "ema"},
              "vae": {"path": str(cfg.vae), "fingerprint": vae_m.fingerprint, "weights": weights,
                      "sha256": vae_m.models[weights]["sha256"]},
              "decoder": {"source": str(cfg.decoder), "fingerprint": decoder.fingerprint,
                          "encoder_fingerprint": enc_fp}}
    inputs = {"latents": {"path": str(lat_path), "fingerprint": lat_m.fingerprint}}
    return Chain(dit.to(device), vae.to(device).eval(), decoder, float(full["flow"]["kappa"]), mean, std,
                 dit.cfg.num_classes, tuple(vae_cfg.latent_shape), models, inputs)


# ------------------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(chain: Chain, cfg: Config, indices: list[int], labels: torch.Tensor, device: torch.device) -> np.ndarray:
    """Global sample indices + labels (B,) -> uint8 images (B, 256, 256, 3)."""
    from models.flow import sample, sample_noise

    noise = sample_noise(cfg.seed, indices, chain.latent_shape).to(device)  # (B, T, F)
    with autocast(cfg.precision, device):
        z = sample(chain.dit, labels.to(device), noise, steps=cfg.steps, sampler=cfg.sampler,
                   cfg_scale=cfg.cfg_scale, cfg_interval=tuple(cfg.cfg_interval), kappa=chain.kappa)
        if chain.mean is not None:
            z = (z.double() * chain.std + chain.mean).float()  # back to the VAE's latent scale
        tokens = chain.vae.decode(z).float()  # (B, N, D) raw LN-scale features
        pixels = chain.decoder(tokens).float()  # (B, 3, 256, 256) normalised
    return chain.decoder.to_uint8(pixels).cpu().numpy()


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.npz"


def write_chunk(out: Path, chain: Chain, cfg: Config, spec, labels: torch.Tensor, device, bar) -> dict:
    """Generate samples [spec.start, spec.stop) in batches, write them as one npz chunk; returns its record."""
    images = []
    for s in range(spec.start, spec.stop, cfg.batch_size):
        idx = list(range(s, min(s + cfg.batch_size, spec.stop)))
        images.append(generate(chain, cfg, idx, labels[idx], device))
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


def rows_from_chunks(out: Path, records: list[dict], indices: list[int], key: str = "arr_0") -> np.ndarray:
    """Rows `indices` of the chunked output (reading only the chunks that hold them), in the order asked."""
    found: dict[int, np.ndarray] = {}
    for rec in records:
        wanted = [i for i in indices if rec["start"] <= i < rec["stop"]]
        if wanted:
            with np.load(out / rec["name"]) as z:
                arr = z[key]
                found.update({i: arr[i - rec["start"]] for i in wanted})
    return np.stack([found[i] for i in indices])


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
            "num_samples": n, "seed": cfg.seed, "kappa": chain.kappa, "normalised": chain.mean is not None,
            "ema": True, "precision": cfg.precision, "vae_weights": chain.models["vae"]["weights"],
            "noise": "per-sample generator seeded by (seed, global index); class-major order",
            "convention": "t=0 noise, t=1 data; CFG v_u + w (v_c - v_u) on all channels while t_min < t < t_max"}


def run(cfg: Config, dist: Dist | None = None) -> Manifest | None:
    """Generate this rank's chunks; the main process assembles samples.npz, the grid and the manifest."""
    dist, t0 = dist or current_dist(), time.time()
    if cfg.per_class <= 0 or cfg.chunk_size <= 0 or cfg.batch_size <= 0:
        raise UserError("--per-class, --chunk-size and --batch-size must be positive")
    device = stage_device(cfg.device, dist)
    chain = load_chain(cfg, device)
    config = {**config_to_dict(cfg, semantic_only=True), "models": chain.models, "inputs": chain.inputs}
    with OutputDir(cfg.out, STAGE, config, overwrite=cfg.overwrite and dist.is_main, lock=dist.is_main) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        from models.flow import class_balanced_labels

        labels = class_balanced_labels(chain.num_classes, cfg.per_class)  # (N,)
        n = len(labels)
        plan = plan_shards(n, cfg.chunk_size, "chunk")
        committed = od.committed()
        todo = [s for s in for_rank(plan, dist) if chunk_name(s.index) not in committed]
        bar = progress(sum(len(s) for s in todo), "sample", "img", dist)
        for spec in todo:
            od.commit(write_chunk(od.path, chain, cfg, spec, labels, device, bar))
        bar.close()
        barrier(dist)
        if not dist.is_main:
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
