"""LightningDiT flow-matching generator on a 1-D token sequence (SPEC.md section 7.1).

Lineage: the official FlatDINO JAX `models/dit.py` (LightningDiT variant of DiT: RMSNorm, SwiGLU, 1-D RoPE on q/k,
adaLN-Zero, Gaussian Fourier time embedding with t in [0, 1]); LightningDiT and DiT for the block structure.
Written from the specification, not copied.

Deliberate choices and departures:
- No patchify: each latent token is one DiT token (`x_embedder` is a Linear), so the same class runs on 32x128
  FlatDINO latents and on 256x768 DINOv2 grids (the 8x FLOP claim is measured on one implementation).
- The Gaussian Fourier matrix W ~ N(0, 1) is a persistent buffer drawn from `cfg.time_seed` with an explicit
  generator, so it travels in the state dict (the official code stores it as a non-trainable variable).
- The sin-cos position table and RoPE tables are non-persistent buffers recomputed by `reset_fixed_buffers`, so a
  model built on the meta device can be materialised and loaded (`load_dit`).
- Unused official options (joint CLS diffusion, registers, learn_sigma) are not implemented; the DiT^DH head is
  `models/dit_dh.py` (train-dit `--arch dit-dh`).
- Label dropout is not done here: callers pass the null class (`cfg.num_classes`) in `y` (see `models.flow`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.layers import (
    ATTENTION_BACKENDS,
    Attention,
    RMSNorm,
    SwiGLU,
    init_linears_,
    rope_1d,
    sincos_1d,
    trunc_normal_,
)


@dataclass(frozen=True)
class DiTConfig:
    """LightningDiT hyper-parameters; `tokens`/`channels` are set from the latents artifact."""

    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_hidden: int = 3072
    tokens: int = 32
    channels: int = 128
    num_classes: int = 1000
    time_freqs: int = 256  # Gaussian Fourier frequencies; features are 2x this
    time_seed: int = 0  # seed of the fixed random Fourier matrix
    rope_theta: float = 10000.0
    attn_backend: str = "sdpa"
    grad_checkpointing: bool = False

    def __post_init__(self):
        assert self.width % self.heads == 0, f"width {self.width} not divisible by {self.heads} heads"
        assert (self.width // self.heads) % 2 == 0, "RoPE needs an even head_dim"
        assert self.attn_backend in ATTENTION_BACKENDS, f"attn_backend must be one of {ATTENTION_BACKENDS}"

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (dropped) class."""
        return self.num_classes


PRESETS: dict[str, DiTConfig] = {
    "S": DiTConfig(width=384, depth=12, heads=6, mlp_hidden=1024),
    "B": DiTConfig(width=768, depth=12, heads=12, mlp_hidden=2048),
    "L": DiTConfig(width=1024, depth=24, heads=16, mlp_hidden=2731),
    "XL": DiTConfig(width=1152, depth=28, heads=16, mlp_hidden=3072),
    # Tiny preset for tests and the CPU demo (10 classes; tokens and channels come from the latents, 8 x 32 there).
    "T": DiTConfig(width=128, depth=4, heads=4, mlp_hidden=384, channels=32, num_classes=10),
}


