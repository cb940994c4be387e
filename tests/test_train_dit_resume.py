"""train-dit resume from damaged checkpoints, and outputs/inputs pinned by content rather than by path."""

import json
import logging
import shutil

import pytest

from pipeline.manifest import ArtifactError
from stages import train_dit
from conftest import Killed
from test_train_dit import assert_same, config, make_latents, weights


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return make_latents(tmp_path_factory.mktemp("latents"))


@pytest.fixture(scope="module")
def reference(latents, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, train_dit.run(config(latents, out))


def _killed_after_step_4(latents, out, crash_at):
    """Checkpoints 2 and 4 on disk, latest.json -> 4, no manifest."""
    disarm = crash_at(4)
    with pytest.raises(Killed):
        train_dit.run(config(latents, out))
    disarm()


@pytest.fixture
def warnings(caplog):
    root = logging.getLogger("flatdino")  # does not propagate to the root logger caplog listens on
    root.addHandler(caplog.handler)
    yield caplog
    root.removeHandler(caplog.handler)


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.safetensors", "trainer.json", "missing"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, latents, tmp_path, crash_at,
                                                                  warnings, damage):
    out = tmp_path / "run"
    _killed_after_step_4(latents, out, crash_at)
    ckpt = out / "checkpoints" / "000000004"
    if damage == "missing":  # e.g. killed between removing a re-saved step and renaming its replacement
        shutil.rmtree(ckpt)
    else:
        (ckpt / damage).write_bytes((ckpt / damage).read_bytes()[:200])
    assert train_dit.run(config(latents, out)).fingerprint == reference[1].fingerprint
    for got, want in zip(weights(out), weights(reference[0])):  # replayed from step 2: bitwise the same
        assert_same(got, want)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000000004", "000000006"]
    (warning,) = [r.getMessage() for r in warnings.records if r.levelno == logging.WARNING]
    assert "000000004: unreadable checkpoint" in warning and "resuming from" in warning
    assert warning.rstrip(")").split("resuming from ")[1].startswith(str(out / "checkpoints" / "000000002"))


def test_no_readable_checkpoint_is_a_clear_error(latents, tmp_path, crash_at):
    out = tmp_path / "run"
    _killed_after_step_4(latents, out, crash_at)
    for step in ("000000002", "000000004"):
        (out / "checkpoints" / step / "ema.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ArtifactError, match=r"000000004: unreadable checkpoint.*no older readable.*--overwrite"):
        train_dit.run(config(latents, out))
    assert json.loads((out / "latest.json").read_text())["step"] == 4  # nothing was touched


def test_moved_run_and_latents_are_still_complete(reference, latents, tmp_path):
    """Paths are runtime knobs: a run and its latents copied elsewhere are the same artifact, a no-op re-run."""
    out, lat = tmp_path / "moved" / "run", tmp_path / "moved" / "latents"
    shutil.copytree(reference[0], out)
    shutil.copytree(latents, lat)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert train_dit.run(config(lat, out)).fingerprint == reference[1].fingerprint
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
