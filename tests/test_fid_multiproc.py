"""`fid-ref` and `fid` under a real 2-process `accelerate launch` (gloo on CPU) give the single-process numbers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.manifest import file_sha256
from pipeline.runtime import Runtime
from stages import fid

REPO = Path(__file__).resolve().parent.parent


def _launch(torch_home: Path, *args: str) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = str(accelerate) if accelerate.exists() else "accelerate"
    proc = subprocess.run([launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TORCH_HOME": str(torch_home)})  # no cached Inception, as in-process
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one(images_artifact, encoder_dir, tmp_path, monkeypatch):
    if not Path(sys.executable).with_name("accelerate").exists() and shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not installed")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    x = np.stack([np.full((256, 256, 3), 20 * i, np.uint8) for i in range(7)])
    np.savez(tmp_path / "samples.npz", x, np.arange(7) % 3)
    common = dict(encoder=str(encoder_dir), block_size=3, download=False, device="cpu")
    fid.run_ref(fid.RefConfig(images=images_artifact, out=tmp_path / "ref1", **common), rt=Runtime())
    one = fid.run(fid.Config(samples=tmp_path / "samples.npz", reference=tmp_path / "ref1", out=tmp_path / "fid1",
                             **common), rt=Runtime())
    flags = ["--encoder", str(encoder_dir), "--block-size", "3", "--no-download", "--device", "cpu"]
    _launch(tmp_path / "hub", "fid-ref", "--images", str(images_artifact), "--out", str(tmp_path / "ref2"), *flags)
    assert file_sha256(tmp_path / "ref2" / fid.REFERENCE) == file_sha256(tmp_path / "ref1" / fid.REFERENCE)
    _launch(tmp_path / "hub", "fid", "--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "ref2"),
            "--out", str(tmp_path / "fid2"), *flags)
    two = json.loads((tmp_path / "fid2" / fid.METRICS).read_text())
    for name in ("fd_dinov2", "fd_dinov2_patch_mean"):
        assert two["metrics"][name]["value"] == one.extra["metrics"][name]["value"]