class TimestepEmbedder(nn.Module):
    """Gaussian Fourier features of t in [0, 1] with a fixed random matrix, then an MLP: (B,) -> (B, D)."""

    def __init__(self, width: int, freqs: int, seed: int):
        super().__init__()
        w = torch.randn(freqs, generator=torch.Generator(device="cpu").manual_seed(seed), device="cpu")
        self.register_buffer("freqs", w.to(torch.get_default_device()))  # persistent: saved with the weights
        self.mlp = nn.Sequential(nn.Linear(2 * freqs, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, D)."""
        angles = 2 * math.pi * t.float()[:, None] * self.freqs[None, :]  # (B, freqs)
        feats = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, 2 freqs)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def _per_token(*mods: torch.Tensor) -> list[torch.Tensor]:
    """adaLN terms of a global condition (B, D) broadcast over tokens as (B, 1, D); per-token ones (B, N, D) as is."""
    return [m.unsqueeze(1) if m.dim() == 2 else m for m in mods]


class DiTBlock(nn.Module):
    """adaLN-Zero block: RMSNorm -> modulate -> attention (RoPE) / SwiGLU, gated residuals. The condition is global
    (B, D) (LightningDiT) or per token (B, N, D) (the DiT^DH head, `models.dit_dh`)."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, backend: str = "sdpa"):
        super().__init__()
        self.norm1 = RMSNorm(width, eps=1e-6)
        self.attn = Attention(width, heads, qkv_bias=True, qk_norm=False, backend=backend)
        self.norm2 = RMSNorm(width, eps=1e-6)
        self.mlp = SwiGLU(width, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, N, D), c (B, D) or (B, N, D) -> (B, N, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _per_token(
            *self.adaLN_modulation(c).chunk(6, dim=-1))
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, rope=rope)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class FinalLayer(nn.Module):
    """RMSNorm -> adaLN shift/scale (global or per-token condition) -> Linear to the latent channels:
    (B, N, D) -> (B, N, F)."""

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.norm = RMSNorm(width, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = _per_token(*self.adaLN_modulation(c).chunk(2, dim=-1))
        return self.linear(self.norm(x) * (1 + scale) + shift)


class DiT(nn.Module):
    """LightningDiT velocity model v(x_t, t, y) on (B, T, F) latents; `device="meta"` builds without memory."""

    def __init__(self, cfg: DiTConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        with torch.device(device if device is not None else torch.get_default_device()):
            self.x_embedder = nn.Linear(cfg.channels, cfg.width)
            self.t_embedder = TimestepEmbedder(cfg.width, cfg.time_freqs, cfg.time_seed)
            self.y_embedder = nn.Embedding(cfg.num_classes + 1, cfg.width)  # last row = null class
            self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.attn_backend)
                                        for _ in range(cfg.depth))
            self.final_layer = FinalLayer(cfg.width, cfg.channels)
            self.register_buffer("pos_embed", torch.empty(cfg.tokens, cfg.width), persistent=False)
            self.register_buffer("rope_cos", torch.empty(cfg.tokens, cfg.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.tokens, cfg.head_dim), persistent=False)
        self.reset_fixed_buffers()
        self.initialize_weights()

    def reset_fixed_buffers(self) -> None:
        """(Re)compute the sin-cos position table and the RoPE tables on the buffers' device."""
        if self.pos_embed.is_meta:
            return
        pos = torch.arange(self.cfg.tokens)
        cos, sin = rope_1d(self.cfg.head_dim, pos, self.cfg.rope_theta)
        self.pos_embed.copy_(sincos_1d(self.cfg.width, pos))
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def initialize_weights(self) -> None:
        """Truncated-normal linears, Xavier x_embedder, zero adaLN modulation and zero output layer."""
        init_linears_(self, std=0.02)
        nn.init.xavier_uniform_(self.x_embedder.weight)
        trunc_normal_(self.y_embedder.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity prediction: x (B, T, F), t (B,) in [0, 1], y (B,) int in [0, num_classes] -> (B, T, F)."""
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, rope, use_reentrant=False)
            else:
                h = block(h, c, rope)
        return self.final_layer(h, c)  # (B, T, F)


def config_to_dict(cfg: DiTConfig) -> dict:
    """JSON-able dict of a DiTConfig."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> DiTConfig:
    """Inverse of `config_to_dict`; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown DiTConfig fields {sorted(unknown)}")
    return DiTConfig(**d)


def load_dit(ckpt_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[DiT, dict]:
    """Build a DiT from `<ckpt_dir>/config.json` and strictly load `ema.safetensors` (or `model.safetensors`).

    `ckpt_dir` is either the `ckpt/` folder or the train-dit output folder that holds it. Returns the model in
    eval mode and the full checkpoint config dict (keys "dit", "flow", "normalise", "latents_fingerprint", "step"...).
    """
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").exists() and (ckpt_dir / "ckpt" / "config.json").exists():
        ckpt_dir = ckpt_dir / "ckpt"
    if not (ckpt_dir / "config.json").exists():
        raise FileNotFoundError(f"{ckpt_dir} has no config.json: not a train-dit checkpoint (run `flatdino train-dit`)")
    full = json.loads((ckpt_dir / "config.json").read_text())
    model = DiT(config_from_dict(full["dit"]), device="meta")
    model = model.to_empty(device=device)
    state = load_file(str(ckpt_dir / ("ema.safetensors" if ema else "model.safetensors")), device=str(device))
    model.load_state_dict(state, strict=True)
    model.reset_fixed_buffers()
    return model.eval(), full
