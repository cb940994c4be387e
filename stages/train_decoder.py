"""`flatdino train-decoder`: train an RAE pixel decoder (DINOv2 patch features -> RGB) on image + feature shards.

Lineage: RAE's decoder training (`bytetriper/RAE`, `src/train.py`: ViT-MAE decoder on frozen, noise-augmented
DINOv2 features, L1 + LPIPS (+ GAN) in pixel space, EMA weights); the network is diffusers' `RAEDecoder` inside an
`AutoencoderRAE`, so the output directory is a complete RAE directory that `models.encoder.load_rae` reads.

Departures, all deliberate:
- No GAN / discriminator term (RAE adds one after a warm-up); L1 (+ optional LPIPS) only.
- L1 is taken in the decoder's own ImageNet-normalised output space.
- Feature noise (RAE's tau): per sample sigma ~ U[0, tau], tokens + sigma * N(0, I), drawn from generators seeded by
  (seed, step), like the batch order, so a resumed run is bit-identical and the world size only splits the batch.
- EMA decay is warmed up as min(decay, (1 + step) / (10 + step)), so short demo runs are not dominated by the init.
- LPIPS runs only from a local weights file (no download): VGG16 trunk (torchvision layout) + LPIPS v0.1 heads.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from models.encoder import (IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_NAME, FeatureEncoder, PixelDecoder, adm_center_crop,
                            load_rae, pil_to_uint8)
from pipeline.config import command_from_config, config_to_dict, opt
from pipeline.grids import save_grid
from pipeline.manifest import (ArtifactError, Manifest, OutputDir, UserError, atomic_write_bytes, atomic_write_json,
                               file_sha256)
from pipeline.runtime import autocast, current_dist, environment, get_logger, progress, resolve_device, torch_generator
from pipeline.shards import FeatureShards, ImageShards, IMAGE_EXTS, index_tar_shard, load_rgb, read_member

log = get_logger(__name__)

STAGE = "train_decoder"
MIN_LR_FRACTION = 0.1  # cosine decay ends at lr * this
EMA_WARMUP = 10  # EMA decay warm-up constant: min(decay, (1 + step) / (EMA_WARMUP + step))
# Decoder architectures (AutoencoderRAE decoder_* arguments). "same" keeps the encoder directory's decoder and starts
# from its weights (fine-tuning); the others start from a seeded random init.
DECODER_SIZES: dict[str, dict] = {
    "tiny": dict(decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                 decoder_intermediate_size=512),
    "small": dict(decoder_hidden_size=256, decoder_num_hidden_layers=4, decoder_num_attention_heads=4,
                  decoder_intermediate_size=1024),
    "xl": dict(decoder_hidden_size=1152, decoder_num_hidden_layers=28, decoder_num_attention_heads=16,
               decoder_intermediate_size=4096),
}


@dataclass(frozen=True)
class TrainPreset:
    """Defaults of the training knobs a preset fills in (any of them can be overridden on the command line)."""

    decoder_size: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    ema_decay: float
    noise_tau: float
    eval_every: int
    checkpoint_every: int


# "demo": the digits demo on a 2-core CPU in about two minutes, a fresh tiny decoder. "rae": RAE's decoder recipe
# (tau 0.8 = "n08", lr 2e-4, EMA 0.9999, ~16 epochs of ImageNet at batch 512) starting from the encoder directory's
# own decoder ("same"): with the pretrained RAE directory this fine-tunes the n08 decoder; `--steps 0` just packages
# that decoder, unchanged, as this stage's artifact (with its validation PSNR), which is what the paper uses (frozen).
PRESETS: dict[str, TrainPreset] = {
    "demo": TrainPreset(decoder_size="tiny", steps=200, batch_size=16, lr=1e-3, warmup_steps=20, weight_decay=0.0,
                        ema_decay=0.99, noise_tau=0.3, eval_every=100, checkpoint_every=100),
    "rae": TrainPreset(decoder_size="same", steps=40_000, batch_size=512, lr=2e-4, warmup_steps=1000,
                       weight_decay=0.0, ema_decay=0.9999, noise_tau=0.8, eval_every=2000, checkpoint_every=1000),
}


@dataclass(frozen=True)
class Config:
    images: Path = field(metadata=opt("images artifact the features were computed from (flatdino images --out)"))
    features: Path = field(metadata=opt("features artifact (flatdino features --out)"))
    encoder: str = field(metadata=opt("RAE directory that produced the features (its encoder weights are copied; "
                                      "its decoder is the starting point with --decoder-size same)"))
    out: Path = field(metadata=opt("output RAE directory + manifest, e.g. shards/decoder/demo"))
    preset: Literal["rae", "demo"] = field(default="rae", metadata=opt(
        "defaults of the knobs left unset: rae (RAE's recipe, tau 0.8, from the encoder dir's decoder) or demo (a "
        "fresh tiny decoder, ~2 min on CPU)"))
    decoder_size: Literal["same", "tiny", "small", "xl"] | None = field(default=None, metadata=opt(
        "decoder architecture; 'same' = the encoder directory's decoder, starting from its weights [preset]"))
    steps: int | None = field(default=None, metadata=opt("optimiser steps [preset]"))
    batch_size: int | None = field(default=None, metadata=opt("global batch size (rows = sample x view) [preset]"))
    lr: float | None = field(default=None, metadata=opt(
        "peak AdamW learning rate (warm-up, then cosine to 10%) [preset]"))
    warmup_steps: int | None = field(default=None, metadata=opt("linear learning-rate warm-up steps [preset]"))
    weight_decay: float | None = field(default=None, metadata=opt("AdamW weight decay [preset]"))
    ema_decay: float | None = field(default=None, metadata=opt("EMA decay of the saved weights [preset]"))
    noise_tau: float | None = field(default=None, metadata=opt(
        "feature noise augmentation: sigma ~ U[0, tau] per sample (RAE's tau; 0 = off) [preset]"))
    lpips: Literal["off", "auto", "on"] = field(default="auto", metadata=opt(
        "LPIPS term: on = required (needs --lpips-weights), auto = used when --lpips-weights is given, off = never"))
    lpips_weights: Path | None = field(default=None, metadata=opt(
        "local LPIPS file (.safetensors/.pth): torchvision VGG16 `features.*` + LPIPS v0.1 `lin{k}.model.1.weight`"))
    lpips_weight: float = field(default=1.0, metadata=opt("weight of the LPIPS term"))
    eval_every: int | None = field(default=None, metadata=opt("validation PSNR + grid every N steps [preset]"))
    checkpoint_every: int | None = field(default=None, metadata=opt("training-state checkpoint every N steps [preset]"))
    eval_samples: int = field(default=64, metadata=opt("validation images used for PSNR"))
    grid_samples: int = field(default=8, metadata=opt("validation images shown in the reconstruction grids"))
    seed: int = field(default=0, metadata=opt("seed of the decoder init, batch order and feature noise"))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=opt("training compute precision"))
    cache_mb: int = field(default=2048, metadata=opt(
        "keep decoded targets and features in RAM up to this many MiB", runtime=True))
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda ...", runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing artifact made with another config",
                                                        runtime=True))


def resolve(cfg: Config) -> Config:
    """Fill every knob left unset (None) from the chosen preset; the result is what the manifest records."""
    preset = PRESETS[cfg.preset]
    filled = {k: getattr(preset, k) for k in preset.__dataclass_fields__ if getattr(cfg, k) is None}
    cfg = replace(cfg, **filled)
    if cfg.steps < 0 or cfg.batch_size <= 0 or cfg.eval_every <= 0 or cfg.checkpoint_every <= 0:
        raise UserError(f"--steps must be >= 0; --batch-size, --eval-every, --checkpoint-every positive")
    if cfg.steps == 0 and cfg.decoder_size != "same":
        raise UserError("--steps 0 packages the encoder directory's decoder unchanged: it needs --decoder-size same")
    return cfg


# ----------------------------------------------------------------------------------------------------------- LPIPS


VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # up to relu5_3
VGG_TAPS = (3, 8, 15, 22, 29)  # ReLU outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16
VGG_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer constants (inputs in [-1, 1])
LPIPS_SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` up to relu5_3, same module indices (so its `features.{i}.*` keys load)."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=False)]
            channels = v
    return nn.Sequential(*layers)


def lpips_state_from_files(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a merged {torchvision vgg16 `features.*`, lpips `lin{k}.model.1.weight`} dict to `LPIPS`'s keys.

    torchvision's `classifier.*` keys are dropped; everything else must be used (the load after this is strict).
    """
    out = {}
    for k, v in state.items():
        if k.startswith("classifier."):
            continue
        if k.startswith("lin") and k.endswith(".model.1.weight"):
            out[f"heads.{k[3:].split('.')[0]}.weight"] = v
        else:
            out[k] = v
    return out


