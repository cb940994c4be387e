"""`flatdino flops`: parameters and GMACs of the DiT presets on FlatDINO latents vs DINOv2 grids (SPEC.md 9.4, 10.3).

LightningDiT presets (`models.dit`) and DiT^DH presets (`models.dit_dh`, RAE's generator: a DiT body with a 2-block,
2048-wide head) are counted the same way, each on 32x128 and on 256x768.

Everything is counted, not estimated: models are built on the meta device (no memory, no weights) and run under
`torch.utils.flop_counter.FlopCounterMode`. On the meta device `scaled_dot_product_attention` decomposes into
matmuls (`aten.bmm`) that the counter sees, so attention is included (on CPU tensors the fused kernel counts 0).
MACs = FLOPs / 2, the "GFLOPs" convention of DiT-family papers. Element-wise ops (norms, activations, softmax) are
not counted, as in those papers.

Per training step (per image): the trainable DiT's forward + backward (counted by running backward on meta; a bit
under 3x the forward because the inputs of `x_embedder` and of the time MLP need no gradient) plus one forward of each
frozen network that computes latents online: DINOv2-B/14-reg at 224 px (both settings) and the FlatDINO encoder
(FlatDINO only).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.dit import PRESETS as DIT_PRESETS
from models.dit import DiT
from models.dit_dh import PRESETS as DH_PRESETS
from models.dit_dh import DiTDH
from pipeline.config import Checked, command_from_config, opt
from pipeline.manifest import UserError

META = torch.device("meta")


@dataclass(frozen=True)
class Config(Checked):
    presets: str = field(default="S,B,L,XL", metadata=opt("comma-separated DiT presets to count"))
    dh_presets: str = field(default="ditxl-dh", metadata=opt("comma-separated DiT^DH presets to count ('' for none)"))
    flat_tokens: int = field(default=32, metadata=opt("FlatDINO latent tokens T", min=1))
    flat_channels: int = field(default=128, metadata=opt("FlatDINO latent channels F", min=1))
    grid_tokens: int = field(default=256, metadata=opt("DINOv2 patch tokens (16 x 16 at 224 px)", min=1))
    grid_channels: int = field(default=768, metadata=opt("DINOv2-B feature width", min=1))
    flatdino: str = field(default="32-bl-128", metadata=opt("FlatDINO preset whose encoder runs at training time"))
    json: bool = field(default=False, metadata=opt("print the report as JSON instead of a table"))


def count_macs(fn, *args, backward: bool = False) -> float:
    """Multiply-accumulates of `fn(*args)` (and of a backward through its sum, if asked), counted on meta."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops() / 2


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dit_costs(preset: str, tokens: int, channels: int) -> dict:
    """Parameters, forward GMACs and forward+backward GMACs of one DiT preset on (tokens, channels) inputs."""
    return generator_costs(DiT, DIT_PRESETS[preset], tokens, channels)


def dit_dh_costs(preset: str, tokens: int, channels: int) -> dict:
    """`dit_costs` for a DiT^DH preset."""
    return generator_costs(DiTDH, DH_PRESETS[preset], tokens, channels)


def generator_costs(cls: type, base, tokens: int, channels: int) -> dict:
    """Parameters, forward and forward+backward GMACs of `cls(base with tokens/channels)` counted on meta."""
    model = cls(dataclasses.replace(base, tokens=tokens, channels=channels), device=META)
    x = torch.empty(1, tokens, channels, device=META)
    t, y = torch.empty(1, device=META), torch.zeros(1, dtype=torch.int64, device=META)
    fwd = count_macs(model, x, t, y)
    train = count_macs(model, x, t, y, backward=True)
    return {"params": params(model), "gmacs": fwd / 1e9, "train_gmacs": train / 1e9}


def dinov2_costs() -> dict:
    """DINOv2-B/14 with registers (transformers' class, pretrained 518 px config) at 224 px, forward only."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                                    image_size=518, num_register_tokens=4)
    with META:
        model = Dinov2WithRegistersModel(cfg).eval()
    x = torch.empty(1, 3, 224, 224, device=META)
    return {"params": params(model), "gmacs": count_macs(lambda v: model(pixel_values=v).last_hidden_state, x) / 1e9}


def _meta_safe_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Run `models.layers.LayerNorm` as plain `nn.LayerNorm` (its fp32 autocast guard rejects the meta device).

    Norms cost no MACs in this convention, so the count is unchanged.
    """
    from models.layers import LayerNorm

    for m in model.modules():
        if isinstance(m, LayerNorm):
            m.forward = functools.partial(torch.nn.LayerNorm.forward, m)
    return model


