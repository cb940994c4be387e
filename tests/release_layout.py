"""Test helpers: RAE directories laid out as the released `nyu-visionx/RAE-*` checkpoints, and real photos.

The release layout is what diffusers' `scripts/convert_rae_to_diffusers.py` writes with transformers < 5.18:
`config.json` holding every `AutoencoderRAE` constructor field (the RAE latent statistics `latents_mean` /
`latents_std` as nested lists of shape (C, h, w)), and one `diffusion_pytorch_model.safetensors` with the DINOv2
encoder weights merged in under their pre-5.18 names (`attention.attention.{query,key,value}`,
`attention.output.dense`). The renaming here is written out literally, independently of `models.encoder`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# canonical (transformers >= 5.18) -> release (< 5.18) DINOv2 attention names, spelled out for the tests
RELEASE_NAMES = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
                 ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}


def release_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An installed-layout AutoencoderRAE state dict with the encoder's attention keys spelled as in the release."""
    out = {}
    for key, value in state.items():
        if key.startswith("encoder.encoder.layer."):
            for new, old in RELEASE_NAMES.items():
                key = key.replace(new, old)
        out[key] = value.contiguous()
    return out


def canonical_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `release_state`: release-layout encoder attention keys spelled as transformers >= 5.18 does."""
    out = {}
    for key, value in state.items():
        if key.startswith("encoder.encoder.layer."):
            for new, old in RELEASE_NAMES.items():
                key = key.replace(old, new)
        out[key] = value
    return out


def write_release_dir(out: Path, preset: str = "tiny", seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A random-weight RAE directory in the release layout; returns (path, the AutoencoderRAE it holds).

    The latent statistics are random but non-trivial (RAE's stat.pt is per channel and position), so any code path
    that wrongly applies them to the pixel decoder's input shows up.
    """
    from models.encoder import COMMON, PRESETS, build_rae

    args = {**COMMON, **PRESETS[preset]}
    side = args["encoder_input_size"] // args["encoder_patch_size"]
    g = torch.Generator().manual_seed(seed + 1)
    mean = 0.5 * torch.randn(args["encoder_hidden_size"], side, side, generator=g)
    std = 0.5 + torch.rand(args["encoder_hidden_size"], side, side, generator=g)
    torch.manual_seed(seed)
    rae = build_rae(preset, latents_mean=mean, latents_std=std)
    sizes = ("decoder_hidden_size", "decoder_intermediate_size", "decoder_num_attention_heads",
             "decoder_num_hidden_layers", "encoder_hidden_size", "encoder_input_size", "encoder_num_hidden_layers",
             "encoder_patch_size", "patch_size")
    config = {
        "_class_name": "AutoencoderRAE", "_diffusers_version": "0.37.0.dev0", **{k: args[k] for k in sizes},
        "encoder_norm_mean": [0.485, 0.456, 0.406], "encoder_norm_std": [0.229, 0.224, 0.225],
        "encoder_type": "dinov2", "image_size": None, "latents_mean": mean.tolist(), "latents_std": std.tolist(),
        "noise_tau": 0.0, "num_channels": 3, "reshape_to_2d": True, "scaling_factor": 1.0, "use_encoder_loss": False,
        "encoder_name_or_path": "facebook/dinov2-with-registers-base",  # written by earlier conversion scripts
    }
    config = dict(sorted(config.items()))  # save_pretrained's key order
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(release_state(rae.state_dict()), out / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    return out, rae


def write_installed_dir(out: Path, rae) -> Path:
    """The same weights as `write_release_dir` wrote, saved by the installed diffusers/transformers (as `init-encoder`
    writes a directory)."""
    rae.save_pretrained(out, safe_serialization=True)
    return out


def write_photo_folder(root: Path) -> Path:
    """An ImageFolder of real photos (scikit-learn's bundled china.jpg and flower.jpg), cropped to mixed sizes and
    re-encoded in mixed colour modes and formats: RGB/L/CMYK JPEG, RGBA/P/LA PNG."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # two (427, 640, 3) uint8 photos
    crops = [(0, 0, 640, 427), (100, 50, 420, 290), (300, 20, 500, 380), (50, 200, 150, 280), (200, 100, 460, 360),
             (380, 0, 640, 300)]
    modes = [("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG")]
    for c, name in enumerate(("china", "flower", "mixed")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            k = (4 * c + i) % len(crops)
            photo = photos[c % 2] if name != "mixed" else photos[i % 2]
            im = photo.crop(crops[k])
            mode, fmt = modes[(c + 2 * i) % len(modes)]
            im = im.convert(mode) if mode != "RGBA" else _with_alpha(im)
            buf = io.BytesIO()
            im.save(buf, format=fmt, quality=90) if fmt == "JPEG" else im.save(buf, format=fmt)
            ext = "jpg" if fmt == "JPEG" else "png"
            (root / name / f"{name}_{i}.{ext}").write_bytes(buf.getvalue())
    return root


def _with_alpha(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    alpha = np.linspace(64, 255, rgba.size[0], dtype=np.uint8)[None, :].repeat(rgba.size[1], 0)
    rgba.putalpha(Image.fromarray(alpha))
    return rgba
