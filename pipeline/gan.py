"""The adversarial term of pixel-decoder training: DiffAugment, hinge losses, the adaptive GAN weight, the schedule.

Lineage: the official FlatDINO JAX `flatdino/train_decoder.py` (`generator_loss_fn`, `discriminator_loss_fn`,
`train_discriminator_step`, `OptimConfig`) and `flatdino/decoder/diffaug.py` (`DiffAug`), which reproduce RAE's
stage-1 recipe (`bytetriper/RAE`: `src/train_stage1.py`, `src/disc/{gan_loss,diffaug}.py`,
`configs/stage1/training/DINOv2-B_decXL.yaml`); DiffAug itself is StyleGAN-T's, after Zhao et al. 2020.

One training step, as both official codes run it (the wiring is the trainer's; see `GANConfig` for the numbers):
1. Generator (discriminator in eval mode: no spectral-norm update; its gradients are discarded):
   rec = L1 + lpips_weight * LPIPS (LPIPS from `lpips_start_epoch`);
   from `gan_start_epoch`: fake = clamp(decoded image in [-1, 1], -1, 1), logits = D(diff_augment(fake)),
   gan = -mean(logits), w = adaptive_weight(rec, gan, decoder's last layer weight),
   loss = rec + gan_weight * w * gan (w detached).
2. Discriminator (train mode; from `disc_start_epoch`, `disc_updates` times per generator step): a fresh no-grad
   decode of the same batch by the *updated* decoder, clamped and quantised to uint8 levels; real images clamped;
   each augmented with its own draw (fake first, then real); loss = hinge_d_loss(D(real), D(fake)).

Departures: every random number of DiffAugment comes from an explicit `torch.Generator` (the official codes use a
JAX key / the global torch RNG), so the augmentation is a pure function of the seed. `DiffAugDraw` separates the
draw from its application, so one draw can also be applied to two batches (the official codes never do: real and
fake get independent draws).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

ADAPTIVE_EPS = 1e-6  # FlatDINO `gan_norm + 1e-6`, RAE `calculate_adaptive_weight` (VQGAN/taming uses 1e-4)


@dataclass(frozen=True)
class DiffAugPolicy:
    """Which DiffAugment ops run, with the official ranges (FlatDINO `DiffAug`, RAE/StyleGAN-T `DiffAug.aug`).

    Ops always run in the official order translation -> color -> cutout, each on the whole batch with probability
    `prob` (one uniform draw per op per call; the official `prob = 1.0` always applies them).
    """

    prob: float = 1.0  # FlatDINO `DiffAugConfig(prob=1.0)`; RAE `gan.disc.augment.prob: 1.0`
    translation: float = 0.125  # max shift = round(ratio * H) (and W) pixels, zero fill; 0 = off
    color: bool = True  # brightness + U[-0.5, 0.5), saturation x U[0, 2), contrast x U[0.5, 1.5), in that order
    cutout: float = 0.0  # side of the zeroed rectangle = round(ratio * H) x round(ratio * W); 0 = off (both officials)

    def to_dict(self) -> dict:
        return asdict(self)


class DiffAugDraw(NamedTuple):
    """Every random quantity of one DiffAugment call, per sample (B,)."""

    translate: bool
    color: bool
    cutout: bool
    shift_h: torch.Tensor  # (B,) int64 in [-round(r H), round(r H)]: output row i reads input row i + shift_h
    shift_w: torch.Tensor  # (B,) int64, the same for columns
    brightness: torch.Tensor  # (B,) added, in [-0.5, 0.5)
    saturation: torch.Tensor  # (B,) factor around the per-pixel channel mean, in [0, 2)
    contrast: torch.Tensor  # (B,) factor around the per-image mean, in [0.5, 1.5)
    cutout_h: torch.Tensor  # (B,) int64 centre row of the cut rectangle, in [0, H + (1 - ch % 2))
    cutout_w: torch.Tensor  # (B,) int64 centre column


def draw_diff_augment(shape: torch.Size | tuple, policy: DiffAugPolicy, generator: torch.Generator) -> DiffAugDraw:
    """Draw the random quantities for a batch of `shape` (B, C, H, W): 3 op coins, then 7 uniforms per sample."""
    B, _, H, W = shape
    coins = torch.rand(3, generator=generator, device=generator.device).cpu() <= policy.prob
    r = torch.rand(7, B, generator=generator, device=generator.device, dtype=torch.float32).cpu()  # (7, B)
    dh, dw = round(H * policy.translation), round(W * policy.translation)
    ch, cw = round(H * policy.cutout), round(W * policy.cutout)
    return DiffAugDraw(
        translate=bool(coins[0]) and (dh > 0 or dw > 0), color=bool(coins[1]) and policy.color,
        cutout=bool(coins[2]) and ch > 0 and cw > 0,
        shift_h=(r[0] * (2 * dh + 1)).floor().long() - dh, shift_w=(r[1] * (2 * dw + 1)).floor().long() - dw,
        brightness=r[2] - 0.5, saturation=r[3] * 2, contrast=r[4] + 0.5,
        cutout_h=(r[5] * (H + (1 - ch % 2))).floor().long(), cutout_w=(r[6] * (W + (1 - cw % 2))).floor().long())


def _translate(x: torch.Tensor, shift_h: torch.Tensor, shift_w: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i + shift_h[b], j + shift_w[b]], zero outside: (B, C, H, W) -> (B, C, H, W)."""
    B, _, H, W = x.shape
    dev = x.device
    padded = F.pad(x, (1, 1, 1, 1))  # one ring of zeros; indices past the edge are clamped onto it
    rows = (torch.arange(H, device=dev)[None] + shift_h.to(dev)[:, None] + 1).clamp(0, H + 1)  # (B, H)
    cols = (torch.arange(W, device=dev)[None] + shift_w.to(dev)[:, None] + 1).clamp(0, W + 1)  # (B, W)
    b = torch.arange(B, device=dev)[:, None, None]
    return padded[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def _color(x: torch.Tensor, d: DiffAugDraw) -> torch.Tensor:
    """Brightness, then saturation (around the channel mean), then contrast (around the image mean)."""
    def per_sample(v: torch.Tensor) -> torch.Tensor:
        return v.to(x.device, x.dtype)[:, None, None, None]  # (B,) -> (B, 1, 1, 1)

    x = x + per_sample(d.brightness)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * per_sample(d.saturation) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * per_sample(d.contrast) + mean


def _cutout(x: torch.Tensor, d: DiffAugDraw, policy: DiffAugPolicy) -> torch.Tensor:
    """Zero a round(r H) x round(r W) rectangle centred at (cutout_h, cutout_w), clipped to the image."""
    B, _, H, W = x.shape
    dev = x.device
    ch, cw = round(H * policy.cutout), round(W * policy.cutout)
    rows = (torch.arange(ch, device=dev)[None] + d.cutout_h.to(dev)[:, None] - ch // 2).clamp(0, H - 1)  # (B, ch)
    cols = (torch.arange(cw, device=dev)[None] + d.cutout_w.to(dev)[:, None] - cw // 2).clamp(0, W - 1)  # (B, cw)
    mask = torch.ones(B, H, W, dtype=x.dtype, device=dev)
    mask[torch.arange(B, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]] = 0
    return x * mask[:, None]


def apply_diff_augment(x: torch.Tensor, draw: DiffAugDraw, policy: DiffAugPolicy) -> torch.Tensor:
    """Apply one draw to images (B, C, H, W) in [-1, 1]: translation -> color -> cutout; differentiable in x."""
    if draw.translate:
        x = _translate(x, draw.shift_h, draw.shift_w)
    if draw.color:
        x = _color(x, draw)
    if draw.cutout:
        x = _cutout(x, draw, policy)
    return x


def diff_augment(x: torch.Tensor, policy: DiffAugPolicy, generator: torch.Generator) -> torch.Tensor:
    """DiffAugment of images (B, C, H, W) in [-1, 1] with every random number from `generator`."""
    return apply_diff_augment(x, draw_diff_augment(x.shape, policy, generator), policy)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))), means over every logit (FlatDINO, RAE `hinge`)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean D(fake): the generator's adversarial loss (FlatDINO `-jnp.mean(logits_fake)`, RAE `vanilla_g_loss`)."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                    max_weight: float = 1e4, eps: float = ADAPTIVE_EPS) -> torch.Tensor:
    """||d rec / d W|| / (||d gan / d W|| + eps), clamped to [0, max_weight], detached (W: decoder's last layer).

    Both graphs are kept (`retain_graph=True`), so the caller can still backpropagate the total loss.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)[0]
    w = g_rec.float().norm() / (g_gan.float().norm() + eps)
    return w.clamp(0.0, max_weight).detach()


def quantize_pm1(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [-1, 1] and snap to the 256 uint8 levels: round((x + 1) * 127.5) / 127.5 - 1 (official fake path)."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def discriminator_loss(disc, real_pm1: torch.Tensor, fake_pm1: torch.Tensor, policy: DiffAugPolicy,
                       generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The discriminator's update loss on images in [-1, 1] (B, 3, H, W), as the official step builds it.

    fake is detached, clamped and quantised; real is clamped; each gets its own DiffAugment draw (fake first).
    Returns the hinge loss and detached metrics (mean logits, accuracy = share of logits_real > logits_fake).
    """
    fake = diff_augment(quantize_pm1(fake_pm1.detach()), policy, generator)
    real = diff_augment(real_pm1.detach().clamp(-1.0, 1.0), policy, generator)
    logits_fake, logits_real = disc(fake), disc(real)  # RAE's order: fake, then real
    loss = hinge_d_loss(logits_real, logits_fake)
    metrics = {"disc_loss": loss.detach(), "logits_real": logits_real.detach().float().mean(),
               "logits_fake": logits_fake.detach().float().mean(),
               "disc_accuracy": (logits_real > logits_fake).float().mean().detach()}
    return loss, metrics


