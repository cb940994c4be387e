"""train-decoder: pixel-decoder conventions against independent computations, LPIPS loading, the data join, schedules,
and the stage end to end (outputs loadable by load_rae, no-op re-run, refusal, bit-exact resume)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.encoder import (IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_NAME, FeatureEncoder, PixelDecoder, build_rae,
                            init_rae_dir, load_rae)
from pipeline.manifest import ArtifactError, ConfigMismatch, UserError
from pipeline.shards import FeatureShards, ImageShards
from conftest import Killed
from pipeline.image_metrics import LPIPS
from pipeline.shards import PairData
from stages import train_decoder as td
from test_image_metrics import lpips_file


# ------------------------------------------------------------------------------------- decoder output conventions


def test_unpatchify_matches_an_explicit_loop():
    rae = build_rae("tiny")
    dec = PixelDecoder(rae)
    p, g = 16, 16
    logits = torch.randn(2, g * g, p * p * 3)
    got = dec.decoder.unpatchify(logits).numpy()  # (2, 3, 256, 256)
    want = np.zeros((2, 3, g * p, g * p), np.float32)
    lg = logits.numpy()
    for b in range(2):
        for i in range(g):
            for j in range(g):
                patch = lg[b, i * g + j].reshape(p, p, 3)  # (row-in-patch, col-in-patch, channel)
                want[b, :, i * p : (i + 1) * p, j * p : (j + 1) * p] = patch.transpose(2, 0, 1)
    np.testing.assert_array_equal(got, want)


def test_to_uint8_denormalises_clips_and_rounds_half_up():
    dec = PixelDecoder(build_rae("tiny"))
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1.5, size=(2, 3, 8, 8)).astype(np.float32)
    mean, std = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1), np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    want = np.floor(np.clip(x.astype(np.float64) * std + mean, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    got = dec.to_uint8(torch.from_numpy(x)).numpy()
    assert got.shape == (2, 8, 8, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float32 vs float64 at exact .5 boundaries
    assert (got == want).mean() > 0.99
    assert got.min() == 0 and got.max() == 255  # clipping happened


def test_to_normalized_pixels_inverts_to_uint8():
    dec = PixelDecoder(build_rae("tiny"))
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    np.testing.assert_array_equal(dec.to_uint8(td.to_normalized_pixels(x)).numpy(), x.permute(0, 2, 3, 1).numpy())


# ------------------------------------------------------------------------------------------------ strict loading


def test_load_rae_rejects_a_checkpoint_that_does_not_match_its_config(tmp_path, encoder_dir):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((Path(encoder_dir) / "config.json").read_text())
    state = load_file(Path(encoder_dir) / WEIGHTS_NAME)
    state.pop("decoder.decoder_pred.bias")
    save_file(state, bad / WEIGHTS_NAME)
    with pytest.raises(ArtifactError, match="do not match"):
        load_rae(bad)
    # a decoder of another width under the same config is rejected too
    other = build_rae("tiny", decoder_hidden_size=64, decoder_num_attention_heads=2)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, bad / WEIGHTS_NAME)
    with pytest.raises(ArtifactError, match="do not match"):
        load_rae(bad)


def test_build_decoder_rae_keeps_the_encoder_and_changes_the_decoder(encoder_dir):
    source = load_rae(encoder_dir)
    rae = td.build_decoder_rae(str(encoder_dir), "small", seed=3)
    assert FeatureEncoder(rae).fingerprint == FeatureEncoder(source).fingerprint
    assert rae.config.decoder_hidden_size == td.DECODER_SIZES["small"]["decoder_hidden_size"]
    assert all(p.requires_grad for p in rae.decoder.parameters())
    assert not any(p.requires_grad for p in rae.encoder.parameters())
    again = td.build_decoder_rae(str(encoder_dir), "small", seed=3)
    assert PixelDecoder(again).fingerprint == PixelDecoder(rae).fingerprint  # seeded init
    same = td.build_decoder_rae(str(encoder_dir), "same", seed=3)
    assert PixelDecoder(same).fingerprint == PixelDecoder(source).fingerprint  # fine-tuning starts from the file


# ----------------------------------------------------------------------------------------------------------- LPIPS


def test_lpips_modes(tmp_path, caplog):
    base = td.Config(images=Path("i"), features=Path("f"), encoder="e", out=Path("o"))
    assert td.maybe_lpips(replace(base, lpips="off", lpips_weights=tmp_path / "x")) is None
    with pytest.raises(UserError, match="--lpips on needs --lpips-weights"):
        td.maybe_lpips(replace(base, lpips="on"))
    assert td.maybe_lpips(replace(base, lpips="auto")) is None
    assert isinstance(td.maybe_lpips(replace(base, lpips="on", lpips_weights=lpips_file(tmp_path))), LPIPS)


# -------------------------------------------------------------------------------------- augmentation and schedules


def test_feature_noise_draws_one_sigma_per_sample_within_tau():
    """RAE's noise augmentation: tokens + sigma * eps with sigma ~ U[0, tau] per sample, a function of (seed, step)."""
    cfg = replace(td.resolve(td.Config(images=Path("i"), features=Path("f"), encoder="e", out=Path("o"),
                                       preset="demo")), batch_size=64, noise_tau=0.5)
    d = td.draw_noise(cfg, 0, (256, 32), torch.device("cpu"))
    y = d["sigma"] * d["eps"]
    sigma = y.flatten(1).std(1)
    assert sigma.max() < 0.5 * 1.05 and sigma.min() >= 0
    assert abs(sigma.mean().item() - 0.25) < 0.05  # E[U(0, tau)] = tau / 2
    again = td.draw_noise(cfg, 0, (256, 32), torch.device("cpu"))
    assert torch.equal(again["eps"], d["eps"]) and not torch.equal(td.draw_noise(cfg, 1, (256, 32), "cpu")["eps"],
                                                                    d["eps"])
    assert td.draw_noise(replace(cfg, noise_tau=0.0), 0, (256, 32), "cpu") == {}


