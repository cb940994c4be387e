"""`flatdino latents`: values, row order, exact float64 statistics, world-size independence, resume, refusal."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_vae import cfg_for, make_features

import stages.latents as lt
import stages.train_vae as tv
from pipeline.artifacts import load_flatdino
from pipeline.latents_store import open_latents
from pipeline.shards import FeatureShards
from pipeline.manifest import ArtifactError, require_complete
from pipeline.runtime import Runtime


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lat")
    feats = make_features(root / "feat", n_train=21, n_val=8)
    tv.run(cfg_for(feats, root / "vae", epochs=1, global_batch=7, micro_batch=7, val_every=3))
    return root, feats


def latents_cfg(root: Path, feats: Path, out: str, **kw) -> lt.Config:
    return lt.Config(features=feats, vae=root / "vae", out=root / out, shard_samples=8, batch_size=3, **kw)


def test_rows_are_posterior_means_in_sample_view_order(setup):
    root, feats = setup
    m = lt.run(latents_cfg(root, feats, "one"))
    art = open_latents(root / "one")
    model, _, _ = load_flatdino(root / "vae")
    shards = FeatureShards(feats)
    stacked = np.stack([f for _, _, _, f in shards.iter("train")])  # (21, 2, N, D)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(stacked).float().flatten(0, 1)).mu.numpy()
    assert art.mu.shape == (42, *tv.PRESETS["demo"].latent_shape) and art.mu.chunks[0] == 16
    np.testing.assert_allclose(art.mu[...], want, rtol=1e-5, atol=1e-6)
    assert list(art.view[...]) == [0, 1] * 21 and list(art.sample[...]) == list(np.repeat(np.arange(21), 2))
    assert list(art.label[...]) == list(np.repeat(np.arange(21) % 3, 2))
    assert art.key[0] == art.key[1] == "train_00000000" and art.key[41] == "train_00000020"
    assert m.inputs["vae"]["fingerprint"] == require_complete(root / "vae", "train_vae").fingerprint


def test_stats_equal_numpy_float64(setup):
    root, feats = setup
    lt.run(latents_cfg(root, feats, "stats"))
    art = open_latents(root / "stats")
    mu = np.asarray(art.mu[...], dtype=np.float64)
    np.testing.assert_allclose(art.mean, mu.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(art.std, np.maximum(mu.std(0), 1e-6), rtol=1e-10, atol=1e-15)
    assert art.mean.dtype == np.float64 and art.std.shape == tv.PRESETS["demo"].latent_shape


def test_identical_for_one_and_two_processes_and_resume(setup, monkeypatch):
    root, feats = setup
    one = lt.run(latents_cfg(root, feats, "w1"))
    assert lt.run(latents_cfg(root, feats, "w2"), rt=Runtime(0, 2)) is None  # rank 1's shards still missing
    assert lt.run(latents_cfg(root, feats, "w2"), rt=Runtime(1, 2)) is None  # not the main process
    assert sorted(lt.committed(root / "w2")) == ["latents-000000", "latents-000001", "latents-000002"]
    two = lt.run(latents_cfg(root, feats, "w2"), rt=Runtime(0, 2))  # rank 0 again: only the statistics remain
    assert two.shards == one.shards and two.extra == one.extra
    a, b = open_latents(root / "w1"), open_latents(root / "w2")
    assert np.array_equal(a.mu[...], b.mu[...]) and np.array_equal(a.std, b.std) and np.array_equal(a.mean, b.mean)

    real = lt.write_shard
    calls = []

    def die_after_first(out, shard, views, rows):
        if calls:
            raise KeyboardInterrupt
        calls.append(shard.index)
        return real(out, shard, views, rows)

    monkeypatch.setattr(lt, "write_shard", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        lt.run(latents_cfg(root, feats, "resume"))
    monkeypatch.setattr(lt, "write_shard", real)
    assert list(lt.committed(root / "resume")) == ["latents-000000"]
    resumed = lt.run(latents_cfg(root, feats, "resume"))
    assert resumed.shards == one.shards and np.array_equal(open_latents(root / "resume").mu[...], a.mu[...])
    assert lt.run(latents_cfg(root, feats, "resume")).fingerprint == resumed.fingerprint  # complete: no-op


def test_refuses_features_of_another_encoder(setup):
    root, _ = setup
    other = make_features(root / "other", n_train=4, n_val=2, seed=1)  # encoder fingerprint "enc1"
    with pytest.raises(ArtifactError, match="encoder"):
        lt.run(latents_cfg(root, other, "bad"))
