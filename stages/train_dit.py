"""`flatdino train-dit`: train the LightningDiT flow-matching generator on a latents.zarr artifact (SPEC.md 7.3).

Lineage: the official FlatDINO `train_generator.py` (AdamW 0.9/0.95, constant lr 2e-4, weight decay 1e-4 on every
parameter as optax's default, clip 1.0, EMA 0.9995 from step 0, label dropout 0.1, kappa stored with the model).

Departures and choices:
- Latents are read from the cached `latents` artifact (both views: centre crop and flip), not recomputed online.
  Rank 0 copies `mu` (normalised when asked) once into `<out>/cache/*.npy` (written aside, fsynced, renamed);
  every process memory-maps that file, so a node holds one copy in its page cache instead of one per process
  (ImageNet, 2 views, 32x128 float32: about 42 GB, not 8 x 42 GB on 8 GPUs). The cache is deleted when the run
  finishes.
- Data order: one deterministic permutation of all rows per epoch (seed, epoch); the global batch of step s is the
  contiguous slice [s G, (s + 1) G) of the concatenated epochs, cut into micro-batches; rank r of W takes
  micro-batches r, r + W, ... Every random draw (noise, t, label dropout) of a global batch comes from one generator
  seeded by (seed, step), so the data position and the RNG state are functions of the step: resume restores model,
  EMA, optimizer and step and replays exactly (bitwise on CPU), and the draws do not depend on the world size or
  the micro-batch.
- Checkpoints: `<out>/checkpoints/<step>/` written to a temporary folder and renamed (atomic), last `keep` kept;
  `<out>/latest.json` (atomic) names the newest; resume reads it, and falls back (with a warning) to the newest
  older checkpoint that reads if that one is damaged. At the end `<out>/ckpt/` holds the final inference
  checkpoint (model, EMA, config, latent stats) consumed by `sample` through `models.dit.load_dit`.
- `--latents` and `--out` are runtime knobs: the output's config pins the latents by fingerprint, so artifacts
  may move, and latents rebuilt in place (another VAE) are refused rather than resumed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.dit import PRESETS, DiT, DiTConfig, config_to_dict
from models.flow import default_kappa, draw, flow_loss
from pipeline.config import command_from_config, config_to_dict as cfg_dict, opt
from pipeline.latents_store import open_latents
from pipeline.manifest import (ArtifactError, Manifest, OutputDir, UserError, atomic_write_json, atomic_write_with,
                               require_complete)
from pipeline.runtime import Dist, autocast, environment, get_logger, progress, resolve_precision, torch_generator

BETAS = (0.9, 0.95)  # SPEC 7.3
ADAM_EPS = 1e-8
TIME_BUCKETS = 4  # loss logged per quarter of t in [0, 1]
LATEST = "latest.json"


@dataclass(frozen=True)
class Config:
    # paths are runtime knobs (artifacts may move); the latents are pinned by fingerprint in the output's config
    latents: Path = field(metadata=opt("latents artifact directory (holds latents.zarr and manifest.json)",
                                       runtime=True))
    out: Path = field(metadata=opt("output directory for checkpoints, logs and the manifest", runtime=True))
    preset: str = field(default="XL", metadata=opt(f"DiT preset: one of {', '.join(PRESETS)}"))
    steps: int = field(default=1_000_911, metadata=opt("optimizer steps in total (official default: 800 epochs)"))
    global_batch: int = field(default=1024, metadata=opt("samples per optimizer step, over all processes"))
    lr: float = field(default=2e-4, metadata=opt("constant AdamW learning rate (no warmup, SPEC 7.3)"))
    weight_decay: float = field(default=1e-4, metadata=opt("AdamW weight decay on every parameter (optax default)"))
    grad_clip: float = field(default=1.0, metadata=opt("global gradient-norm clip"))
    ema_decay: float = field(default=0.9995, metadata=opt("EMA decay, updated every step from step 0"))
    kappa: float = field(default=0.0, metadata=opt("time shift; 0 = sqrt(T F / 4096) (1.0 for 32x128)"))
    label_dropout: float = field(default=0.1, metadata=opt("probability of replacing the label by the null class"))
    normalise: bool = field(default=False, metadata=opt("train on (mu - mean) / std per (token, channel)"))
    seed: int = field(default=0, metadata=opt("seed of the data order, noise, t and label dropout"))
    time_seed: int = field(default=0, metadata=opt("seed of the fixed Gaussian Fourier time-embedding matrix"))
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata=opt("auto: bf16 on CUDA, else fp32"))
    attn_backend: Literal["sdpa", "xformers"] = field(default="sdpa", metadata=opt("attention kernel"))
    micro_batch: int = field(default=0, metadata=opt("per-process micro-batch (0: global batch / processes); "
                                                     "gradients are accumulated to the global batch", runtime=True))
    grad_checkpointing: bool = field(default=False, metadata=opt("recompute blocks in backward", runtime=True))
    device: str = field(default="auto", metadata=opt("auto | cpu | cuda", runtime=True))
    ckpt_every: int = field(default=5000, metadata=opt("checkpoint every N steps", runtime=True))
    keep: int = field(default=2, metadata=opt("checkpoints kept", runtime=True))
    log_every: int = field(default=100, metadata=opt("TensorBoard scalars every N steps", runtime=True))
    sample_every: int = field(default=0, metadata=opt("sample grid every N steps (needs --flatdino and --rae)",
                                                      runtime=True))
    flatdino: Path | None = field(default=None, metadata=opt("FlatDINO checkpoint dir, for sample grids", runtime=True))
    rae: Path | None = field(default=None, metadata=opt("RAE dir with the pixel decoder, for sample grids",
                                                        runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing --out made with another config",
                                                        runtime=True))


class TrainingDiverged(UserError):
    """The loss or the gradient became non-finite."""


class LatentData(NamedTuple):
    z: np.ndarray  # (N, T, F): the zarr array from `load_data`, then float32 rows (normalised if asked)
    y: torch.Tensor  # (N,) int64
    mean: torch.Tensor  # (T, F) float64
    std: torch.Tensor  # (T, F) float64
    num_classes: int
    fingerprint: str


@dataclass
class RunContext:
    """Per-run objects derived from the config and the launcher."""

    accelerator: object  # accelerate.Accelerator
    dist: Dist
    micro: int  # per-process micro-batch
    kappa: float
    null: int  # null-class label
    precision: str  # "fp32" | "bf16"
    dit: DiTConfig
    decoders: tuple | None = None  # (FlatDINO, PixelDecoder) for sample grids, loaded on first use


class TrainState(NamedTuple):
    model: torch.nn.Module  # possibly wrapped for DDP by accelerate
    ema: DiT
    opt: torch.optim.Optimizer


def load_data(cfg: Config) -> LatentData:
    """The latents artifact: labels and statistics in memory, `z` still the (lazy) zarr array (see `map_rows`)."""
    manifest = require_complete(cfg.latents, "latents")
    art = open_latents(cfg.latents)
    if art.mean is None or art.std is None:
        raise UserError(f"{cfg.latents}: latents.zarr has no mean/std; re-run `flatdino latents` to finish it")
    mean, std = torch.from_numpy(art.mean), torch.from_numpy(art.std)
    classes = manifest.extra["classes"] if "classes" in manifest.extra else None
    num_classes = len(classes) if classes is not None else int(np.asarray(art.label[...]).max()) + 1
    return LatentData(art.mu, torch.from_numpy(np.asarray(art.label[...], dtype=np.int64)), mean, std, num_classes,
                      manifest.fingerprint)


CACHE_ROWS = 16384  # rows per copy step (256 MB at 32 x 128)


def cache_path(cfg: Config, data: LatentData) -> Path:
    return cfg.out / "cache" / f"z-{data.fingerprint[:16]}-{'normalised' if cfg.normalise else 'raw'}.npy"


def _copy_rows(tmp: Path, data: LatentData, normalise: bool) -> None:
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(data.z.shape))
    mean, std = data.mean.numpy(), data.std.numpy()
    for s in range(0, len(rows), CACHE_ROWS):
        z = np.asarray(data.z[s : s + CACHE_ROWS], dtype=np.float32)
        rows[s : s + len(z)] = ((z.astype(np.float64) - mean) / std).astype(np.float32) if normalise else z
    rows.flush()


def map_rows(cfg: Config, data: LatentData, dist: Dist, wait=lambda: None) -> LatentData:
    """`data` with `z` as float32 rows memory-mapped from the run's cache file, which rank 0 writes first (each
    value exactly float32((float64(mu) - mean) / std) when normalising); `wait` is the barrier between ranks."""
    path = cache_path(cfg, data)
    if dist.is_main and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_with(path, lambda tmp: _copy_rows(tmp, data, cfg.normalise))
    wait()
    rows = np.load(path, mmap_mode="r")
    if rows.shape != tuple(data.z.shape) or rows.dtype != np.float32:
        raise ArtifactError(f"{path} holds {rows.dtype} {rows.shape}, expected float32 {tuple(data.z.shape)}; "
                            "delete it and re-run")
    return data._replace(z=rows)


def model_config(cfg: Config, data: LatentData) -> DiTConfig:
    """The preset with tokens/channels/classes from the artifact."""
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown DiT preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    T, F = data.z.shape[1:]
    return dataclasses.replace(PRESETS[cfg.preset], tokens=T, channels=F, num_classes=data.num_classes,
                               time_seed=cfg.time_seed, attn_backend=cfg.attn_backend,
                               grad_checkpointing=cfg.grad_checkpointing)


def resolved_kappa(cfg: Config, dit: DiTConfig) -> float:
    return cfg.kappa if cfg.kappa > 0 else default_kappa(dit.tokens, dit.channels)


def checkpoint_config(cfg: Config, dit: DiTConfig, data: LatentData, step: int) -> dict:
    """The `config.json` stored with every checkpoint: enough for `sample` to rebuild and use the model."""
    return {"dit": config_to_dict(dit),
            "flow": {"kappa": resolved_kappa(cfg, dit), "label_dropout": cfg.label_dropout, "prediction": "velocity",
                     "convention": "t=0 noise, t=1 data"},
            "normalise": cfg.normalise, "latents_fingerprint": data.fingerprint, "step": step,
            "train": cfg_dict(cfg, semantic_only=True)}


@functools.lru_cache(maxsize=2)  # the current epoch and the next: one randperm(N) per epoch, not per step
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch_generator(seed, "perm", epoch))


def batch_indices(n: int, global_batch: int, step: int, seed: int) -> torch.Tensor:
    """Rows of the global batch of `step`: slice [step G, (step + 1) G) of the per-epoch permutations."""
    start = step * global_batch
    out, pos = [], start
    while pos < start + global_batch:
        epoch, offset = divmod(pos, n)
        perm = epoch_permutation(n, seed, epoch)
        take = min(n - offset, start + global_batch - pos)
        out.append(perm[offset : offset + take])
        pos += take
    return torch.cat(out)


def micro_size(cfg: Config, dist: Dist) -> int:
    m = cfg.micro_batch or cfg.global_batch // dist.world
    if cfg.global_batch % (m * dist.world):
        raise UserError(f"--global-batch {cfg.global_batch} is not a multiple of micro-batch {m} x {dist.world} "
                        "processes; pick sizes that divide it")
    return m


def ema_update_(ema: DiT, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay ema + (1 - decay) model, parameters only (buffers are fixed tables)."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)


class StepStats(NamedTuple):
    loss: float
    per_sample: torch.Tensor  # (b,) on CPU
    t: torch.Tensor  # (b,) on CPU
    grad_norm: float


def train_step(state: TrainState, data: LatentData, cfg: Config, step: int, ctx: RunContext) -> StepStats:
    """One optimizer step over the global batch of `step` (this process's micro-batches), then EMA."""
    acc, dist, m, kappa, null = ctx.accelerator, ctx.dist, ctx.micro, ctx.kappa, ctx.null
    idx = batch_indices(len(data.z), cfg.global_batch, step, cfg.seed)
    # the whole global batch's draws, on CPU from one generator: independent of micro-batching and world size
    z_all, y_all = torch.from_numpy(data.z[idx.numpy()]), data.y[idx]  # a copy of the mapped rows
    d_all = draw(z_all, y_all, kappa, cfg.label_dropout, null, torch_generator(cfg.seed, "draw", step))
    mine = list(range(dist.rank, cfg.global_batch // m, dist.world))
    losses, ts = [], []
    for k, j in enumerate(mine):
        sl = slice(j * m, (j + 1) * m)
        z = z_all[sl].to(acc.device)
        d = type(d_all)(*(v[sl].to(acc.device) for v in d_all))
        sync = contextlib.nullcontext() if k == len(mine) - 1 else acc.no_sync(state.model)
        with sync:  # gradients are all-reduced only in the backward of the last micro-batch
            with autocast(ctx.precision, acc.device):
                out = flow_loss(state.model, z, d)
            acc.backward(out.loss * (m * dist.world / cfg.global_batch))  # sums to the global-batch mean
        losses.append(out.per_sample.cpu())
        ts.append(d.t.cpu())
    return _apply_update(state, cfg, step, torch.cat(losses), torch.cat(ts), acc)


def _apply_update(state: TrainState, cfg: Config, step: int, per_sample: torch.Tensor, t: torch.Tensor,
                  acc) -> StepStats:
    loss = per_sample.mean().item()
    grad_norm = float(acc.clip_grad_norm_(state.model.parameters(), cfg.grad_clip))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(f"non-finite training loss {loss} / grad norm {grad_norm} at step {step}")
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)
    ema_update_(state.ema, acc.unwrap_model(state.model), cfg.ema_decay)
    return StepStats(loss, per_sample, t, grad_norm)


# ------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(out: Path, state: TrainState, ckpt_config: dict, history: list, acc, keep: int,
                    latent_stats: dict[str, torch.Tensor]) -> Path:
    """Write checkpoints/<step>/ atomically (every file in a tmp folder, then one rename), point latest.json at it,
    prune old ones."""
    step = ckpt_config["step"]
    root = out / "checkpoints"
    final, tmp = root / f"{step:09d}", root / f".tmp-{step:09d}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "state").mkdir(parents=True)
    model = acc.unwrap_model(state.model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in state.ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in latent_stats.items()}, str(tmp / "latent_stats.safetensors"))
    (tmp / "config.json").write_text(json.dumps(ckpt_config, indent=2, sort_keys=True))
    torch.save(state.opt.state_dict(), tmp / "state" / "optimizer.pt")
    (tmp / "state" / "state.json").write_text(json.dumps({"step": step, "history": history}))
    _fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. after falling back from a damaged one): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_json(out / LATEST, {"step": step, "path": f"checkpoints/{final.name}"})
    _prune(root, final.name, keep)
    return final


