"""images and features stages: exact preprocessing, parity with transformers, resume, world size, bad input."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.encoder import FeatureEncoder, PixelDecoder, adm_center_crop, load_rae, pil_to_uint8, rae_checkpoint_filter
from pipeline.manifest import ArtifactError, ConfigMismatch, TooManyFailures
from pipeline.shards import load_rgb  # noqa: E402
from pipeline.runtime import Runtime
from pipeline.shards import FeatureShards, ImageShards, decode_npy, read_tar_shard, write_tar_shard
from stages import features, images
from conftest import make_image_folder


def adm_reference(pil: Image.Image, size: int = 256) -> np.ndarray:
    """guided-diffusion's centre crop, written independently: numpy slicing after PIL BOX/BICUBIC resizes."""
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.array(pil)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y : y + size, x : x + size]


@pytest.mark.parametrize("wh", [(256, 256), (320, 240), (240, 320), (513, 700), (1030, 520), (2000, 2000), (64, 48)])
def test_adm_center_crop_matches_reference(wh):
    rng = np.random.default_rng(sum(wh))
    pil = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    ours = np.array(adm_center_crop(pil))
    assert ours.shape == (256, 256, 3)
    np.testing.assert_array_equal(ours, adm_reference(pil))


def test_adm_crop_of_a_256_square_is_the_identity():
    arr = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.array(adm_center_crop(Image.fromarray(arr))), arr)


def test_images_artifact_keeps_bytes_and_classes(images_artifact, image_folder):
    art = ImageShards(images_artifact)
    assert art.classes == ["cat", "dog", "fish"]
    assert art.num_samples("train") + art.num_samples("val") == 24 and art.num_samples("val") == 6
    keys = []
    for split in ("train", "val"):
        for pos, key, cls, data, ext in art.iter(split):
            keys.append(key)
            rec = next(s for s in read_tar_shard(images_artifact / next(
                r["name"] for r in art.shards(split) if r["first_key"] <= key <= r["last_key"])) if s["__key__"] == key)
            src = image_folder / rec["src"].decode()  # relative to --source
            assert src.read_bytes() == data, "original bytes must be kept"
            assert art.classes[cls] == src.parent.name
    assert len(set(keys)) == 24
    assert json.loads((images_artifact / "classes.json").read_text()) == art.classes


def test_digits_source_is_real_and_recoverable(tmp_path):
    from sklearn.datasets import load_digits

    m = images.run(images.Config(out=tmp_path / "d", source="digits", shard_size=1000, val_fraction=0.1))
    assert m.counts == {"written": 1797, "skipped": 0, "failed": 0} and m.extra["splits"] == {"train": 1617, "val": 180}
    art = ImageShards(tmp_path / "d")
    digits = load_digits()
    _, key, cls, data, ext = next(art.iter("val"))
    im = np.asarray(load_rgb(data))[..., 0].astype(np.float64)
    small = im.reshape(8, 32, 8, 32).mean(axis=(1, 3))  # nearest upscale -> exact block average
    matches = [i for i in range(1797) if np.array_equal(np.round(digits.images[i] * 255 / 16), small)]
    assert matches and digits.target[matches[0]] == cls


def test_corrupt_and_non_image_files_are_skipped_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "src", per_class=3)
    (root / "cat" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "dog" / "notes.txt").write_text("hello")
    with pytest.raises(TooManyFailures, match="2 of 11"):
        images.run(images.Config(out=tmp_path / "a", source=str(root), shard_size=4))
    m = images.run(images.Config(out=tmp_path / "b", source=str(root), shard_size=4, max_failed_fraction=0.5))
    assert m.counts["failed"] == 2 and m.counts["written"] == 9
    assert {f["src"].split("/")[-1] for f in m.failures} == {"broken.JPEG", "notes.txt"}
    assert all(f["reason"] for f in m.failures)


