"""`flatdino train-vae`: schedule plan, data order, world-size independence, exact resume, failure handling."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import stages.train_vae as tv
from conftest import Killed
from pipeline.artifacts import load_flatdino
from pipeline.manifest import ConfigMismatch, Manifest, OutputDir
from pipeline.runtime import Runtime
from pipeline.shards import encode_int, encode_npy, write_tar_shard
from pipeline.train import Trainer, TrainingDiverged
from pipeline.train_data import FeatureData, StreamOrder, random_resized_crop_box

N_PATCH, DIM = 16, 24


def make_features(root: Path, n_train: int = 40, n_val: int = 8, views: int = 2, seed: int = 0) -> Path:
    """A complete tiny `features` artifact: per-token standardised random features with low-rank structure."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4, N_PATCH, DIM))
    records = []
    with OutputDir(root, "features", {"fake": seed}) as od:
        for split, n in (("train", n_train), ("val", n_val)):
            samples = []
            for i in range(n):
                f = np.einsum("vk,knd->vnd", rng.standard_normal((views, 4)), basis)
                f = (f - f.mean(-1, keepdims=True)) / f.std(-1, keepdims=True)
                samples.append({"__key__": f"{split}_{i:08d}", "feat.npy": encode_npy(f.astype(np.float16)),
                                "cls": encode_int(i % 3)})
            rec = write_tar_shard(root / f"features-{split}-000000.tar", samples)
            records.append({**rec, "split": split})
        extra = {"views": views, "num_patches": N_PATCH, "dim": DIM, "classes": ["a", "b", "c"],
                 "encoder": {"source": "fake", "fingerprint": f"enc{seed}"}, "splits": {"train": n_train, "val": n_val}}
        od.finish(Manifest(stage="features", shards=records, extra=extra, complete=True))
    return root


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return make_features(tmp_path_factory.mktemp("feat"))


def cfg_for(features: Path, out: Path, **kw) -> tv.Config:
    base = dict(out=out, features=features, preset="demo", variant="demo", epochs=1, global_batch=8, micro_batch=4,
                lr_peak=2e-3, val_every=2, log_every=2, num_workers=1)
    return tv.Config(**{**base, **kw})


def test_plan_matches_official_step_counts():
    """SPEC 5.2 derived table at batch 512 on ImageNet's 1,281,167 training images."""
    cfg = tv.Config(out=Path("x"))
    model = tv.PRESETS["32-bl-128"]
    for variant, total, decay in (("fast", 125_113, 12_510), ("med", 250_227, 37_530), ("long", 375_341, 55_044),
                                  ("ext", 750_683, 187_650)):
        plan = tv.make_plan(replace(cfg, variant=variant), 1_281_167, model)
        assert (plan.total, plan.warmup, plan.decay, plan.global_batch) == (total, 12_510, decay, 512)
        assert plan.lr(0) == 1e-6 and plan.lr(12_510) == 1e-4 and plan.lr(total) == pytest.approx(1e-8)
    assert plan.beta == pytest.approx(1.25e-7) and plan.val_every == 5 * 2502


def test_stream_order_is_a_permutation_per_epoch():
    order = StreamOrder(seed=3, num_samples=10, views=2)
    samples, views = order.lookup(range(0, 25))
    assert sorted(samples[:10]) == list(range(10)) and sorted(samples[10:20]) == list(range(10))
    assert not np.array_equal(samples[:10], samples[10:20]) and set(views) == {0, 1}
    again, _ = StreamOrder(3, 10, 2).lookup(range(17, 22))
    assert np.array_equal(again, samples[17:22])


def _grads(cfg, rt):
    """Gradients of update 3 on this (possibly emulated) rank, from a fresh model."""
    data = tv.open_data(cfg)
    model_cfg = tv.resolve_model(cfg, data.dim, data.num_patches)
    plan = tv.make_plan(cfg, data.num_train, model_cfg)
    model = tv.build_model(model_cfg, 0, "cpu")
    trainer = Trainer(tv.recipe(cfg, data, plan, model), cfg, cfg.out, rt, cfg.seed)
    trainer.accumulate(3)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_is_independent_of_world_size_and_micro_batch(features, tmp_path):
    """One process with one micro-batch of 8 = the mean over two ranks of two micro-batches of 2 each (DDP averages
    the ranks' gradients, so each rank weighs its micro-batches by world x share of the global batch)."""
    cfg = cfg_for(features, tmp_path, micro_batch=2)
    single = _grads(replace(cfg, micro_batch=8), Runtime())
    r0, r1 = (_grads(cfg, Runtime(r, 2)) for r in (0, 1))
    for name, g in single.items():
        torch.testing.assert_close((r0[name] + r1[name]) / 2, g, rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in r1.values())
    assert any(not torch.allclose(r0[n], r1[n]) for n in r0)  # the ranks really saw different samples


