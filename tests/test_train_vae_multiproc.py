"""Real 2-process training under `accelerate launch` (gloo on CPU) gives the single-process weights."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_vae import cfg_for, make_features

import stages.train_vae as tv
from pipeline.manifest import require_complete

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists() and shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not installed")
    feats = make_features(tmp_path / "feat")
    cfg = cfg_for(feats, tmp_path / "one", val_every=5)
    tv.run(cfg)
    args = ["--features", str(feats), "--out", str(tmp_path / "two"), "--preset", "demo", "--variant", "demo",
            "--epochs", "1", "--global-batch", "8", "--micro-batch", "2", "--lr-peak", "2e-3", "--val-every", "5",
            "--num-workers", "1"]
    launcher = str(accelerate) if accelerate.exists() else "accelerate"
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline", "train-vae", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(tmp_path / "one/last/model.safetensors")
    b = load_file(tmp_path / "two/last/model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert require_complete(tmp_path / "two", "train_vae").extra["last_step"] == 5
