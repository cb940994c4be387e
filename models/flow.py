"""Flow matching for the LightningDiT generator: interpolant, time shift, label dropout, loss and ODE samplers.

Lineage: the official FlatDINO JAX `train_generator.py` and `decoder/sampling.py` (SPEC.md sections 7.2 and 7.4);
RAE/SiT for the shift and guidance-interval ideas (their convention is mirrored: here t = 0 is noise, t = 1 is data).

Conventions (SPEC.md section 13, items 8 and 13):
- x_t = (1 - t) noise + t z, target v = z - noise, loss = plain mean MSE over all elements.
- t = u / (kappa - (kappa - 1) u) with u ~ U(0, 1); kappa defaults to sqrt(T F / 4096) and is stored in the
  checkpoint; the same kappa warps the uniform sampling grid.
- The sampling grid is float32 exactly as the official `jnp.linspace(0, 1, steps + 1, dtype=float32)` computes it
  (t_15 of 50 steps is 0.29999998, so the default interval guides 34 of 50 Euler steps, not 35).
- CFG v_u + w (v_c - v_u) on all channels, two forward passes (label `null_class` for v_u), applied only while
  t_min < t < t_max on the warped t.

Departures:
- The official standalone eval scripts warp the sampling grid only when kappa > 1 (SPEC section 12.2); here the
  training kappa is always used, also when kappa < 1, so training and sampling agree.
- Per-sample noise is drawn from a generator seeded by (seed, global index), so a sample does not depend on the
  batch it was drawn in or on the world size.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn as nn

TIME_SHIFT_BASE = 4096  # `time_dist_shift_base` of the official code
SAMPLERS = ("euler", "heun")


def default_kappa(tokens: int, channels: int, base: int = TIME_SHIFT_BASE) -> float:
    """kappa = sqrt(T F / base): 1.0 for 32x128 latents, 0.5 for the 32x32 demo latents."""
    return math.sqrt(tokens * channels / base)


def shift_time(t: torch.Tensor, kappa: float) -> torch.Tensor:
    """t -> t / (kappa - (kappa - 1) t); kappa > 1 moves mass toward the noise end (t = 0); kappa = 1 is identity."""
    return t / (kappa - (kappa - 1.0) * t)


def interpolate(z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) noise + t z with t (B,) broadcast over (B, T, F)."""
    tb = t.view(-1, *([1] * (z.dim() - 1))).to(z.dtype)
    return (1 - tb) * noise + tb * z


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None) -> torch.Tensor:
    """Replace each label by `null_class` with probability p (classifier-free guidance training)."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


class FlowDraw(NamedTuple):
    """The random quantities of one training step; drawn up front so that they can be replayed exactly."""

    noise: torch.Tensor  # (B, T, F)
    t: torch.Tensor  # (B,) shifted times
    y: torch.Tensor  # (B,) labels after dropout


class FlowLoss(NamedTuple):
    loss: torch.Tensor  # () mean MSE
    per_sample: torch.Tensor  # (B,) per-sample MSE, detached (for loss-by-time-bucket logging)
    t: torch.Tensor  # (B,) times used


def draw(z: torch.Tensor, y: torch.Tensor, kappa: float, label_dropout: float, null_class: int,
         generator: torch.Generator | None) -> FlowDraw:
    """Draw noise, shifted times and dropped labels for latents z (B, T, F) on z's device."""
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
    u = torch.rand(z.shape[0], generator=generator, device=z.device, dtype=torch.float32)
    return FlowDraw(noise, shift_time(u, kappa), drop_labels(y, label_dropout, null_class, generator))


def flow_loss(model: nn.Module, z: torch.Tensor, d: FlowDraw) -> FlowLoss:
    """Velocity-matching MSE for latents z (B, T, F) with the draws `d`."""
    z = z.float()
    x_t = interpolate(z, d.noise, d.t)
    v = model(x_t, d.t, d.y).float()  # (B, T, F)
    err = (v - (z - d.noise)).pow(2).flatten(1).mean(1)  # (B,)
    return FlowLoss(err.mean(), err.detach(), d.t)


