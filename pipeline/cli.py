"""The `flatdino` command: one click group whose sub-commands live in `stages/` and load on demand.

Loading on demand keeps `flatdino --help` instant (no torch import) and lets each stage module own its command.
"""

from __future__ import annotations

import importlib

import click

# command name -> (module, attribute, one-line help shown by `flatdino --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "images": ("stages.images", "cli", "Write image shards from the bundled digits, an ImageFolder tree or tars."),
    "init-encoder": ("stages.features", "init_encoder_cli", "Write a random-weight RAE encoder/decoder directory."),
    "features": ("stages.features", "cli", "DINOv2 patch features (N, D) float16 per sample and view."),
    "train-vae": ("stages.train_vae", "cli", "Train the FlatDINO beta-VAE on feature shards."),
    "latents": ("stages.latents", "cli", "Encode features to FlatDINO posterior means in latents.zarr."),
    "train-dit": ("stages.train_dit", "cli", "Train the LightningDiT flow-matching generator on latents."),
    "flops": ("stages.flops", "cli", "Parameters and GMACs of DiT presets on 32x128 latents vs 256x768 grids."),
    "train-decoder": ("stages.train_decoder", "cli", "Train a pixel decoder (DINOv2 features -> RGB)."),
    "sample": ("stages.sample", "cli", "Generate class-balanced samples: samples.npz (ADM format) + a PNG grid."),
    "reconstruct": ("stages.reconstruct", "cli", "Reconstruct images through FlatDINO and the pixel decoder."),
    "fid-ref": ("stages.fid", "fid_ref_cli", "Reference statistics (Inception, DINOv2) from image shards."),
    "fid": ("stages.fid", "cli", "FID, IS, precision/recall, FD-DINOv2 and class-consistency of samples."),
    "train-classifier": ("stages.classifier", "cli", "Train the demo's digit classifier on real images."),
    "demo-report": ("stages.report", "cli", "The demo's digit metrics over several sampling seeds (mean, error)."),
}


class LazyGroup(click.Group):
    """A click group that imports a sub-command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands (in pipeline order)"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """FlatDINO pipeline: images -> DINOv2 features -> FlatDINO latents -> DiT -> samples -> FID.

    Each command reads artifacts and writes one artifact directory with a manifest.json; re-running a finished
    command is a no-op, an interrupted one resumes. `make help` shows the same chain as make targets.
    """