def test_train_resume_bitwise_and_artifacts(features, tmp_path, crash_at):
    full = tv.run(cfg_for(features, tmp_path / "full"))
    assert full.complete and full.extra["last_step"] == 5 and full.extra["best_step"] in (2, 4, 5)
    disarm = crash_at(3)
    with pytest.raises(Killed):
        tv.run(cfg_for(features, tmp_path / "resumed"))
    disarm()
    assert json.loads((tmp_path / "resumed/latest.json").read_text())["step"] == 2
    resumed = tv.run(cfg_for(features, tmp_path / "resumed"))
    for which in ("best", "last"):
        a = load_file(tmp_path / "full" / which / "model.safetensors")
        b = load_file(tmp_path / "resumed" / which / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), which
    assert resumed.shards == full.shards and resumed.extra == full.extra  # same weights, best step and val losses
    assert (tmp_path / "full/loss.png").read_bytes()[:4] == b"\x89PNG" and any((tmp_path / "full/tb").iterdir())
    assert tv.run(cfg_for(features, tmp_path / "full")).fingerprint == full.fingerprint  # complete: no-op
    with pytest.raises(ConfigMismatch):
        tv.run(cfg_for(features, tmp_path / "full", seed=1))
    model, model_cfg, manifest = load_flatdino(tmp_path / "full")
    assert model_cfg.feature_dim == DIM and manifest.extra["encoder"]["fingerprint"] == "enc0"


def test_stop_after_budget_then_resume_matches(features, tmp_path):
    """--max-steps-this-run stops resumably at any update, not only at checkpoints."""
    full = tv.run(cfg_for(features, tmp_path / "a", val_every=5))
    assert tv.run(cfg_for(features, tmp_path / "b", val_every=5, max_steps_this_run=3)) is None
    assert json.loads((tmp_path / "b/latest.json").read_text())["step"] == 3
    assert tv.run(cfg_for(features, tmp_path / "b", val_every=5)).shards == full.shards


def test_non_finite_loss_stops_and_keeps_last_checkpoint(features, tmp_path, monkeypatch):
    from pipeline.checkpoint import load_tensors

    monkeypatch.setattr(tv, "kl_anneal", lambda step, n: float("nan") if step >= 3 else 1.0)
    cfg = cfg_for(features, tmp_path, ckpt_every=2)
    with pytest.raises(TrainingDiverged, match="update 3.*step 2, is kept"):
        tv.run(cfg)
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    weights = load_tensors(tmp_path / "checkpoints" / "000000002" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "manifest.json").exists()


def test_random_resized_crop_box_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(20, 400)), int(rng.integers(20, 400))
        x0, y0, x1, y1 = random_resized_crop_box(w, h, rng)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        area = (x1 - x0) * (y1 - y0) / (w * h)
        assert area >= 0.3 * 0.9 or (x1 - x0 == w or y1 - y0 == h)  # fallback crops span a full side


def test_uncached_reader_matches_ram_cache(features, tmp_path):
    cached = tv.open_data(cfg_for(features, tmp_path))
    streamed = tv.open_data(cfg_for(features, tmp_path, cache_gb=0.0))
    assert cached.cache is not None and streamed.cache is None
    for r in (range(0, 4), range(8, 12), range(37, 45)):
        assert torch.equal(streamed.batch(r), cached.batch(r))
    assert torch.equal(streamed.val_batch(range(2, 6)), cached.val_batch(range(2, 6)))


