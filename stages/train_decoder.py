"""`flatdino train-decoder`: train an RAE pixel decoder (DINOv2 patch features -> RGB) on image + feature shards.

Lineage: RAE's decoder training (`bytetriper/RAE`, `src/train.py`: ViT-MAE decoder on frozen, noise-augmented
DINOv2 features, L1 + LPIPS (+ GAN) in pixel space, EMA weights); the network is diffusers' `RAEDecoder` inside an
`AutoencoderRAE`, so the output directory is a complete RAE directory that `models.encoder.load_rae` reads.

Departures, all deliberate:
- The GAN term is optional (`--gan`, `pipeline.gan`): RAE's DINO discriminator, DiffAugment and adaptive weight,
  with the weight taken on the global batch (RAE: per device) so the result does not depend on the world size.
- The update, checkpoints and resume are the shared trainer's (`pipeline.train`).
- L1 is taken in the decoder's own ImageNet-normalised output space.
- Feature noise (RAE's tau): per sample sigma ~ U[0, tau], tokens + sigma * N(0, I), drawn from generators seeded by
  (seed, step), like the batch order, so a resumed run is bit-identical and the world size only splits the batch.
- EMA decay is warmed up as min(decay, (1 + step) / (10 + step)), so short demo runs are not dominated by the init.
- LPIPS runs only from a local weights file (no download): VGG16 trunk (torchvision layout) + LPIPS v0.1 heads.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from models.encoder import IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_NAME, FeatureEncoder, PixelDecoder, load_rae
from pipeline.checkpoint import save_tensors
from pipeline.config import command_from_config, config_to_dict, opt
from pipeline.grids import save_grid
from pipeline.image_metrics import LPIPS, load_lpips, psnr
from pipeline.manifest import local_dirs, ArtifactError, Manifest, OutputDir, UserError, atomic_write_json, atomic_write_with, \
    file_sha256
from pipeline.runtime import Runtime, environment, get_logger, launch, torch_generator
from pipeline.shards import FeatureShards, ImageShards, PairData
from pipeline.gan import DecoderGAN, build_decoder_gan
from pipeline.train import Ema, Event, Recipe, Trainer, TrainOptions

log = get_logger(__name__)

STAGE = "train_decoder"
OWNS = ("config.json", WEIGHTS_NAME, "grids", "checkpoints", "latest.json", "tb", "loss.png")  # --overwrite
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
    ckpt_every: int


# "demo": the digits demo on a 2-core CPU in about two minutes, a fresh tiny decoder. "rae": RAE's decoder recipe
# (tau 0.8 = "n08", lr 2e-4, EMA 0.9999, ~16 epochs of ImageNet at batch 512) starting from the encoder directory's
# own decoder ("same"): with the pretrained RAE directory this fine-tunes the n08 decoder; `--steps 0` just packages
# that decoder, unchanged, as this stage's artifact (with its validation PSNR), which is what the paper uses (frozen).
PRESETS: dict[str, TrainPreset] = {
    "demo": TrainPreset(decoder_size="tiny", steps=200, batch_size=16, lr=1e-3, warmup_steps=20, weight_decay=0.0,
                        ema_decay=0.99, noise_tau=0.3, eval_every=100, ckpt_every=100),
    "rae": TrainPreset(decoder_size="same", steps=40_000, batch_size=512, lr=2e-4, warmup_steps=1000,
                       weight_decay=0.0, ema_decay=0.9999, noise_tau=0.8, eval_every=2000, ckpt_every=1000),
}


@dataclass(frozen=True, kw_only=True)
class Config(TrainOptions):
    images: Path = field(metadata=opt("images artifact the features were computed from (flatdino images --out)", runtime=True))
    features: Path = field(metadata=opt("features artifact (flatdino features --out)", runtime=True))
    encoder: str = field(metadata=opt("RAE directory that produced the features (its encoder weights are copied; "
                                      "its decoder is the starting point with --decoder-size same)", runtime=True))
    out: Path = field(metadata=opt("output RAE directory + manifest, e.g. shards/decoder/demo", runtime=True))
    preset: Literal["rae", "demo"] = field(default="rae", metadata=opt(
        "defaults of the knobs left unset: rae (RAE's recipe, tau 0.8, from the encoder dir's decoder) or demo (a "
        "fresh tiny decoder, ~2 min on CPU)"))
    decoder_size: Literal["same", "tiny", "small", "xl"] | None = field(default=None, metadata=opt(
        "decoder architecture; 'same' = the encoder directory's decoder, starting from its weights [preset]"))
    steps: int | None = field(default=None, metadata=opt("optimiser steps [preset]", min=0))
    batch_size: int | None = field(default=None, metadata=opt("global batch size (rows = sample x view) [preset]", min=1))
    lr: float | None = field(default=None, metadata=opt(
        "peak AdamW learning rate (warm-up, then cosine to 10%) [preset]", min=0, min_open=True))
    warmup_steps: int | None = field(default=None, metadata=opt("linear learning-rate warm-up steps [preset]", min=0))
    weight_decay: float | None = field(default=None, metadata=opt("AdamW weight decay [preset]", min=0))
    ema_decay: float | None = field(default=None, metadata=opt("EMA decay of the saved weights [preset]", min=0, max=1))
    noise_tau: float | None = field(default=None, metadata=opt(
        "feature noise augmentation: sigma ~ U[0, tau] per sample (RAE's tau; 0 = off) [preset]", min=0))
    lpips: Literal["off", "auto", "on"] = field(default="auto", metadata=opt(
        "LPIPS term: on = required (needs --lpips-weights), auto = used when --lpips-weights is given, off = never"))
    lpips_weights: Path | None = field(default=None, metadata=opt(
        "local LPIPS file (.safetensors/.pth): torchvision VGG16 `features.*` + LPIPS v0.1 `lin{k}.model.1.weight`", runtime=True))
    lpips_weight: float = field(default=1.0, metadata=opt("weight of the LPIPS term", min=0))
    gan: bool = field(default=False, metadata=opt(
        "add RAE's adversarial term: a frozen DINO ViT-S/8 discriminator backbone with trainable heads, DiffAugment, "
        "the adaptive GAN weight; the discriminator trains from --disc-start-epoch, the GAN term enters the loss at "
        "--gan-start-epoch (off for the packaged RAE decoder, which is used frozen)"))
    disc_backbone: str = field(default="facebook/dino-vits8", metadata=opt(
        "discriminator backbone: a local transformers ViT directory or a hub id (cached or online); pinned by its "
        "fingerprint", runtime=True))
    gan_weight: float = field(default=0.75, metadata=opt("weight of the adaptive GAN term (RAE disc_weight)", min=0))
    disc_start_epoch: float = field(default=6, metadata=opt("epoch at which the discriminator starts training",
                                                            min=0))
    gan_start_epoch: float = field(default=8, metadata=opt("epoch at which the GAN term enters the decoder's loss",
                                                           min=0))
    eval_every: int | None = field(default=None, metadata=opt("validation PSNR + grid every N steps [preset]", min=1))
    eval_samples: int = field(default=64, metadata=opt("validation images used for PSNR", min=1))
    grid_samples: int = field(default=8, metadata=opt("validation images shown in the reconstruction grids", min=1))
    seed: int = field(default=0, metadata=opt("seed of the decoder init, batch order and feature noise", min=0))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=opt("training compute precision"))
    ckpt_every: int | None = field(default=None, metadata=opt(
        "checkpoint every N steps (also at the end and on SIGTERM) [preset]", runtime=True, min=1))
    micro_batch: int = field(default=0, metadata=opt("rows per forward per process (0: the whole share); "
                                                     "gradients are accumulated to the global batch", runtime=True, min=0))
    log_every: int = field(default=1, metadata=opt("log scalars every N steps", runtime=True, min=1))
    cache_mb: int = field(default=2048, metadata=opt(
        "keep decoded targets and features in RAM up to this many MiB", runtime=True, min=0))
    overwrite: bool = field(default=False, metadata=opt("delete an existing artifact made with another config",
                                                        runtime=True))


def resolve(cfg: Config) -> Config:
    """Fill every knob left unset (None) from the chosen preset; the result is what the manifest records."""
    preset = PRESETS[cfg.preset]
    filled = {k: getattr(preset, k) for k in preset.__dataclass_fields__ if getattr(cfg, k) is None}
    cfg = replace(cfg, **filled)
    if cfg.steps < 0 or cfg.batch_size <= 0 or cfg.eval_every <= 0 or cfg.ckpt_every <= 0:
        raise UserError("--steps must be >= 0; --batch-size, --eval-every, --ckpt-every positive")
    if cfg.steps == 0 and cfg.decoder_size != "same":
        raise UserError("--steps 0 packages the encoder directory's decoder unchanged: it needs --decoder-size same")
    return cfg



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


def to_normalized_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float (B, 3, H, W), the decoder's output space."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


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


def draw_noise(cfg: Config, step: int, shape: tuple[int, int], device) -> dict:
    """RAE's feature noise for the whole global batch: sigma (G, 1, 1) ~ U[0, tau], eps (G, N, D) ~ N(0, I)."""
    if cfg.noise_tau <= 0:
        return {}
    g = torch_generator(cfg.seed, "noise", step, device=device)
    sigma = cfg.noise_tau * torch.rand(cfg.batch_size, 1, 1, generator=g, device=device)
    return {"sigma": sigma, "eps": torch.randn(cfg.batch_size, *shape, generator=g, device=device)}