def _prune(root: Path, newest: str, keep: int) -> None:
    """Keep the last `keep` checkpoints up to `newest`; later ones are left by an abandoned run (a resume that fell
    back from a damaged checkpoint) and are re-made as training reaches them."""
    names = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    kept = [n for n in names if n <= newest][-keep:]
    for name in names:
        if name not in kept:
            shutil.rmtree(root / name)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


class SavedState(NamedTuple):
    """A checkpoint's training state, read in full before any of it is applied."""

    model: dict
    ema: dict
    opt: dict
    step: int
    history: list


def load_checkpoint(out: Path, state: TrainState, acc) -> tuple[int, list]:
    """Restore model, EMA and optimizer from latest.json; returns (step, loss history). (0, []) if none.

    If latest.json's checkpoint is unreadable (a damaged disk, a copy cut short), resume from the newest older
    one that reads, with a warning; if none does, an ArtifactError names it and says what to do."""
    if not (out / LATEST).exists():
        return 0, []
    latest = out / json.loads((out / LATEST).read_text())["path"]
    saved = _newest_readable([latest, *_older_checkpoints(latest)], acc.device)
    acc.unwrap_model(state.model).load_state_dict(saved.model)
    state.ema.load_state_dict(saved.ema)
    state.opt.load_state_dict(saved.opt)
    return saved.step, saved.history


