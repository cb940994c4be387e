"""DINO discriminator for adversarial pixel-decoder training: a frozen DINO ViT-S/8 with trainable conv heads.

Lineage: the official FlatDINO JAX `flatdino/decoder/discriminator.py` (`DinoDisc`, `DinoDiscBlock`, `BatchNormLocal`,
`ResidualBlock`) and `flatdino/pretrained/dino.py` (`DinoViT`), which port RAE's `src/disc/dinodisc.py` (itself from
VAR/StyleGAN-T). The backbone is transformers' `ViTModel` (`facebook/dino-vits8`), never re-implemented.

Forward, as the official code: images in [-1, 1] (B, 3, H, W) -> bilinear resize to 224 -> ImageNet normalisation
(x * 0.5 / std + (0.5 - mean) / std) -> ViT; the tokens of the final block output (before the final LayerNorm,
`hidden_states[-1]`) and of blocks `key_depths = (2, 5, 8, 11)` (`hidden_states[d + 1]`), CLS dropped, each go
through their own head, treated as a 1-D sequence of N = (224 / 8)^2 = 784 tokens with D channels:
    Block(k=1) -> Residual(Block(k=kernel_size)) -> SN-Conv1d(D -> 1, k=1)
    Block(k)   =  SN-Conv1d(D -> D, k, circular padding k // 2) -> BatchNormLocal -> LeakyReLU(0.2)
    Residual   =  (fn(x) + x) * 2 ** -0.5
The head outputs (B, N) are concatenated, final output first: logits (B, 5 N) = (B, 3920) for ViT-S/8.
With 12 blocks, the final output and the d = 11 tap are the same tensor, read by two heads (as in both official codes).

BatchNormLocal ("local"/"virtual" batch norm): per channel, statistics over the tokens of each group of `virtual_bs`
samples (biased variance, eps 1e-6, float32, affine weight 1 / bias 0 at init), no running statistics, so train and
eval modes compute the same thing. With the official `virtual_bs = 1` it is an instance norm over tokens.

Spectral norm: `torch.nn.utils.parametrizations.spectral_norm` (1 power iteration per forward in train mode, eps
1e-12, dim 0). Its power-iteration vectors are buffers (`...parametrizations.weight.0._u` / `._v`) inside
`state_dict()`, next to the raw weight (`...parametrizations.weight.original`): saving and restoring the state dict
(or just `heads.state_dict()`, the trainable part) resumes bit for bit. They change on every train-mode forward, so
the discriminator is run in eval mode for the generator's loss and in train mode for its own update, as officially.

The backbone is frozen whatever is asked of the module: `requires_grad` False on every backbone tensor and eval mode
kept through `.train()`; gradients still flow through it to the input images (the generator's adversarial loss).

Departures / disagreements between the two official codes (FlatDINO JAX vs RAE PyTorch), and our choice:
- Resize: FlatDINO `jax.image.resize(..., "bilinear")` antialiases when downsampling (256 -> 224); RAE
  `F.interpolate(bilinear, align_corners=False)` does not. `resize="flatdino"` (default) antialiases, `"rae"` not.
- Backbone numerics: FlatDINO uses HF's ViT with facebook/dino-vits8's config (exact GELU, LayerNorm eps 1e-12);
  RAE its own ViT (tanh-GELU, LayerNorm eps 1e-6). We use transformers' ViTModel with the checkpoint's config.
- Spectral norm in eval mode: flax `nnx.SpectralNorm` still runs one power step (without storing it); PyTorch (RAE,
  here) uses the stored vectors unchanged. PyTorch also runs 15 power steps at construction, flax none.
- Head init: FlatDINO's flax convs (LeCun-normal kernel, zero bias) are followed here; RAE keeps PyTorch's default.
- RAE zeroes the DINO key biases (a no-op for attention: a per-query constant under the softmax); not done here.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_ID = "facebook/dino-vits8"
RESIZES = {"flatdino": True, "rae": False}  # name -> antialias of the bilinear resize to image_size
RESIDUAL_RATIO = 2**-0.5
LEAKY_SLOPE = 0.2
SPECTRAL_EPS = 1e-12
# ViTConfig fields the discriminator config mirrors (facebook/dino-vits8's config.json values are the defaults).
VIT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
              "image_size", "layer_norm_eps", "hidden_act", "qkv_bias")


def default_key_depths(num_layers: int) -> tuple[int, ...]:
    """Blocks tapped at 1/4, 1/2, 3/4 and all of the depth: (2, 5, 8, 11) for 12 blocks, (0, 1, 2, 3) for 4."""
    return tuple(round(num_layers * q / 4) - 1 for q in (1, 2, 3, 4))


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Backbone (transformers `ViTConfig` fields) + heads of a `DinoDiscriminator`."""

    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    patch_size: int = 8
    image_size: int = 224
    layer_norm_eps: float = 1e-12  # facebook/dino-vits8 config.json (the original DINO code uses 1e-6)
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    key_depths: tuple[int, ...] = (2, 5, 8, 11)  # official DinoDisc default
    kernel_size: int = 9  # official train_decoder.py `DinoDisc(ks=9)`; RAE config `gan.disc.arch.ks: 9`
    norm_eps: float = 1e-6  # BatchNormLocal eps, both official codes
    virtual_bs: int = 1  # BatchNormLocal group size, both official codes
    resize: str = "flatdino"

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise ValueError(f"unknown resize {self.resize!r}; choose one of {sorted(RESIZES)}")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-length circular conv), got {self.kernel_size}")
        bad = [d for d in self.key_depths if not 0 <= d < self.num_hidden_layers]
        if bad:
            raise ValueError(f"key_depths {bad} outside the backbone's blocks 0..{self.num_hidden_layers - 1}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_outputs(self) -> int:
        """Logits per image: one per token for each head (final output + one per key depth)."""
        return (len(self.key_depths) + 1) * self.num_patches

    def vit_config(self):
        from transformers import ViTConfig

        return ViTConfig(**{k: getattr(self, k) for k in VIT_FIELDS}, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, num_channels=3)

    @classmethod
    def from_vit_config(cls, vit_config, **heads) -> DiscriminatorConfig:
        """The config of a loaded backbone plus head knobs; key_depths default to `default_key_depths`."""
        backbone = {k: getattr(vit_config, k) for k in VIT_FIELDS}
        heads.setdefault("key_depths", default_key_depths(backbone["num_hidden_layers"]))
        return cls(**backbone, **heads)

    def to_dict(self) -> dict:
        return asdict(self)


# "dino-vits8": facebook/dino-vits8's architecture. "tiny": the same structure for tests and the demo (4 blocks of
# width 64, patch 8, 64 px -> 8 x 8 tokens, taps at every block so there are 5 heads as in ViT-S/8, kernel 3).
PRESETS: dict[str, DiscriminatorConfig] = {
    "dino-vits8": DiscriminatorConfig(),
    "tiny": DiscriminatorConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256,
                                image_size=64, key_depths=(0, 1, 2, 3), kernel_size=3),
}
HEAD_FIELDS = tuple(f.name for f in fields(DiscriminatorConfig) if f.name not in VIT_FIELDS)