def generator_gan_loss(disc, fake_pm1: torch.Tensor, policy: DiffAugPolicy,
                       generator: torch.Generator) -> torch.Tensor:
    """-mean D(diff_augment(clamp(fake))) for decoded images in [-1, 1]; gradients flow into `fake_pm1`.

    The clamp is FlatDINO's (`recon_normed = clip(2 * recon_pix - 1, -1, 1)`; it zeroes the gradient of pixels
    outside [-1, 1]); RAE feeds `recon * 2 - 1` unclamped. Run `disc` in eval mode here (no power-iteration update).
    """
    return generator_adv_loss(disc(diff_augment(fake_pm1.clamp(-1.0, 1.0), policy, generator)))


@dataclass(frozen=True)
class GANConfig:
    """The adversarial recipe, with the official values (FlatDINO `train_decoder.py` `OptimConfig`; RAE
    `configs/stage1/training/DINOv2-B_decXL.yaml` `gan:`; both agree on every number below).

    Epochs count the generator's optimizer updates: a phase starts at step `epoch * steps_per_epoch`.
    Beware the names: FlatDINO's `disc_start = 6` / `disc_gan_start = 8` are RAE's `disc_upd_start = 6` /
    `disc_start = 8`. Officially 16 epochs, batch 512; the decoder's own AdamW (0.9, 0.95), lr 2e-4 -> 2e-5, wd 0.
    """

    disc_start_epoch: float = 6  # discriminator updates begin (FlatDINO `disc_start`, RAE `disc_upd_start`)
    gan_start_epoch: float = 8  # GAN term enters the decoder's loss (FlatDINO `disc_gan_start`, RAE `disc_start`)
    lpips_start_epoch: int = 0  # LPIPS from the start (FlatDINO / RAE `lpips_start`)
    gan_weight: float = 0.75  # FlatDINO `gan_weight`, RAE `disc_weight`
    lpips_weight: float = 1.0  # FlatDINO `lpips_weight`, RAE `perceptual_weight`
    max_d_weight: float = 1e4  # clamp of the adaptive weight (FlatDINO / RAE `max_d_weight`)
    adaptive_eps: float = ADAPTIVE_EPS
    disc_updates: int = 1  # discriminator steps per generator step (RAE `disc_updates`; FlatDINO: one)
    # Discriminator AdamW on the heads only (FlatDINO: optax.adamw with OptimConfig; RAE `gan.disc.optimizer`).
    disc_lr: float = 2e-4
    disc_lr_final: float = 2e-5
    disc_betas: tuple[float, float] = (0.9, 0.95)
    disc_weight_decay: float = 0.0
    disc_adam_eps: float = 1e-8  # optax and torch defaults (neither config sets it)
    # Its schedule counts its own updates (0 at disc_start_epoch): linear warm-up from 0 over one epoch, then cosine
    # to disc_lr_final at `disc_decay_epochs` updates-epochs. Both codes use the whole run's length (16), so after
    # the 10 epochs the discriminator trains, the cosine is only at (10 - 1) / (16 - 1) and lr ~ 8.2e-5.
    disc_warmup_epochs: int = 1
    disc_decay_epochs: int = 16
    # DiffAugment (FlatDINO `DiffAugConfig(prob=1.0, cutout=0.0)`, RAE `augment: {prob: 1.0, cutout: 0.0}`).
    diffaug_prob: float = 1.0
    diffaug_translation: float = 0.125
    diffaug_color: bool = True
    diffaug_cutout: float = 0.0

    @property
    def policy(self) -> DiffAugPolicy:
        return DiffAugPolicy(self.diffaug_prob, self.diffaug_translation, self.diffaug_color, self.diffaug_cutout)

    def to_dict(self) -> dict:
        return asdict(self)


