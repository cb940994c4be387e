"""The frozen DINOv2-with-registers feature path and the RAE pixel decoder, wrapping diffusers' `AutoencoderRAE`.

Lineage: RAE (`bytetriper/RAE`, `Dinov2withNorm(normalize=True)` and the ViT-MAE decoder), as packaged by diffusers
(`AutoencoderRAE`, built on transformers' `Dinov2WithRegistersModel`). We never re-implement those networks; this
module owns only the thin layer around them.

Departures from `AutoencoderRAE.encode`/`decode`, all deliberate (SPEC.md sections 2, 3, 8 and 13):
- Resize 256 -> 224 bicubic with `antialias=True` by default (`resize="flatdino"`, the official FlatDINO JAX path).
  `resize="rae"` is the plain bicubic of RAE's `RAE.encode` and diffusers' `AutoencoderRAE.encode`, which the
  released pixel decoder was trained on; on real photos the two 224 inputs differ by up to ~24 uint8 levels.
- CLS and register tokens are dropped by count from the model config (1 + `num_register_tokens`), not a magic 5,
  and are returned by name in `PatchTokens`.
- The pixel decoder consumes the raw affine-free LayerNorm features: no latent statistics are applied
  (`AutoencoderRAE.decode` would de-normalise with its `latents_mean/std`).
- uint8 conversion is `floor(x * 255 + 0.5)` after clipping, the ADM/official convention (torch.round rounds half to
  even).

Two checkpoint layouts are loaded strictly, whatever transformers is installed: transformers >= 5.18 names the
DINOv2 attention projections `attention.{q,k,v,o}_proj`; earlier versions, and the released RAE directories that
diffusers' `convert_rae_to_diffusers.py` wrote with them, use `attention.attention.{query,key,value}` and
`attention.output.dense`. `rae_checkpoint_filter` converts a state dict to the installed layout, and fingerprints
are taken over the canonical (>= 5.18) names, so the same weights give the same fingerprint under either version.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from models.imaging import IMAGE_SIZE, adm_center_crop  # noqa: F401  (re-exported: the crop lives with decoding)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_ID = "nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08"

# AutoencoderRAE constructor arguments per preset. "dinov2-b-xl" is the architecture of the paper's components
# (DINOv2-B/14 with registers + RAE ViT-XL decoder); "tiny" keeps the same classes and token grid for tests:
# (256, 192) features (3 heads of 64; the encoder fixes head_dim at 64), a 2-layer 128-wide decoder. "demo" is "tiny"
# at 112 px: an 8 x 8 grid of (64, 192) features (one 14-px patch per pixel of the 8 x 8 digits) and a pixel decoder
# with 32-px patches, so the 2-core demo trains 4x fewer tokens per sample.
_TINY = dict(encoder_hidden_size=192, encoder_num_hidden_layers=2, decoder_hidden_size=128,
             decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=512)
PRESETS: dict[str, dict] = {
    "dinov2-b-xl": dict(encoder_hidden_size=768, encoder_num_hidden_layers=12, decoder_hidden_size=1152,
                        decoder_num_hidden_layers=28, decoder_num_attention_heads=16, decoder_intermediate_size=4096),
    "tiny": _TINY,
    "demo": dict(_TINY, encoder_input_size=112, patch_size=32),
}
COMMON = dict(encoder_type="dinov2", encoder_patch_size=14, patch_size=16, encoder_input_size=224,
              reshape_to_2d=True, noise_tau=0.0)
# The 256 -> 224 resize before DINOv2, name -> antialias (both bicubic, align_corners=False). "flatdino": the
# official FlatDINO code (jax.image.resize antialiases); "rae": RAE's RAE.encode and diffusers' AutoencoderRAE.encode.
RESIZES = {"flatdino": True, "rae": False}

# DINOv2 attention parameter names: legacy (transformers < 5.18, the released RAE checkpoints) -> canonical (>= 5.18).
DINOV2_RENAMES = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
                  "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
_DINOV2_LAYER = r"^(encoder\.encoder\.layer\.\d+\.)({})(\.(?:weight|bias))$"
_TO_CANONICAL = re.compile(_DINOV2_LAYER.format("|".join(re.escape(k) for k in DINOV2_RENAMES)))
_TO_LEGACY = re.compile(_DINOV2_LAYER.format("|".join(re.escape(v) for v in DINOV2_RENAMES.values())))
_LEGACY_OF = {v: k for k, v in DINOV2_RENAMES.items()}


class PatchTokens(NamedTuple):
    """The encoder's output tokens by role."""

    cls: torch.Tensor  # (B, D)
    registers: torch.Tensor  # (B, R, D)
    patches: torch.Tensor  # (B, N, D) affine-free LayerNorm outputs


