"""FlatDINO beta-VAE: DINOv2 patch tokens (B, N, D) <-> a short flat latent sequence (B, T, F).

Lineage: the official FlatDINO JAX code (`flatdino/models/vit.py`, `autoencoder.py`, `train.py`, `utils.py`,
commit cdd398f), as written down in SPEC.md sections 4-5. Layers come from `models/layers.py`.

Encoder: bias-free input projection (only when width != D), T learned latent tokens prepended (after optional
disposable registers), no positional embedding (unless `encoder_pos_embed`, a departure below), pre-LN blocks with
qk-LayerNorm and SwiGLU (hidden = 4 x width), final LayerNorm, bias-free projection to 2F (only when 2F != width).
Read-out: tokens [R, R+T); first F channels = mu, last F = logvar.
Decoder: bias-free F -> width projection (only when F != width) plus a learned positional embedding on the T
latents, N learned query tokens (one per output patch, no positional embedding) prepended, blocks, final LayerNorm,
bias-free projection to D (only when width != D). Read-out: tokens [R, R+N).
Every projection exists only when its two sizes differ, as in the official `ViTEncoder`: the `micro` demo encoder
(width 64, 2F = 64) therefore ends in its LayerNorm.

Experiment-grammar options (official `train.py` / `autoencoder.py`, see `pipeline.experiments`):
- `-hl` -> `half_depth=True`: both sides run max(1, depth // 2) blocks.
- `-tanh` -> `tanh=True`: z = tanh(mu + sigma eps) while training and z = tanh(mu) downstream (`FlatDINO.latents`,
  the official `encode` without a key, `compute_stats.py` and the generator's inputs). The KL stays on the
  untransformed posterior.
- `-klvarN` -> `vae_loss(kl_var_weight=1e-N)`: + beta * kl_var_weight * mean_b Var_t(sum_f max(KL, free_bits)).
- `-ilN` / `-iwX` (intermediate DINO layer targets) are not implemented.

Deliberate departures:
- The encoder's output projection is applied to the T read-out tokens only (the official code projects every token
  and then discards N of them); the values are identical, the discarded matmul is skipped. For the same reason the
  last block of each trunk updates only the tokens that are read out (`Trunk(x, keep=...)`): the encoder's T latent
  tokens, the decoder's N queries; every token is still a key and a value there, so the outputs and gradients are
  the official ones up to float rounding. The ViT-B encoder costs 31.9 GMACs instead of 34.2; the demo's one-block
  micro VAE trains ~1.45x faster (64 of the encoder's 72 token updates are skipped).
- Optional input standardisation (`standardize=True`, train-vae `--standardize`; off by default, on in the CPU
  demo): the encoder sees (X - mean) / max(std, 0.1) per patch position and channel, with statistics of the
  training features stored as buffers in the checkpoint; the reconstruction target and loss stay the raw features. Random-weight DINO
  features of the demo digits are dominated by their per-position mean (most patches are background), and without
  this the encoder does not leave the mean-prediction plateau within a CPU budget (bench/RESULTS.md).
- Optional learned positional embedding on the encoder's N patch tokens (`encoder_pos_embed=True`; off in every
  paper preset, on in `demo`), added after the input projection. DINOv2-B features carry their position, so the
  paper's encoder needs none; the demo's random 2-layer DINOv2 gives tokens that are ~24x more grey level than
  position, and without it the T latent tokens cannot tell the 64 patches apart: held-out Huber 0.140 -> 0.082 and
  round-trip PSNR +2.9 dB at the demo's 2,021 updates (bench/RESULTS.md, issue 17).
- Optional initial posterior log-variance (`logvar_init`; 0 in every paper preset, -8 in `demo`): the bias of the
  logvar half of the encoder's read-out starts there instead of 0, for encoders whose read-out is their final
  LayerNorm (width = 2F, the demo's 64 = 2 x 32). From logvar ~ 0 the posterior noise starts as large as mu, and
  Adam moves that bias by about the learning rate per update: after the demo's 2,021 updates it had reached only
  -1.5 (sigma ~ 0.25 against a mu spread of ~0.8), so the decoder trained on latents with a signal-to-noise ratio
  of ~3 and the end point depended on the noise draws. Starting at sigma = exp(-4) takes the demo VAE from
  held-out Huber 0.069 (bias -4) to 0.047 and the round trip to 25 dB in the same updates (bench/RESULTS.md,
  issue 17). The KL (beta = 2e-6 here) can still raise it; at ImageNet's 10^5+ updates the official init has time.
- Loss knobs (beta, free bits, KL annealing, the KL-variance weight) live in the training config, not in
  `FlatDINOConfig`, so that one architecture config describes a checkpoint whatever loss trained it. `half_depth`
  and `tanh` change the network's function, so they are architecture fields (defaults keep older configs loading).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import Attention, LayerNorm, SwiGLU, init_linears_, trunc_normal_

LN_EPS = 1e-6
STD_FLOOR = 0.1  # LN'd features have unit RMS per token; coordinates that barely vary are amplified at most 10x
DEFAULT_KL_NUMERATOR = 5.12e-4  # official `compute_default_kl_weight`: 1e-6 * 512 / (T * F)
# projections built before they became identities between equal sizes (the demo encoder's 64 -> 2 x 32)
LEGACY_PROJECTIONS = ("encoder.out_proj.weight", "decoder.latent_proj.weight")


@dataclass(frozen=True)
class ViTSize:
    """One side's transformer size (SPEC 4.2); head_dim = width // heads."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int