class BatchNormLocal(nn.Module):
    """Per-channel normalisation over the tokens of each group of `virtual_bs` samples: (B, C, N) -> (B, C, N)."""

    def __init__(self, channels: int, virtual_bs: int = 1, eps: float = 1e-6):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, N = x.shape
        if B % self.virtual_bs:
            raise ValueError(f"batch {B} is not a multiple of virtual_bs {self.virtual_bs}")
        g = x.float().view(B // self.virtual_bs, self.virtual_bs, C, N)  # (G, V, C, N)
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), unbiased=False, keepdim=True)
        y = ((g - mean) * torch.rsqrt(var + self.eps)).view(B, C, N)
        return (y * self.weight[None, :, None] + self.bias[None, :, None]).to(x.dtype)


def sn_conv1d(c_in: int, c_out: int, kernel_size: int) -> nn.Conv1d:
    """A spectrally-normalised Conv1d with circular 'same' padding and FlatDINO's flax init (LeCun normal, 0 bias)."""
    conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    std = math.sqrt(1.0 / (c_in * kernel_size)) / 0.87962566103423978  # flax lecun_normal: truncated at 2 std
    nn.init.trunc_normal_(conv.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(conv.bias)
    return spectral_norm(conv, n_power_iterations=1, eps=SPECTRAL_EPS, dim=0)


class DiscBlock(nn.Module):
    """SN-Conv1d(k, circular) -> BatchNormLocal -> LeakyReLU(0.2): (B, D, N) -> (B, D, N)."""

    def __init__(self, channels: int, kernel_size: int, cfg: DiscriminatorConfig):
        super().__init__()
        self.conv = sn_conv1d(channels, channels, kernel_size)
        self.norm = BatchNormLocal(channels, cfg.virtual_bs, cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), LEAKY_SLOPE)


