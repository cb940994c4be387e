"""DiT^DH: a LightningDiT body with a wide, shallow denoising head, on a 1-D token sequence (SPEC.md section 7.1).

Lineage: the official FlatDINO JAX port `flatdino/decoder/dit_dh.py` (`DiTDH` with `patch_size=None`, the flat
input path) of RAE's `src/stage2/models/DDT.py` (`DiTwDDTHead`), as built by the official `train_generator.py` for
`dit{s,b,l,xl}-dh` experiment names. Written from those sources, not copied.

Data flow, x (B, T, F), t (B,), y (B,):
- c = SiLU(t_emb + y_emb) (B, W). Each adaLN applies its own SiLU on top, so the body sees SiLU(SiLU(.)) as in both
  official codes.
- body: s = s_embedder(x) + pos_embed (learned, flat inputs), `depth` adaLN-Zero blocks conditioned on c, 1-D RoPE;
  no final norm. Then s = SiLU(s + t_emb) per token and s_projector (W -> W_dh, identity when equal).
- head: h = x_embedder(x) (a second embedding of the *noisy input*, not of the body output), `dh_depth` adaLN-Zero
  blocks of width W_dh whose modulation is computed per token from s (B, T, W_dh), 1-D RoPE with the head's
  head_dim; final layer RMSNorm -> per-token shift/scale from s -> Linear(W_dh -> F), zero-initialised.
Blocks are LightningDiT's: RMSNorm (scale, eps 1e-6), QKV and output biases, no qk-norm, SwiGLU with biases.

Flow conventions are those of `models.dit` and `models.flow` (the official `train_step` is shared by both archs):
t = 0 noise, t = 1 data, velocity target, Gaussian Fourier time embedding of t in [0, 1] with a fixed random matrix.

Initialisation follows the official FlatDINO port: block linears Xavier-uniform, embedders truncated normal 0.01
(flax's `truncated_normal()` default), time MLP / label table / pos_embed truncated normal 0.02, s_projector Xavier,
adaLN modulations and the final layer zero. RAE differs in places (PyTorch default block init, Xavier embedders,
fixed 2-D sin-cos pos_embed for patched grids), which does not change any shape or parameter count.

Deliberate departures:
- Same as `models.dit`: the Fourier matrix is a persistent buffer from `cfg.time_seed`; the RoPE tables are
  non-persistent buffers recomputed by `reset_fixed_buffers` (meta-device build, then load); label dropout is done
  by the caller (`models.flow.draw`). Unused official options (registers in the head, joint CLS diffusion,
  `wo_shift`, patchified 2-D inputs) are not implemented.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.dit import DiTBlock, FinalLayer, TimestepEmbedder
from models.layers import ATTENTION_BACKENDS, init_linears_, rope_1d, trunc_normal_

ARCH = "dit-dh"  # the checkpoint config's "arch" value for this model


@dataclass(frozen=True)
class DiTDHConfig:
    """DiT^DH hyper-parameters: body (the official `encoder_*`) and denoising head (`decoder_*`, here `dh_*`)."""

    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_hidden: int = 3072
    dh_width: int = 2048
    dh_depth: int = 2
    dh_heads: int = 16
    dh_mlp_hidden: int = 5461
    tokens: int = 32
    channels: int = 128
    num_classes: int = 1000
    time_freqs: int = 256
    time_seed: int = 0
    rope_theta: float = 10000.0
    attn_backend: str = "sdpa"
    grad_checkpointing: bool = False

    def __post_init__(self):
        for w, h, part in ((self.width, self.heads, "body"), (self.dh_width, self.dh_heads, "head")):
            assert w % h == 0, f"{part} width {w} not divisible by {h} heads"
            assert (w // h) % 2 == 0, f"RoPE needs an even {part} head_dim"
        assert self.attn_backend in ATTENTION_BACKENDS, f"attn_backend must be one of {ATTENTION_BACKENDS}"

    @property
    def head_dim(self) -> int:
        """Attention head size of the body."""
        return self.width // self.heads

    @property
    def dh_head_dim(self) -> int:
        """Attention head size of the denoising head."""
        return self.dh_width // self.dh_heads

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (dropped) class."""
        return self.num_classes