SIZES: dict[str, ViTSize] = {
    "t": ViTSize(192, 12, 3, 768),
    "s": ViTSize(384, 12, 6, 1536),
    "b": ViTSize(768, 12, 12, 3072),
    "l": ViTSize(1024, 24, 16, 4096),
    "micro": ViTSize(64, 1, 4, 256),  # demo/tests only: not an official size
}


@dataclass(frozen=True)
class FlatDINOConfig:
    """Architecture of one FlatDINO VAE; the default is the headline guess `32-bl-128` (SPEC 4.6)."""

    encoder: str = "b"
    decoder: str = "l"
    num_tokens: int = 32  # T
    latent_dim: int = 128  # F
    feature_dim: int = 768  # D (DINOv2-B)
    num_patches: int = 256  # N (16 x 16 patches at 224 px)
    encoder_registers: int = 0  # disposable registers, official `-erN`
    decoder_registers: int = 0  # official `-drN`
    standardize: bool = False  # encoder input standardisation (a departure, see the module docstring)
    attn_backend: str = "sdpa"
    half_depth: bool = False  # official `-hl`: max(1, depth // 2) blocks on both sides
    tanh: bool = False  # official `-tanh`: z = tanh(sample) in training, tanh(mu) downstream
    encoder_pos_embed: bool = False  # not in the paper: learned (1, N, width) table on the encoder's patch tokens
    logvar_init: float = 0.0  # not in the paper: initial bias of the logvar read-out (needs width == 2F), see above

    def __post_init__(self):
        for side in (self.encoder, self.decoder):
            if side not in SIZES:
                raise ValueError(f"unknown FlatDINO size {side!r}; choose one of {sorted(SIZES)}")
        if self.logvar_init and self.encoder_size.width != 2 * self.latent_dim:
            raise ValueError(f"logvar_init={self.logvar_init} sets the bias of the encoder's final LayerNorm, which is "
                             f"the read-out only when the encoder width ({self.encoder_size.width}) is 2 x latent_dim "
                             f"({2 * self.latent_dim}); leave it at 0 for this size")

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.num_tokens, self.latent_dim)

    @property
    def default_kl_weight(self) -> float:
        """beta = 5.12e-4 / (T * F): 1.25e-7 for 32 x 128 (SPEC 5.1)."""
        return default_kl_weight(self.num_tokens, self.latent_dim)

    @property
    def encoder_size(self) -> ViTSize:
        """The encoder's size after `half_depth`."""
        return _sized(SIZES[self.encoder], self.half_depth)

    @property
    def decoder_size(self) -> ViTSize:
        """The decoder's size after `half_depth`."""
        return _sized(SIZES[self.decoder], self.half_depth)


