"""Corrupt inputs and mismatched artifacts (issue #8).

Countable per-sample faults (an undecodable image) are skipped, counted and listed; structural faults (a truncated
shard, a damaged zarr chunk, a half-written checkpoint, an empty dataset, a sample without its class) refuse to start
with a message that names the file or key and what to do. Mismatched artifacts and re-runs with another config are
refused before any work. Stages owned by others are not edited here: their bugs are strict xfails with the fix.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fault_harness import make_features_artifact, make_latents_artifact, run_forked, snapshot
from pipeline.manifest import ArtifactError, ConfigMismatch, TooManyFailures, UserError, read_manifest
from pipeline.runtime import Runtime
from pipeline.shards import ImageShards, encode_int, index_tar_shard, read_tar_shard, write_tar_shard
from stages import classifier, features, images, train_dit


def _features_cfg(images_dir, encoder_dir, out, **kw) -> features.Config:
    return features.Config(**{"images": images_dir, "encoder": str(encoder_dir), "out": out, "views": 2,
                              "batch_size": 4, "num_workers": 1, **kw})


def _dit_cfg(latents, out, **kw) -> train_dit.Config:
    base = dict(latents=latents, out=out, preset="T", steps=4, global_batch=8, lr=1e-3, ckpt_every=2, keep=2,
                log_every=1, device="cpu")
    return train_dit.Config(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ images


def test_undecodable_source_files_are_skipped_counted_and_named(tmp_path, image_folder):
    src = tmp_path / "data"
    shutil.copytree(image_folder, src)
    good = next((src / "cat").glob("*.JPEG")).read_bytes()
    (src / "cat" / "truncated.JPEG").write_bytes(good[: len(good) // 3])  # a JPEG cut short
    (src / "dog" / "notes.txt").write_text("not an image")  # a non-image file
    (src / "fish" / "empty.png").write_bytes(b"")
    with pytest.raises(TooManyFailures, match=r"3 of 27 images could not be decoded.*truncated\.JPEG"):
        images.run(images.Config(out=tmp_path / "strict", source=str(src), shard_size=5, val_fraction=0.25))
    assert not (tmp_path / "strict" / "manifest.json").exists()
    m = images.run(images.Config(out=tmp_path / "lenient", source=str(src), shard_size=5, val_fraction=0.25,
                                 max_failed_fraction=0.2))
    assert m.complete and m.counts == {"written": 24, "skipped": 0, "failed": 3}
    assert sorted(Path(f["src"]).name for f in m.failures) == ["empty.png", "notes.txt", "truncated.JPEG"]
    assert all(f["key"] and f["reason"] for f in m.failures)


def test_empty_datasets_are_refused(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        images.run(images.Config(out=tmp_path / "a", source=str(tmp_path / "none")))
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="hold no images"):
        images.run(images.Config(out=tmp_path / "b", source=str(tmp_path / "hollow")))
    with pytest.raises(ArtifactError, match="no tar files match"):
        images.run(images.Config(out=tmp_path / "c", source=str(tmp_path / "nothing-*.tar")))


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("drop", ["cls", "png"])
def test_tar_source_sample_without_class_or_image_is_refused_by_key(tmp_path, drop):
    samples = [{"__key__": f"s{i}", "png": _png(), "cls": encode_int(i % 2)} for i in range(4)]
    del samples[2][drop]
    write_tar_shard(tmp_path / "src-000.tar", samples)
    with pytest.raises(ArtifactError, match=r"src-000\.tar: sample 's2' lacks an image \(jpg/.*\) or a cls member"):
        images.run(images.Config(out=tmp_path / "out", source=str(tmp_path / "src-*.tar")))


# ------------------------------------------------------------------------------------------------ shards


def _member_boundary(path: Path) -> int:
    """A byte offset inside the shard that ends exactly after a member's data (a 'clean' truncation point)."""
    index = index_tar_shard(path)
    off, size = index[sorted(index)[1]]["cls"]
    return off + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


