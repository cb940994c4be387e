"""The shared trainer (pipeline.train) through all three training stages: kill, SIGTERM and damaged checkpoints end
in the clean run's weights bit for bit; batch split, EMA, trackers and options checked on their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import Killed
from pipeline.checkpoint import load_tensors
from pipeline.manifest import UserError
from pipeline.runtime import Runtime
from pipeline.train import Ema, Interrupted, Trainer, ema_update_, micro_slices

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------ the three stages


class Stage:
    """One training stage in a tiny configuration: how to configure it and which files hold its final weights."""

    def __init__(self, name, module, config, weights):
        self.name, self.module, self.config, self.weights = name, module, config, weights


@pytest.fixture(scope="module")
def stages(tmp_path_factory, images_artifact, features_artifact, encoder_dir):
    import stages.train_decoder as td
    import stages.train_dit as tdit
    import stages.train_vae as tv
    from test_train_dit import make_latents
    from test_train_vae import make_features

    feats = make_features(tmp_path_factory.mktemp("feat"))
    latents = make_latents(tmp_path_factory.mktemp("lat"))
    return {
        "train_vae": Stage("train_vae", tv, lambda out, **kw: tv.Config(**{**dict(
            out=out, features=feats, preset="demo", variant="demo", epochs=1, global_batch=8, micro_batch=4,
            lr_peak=2e-3, val_every=2, log_every=1, num_workers=1, device="cpu"), **kw}),
            lambda out: ["best/model.safetensors", "last/model.safetensors"]),
        "train_dit": Stage("train_dit", tdit, lambda out, **kw: tdit.Config(**{**dict(
            latents=latents, out=out, preset="T", steps=6, global_batch=8, lr=1e-3, ckpt_every=2, log_every=1,
            device="cpu"), **kw}), lambda out: ["ckpt/model.safetensors", "ckpt/ema.safetensors"]),
        "train_decoder": Stage("train_decoder", td, lambda out, **kw: td.Config(**{**dict(
            images=images_artifact, features=features_artifact, encoder=str(encoder_dir), out=out, steps=6,
            preset="demo", batch_size=4, eval_every=3, ckpt_every=2, eval_samples=4, grid_samples=3, lpips="off",
            log_every=1, device="cpu"), **kw}), lambda out: ["diffusion_pytorch_model.safetensors"]),
    }


_CLEAN: dict = {}


def clean_run(stage: Stage, tmp_path_factory) -> Path:
    if stage.name not in _CLEAN:
        out = tmp_path_factory.mktemp(f"clean-{stage.name}") / "run"
        assert stage.module.run(stage.config(out)).complete
        _CLEAN[stage.name] = out
    return _CLEAN[stage.name]


def assert_same_weights(stage: Stage, a: Path, b: Path) -> None:
    for rel in stage.weights(a):
        x, y = load_tensors(a / rel), load_tensors(b / rel)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"{rel}:{k}"


NAMES = ["train_vae", "train_dit", "train_decoder"]


@pytest.mark.parametrize("name", NAMES)
def test_sigterm_checkpoints_the_current_step_and_the_rerun_finishes_bitwise(stages, name, tmp_path,
                                                                             tmp_path_factory, monkeypatch):
    """SIGTERM during update 3: the update finishes, a checkpoint of step 3 is written (not the last periodic one),
    the CLI says how to resume and exits 143; the same command then ends with the clean run's weights."""
    stage = stages[name]
    clean = clean_run(stage, tmp_path_factory)
    out = tmp_path / "run"
    real = Trainer.update

    def update(self, step, *a, **k):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm / Kubernetes send before SIGKILL
        return real(self, step, *a, **k)

    monkeypatch.setattr(Trainer, "update", update)
    with pytest.raises(Interrupted) as e:
        stage.module.run(stage.config(out))
    assert e.value.step == 3 and e.value.exit_code == 143
    assert "SIGTERM: stopped at step 3, checkpoint written" in str(e.value) and "re-run the same command" in str(e.value)
    assert json.loads((out / "latest.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(Trainer, "update", real)
    assert stage.module.run(stage.config(out)).complete
    assert_same_weights(stage, clean, out)


def test_sigint_through_the_cli_exits_130_with_the_message(stages, tmp_path, monkeypatch):
    stage = stages["train_dit"]
    real = Trainer.update

    def update(self, step, *a, **k):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, step, *a, **k)

    monkeypatch.setattr(Trainer, "update", update)
    args = ["--latents", str(stage.config(tmp_path).latents), "--out", str(tmp_path / "run"), "--preset", "T",
            "--steps", "6", "--global-batch", "8", "--device", "cpu"]
    res = CliRunner().invoke(stage.module.cli, args)
    assert res.exit_code == 130, res.output
    assert "SIGINT: stopped at step 2, checkpoint written" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("name", NAMES)
def test_kill_then_rerun_is_bitwise(stages, name, tmp_path, tmp_path_factory, crash_at):
    stage = stages[name]
    clean = clean_run(stage, tmp_path_factory)
    out = tmp_path / "run"
    disarm = crash_at(3)  # after the step-2 checkpoint, in the middle of update 4
    with pytest.raises(Killed):
        stage.module.run(stage.config(out))
    assert json.loads((out / "latest.json").read_text())["step"] == 2 and not (out / "manifest.json").exists()
    disarm()
    assert stage.module.run(stage.config(out)).complete
    assert_same_weights(stage, clean, out)


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.safetensors", "trainer.json"])
@pytest.mark.parametrize("name", NAMES)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(stages, name, damage, tmp_path,
                                                                    tmp_path_factory, crash_at):
    stage = stages[name]
    clean = clean_run(stage, tmp_path_factory)
    out = tmp_path / "run"
    disarm = crash_at(4)  # checkpoints 2 and 4 on disk
    with pytest.raises(Killed):
        stage.module.run(stage.config(out))
    disarm()
    f = out / "checkpoints" / "000000004" / damage
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
    assert stage.module.run(stage.config(out)).complete  # resumed from step 2, replayed 3 and 4
    assert_same_weights(stage, clean, out)


# ------------------------------------------------------------------------------------------------ real signals


@pytest.mark.slow
def test_sigterm_to_a_real_process_then_rerun_is_bitwise(stages, tmp_path, tmp_path_factory):
    """`python -m pipeline train-dit` gets SIGTERM while it trains: exit 143, the message, a checkpoint of the step
    it stopped at; the same command resumes and ends with the clean run's weights bit for bit."""
    stage = stages["train_dit"]
    clean = tmp_path / "clean"
    args = ["--latents", str(stage.config(tmp_path).latents), "--preset", "T", "--steps", "300", "--global-batch",
            "8", "--lr", "1e-3", "--ckpt-every", "1000", "--log-every", "50", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline", "train-dit", *args]
    subprocess.run([*cmd, "--out", str(clean)], cwd=REPO, env=env, check=True, capture_output=True)
    out = tmp_path / "run"
    proc = subprocess.Popen([*cmd, "--out", str(out)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "tb").exists() and time.time() < deadline:  # the training loop has started
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped = int(err.split("stopped at step ")[1].split(",")[0])
    assert 0 < stopped < 300 and json.loads((out / "latest.json").read_text())["step"] == stopped
    subprocess.run([*cmd, "--out", str(out)], cwd=REPO, env=env, check=True, capture_output=True)
    assert_same_weights(stage, clean, out)


# ------------------------------------------------------------------------------------------------ pieces


def test_micro_slices_cover_the_global_batch_in_order():
    single = micro_slices(12, 5, Runtime())
    assert [(s.start, s.stop) for s in single] == [(0, 5), (5, 10), (10, 12)]
    two = micro_slices(12, 4, Runtime(0, 2)) + micro_slices(12, 4, Runtime(1, 2))
    assert [i for s in two for i in s] == list(range(12))
    assert len(micro_slices(12, 4, Runtime(0, 2))) == len(micro_slices(12, 4, Runtime(1, 2)))  # same no_sync count
    with pytest.raises(UserError, match="divisible"):
        micro_slices(12, 4, Runtime(0, 5))


def test_ema_update_with_and_without_warmup():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for step, warmup, decay in ((0, 10, 0.99), (5, 10, 0.99), (500, 10, 0.99), (7, 0, 0.9)):
        before = {k: v.clone() for k, v in ema.state_dict().items()}
        ema_update_(ema, model, Ema(decay, warmup), step)
        d = decay if warmup == 0 else min(decay, (1 + step) / (warmup + step))
        for k, v in ema.state_dict().items():
            torch.testing.assert_close(v, d * before[k] + (1 - d) * model.state_dict()[k], rtol=1e-6, atol=1e-7)


def test_resumed_tensorboard_curves_do_not_overlap(stages, tmp_path, crash_at):
    """purge_step on resume: the steps logged after the last checkpoint by the killed run are dropped, so every
    step appears once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stage = stages["train_dit"]
    out = tmp_path / "run"
    disarm = crash_at(3)  # steps 1-3 logged, checkpoint at 2
    with pytest.raises(Killed):
        stage.module.run(stage.config(out))
    disarm()
    stage.module.run(stage.config(out))
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_wandb_without_the_package_is_refused_before_training(stages, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")  # the refusal is what a plain install sees
    stage = stages["train_dit"]
    with pytest.raises(UserError, match="--log-with wandb needs the wandb package"):
        stage.module.run(stage.config(tmp_path / "run", log_with="wandb"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_one_compiled_step_equals_one_eager_step(stages, name, tmp_path):
    """--compile (torch.compile of the model's forward): the first update's weights within float tolerance of eager."""
    stage = stages[name]
    weights = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        steps = {"train_vae": dict(steps=1, val_every=1), "train_dit": dict(steps=1), "train_decoder": dict(steps=1)}
        stage.module.run(replace(stage.config(out, **steps[name]), compile=compiled))
        weights[compiled] = {rel: load_tensors(out / rel) for rel in stage.weights(out)}
    for rel, eager in weights[False].items():
        for k, v in eager.items():
            torch.testing.assert_close(weights[True][rel][k], v, rtol=1e-4, atol=1e-5, msg=f"{rel}:{k}")
    moved = [k for k, v in weights[False][stage.weights(tmp_path)[-1]].items() if v.dtype.is_floating_point]
    assert moved  # there were weights to compare


def test_history_and_loss_plot(stages, tmp_path_factory):
    stage = stages["train_dit"]
    out = clean_run(stage, tmp_path_factory)
    state = json.loads((out / "checkpoints" / "000000006" / "trainer.json").read_text())
    assert [r["step"] for r in state["log"]] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and len(r["loss_by_t"]) == 4 for r in state["log"])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