class LPIPS(nn.Module):
    """LPIPS (v0.1, VGG16): images in [-1, 1] (B, 3, H, W) x2 -> distance (B,). Weights come from a local file."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in VGG_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG_TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # unit norm over channels
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) x2 in [-1, 1] -> (B,) perceptual distance."""
        pairs = zip(self.heads, self._taps(a), self._taps(b))
        return sum(head((fa - fb) ** 2).mean((1, 2, 3)) for head, fa, fb in pairs)


def load_lpips(path: Path) -> LPIPS:
    """Strictly load LPIPS from a local .safetensors or .pth file; frozen, eval mode."""
    if not path.exists():
        raise UserError(f"--lpips-weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = LPIPS()
    try:
        model.load_state_dict(lpips_state_from_files(state), strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: not an LPIPS VGG16 weights file ({e})") from e
    return model.eval().requires_grad_(False)


def maybe_lpips(cfg: Config) -> LPIPS | None:
    """The LPIPS module the config asks for, None when off; `auto` without a file logs and continues with L1 only."""
    if cfg.lpips == "off":
        return None
    if cfg.lpips_weights is None:
        if cfg.lpips == "on":
            raise UserError("--lpips on needs --lpips-weights FILE (a local VGG16 + LPIPS v0.1 weights file; no "
                            "download is attempted). Pass the file, or use --lpips auto/off to train with L1 only.")
        log.info("LPIPS: no --lpips-weights file given; training with L1 only (--lpips auto)")
        return None
    return load_lpips(cfg.lpips_weights)


# ------------------------------------------------------------------------------------------------------------ data


class PairData:
    """Rows (sample, view) of a split: DINOv2 features (N, D) + the matching uint8 crop (3, 256, 256), joined by key."""

    def __init__(self, images: ImageShards, features: FeatureShards, split: str, cache_bytes: int):
        self.images, self.features, self.split = images, features, split
        self.views = features.views
        self.num_samples = features.num_samples(split)
        self._image_index = self._index_images(images, split)
        self._cache: dict[int, tuple[np.ndarray, torch.Tensor]] = {}
        per_sample = 3 * 256 * 256 + self.views * features.num_patches * features.dim * 2
        self._cache_limit = cache_bytes // per_sample

    @staticmethod
    def _index_images(images: ImageShards, split: str) -> dict[str, tuple[Path, int, int]]:
        index = {}
        for rec in images.shards(split):
            path = images.root / rec["name"]
            for key, members in index_tar_shard(path).items():
                ext = next(e for e in members if e in IMAGE_EXTS)
                index[key] = (path, *members[ext])
        return index

    def __len__(self) -> int:
        return self.num_samples * self.views

    def _sample(self, i: int) -> tuple[np.ndarray, torch.Tensor]:
        if i in self._cache:
            return self._cache[i]
        key, _, feats = self.features.get(i, self.split)
        if key not in self._image_index:
            raise ArtifactError(f"{self.features.root}: sample {key!r} has no image in {self.images.root}; the two "
                                f"artifacts do not belong together")
        crop = pil_to_uint8(adm_center_crop(load_rgb(read_member(*self._image_index[key]))))
        if len(self._cache) < self._cache_limit:
            self._cache[i] = (feats, crop)
        return feats, crop

    def rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Global row ids -> features float32 (B, N, D), targets uint8 (B, 3, 256, 256) (view 1 = flipped crop)."""
        feats, crops = [], []
        for r in rows:
            f, crop = self._sample(r // self.views)
            view = r % self.views
            feats.append(torch.from_numpy(f[view].astype(np.float32)))
            crops.append(crop.flip(-1) if view == 1 else crop)
        return torch.stack(feats), torch.stack(crops)


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Global row ids of step `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    rows = []
    for p in range(step * batch_size, (step + 1) * batch_size):
        epoch = p // n
        perm = _epoch_perm(seed, epoch, n)
        rows.append(int(perm[p % n]))
    return rows


@functools.lru_cache(maxsize=2)  # a step's batch spans at most two epochs
def _epoch_perm(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch_generator(seed, "epoch", epoch))


def noise_features(tokens: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """RAE noise augmentation: (B, N, D) -> tokens + sigma_b * eps, sigma_b ~ U[0, tau], eps ~ N(0, I)."""
    if tau <= 0:
        return tokens
    sigma = tau * torch.rand(tokens.shape[0], 1, 1, generator=generator)
    return tokens + sigma * torch.randn(tokens.shape, generator=generator)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float (B, 3, H, W), the decoder's output space."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of two uint8 batches (B, ...) on the 0..255 scale."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


# ---------------------------------------------------------------------------------------------------------- models


def build_decoder_rae(encoder_dir: str, size: str, seed: int):
    """An AutoencoderRAE with the encoder directory's encoder weights and a decoder of `size` (trainable)."""
    from diffusers import AutoencoderRAE

    source = load_rae(encoder_dir)
    if size == "same":
        rae = source
    else:
        config = {**dict(source.config), **DECODER_SIZES[size]}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rae = AutoencoderRAE.from_config(config)
        own = rae.state_dict()
        own.update({k: v for k, v in source.state_dict().items() if not k.startswith("decoder.")})
        rae.load_state_dict(own, strict=True)
    rae.eval().requires_grad_(False)
    rae.decoder.train().requires_grad_(True)
    return rae


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to MIN_LR_FRACTION * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress_ = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_))))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model with d = min(decay, (1 + step) / (EMA_WARMUP + step))."""
    d = min(decay, (1 + step) / (EMA_WARMUP + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - d)


class Trainer(NamedTuple):
    """Everything a training step touches."""

    rae: nn.Module  # AutoencoderRAE (encoder frozen, decoder trained)
    decoder: PixelDecoder  # wraps rae.decoder (trained weights)
    ema: PixelDecoder  # EMA copy, what is saved
    optimizer: torch.optim.Optimizer
    lpips: LPIPS | None
    accelerator: object


def make_trainer(cfg: Config, accelerator, device: torch.device, lp: LPIPS | None) -> Trainer:
    import copy

    rae = build_decoder_rae(cfg.encoder, cfg.decoder_size, cfg.seed)
    decoder = PixelDecoder(rae).to(device)
    ema = copy.deepcopy(decoder).eval().requires_grad_(False)
    opt_ = torch.optim.AdamW(decoder.decoder.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                             weight_decay=cfg.weight_decay)
    return Trainer(rae, decoder, ema, opt_, lp.to(device) if lp is not None else None, accelerator)


def train_step(tr: Trainer, model: nn.Module, cfg: Config, data: PairData, step: int, device: torch.device) -> dict:
    """One optimiser step on this process's slice of the global batch; returns the logged scalars."""
    acc = tr.accelerator
    rows = batch_rows(step, cfg.batch_size, len(data), cfg.seed)
    g = torch_generator(cfg.seed, "noise", step)
    feats, target = data.rows(rows)
    feats = noise_features(feats, cfg.noise_tau, g)  # whole global batch, so the noise ignores the world size
    sl = slice(acc.process_index, None, acc.num_processes)
    feats, target = feats[sl].to(device), normalise(target[sl].to(device))
    for group in tr.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    with autocast(cfg.precision, device):
        pred = model(feats)  # (B, 3, 256, 256) normalised
        l1 = (pred.float() - target).abs().mean()
        lp = _lpips_term(tr.lpips, pred.float(), target) if tr.lpips is not None else torch.zeros((), device=device)
        loss = l1 + cfg.lpips_weight * lp
    tr.optimizer.zero_grad(set_to_none=True)
    acc.backward(loss)
    tr.optimizer.step()
    ema_update(tr.ema, tr.decoder, cfg.ema_decay, step)
    return {"loss": loss.item(), "l1": l1.item(), "lpips": lp.item(), "lr": lr_at(step, cfg)}