@pytest.mark.parametrize("cut", [pytest.param("half", marks=pytest.mark.slow), "member_boundary"])
def test_truncated_input_shard_is_named_and_the_producer_rewrites_it(tmp_path, images_artifact, encoder_dir,
                                                                      image_folder, cut):
    art = tmp_path / "img"
    shutil.copytree(images_artifact, art)
    rec = ImageShards(art).shards("train")[1]
    data = (art / rec["name"]).read_bytes()
    (art / rec["name"]).write_bytes(data[: len(data) // 2 if cut == "half" else _member_boundary(art / rec["name"])])
    with pytest.raises(ArtifactError, match=rf"{rec['name']}.*(truncated|end-of-archive)"):
        list(ImageShards(art).iter("train"))
    with pytest.raises(ArtifactError, match=rf"{rec['name']}"):
        features.run(_features_cfg(art, encoder_dir, tmp_path / "f"), rt=Runtime())
    # the producing stage, re-run with the same options, rewrites just that shard with the same bytes
    m = images.run(images.Config(out=art, source=str(image_folder), shard_size=5, val_fraction=0.25))
    assert m.fingerprint == read_manifest(images_artifact).fingerprint
    assert snapshot(art) == snapshot(images_artifact)
    assert features.run(_features_cfg(art, encoder_dir, tmp_path / "f"), rt=Runtime()).complete


def _rewrite_sample(art: Path, fn) -> str:
    """Apply `fn` to sample 1 of the first train shard of an images artifact (record updated); returns its key."""
    rec_path = art / (ImageShards(art).shards("train")[0]["name"])
    samples = list(read_tar_shard(rec_path))
    fn(samples[1])
    rec = write_tar_shard(rec_path, samples)
    m = read_manifest(art)
    for s in m.shards:
        if s["name"] == rec["name"]:
            s.update(rec)
    from pipeline.manifest import write_manifest

    write_manifest(art, m)
    return samples[1]["__key__"]


def test_images_artifact_sample_without_class_is_named(tmp_path, images_artifact, encoder_dir):
    art = tmp_path / "img"
    shutil.copytree(images_artifact, art)
    key = _rewrite_sample(art, lambda s: s.pop("cls"))
    with pytest.raises(ArtifactError, match=key):
        features.run(_features_cfg(art, encoder_dir, tmp_path / "f"), rt=Runtime())


def test_images_artifact_non_image_member_is_skipped_and_counted(tmp_path, images_artifact, encoder_dir):
    art = tmp_path / "img"
    shutil.copytree(images_artifact, art)

    def to_text(s):
        ext = next(e for e in s if e in ("jpg", "png", "JPEG"))
        s["txt"] = s.pop(ext)

    key = _rewrite_sample(art, to_text)
    m = features.run(_features_cfg(art, encoder_dir, tmp_path / "f", max_failed_fraction=0.1), rt=Runtime())
    assert m.counts["failed"] == 1 and m.failures[0]["key"] == key


# ------------------------------------------------------------------------------------------------ features -> VAE

def _vae_cfg(feats: Path, out: Path):
    import stages.train_vae as tv

    return tv.Config(out=out, features=feats, preset="demo", variant="demo", epochs=1, global_batch=8, micro_batch=8,
                     lr_peak=2e-3, val_every=2, log_every=1, num_workers=1, device="cpu")


def _nan_in_place(shard: Path, key: str) -> None:
    """Overwrite one float16 of `key`'s features with NaN, size unchanged (bit rot, a bad copy)."""
    from pipeline.shards import index_tar_shard

    off, _ = index_tar_shard(shard)[key]["feat.npy"]
    with open(shard, "r+b") as f:
        f.seek(off + 128 + 2 * 1000)  # past the npy header, somewhere in the data
        f.write(np.array([np.nan], dtype="<f2").tobytes())


@pytest.mark.parametrize("consumer", ["train_vae", "latents"])
def test_a_nan_written_into_a_feature_shard_is_refused_naming_it_and_the_repair_works(
        tmp_path, images_artifact, encoder_dir, consumer):
    """One NaN in a committed feature shard, size unchanged: the consumer stops before training / writing, naming the
    shard and the sample; following the message (delete the shard, re-run features) restores the same bytes."""
    import stages.latents as lt
    import stages.train_vae as tv

    feats = tmp_path / "feat"
    m = features.run(_features_cfg(images_artifact, encoder_dir, feats), rt=Runtime())
    vae = tmp_path / "vae"
    if consumer == "latents":
        tv.run(tv.Config(out=vae, features=feats, preset="demo", variant="demo", steps=2, global_batch=6,
                         micro_batch=6, num_workers=1, device="cpu"))
    rec = m.shards[0]
    key = rec["first_key"]
    before = (feats / rec["name"]).read_bytes()
    _nan_in_place(feats / rec["name"], key)
    run = (lambda: tv.run(tv.Config(out=tmp_path / "v2", features=feats, preset="demo", variant="demo", steps=2,
                                    global_batch=6, micro_batch=6, num_workers=1, device="cpu"))) \
        if consumer == "train_vae" else (lambda: lt.run(lt.Config(features=feats, vae=vae, out=tmp_path / "lat")))
    with pytest.raises(ArtifactError, match=rf"{rec['name']}: sample {key} member feat.npy fails its checksum.*"
                                            rf"delete {rec['name']}.*re-run the stage"):
        run()
    assert not (tmp_path / "lat" / "manifest.json").exists()
    assert not (tmp_path / "v2" / "manifest.json").exists()
    (feats / rec["name"]).unlink()  # what the message says
    features.run(_features_cfg(images_artifact, encoder_dir, feats), rt=Runtime())
    assert (feats / rec["name"]).read_bytes() == before
    assert run().complete


def test_wrong_shape_features_are_named_by_key(tmp_path):
    import stages.train_vae as tv

    feats, key = make_features_artifact(tmp_path / "feat", "shape")
    with pytest.raises(ArtifactError, match=key):
        tv.run(_vae_cfg(feats, tmp_path / "vae"), rt=Runtime())


# ------------------------------------------------------------------------------------------------ latents -> DiT


@pytest.fixture
def latents(tmp_path):
    return make_latents_artifact(tmp_path / "lat")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_zarr_chunk_is_named_before_training(latents, tmp_path, damage):
    chunk = latents / "latents.zarr" / "mu" / "c" / "1" / "0" / "0"
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:40])
    else:
        chunk.unlink()  # zarr alone would read this chunk as zeros
    with pytest.raises(ArtifactError, match=r"latents\.zarr.*(cannot read mu|mu/c/1/0/0).*flatdino latents"):
        train_dit.run(_dit_cfg(latents, tmp_path / "dit"))
    assert not (tmp_path / "dit" / "checkpoints").exists()


