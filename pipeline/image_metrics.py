"""Image-space reconstruction metrics: PSNR and LPIPS (v0.1, VGG16), used by train-decoder and reconstruct.

LPIPS follows Zhang et al. 2018 / the `lpips` package (`lpips.LPIPS(net="vgg", version="0.1")`): inputs in [-1, 1]
shifted and scaled by its ScalingLayer constants, the five ReLU taps of torchvision's VGG16 (relu1_2 ... relu5_3),
unit-normalised over channels (eps 1e-10), squared differences weighted by the 1x1 "lin" heads, averaged over space
and summed over layers. Weights come from a local file only (no download): torchvision's `vgg16` `features.*` keys
plus the package's `lin{k}.model.1.weight`. tests/test_image_metrics.py checks it against the `lpips` package.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from pipeline.manifest import UserError

def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of two uint8 batches (B, ...) on the 0..255 scale."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # up to relu5_3
VGG_TAPS = (3, 8, 15, 22, 29)  # ReLU outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16
VGG_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer constants (inputs in [-1, 1])
LPIPS_SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` up to relu5_3, same module indices (so its `features.{i}.*` keys load)."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=False)]
            channels = v
    return nn.Sequential(*layers)


def lpips_state_from_files(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a merged {torchvision vgg16 `features.*`, lpips `lin{k}.model.1.weight`} dict to `LPIPS`'s keys.

    torchvision's `classifier.*` keys are dropped; everything else must be used (the load after this is strict).
    """
    out = {}
    for k, v in state.items():
        if k.startswith("classifier."):
            continue
        if k.startswith("lin") and k.endswith(".model.1.weight"):
            out[f"heads.{k[3:].split('.')[0]}.weight"] = v
        else:
            out[k] = v
    return out


class LPIPS(nn.Module):
    """LPIPS (v0.1, VGG16): images in [-1, 1] (B, 3, H, W) x2 -> distance (B,). Weights come from a local file."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in VGG_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG_TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # unit norm over channels
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) x2 in [-1, 1] -> (B,) perceptual distance."""
        pairs = zip(self.heads, self._taps(a), self._taps(b))
        return sum(head((fa - fb) ** 2).mean((1, 2, 3)) for head, fa, fb in pairs)


def load_lpips(path: Path) -> LPIPS:
    """Strictly load LPIPS from a local .safetensors or .pth file; frozen, eval mode."""
    if not path.exists():
        raise UserError(f"--lpips-weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = LPIPS()
    try:
        model.load_state_dict(lpips_state_from_files(state), strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: not an LPIPS VGG16 weights file ({e})") from e
    return model.eval().requires_grad_(False)