def test_train_feed_runs_no_torch_op(features, tmp_path):
    """The trainer calls `batch` in its prefetch thread. A torch op there (the fp16 -> fp32 cast of a (64, 64, 192)
    batch runs intra-op parallel) starts a second OpenMP team that competes with the training step's: on 2 CPU cores
    the demo VAE trained at 18 instead of 25 updates/s (bench/RESULTS.md). The cast is numpy's, and exact."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pipeline.shards import FeatureShards

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is not torch.ops.aten.lift_fresh.default:  # torch.from_numpy's wrapping, no compute
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    shards, positions = FeatureShards(features), range(3, 11)
    for cache_gb in (8.0, 0.0):  # from RAM and from the shards
        data = tv.open_data(cfg_for(features, tmp_path, cache_gb=cache_gb))
        assert (data.cache is not None) == (cache_gb > 0)
        with Ops() as ops:
            got = data.batch(positions)
        assert ops.seen == [], ops.seen
        expect = np.stack([shards.get(int(s), "train")[2][v] for s, v in zip(*data.order.lookup(positions))])
        assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(expect).float())


@pytest.mark.slow
def test_source_images_trains_on_the_fly_and_feeds_latents(images_artifact, encoder_dir, features_artifact, tmp_path):
    """Official RRC + flip augmentation through the frozen encoder; the VAE then accepts the stored features."""
    import stages.latents as lt
    from pipeline.shards import FeatureShards

    cfg = tv.Config(out=tmp_path / "vae", source="images", images=images_artifact, encoder=str(encoder_dir),
                    preset="demo", variant="demo", steps=2, global_batch=6, micro_batch=3, val_samples=3,
                    num_workers=1)
    data = tv.open_data(cfg)
    a, b = data.batch(range(0, 3)), data.batch(range(0, 3))
    assert a.shape == (3, 256, 192) and torch.equal(a, b)  # augmentation is a function of (seed, position)
    torch.testing.assert_close(a.mean(-1), torch.zeros(3, 256), atol=1e-4, rtol=0)  # affine-free LN features
    m = tv.run(cfg)
    assert m.complete and m.inputs["images"]["fingerprint"] == data.fingerprint
    assert m.extra["encoder"]["fingerprint"] == FeatureShards(features_artifact).encoder_fingerprint
    lat = lt.run(lt.Config(features=features_artifact, vae=tmp_path / "vae", out=tmp_path / "lat", shard_samples=4))
    assert lat.extra["rows"] == 2 * FeatureShards(features_artifact).num_samples("train")


def test_standardize_stores_float64_train_statistics_and_resumes(features, tmp_path):
    """--standardize: per (patch, channel) mean/std over every train sample and view, identical from the RAM cache
    and from the shards, saved with the weights, and kept (not recomputed) by a resumed run."""
    from pipeline.shards import FeatureShards
    from pipeline.manifest import UserError

    x = np.stack([f for _, _, _, f in FeatureShards(features).iter("train")]).astype(np.float64)
    x = x.reshape(-1, N_PATCH, DIM)
    cached = FeatureData(features, 0, 2**30, 1).feature_stats(Runtime())
    streamed = FeatureData(features, 0, 0, 1).feature_stats(Runtime())
    assert all(torch.equal(a, b) for a, b in zip(cached, streamed))
    torch.testing.assert_close(cached[0], torch.from_numpy(x.mean(0)).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(cached[1], torch.from_numpy(x.std(0)).float(), rtol=0, atol=1e-6)

    full = tv.run(cfg_for(features, tmp_path / "full", standardize_features=True))
    assert tv.run(cfg_for(features, tmp_path / "part", standardize_features=True, max_steps_this_run=3)) is None
    resumed = tv.run(cfg_for(features, tmp_path / "part", standardize_features=True))
    assert resumed.models == full.models  # bitwise the same weights (sha256), statistics included
    model, model_cfg, _ = load_flatdino(tmp_path / "full")
    assert model_cfg.standardize
    torch.testing.assert_close(model.encoder.feature_scale, cached[1].clamp_min(0.1), rtol=0, atol=0)
    with pytest.raises(UserError, match="--source features"):
        tv.open_data(tv.Config(out=tmp_path / "x", source="images", images=tmp_path, encoder="e", standardize_features=True))


def test_official_experiment_name_sets_the_run(features, tmp_path):
    """--experiment long-4-tt-16-hl-25kl7-an1k-fb0.5-klvar2-er1-dr2-tanh: the architecture and loss options the
    official grammar gives, recorded in the manifest; explicit options that disagree are refused."""
    name = "fast-4-tt-16-hl-25kl7-an1k-fb0.5-klvar2-er1-dr2-tanh"
    cfg = tv.Config(out=tmp_path / "a", features=features, experiment=name, steps=2, global_batch=8, micro_batch=8,
                    val_every=2, num_workers=1, device="cpu")
    m = tv.run(cfg)
    model = m.extra["model"]
    assert (model["encoder"], model["decoder"], model["num_tokens"], model["latent_dim"]) == ("t", "t", 4, 16)
    assert model["half_depth"] and model["tanh"] and model["encoder_registers"] == 1 and model["decoder_registers"] == 2
    e = m.extra["experiment"]
    assert e["name"] == name and e["variant"] == "fast" and e["kl_weight"] == pytest.approx(2.5e-7)
    assert e["kl_anneal_steps"] == 1000 and e["free_bits"] == 0.5 and e["kl_var_weight"] == pytest.approx(1e-2)
    assert m.extra["plan"]["beta"] == pytest.approx(2.5e-7)
    model, model_cfg, _ = load_flatdino(tmp_path / "a")
    assert len(model.encoder.trunk.blocks) == 6  # t: 12 blocks, halved
    with pytest.raises(tv.UserError, match="sets these options itself: --free-bits 0.1"):
        tv.run(replace(cfg, out=tmp_path / "b", free_bits=0.1))
    with pytest.raises(tv.UserError, match="-il3"):
        tv.run(replace(cfg, out=tmp_path / "c", experiment="long-32-bl-128-il3"))
