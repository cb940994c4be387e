"""`flatdino train-vae`: train the FlatDINO beta-VAE on DINOv2 patch features (SPEC.md section 5).

Loss: mean Huber(delta=1) + beta * per-sample summed KL (beta = 5.12e-4 / (T*F) unless given). AdamW (0.9, 0.999,
eps 1e-8), weight decay 0.02 on 2-D weights only, global-norm clip 10, WSD schedule (1e-6 -> peak over 5 epochs,
hold, linear to 1e-8 over the last 10/15/15/25% of epochs), global batch 512 from any micro-batch and world size.

Determinism: the data order is a permutation of the train split per epoch, seeded by (seed, epoch), read as one
continuous stream (so a run has floor(E * N / G) updates, as in the official code); global batch `g` is the slice
[g*G, (g+1)*G) of that stream, split over ranks and micro-batches by position. The reparameterisation noise of the
whole global batch is drawn from a generator seeded by (seed, step). The state of a run is therefore its weights,
its optimizer moments and its step; resume is exact, and the result does not depend on the world size or
micro-batch (up to float summation order).

Lineage: official FlatDINO `train.py` (JAX/optax). Departures: gradients are summed across ranks with an explicit
all-reduce after local accumulation (each micro-batch loss weighted by its share of the global batch) instead of
DDP's average, which makes the global-batch mean exact for any world size; stored features offer only the centre
crop and its flip (one picked at random per sample and epoch), while `--source images` applies the official
random-resized crop (scale 0.3-1) + flip and bilinear antialiased resize on the fly; orbax keeps 2 best checkpoints,
we keep the best and the last.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from models.flatdino import (PRESETS, FlatDINO, FlatDINOConfig, config_to_json, kl_anneal, load_weights,
                             param_groups, vae_loss, wsd_lr)
from pipeline.config import command_from_config, config_to_dict, opt
from pipeline.manifest import (ArtifactError, Manifest, OutputDir, UserError, atomic_write_bytes, file_sha256,
                               require_complete)
from pipeline.metrics import elementwise_mean_std
from pipeline.runtime import (Dist, autocast, barrier, current_dist, environment, get_logger, progress,
                              resolve_precision, stage_device, stable_seed, torch_generator)
from pipeline.shards import FeatureShards, ImageShards, load_rgb

log = get_logger(__name__)

LR_INIT, LR_FINAL = 1e-6, 1e-8  # SPEC 5.2
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class Variant(NamedTuple):
    """Run length and schedule shape (official `fast|med|long|ext`), plus the demo's CPU-sized run."""

    epochs: int
    decay_fraction: float
    warmup_epochs: float
    val_epochs: float
    global_batch: int
    lr_peak: float


VARIANTS: dict[str, Variant] = {
    "fast": Variant(50, 0.10, 5, 5, 512, 1e-4),
    "med": Variant(100, 0.15, 5, 5, 512, 1e-4),
    "long": Variant(150, 0.15, 5, 5, 512, 1e-4),
    "ext": Variant(300, 0.25, 5, 5, 512, 1e-4),
    # demo: 80 epochs of the 1,617 training digits = 2,021 updates of 64 (about 2 minutes on 2 CPU cores with the
    # demo preset and --standardize; bench/RESULTS.md has the search that led here).
    "demo": Variant(80, 0.25, 1, 10, 64, 1e-3),
}


class NonFiniteLoss(UserError):
    """The loss or gradient norm became NaN/inf; the weights were not updated."""