class Residual(nn.Module):
    """(fn(x) + x) * 2**-0.5."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * RESIDUAL_RATIO


class DiscHead(nn.Module):
    """Block(k=1) -> Residual(Block(k)) -> SN-Conv1d(D -> 1): tokens (B, D, N) -> logits (B, N)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        d = cfg.hidden_size
        self.block = DiscBlock(d, 1, cfg)
        self.residual = Residual(DiscBlock(d, cfg.kernel_size, cfg))
        self.proj = sn_conv1d(d, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.residual(self.block(x))).flatten(1)  # (B, 1, N) -> (B, N)


class DinoDiscriminator(nn.Module):
    """Frozen DINO ViT + trainable heads: images in [-1, 1] (B, 3, H, W) -> logits (B, num_outputs)."""

    def __init__(self, backbone: nn.Module, cfg: DiscriminatorConfig):
        super().__init__()
        got = DiscriminatorConfig.from_vit_config(backbone.config, **{k: getattr(cfg, k) for k in HEAD_FIELDS})
        if got != cfg:
            raise ValueError(f"backbone config does not match the discriminator config:\n{got}\nvs\n{cfg}")
        self.cfg = cfg
        self.backbone = backbone.eval().requires_grad_(False)  # transformers ViTModel (no pooler)
        self.heads = nn.ModuleList(DiscHead(cfg) for _ in range(len(cfg.key_depths) + 1))
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DinoDiscriminator:
        """Heads follow `mode` (spectral-norm power iterations run in train mode); the backbone stays in eval."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters: what the discriminator's optimizer updates."""
        return list(self.heads.parameters())

    @property
    def backbone_fingerprint(self) -> str:
        """sha256 over the backbone's state (names, shapes, dtypes, bytes), to record which DINO judged."""
        h = hashlib.sha256()
        for name, t in sorted(self.backbone.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (B, 3, H, W) -> ImageNet-normalised (B, 3, S, S), S = image_size (bilinear, align_corners=False)."""
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=RESIZES[self.cfg.resize])
        return x * self.x_scale + self.x_shift

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[-1, 1] images (B, 3, H, W) -> [final output, key depths...], each patch tokens (B, D, N), CLS dropped."""
        hidden = self.backbone(pixel_values=self.preprocess(x), output_hidden_states=True).hidden_states
        assert len(hidden) == self.cfg.num_hidden_layers + 1, "hidden_states: embeddings + one per block"
        picked = [hidden[-1]] + [hidden[d + 1] for d in self.cfg.key_depths]  # each (B, 1 + N, D)
        return [h[:, 1:].transpose(1, 2) for h in picked]  # (B, D, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> logits (B, (len(key_depths) + 1) * N)."""
        return torch.cat([head(t) for head, t in zip(self.heads, self.taps(x))], dim=1)


def build_heads(backbone: nn.Module, cfg: DiscriminatorConfig, seed: int = 0) -> DinoDiscriminator:
    """A discriminator around `backbone` with freshly initialised heads (seeded; the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DinoDiscriminator(backbone, cfg)


def build_discriminator(preset: str | DiscriminatorConfig = "tiny", seed: int = 0) -> DinoDiscriminator:
    """A discriminator of a preset architecture, backbone and heads with random weights (no download)."""
    from transformers import ViTModel

    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown discriminator preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = ViTModel(cfg.vit_config(), add_pooling_layer=False)
    return build_heads(backbone, cfg, seed)


def init_backbone_dir(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight ViT directory (config.json + safetensors) in the layout of facebook/dino-vits8."""
    build_discriminator(preset, seed).backbone.save_pretrained(out, safe_serialization=True)
    return Path(out)


def load_backbone(path_or_id: str | Path):
    """A frozen transformers `ViTModel` from a local directory, or from the hub (or its cache) for an id.

    Offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), an id is looked up in the local cache only. Every backbone
    weight must come from the checkpoint (missing or mismatched keys are errors); the checkpoint's pooler, which
    the discriminator never uses, is the only thing allowed to be left over.
    """
    from huggingface_hub.constants import is_offline_mode
    from transformers import ViTModel

    from pipeline.manifest import ArtifactError  # lazy: models do not depend on pipeline at import

    p = Path(path_or_id)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ArtifactError(f"{p}: not a transformers ViT directory (no config.json)")
        source, kwargs = str(p), {"local_files_only": True}
    elif str(path_or_id).count("/") != 1 or str(path_or_id).startswith(("/", ".")):
        raise ArtifactError(f"discriminator backbone {str(path_or_id)!r}: no such directory, and not a hub id "
                            f"(owner/name, e.g. {HUB_ID})")
    else:
        source, kwargs = str(path_or_id), {"local_files_only": is_offline_mode()}
    try:
        model, info = ViTModel.from_pretrained(source, add_pooling_layer=False, output_loading_info=True,
                                               dtype=torch.float32, **kwargs)
    except Exception as e:  # offline, unknown id, no weights file, auth: all end here
        where = "the local directory" if p.exists() else (
            "the local hub cache (offline mode)" if kwargs["local_files_only"] else "the hub")
        raise ArtifactError(
            f"could not load the discriminator backbone {str(path_or_id)!r} from {where} ({type(e).__name__}: {e}). "
            f"Download {HUB_ID} elsewhere and pass its local directory (config.json + model.safetensors or "
            f"pytorch_model.bin), or write a random one with models.discriminator.init_backbone_dir") from e
    leftover = [k for k in info["unexpected_keys"] if not k.startswith(("pooler.", "vit.pooler."))]
    if info["missing_keys"] or info["mismatched_keys"] or leftover:
        raise ArtifactError(f"{source}: weights do not match its config (missing {sorted(info['missing_keys'])}, "
                            f"mismatched {info['mismatched_keys']}, unexpected {sorted(leftover)})")
    if model.config.model_type != "vit":
        raise ArtifactError(f"{source}: model_type {model.config.model_type!r}, expected a ViT (DINO v1)")
    return model.eval().requires_grad_(False)


def load_discriminator(path_or_id: str | Path = HUB_ID, seed: int = 0, **heads) -> DinoDiscriminator:
    """A discriminator around a pretrained DINO ViT (local directory, or hub id when online) with fresh heads.

    `heads` are `DiscriminatorConfig` head fields (key_depths, kernel_size, norm_eps, virtual_bs, resize); unset ones
    take the official values (key depths by `default_key_depths`: (2, 5, 8, 11) for a 12-block ViT).
    """
    unknown = set(heads) - set(HEAD_FIELDS)
    if unknown:
        raise TypeError(f"unknown head options {sorted(unknown)}; choose from {HEAD_FIELDS}")
    backbone = load_backbone(path_or_id)
    return build_heads(backbone, DiscriminatorConfig.from_vit_config(backbone.config, **heads), seed)