def test_batch_rows_walk_seeded_epoch_permutations():
    n, b = 10, 4
    rows = [r for s in range(5) for r in td.batch_rows(s, b, n, seed=1)]  # 20 rows = 2 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert rows[:10] != rows[10:]
    assert td.batch_rows(3, b, n, seed=1) == rows[12:16]  # any step can be recomputed alone (resume)
    assert td.batch_rows(0, b, n, seed=2) != rows[:4]


def test_lr_schedule_boundaries():
    cfg = td.resolve(td.Config(images=Path("i"), features=Path("f"), encoder="e", out=Path("o"), steps=100, lr=1.0,
                               warmup_steps=10, preset="demo"))
    assert td.lr_at(0, cfg) == pytest.approx(0.1)
    assert td.lr_at(9, cfg) == pytest.approx(1.0)
    assert td.lr_at(10, cfg) == pytest.approx(1.0)
    assert td.lr_at(55, cfg) == pytest.approx(0.55)
    assert td.lr_at(100, cfg) == pytest.approx(td.MIN_LR_FRACTION)


def test_resolve_fills_only_unset_knobs():
    cfg = td.resolve(td.Config(images=Path("i"), features=Path("f"), encoder="e", out=Path("o"), steps=7,
                               preset="demo"))
    assert cfg.steps == 7 and cfg.batch_size == td.PRESETS["demo"].batch_size
    assert td.resolve(replace(cfg, preset="rae")).decoder_size == "tiny"  # already resolved: kept
    assert td.resolve(td.Config(images=Path("i"), features=Path("f"), encoder="e", out=Path("o"))).noise_tau == 0.8
    with pytest.raises(UserError):
        td.resolve(replace(cfg, steps=-1))
    with pytest.raises(UserError, match="decoder-size same"):
        td.resolve(replace(cfg, steps=0))


# ------------------------------------------------------------------------------------------------------ data join


def test_pair_data_joins_features_and_flipped_targets(images_artifact, features_artifact):
    images, feats = ImageShards(images_artifact), FeatureShards(features_artifact)
    data = PairData(images, feats, "train", cache_bytes=1 << 30)
    assert len(data) == 2 * feats.num_samples("train")
    f, x = data.rows([0, 1, 4])
    key, _, want = feats.get(0, "train")
    np.testing.assert_array_equal(f[0].numpy(), want[0].astype(np.float32))
    np.testing.assert_array_equal(f[1].numpy(), want[1].astype(np.float32))
    torch.testing.assert_close(x[1], x[0].flip(-1))
    # the target is the ADM crop of the image with the same key
    pos = next(p for p, k, *_ in images.iter("train") if k == key)
    _, _, _, data_bytes, _ = next(images.iter("train", pos, pos + 1))
    from models.encoder import adm_center_crop, pil_to_uint8

    torch.testing.assert_close(x[0], pil_to_uint8(adm_center_crop(Image.open(io.BytesIO(data_bytes)).convert("RGB"))))