@dataclass(frozen=True)
class Config:
    out: Path = field(metadata=opt("output directory (checkpoints best/ and last/, state/, tb/, loss.png)"))
    features: Path | None = field(default=None, metadata=opt("features artifact (flatdino features --out); "
                                                             "its 'train' split trains, its 'val' split validates"))
    source: Literal["features", "images"] = field(default="features", metadata=opt(
        "features: stored feature shards; images: DINOv2 features on the fly with random-resized crop + flip"))
    images: Path | None = field(default=None, metadata=opt("images artifact (with --source images)"))
    encoder: str | None = field(default=None, metadata=opt("RAE directory or hub id (with --source images)"))
    preset: str = field(default="32-bl-128", metadata=opt(f"FlatDINO preset: {', '.join(PRESETS)}"))
    num_tokens: int | None = field(default=None, metadata=opt("override the preset's latent tokens T"))
    latent_dim: int | None = field(default=None, metadata=opt("override the preset's latent channels F"))
    encoder_registers: int = field(default=0, metadata=opt("disposable encoder registers (official -erN)"))
    decoder_registers: int = field(default=0, metadata=opt("disposable decoder registers (official -drN)"))
    standardize: bool = field(default=False, metadata=opt(
        "not in the paper: the encoder sees (X - mean) / max(std, 0.1) per patch and channel, statistics of the "
        "train features stored with the weights; the demo needs it (its random-encoder features are dominated by "
        "their per-position mean). Needs --source features; two passes over them when they do not fit --cache-gb"))
    variant: Literal["fast", "med", "long", "ext", "demo"] = field(default="long", metadata=opt(
        "run length: fast 50 / med 100 / long 150 / ext 300 epochs (decay over the last 10/15/15/25%); demo: CPU"))
    epochs: int | None = field(default=None, metadata=opt("override the variant's epochs"))
    steps: int | None = field(default=None, metadata=opt("override the total number of updates (schedule scales)"))
    global_batch: int | None = field(default=None, metadata=opt("samples per update (variant default: 512)"))
    micro_batch: int = field(default=128, metadata=opt("samples per forward per process (gradient accumulation)"))
    lr_peak: float | None = field(default=None, metadata=opt("peak learning rate (variant default: 1e-4)"))
    weight_decay: float = field(default=0.02, metadata=opt("AdamW weight decay on 2-D weight matrices only"))
    grad_clip: float = field(default=10.0, metadata=opt("global gradient-norm clip"))
    kl_weight: float | None = field(default=None, metadata=opt("beta; default 5.12e-4 / (T*F)"))
    kl_anneal_steps: int = field(default=0, metadata=opt("linear KL warm-up from 0 over this many updates"))
    free_bits: float = field(default=0.0, metadata=opt("per-dimension KL floor (official -fbX)"))
    val_every: int | None = field(default=None, metadata=opt("validate every N updates (default: every 5 epochs)"))
    ckpt_every: int | None = field(default=None, metadata=opt("save last/ + state/ every N updates "
                                                              "(default: val_every)"))
    val_samples: int | None = field(default=None, metadata=opt("validate on the first N val samples (default all)"))
    seed: int = field(default=0, metadata=opt("seed of init, data order and noise"))
    precision: Literal["fp32", "bf16", "auto"] = field(default="auto", metadata=opt(
        "auto: bf16 autocast on CUDA with bf16 support, fp32 otherwise"))
    log_every: int = field(default=20, metadata=opt("TensorBoard/curve logging interval (updates)", runtime=True))
    max_steps_this_run: int | None = field(default=None, metadata=opt(
        "stop (resumably) after this many updates in this invocation, e.g. to fit a job time limit", runtime=True))
    cache_gb: float = field(default=8.0, metadata=opt("hold the features in RAM when they fit in this many GB",
                                                      runtime=True))
    num_workers: int = field(default=4, metadata=opt("reader threads", runtime=True))
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda ... (ignored under accelerate)", runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing run made with another config",
                                                        runtime=True))


@dataclass(frozen=True)
class Plan:
    """Resolved schedule: everything that maps an update index to data, learning rate and events."""

    global_batch: int
    steps_per_epoch: int
    total: int
    warmup: int
    decay: int
    lr_peak: float
    val_every: int
    ckpt_every: int
    beta: float

    def lr(self, step: int) -> float:
        return wsd_lr(step, self.total, self.warmup, self.decay, LR_INIT, self.lr_peak, LR_FINAL)


def resolve_model(cfg: Config, feature_dim: int, num_patches: int) -> FlatDINOConfig:
    """The preset with the config's overrides; the feature shape comes from the data."""
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown --preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[cfg.preset]
    return replace(base, num_tokens=cfg.num_tokens or base.num_tokens, latent_dim=cfg.latent_dim or base.latent_dim,
                   feature_dim=feature_dim, num_patches=num_patches, encoder_registers=cfg.encoder_registers,
                   decoder_registers=cfg.decoder_registers, standardize=cfg.standardize)


def make_plan(cfg: Config, num_samples: int, model_cfg: FlatDINOConfig) -> Plan:
    """Update counts as in the official code: steps/epoch = N // G, total = E * N // G (SPEC 5.2)."""
    v = VARIANTS[cfg.variant]
    g = cfg.global_batch or v.global_batch
    epochs = cfg.epochs or v.epochs
    spe = num_samples // g
    if spe == 0:
        raise UserError(f"the train split has {num_samples} samples, fewer than one global batch of {g}; "
                        "lower --global-batch")
    total = cfg.steps or epochs * num_samples // g
    scale = 1.0 if cfg.steps is None else total / (epochs * spe)  # --steps stretches the schedule
    warmup = round(v.warmup_epochs * spe * scale)
    decay = round(int(v.decay_fraction * epochs) * spe * scale)
    val_every = cfg.val_every or max(1, round(v.val_epochs * spe * scale))
    beta = model_cfg.default_kl_weight if cfg.kl_weight is None else cfg.kl_weight
    return Plan(g, spe, total, warmup, decay, cfg.lr_peak or v.lr_peak, val_every, cfg.ckpt_every or val_every, beta)