def flatdino_encoder_costs(preset: str, tokens: int, channels: int) -> dict:
    """FlatDINO encoder forward on a (256, 768) grid, from `models.flatdino` built on meta."""
    from models import flatdino

    if preset not in flatdino.PRESETS:
        raise UserError(f"unknown FlatDINO preset {preset!r}; choose one of {sorted(flatdino.PRESETS)}")
    cfg = dataclasses.replace(flatdino.PRESETS[preset], num_tokens=tokens, latent_dim=channels)
    with META:
        model = _meta_safe_norms(flatdino.FlatDINO(cfg))
    f = torch.empty(1, cfg.num_patches, cfg.feature_dim, device=META)
    macs = count_macs(lambda v: model.encode(v).mu, f)
    return {"preset": preset, "params": params(model.encoder), "gmacs": macs / 1e9}


def _names(spec: str, known: dict, what: str) -> list[str]:
    names = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in names if p not in known]
    if unknown:
        raise UserError(f"unknown {what} presets {unknown}; choose from {sorted(known)}")
    return names


def _row(name: str, costs, cfg: Config, dino: dict, enc: dict) -> dict:
    flat = costs(name, cfg.flat_tokens, cfg.flat_channels)
    grid = costs(name, cfg.grid_tokens, cfg.grid_channels)
    step_flat = flat["train_gmacs"] + dino["gmacs"] + enc["gmacs"]
    step_grid = grid["train_gmacs"] + dino["gmacs"]
    return {"preset": name, "flat": flat, "grid": grid, "forward_ratio": grid["gmacs"] / flat["gmacs"],
            "step_flat_gmacs": step_flat, "step_grid_gmacs": step_grid, "step_ratio": step_grid / step_flat,
            "step_ratio_dit_only": grid["train_gmacs"] / flat["train_gmacs"]}


def run(cfg: Config) -> dict:
    """Count every preset in both settings; returns a JSON-able report (`rows`: DiT, `dh_rows`: DiT^DH)."""
    names = _names(cfg.presets, DIT_PRESETS, "DiT")
    dh_names = _names(cfg.dh_presets, DH_PRESETS, "DiT^DH")
    dino = dinov2_costs()
    enc = flatdino_encoder_costs(cfg.flatdino, cfg.flat_tokens, cfg.flat_channels)
    rows = [_row(name, dit_costs, cfg, dino, enc) for name in names]
    dh_rows = [_row(name, dit_dh_costs, cfg, dino, enc) for name in dh_names]
    shapes = {"flat": [cfg.flat_tokens, cfg.flat_channels], "grid": [cfg.grid_tokens, cfg.grid_channels]}
    return {"convention": "GMACs = FLOPs / 2 per image", "shapes": shapes, "dinov2": dino, "flatdino_encoder": enc,
            "rows": rows, "dh_rows": dh_rows}


def format_table(report: dict) -> str:
    """Human-readable table of a `run` report."""
    (ft, fc), (gt, gc) = report["shapes"]["flat"], report["shapes"]["grid"]
    head = (f"{'preset':<8} {'params ' + f'{ft}x{fc}':>15} {'GMACs':>8} {'params ' + f'{gt}x{gc}':>16} {'GMACs':>8} "
            f"{'fwd ratio':>9} | {'step GMACs flat':>15} {'grid':>8} {'ratio':>6} {'DiT-only':>8}")
    lines = [f"DiT forward and training-step cost per image ({report['convention']})", head, "-" * len(head)]
    for i, r in enumerate(report["rows"] + report["dh_rows"]):
        if i == len(report["rows"]):
            lines.append("DiT^DH (body + 2 x 2048 head):")
        lines.append(f"{r['preset']:<8} {r['flat']['params'] / 1e6:>14.1f}M {r['flat']['gmacs']:>8.2f} "
                     f"{r['grid']['params'] / 1e6:>15.1f}M {r['grid']['gmacs']:>8.2f} {r['forward_ratio']:>8.2f}x | "
                     f"{r['step_flat_gmacs']:>15.1f} {r['step_grid_gmacs']:>8.1f} {r['step_ratio']:>5.2f}x "
                     f"{r['step_ratio_dit_only']:>7.2f}x")
    d, e = report["dinov2"], report["flatdino_encoder"]
    lines += [
        f"frozen DINOv2-B/14-reg @224: {d['params'] / 1e6:.1f}M params, {d['gmacs']:.2f} GMACs (both settings)",
        f"frozen FlatDINO encoder ({e['preset']}): {e['params'] / 1e6:.1f}M params, {e['gmacs']:.2f} GMACs "
        "(FlatDINO setting only)",
        "step = DiT forward+backward (counted) + frozen forwards; DiT-only = the ratio without the frozen encoders.",
    ]
    return "\n".join(lines)


def summary(result: dict) -> str:
    report = dict(result)
    as_json = report.pop("_json")
    return json.dumps(report, indent=2) if as_json else format_table(report)


def _run_cli(cfg: Config) -> dict:
    return {**run(cfg), "_json": cfg.json}


cli = command_from_config(Config, _run_cli, "flops", __doc__.splitlines()[0], summary=summary)