def _interrupted_dit(latents, out: Path, tmp_path: Path) -> None:
    """A train-dit run killed while saving its step-4 checkpoint: latest.json names step 2."""
    spec = {"stage": "stages.train_dit", "config": {**json.loads(json.dumps(_dit_spec(latents))), "out": str(out)},
            "sinks": ["save_tensors"], "k": 4, "action": "kill_before"}
    sig, _ = run_forked(spec, tmp_path / "kill.json")
    assert sig == 9 and json.loads((out / "latest.json").read_text())["step"] == 2


def _dit_spec(latents) -> dict:
    return {"latents": str(latents), "preset": "T", "steps": 4, "global_batch": 8, "lr": 1e-3, "ckpt_every": 2,
            "keep": 2, "log_every": 1, "device": "cpu"}


def test_half_written_checkpoint_is_named(latents, tmp_path):
    out = tmp_path / "dit"
    _interrupted_dit(latents, out, tmp_path)
    weights = out / "checkpoints" / "000000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="000000002"):
        train_dit.run(_dit_cfg(latents, out))


def test_resume_on_other_latents_in_the_same_place_is_refused(latents, tmp_path):
    out = tmp_path / "dit"
    _interrupted_dit(latents, out, tmp_path)
    shutil.rmtree(latents)
    make_latents_artifact(latents, seed=1)  # same path, other content (another VAE made them)
    with pytest.raises(ConfigMismatch):
        train_dit.run(_dit_cfg(latents, out))


# ------------------------------------------------------------------------------------------------ config mismatch