def _official(width: int, depth: int, heads: int, mlp_hidden: int) -> DiTDHConfig:
    """`train_generator.py:build_config` for `-dh`: body = LIGHTNING_DIT_CONFIGS[size], head 2 x 2048 / 16 heads,
    mlp_ratio = mlp_hidden / width for both, hidden = int(width * mlp_ratio) (`LightningDDTBlock`)."""
    ratio = mlp_hidden / width
    return DiTDHConfig(width=width, depth=depth, heads=heads, mlp_hidden=int(width * ratio),
                       dh_mlp_hidden=int(2048 * ratio))


# Keyed by the official experiment names (`dit{size}-dh`, train_generator.py `parse_experiment`). The head hidden is
# 5461 for s/b/xl and 5462 for l (2731 / 1024 is not exactly 8/3). "ditt-dh" is ours: tests and the CPU demo.
PRESETS: dict[str, DiTDHConfig] = {
    "dits-dh": _official(384, 12, 6, 1024),
    "ditb-dh": _official(768, 12, 12, 2048),
    "ditl-dh": _official(1024, 24, 16, 2731),
    "ditxl-dh": _official(1152, 28, 16, 3072),
    "ditt-dh": DiTDHConfig(width=128, depth=4, heads=4, mlp_hidden=384, dh_width=256, dh_depth=2, dh_heads=4,
                           dh_mlp_hidden=768, channels=32, num_classes=10),
}


class DiTDH(nn.Module):
    """DiT^DH velocity model v(x_t, t, y) on (B, T, F) latents; same interface as `models.dit.DiT`."""

    def __init__(self, cfg: DiTDHConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        with torch.device(device if device is not None else torch.get_default_device()):
            self.s_embedder = nn.Linear(cfg.channels, cfg.width)
            self.x_embedder = nn.Linear(cfg.channels, cfg.dh_width)
            self.t_embedder = TimestepEmbedder(cfg.width, cfg.time_freqs, cfg.time_seed)
            self.y_embedder = nn.Embedding(cfg.num_classes + 1, cfg.width)  # last row = null class
            self.pos_embed = nn.Parameter(torch.empty(1, cfg.tokens, cfg.width))  # learned (flat inputs)
            self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.attn_backend)
                                        for _ in range(cfg.depth))
            self.s_projector = nn.Linear(cfg.width, cfg.dh_width) if cfg.width != cfg.dh_width else nn.Identity()
            self.head_blocks = nn.ModuleList(DiTBlock(cfg.dh_width, cfg.dh_heads, cfg.dh_mlp_hidden, cfg.attn_backend)
                                             for _ in range(cfg.dh_depth))
            self.final_layer = FinalLayer(cfg.dh_width, cfg.channels)
            for name, dim in (("rope", cfg.head_dim), ("dh_rope", cfg.dh_head_dim)):
                self.register_buffer(f"{name}_cos", torch.empty(cfg.tokens, dim), persistent=False)
                self.register_buffer(f"{name}_sin", torch.empty(cfg.tokens, dim), persistent=False)
        self.reset_fixed_buffers()
        self.initialize_weights()

    def reset_fixed_buffers(self) -> None:
        """(Re)compute the body and head RoPE tables on the buffers' device."""
        if self.rope_cos.is_meta:
            return
        pos = torch.arange(self.cfg.tokens)
        for name, dim in (("rope", self.cfg.head_dim), ("dh_rope", self.cfg.dh_head_dim)):
            cos, sin = rope_1d(dim, pos, self.cfg.rope_theta)
            getattr(self, f"{name}_cos").copy_(cos)
            getattr(self, f"{name}_sin").copy_(sin)

    def initialize_weights(self) -> None:
        """The official port's init (module docstring); the output is exactly zero afterwards."""
        init_linears_(self, std=0.02)  # time MLP; every other linear is set below
        for block in (*self.blocks, *self.head_blocks):
            for m in (block.attn.qkv, block.attn.proj, block.mlp.gate, block.mlp.up, block.mlp.down):
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        trunc_normal_(self.s_embedder.weight, std=0.01)
        trunc_normal_(self.x_embedder.weight, std=0.01)
        if isinstance(self.s_projector, nn.Linear):
            nn.init.xavier_uniform_(self.s_projector.weight)
        trunc_normal_(self.y_embedder.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _run(self, block: DiTBlock, x: torch.Tensor, c: torch.Tensor, rope: tuple) -> torch.Tensor:
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, c, rope, use_reentrant=False)
        return block(x, c, rope)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity prediction: x (B, T, F), t (B,) in [0, 1], y (B,) int in [0, num_classes] -> (B, T, F)."""
        t_emb = self.t_embedder(t)  # (B, W)
        c = F.silu(t_emb + self.y_embedder(y))  # (B, W)
        s = self.s_embedder(x) + self.pos_embed.to(x.dtype)  # (B, T, W)
        for block in self.blocks:
            s = self._run(block, s, c, (self.rope_cos, self.rope_sin))
        s = self.s_projector(F.silu(s + t_emb.unsqueeze(1)))  # (B, T, W_dh): per-token head conditioning
        h = self.x_embedder(x)  # (B, T, W_dh)
        for block in self.head_blocks:
            h = self._run(block, h, s, (self.dh_rope_cos, self.dh_rope_sin))
        return self.final_layer(h, s)  # (B, T, F)


def config_to_dict(cfg: DiTDHConfig) -> dict:
    """JSON-able dict of a DiTDHConfig."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> DiTDHConfig:
    """Inverse of `config_to_dict`; unknown keys are an error."""
    unknown = set(d) - {f.name for f in dataclasses.fields(DiTDHConfig)}
    if unknown:
        raise ValueError(f"unknown DiTDHConfig fields {sorted(unknown)}")
    return DiTDHConfig(**d)