def _lpips_term(lp: LPIPS, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=pred.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pred.device).view(1, 3, 1, 1)
    return lp((pred * std + mean) * 2 - 1, (target * std + mean) * 2 - 1).mean()


# ------------------------------------------------------------------------------------------------ state and outputs


def _flat_optimizer(opt_: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt_.state_dict()
    tensors = {f"{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    scalars = {f"{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items() if not torch.is_tensor(v)}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for k, v in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(out: Path, tr: Trainer, step: int, history: list[dict]) -> None:
    """Atomically write the full training state after `step` steps into state/step-XXXXXXX, then point to it."""
    from safetensors.torch import save

    root = out / "state"
    target = root / f"step-{step:07d}"
    target.mkdir(parents=True, exist_ok=True)
    tensors, meta = _flat_optimizer(tr.optimizer)
    atomic_write_bytes(target / "decoder.safetensors", save(_contiguous(tr.decoder.decoder.state_dict())))
    atomic_write_bytes(target / "ema.safetensors", save(_contiguous(tr.ema.decoder.state_dict())))
    atomic_write_bytes(target / "optimizer.safetensors", save(_contiguous(tensors)))
    atomic_write_json(target / "optimizer.json", meta)
    atomic_write_json(root / "latest.json", {"step": step, "dir": target.name, "history": history})
    for old in root.glob("step-*"):
        if old != target:
            shutil.rmtree(old)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def load_state(out: Path, tr: Trainer) -> tuple[int, list[dict]]:
    """Restore the latest training state; (0, []) when there is none."""
    from safetensors.torch import load_file

    latest = out / "state" / "latest.json"
    if not latest.exists():
        return 0, []
    info = json.loads(latest.read_text())
    src = out / "state" / info["dir"]
    tr.decoder.decoder.load_state_dict(load_file(src / "decoder.safetensors"), strict=True)
    tr.ema.decoder.load_state_dict(load_file(src / "ema.safetensors"), strict=True)
    meta = json.loads((src / "optimizer.json").read_text())
    tr.optimizer.load_state_dict(_unflat_optimizer(load_file(src / "optimizer.safetensors"), meta))
    log.info("resuming from step %d (%s)", info["step"], src)
    return info["step"], info["history"]


@torch.no_grad()
def evaluate(decoder: PixelDecoder, data: PairData, n: int,
             device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """PSNR of `decoder` on the first n val rows (view 0) vs the mean-image baseline; returns (metrics, x, x_hat)."""
    rows = [i * data.views for i in range(min(n, data.num_samples))]
    feats, target = data.rows(rows)
    recon = torch.cat([decoder.to_uint8(decoder(f.to(device))).cpu() for f in feats.split(16)])  # (B, H, W, 3)
    target = target.permute(0, 2, 3, 1)  # (B, H, W, 3)
    mean_image = torch.floor(target.double().mean(0, keepdim=True) + 0.5).expand_as(target)
    metrics = {"val_psnr": psnr(recon, target).mean().item(), "baseline_psnr": psnr(mean_image, target).mean().item(),
               "val_l1_uint8": (recon.double() - target.double()).abs().mean().item(), "eval_images": len(rows)}
    return metrics, target, recon


def write_grid(path: Path, target: torch.Tensor, recon: torch.Tensor, k: int) -> None:
    """Two rows: originals, reconstructions (first k validation images)."""
    save_grid(path, [target[:k].numpy(), recon[:k].numpy()], size=128)


def save_rae_dir(out: Path, tr: Trainer) -> dict:
    """Write config.json + the weights (EMA decoder, copied encoder) so that load_rae(out) works; returns a record."""
    from safetensors.torch import save

    tr.rae.decoder.load_state_dict(tr.ema.decoder.state_dict(), strict=True)
    config = {k: v for k, v in dict(tr.rae.config).items() if not k.startswith("_")}
    config["_class_name"] = "AutoencoderRAE"
    atomic_write_json(out / "config.json", config)
    atomic_write_bytes(out / WEIGHTS_NAME, save(_contiguous(tr.rae.state_dict())))
    path = out / WEIGHTS_NAME
    return {"name": WEIGHTS_NAME, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


# ------------------------------------------------------------------------------------------------------------ stage


def check_inputs(cfg: Config, images: ImageShards, features: FeatureShards) -> str:
    """Refuse an encoder / features / images trio that does not belong together; returns the encoder fingerprint."""
    encoder_fp = FeatureEncoder(load_rae(cfg.encoder)).fingerprint
    if features.encoder_fingerprint != encoder_fp:
        raise ArtifactError(
            f"{cfg.features} was computed with encoder {features.encoder_fingerprint[:12]}, but --encoder "
            f"{cfg.encoder} has fingerprint {encoder_fp[:12]}; pass the RAE directory the features were made with")
    made_from = features.manifest.inputs["images"]["fingerprint"]
    if made_from != images.manifest.fingerprint:
        raise ArtifactError(f"{cfg.features} was made from images {made_from[:12]}, not from {cfg.images} "
                            f"({images.manifest.fingerprint[:12]}); pass the matching --images")
    return encoder_fp


def run(cfg: Config) -> Manifest:
    """Train (or resume) the pixel decoder; the main process writes the RAE directory and the manifest."""
    t0, cfg = time.time(), resolve(cfg)
    images, features = ImageShards(cfg.images), FeatureShards(cfg.features)
    encoder_fp = check_inputs(cfg, images, features)
    lp = maybe_lpips(cfg)  # a missing/bad LPIPS file is refused before any work
    config = {**config_to_dict(cfg, semantic_only=True), "images": images.manifest.fingerprint,
              "features": features.manifest.fingerprint}
    if cfg.lpips_weights is not None:
        config["lpips_sha256"] = file_sha256(cfg.lpips_weights) if cfg.lpips_weights.exists() else None
    dist = current_dist()
    with OutputDir(cfg.out, STAGE, config, overwrite=cfg.overwrite and dist.is_main, lock=dist.is_main) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=cfg.device == "cpu")
        device = accelerator.device if accelerator.num_processes > 1 else resolve_device(cfg.device)
        tr = make_trainer(cfg, accelerator, device, lp)
        train = PairData(images, features, "train", cfg.cache_mb << 20)
        val = PairData(images, features, "val" if features.num_samples("val") else "train", 256 << 20)
        model, tr_opt = tr.accelerator.prepare(tr.decoder, tr.optimizer)
        tr = tr._replace(optimizer=tr_opt)
        start, history = load_state(od.path, tr)
        history = _train_loop(tr, model, cfg, train, val, od.path, start, history, device)
        if not tr.accelerator.is_main_process:
            return None
        metrics, target, recon = evaluate(tr.ema, val, cfg.eval_samples, device)
        write_grid(od.path / "grids" / "final.png", target, recon, cfg.grid_samples)
        record = save_rae_dir(od.path, tr)
        log.info("final EMA decoder: val PSNR %.2f dB vs mean-image baseline %.2f dB", metrics["val_psnr"],
                 metrics["baseline_psnr"])
        return od.finish(_manifest(cfg, images, features, encoder_fp, tr, record, metrics, history, time.time() - t0))


def _train_loop(tr: Trainer, model, cfg: Config, train: PairData, val: PairData, out: Path, start: int,
                history: list[dict], device: torch.device) -> list[dict]:
    from torch.utils.tensorboard import SummaryWriter

    main = tr.accelerator.is_main_process
    writer = SummaryWriter(str(out / "tb"), purge_step=start) if main else None
    bar = progress(cfg.steps, "train-decoder", "step", initial=start)
    for step in range(start, cfg.steps):
        scalars = train_step(tr, model, cfg, train, step, device)
        bar.update(1)
        bar.set_postfix(loss=f"{scalars['loss']:.4f}")
        done = step + 1
        if main:
            for k, v in scalars.items():
                writer.add_scalar(f"train/{k}", v, done)
        if main and (done % cfg.eval_every == 0 or done == cfg.steps):
            metrics, target, recon = evaluate(tr.ema, val, cfg.eval_samples, device)
            history.append({"step": done, **metrics, "loss": scalars["loss"]})
            for k in ("val_psnr", "baseline_psnr"):
                writer.add_scalar(f"val/{k}", metrics[k], done)
            write_grid(out / "grids" / f"step-{done:07d}.png", target, recon, cfg.grid_samples)
            log.info("step %d: loss %.4f, EMA val PSNR %.2f dB (mean-image %.2f dB)", done, scalars["loss"],
                     metrics["val_psnr"], metrics["baseline_psnr"])
        if main and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_state(out, tr, done, history)
        tr.accelerator.wait_for_everyone()
    bar.close()
    if writer is not None:
        writer.close()
    return history


def _manifest(cfg: Config, images: ImageShards, features: FeatureShards, encoder_fp: str, tr: Trainer, record: dict,
              metrics: dict, history: list[dict], seconds: float) -> Manifest:
    decoder_fp = tr.ema.fingerprint
    models = {"encoder": {"source": str(cfg.encoder), "fingerprint": encoder_fp},
              "decoder": {"path": WEIGHTS_NAME, "sha256": record["sha256"], "fingerprint": decoder_fp}}
    if tr.lpips is not None:
        models["lpips"] = {"path": str(cfg.lpips_weights), "sha256": file_sha256(cfg.lpips_weights)}
    return Manifest(
        stage=STAGE, shards=[record], versions=environment(), complete=True, models=models,
        counts={"written": 1, "skipped": 0, "failed": 0},
        inputs={"images": {"path": str(cfg.images), "fingerprint": images.manifest.fingerprint},
                "features": {"path": str(cfg.features), "fingerprint": features.manifest.fingerprint}},
        fields={WEIGHTS_NAME: {"codec": "safetensors", "dtype": "float32"}},
        extra={"encoder_fingerprint": encoder_fp, "decoder_fingerprint": decoder_fp, "decoder_size": cfg.decoder_size,
               "decoder_config": {k: v for k, v in dict(tr.rae.config).items() if k.startswith("decoder_")},
               "lpips_used": tr.lpips is not None, "final": metrics, "history": history},
        timings={"seconds": round(seconds, 3), "steps": cfg.steps},
    )


def _summary(m: Manifest) -> str:
    f = m.extra["final"]
    return (f"train-decoder: done ({m.timings['steps']} steps): val PSNR {f['val_psnr']:.2f} dB vs mean-image "
            f"baseline {f['baseline_psnr']:.2f} dB")


cli = command_from_config(Config, run, "train-decoder", __doc__.split("\n\n")[0], summary=_summary)