def rank_slices(plan: Plan, micro: int, dist: Dist) -> list[slice]:
    """Positions (within a global batch) of this rank's micro-batches; the split never changes the global batch."""
    if plan.global_batch % dist.world:
        raise UserError(f"--global-batch {plan.global_batch} is not divisible by the {dist.world} processes")
    per_rank = plan.global_batch // dist.world
    lo = dist.rank * per_rank
    return [slice(s, min(s + micro, lo + per_rank)) for s in range(lo, lo + per_rank, micro)]


# ----------------------------------------------------------------------------------------------- data


class StreamOrder:
    """Stream position -> (sample, view): a fresh permutation and random view per epoch, seeded by (seed, epoch)."""

    def __init__(self, seed: int, num_samples: int, views: int):
        self.seed, self.n, self.views = seed, num_samples, views
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._epochs:
            rng = np.random.default_rng(stable_seed(self.seed, "order", e))
            perm = rng.permutation(self.n)
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}
            self._epochs[e] = (perm, rng.integers(0, self.views, self.n))
        return self._epochs[e]

    def lookup(self, positions: range) -> tuple[np.ndarray, np.ndarray]:
        """(samples, views) for stream positions."""
        pairs = [self.epoch(p // self.n) for p in positions]
        samples = np.array([perm[p % self.n] for p, (perm, _) in zip(positions, pairs)], dtype=np.int64)
        views = np.array([v[p % self.n] for p, (_, v) in zip(positions, pairs)], dtype=np.int64)
        return samples, views


class TrainData:
    """Interface of the training readers: train batches by stream position, val batches by index."""

    kind: str
    path: Path
    fingerprint: str
    encoder: dict
    num_train: int
    num_val: int
    num_patches: int
    dim: int

    def setup(self, device: torch.device, precision: str) -> None:
        """Move any model the reader runs to the training device."""

    def batch(self, positions: range) -> torch.Tensor:
        """(b, N, D) float32 tokens for train stream positions."""
        raise NotImplementedError

    def prefetch(self, ranges: list[range]) -> None:
        """Hint: these train positions are needed next (readers may start loading them)."""

    def val_batch(self, indices: range) -> torch.Tensor:
        """(b, N, D) float32 tokens of val samples (centre view)."""
        raise NotImplementedError


class FeatureData(TrainData):
    """Stored feature shards: train on a random view per sample and epoch, validate on view 0 (centre crop)."""

    kind = "features"

    def __init__(self, path: Path, seed: int, cache_bytes: int, num_workers: int):
        self.path, self.shards = Path(path), FeatureShards(path)
        m = self.shards.manifest
        self.fingerprint, self.encoder = m.fingerprint, m.extra["encoder"]
        self.num_patches, self.dim, self.views = self.shards.num_patches, self.shards.dim, self.shards.views
        self.num_train = self.shards.num_samples("train")
        self.num_val = self.shards.num_samples("val") if "val" in self.shards.splits else 0
        if self.num_val == 0:
            raise ArtifactError(f"{path} has no 'val' split to validate on; make the images with --val-fraction > 0")
        self.order = StreamOrder(seed, self.num_train, self.views)
        self.num_workers, self._pool, self._prefetch_pool, self._pending = num_workers, None, None, {}
        per_sample = self.views * self.num_patches * self.dim * 2
        fits = (self.num_train + self.num_val) * per_sample <= cache_bytes
        self.cache = {s: self._load_all(s) for s in ("train", "val")} if fits else None

    def _checked(self, key: str, feats: np.ndarray) -> np.ndarray:
        """`feats` if it is a finite (V, N, D) array, else an ArtifactError naming the sample."""
        expected = (self.views, self.num_patches, self.dim)
        if feats.shape != expected:
            raise ArtifactError(f"{self.path}: sample {key} has features of shape {feats.shape}, expected "
                                f"{expected}; re-run flatdino features")
        if not np.isfinite(feats).all():
            raise ArtifactError(f"{self.path}: sample {key} has non-finite features; re-run flatdino features")
        return feats

    def _load_all(self, split: str) -> np.ndarray:
        return np.stack([self._checked(k, f) for _, k, _, f in self.shards.iter(split)])  # (n, V, N, D) float16

    def _get(self, i: int, split: str) -> np.ndarray:
        key, _, feats = self.shards.get(i, split)
        return self._checked(key, feats)

    def _feats(self, split: str, samples: np.ndarray) -> np.ndarray:
        if self.cache is not None:
            return self.cache[split][samples]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.num_workers)
        return np.stack(list(self._pool.map(lambda i: self._get(int(i), split), samples)))

    def prefetch(self, ranges: list[range]) -> None:
        """Start reading the given train positions in the background (only when not cached in RAM)."""
        if self.cache is not None:
            return
        if self._prefetch_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._prefetch_pool = ThreadPoolExecutor(1)
        for r in ranges:
            self._pending[(r.start, r.stop)] = self._prefetch_pool.submit(self._read_train, r)

    def _read_train(self, positions: range) -> np.ndarray:
        samples, views = self.order.lookup(positions)
        return self._feats("train", samples)[np.arange(len(samples)), views]  # (b, N, D)

    def batch(self, positions: range) -> torch.Tensor:
        pending = self._pending.pop((positions.start, positions.stop), None)
        feats = self._read_train(positions) if pending is None else pending.result()
        return torch.from_numpy(feats).float()

    def val_batch(self, indices: range) -> torch.Tensor:
        return torch.from_numpy(self._feats("val", np.asarray(indices))[:, 0]).float()

    def feature_stats(self, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (N, D) over every train sample and view, exact float64 in a fixed order (so every rank
        computes the same bits); for models with `standardize=True`. Two passes: from RAM, or over the shards."""
        bar = progress(2 * self.num_train, "feature stats", "sample", dist)

        def chunks():
            if self.cache is not None:
                parts = (self.cache["train"][s : s + 256] for s in range(0, self.num_train, 256))
            else:
                parts = (self._checked(k, f)[None] for _, k, _, f in self.shards.iter("train"))
            for part in parts:  # (b, V, N, D) -> (b V, N, D)
                bar.update(len(part))
                yield part.reshape(-1, self.num_patches, self.dim)

        mean, std = elementwise_mean_std(chunks)
        bar.close()
        return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def random_resized_crop_box(w: int, h: int, rng: np.random.Generator, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, right, bottom) of a random-resized crop: torchvision's algorithm (10 tries, centre fallback)."""
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    cw, ch = w, h
    if w / h < ratio[0]:
        ch = round(w / ratio[0])
    elif w / h > ratio[1]:
        cw = round(h * ratio[1])
    x, y = (w - cw) // 2, (h - ch) // 2
    return x, y, x + cw, y + ch


def _area_resize(image, size: int = 256):
    """cv2 INTER_AREA-like resize to size x size: box filter when shrinking, bilinear when enlarging."""
    from PIL import Image

    shrink = image.width >= size and image.height >= size
    return image.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)


def augment_image(data: bytes, seed: int, position: int) -> torch.Tensor:
    """Official AE-training augmentation: random-resized crop (0.3-1) to 256, flip p=0.5 -> uint8 (3, 256, 256)."""
    from PIL import Image

    from models.encoder import pil_to_uint8

    image = load_rgb(data)
    rng = np.random.default_rng(stable_seed(seed, "augment", position))
    image = _area_resize(image.crop(random_resized_crop_box(image.width, image.height, rng)))
    if rng.uniform() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pil_to_uint8(image)


class ImageData(TrainData):
    """Image shards encoded on the fly by the frozen DINOv2 (bilinear antialiased resize to 224, SPEC 2.2)."""

    kind = "images"

    def __init__(self, path: Path, encoder: str, seed: int, num_workers: int):
        from models.encoder import FeatureEncoder, load_rae

        self.path, self.images, self.seed = Path(path), ImageShards(path), seed
        self.model = FeatureEncoder(load_rae(encoder)).eval()
        self.fingerprint = self.images.manifest.fingerprint
        self.encoder = {"source": str(encoder), "fingerprint": self.model.fingerprint}
        self.num_patches, self.dim = self.model.num_patches, self.model.dim
        self.num_train, self.num_val = self.images.num_samples("train"), self.images.num_samples("val")
        self.order = StreamOrder(seed, self.num_train, 1)
        self.num_workers, self.device, self.precision = num_workers, torch.device("cpu"), "fp32"
        self._index: dict[str, list] = {}

    def setup(self, device: torch.device, precision: str) -> None:
        self.model.to(device)
        self.device, self.precision = device, precision

    def _bytes(self, split: str, i: int) -> bytes:
        if split not in self._index:
            self._index[split] = [data for _, _, _, data, _ in self.images.iter(split)]
        return self._index[split][i]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            return self.model.encode_images(x.to(self.device), mode="bilinear").patches.float().cpu()

    def batch(self, positions: range) -> torch.Tensor:
        samples, _ = self.order.lookup(positions)
        x = torch.stack([augment_image(self._bytes("train", int(s)), self.seed, p) for s, p in zip(samples, positions)])
        return self._encode(x)

    def val_batch(self, indices: range) -> torch.Tensor:
        from models.encoder import pil_to_uint8

        x = torch.stack([pil_to_uint8(_area_resize(load_rgb(self._bytes("val", i)))) for i in indices])
        return self._encode(x)


# ----------------------------------------------------------------------------------------------- one update


@dataclass
class StepStats:
    """Sums over this process's samples of one global batch (all-reduced to global sums when distributed)."""

    total: float = 0.0
    recon: float = 0.0
    kl: float = 0.0
    cosine: float = 0.0
    kl_per_token: torch.Tensor | None = None

    def add(self, loss, cos: torch.Tensor, n: int) -> None:
        self.total += loss.total.item() * n
        self.recon += loss.recon.item() * n
        self.kl += loss.kl.item() * n
        self.cosine += cos.item() * n
        kpt = loss.kl_per_token.double().cpu() * n
        self.kl_per_token = kpt if self.kl_per_token is None else self.kl_per_token + kpt

    def vector(self) -> torch.Tensor:
        return torch.cat([torch.tensor([self.total, self.recon, self.kl, self.cosine], dtype=torch.float64),
                          self.kl_per_token])


def patch_cosine(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between reconstructed and true patch tokens: (B, N, D) x2 -> scalar."""
    return F.cosine_similarity(recon.float(), target.float(), dim=-1).mean()


def accumulate_gradients(model: FlatDINO, tokens: torch.Tensor, noise: torch.Tensor, weight: float, beta: float,
                         free_bits: float, precision: str) -> tuple:
    """Forward/backward one micro-batch, adding weight * loss gradients into .grad. Returns (loss, cosine)."""
    with autocast(precision, tokens.device):
        out = model(tokens, noise)
    loss = vae_loss(out.recon, tokens, out.posterior, beta, free_bits)
    (loss.total * weight).backward()
    return loss, patch_cosine(out.recon.detach(), tokens)


def all_reduce_sum(tensors: list[torch.Tensor], dist: Dist) -> None:
    """In-place sum over processes (one flat buffer); no-op for a single or emulated process."""
    if dist.world == 1 or not torch.distributed.is_initialized():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def local_gradients(model, data: TrainData, plan: Plan, cfg: Config, step: int, dist: Dist, device,
                    precision) -> StepStats:
    """Accumulate this process's share of global batch `step` into .grad (each micro-batch weighted by n / G)."""
    g = plan.global_batch
    noise = torch.randn(g, *model.cfg.latent_shape, generator=torch_generator(cfg.seed, "noise", step))
    beta = plan.beta * kl_anneal(step, cfg.kl_anneal_steps)
    stats = StepStats()
    slices = rank_slices(plan, cfg.micro_batch, dist)
    for i, sl in enumerate(slices):
        nxt = slices[i + 1] if i + 1 < len(slices) else slices[0]
        base = step * g if i + 1 < len(slices) else (step + 1) * g
        data.prefetch([range(base + nxt.start, base + nxt.stop)])  # overlap reading with this micro-batch
        tokens = data.batch(range(step * g + sl.start, step * g + sl.stop)).to(device)
        n = sl.stop - sl.start
        loss, cos = accumulate_gradients(model, tokens, noise[sl].to(device), n / g, beta, cfg.free_bits, precision)
        stats.add(loss, cos, n)
    return stats


def train_step(model, opt, data: TrainData, plan: Plan, cfg: Config, step: int, dist: Dist, device, precision) -> dict:
    """One optimizer update over global batch `step`; raises NonFiniteLoss before touching the weights."""
    stats = local_gradients(model, data, plan, cfg, step, dist, device, precision)
    params = [p for p in model.parameters() if p.grad is not None]
    summed = stats.vector().to(device)
    all_reduce_sum([p.grad for p in params] + [summed], dist)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    values = (summed.cpu() / plan.global_batch).tolist()
    if not (math.isfinite(values[0]) and torch.isfinite(grad_norm)):
        raise NonFiniteLoss(f"non-finite loss/gradient at update {step} (loss {values[0]}, grad norm "
                            f"{grad_norm.item()}); the weights were not updated and the last checkpoint in "
                            f"{cfg.out}/last is intact. Lower --lr-peak, use --precision fp32, or check the features.")
    for group in opt.param_groups:
        group["lr"] = plan.lr(step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": values[0], "recon": values[1], "kl": values[2], "cosine": values[3], "lr": plan.lr(step),
            "grad_norm": grad_norm.item(), "kl_per_token": values[4:]}


# ----------------------------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: FlatDINO, data: TrainData, cfg: Config, dist: Dist, device, precision) -> dict:
    """Huber loss and patch cosine on the val split with z = mu, averaged over samples (all processes)."""
    model.eval()
    n = data.num_val if cfg.val_samples is None else min(cfg.val_samples, data.num_val)
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(dist.rank * cfg.micro_batch, n, dist.world * cfg.micro_batch):
        tokens = data.val_batch(range(start, min(start + cfg.micro_batch, n))).to(device)
        with autocast(precision, device):
            recon = model(tokens).recon
        per_sample = F.huber_loss(recon.float(), tokens, delta=1.0, reduction="none").mean(dim=(1, 2))
        cos = F.cosine_similarity(recon.float(), tokens, dim=-1).mean(dim=1)
        sums += torch.stack([per_sample.sum(), cos.sum(), per_sample.new_tensor(len(tokens))]).double().cpu()
    sums = sums.to(device)
    all_reduce_sum([sums], dist)
    model.train()
    total, cos, count = sums.cpu().tolist()
    return {"val_loss": total / max(count, 1), "val_cosine": cos / max(count, 1)}


# ----------------------------------------------------------------------------------------------- checkpoints


def _swap_dir(tmp: Path, final: Path) -> None:
    """Replace directory `final` by `tmp`: final -> final.old, tmp -> final, drop the old one."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dirs(out: Path) -> None:
    """Finish a swap interrupted between its two renames (a `.old` left without its replacement)."""
    for name in ("best", "last", "state"):
        old, final = out / (name + ".old"), out / name
        if old.exists() and not final.exists():
            os.replace(old, final)
        shutil.rmtree(out / (name + ".tmp"), ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def save_weights(out: Path, name: str, model: FlatDINO, meta: dict) -> None:
    """Write `<out>/<name>/` = model.safetensors + config.json atomically (tmp dir, fsync, rename)."""
    from safetensors.torch import save_file

    tmp = out / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _fsync_tree(tmp)
    _swap_dir(tmp, out / name)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-able tensors and a JSON-able rest (no pickle)."""
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_tensors`."""
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_state(out: Path, model: FlatDINO, opt, trainer: dict) -> None:
    """`<out>/state/`: weights, optimizer moments and trainer JSON (step, best, curves), swapped in atomically."""
    from safetensors.torch import save_file

    tmp = out / "state.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    tensors, meta = optimizer_tensors(opt)
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "trainer.json").write_text(json.dumps({**trainer, "optimizer": meta}, indent=2) + "\n")
    _fsync_tree(tmp)
    _swap_dir(tmp, out / "state")


def load_state(out: Path, model: FlatDINO, opt, device) -> dict | None:
    """Restore weights and optimizer from `<out>/state/`; returns the trainer dict, or None for a fresh run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = out / "state"
    if not (state / "trainer.json").exists():
        return None
    try:
        trainer = json.loads((state / "trainer.json").read_text())
        weights, moments = load_file(state / "model.safetensors"), load_file(state / "optimizer.safetensors")
    except (OSError, ValueError, SafetensorError) as e:  # a truncated or missing file; JSONDecodeError is a ValueError
        raise ArtifactError(f"{state}: unreadable training state ({e}); delete {state} to restart training from "
                            "update 0 (best/ and last/ stay until the new run replaces them), or pass --overwrite "
                            "to wipe the whole run") from e
    model.load_state_dict(weights, strict=True)  # loaded on CPU ("cpu:0" is not a safetensors device);
    opt.load_state_dict(optimizer_state_dict(moments, trainer.pop("optimizer")))  # load_state_dict moves the state
    return trainer


def fresh_trainer() -> dict:
    return {"step": 0, "best_val": None, "best_step": None, "curve": [], "val_curve": []}


# ----------------------------------------------------------------------------------------------- reporting


def write_loss_png(out: Path, trainer: dict) -> None:
    """Train loss (log scale) and val loss against updates, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if trainer["curve"]:
        s, loss = zip(*[(c["step"], c["loss"]) for c in trainer["curve"]])
        ax.plot(s, loss, label="train loss", lw=1)
    if trainer["val_curve"]:
        s, loss = zip(*[(c["step"], c["val_loss"]) for c in trainer["val_curve"]])
        ax.plot(s, loss, "o-", label="val Huber (z = mu)")
    ax.set(xlabel="update", ylabel="loss", yscale="log", title="FlatDINO VAE")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out / "loss.png", buf.getvalue())


def tb_log(writer, step: int, stats: dict, samples_per_s: float) -> None:
    if writer is None:
        return
    for k in ("loss", "recon", "kl", "cosine", "lr", "grad_norm"):
        writer.add_scalar(f"train/{k}", stats[k], step)
    for t, v in enumerate(stats["kl_per_token"]):
        writer.add_scalar(f"kl_per_token/{t:02d}", v, step)
    writer.add_scalar("train/samples_per_s", samples_per_s, step)


# ----------------------------------------------------------------------------------------------- the stage


def open_data(cfg: Config) -> TrainData:
    """The train/val reader for --source features or images."""
    if cfg.source == "features":
        if cfg.features is None:
            raise UserError("--features DIR is required with --source features (make one with `flatdino features`)")
        return FeatureData(cfg.features, cfg.seed, int(cfg.cache_gb * 2**30), cfg.num_workers)
    if cfg.standardize:
        raise UserError("--standardize takes its statistics from a features artifact; use it with --source features")
    if cfg.images is None or cfg.encoder is None:
        raise UserError("--source images needs --images DIR and --encoder (an RAE directory or hub id)")
    return ImageData(cfg.images, cfg.encoder, cfg.seed, num_workers=cfg.num_workers)


def build_model(model_cfg: FlatDINOConfig, seed: int, device) -> FlatDINO:
    """A FlatDINO initialised from `seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed(seed, "init"))
        model = FlatDINO(model_cfg)
    return model.to(device).train()


def init_dist() -> Dist:
    """`current_dist()`, but on a machine without CUDA first bring accelerate up in CPU (gloo) mode.

    `PartialState()` without `cpu=True` silently reports a single process on CPU-only hosts under
    `accelerate launch --multi_gpu`, so every rank would believe it is rank 0 of 1.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        from accelerate import PartialState

        PartialState(cpu=True)
    return current_dist()


def run(cfg: Config, dist: Dist | None = None) -> Manifest | None:
    """Train (or resume) a FlatDINO VAE; returns the manifest when the schedule is complete, else None."""
    dist, t0 = dist or init_dist(), time.time()
    data = open_data(cfg)
    model_cfg = resolve_model(cfg, data.dim, data.num_patches)
    plan = make_plan(cfg, data.num_train, model_cfg)
    config = {**config_to_dict(cfg, semantic_only=True), "input": data.fingerprint}
    with OutputDir(cfg.out, "train_vae", config, overwrite=cfg.overwrite and dist.is_main, lock=dist.is_main) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        if dist.is_main:
            recover_dirs(od.path)
        device = stage_device(cfg.device, dist)
        precision = resolve_precision(cfg.precision, device)
        data.setup(device, precision)
        model = build_model(model_cfg, cfg.seed, device)
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=plan.lr(0), betas=ADAM_BETAS, eps=ADAM_EPS)
        trainer = load_state(od.path, model, opt, device)
        if trainer is None:
            trainer = fresh_trainer()
            if model_cfg.standardize:  # fixed for the whole run; resumed runs load them with the weights
                model.set_feature_stats(*(t.to(device) for t in data.feature_stats(dist)))
        meta = {"model": config_to_json(model_cfg), "train": config, "plan": plan.__dict__}
        log.info("train-vae: %s, %d train / %d val samples, %d updates of %d (warmup %d, decay %d), beta %.3g, %s",
                 cfg.preset, data.num_train, data.num_val, plan.total, plan.global_batch, plan.warmup, plan.decay,
                 plan.beta, precision)
        trainer = _loop(model, opt, data, plan, cfg, trainer, meta, od.path, dist, device, precision)
        barrier(dist)
        if trainer["step"] < plan.total or not dist.is_main:
            return None
        return _finish(od, cfg, data, model_cfg, plan, trainer, time.time() - t0)


def _loop(model, opt, data, plan: Plan, cfg: Config, trainer: dict, meta: dict, out: Path, dist, device, precision):
    """Updates from trainer['step'] to the end of the plan (or the per-invocation budget), with val and checkpoints."""
    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=trainer["step"] or None)
    stop = plan.total if cfg.max_steps_this_run is None else min(plan.total, trainer["step"] + cfg.max_steps_this_run)
    bar = progress(plan.total, "train-vae", "step", dist, initial=trainer["step"])
    tick = time.time()
    while trainer["step"] < stop:
        step = trainer["step"]
        stats = train_step(model, opt, data, plan, cfg, step, dist, device, precision)
        trainer["step"] = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", cos=f"{stats['cosine']:.3f}", refresh=False)
        if trainer["step"] % cfg.log_every == 0 or trainer["step"] == plan.total:
            rate = cfg.log_every * plan.global_batch / max(time.time() - tick, 1e-9)
            tb_log(writer, trainer["step"], stats, rate)
            trainer["curve"].append({k: stats[k] for k in ("loss", "recon", "kl", "cosine", "lr")}
                                    | {"step": trainer["step"], "samples_per_s": rate})
            tick = time.time()
        _events(model, opt, data, plan, cfg, trainer, meta, out, dist, device, precision, writer)
    if trainer["step"] < plan.total and trainer["step"] % plan.ckpt_every:
        _checkpoint(model, opt, trainer, meta, out, dist)  # stopped by --max-steps-this-run: keep the position
    bar.close()
    if writer is not None:
        writer.close()
    return trainer


def _events(model, opt, data, plan, cfg, trainer, meta, out, dist, device, precision, writer) -> None:
    """Validation (best/ on improvement) and checkpointing (last/ + state/) after an update."""
    step = trainer["step"]
    final = step == plan.total
    if step % plan.val_every == 0 or final:
        val = validate(model, data, cfg, dist, device, precision)
        trainer["val_curve"].append({"step": step, **val})
        if writer is not None:
            writer.add_scalar("val/loss", val["val_loss"], step)
            writer.add_scalar("val/cosine", val["val_cosine"], step)
        log.info("update %d: val Huber %.5f, cosine %.4f", step, val["val_loss"], val["val_cosine"])
        if trainer["best_val"] is None or val["val_loss"] < trainer["best_val"]:
            trainer["best_val"], trainer["best_step"] = val["val_loss"], step
            if dist.is_main:
                save_weights(out, "best", model, {**meta, "step": step, **val})
    if step % plan.ckpt_every == 0 or final:
        _checkpoint(model, opt, trainer, meta, out, dist)


def _checkpoint(model, opt, trainer: dict, meta: dict, out: Path, dist: Dist) -> None:
    """last/, loss.png, then state/: state/ is the commit record, so a kill before it redoes all three."""
    if dist.is_main:
        save_weights(out, "last", model, {**meta, "step": trainer["step"]})
        write_loss_png(out, trainer)
        save_state(out, model, opt, trainer)
    barrier(dist)


def _finish(od: OutputDir, cfg: Config, data: TrainData, model_cfg, plan: Plan, trainer: dict, seconds) -> Manifest:
    out = od.path
    shards = [{"name": f"{w}/model.safetensors", "sha256": file_sha256(out / w / "model.safetensors"),
               "bytes": (out / w / "model.safetensors").stat().st_size} for w in ("best", "last")]
    last_val = trainer["val_curve"][-1]
    manifest = Manifest(
        stage="train_vae", shards=shards, versions=environment(), complete=True,
        counts={"written": plan.total, "skipped": 0, "failed": 0},
        inputs={data.kind: {"path": str(data.path), "fingerprint": data.fingerprint}},
        models={w: {"path": f"{w}/model.safetensors", "sha256": s["sha256"]} for w, s in zip(("best", "last"), shards)},
        extra={"best_step": trainer["best_step"], "val_loss": trainer["best_val"], "last_step": trainer["step"],
               "last_val_loss": last_val["val_loss"], "last_val_cosine": last_val["val_cosine"],
               "model": config_to_json(model_cfg), "plan": plan.__dict__, "encoder": data.encoder,
               "latent_shape": list(model_cfg.latent_shape)},
        timings={"seconds": round(seconds, 3), "updates_per_second": round(plan.total / max(seconds, 1e-9), 3)},
    )
    return od.finish(manifest)


def load_flatdino(run_dir: str | Path, which: Literal["best", "last"] = "best", device="cpu"):
    """(model, FlatDINOConfig, manifest) of a finished train-vae run; the best-val checkpoint by default."""
    manifest = require_complete(run_dir, "train_vae")
    path = Path(run_dir) / which
    sha = file_sha256(path / "model.safetensors")
    if sha != manifest.models[which]["sha256"]:
        raise ArtifactError(f"{path}/model.safetensors does not match its manifest (sha256 {sha[:12]}...); "
                            "the run directory was modified: re-run `flatdino train-vae`")
    model, model_cfg = load_weights(path, device)
    return model, model_cfg, manifest


def _summary(m: Manifest) -> str:
    e = m.extra
    return (f"train-vae: best val Huber {e['val_loss']:.5f} at update {e['best_step']}, last {e['last_val_loss']:.5f}"
            f" (cosine {e['last_val_cosine']:.4f}), {m.timings['seconds']:.0f} s")


cli = command_from_config(Config, run, "train-vae", __doc__.split("\n\n")[0], summary=_summary)