def jax_linspace_f32(start: float, stop: float, num: int) -> torch.Tensor:
    """`jnp.linspace(start, stop, num, dtype=float32)` bit for bit: (num,) float32, both endpoints included.

    JAX computes step_k = iota_k / (num - 1) inside a jit, where XLA's algebraic simplifier rewrites the division by
    the constant as a multiplication by its float32 reciprocal (`A / Const => A * (1 / Const)`); then
    out_k = start (1 - step_k) + stop step_k in float32, and the last element is `stop` itself. So t_15 of a
    50-step grid is float32(15 * float32(1/50)) = 0.29999998, where float32(15/50) would be 0.30000001.
    """
    if num < 2:
        raise ValueError(f"a time grid needs at least 2 points, got {num}")
    div = num - 1
    recip = torch.ones((), dtype=torch.float32) / torch.tensor(float(div), dtype=torch.float32)  # IEEE float32
    step = torch.arange(div, dtype=torch.float32) * recip  # (div,)
    lo, hi = torch.tensor(start, dtype=torch.float32), torch.tensor(stop, dtype=torch.float32)
    return torch.cat([lo * (1 - step) + hi * step, hi.view(1)])


def time_grid(steps: int, kappa: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The official sampling grid: (steps + 1,) float32 from 0 (noise) to 1 (data), warped by the time shift.

    Uniform as `jnp.linspace(0, 1, steps + 1, dtype=float32)` (see `jax_linspace_f32`), then t / (kappa -
    (kappa - 1) t) in float32 as `decoder/sampling.py` computes it (identity for kappa = 1). With 50 steps and the
    guidance interval (0.3, 1.0), 34 steps are guided, as in the official sampler.
    """
    u = jax_linspace_f32(0.0, 1.0, steps + 1)
    k = torch.tensor(kappa, dtype=torch.float32)
    return (u / (k - (k - 1.0) * u)).to(device=device)


def guided_velocity(model: nn.Module, x: torch.Tensor, t: float, y: torch.Tensor, cfg_scale: float,
                    cfg_interval: tuple[float, float], null_class: int) -> torch.Tensor:
    """v_u + w (v_c - v_u) when t_min < t < t_max and w != 1, else the conditional velocity: (B, T, F)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    v_c = model(x, tt, y).float()
    if cfg_scale == 1.0 or not (cfg_interval[0] < t < cfg_interval[1]):
        return v_c
    v_u = model(x, tt, torch.full_like(y, null_class)).float()
    return v_u + cfg_scale * (v_c - v_u)


def integrate(velocity: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, grid: torch.Tensor,
              sampler: Literal["euler", "heun"] = "euler") -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) along `grid` (steps + 1,) with Euler or Heun (2nd order)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    ts = grid.tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v0 = velocity(x, t0)
        x_euler = x + (t1 - t0) * v0
        if sampler == "euler":
            x = x_euler
        else:
            x = x + (t1 - t0) * 0.5 * (v0 + velocity(x_euler, t1))
    return x


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, noise: torch.Tensor, steps: int = 50,
           sampler: Literal["euler", "heun"] = "euler", cfg_scale: float = 1.0,
           cfg_interval: tuple[float, float] = (0.3, 1.0), kappa: float = 1.0,
           null_class: int | None = None) -> torch.Tensor:
    """Generate latents from noise (B, T, F) for labels (B,): ODE from t = 0 (noise) to t = 1 -> z (B, T, F).

    `null_class` defaults to `model.cfg.null_class`. Returns float32 latents (still normalised if the model was
    trained on normalised latents).
    """
    null = model.cfg.null_class if null_class is None else null_class
    grid = time_grid(steps, kappa, noise.device)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(model, x, t, labels, cfg_scale, cfg_interval, null)

    return integrate(velocity, noise.float(), grid, sampler)


def class_balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """(num_classes * per_class,) int64 labels, class-major: [0]*per_class + [1]*per_class + ..."""
    return torch.arange(num_classes, dtype=torch.int64).repeat_interleave(per_class)


def sample_seed(seed: int, index: int) -> int:
    """A stable 63-bit seed from (seed, global sample index)."""
    digest = hashlib.sha256(f"flatdino-noise:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_noise(seed: int, indices: torch.Tensor | list[int], shape: tuple[int, int]) -> torch.Tensor:
    """Per-sample N(0, I) noise (B, T, F) on CPU; row i depends only on (seed, indices[i])."""
    rows = []
    for idx in (indices.tolist() if isinstance(indices, torch.Tensor) else indices):
        g = torch.Generator(device="cpu").manual_seed(sample_seed(seed, int(idx)))
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows)
