"""The released RAE layout through the whole chain, offline: images -> features -> train-vae -> latents -> train-dit
-> train-decoder --steps 0 -> sample, plus reconstruct and fid-ref/fid with the same directory.

The encoder directory is laid out as `nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08` (tests/release_layout.py: the
conversion script's config.json, DINOv2 weights under the transformers < 5.18 names), at the demo's small shapes
with random weights; the images are real photos of mixed sizes and colour modes. The training stages get only
their basic Config fields (their other knobs are being reworked).
"""

from __future__ import annotations

import numpy as np
import pytest

from models.encoder import FeatureEncoder, PixelDecoder, load_rae
from pipeline.manifest import read_manifest
from pipeline.shards import FeatureShards, ImageShards
from release_layout import write_photo_folder, write_release_dir
from stages import features, fid, images, latents, reconstruct, sample, train_decoder, train_dit, train_vae

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("release_chain")
    encoder, _ = write_release_dir(root / "RAE-dinov2-wReg-base-ViTXL-n08", "demo", seed=11)
    out = {"root": root, "encoder": encoder, "images": root / "images", "features": root / "features",
           "vae": root / "vae", "latents": root / "latents", "dit": root / "dit", "decoder": root / "decoder",
           "samples": root / "samples"}
    images.run(images.Config(out=out["images"], source=str(write_photo_folder(root / "photos")), shard_size=5,
                             val_fraction=0.25))
    features.run(features.Config(images=out["images"], encoder=str(encoder), out=out["features"], views=2,
                                 batch_size=4, num_workers=1, device="cpu"))
    train_vae.run(train_vae.Config(features=out["features"], out=out["vae"], preset="demo", variant="demo", steps=2,
                                   global_batch=6, micro_batch=3))
    latents.run(latents.Config(features=out["features"], vae=out["vae"], out=out["latents"], shard_samples=4,
                               device="cpu"))
    train_dit.run(train_dit.Config(latents=out["latents"], out=out["dit"], preset="T", steps=2, global_batch=8))
    train_decoder.run(train_decoder.Config(images=out["images"], features=out["features"], encoder=str(encoder),
                                           out=out["decoder"], steps=0))
    sample.run(sample.Config(dit=out["dit"], vae=out["vae"], decoder=str(out["decoder"]), out=out["samples"],
                             per_class=2, steps=4, cfg_scale=1.5, device="cpu"))
    return out


def test_every_stage_completes_on_real_photos_of_mixed_modes(chain):
    art = ImageShards(chain["images"])
    assert art.classes == ["china", "flower", "mixed"] and art.manifest.counts["failed"] == 0
    feats = FeatureShards(chain["features"])
    assert feats.manifest.counts == {"written": 12, "skipped": 0, "failed": 0}
    assert (feats.views, feats.num_patches, feats.dim) == (2, 64, 192)
    for name in ("vae", "latents", "dit", "decoder", "samples"):
        assert read_manifest(chain[name]).complete, name


def test_the_release_directory_and_its_repackaging_are_one_encoder(chain):
    release = load_rae(chain["encoder"])
    packaged = load_rae(chain["decoder"])  # train-decoder --steps 0 wrote it with the installed libraries
    fp = FeatureEncoder(release).fingerprint
    assert FeatureShards(chain["features"]).encoder_fingerprint == fp == FeatureEncoder(packaged).fingerprint
    assert PixelDecoder(packaged).fingerprint == PixelDecoder(release).fingerprint  # the decoder, unchanged
    assert read_manifest(chain["vae"]).extra["encoder"]["fingerprint"] == fp
    decoder_record = read_manifest(chain["samples"]).models["decoder"]
    assert decoder_record["encoder_fingerprint"] == fp
    assert decoder_record["fingerprint"] == PixelDecoder(release).fingerprint


def test_samples_are_class_balanced_uint8_images(chain):
    with np.load(chain["samples"] / "samples.npz") as z:
        x, y = z["arr_0"], z["arr_1"]
    assert x.dtype == np.uint8 and x.shape == (6, 256, 256, 3) and np.array_equal(y, [0, 0, 1, 1, 2, 2])
    assert x.std() > 0


def test_reconstruct_and_fid_load_the_release_directory_too(chain):
    rec = reconstruct.run(reconstruct.Config(images=chain["images"], features=chain["features"], vae=chain["vae"],
                                             decoder=str(chain["encoder"]), out=chain["root"] / "rec",
                                             device="cpu"))
    assert rec.complete and rec.models["decoder"]["fingerprint"] == PixelDecoder(load_rae(chain["encoder"])).fingerprint
    ref = fid.run_ref(fid.RefConfig(images=chain["images"], out=chain["root"] / "ref", encoder=str(chain["encoder"]),
                                    block_size=4, device="cpu"))
    m = fid.run(fid.Config(samples=chain["samples"], reference=chain["root"] / "ref", out=chain["root"] / "fid",
                           encoder=str(chain["decoder"]), block_size=4, device="cpu"))  # the other layout: accepted
    assert ref.complete and m.extra["metrics"]["fd_dinov2"]["value"] > 0
    assert m.extra["protocol"]["encoder"]["fingerprint"] == FeatureEncoder(load_rae(chain["encoder"])).fingerprint
    assert "Inception weights not found" in m.extra["metrics"]["fid"]["reason"]  # offline: n/a, said at once