# ---------------------------------------------------------------------------------------------------- whole stage


def _cfg(images_artifact, features_artifact, encoder_dir, out, **kw) -> td.Config:
    base = dict(images=images_artifact, features=features_artifact, encoder=str(encoder_dir), out=out, steps=6,
                preset="demo", batch_size=4, eval_every=3, ckpt_every=2, eval_samples=4, grid_samples=3,
                lpips="off")
    return td.Config(**{**base, **kw})


def test_stage_writes_a_loadable_rae_dir_and_is_idempotent(tmp_path, images_artifact, features_artifact, encoder_dir):
    cfg = _cfg(images_artifact, features_artifact, encoder_dir, tmp_path / "dec")
    m = td.run(cfg)
    assert m.complete and m.stage == "train_decoder"
    rae = load_rae(cfg.out)
    assert FeatureEncoder(rae).fingerprint == m.extra["encoder_fingerprint"] == FeatureShards(
        features_artifact).encoder_fingerprint
    start = PixelDecoder(load_rae(encoder_dir)).fingerprint
    assert PixelDecoder(rae).fingerprint == m.extra["decoder_fingerprint"] != start
    assert [h["step"] for h in m.extra["history"]] == [3, 6]
    assert (cfg.out / "grids" / "final.png").exists() and (cfg.out / "grids" / "step-0000003.png").exists()
    assert any((cfg.out / "tb").iterdir())
    before = (cfg.out / WEIGHTS_NAME).read_bytes()
    assert td.run(cfg).fingerprint == m.fingerprint  # no-op
    assert (cfg.out / WEIGHTS_NAME).read_bytes() == before
    with pytest.raises(ConfigMismatch):
        td.run(replace(cfg, lr=5e-4))


def test_resume_after_a_crash_is_bit_exact(tmp_path, images_artifact, features_artifact, encoder_dir, crash_at):
    clean = td.run(_cfg(images_artifact, features_artifact, encoder_dir, tmp_path / "clean"))
    cfg = _cfg(images_artifact, features_artifact, encoder_dir, tmp_path / "crash")
    disarm = crash_at(3)  # after the step-2 checkpoint, inside step 4
    with pytest.raises(Killed):
        td.run(cfg)
    assert not (cfg.out / "manifest.json").exists()
    disarm()
    resumed = td.run(cfg)
    assert (cfg.out / WEIGHTS_NAME).read_bytes() == (tmp_path / "clean" / WEIGHTS_NAME).read_bytes()
    assert resumed.extra["decoder_fingerprint"] == clean.extra["decoder_fingerprint"]


def test_zero_steps_packages_the_encoder_dirs_decoder(tmp_path, images_artifact, features_artifact, encoder_dir):
    m = td.run(_cfg(images_artifact, features_artifact, encoder_dir, tmp_path / "dec", steps=0, decoder_size="same"))
    assert m.extra["decoder_fingerprint"] == PixelDecoder(load_rae(encoder_dir)).fingerprint
    assert m.extra["history"] == [] and m.extra["final"]["eval_images"] == 4


def test_stage_refuses_features_of_another_encoder(tmp_path, images_artifact, features_artifact):
    other = init_rae_dir(tmp_path / "other", "tiny", seed=1)
    with pytest.raises(ArtifactError, match="pass the RAE directory the features were made with"):
        td.run(_cfg(images_artifact, features_artifact, other, tmp_path / "dec"))


def test_lpips_on_without_weights_is_refused_before_work(tmp_path, images_artifact, features_artifact, encoder_dir):
    with pytest.raises(UserError, match="--lpips-weights"):
        td.run(_cfg(images_artifact, features_artifact, encoder_dir, tmp_path / "dec", lpips="on"))
    assert not (tmp_path / "dec").exists()


# --------------------------------------------------------------------------------------------- learning (digits)


