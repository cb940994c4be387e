"""Real 2-process DiT training under `accelerate launch` (gloo on CPU) gives the single-process weights."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_dit import config, make_latents, weights

from stages import train_dit

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """Each rank takes its micro-batches of the same global batch and the same draws; DDP averages the gradients.
    Rank 0 writes the row cache and rank 1 waits for it; the finished run removes it."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists() and shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not installed")
    latents = make_latents(tmp_path / "latents")
    train_dit.run(config(latents, tmp_path / "one"))
    args = ["--latents", str(latents), "--out", str(tmp_path / "two"), "--preset", "T", "--steps", "6",
            "--global-batch", "8", "--lr", "1e-3", "--ckpt-every", "2", "--keep", "2", "--log-every", "1"]
    launcher = str(accelerate) if accelerate.exists() else "accelerate"
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline", "train-dit", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = train_dit.require_complete(tmp_path / "two", "train_dit")
    assert manifest.timings["world_size"] == 2 and manifest.extra["step"] == 6
    assert not (tmp_path / "two" / "cache").exists()
    for a, b in zip(weights(tmp_path / "one"), weights(tmp_path / "two")):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