def _older_checkpoints(ckpt: Path) -> list[Path]:
    """The committed checkpoints before `ckpt`, newest first."""
    if not ckpt.parent.is_dir():
        return []
    return sorted((p for p in ckpt.parent.iterdir() if not p.name.startswith(".") and p.name < ckpt.name),
                  reverse=True)


def _newest_readable(candidates: list[Path], device) -> SavedState:
    errors = []
    for ckpt in candidates:
        try:
            saved = read_checkpoint(ckpt, device)
        except ArtifactError as e:
            errors.append(str(e))
            continue
        if errors:
            get_logger(__name__).warning("%s; resuming from %s instead (later steps are retrained and their "
                                         "checkpoints rewritten)", "; ".join(errors), ckpt)
        return saved
    out = candidates[0].parent.parent
    raise ArtifactError(f"{errors[0]}; there is no older readable checkpoint. Restore it, or delete "
                        f"{out / 'checkpoints'} and {out / LATEST} (or re-run with --overwrite) to train from step 0")


def read_checkpoint(ckpt: Path, device) -> SavedState:
    """Every training-state file of checkpoints/<step>/; ArtifactError naming the folder if one is unreadable."""
    try:
        model = load_file(str(ckpt / "model.safetensors"), device=str(device))
        ema = load_file(str(ckpt / "ema.safetensors"), device=str(device))
        opt = torch.load(ckpt / "state" / "optimizer.pt", map_location=device, weights_only=True)
        meta = json.loads((ckpt / "state" / "state.json").read_text())
        step, history = meta["step"], meta["history"]
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise ArtifactError(f"{ckpt}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if ckpt.name != f"{step:09d}":
        raise ArtifactError(f"{ckpt}: unreadable checkpoint (its state.json says step {step})")
    return SavedState(model, ema, opt, step, history)


def publish_final(out: Path, ckpt: Path) -> None:
    """Copy the final checkpoint's inference files to <out>/ckpt (tmp folder + rename)."""
    tmp, final = out / ".tmp-ckpt", out / "ckpt"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ("model.safetensors", "ema.safetensors", "config.json", "latent_stats.safetensors"):
        shutil.copy2(ckpt / name, tmp / name)
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ------------------------------------------------------------------------------------------------ logging


def log_scalars(writer, stats: StepStats, step: int, lr: float, rate: float, device: torch.device) -> None:
    """Loss, loss by time bucket, grad norm, lr, throughput and memory to TensorBoard."""
    writer.add_scalar("train/loss", stats.loss, step)
    bucket = torch.clamp((stats.t * TIME_BUCKETS).long(), max=TIME_BUCKETS - 1)
    for b in range(TIME_BUCKETS):
        sel = bucket == b
        if sel.any():
            writer.add_scalar(f"loss_by_t/{b / TIME_BUCKETS:.2f}-{(b + 1) / TIME_BUCKETS:.2f}",
                              stats.per_sample[sel].mean().item(), step)
    writer.add_scalar("train/grad_norm", stats.grad_norm, step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("perf/samples_per_s", rate, step)
    if device.type == "cuda":
        writer.add_scalar("perf/max_mem_gb", torch.cuda.max_memory_allocated(device) / 2**30, step)


def plot_loss(history: list, path: Path) -> None:
    """loss.png from the (step, loss) history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps, losses = zip(*history)
        ax.plot(steps, losses)
    ax.set(xlabel="step", ylabel="flow-matching MSE", yscale="log", title="train-dit loss")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(path.with_suffix(".tmp.png"), path)


def sample_grid(ema: DiT, cfg: Config, data: LatentData, ctx: RunContext, step: int, writer) -> None:
    """Decode 8 classes x 4 EMA samples through FlatDINO and the pixel decoder; PNG + TensorBoard image."""
    from models.encoder import PixelDecoder, load_rae
    from models.flatdino import load_weights
    from models.flow import class_balanced_labels, sample, sample_noise
    from PIL import Image

    device = ctx.accelerator.device
    if ctx.decoders is None:
        ctx.decoders = (load_weights(cfg.flatdino, device)[0], PixelDecoder(load_rae(cfg.rae)).to(device).eval())
    vae, pixels = ctx.decoders
    labels = class_balanced_labels(min(8, data.num_classes), 4).to(device)
    noise = sample_noise(cfg.seed, range(len(labels)), tuple(data.z.shape[1:])).to(device)
    z = sample(ema, labels, noise, steps=50, cfg_scale=1.0, kappa=ctx.kappa)
    if cfg.normalise:
        z = (z.double() * data.std.to(device) + data.mean.to(device)).float()
    with torch.no_grad():
        img = pixels.to_uint8(pixels(vae.decode(z)))  # (B, H, W, 3) uint8
    grid = img.view(-1, 4, *img.shape[1:]).permute(0, 2, 1, 3, 4).flatten(2, 3).flatten(0, 1).cpu()  # (R H, 4 W, 3)
    (cfg.out / "samples").mkdir(exist_ok=True)
    Image.fromarray(grid.numpy()).save(cfg.out / "samples" / f"step-{step:09d}.png")
    writer.add_image("samples", grid.permute(2, 0, 1), step)


# ------------------------------------------------------------------------------------------------ stage


def setup(cfg: Config, data: LatentData):
    """Accelerator, model, EMA, optimizer and the per-run context."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=cfg.device == "cpu")
    dist = Dist(acc.process_index, acc.num_processes)
    dit = model_config(cfg, data)
    torch.manual_seed(cfg.seed)  # weight init only; every training draw uses an explicit generator
    model = DiT(dit).to(acc.device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # EMA starts as a copy (SPEC 7.3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=BETAS, eps=ADAM_EPS, weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    ctx = RunContext(acc, dist, micro_size(cfg, dist), resolved_kappa(cfg, dit), dit.null_class,
                     resolve_precision(cfg.precision, acc.device), dit)
    return TrainState(model, ema, opt), ctx


def save(cfg: Config, state: TrainState, ctx: RunContext, data: LatentData, step: int, history: list) -> Path:
    return save_checkpoint(cfg.out, state, checkpoint_config(cfg, ctx.dit, data, step), history,
                           ctx.accelerator, cfg.keep, {"mean": data.mean, "std": data.std})


def run(cfg: Config) -> Manifest:
    """Train (or resume) to `cfg.steps` optimizer steps; returns the manifest of the finished run."""
    log = get_logger(__name__)
    config = {**cfg_dict(cfg, semantic_only=True),
              "latents_fingerprint": require_complete(cfg.latents, "latents").fingerprint}
    with OutputDir(cfg.out, "train_dit", config, overwrite=cfg.overwrite) as od:
        if od.done:
            log.info("%s: already complete (step %d)", cfg.out, od.manifest.extra["step"])
            return od.manifest
        data = load_data(cfg)
        state, ctx = setup(cfg, data)
        acc, dist = ctx.accelerator, ctx.dist
        data = map_rows(cfg, data, dist, acc.wait_for_everyone)
        start, history = load_checkpoint(cfg.out, state, acc)
        if start:
            log.info("resuming from step %d", start)
        writer = _writer(cfg, dist)
        bar, t0, last_good = progress(cfg.steps, "train-dit", "step", dist, initial=start), time.time(), start
        for step in range(start, cfg.steps):
            try:
                stats = train_step(state, data, cfg, step, ctx)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e}; weights were not updated. The last good checkpoint is step "
                                       f"{last_good} in {cfg.out} (resume from it with a lower --lr).") from None
            done = step + 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                history.append([done, stats.loss])
                rate = cfg.global_batch * (done - start) / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{stats.loss:.4f}")
                if writer is not None:
                    log_scalars(writer, stats, done, cfg.lr, rate, acc.device)
            if (done % cfg.ckpt_every == 0 or done == cfg.steps) and dist.is_main:
                last_ckpt, last_good = save(cfg, state, ctx, data, done, history), done
            if writer is not None and cfg.sample_every and cfg.flatdino and cfg.rae and done % cfg.sample_every == 0:
                sample_grid(state.ema, cfg, data, ctx, done, writer)
            acc.wait_for_everyone()
        bar.close()
        if not dist.is_main:
            return None
        if start == cfg.steps:  # everything was already trained; (re)publish from the latest checkpoint
            last_ckpt = _latest_checkpoint(cfg)
        publish_final(cfg.out, last_ckpt)
        shutil.rmtree(cfg.out / "cache", ignore_errors=True)  # the other ranks' open mappings stay valid
        plot_loss(history, cfg.out / "loss.png")
        if writer is not None:
            writer.close()
        return od.finish(_manifest(cfg, ctx, data, history, time.time() - t0))