@pytest.mark.slow
def test_tiny_decoder_learns_the_digits(tmp_path, encoder_dir):
    """A few hundred steps on 300 upscaled digits: val PSNR far above the mean-image baseline."""
    from sklearn.datasets import load_digits

    from stages import features, images

    digits = load_digits()
    root = tmp_path / "digits"
    for i in range(300):
        d = root / str(digits.target[i])
        d.mkdir(parents=True, exist_ok=True)
        px = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(px).resize((256, 256), Image.NEAREST).save(d / f"{i:04d}.png")
    images.run(images.Config(out=tmp_path / "img", source=str(root), val_fraction=0.1))
    features.run(features.Config(images=tmp_path / "img", encoder=str(encoder_dir), out=tmp_path / "feat", views=1,
                                 batch_size=32, num_workers=2))
    m = td.run(td.Config(images=tmp_path / "img", features=tmp_path / "feat", encoder=str(encoder_dir),
                         out=tmp_path / "dec", preset="demo", steps=250, eval_every=250, eval_samples=30, lpips="off"))
    final = m.extra["final"]
    assert final["val_psnr"] > final["baseline_psnr"] + 6, final


# ------------------------------------------------------------------------------------------------------------ GAN


@pytest.fixture(scope="module")
def disc_backbone(tmp_path_factory):
    from models.discriminator import init_backbone_dir

    return init_backbone_dir(tmp_path_factory.mktemp("disc") / "vit", "tiny", seed=0)


def _gan_cfg(images_artifact, features_artifact, encoder_dir, out, disc_backbone, **kw):
    # 18 train samples x 2 views / batch 4 = 9 steps per epoch: the discriminator from step 2, the GAN term from 4
    return _cfg(images_artifact, features_artifact, encoder_dir, out, **{
        "steps": 8, "gan": True, "disc_backbone": str(disc_backbone), "disc_start_epoch": 0.2, "gan_start_epoch": 0.4,
        "log_every": 1, **kw})


def test_gan_phases_train_the_discriminator_and_resume_bitwise(tmp_path, images_artifact, features_artifact,
                                                               encoder_dir, disc_backbone, crash_at):
    """Through the GAN phase (discriminator from step 2, adversarial term from step 4) a run killed at update 5
    resumes to the same decoder and the same discriminator heads (spectral-norm vectors included), bit for bit."""
    from pipeline.checkpoint import load_tensors

    clean = td.run(_gan_cfg(images_artifact, features_artifact, encoder_dir, tmp_path / "clean", disc_backbone))
    log = json.loads((tmp_path / "clean" / "checkpoints" / "000000008" / "trainer.json").read_text())["log"]
    assert "disc_loss" not in log[0] and "disc_loss" in log[2] and "gan" not in log[3] and "gan" in log[4]
    assert all(0 < r["adaptive_weight"] <= 1e4 for r in log[4:])
    plain = td.run(_cfg(images_artifact, features_artifact, encoder_dir, tmp_path / "plain", steps=8))
    assert plain.extra["decoder_fingerprint"] != clean.extra["decoder_fingerprint"]  # the GAN term mattered
    out = tmp_path / "killed"
    disarm = crash_at(5)
    with pytest.raises(Killed):
        td.run(_gan_cfg(images_artifact, features_artifact, encoder_dir, out, disc_backbone))
    disarm()
    resumed = td.run(_gan_cfg(images_artifact, features_artifact, encoder_dir, out, disc_backbone))
    assert (out / WEIGHTS_NAME).read_bytes() == (tmp_path / "clean" / WEIGHTS_NAME).read_bytes()
    a = load_tensors(tmp_path / "clean" / "checkpoints" / "000000008" / "disc.safetensors")
    b = load_tensors(out / "checkpoints" / "000000008" / "disc.safetensors")
    assert a.keys() == b.keys() and any("_u" in k or "original" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.extra["decoder_fingerprint"] == clean.extra["decoder_fingerprint"]


def test_gan_before_its_start_is_the_plain_recipe(tmp_path, images_artifact, features_artifact, encoder_dir,
                                                  disc_backbone):
    gan = td.run(_gan_cfg(images_artifact, features_artifact, encoder_dir, tmp_path / "g", disc_backbone,
                          disc_start_epoch=5, gan_start_epoch=5))
    plain = td.run(_cfg(images_artifact, features_artifact, encoder_dir, tmp_path / "p", steps=8))
    assert gan.extra["decoder_fingerprint"] == plain.extra["decoder_fingerprint"]
    with pytest.raises(UserError, match="--micro-batch at 0"):
        td.run(_gan_cfg(images_artifact, features_artifact, encoder_dir, tmp_path / "m", disc_backbone,
                        micro_batch=2))