class GANPhase(NamedTuple):
    """Which loss terms are active at a generator step."""

    use_lpips: bool
    train_disc: bool
    use_gan: bool


def gan_phase(step: int, steps_per_epoch: int, cfg: GANConfig = GANConfig()) -> GANPhase:
    """The active terms at generator step `step` (0-based count of completed decoder updates, as officially)."""
    return GANPhase(use_lpips=step >= cfg.lpips_start_epoch * steps_per_epoch,
                    train_disc=step >= cfg.disc_start_epoch * steps_per_epoch,
                    use_gan=step >= cfg.gan_start_epoch * steps_per_epoch)


def disc_lr(disc_step: int, steps_per_epoch: int, cfg: GANConfig = GANConfig()) -> float:
    """The discriminator's lr after `disc_step` of its own updates (optax `warmup_cosine_decay_schedule`)."""
    warmup = cfg.disc_warmup_epochs * steps_per_epoch
    total = cfg.disc_decay_epochs * steps_per_epoch
    if disc_step < warmup:
        return cfg.disc_lr * disc_step / warmup
    progress = min(max(disc_step - warmup, 0) / max(total - warmup, 1), 1.0)
    return cfg.disc_lr_final + (cfg.disc_lr - cfg.disc_lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def disc_optimizer(disc, cfg: GANConfig = GANConfig()) -> torch.optim.AdamW:
    """AdamW over the discriminator's trainable (head) parameters with the official settings (lr at its peak)."""
    return torch.optim.AdamW(disc.trainable_parameters(), lr=cfg.disc_lr, betas=cfg.disc_betas,
                             weight_decay=cfg.disc_weight_decay, eps=cfg.disc_adam_eps)


# ------------------------------------------------------------------------------------------------ the wiring


def pack_draw(prefix: str, d: DiffAugDraw, batch: int) -> dict[str, torch.Tensor]:
    """A DiffAugDraw of the whole global batch as (G, ...) tensors (the op coins repeated per sample), so the
    trainer can slice it per micro-batch like every other draw."""
    out = {}
    for name, v in d._asdict().items():
        out[f"{prefix}.{name}"] = torch.full((batch,), bool(v)) if isinstance(v, bool) else v
    return out


def unpack_draw(prefix: str, d: dict[str, torch.Tensor]) -> DiffAugDraw:
    """Inverse of `pack_draw` for a micro-batch's slice."""
    values = {name: d[f"{prefix}.{name}"] for name in DiffAugDraw._fields}
    for coin in ("translate", "color", "cutout"):
        values[coin] = bool(values[coin][0]) if len(values[coin]) else False
    return DiffAugDraw(**values)


class DecoderGAN:
    """The adversarial part of pixel-decoder training for `pipeline.train`: the step's DiffAugment draws (for the
    generator's term, the discriminator's fakes and its reals, each for the whole global batch, so they do not depend
    on the world size or the micro-batch), the generator's term with the adaptive weight, and the discriminator as a
    `pipeline.train.Objective`.

    The adaptive weight is taken on the global batch: each process's gradients of rec and gan w.r.t. the last layer,
    weighted by its share of the global batch, are summed over processes before the ratio (RAE and the official code
    take it per device, which makes it depend on the world size). That needs one micro-batch per process.
    """

    def __init__(self, disc, cfg: GANConfig, steps_per_epoch: int, seed: int, global_batch: int, image_shape,
                 last_layer: torch.Tensor, rt):
        self.disc, self.cfg, self.spe, self.seed, self.g = disc, cfg, max(1, steps_per_epoch), seed, global_batch
        self.shape, self.last_layer, self.rt = tuple(image_shape), last_layer, rt

    def phase(self, step: int) -> GANPhase:
        return gan_phase(step, self.spe, self.cfg)

    def draw(self, step: int, device) -> dict[str, torch.Tensor]:
        from pipeline.runtime import torch_generator

        g = torch_generator(self.seed, "diffaug", step)  # CPU: the same augmentation on any device
        out = {}
        for name in ("gen", "fake", "real"):
            out |= pack_draw(name, draw_diff_augment((self.g, *self.shape), self.cfg.policy, g), self.g)
        return out

    def generator_term(self, rec: torch.Tensor, fake_pm1: torch.Tensor, d: dict, step: int, share: float):
        """(gan_weight * w * -mean D(aug(fake)), scalars) once the GAN phase began, else (0, {})."""
        if not self.phase(step).use_gan:
            return torch.zeros((), device=rec.device), {}
        self.disc.eval()  # no power-iteration update in the generator's pass
        logits = self.disc(apply_diff_augment(fake_pm1.clamp(-1.0, 1.0), unpack_draw("gen", d), self.cfg.policy))
        gan = generator_adv_loss(logits)
        g_rec = torch.autograd.grad(rec, self.last_layer, retain_graph=True)[0].float() * share
        g_gan = torch.autograd.grad(gan, self.last_layer, retain_graph=True)[0].float() * share
        both = self.rt.all_reduce_sum_(torch.stack([g_rec, g_gan]))  # the global batch's mean gradients
        w = (both[0].norm() / (both[1].norm() + self.cfg.adaptive_eps)).clamp(0.0, self.cfg.max_d_weight).detach()
        return self.cfg.gan_weight * w * gan, {"gan": gan.detach(), "adaptive_weight": w}

    def objective(self, decode_pm1):
        """The discriminator's update, after the decoder's: `decode_pm1(batch, draws)` gives the updated decoder's
        images in [-1, 1] (no grad) and the real ones."""
        from pipeline.train import Objective

        def loss(disc, batch, d, step):
            fake, real = decode_pm1(batch, d)
            disc.train()
            logits_fake = disc(apply_diff_augment(quantize_pm1(fake), unpack_draw("fake", d), self.cfg.policy))
            logits_real = disc(apply_diff_augment(real.clamp(-1.0, 1.0), unpack_draw("real", d), self.cfg.policy))
            hinge = hinge_d_loss(logits_real, logits_fake)
            return hinge, {"accuracy": (logits_real > logits_fake).float().mean(),
                           "logits_real": logits_real.detach().float().mean(),
                           "logits_fake": logits_fake.detach().float().mean()}

        start = self.cfg.disc_start_epoch * self.spe
        return Objective("disc", self.disc, disc_optimizer(self.disc, self.cfg), loss,
                         lambda step: disc_lr(step - start, self.spe, self.cfg),
                         active=lambda step: self.phase(step).train_disc, state=self.disc.heads)


def build_decoder_gan(cfg, rows: int, decoder, rt) -> DecoderGAN:
    """The discriminator (frozen backbone `cfg.disc_backbone`, fresh heads seeded by `cfg.seed`) and the official GAN
    schedule with train-decoder's options (`gan_weight`, `disc_start_epoch`, `gan_start_epoch`, epochs of `rows`)."""
    from dataclasses import replace

    from models.discriminator import load_discriminator
    from pipeline.manifest import UserError

    if cfg.micro_batch and cfg.micro_batch < cfg.batch_size // rt.world:
        raise UserError("--gan takes the adaptive GAN weight on the whole global batch: leave --micro-batch at 0 "
                        "(one micro-batch per process)")
    disc = load_discriminator(cfg.disc_backbone, seed=cfg.seed).to(rt.device)
    gcfg = replace(GANConfig(), gan_weight=cfg.gan_weight, disc_start_epoch=cfg.disc_start_epoch,
                   gan_start_epoch=cfg.gan_start_epoch)
    return DecoderGAN(disc, gcfg, rows // cfg.batch_size, cfg.seed, cfg.batch_size, (3, 256, 256),
                      decoder.decoder.decoder_pred.weight, rt)
