"""`flatdino train-dit`: train the LightningDiT flow-matching generator on a latents.zarr artifact (SPEC.md 7.3).

Lineage: the official FlatDINO `train_generator.py` (AdamW 0.9/0.95, constant lr 2e-4, weight decay 1e-4 on every
parameter as optax's default, clip 1.0, EMA 0.9995 from step 0, label dropout 0.1, kappa stored with the model).

Departures and choices:
- Latents are read from the cached `latents` artifact (both views: centre crop and flip), not recomputed online.
  Rank 0 copies `mu` (standardised when asked) once into `<out>/cache/*.npy` (written aside, fsynced, renamed);
  every process memory-maps that file, so a node holds one copy in its page cache instead of one per process
  (ImageNet, 2 views, 32x128 float32: about 42 GB, not 8 x 42 GB on 8 GPUs). The cache is deleted when the run
  finishes.
- Data order: one deterministic permutation of all rows per epoch (seed, epoch); the global batch of step s is the
  contiguous slice [s G, (s + 1) G) of the concatenated epochs. The step's draws (noise, t, label dropout) are made
  for the whole global batch at once on the device from a generator seeded by (seed, step), so they depend neither
  on the world size nor on the micro-batch, and resume replays them exactly. The update itself is the shared
  trainer's (`pipeline.train`): checkpoints `checkpoints/<step>/`, EMA, clipping, the non-finite guard, SIGTERM.
- At the end `<out>/ckpt/` holds the inference checkpoint (model, EMA, config, latent stats) consumed by `sample`
  through `models.dit.load_dit`.
- `--latents` and `--out` are runtime knobs: the output's config pins the latents by fingerprint, so artifacts
  may move, and latents rebuilt in place (another VAE) are refused rather than resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from models import dit_dh
from models.dit import PRESETS, DiT, DiTConfig
from models.encoder import PixelDecoder, load_rae
from models.flow import FlowDraw, default_kappa, flow_loss, shift_time
from pipeline.checkpoint import publish
from pipeline.config import command_from_config, config_to_dict as cfg_dict, opt
from pipeline.latents_store import open_latents
from pipeline.manifest import ArtifactError, Manifest, OutputDir, UserError, atomic_write_with, file_sha256, \
    require_complete
from pipeline.runtime import Runtime, environment, get_logger, launch, torch_generator
from pipeline.train import Ema, Event, Recipe, Trainer, TrainOptions

log = get_logger(__name__)

BETAS = (0.9, 0.95)  # SPEC 7.3
ADAM_EPS = 1e-8
TIME_BUCKETS = 4  # loss logged per quarter of t in [0, 1]
OWNS = ("checkpoints", "latest.json", "ckpt", "cache", "tb", "samples", "loss.png", "best", "evals")  # --overwrite


@dataclass(frozen=True, kw_only=True)
class Config(TrainOptions):
    # paths are runtime knobs (artifacts may move); the latents are pinned by fingerprint in the output's config
    latents: Path = field(metadata=opt("latents artifact directory (holds latents.zarr and manifest.json)",
                                       runtime=True))
    out: Path = field(metadata=opt("output directory for checkpoints, logs and the manifest", runtime=True))
    experiment: str | None = field(default=None, metadata=opt(
        "an official generator name, e.g. ditxl-kappa3 or ditxl-dh-norm: sets --arch, --preset, --kappa and "
        "--standardize-latents as the official code builds them from it (printed, recorded in the manifest)"))
    arch: Literal["dit", "dit-dh"] = field(default="dit", metadata=opt(
        "dit: LightningDiT (the paper's generator); dit-dh: DiT^DH, a DiT trunk with RAE's wide shallow denoising "
        "head (presets named as the official code: dits-dh, ditb-dh, ditl-dh, ditxl-dh; ditt-dh for tests)"))
    preset: str = field(default="XL", metadata=opt(
        f"generator preset: {', '.join(PRESETS)} (--arch dit) or {', '.join(dit_dh.PRESETS)} (--arch dit-dh)"))
    steps: int = field(default=1_000_911, metadata=opt("optimizer steps in total (official default: 800 epochs)", min=1))
    global_batch: int = field(default=1024, metadata=opt("samples per optimizer step, over all processes", min=1))
    lr: float = field(default=2e-4, metadata=opt("constant AdamW learning rate (no warmup, SPEC 7.3)", min=0, min_open=True))
    weight_decay: float = field(default=1e-4, metadata=opt("AdamW weight decay on every parameter (optax default)", min=0))
    grad_clip: float = field(default=1.0, metadata=opt("global gradient-norm clip", min=0, min_open=True))
    ema_decay: float = field(default=0.9995, metadata=opt("EMA decay, updated every step from step 0", min=0, max=1))
    kappa: float = field(default=0.0, metadata=opt("time shift; 0 = sqrt(T F / 4096) (1.0 for 32x128)", min=0))
    label_dropout: float = field(default=0.1, metadata=opt("probability of replacing the label by the null class", min=0, max=1, max_open=True))
    standardize_latents: bool = field(default=False, metadata=opt(
        "train on (mu - mean) / std per (token, channel), the official `-norm` (statistics of the latents artifact)"))
    seed: int = field(default=0, metadata=opt("seed of the weight init, data order, noise, t and label dropout", min=0))
    time_seed: int = field(default=0, metadata=opt("seed of the fixed Gaussian Fourier time-embedding matrix", min=0))
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata=opt("auto: bf16 on CUDA, else fp32"))
    attn_backend: Literal["sdpa", "xformers"] = field(default="sdpa", metadata=opt("attention kernel"))
    micro_batch: int = field(default=0, metadata=opt("per-process micro-batch (0: global batch / processes); "
                                                     "gradients are accumulated to the global batch", runtime=True, min=0))
    grad_checkpointing: bool = field(default=False, metadata=opt("recompute blocks in backward", runtime=True))
    latents_on_device: bool = field(default=False, metadata=opt(
        "hold every latent row on the device and gather batches there (ImageNet's 2.56M x 32 x 128 float32 rows are "
        "42 GB: an H100 80 GB or H200 holds them); the rows are the same float32 values", runtime=True))
    ckpt_every: int = field(default=5000, metadata=opt("checkpoint every N steps (and at the end, on SIGTERM)",
                                                       runtime=True, min=1))
    log_every: int = field(default=100, metadata=opt("log scalars every N steps", runtime=True, min=1))
    sample_every: int = field(default=0, metadata=opt("sample grid every N steps (needs --flatdino and --rae)",
                                                      runtime=True, min=0))
    eval_every: int = field(default=0, metadata=opt(
        "every N steps: --eval-samples class-balanced EMA samples through --flatdino and --rae, FD-DINOv2 (and FID "
        "when the Inception weights are present) against --eval-ref, logged, and best/ kept by --eval-metric (the "
        "official best-by-gFID checkpoint); 0 = off", min=0))
    eval_samples: int = field(default=1000, metadata=opt("samples per evaluation (balanced over the classes)", min=1))
    eval_metric: Literal["fd_dinov2", "fid"] = field(default="fd_dinov2", metadata=opt("what best/ is chosen by"))
    eval_steps: int = field(default=50, metadata=opt("Euler steps of the evaluation samples", min=1))
    eval_cfg_scale: float = field(default=1.0, metadata=opt(
        "guidance scale of the evaluation samples (the official monitor: 1.0)", min=0))
    eval_ref: Path | None = field(default=None, metadata=opt("fid-ref artifact the evaluation compares with",
                                                             runtime=True))
    inception_weights: Path | None = field(default=None, metadata=opt(
        "Inception weights for FID during evaluation (default: the torch hub cache; no download)", runtime=True))
    flatdino: Path | None = field(default=None, metadata=opt("train-vae run, for sample grids", runtime=True))
    rae: Path | None = field(default=None, metadata=opt("RAE dir with the pixel decoder, for sample grids",
                                                        runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing --out made with another config",
                                                        runtime=True))


class LatentData(NamedTuple):
    z: np.ndarray  # (N, T, F): the zarr array from `load_data`, then float32 rows (standardised if asked)
    y: torch.Tensor  # (N,) int64
    mean: torch.Tensor  # (T, F) float64
    std: torch.Tensor  # (T, F) float64
    num_classes: int
    fingerprint: str


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
    kind = "standardized" if cfg.standardize_latents else "raw"
    return cfg.out / "cache" / f"z-{data.fingerprint[:16]}-{kind}.npy"


def _copy_rows(tmp: Path, data: LatentData, standardize: bool) -> None:
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(data.z.shape))
    preallocate(tmp)  # a sparse mapped file would die of SIGBUS on a full disk instead of raising ENOSPC
    mean, std = data.mean.numpy(), data.std.numpy()
    for s in range(0, len(rows), CACHE_ROWS):
        z = np.asarray(data.z[s : s + CACHE_ROWS], dtype=np.float32)
        rows[s : s + len(z)] = ((z.astype(np.float64) - mean) / std).astype(np.float32) if standardize else z
    rows.flush()


def preallocate(path: Path) -> None:
    """Reserve the blocks of an (empty, sparse) file now, so that writing through a memory map cannot hit a full disk
    (SIGBUS, no message) later: a full disk is an OSError(ENOSPC) here, which the CLI reports."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        raise OSError(e.errno, os.strerror(e.errno), str(path)) from None
    finally:
        os.close(fd)


