"""The faults a real cluster and a real dataset bring (issue 14): each case as a user meets it, with the message they
now see; nothing is lost and nothing is silently wrong."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_image_folder
from fault_harness import make_latents_artifact, snapshot
from pipeline.manifest import ArtifactError, ConfigMismatch, TooManyFailures, UserError, read_manifest
from pipeline.runtime import Runtime
from pipeline.shards import ImageShards
from stages import features, images, train_dit

REPO = Path(__file__).resolve().parent.parent


def _images(out, source, **kw) -> images.Config:
    return images.Config(**{"out": out, "source": str(source), "shard_size": 5, "val_fraction": 0.25, **kw})


def _png(color=(10, 20, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ data lost


def test_overwrite_keeps_the_users_files_and_out_may_not_be_an_input(tmp_path, image_folder, images_artifact,
                                                                     encoder_dir):
    out = tmp_path / "img"
    images.run(_images(out, image_folder))
    (out / "thesis.tex").write_text("three years")
    (out / "photos").mkdir()
    with pytest.raises(UserError, match=r"--overwrite would delete .*(photos|thesis.tex), which images did not"):
        images.run(_images(out, image_folder, shard_size=6, overwrite=True))
    assert (out / "thesis.tex").read_text() == "three years" and read_manifest(out).complete
    feats_into_images = features.Config(images=images_artifact, encoder=str(encoder_dir), out=images_artifact,
                                        overwrite=True)
    before = snapshot(images_artifact)
    with pytest.raises(UserError, match="overlaps the input"):
        features.run(feats_into_images, rt=Runtime())
    assert snapshot(images_artifact) == before  # the input artifact is untouched


def test_sigterm_in_a_shard_stage_drops_the_shard_in_flight_and_resumes_identically(tmp_path, image_folder):
    """A real `flatdino images` process gets SIGTERM: exit 143, the message, no partial file; the same command
    finishes with the bytes of an uninterrupted run."""
    big = tmp_path / "big"
    make_image_folder(big, per_class=40)
    cmd = [sys.executable, "-m", "pipeline", "images", "--source", str(big), "--shard-size", "4"]
    subprocess.run([*cmd, "--out", str(tmp_path / "clean")], cwd=REPO, check=True, capture_output=True)
    out = tmp_path / "run"
    proc = subprocess.Popen([*cmd, "--out", str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list(out.glob("*.record.json"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM: stopped; the shards committed so far are kept" in err and "re-run the same command" in err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    subprocess.run([*cmd, "--out", str(out)], cwd=REPO, check=True, capture_output=True)
    for p in (tmp_path / "clean").glob("*.tar"):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_a_full_disk_while_preallocating_the_row_cache_is_the_clear_message(tmp_path, monkeypatch):
    """posix_fallocate reserves the mapped cache up front: a full disk is exit 2 and the message, never SIGBUS, and
    no sparse .npy.tmp is left behind."""
    latents = make_latents_artifact(tmp_path / "lat")

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "dit"
    res = CliRunner().invoke(train_dit.cli, ["--latents", str(latents), "--out", str(out), "--preset", "T",
                                             "--steps", "2", "--global-batch", "8", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "No space left on device while writing" in res.output and ".npy.tmp" in res.output
    assert "Traceback" not in res.output and not list((out / "cache").glob("*"))


# ------------------------------------------------------------------------------------------------ silently wrong


def test_a_source_that_changed_under_a_resumed_run_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_image_folder(src, per_class=10)
    out = tmp_path / "img"
    real = images.write_tar_shard
    calls = {"n": 0}

    def killed_after_three(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(images, "write_tar_shard", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        images.run(_images(out, src))
    monkeypatch.setattr(images, "write_tar_shard", real)
    (src / "cat" / "new_photo.png").write_bytes(_png())
    with pytest.raises(ConfigMismatch, match="source_fingerprint.*Its input changed since this run started"):
        images.run(_images(out, src))
    shutil.move(str(src / "cat" / "new_photo.png"), str(tmp_path / "aside.png"))
    moved = tmp_path / "moved-src"
    shutil.move(str(src), str(moved))
    assert images.run(_images(out, moved)).complete  # the same listing elsewhere: the same source


def _tar_source(path: Path, samples: list[tuple[str, str]]) -> str:
    """A user's webdataset tar of (key, class text) samples with tiny PNGs."""
    with tarfile.open(path, "w") as tar:
        for key, cls in samples:
            for ext, data in (("png", _png()), ("cls", cls.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("samples,match", [
    ([("a", "0"), ("b", "1"), ("a", "0")], "key 'a' appears twice"),
    ([("a", "0"), ("b", "-1")], "class '-1'; classes must be integers >= 0"),
    ([("a", "0"), ("b", "cat")], "class 'cat'; classes must be integers >= 0"),
    ([("a", "0"), ("b", "1"), ("c", "999")], r"absent below the largest.*--num-classes"),
], ids=["duplicate-key", "negative-class", "non-integer-class", "class-gap"])
def test_tar_sources_refuse_what_webdataset_would_merge_or_mislabel(tmp_path, samples, match):
    src = _tar_source(tmp_path / "src.tar", samples)
    with pytest.raises((ArtifactError, UserError), match=match):
        images.run(_images(tmp_path / "img", src))
    assert not (tmp_path / "img" / "manifest.json").exists()


def test_num_classes_accepts_classes_absent_from_the_tars(tmp_path):
    src = _tar_source(tmp_path / "src.tar", [(f"s{i}", str(c)) for i, c in enumerate([0, 1, 999, 0, 1, 999, 0, 1])])
    m = images.run(_images(tmp_path / "img", src, num_classes=1000))
    assert len(m.extra["classes"]) == 1000
    with pytest.raises(UserError, match="not below --num-classes 3"):
        images.run(_images(tmp_path / "img2", src, num_classes=3))


def test_imagefolder_ignores_clutter_recurses_and_refuses_bad_classes(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root, per_class=6)
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "dog" / "Thumbs.db").write_bytes(b"junk")
    (root / "fish" / "burst" / "deep").mkdir(parents=True)
    (root / "fish" / "burst" / "deep" / "nested.png").write_bytes(_png())
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "fish" / "anim.gif")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "fish" / "scan.tiff")
    m = images.run(_images(tmp_path / "img", root, max_failed_fraction=0.0))
    assert m.counts["failed"] == 0 and m.counts["skipped"] == 2  # the two clutter files, ignored and counted
    art = ImageShards(tmp_path / "img")
    exts = {e for split in ("train", "val") for *_, e in art.iter(split)}
    assert {"gif", "tiff"} <= exts
    assert sum(m.extra["splits"].values()) == 18 + 3  # nested, gif and tiff included
    (root / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder\(s\) \['empty'\] hold no images"):
        images.run(_images(tmp_path / "img2", root))


def test_imagefolder_val_only_classes_are_refused_and_missing_ones_are_fine(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=4)
    make_image_folder(root / "val", per_class=2, classes=("cat", "dog"))  # lacks fish: fine
    m = images.run(_images(tmp_path / "img", root))
    assert m.extra["classes"] == ["cat", "dog", "fish"] and m.extra["splits"] == {"train": 12, "val": 4}
    make_image_folder(root / "val", per_class=1, classes=("zebra",))
    with pytest.raises(UserError, match=r"val has class folder\(s\) that .*train lacks: \['zebra'\]"):
        images.run(_images(tmp_path / "img2", root))


# ------------------------------------------------------------------------------------------------ messages


@pytest.mark.parametrize("stage,args,option", [
    ("images", ["--shard-size", "0"], "--shard-size"),
    ("images", ["--val-fraction", "1.5"], "--val-fraction"),
    ("images", ["--val-fraction", "-0.2"], "--val-fraction"),
    ("latents", ["--shard-samples", "0"], "--shard-samples"),
    ("train-dit", ["--steps", "0"], "--steps"),
    ("train-dit", ["--steps", "-3"], "--steps"),
    ("train-dit", ["--global-batch", "0"], "--global-batch"),
    ("train-dit", ["--ckpt-every", "0"], "--ckpt-every"),
    ("train-dit", ["--ema-decay", "2"], "--ema-decay"),
    ("train-dit", ["--label-dropout", "1.5"], "--label-dropout"),
    ("features", ["--num-workers", "0"], "--num-workers"),
    ("train-vae", ["--steps", "-5"], "--steps"),
    ("train-vae", ["--steps", "0"], "--steps"),
    ("train-vae", ["--micro-batch", "0"], "--micro-batch"),
    ("train-vae", ["--lr-peak", "-1"], "--lr-peak"),
    ("train-vae", ["--global-batch", "0"], "--global-batch"),
    ("train-vae", ["--val-samples", "0"], "--val-samples"),
    ("sample", ["--steps", "0"], "--steps"),
])
def test_out_of_range_options_are_refused_when_parsed(tmp_path, stage, args, option):
    from pipeline.cli import main

    required = {"images": [], "latents": ["--features", "f", "--vae", "v"], "train-dit": ["--latents", "l"],
                "features": ["--images", "i", "--encoder", "e"], "train-vae": [],
                "sample": ["--dit", "d", "--vae", "v", "--decoder", "x"]}[stage]
    res = CliRunner().invoke(main, [stage, *required, "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and option in res.output and "Invalid value" in res.output, res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage, required", [
    ("sample", ["--dit", "d", "--vae", "v", "--decoder", "x"]),
    ("demo-report", ["--dit", "d", "--vae", "v", "--decoder", "x", "--classifier", "c"]),
])
def test_cfg_interval_must_be_ordered(tmp_path, stage, required):
    from pipeline.cli import main

    res = CliRunner().invoke(main, [stage, *required, "--out", str(tmp_path / "o"), "--cfg-interval", "1", "0"])
    assert res.exit_code == 2 and "t_min must be below t_max" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_permission_denied_is_the_storage_message(tmp_path, image_folder, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "img" / "train-000000.tar.tmp"))

    monkeypatch.setattr(images, "write_tar_shard", denied)
    res = CliRunner().invoke(images.cli, ["--source", str(image_folder), "--out", str(tmp_path / "img")])
    assert res.exit_code == 2 and "Permission denied on" in res.output and "fix the permissions" in res.output
    assert "Traceback" not in res.output


def test_out_naming_an_existing_file_is_a_message(tmp_path, image_folder):
    (tmp_path / "notes.txt").write_text("x")
    res = CliRunner().invoke(images.cli, ["--source", str(image_folder), "--out", str(tmp_path / "notes.txt")])
    assert res.exit_code == 2 and "is an existing file, not a directory" in res.output
    assert (tmp_path / "notes.txt").read_text() == "x"


# ------------------------------------------------------------------------------------------------ dead ends


def test_too_many_failures_then_raising_the_tolerance_accepts_the_committed_shards(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src, per_class=6)
    (src / "cat" / "broken.JPEG").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "img"
    with pytest.raises(TooManyFailures, match="re-run with a higher --max-failed-fraction"):
        images.run(_images(out, src))
    m = images.run(_images(out, src, max_failed_fraction=0.1))  # a tolerance, not identity: accepted, resumed
    assert m.complete and m.counts["failed"] == 1


def test_a_moved_interrupted_vae_run_and_its_moved_features_resume(tmp_path, crash_at):
    """Paths are not identity: an interrupted train-vae run copied elsewhere (cp -a) with its features resumes there
    and ends with the weights of an uninterrupted run."""
    import stages.train_vae as tv
    from conftest import Killed
    from test_train_vae import make_features

    feats = make_features(tmp_path / "a" / "feat")

    def cfg(out, feat):
        return tv.Config(out=out, features=feat, preset="demo", variant="demo", epochs=1, global_batch=8,
                         micro_batch=4, lr_peak=2e-3, val_every=2, num_workers=1, device="cpu")

    clean = tv.run(cfg(tmp_path / "clean", feats))
    disarm = crash_at(3)
    with pytest.raises(Killed):
        tv.run(cfg(tmp_path / "a" / "vae", feats))
    disarm()
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)  # cp -a of features and the interrupted run
    moved = tv.run(cfg(tmp_path / "b" / "vae", tmp_path / "b" / "feat"))
    assert moved.models == clean.models  # the same weights, bit for bit