def _rename(state_dict: dict, pattern: re.Pattern, table: dict[str, str]) -> dict:
    out: dict = {}
    for key, value in state_dict.items():
        new = pattern.sub(lambda m: m.group(1) + table[m.group(2)] + m.group(3), key)
        if new in out:
            raise ValueError(f"checkpoint holds both {new!r} and its other-layout name; mixed DINOv2 key layouts")
        out[new] = value
    return out


def canonical_dinov2_names(state_dict: dict) -> dict:
    """Rename legacy DINOv2 attention keys of an RAE state dict to the canonical (transformers >= 5.18) names.

    `encoder.encoder.layer.N.attention.attention.{query,key,value}.*` -> `...attention.{q,k,v}_proj.*` and
    `...attention.output.dense.*` -> `...attention.o_proj.*`; every other key (and every value) is unchanged.
    """
    return _rename(state_dict, _TO_CANONICAL, DINOV2_RENAMES)


def legacy_dinov2_names(state_dict: dict) -> dict:
    """The inverse of `canonical_dinov2_names`: canonical DINOv2 attention keys -> the transformers < 5.18 names."""
    return _rename(state_dict, _TO_LEGACY, _LEGACY_OF)


def uses_legacy_dinov2_names(keys) -> bool:
    """Whether a set of RAE state keys (e.g. the installed model's) uses the legacy DINOv2 attention names."""
    return any(_TO_CANONICAL.match(k) for k in keys)


def rae_checkpoint_filter(state_dict: dict[str, torch.Tensor], legacy_names: bool = False) -> dict[str, torch.Tensor]:
    """An RAE checkpoint's state dict as the installed model expects it.

    - `decoder.decoder_pos_embed`: a fixed sin-cos buffer, recomputed at construction (diffusers ignores it too).
    - `encoder.layernorm.weight/bias`: the final LayerNorm is affine-free by design (RAE `normalize=True`); a checkpoint
      that still carries the affine (e.g. converted from the raw DINOv2 release) must not reintroduce it.
    - DINOv2 attention keys in either layout become the canonical names, or the legacy ones if `legacy_names`
      (an installed transformers < 5.18).
    """
    dropped = {"decoder.decoder_pos_embed", "encoder.layernorm.weight", "encoder.layernorm.bias"}
    state = canonical_dinov2_names({k: v for k, v in state_dict.items() if k not in dropped})
    return legacy_dinov2_names(state) if legacy_names else state


def build_rae(preset: str = "tiny", **overrides):
    """An `AutoencoderRAE` of a preset architecture with random weights (no download)."""
    from diffusers import AutoencoderRAE

    if preset not in PRESETS:
        raise ValueError(f"unknown encoder preset {preset!r}; choose one of {sorted(PRESETS)}")
    return AutoencoderRAE(**{**COMMON, **PRESETS[preset], **overrides})