def load_dit_dh(ckpt_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[DiTDH, dict]:
    """Build a DiTDH from `<ckpt_dir>/config.json` (key "dit") on meta, then strictly load its weights.

    The layout is `models.dit.load_dit`'s: `ckpt_dir` is the `ckpt/` folder or the run folder holding it, the
    weights are `ema.safetensors` (or `model.safetensors`), and the full config dict is returned with the model.
    """
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").exists() and (ckpt_dir / "ckpt" / "config.json").exists():
        ckpt_dir = ckpt_dir / "ckpt"
    if not (ckpt_dir / "config.json").exists():
        raise FileNotFoundError(f"{ckpt_dir} has no config.json: not a train-dit checkpoint (run `flatdino train-dit`)")
    full = json.loads((ckpt_dir / "config.json").read_text())
    model = DiTDH(config_from_dict(full["dit"]), device="meta").to_empty(device=device)
    state = load_file(str(ckpt_dir / ("ema.safetensors" if ema else "model.safetensors")), device=str(device))
    model.load_state_dict(state, strict=True)
    model.reset_fixed_buffers()
    return model.eval(), full


def load_generator(ckpt_dir: str | Path, ema: bool = True,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """`load_dit` or `load_dit_dh`, chosen by the checkpoint config's "arch" ("dit" when absent: older checkpoints)."""
    from models.dit import load_dit

    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "config.json" if (ckpt_dir / "config.json").exists() else ckpt_dir / "ckpt" / "config.json"
    full = json.loads(path.read_text()) if path.exists() else {}  # a missing config.json: load_dit explains
    arch = full["arch"] if "arch" in full else "dit"  # checkpoints written before DiT^DH have no "arch"
    if arch not in ("dit", ARCH):
        raise ValueError(f"{ckpt_dir}: unknown generator arch {arch!r}; expected 'dit' or {ARCH!r}")
    return (load_dit_dh if arch == ARCH else load_dit)(ckpt_dir, ema=ema, device=device)
