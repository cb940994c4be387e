"""Layers shared by FlatDINO and the LightningDiT generator.

Lineage: the block structure of timm/dinov2 ViTs, the adaLN `modulate` of DiT, the 1-D sin-cos table and
interleaved-pair RoPE of the official FlatDINO `models/vit.py` and `models/dit.py` (JAX). Written here rather than
imported from timm so that behaviour cannot move with a dependency bump.

Deliberate choices:
- One attention entry point, `attention()`, with an explicit backend string ("sdpa" default, "xformers" optional
  on CUDA). xformers is imported lazily inside its branch; nothing happens at import time.
- Norms compute in float32 and cast back, as the official jmp policy does under bf16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_BACKENDS = ("sdpa", "xformers")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim): (B, H, N, Dh) x3 -> (B, H, N, Dh)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        if not q.is_cuda:
            raise RuntimeError("attention backend 'xformers' needs CUDA tensors; use backend='sdpa' on CPU")
        import xformers.ops as xops  # optional dependency, CUDA only

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)  # (B, N, H, Dh) -> (B, H, N, Dh)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the autocast dtype; output in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        if x.device.type == "meta":  # autocast has no meta backend; shapes are all that matter there
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale (no bias), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), all three linears with bias: (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    """Multi-head self-attention with optional qk-LayerNorm (scale only) and optional rotary embedding.

    Args:
        dim: model width.
        num_heads: number of heads; head_dim = dim // num_heads.
        qkv_bias: bias on the fused qkv projection (the output projection always has one).
        qk_norm: LayerNorm over head_dim on q and k, scale only, eps 1e-6 (FlatDINO); off for the DiT.
        backend: "sdpa" or "xformers", see `attention`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False, backend: str = "sdpa"):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = LayerNorm(self.head_dim, eps=1e-6, bias=False) if qk_norm else nn.Identity()
        self.k_norm = LayerNorm(self.head_dim, eps=1e-6, bias=False) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                keep: slice | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); `rope` is the (cos, sin) pair from `rope_1d`, each (N, head_dim).

        With `keep`, only the tokens x[:, keep] query (every token is still a key and a value) and the result is
        (B, len(keep), D): the same numbers as `forward(x)[:, keep]` without computing the outputs nobody reads.
        """
        B, N, D = x.shape
        if keep is None:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
            q, k, v = qkv.unbind(0)
        else:  # the fused weight's rows are [q | k | v]: q from the kept tokens, k and v from all
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, keep], w[:D], None if b is None else b[:D])
            kv = F.linear(x, w[D:], None if b is None else b[D:])
            q = q.reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, M, Dh)
            k, v = kv.reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin) if keep is None else apply_rope(q, cos[keep], sin[keep])
            k = apply_rope(k, cos, sin)
        out = attention(q, k, v, self.backend)  # (B, H, M, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, q.shape[2], D))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, with (B, D) conditioning broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Fixed 1-D sin-cos table (N,) -> (N, dim), layout [sin(p w_k) | cos(p w_k)], w_k = base^(-k / (dim/2))."""
    assert dim % 2 == 0, "sin-cos embedding needs an even width"
    half = dim // 2
    omega = base ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def rope_1d(head_dim: int, positions: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for interleaved pairs: (N,) -> cos, sin of shape (N, head_dim).

    Frequencies theta^(-2i/head_dim) for i < head_dim/2, each repeated twice so that element pairs
    (x_2i, x_2i+1) rotate together (the `(d r), r=2` layout of the official code).
    """
    assert head_dim % 2 == 0, "RoPE needs an even head_dim"
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (Dh/2,)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]  # (N, Dh/2)
    angles = angles.repeat_interleave(2, dim=-1)  # (N, Dh)
    return angles.cos().float(), angles.sin().float()


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) over the last dim."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., Dh/2, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, N, Dh) by position with (N, Dh) tables."""
    return (x * cos.to(x.dtype) + rotate_interleaved(x) * sin.to(x.dtype)).to(x.dtype)


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Truncated normal at +-2 std (JAX `truncated_normal` convention scaled by std)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


def init_linears_(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights and zero biases for every nn.Linear below `module`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