def map_rows(cfg: Config, data: LatentData, rt: Runtime) -> LatentData:
    """`data` with `z` as float32 rows memory-mapped from the run's cache file, which rank 0 writes first (each
    value exactly float32((float64(mu) - mean) / std) when standardising)."""
    path = cache_path(cfg, data)
    if rt.is_main and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_with(path, lambda tmp: _copy_rows(tmp, data, cfg.standardize_latents))
    rt.barrier()
    rows = np.load(path, mmap_mode="r")
    if rows.shape != tuple(data.z.shape) or rows.dtype != np.float32:
        raise ArtifactError(f"{path} holds {rows.dtype} {rows.shape}, expected float32 {tuple(data.z.shape)}; "
                            "delete it and re-run")
    return data._replace(z=rows)


def apply_experiment(cfg: Config) -> Config:
    """`cfg` with the options of its official generator name; an option given explicitly with another value is
    refused."""
    if cfg.experiment is None:
        return cfg
    from pipeline.experiments import resolve_dit_experiment

    exp = resolve_dit_experiment(cfg.experiment)
    values = {"arch": exp.arch, "preset": exp.preset, "kappa": exp.kappa or 0.0,
              "standardize_latents": exp.standardize_latents}
    defaults = Config(latents=cfg.latents, out=cfg.out)
    clash = [f"--{k.replace('_', '-')} {getattr(cfg, k)!r} (the name sets {v!r})" for k, v in values.items()
             if getattr(cfg, k) != getattr(defaults, k) and getattr(cfg, k) != v]
    if clash:
        raise UserError(f"--experiment {cfg.experiment} sets these options itself: {'; '.join(clash)}; drop them "
                        "or drop --experiment")
    return dataclasses.replace(cfg, **values)