def decoder_loss(model, batch, d: dict, step: int, cfg: Config, lp: LPIPS | None, gan: DecoderGAN | None):
    """L1 (normalised pixel space) + lpips_weight * LPIPS (+ the adaptive GAN term) of one micro-batch of
    (features, uint8 targets)."""
    feats, target = batch
    if "sigma" in d:
        feats = feats + d["sigma"] * d["eps"]
    target = to_normalized_pixels(target)
    pred = model(feats).float()  # (B, 3, 256, 256) normalised
    l1 = (pred - target).abs().mean()
    lpips = _lpips_term(lp, pred, target) if lp is not None else torch.zeros((), device=pred.device)
    rec = l1 + cfg.lpips_weight * lpips
    if gan is None:
        return rec, {"l1": l1, "lpips": lpips}
    adv, scalars = gan.generator_term(rec, to_pm1(pred), d, step, len(feats) / cfg.batch_size)
    return rec + adv, {"l1": l1, "lpips": lpips, **scalars}


def to_pm1(pred: torch.Tensor) -> torch.Tensor:
    """Normalised decoder output (B, 3, H, W) -> images in [-1, 1] (what the discriminator judges)."""
    mean = torch.tensor(IMAGENET_MEAN, device=pred.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pred.device).view(1, 3, 1, 1)
    return (pred * std + mean) * 2 - 1