def _latest_checkpoint(cfg: Config) -> Path:
    """latest.json's checkpoint, after the pruning that a run killed right after writing latest.json missed."""
    ckpt = cfg.out / json.loads((cfg.out / LATEST).read_text())["path"]
    _prune(ckpt.parent, ckpt.name, cfg.keep)
    return ckpt


def _writer(cfg: Config, dist: Dist):
    if not dist.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(cfg.out / "tb"))


def _manifest(cfg: Config, ctx: RunContext, data: LatentData, history: list, seconds: float) -> Manifest:
    from pipeline.manifest import file_sha256

    ema_sha = file_sha256(cfg.out / "ckpt" / "ema.safetensors")
    return Manifest(stage="train_dit",
                    inputs={"latents": {"path": str(cfg.latents), "fingerprint": data.fingerprint}},
                    models={"ema": {"path": "ckpt/ema.safetensors", "sha256": ema_sha}},
                    shards=[{"name": "ckpt/ema.safetensors", "sha256": ema_sha}],
                    counts={"written": cfg.steps, "skipped": 0, "failed": 0},
                    extra={"kappa": ctx.kappa, "normalise": cfg.normalise, "step": cfg.steps,
                           "dit": config_to_dict(ctx.dit), "final_loss": history[-1][1] if history else None,
                           "precision": ctx.precision, "world_size": ctx.dist.world},
                    versions=environment(), timings={"train_seconds_this_run": seconds}, complete=True)


def _summary(m: Manifest) -> str:
    return f"train-dit: step {m.extra['step']}, final loss {m.extra['final_loss']}, kappa {m.extra['kappa']:.3f}"


cli = command_from_config(Config, run, "train-dit", __doc__.splitlines()[0], summary=_summary)
