"""Networks out of finished training artifacts: a train-vae run's FlatDINO, checked against its manifest.

Stages load each other's outputs through here (never by importing another stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from models.flatdino import load_weights
from pipeline.manifest import ArtifactError, file_sha256, require_complete


def load_flatdino(run_dir: str | Path, which: Literal["best", "last"] = "best", device="cpu"):
    """(model, FlatDINOConfig, manifest) of a finished train-vae run; the best-val checkpoint by default."""
    manifest = require_complete(run_dir, "train_vae")
    path = Path(run_dir) / which
    sha = file_sha256(path / "model.safetensors")
    if sha != manifest.models[which]["sha256"]:
        raise ArtifactError(f"{path}/model.safetensors does not match its manifest (sha256 {sha[:12]}...); "
                            "the run directory was modified: re-run `flatdino train-vae`")
    model, model_cfg = load_weights(path, device)
    return model, model_cfg, manifest