def _independent_features(encoder_dir, image_bytes: bytes, flip: bool) -> torch.Tensor:
    """transformers' Dinov2WithRegistersModel called directly, with torchvision preprocessing."""
    from safetensors.torch import load_file
    from torchvision.transforms.v2 import functional as TF
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    rae_cfg = json.loads((encoder_dir / "config.json").read_text())
    cfg = Dinov2WithRegistersConfig(hidden_size=rae_cfg["encoder_hidden_size"], patch_size=14, image_size=518,
                                    num_attention_heads=rae_cfg["encoder_hidden_size"] // 64,
                                    num_hidden_layers=rae_cfg["encoder_num_hidden_layers"])
    model = Dinov2WithRegistersModel(cfg).eval()
    state = {k[len("encoder."):]: v for k, v in load_file(encoder_dir / "diffusion_pytorch_model.safetensors").items()
             if k.startswith("encoder.")}
    state["layernorm.weight"] = torch.ones(cfg.hidden_size)  # affine-free final LN == unit scale, zero shift
    state["layernorm.bias"] = torch.zeros(cfg.hidden_size)
    model.load_state_dict(state, strict=True)
    pil = adm_reference(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    x = torch.from_numpy(pil.copy()).permute(2, 0, 1)[None].float() / 255
    x = x.flip(-1) if flip else x
    x = TF.resize(x, [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state[0, 1 + cfg.num_register_tokens :]


def test_features_match_transformers_dinov2_directly(features_artifact, images_artifact, encoder_dir):
    feats = FeatureShards(features_artifact)
    imgs = {key: data for _, key, _, data, _ in ImageShards(images_artifact).iter("train")}
    assert feats.views == 2 and feats.num_patches == 256 and feats.dim == 192
    for i in (0, 7):
        key, cls, f = feats.get(i)
        assert f.dtype == np.float16 and f.shape == (2, 256, 192)
        for view in (0, 1):
            ref = _independent_features(encoder_dir, imgs[key], flip=bool(view))
            np.testing.assert_allclose(f[view].astype(np.float32), ref.numpy(), atol=2e-2, rtol=4e-3)
        # affine-free LN: every stored token is standardised over its channels
        np.testing.assert_allclose(f[0].astype(np.float32).mean(-1), 0, atol=2e-3)
        np.testing.assert_allclose(f[0].astype(np.float32).std(-1), 1, atol=2e-3)


def test_features_random_access_equals_streaming(features_artifact):
    feats = FeatureShards(features_artifact)
    for pos, key, cls, f in feats.iter("val"):
        k2, c2, f2 = feats.get(pos, "val")
        assert (k2, c2) == (key, cls) and np.array_equal(f, f2)


def _shard_hashes(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.tar"))}


def _cfg(images_artifact, encoder_dir, out, **kw):
    return features.Config(images=images_artifact, encoder=str(encoder_dir), out=out, views=2, batch_size=4,
                           num_workers=2, **kw)


def test_kill_and_resume_gives_identical_bytes(tmp_path, monkeypatch, features_artifact, images_artifact, encoder_dir):
    real = features.write_tar_shard
    calls = {"n": 0}

    def dying(path, samples):
        calls["n"] += 1
        if calls["n"] == 3:  # die in the middle of the third shard, after a partial .tmp is on disk
            it = iter(samples)
            next(it)
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise KeyboardInterrupt("simulated kill")
        return real(path, samples)

    monkeypatch.setattr(features, "write_tar_shard", dying)
    out = tmp_path / "f"
    with pytest.raises(KeyboardInterrupt):
        features.run(_cfg(images_artifact, encoder_dir, out), rt=Runtime())
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(features, "write_tar_shard", real)
    m = features.run(_cfg(images_artifact, encoder_dir, out), rt=Runtime())
    assert m.complete and _shard_hashes(out) == _shard_hashes(features_artifact)
    assert m.fingerprint == FeatureShards(features_artifact).manifest.fingerprint


def test_two_ranks_give_the_same_bytes_as_one(tmp_path, features_artifact, images_artifact, encoder_dir):
    out = tmp_path / "f2"
    assert features.run(_cfg(images_artifact, encoder_dir, out), rt=Runtime(0, 2)) is None  # rank 1 not done yet
    assert features.run(_cfg(images_artifact, encoder_dir, out), rt=Runtime(1, 2)) is None
    m = features.run(_cfg(images_artifact, encoder_dir, out), rt=Runtime())  # nothing left: only the manifest
    assert m.complete and _shard_hashes(out) == _shard_hashes(features_artifact)


def test_mismatched_rerun_and_wrong_encoder_refused_before_work(tmp_path, features_artifact, images_artifact, encoder_dir):
    before = _shard_hashes(features_artifact)
    with pytest.raises(ConfigMismatch, match="views: 2 -> 1"):
        features.run(features.Config(images=images_artifact, encoder=str(encoder_dir), out=features_artifact,
                                     views=1, batch_size=4), rt=Runtime())
    with pytest.raises(ConfigMismatch, match="resize: 'flatdino' -> 'rae'"):
        features.run(_cfg(images_artifact, encoder_dir, features_artifact, resize="rae"), rt=Runtime())
    assert _shard_hashes(features_artifact) == before
    with pytest.raises(ArtifactError, match="not a hub id|no such directory"):
        features.run(_cfg(images_artifact, tmp_path / "nope", tmp_path / "x"), rt=Runtime())
    with pytest.raises(ArtifactError, match="no images artifact"):
        features.run(_cfg(tmp_path / "noimg", encoder_dir, tmp_path / "y"), rt=Runtime())


def test_rerun_of_a_finished_stage_is_a_noop(features_artifact, images_artifact, encoder_dir):
    mtime = (features_artifact / "manifest.json").stat().st_mtime_ns
    m = features.run(features.Config(images=images_artifact, encoder=str(encoder_dir), out=features_artifact,
                                     views=2, batch_size=4, num_workers=1), rt=Runtime())  # runtime knob differs: fine
    assert m.complete and (features_artifact / "manifest.json").stat().st_mtime_ns == mtime


def test_corrupt_image_inside_a_shard_is_skipped_and_counted(tmp_path, images_artifact, encoder_dir):
    import shutil

    art = tmp_path / "img"
    shutil.copytree(images_artifact, art)
    name = ImageShards(art).shards("train")[0]["name"]
    samples = list(read_tar_shard(art / name))
    bad_key = samples[1]["__key__"]
    ext = next(e for e in samples[1] if e in ("jpg", "png"))
    samples[1][ext] = b"garbage"  # an images artifact that holds an undecodable image (e.g. adopted from tars)
    rec = write_tar_shard(art / name, samples)
    manifest = json.loads((art / "manifest.json").read_text())
    for s in manifest["shards"]:
        if s["name"] == name:
            s.update(bytes=rec["bytes"], sha256=rec["sha256"])
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TooManyFailures, match=bad_key):
        features.run(_cfg(art, encoder_dir, tmp_path / "f"), rt=Runtime())
    m = features.run(_cfg(art, encoder_dir, tmp_path / "g", max_failed_fraction=0.1), rt=Runtime())
    assert m.counts["failed"] == 1 and m.failures[0]["key"] == bad_key and m.counts["written"] == 23
    assert bad_key not in {k for _, k, _, _ in FeatureShards(tmp_path / "g").iter("train")}


def test_pixel_decoder_unpatchify_and_uint8_against_independent_math(encoder_dir):
    rae = load_rae(encoder_dir)
    dec = PixelDecoder(rae)
    tokens = torch.randn(2, 256, 192)
    logits = rae.decoder(tokens).logits  # (B, 256, 16*16*3)
    # independent unpatchify: patch (i, j) holds a (p, p, c) block in row-major order
    ref = logits.reshape(2, 16, 16, 16, 16, 3).permute(0, 5, 1, 3, 2, 4).reshape(2, 3, 256, 256)
    out = dec(tokens)
    torch.testing.assert_close(out, ref)
    u8 = dec.to_uint8(out).numpy()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expect = np.floor(np.clip(ref.permute(0, 2, 3, 1).double().numpy() * std + mean, 0, 1) * 255 + 0.5)
    assert np.abs(u8.astype(int) - expect).max() <= 1 and (u8 == expect).mean() > 0.999


def test_strict_loading_rejects_a_wrong_checkpoint(tmp_path, encoder_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(encoder_dir, bad)
    state = load_file(bad / "diffusion_pytorch_model.safetensors")
    state.pop(next(k for k in state if k.startswith("decoder.decoder_layers")))
    save_file(state, bad / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ArtifactError, match="do not match"):
        load_rae(bad)
    assert "decoder.decoder_pos_embed" not in rae_checkpoint_filter({"decoder.decoder_pos_embed": torch.zeros(1)})


def test_encoder_drops_cls_and_registers_by_name(encoder_dir):
    enc = FeatureEncoder(load_rae(encoder_dir))
    x = pil_to_uint8(Image.new("RGB", (256, 256), (10, 200, 30)))[None]
    tok = enc.encode_images(x)
    full = enc.model(pixel_values=enc.preprocess(x)).last_hidden_state
    assert enc.num_registers == 4 and tok.patches.shape == (1, 256, 192)
    torch.testing.assert_close(tok.cls, full[:, 0])
    torch.testing.assert_close(tok.registers, full[:, 1:5])
    torch.testing.assert_close(tok.patches, full[:, 5:])
    # the resize is antialiased: differs from the plain bicubic diffusers uses
    plain = F.interpolate(x.float() / 255, size=(224, 224), mode="bicubic", align_corners=False)
    assert enc.preprocess(x).shape == plain.shape