def _mismatch_cases(request, tmp_path):
    imgs, enc = request.getfixturevalue("images_artifact"), request.getfixturevalue("encoder_dir")
    feats = request.getfixturevalue("features_artifact")
    return {
        "images": (lambda **kw: images.run(images.Config(**{"out": imgs, "source": str(request.getfixturevalue(
                       "image_folder")), "shard_size": 5, "val_fraction": 0.25, **kw})), imgs,
                   {"shard_size": 6}),
        "features": (lambda **kw: features.run(_features_cfg(imgs, enc, feats, **kw), rt=Runtime()), feats,
                     {"batch_size": 3}),
        "train_classifier": (lambda **kw: classifier.run(classifier.Config(images=imgs, out=tmp_path / "clf",
                                                                           min_val_accuracy=0.0, **kw)),
                             tmp_path / "clf", {"c": 2.0}),
        "train_dit": (lambda **kw: train_dit.run(_dit_cfg(make_latents_artifact(tmp_path / "lat")
                                                          if not (tmp_path / "lat").exists() else tmp_path / "lat",
                                                          tmp_path / "dit", steps=2, **kw)),
                      tmp_path / "dit", {"lr": 2e-3}),
    }


@pytest.mark.parametrize("stage", ["images", "features", "train_classifier",
                                   pytest.param("train_dit", marks=pytest.mark.slow)])
def test_rerun_with_another_config_is_refused_before_any_work(request, tmp_path, stage):
    run, out, change = _mismatch_cases(request, tmp_path)[stage]
    run()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    key, value = next(iter(change.items()))
    with pytest.raises(ConfigMismatch, match=rf"{key}: .* -> {value}.*--overwrite"):
        run(**change)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    assert run().complete  # the original config is still a no-op


def test_a_moved_artifact_is_still_complete(request, tmp_path):
    run, out, _ = _mismatch_cases(request, tmp_path)["train_classifier"]
    m = run()
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    again = classifier.run(classifier.Config(images=request.getfixturevalue("images_artifact"), out=moved,
                                             min_val_accuracy=0.0))
    assert again.fingerprint == m.fingerprint


def test_half_written_vae_state_is_named(tmp_path):
    import dataclasses

    import stages.train_vae as tv

    feats, _ = make_features_artifact(tmp_path / "feat")
    cfg = dataclasses.replace(_vae_cfg(feats, tmp_path / "vae"), epochs=2, max_steps_this_run=2)
    assert tv.run(cfg, rt=Runtime()) is None  # stopped after 2 of 2 x 2 updates; the step-2 checkpoint kept
    weights = tmp_path / "vae" / "checkpoints" / "000000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="000000002: unreadable checkpoint.*no older readable"):
        tv.run(dataclasses.replace(cfg, max_steps_this_run=None), rt=Runtime())


def test_streamed_training_reads_refuse_exactly_the_corrupted_view(tmp_path, images_artifact, encoder_dir):
    """Features too big for RAM are streamed one view at a time (only the bytes used are read): the view holding the
    flipped value fails its block checksum with the repair message, another view of the same sample reads fine."""
    from pipeline.train_data import FeatureData

    feats = tmp_path / "feat"
    m = features.run(_features_cfg(images_artifact, encoder_dir, feats), rt=Runtime())
    rec = m.shards[0]
    assert rec["split"] == "train"
    _nan_in_place(feats / rec["name"], rec["first_key"])  # in view 0 of the shard's first sample
    data = FeatureData(feats, seed=0, cache_bytes=0, num_workers=1)
    assert data.cache is None and data.views > 1
    with pytest.raises(ArtifactError, match=rf"{rec['name']}: sample {rec['first_key']} member feat.npy fails its "
                                            rf"checksum.*delete {rec['name']}.*re-run the stage"):
        data.shards.get(0, "train", view=0)
    key, _, intact = data.shards.get(0, "train", view=data.views - 1)
    assert key == rec["first_key"] and np.isfinite(intact.astype(np.float32)).all()
    # and the training stream, walked over enough epochs to visit that view, stops on it rather than training on it
    samples, views = data.order.lookup(range(data.num_train * 50))
    hit = int(np.flatnonzero((samples == 0) & (views == 0))[0])
    with pytest.raises(ArtifactError, match="fails its checksum"):
        data.batch(range(hit, hit + 1))