def _lpips_term(lp: LPIPS, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=pred.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pred.device).view(1, 3, 1, 1)
    return lp((pred * std + mean) * 2 - 1, (target * std + mean) * 2 - 1).mean()


def recipe(cfg: Config, train: PairData, decoder: PixelDecoder, lp: LPIPS | None, rt: Runtime) -> Recipe:
    optimizer = torch.optim.AdamW(decoder.decoder.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    shape = (train.features.num_patches, train.features.dim)
    gan = build_decoder_gan(cfg, len(train), decoder, rt) if cfg.gan else None

    def feed(step: int, sl: range):
        return train.rows(batch_rows(step, cfg.batch_size, len(train), cfg.seed)[sl.start : sl.stop])

    def draw(step: int, device) -> dict:
        return draw_noise(cfg, step, shape, device) | (gan.draw(step, device) if gan is not None else {})

    @torch.no_grad()
    def decode_pm1(batch, d):  # the discriminator's fakes: the updated decoder on the same noisy features
        feats, target = batch
        if "sigma" in d:
            feats = feats + d["sigma"] * d["eps"]
        return to_pm1(decoder(feats).float()), to_pm1(to_normalized_pixels(target))

    return Recipe(decoder, optimizer, cfg.steps, cfg.batch_size, cfg.micro_batch or cfg.batch_size,
                  lambda step: lr_at(step, cfg), feed,
                  lambda model, batch, d, step: decoder_loss(model, batch, d, step, cfg, lp, gan), draw,
                  ema=Ema(cfg.ema_decay, EMA_WARMUP), title="train-decoder",
                  extra=[gan.objective(decode_pm1)] if gan is not None else [])


# ------------------------------------------------------------------------------------------------ evaluation


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


def eval_event(cfg: Config, val: PairData, trainer: Trainer) -> Event:
    """Validation PSNR of the EMA decoder + a reconstruction grid every --eval-every steps (main process)."""

    def fn(step: int) -> dict | None:
        if not trainer.rt.is_main:
            return None
        metrics, target, recon = evaluate(trainer.ema, val, cfg.eval_samples, trainer.rt.device)
        write_grid(cfg.out / "grids" / f"step-{step:07d}.png", target, recon, cfg.grid_samples)
        log.info("step %d: EMA val PSNR %.2f dB (mean-image %.2f dB)", step, metrics["val_psnr"],
                 metrics["baseline_psnr"])
        return {k: metrics[k] for k in ("val_psnr", "baseline_psnr")}

    return Event("val", cfg.eval_every, fn)


def save_rae_dir(out: Path, rae, ema: PixelDecoder) -> dict:
    """Write config.json + the weights (EMA decoder, copied encoder) so that load_rae(out) works; returns a record."""
    rae.decoder.load_state_dict(ema.decoder.state_dict(), strict=True)
    config = {k: v for k, v in dict(rae.config).items() if not k.startswith("_")}
    config["_class_name"] = "AutoencoderRAE"
    atomic_write_json(out / "config.json", config)
    path = out / WEIGHTS_NAME
    atomic_write_with(path, lambda tmp: save_tensors(tmp, rae.state_dict()))
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


def run(cfg: Config, rt: Runtime | None = None) -> Manifest | None:
    """Train (or resume) the pixel decoder; the main process writes the RAE directory and the manifest."""
    t0, cfg = time.time(), resolve(cfg)
    rt = (rt or launch()).on(cfg.device, cfg.precision)
    images, features = ImageShards(cfg.images), FeatureShards(cfg.features)
    encoder_fp = check_inputs(cfg, images, features)
    lp = maybe_lpips(cfg)  # a missing/bad LPIPS file is refused before any work
    config = {**config_to_dict(cfg, semantic_only=True), "encoder_fingerprint": encoder_fp,
              "images": images.manifest.fingerprint,
              "features": features.manifest.fingerprint}
    if cfg.lpips_weights is not None:
        config["lpips_sha256"] = file_sha256(cfg.lpips_weights) if cfg.lpips_weights.exists() else None
    if cfg.gan:
        from models.discriminator import load_backbone

        from models.encoder import state_fingerprint

        config["disc_backbone_fingerprint"] = state_fingerprint(load_backbone(cfg.disc_backbone))
    with OutputDir(cfg.out, STAGE, config, overwrite=cfg.overwrite, rt=rt, owns=OWNS,
                   inputs=[cfg.images, cfg.features, *local_dirs(cfg.encoder)]) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        rae = build_decoder_rae(cfg.encoder, cfg.decoder_size, cfg.seed)
        decoder = PixelDecoder(rae).to(rt.device)
        train = PairData(images, features, "train", cfg.cache_mb << 20)
        val = PairData(images, features, "val" if features.num_samples("val") else "train", 256 << 20)
        trainer = Trainer(recipe(cfg, train, decoder, lp.to(rt.device) if lp is not None else None, rt), cfg,
                          od.path, rt, cfg.seed)
        trainer.r.events.append(eval_event(cfg, val, trainer))
        trainer.fit()
        if not trainer.complete or not rt.is_main:
            return None
        metrics, target, recon = evaluate(trainer.ema, val, cfg.eval_samples, rt.device)
        write_grid(od.path / "grids" / "final.png", target, recon, cfg.grid_samples)
        record = save_rae_dir(od.path, rae, trainer.ema)
        trainer.plot(od.path / "loss.png", "L1 (+ LPIPS, + GAN) loss")
        log.info("final EMA decoder: val PSNR %.2f dB vs mean-image baseline %.2f dB", metrics["val_psnr"],
                 metrics["baseline_psnr"])
        return od.finish(_manifest(cfg, images, features, encoder_fp, trainer, rae, lp, record, metrics,
                                   time.time() - t0))


def _manifest(cfg: Config, images: ImageShards, features: FeatureShards, encoder_fp: str, trainer: Trainer, rae,
              lp, record: dict, metrics: dict, seconds: float) -> Manifest:
    decoder_fp = trainer.ema.fingerprint
    models = {"encoder": {"source": str(cfg.encoder), "fingerprint": encoder_fp},
              "decoder": {"path": WEIGHTS_NAME, "sha256": record["sha256"], "fingerprint": decoder_fp}}
    if lp is not None:
        models["lpips"] = {"path": str(cfg.lpips_weights), "sha256": file_sha256(cfg.lpips_weights)}
    return Manifest(
        stage=STAGE, shards=[record], versions=environment(), complete=True, models=models,
        counts={"written": 1, "skipped": 0, "failed": 0},
        inputs={"images": {"path": str(cfg.images), "fingerprint": images.manifest.fingerprint},
                "features": {"path": str(cfg.features), "fingerprint": features.manifest.fingerprint}},
        fields={WEIGHTS_NAME: {"codec": "safetensors", "dtype": "float32"}},
        extra={"encoder_fingerprint": encoder_fp, "decoder_fingerprint": decoder_fp, "decoder_size": cfg.decoder_size,
               "decoder_config": {k: v for k, v in dict(rae.config).items() if k.startswith("decoder_")},
               "lpips_used": lp is not None, "final": metrics, "history": trainer.state["events"].get("val", [])},
        timings={"seconds": round(seconds, 3), "steps": cfg.steps},
    )


def _summary(m: Manifest) -> str:
    f = m.extra["final"]
    return (f"train-decoder: done ({m.timings['steps']} steps): val PSNR {f['val_psnr']:.2f} dB vs mean-image "
            f"baseline {f['baseline_psnr']:.2f} dB")


cli = command_from_config(Config, run, "train-decoder", __doc__.split("\n\n")[0], summary=_summary)