def _sized(size: ViTSize, half_depth: bool) -> ViTSize:
    """`size` with max(1, depth // 2) blocks when `half_depth` (official `build_config` for `-hl`)."""
    return replace(size, depth=max(1, size.depth // 2)) if half_depth else size


PRESETS: dict[str, FlatDINOConfig] = {
    "32-bl-128": FlatDINOConfig(),
    "32-bb-128": FlatDINOConfig(encoder="b", decoder="b"),
    "32-bl-64": FlatDINOConfig(latent_dim=64),
    "32-ss-128": FlatDINOConfig(encoder="s", decoder="s"),
    "32-tt-128": FlatDINOConfig(encoder="t", decoder="t"),
    # demo: the demo encoder's (64, 192) features -> 8 x 32 keeps the paper's 8x tokens / 48x dims ratios.
    "demo": FlatDINOConfig(encoder="micro", decoder="micro", num_tokens=8, latent_dim=32, feature_dim=192,
                           num_patches=64, encoder_pos_embed=True, logvar_init=-8.0),
}


def default_kl_weight(num_tokens: int, latent_dim: int) -> float:
    """Official default KL weight 5.12e-4 / (T * F)."""
    return DEFAULT_KL_NUMERATOR / (num_tokens * latent_dim)


class Posterior(NamedTuple):
    """Diagonal Gaussian posterior; each (B, T, F)."""

    mu: torch.Tensor
    logvar: torch.Tensor


class VAEOutput(NamedTuple):
    """`FlatDINO.forward` result: reconstruction (B, N, D), posterior, and the decoded z (B, T, F)."""

    recon: torch.Tensor
    posterior: Posterior
    z: torch.Tensor


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + SwiGLU(LN(x)). (B, L, W) -> (B, L, W)."""

    def __init__(self, size: ViTSize, backend: str):
        super().__init__()
        self.norm1 = LayerNorm(size.width, eps=LN_EPS)
        self.attn = Attention(size.width, size.heads, qkv_bias=True, qk_norm=True, backend=backend)
        self.norm2 = LayerNorm(size.width, eps=LN_EPS)
        self.mlp = SwiGLU(size.width, size.mlp_hidden, bias=True)

    def forward(self, x: torch.Tensor, keep: slice | None = None) -> torch.Tensor:
        """With `keep`, only the tokens x[:, keep] are computed (all tokens still attend as keys and values):
        (B, L, W) -> (B, len(keep), W), the same numbers as `forward(x)[:, keep]`."""
        h = self.norm1(x)
        x = (x if keep is None else x[:, keep]) + self.attn(h, keep=keep)
        return x + self.mlp(self.norm2(x))


class Trunk(nn.Module):
    """`depth` blocks and a final affine LayerNorm. (B, L, W) -> (B, L, W)."""

    def __init__(self, size: ViTSize, backend: str):
        super().__init__()
        self.blocks = nn.ModuleList([Block(size, backend) for _ in range(size.depth)])
        self.norm = LayerNorm(size.width, eps=LN_EPS)

    def forward(self, x: torch.Tensor, keep: slice | None = None) -> torch.Tensor:
        """With `keep`, the output is (B, len(keep), W): the last block computes only the tokens the caller reads
        (the encoder's latent tokens, the decoder's patch queries), which are the same numbers as
        `forward(x)[:, keep]`. In the demo's one-block encoder that skips 64 of its 72 token updates."""
        for i, block in enumerate(self.blocks):
            x = block(x, keep if i == len(self.blocks) - 1 else None)
        return self.norm(x)


def _tokens(count: int, width: int) -> nn.Parameter | None:
    """A (1, count, width) learned token table, or None when count is 0."""
    return nn.Parameter(torch.zeros(1, count, width)) if count > 0 else None


def _projection(d_in: int, d_out: int) -> nn.Module:
    """Bias-free Linear(d_in -> d_out), or the identity when the sizes agree (official `ViTEncoder`)."""
    return nn.Linear(d_in, d_out, bias=False) if d_in != d_out else nn.Identity()


def _prepend(x: torch.Tensor, *tables: nn.Parameter | None) -> torch.Tensor:
    """Concatenate the learned tables (broadcast over the batch) in front of x (B, L, W)."""
    parts = [t.expand(x.shape[0], -1, -1).to(x.dtype) for t in tables if t is not None]
    return torch.cat([*parts, x], dim=1)


class FlatEncoder(nn.Module):
    """(B, N, D) patch tokens -> Posterior with mu, logvar each (B, T, F)."""

    def __init__(self, cfg: FlatDINOConfig):
        super().__init__()
        size = cfg.encoder_size
        self.num_tokens, self.latent_dim, self.skip = cfg.num_tokens, cfg.latent_dim, cfg.encoder_registers
        self.num_patches = cfg.num_patches
        self.in_proj = _projection(cfg.feature_dim, size.width)
        self.pos_embed = _tokens(cfg.num_patches, size.width) if cfg.encoder_pos_embed else None
        self.registers = _tokens(cfg.encoder_registers, size.width)
        self.latent_tokens = _tokens(cfg.num_tokens, size.width)
        self.trunk = Trunk(size, cfg.attn_backend)
        self.out_proj = _projection(size.width, 2 * cfg.latent_dim)
        self.standardize = cfg.standardize
        if cfg.standardize:  # set from the training features by `FlatDINO.set_feature_stats`
            self.register_buffer("feature_mean", torch.zeros(cfg.num_patches, cfg.feature_dim))
            self.register_buffer("feature_scale", torch.ones(cfg.num_patches, cfg.feature_dim))

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (X - mean) / scale in float32 (needs `standardize`)."""
        return (x.float() - self.feature_mean) / self.feature_scale

    def forward(self, tokens: torch.Tensor) -> Posterior:
        if (self.standardize or self.pos_embed is not None) and tokens.shape[1] != self.num_patches:
            raise ValueError(f"this FlatDINO encoder was built for {self.num_patches} patch tokens (its positional "
                             f"embedding / feature statistics are per patch) but got {tokens.shape[1]}; use features "
                             "of the encoder it was trained on")
        if self.standardize:
            tokens = self.standardized(tokens).to(tokens.dtype)
        x = self.in_proj(tokens)  # (B, N, W)
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        x = _prepend(x, self.registers, self.latent_tokens)  # (B, R + T + N, W)
        x = self.trunk(x, keep=slice(self.skip, self.skip + self.num_tokens))  # (B, T, W)
        h = self.out_proj(x)  # (B, T, 2F)
        mu, logvar = h.float().split(self.latent_dim, dim=-1)  # channel split: first F = mu
        return Posterior(mu, logvar)


class FlatDecoder(nn.Module):
    """(B, T, F) latents -> (B, N, D) reconstructed patch tokens."""

    def __init__(self, cfg: FlatDINOConfig):
        super().__init__()
        size = cfg.decoder_size
        self.num_patches, self.skip = cfg.num_patches, cfg.decoder_registers
        self.latent_proj = _projection(cfg.latent_dim, size.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, size.width))
        self.registers = _tokens(cfg.decoder_registers, size.width)
        self.queries = _tokens(cfg.num_patches, size.width)
        self.trunk = Trunk(size, cfg.attn_backend)
        self.out_proj = _projection(size.width, cfg.feature_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.latent_proj(z) + self.pos_embed.to(z.dtype)  # (B, T, W)
        x = _prepend(x, self.registers, self.queries)  # (B, R + N + T, W)
        x = self.trunk(x, keep=slice(self.skip, self.skip + self.num_patches))  # (B, N, W)
        return self.out_proj(x).float()  # (B, N, D)


class FlatDINO(nn.Module):
    """The FlatDINO VAE: `encode` (B, N, D) -> Posterior (B, T, F); `decode` (B, T, F) -> (B, N, D)."""

    def __init__(self, cfg: FlatDINOConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FlatEncoder(cfg)
        self.decoder = FlatDecoder(cfg)
        self.init_weights()

    def init_weights(self) -> None:
        """Truncated normal(0.02) for linears and every learned token table; zero biases; LN scale 1."""
        init_linears_(self)
        for p in self.parameters():
            if p.ndim == 3:  # registers, latent tokens, queries, pos_embed
                trunc_normal_(p.data)
        if self.cfg.logvar_init:  # the read-out is the final LayerNorm (checked in FlatDINOConfig)
            with torch.no_grad():
                self.encoder.trunk.norm.bias[self.cfg.latent_dim :].fill_(self.cfg.logvar_init)

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per (patch, channel) mean and std (N, D) of the training features, for `standardize=True` models."""
        if not self.cfg.standardize:
            raise ValueError("set_feature_stats needs a model built with standardize=True")
        self.encoder.feature_mean.copy_(mean)
        self.encoder.feature_scale.copy_(std.clamp_min(STD_FLOOR))

    def loss_units(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) features -> the units the reconstruction loss measures them in: for `standardize=True` models
        the standardised features (X - mean) / scale the encoder sees, so every (patch, channel) counts by how it
        varies between images, not by its per-position mean; otherwise X itself (the paper's loss)."""
        return self.encoder.standardized(x) if self.cfg.standardize else x

    def encode(self, tokens: torch.Tensor) -> Posterior:
        """(B, N, D) -> Posterior(mu, logvar), each (B, T, F) float32."""
        return self.encoder(tokens)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, N, D) float32."""
        return self.decoder(z)

    def latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> the deterministic latents (B, T, F) everything downstream uses: mu, or tanh(mu) if `tanh`."""
        return self._squash(self.encode(tokens).mu)

    def forward(self, tokens: torch.Tensor, noise: torch.Tensor | None = None) -> VAEOutput:
        """(B, N, D), noise (B, T, F) or None -> VAEOutput; z = mu + exp(logvar / 2) * noise, or mu without noise.

        With `tanh`, z is squashed after sampling (official `FlatDinoAutoencoder.encode`); the posterior is not.
        """
        post = self.encode(tokens)
        z = post.mu if noise is None else post.mu + torch.exp(0.5 * post.logvar) * noise
        z = self._squash(z)
        return VAEOutput(self.decode(z), post, z)

    def _squash(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z) if self.cfg.tanh else z


# ----------------------------------------------------------------------------------------------- loss + optimiser


class VAELoss(NamedTuple):
    """Scalar loss terms (each averaged over the batch) and the per-token KL (T,) for logging."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_token: torch.Tensor
    kl_var: torch.Tensor  # mean_b Var_t of the per-token (floored) KL, the `-klvarN` term before its weights


def kl_divergence(post: Posterior) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per dimension: (B, T, F) -> (B, T, F)."""
    mu, logvar = post.mu.float(), post.logvar.float()
    return 0.5 * (torch.exp(logvar) + mu.square() - 1.0 - logvar)


def vae_loss(recon: torch.Tensor, target: torch.Tensor, post: Posterior, beta: float, free_bits: float = 0.0,
             kl_var_weight: float = 0.0) -> VAELoss:
    """mean Huber(delta=1) over (B, N, D) + beta * mean_b sum_{t,f} max(KL, free_bits)
    + beta * kl_var_weight * mean_b Var_t(sum_f max(KL, free_bits)) (SPEC 5.1, official `train.py:loss_fn`).

    The variance over the T tokens is the population variance (`jnp.var`) of the floored per-token sums, and it is
    weighted by the same (annealed) beta. `kl` and `kl_per_token` report the KL before the free-bits floor; `total`
    uses the floored KL.
    """
    rec = F.huber_loss(recon.float(), target.float(), delta=1.0)
    kl = kl_divergence(post)  # (B, T, F)
    kl_floored = kl.clamp_min(free_bits) if free_bits > 0 else kl
    kl_var = kl_floored.sum(dim=2).var(dim=1, correction=0).mean()  # Var over the T per-token sums, mean over B
    total = rec + beta * kl_floored.sum(dim=(1, 2)).mean()
    if kl_var_weight:
        total = total + beta * kl_var_weight * kl_var
    return VAELoss(total, rec, kl.sum(dim=(1, 2)).mean(), kl.sum(dim=2).mean(dim=0).detach(), kl_var.detach())


def kl_anneal(step: int, anneal_steps: int) -> float:
    """Linear KL annealing factor in [0, 1] (official `-anNk`); 1 when annealing is off."""
    return 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on 2-D weight matrices only (biases, norms, token tables excluded)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim == 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim != 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def wsd_lr(step: int, total: int, warmup: int, decay: int, init: float, peak: float, final: float) -> float:
    """Warmup-stable-decay: linear init -> peak over `warmup` steps, hold, linear peak -> final over the last `decay`."""
    decay_start = total - decay
    if step < warmup:
        return init + (peak - init) * step / warmup
    if step < decay_start or decay <= 0:
        return peak
    return peak + (final - peak) * min(1.0, (step - decay_start) / decay)


# ----------------------------------------------------------------------------------------------- weights on disk


def config_from_json(d: dict) -> FlatDINOConfig:
    """FlatDINOConfig from its JSON dict; unknown or missing keys are errors."""
    return FlatDINOConfig(**d)


def load_weights(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[FlatDINO, FlatDINOConfig]:
    """Build a FlatDINO from `<dir>/config.json` (key "model") and load `<dir>/model.safetensors` strictly."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    cfg = config_from_json(json.loads((ckpt_dir / "config.json").read_text())["model"])
    model = FlatDINO(cfg)
    state = load_file(ckpt_dir / "model.safetensors")  # on CPU, then moved
    legacy = sorted(k for k in LEGACY_PROJECTIONS if k in state and k not in model.state_dict())
    if legacy:
        raise RuntimeError(f"{ckpt_dir}: the checkpoint has {legacy}, projections between equal sizes that FlatDINO "
                           "no longer builds (identity, as the official ViTEncoder); it was trained by an older "
                           "version: re-run `flatdino train-vae`")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg


def config_to_json(cfg: FlatDINOConfig) -> dict:
    """JSON-able dict of a FlatDINOConfig."""
    return asdict(cfg)