# Random-weight presets whose patch embedding is scaled after the usual init (trunc normal, std 0.02). "demo": at
# std 0.02 over 3 x 14 x 14 inputs the patch embedding of an ImageNet-normalised grey level is ~24x the position
# embedding (also std 0.02), so after LayerNorm a token is mostly sign(grey - 0.485) times one shared direction: the
# random features keep little of the image beyond a bag of scalars. Scaled by 1/24, the two are comparable and the
# tokens stay in LayerNorm's near-linear range; on the digits the pixel decoder goes 37.8 -> 41 dB and the FlatDINO
# round trip +1.7 dB at the same updates (bench/RESULTS.md, issue 17). Real DINOv2 weights are never rescaled.
PATCH_EMBED_SCALE: dict[str, float] = {"demo": 1 / 24}
PATCH_EMBED_WEIGHT = "encoder.embeddings.patch_embeddings.projection.weight"


def init_rae_dir(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight RAE directory in the same format as a pretrained one (config + safetensors); presets in
    `PATCH_EMBED_SCALE` get their patch embedding scaled after the init."""
    torch.manual_seed(seed)
    rae = build_rae(preset)
    if preset in PATCH_EMBED_SCALE:
        with torch.no_grad():
            dict(rae.named_parameters())[PATCH_EMBED_WEIGHT].mul_(PATCH_EMBED_SCALE[preset])
    rae.save_pretrained(out, safe_serialization=True)
    return Path(out)


def _resolve_dir(path_or_id: str | Path) -> Path:
    from pipeline.manifest import ArtifactError  # lazy: models do not depend on pipeline at import

    p = Path(path_or_id)
    if p.exists():
        if not (p / "config.json").exists() or not (p / WEIGHTS_NAME).exists():
            raise ArtifactError(f"{p}: not an RAE directory (need config.json and {WEIGHTS_NAME})")
        return p
    if str(path_or_id).count("/") != 1:
        raise ArtifactError(f"encoder {path_or_id!r}: no such directory, and not a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id), allow_patterns=["config.json", WEIGHTS_NAME]))
    except Exception as e:  # offline, unknown id, auth: all end here
        raise ArtifactError(
            f"could not fetch {path_or_id!r} from the hub ({type(e).__name__}: {e}). Offline? Download it elsewhere "
            f"and pass the local directory, or create a random one with `flatdino init-encoder --out DIR`"
        ) from e


def load_rae(path_or_id: str | Path):
    """Load an AutoencoderRAE strictly from a local directory (or a hub id when online); frozen, eval mode."""
    from diffusers import AutoencoderRAE
    from safetensors.torch import load_file

    from pipeline.manifest import ArtifactError

    root = _resolve_dir(path_or_id)
    config = json.loads((root / "config.json").read_text())
    rae = AutoencoderRAE.from_config(config)
    legacy = uses_legacy_dinov2_names(rae.state_dict())
    try:
        state = rae_checkpoint_filter(load_file(root / WEIGHTS_NAME), legacy_names=legacy)
        rae.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(f"{root}: weights do not match its config.json ({e})") from e
    meta = meta_tensors(rae)
    if meta:
        raise ArtifactError(f"{root}: {len(meta)} tensors were never loaded (still on the meta device): "
                            f"{', '.join(meta[:8])}")
    return rae.eval().requires_grad_(False)


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of a module's parameters and buffers (persistent or not) that hold no data (meta device)."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return sorted(name for name, t in named if t.is_meta)


def state_fingerprint(module: nn.Module, prefix: str = "") -> str:
    """sha256 over the canonical names, shapes and bytes of a module's state tensors (sorted by name).

    Names are canonicalised (`canonical_dinov2_names`), so the same weights fingerprint the same under any
    transformers version; with transformers >= 5.18 this is the plain state-dict fingerprint.
    """
    h = hashlib.sha256()
    for name, t in sorted(canonical_dinov2_names(module.state_dict()).items()):
        if name.startswith(prefix):
            t = t.detach().cpu().contiguous()
            h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# configuration that changes what the networks compute, hashed with their weights: two encoders with the same weights
# but another input size (a 224 vs a 112 px grid) or patch size are different encoders. Explicit keys (not the whole
# config) so that a library upgrade that adds config fields does not change the fingerprint.
ENCODER_FACTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                 "num_register_tokens", "layer_norm_eps", "hidden_act", "image_size", "layerscale_value",
                 "use_swiglu_ffn", "qkv_bias")
DECODER_FACTS = ("patch_size", "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
                 "decoder_intermediate_size", "encoder_input_size", "encoder_patch_size")


def model_fingerprint(weights: str, facts: dict) -> str:
    """One identity for weights (a `state_fingerprint`) and the configuration facts that change the computation."""
    return hashlib.sha256(json.dumps({"weights": weights, **facts}, sort_keys=True, default=str).encode()).hexdigest()


def encoder_fingerprint(rae) -> str:
    """The DINOv2 encoder of an RAE: canonical weights + its architecture and input size."""
    cfg = rae.encoder.config
    facts = {k: getattr(cfg, k, None) for k in ENCODER_FACTS}
    return model_fingerprint(state_fingerprint(rae, "encoder."),
                             {**facts, "encoder_input_size": int(rae.config.encoder_input_size)})


class FeatureEncoder(nn.Module):
    """Frozen DINOv2-with-registers: uint8 images (B, 3, 256, 256) -> patch tokens (B, 256, 768)."""

    def __init__(self, rae, resize: str = "flatdino"):
        super().__init__()
        if resize not in RESIZES:
            raise ValueError(f"unknown resize {resize!r}; choose one of {sorted(RESIZES)}")
        self.resize, self.antialias = resize, RESIZES[resize]
        self.model = rae.encoder  # transformers Dinov2WithRegistersModel
        if self.model.layernorm.weight is not None or self.model.layernorm.bias is not None:
            raise ValueError("the encoder's final LayerNorm must be affine-free (RAE normalize=True)")
        self.input_size = int(rae.config.encoder_input_size)
        self.num_registers = int(self.model.config.num_register_tokens)
        self.dim = int(self.model.config.hidden_size)
        self.num_patches = (self.input_size // int(self.model.config.patch_size)) ** 2
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.fingerprint = encoder_fingerprint(rae)

    def preprocess(self, x: torch.Tensor, mode: str = "bicubic") -> torch.Tensor:
        """uint8 or [0, 1] float (B, 3, H, W) -> (B, 3, 224, 224) ImageNet-normalised; the resize antialiases
        unless `resize="rae"`."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode=mode, antialias=self.antialias,
                              align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> PatchTokens:
        """(B, 3, 224, 224) normalised pixels -> PatchTokens: cls (B, D), registers (B, R, D), patches (B, N, D)."""
        hidden = self.model(pixel_values=pixels).last_hidden_state  # (B, 1 + R + N, D)
        r = self.num_registers
        return PatchTokens(hidden[:, 0], hidden[:, 1 : 1 + r], hidden[:, 1 + r :])

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, mode: str = "bicubic") -> PatchTokens:
        """uint8 (B, 3, 256, 256) -> PatchTokens."""
        return self(self.preprocess(x, mode))


class PixelDecoder(nn.Module):
    """RAE ViT-MAE decoder: patch tokens (B, N, D) -> ImageNet-normalised pixels (B, 3, 256, 256)."""

    def __init__(self, rae):
        super().__init__()
        self.decoder = rae.decoder
        self.facts = {k: rae.config.get(k) if hasattr(rae.config, "get") else getattr(rae.config, k, None)
                      for k in DECODER_FACTS}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def fingerprint(self) -> str:
        """The decoder's canonical weights + its patch/output geometry and width."""
        return model_fingerprint(state_fingerprint(self.decoder), self.facts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) raw affine-free LN features -> (B, 3, H, W) normalised pixels."""
        logits = self.decoder(tokens).logits  # (B, N, p*p*3)
        return self.decoder.unpatchify(logits)

    def to_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> uint8 (B, H, W, 3): x*std + mean, clip [0, 1], floor(x*255 + 0.5)."""
        x = (pixels.float() * self.std + self.mean).clamp(0, 1)
        return torch.floor(x * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