def model_config(cfg: Config, data: LatentData):
    """The preset (a DiTConfig or a DiTDHConfig) with tokens/channels/classes from the artifact."""
    presets = dit_dh.PRESETS if cfg.arch == "dit-dh" else PRESETS
    if cfg.preset not in presets:
        raise UserError(f"unknown --arch {cfg.arch} preset {cfg.preset!r}; choose one of {', '.join(presets)}")
    T, F = data.z.shape[1:]
    return dataclasses.replace(presets[cfg.preset], tokens=T, channels=F, num_classes=data.num_classes,
                               time_seed=cfg.time_seed, attn_backend=cfg.attn_backend,
                               grad_checkpointing=cfg.grad_checkpointing)


def build_model(cfg: Config, dit) -> torch.nn.Module:
    return (dit_dh.DiTDH if cfg.arch == "dit-dh" else DiT)(dit)


def resolved_kappa(cfg: Config, dit: DiTConfig) -> float:
    return cfg.kappa if cfg.kappa > 0 else default_kappa(dit.tokens, dit.channels)


def checkpoint_config(cfg: Config, dit, data: LatentData, step: int) -> dict:
    """The `config.json` of the inference checkpoint: enough for `sample` to rebuild and use the model."""
    return {"arch": cfg.arch, "dit": dataclasses.asdict(dit),
            "flow": {"kappa": resolved_kappa(cfg, dit), "label_dropout": cfg.label_dropout, "prediction": "velocity",
                     "convention": "t=0 noise, t=1 data"},
            "standardize_latents": cfg.standardize_latents, "latents_fingerprint": data.fingerprint, "step": step,
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


def micro_size(cfg: Config, rt: Runtime) -> int:
    m = cfg.micro_batch or cfg.global_batch // rt.world
    if cfg.global_batch % (m * rt.world):
        raise UserError(f"--global-batch {cfg.global_batch} is not a multiple of micro-batch {m} x {rt.world} "
                        "processes; pick sizes that divide it")
    return m


# ------------------------------------------------------------------------------------------------ the recipe


class Flow(NamedTuple):
    """What the flow-matching loss needs besides the batch."""

    kappa: float
    label_dropout: float
    null: int


def draw_step(seed: int, step: int, g: int, shape: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    """The random draws of global batch `step`, all at once on the device: noise (G, T, F), u (G,), drop (G,)."""
    gen = torch_generator(seed, "draw", step, device=device)
    return {"noise": torch.randn(g, *shape, generator=gen, device=device),
            "u": torch.rand(g, generator=gen, device=device),
            "drop": torch.rand(g, generator=gen, device=device)}


def flow_step_loss(model, batch, d: dict, flow: Flow):
    """Velocity MSE of a micro-batch (z (b, T, F), y (b,)) with its draws; scalars: loss per quarter of t."""
    z, y = batch
    if flow.label_dropout > 0:
        y = torch.where(d["drop"] < flow.label_dropout, torch.full_like(y, flow.null), y)
    out = flow_loss(model, z, FlowDraw(d["noise"], shift_time(d["u"], flow.kappa), y))
    bucket = torch.nn.functional.one_hot(torch.clamp((out.t * TIME_BUCKETS).long(), max=TIME_BUCKETS - 1),
                                         TIME_BUCKETS).float()  # (b, 4)
    return out.loss, {"loss_t": (out.per_sample[:, None] * bucket).mean(0), "frac_t": bucket.mean(0)}


def by_time(scalars: dict) -> dict:
    """Logged scalars: the loss of each quarter of t instead of the sums it is made of."""
    out = {k: v for k, v in scalars.items() if k not in ("loss_t", "frac_t")}
    out["loss_by_t"] = [n / f if f > 0 else 0.0 for n, f in zip(scalars["loss_t"], scalars["frac_t"])]
    return out


def recipe(cfg: Config, data: LatentData, rt: Runtime, dit: DiTConfig) -> Recipe:
    """Model, optimizer, order, draws and loss of the run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # weight init only; every training draw uses an explicit generator
        model = build_model(cfg, dit).to(rt.device)
    # fused: one kernel per step instead of ~10 ops per tensor; the demo's train-dit runs in 0.92x the time (bench/RESULTS.md)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=BETAS, eps=ADAM_EPS,
                                  weight_decay=cfg.weight_decay, fused=True)
    flow = Flow(resolved_kappa(cfg, dit), cfg.label_dropout, dit.null_class)
    n, shape = len(data.z), tuple(data.z.shape[1:])
    if cfg.latents_on_device:
        z_dev, y_dev = torch.from_numpy(np.asarray(data.z)).to(rt.device), data.y.to(rt.device)

    def feed(step: int, sl: range):
        idx = batch_indices(n, cfg.global_batch, step, cfg.seed)[sl.start : sl.stop]
        if cfg.latents_on_device:
            idx = idx.to(rt.device)
            return z_dev[idx], y_dev[idx]
        return torch.from_numpy(data.z[idx.numpy()]), data.y[idx]  # a copy of this process's mapped rows

    return Recipe(model, optimizer, cfg.steps, cfg.global_batch, micro_size(cfg, rt), lambda step: cfg.lr, feed,
                  lambda model, batch, d, step: flow_step_loss(model, batch, d, flow),
                  lambda step, device: draw_step(cfg.seed, step, cfg.global_batch, shape, device),
                  clip=cfg.grad_clip, ema=Ema(cfg.ema_decay), derive=by_time, title="train-dit")


def ema_chain(cfg: Config, trainer: Trainer, data: LatentData, kappa: float):
    """The sampling chain around the live EMA model (FlatDINO of --flatdino, pixel decoder of --rae)."""
    from pipeline.evaluation import live_chain

    std = (data.mean, data.std) if cfg.standardize_latents else (None, None)
    return live_chain(trainer, cfg.flatdino, cfg.rae, kappa, *std, data.num_classes)


def eval_event(cfg: Config, trainer: Trainer, data: LatentData, dit, kappa: float) -> Event:
    """Every --eval-every steps (all processes): the metrics of pipeline.evaluation; best/ on improvement. A
    checkpoint follows each evaluation, so a resumed run never evaluates a step again."""
    from pipeline.evaluation import evaluate, open_eval
    from pipeline.sampling import Sampling

    setup = open_eval(cfg.eval_ref, cfg.rae, cfg.inception_weights, trainer.rt.device)
    if cfg.eval_metric == "fid" and setup.inception is None:
        raise UserError(f"--eval-metric fid needs the Inception weights ({setup.inception_info['reason']})")
    how = Sampling(seed=cfg.seed, steps=cfg.eval_steps, cfg_scale=cfg.eval_cfg_scale)

    def fn(step: int) -> dict:
        result = evaluate(setup, ema_chain(cfg, trainer, data, kappa), how, cfg.eval_samples, data.num_classes,
                          trainer.rt)
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "samples"))
        best = trainer.state["stage"].get("best")
        if best is None or result[cfg.eval_metric] < best[cfg.eval_metric]:
            trainer.state["stage"]["best"] = {"step": step, **result}
            if trainer.rt.is_main:
                publish_final(cfg, trainer, dit, data, name="best", extra={"eval.json": {"step": step, **result}})
        return result

    return Event("eval", cfg.eval_every, fn, checkpoint=True)


# ------------------------------------------------------------------------------------------------ stage


def run(cfg: Config, rt: Runtime | None = None) -> Manifest | None:
    """Train (or resume) to `cfg.steps` optimizer steps; returns the manifest of the finished run."""
    t0, cfg = time.time(), apply_experiment(cfg)
    if cfg.experiment:
        log.info("experiment %s: --arch %s --preset %s --kappa %s --standardize-latents %s", cfg.experiment, cfg.arch,
                 cfg.preset, cfg.kappa, cfg.standardize_latents)
    config = {**cfg_dict(cfg, semantic_only=True),
              "latents_fingerprint": require_complete(cfg.latents, "latents").fingerprint}
    if cfg.eval_every:  # best/ depends on what the evaluation compares with
        if cfg.eval_ref is None or cfg.flatdino is None or cfg.rae is None:
            raise UserError("--eval-every needs --eval-ref (a fid-ref artifact), --flatdino (the train-vae run) and "
                            "--rae (the pixel decoder's RAE directory)")
        config |= {"eval_ref_fingerprint": require_complete(cfg.eval_ref, "fid_ref").fingerprint,
                   "eval_vae_fingerprint": require_complete(cfg.flatdino, "train_vae").fingerprint,
                   "eval_decoder_fingerprint": PixelDecoder(load_rae(cfg.rae)).fingerprint}
    rt = rt or launch(cfg.device, cfg.precision)
    with OutputDir(cfg.out, "train_dit", config, overwrite=cfg.overwrite, rt=rt, owns=OWNS,
                   inputs=[cfg.latents, cfg.flatdino, cfg.rae]) as od:
        if od.done:
            log.info("%s: already complete (step %d)", cfg.out, od.manifest.extra["step"])
            return od.manifest
        data = map_rows(cfg, load_data(cfg), rt)
        dit = model_config(cfg, data)
        trainer = Trainer(recipe(cfg, data, rt, dit), cfg, od.path, rt, cfg.seed)
        if cfg.sample_every and cfg.flatdino and cfg.rae:
            from pipeline.evaluation import grid_event

            chain = functools.partial(ema_chain, cfg, trainer, data, resolved_kappa(cfg, dit))
            trainer.r.events.append(grid_event(trainer, chain, cfg.out / "samples", cfg.seed, cfg.sample_every,
                                               data.num_classes))
        if cfg.eval_every:
            trainer.r.events.append(eval_event(cfg, trainer, data, dit, resolved_kappa(cfg, dit)))
        trainer.fit()
        if not trainer.complete or not rt.is_main:
            return None
        publish_final(cfg, trainer, dit, data)
        shutil.rmtree(cfg.out / "cache", ignore_errors=True)  # the other ranks' open mappings stay valid
        trainer.plot(cfg.out / "loss.png", "flow-matching MSE")
        return od.finish(_manifest(cfg, trainer, dit, data, rt, time.time() - t0))


def publish_final(cfg: Config, trainer: Trainer, dit, data: LatentData, name: str = "ckpt",
                  extra: dict | None = None) -> None:
    """`<out>/<name>/` (ckpt/ at the end, best/ on an evaluation's improvement): model, EMA, latent statistics and
    config, what `sample` loads."""
    publish(cfg.out, name, {"model.safetensors": trainer.raw.state_dict(),
                            "ema.safetensors": trainer.ema.state_dict(),
                            "latent_stats.safetensors": {"mean": data.mean, "std": data.std}},
            {"config.json": checkpoint_config(cfg, dit, data, trainer.state["step"]), **(extra or {})})


def _manifest(cfg: Config, trainer: Trainer, dit: DiTConfig, data: LatentData, rt: Runtime, seconds: float):
    ema_sha = file_sha256(cfg.out / "ckpt" / "ema.safetensors")
    history = trainer.state["log"]
    return Manifest(stage="train_dit",
                    inputs={"latents": {"path": str(cfg.latents), "fingerprint": data.fingerprint}},
                    models={"ema": {"path": "ckpt/ema.safetensors", "sha256": ema_sha}},
                    shards=[{"name": "ckpt/ema.safetensors", "sha256": ema_sha}],
                    counts={"written": cfg.steps, "skipped": 0, "failed": 0},
                    extra={"kappa": resolved_kappa(cfg, dit), "standardize_latents": cfg.standardize_latents,
                           "step": cfg.steps, "arch": cfg.arch, "dit": dataclasses.asdict(dit),
                           "experiment": cfg.experiment, "precision": rt.precision,
                           "final_loss": history[-1]["loss"] if history else None,
                           "best": trainer.state["stage"].get("best"),
                           "evals": trainer.state["events"].get("eval", [])},
                    versions=environment(), complete=True,  # the world size is how, not what: not in the fingerprint
                    timings={"train_seconds_this_run": seconds, "world_size": rt.world})


def _summary(m: Manifest) -> str:
    return f"train-dit: step {m.extra['step']}, final loss {m.extra['final_loss']}, kappa {m.extra['kappa']:.3f}"


cli = command_from_config(Config, run, "train-dit", __doc__.splitlines()[0], summary=_summary)
