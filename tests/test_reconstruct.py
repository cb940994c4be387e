"""`flatdino reconstruct`: originals / RAE / FlatDINO npz files against independent computations, world-size
independence, grid, and refusal of mismatched artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.encoder import PixelDecoder, adm_center_crop, init_rae_dir, load_rae, pil_to_uint8
from pipeline.manifest import ArtifactError, read_manifest
from pipeline.runtime import Runtime
from pipeline.shards import FeatureShards, ImageShards, load_rgb
from stages import reconstruct as rc
from test_sample import make_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, encoder_dir):
    return make_vae(tmp_path_factory.mktemp("vae") / "run", encoder_dir)


def _cfg(images_artifact, features_artifact, vae_dir, encoder_dir, out, **kw) -> rc.Config:
    base = dict(images=images_artifact, features=features_artifact, vae=vae_dir, decoder=str(encoder_dir), out=out,
                split="val", limit=5, chunk_size=2, batch_size=2, grid_samples=3, device="cpu")
    return rc.Config(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images_artifact, features_artifact, vae_dir, encoder_dir):
    out = tmp_path_factory.mktemp("recon") / "ref"
    rc.run(_cfg(images_artifact, features_artifact, vae_dir, encoder_dir, out), rt=Runtime())
    return out


def test_outputs_match_independent_computations(reference, images_artifact, features_artifact, vae_dir, encoder_dir):
    from pipeline.artifacts import load_flatdino

    feats = FeatureShards(features_artifact)
    images = ImageShards(images_artifact)
    by_key = {key: (cls, data) for _, key, cls, data, _ in images.iter("val")}
    vae, _, _ = load_flatdino(vae_dir)
    dec = PixelDecoder(load_rae(encoder_dir))
    want = {"originals": [], "rae": [], "flatdino": [], "labels": []}
    with torch.no_grad():
        for _, key, cls, f in feats.iter("val", 0, 5):
            tokens = torch.from_numpy(f[:1].astype(np.float32))  # view 0, (1, N, D)
            want["originals"].append(pil_to_uint8(adm_center_crop(load_rgb(by_key[key][1]))).permute(1, 2, 0).numpy())
            want["rae"].append(dec.to_uint8(dec(tokens))[0].numpy())
            want["flatdino"].append(dec.to_uint8(dec(vae.decode(vae.encode(tokens).mu)))[0].numpy())
            want["labels"].append(cls)
    for name in rc.OUTPUTS:
        with np.load(reference / f"{name}.npz") as z:
            assert z["arr_0"].shape == (5, 256, 256, 3) and z["arr_0"].dtype == np.uint8
            np.testing.assert_array_equal(z["arr_1"], want["labels"])
            diff = np.abs(z["arr_0"].astype(int) - np.stack(want[name]).astype(int))
            assert diff.max() <= 1 and (diff == 0).mean() > 0.999, name  # batch of 2 vs 1: float order only
    m = read_manifest(reference)
    orig = np.stack(want["originals"]).astype(np.float64)
    for name in ("rae", "flatdino"):
        mse = ((np.stack(want[name]) - orig) ** 2).reshape(5, -1).mean(1)
        assert m.extra[f"psnr_{name}"] == pytest.approx(np.mean(10 * np.log10(255**2 / mse)), abs=0.05)
    assert Image.open(reference / rc.GRID).size == (3 * 130 + 2, 3 * 130 + 2)  # 3 rows x 3 images of 128 px


def test_world_size_does_not_change_outputs(reference, images_artifact, features_artifact, vae_dir, encoder_dir,
                                            tmp_path):
    cfg = _cfg(images_artifact, features_artifact, vae_dir, encoder_dir, tmp_path / "w2")
    assert rc.run(cfg, rt=Runtime(0, 2)) is None  # chunk 1 (rank 1's) still missing
    assert rc.run(cfg, rt=Runtime(1, 2)) is None
    m = rc.run(cfg, rt=Runtime(0, 2))
    for name in rc.OUTPUTS:
        assert (cfg.out / f"{name}.npz").read_bytes() == (reference / f"{name}.npz").read_bytes()
    assert m.extra["psnr_flatdino"] == read_manifest(reference).extra["psnr_flatdino"]


def test_refuses_a_decoder_of_another_encoder(images_artifact, features_artifact, vae_dir, tmp_path):
    other = init_rae_dir(tmp_path / "enc2", "tiny", seed=7)
    with pytest.raises(ArtifactError, match="belongs to encoder"):
        rc.run(_cfg(images_artifact, features_artifact, vae_dir, other, tmp_path / "r"), rt=Runtime())


def test_refuses_a_vae_of_another_encoder(images_artifact, features_artifact, encoder_dir, tmp_path):
    other_enc = init_rae_dir(tmp_path / "enc3", "tiny", seed=8)
    vae = make_vae(tmp_path / "vae3", other_enc)
    with pytest.raises(ArtifactError, match="trained on features of encoder"):
        rc.run(_cfg(images_artifact, features_artifact, vae, encoder_dir, tmp_path / "r"), rt=Runtime())
