"""`fid-ref` and `fid` end to end on tiny artifacts: statistics vs in-memory computation, ranks, references, reports."""

import json

import numpy as np
import pytest
import torch

from models.encoder import FeatureEncoder, adm_center_crop, init_rae_dir, load_rae
from pipeline import metrics
from pipeline.shards import load_rgb  # noqa: E402
from pipeline.manifest import RECORD_SUFFIX, ArtifactError, Manifest, file_sha256, write_manifest
from pipeline.runtime import Runtime
from pipeline.shards import ImageShards
from stages import classifier, fid


@pytest.fixture(autouse=True)
def no_cached_inception(tmp_path, monkeypatch):
    """Keep any real cached weights out of reach: Inception is unavailable unless a test passes a file."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def _in_memory(images_artifact, split):
    shards = ImageShards(images_artifact)
    xs, ys = [], []
    for _, _, cls, data, _ in shards.iter(split):
        xs.append(np.asarray(adm_center_crop(load_rgb(data)), dtype=np.uint8))
        ys.append(cls)
    return np.stack(xs), np.asarray(ys)


def _cls_features(encoder_dir, x):
    enc = FeatureEncoder(load_rae(encoder_dir)).eval()
    return enc.encode_images(torch.from_numpy(x).permute(0, 3, 1, 2)).cls.double().numpy()


def _ref_cfg(images_artifact, encoder_dir, out, **kw):
    return fid.RefConfig(images=images_artifact, out=out, encoder=str(encoder_dir), block_size=4, pr_subset=5,
                         download=False, device="cpu", **kw)


@pytest.fixture(scope="module")
def reference(images_artifact, encoder_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "train"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "get_dir", lambda: str(out.parent / "hub"))
        fid.run_ref(_ref_cfg(images_artifact, encoder_dir, out), rt=Runtime())
    return out


@pytest.fixture(scope="module")
def samples_dir(images_artifact, tmp_path_factory):
    """The val images as 'generated samples', with a sample-stage manifest carrying a protocol."""
    out = tmp_path_factory.mktemp("samples")
    x, y = _in_memory(images_artifact, "val")
    np.savez(out / "samples.npz", x, y)
    write_manifest(out, Manifest(stage="sample", complete=True, models={"dit": {"sha256": "abc"}},
                                 extra={"sampler": "euler", "steps": 50, "cfg_scale": 1.5, "cfg_interval": [0.3, 1.0],
                                        "per_class": 2, "seed": 0, "kappa": 1.0}))
    return out


def test_reference_stats_from_shards_equal_in_memory(reference, images_artifact, encoder_dir):
    x, y = _in_memory(images_artifact, "train")
    expected = metrics.feature_stats(_cls_features(encoder_dir, x))
    with np.load(reference / fid.REFERENCE) as z:
        np.testing.assert_allclose(z["dino_cls.mu"], expected.mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z["dino_cls.sigma"], expected.sigma, rtol=1e-4, atol=1e-6)
        assert z["dino_patch_mean.sigma"].shape == (192, 192) and "pool.mu" not in z.files
        assert len(z["index"]) == 5 and np.array_equal(y[z["index"]], z["label"])
    m = fid.read_manifest(reference)
    assert m.extra["num_images"] == len(x) == 18
    assert m.extra["class_counts"] == {str(c): int(k) for c, k in zip(*np.unique(y, return_counts=True))}
    assert m.extra["inception"]["available"] is False and "--download" in m.extra["inception"]["reason"]


def test_reference_is_identical_across_ranks_and_resumes(reference, images_artifact, encoder_dir, tmp_path):
    cfg = _ref_cfg(images_artifact, encoder_dir, tmp_path / "ranks")
    assert fid.run_ref(cfg, rt=Runtime(1, 2)) is None  # rank 1 writes its blocks and leaves the rest to main
    assert sorted(p.name for p in cfg.out.glob("ref-*.npz")) == ["ref-000001.npz", "ref-000003.npz"]
    m = fid.run_ref(cfg, rt=Runtime(0, 2))
    with np.load(reference / fid.REFERENCE) as a, np.load(cfg.out / fid.REFERENCE) as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
    assert m.shards == fid.read_manifest(reference).shards
    assert fid.run_ref(cfg, rt=Runtime()).fingerprint == m.fingerprint  # re-run: no-op


def _classifier(images_artifact, tmp_path):
    out = tmp_path / "clf"
    classifier.run(classifier.Config(images=images_artifact, out=out, min_val_accuracy=0.0))
    return out


def test_fid_end_to_end_without_inception(reference, samples_dir, images_artifact, encoder_dir, tmp_path):
    clf_dir = _classifier(images_artifact, tmp_path)
    cfg = fid.Config(samples=samples_dir, reference=reference, out=tmp_path / "fid", encoder=str(encoder_dir),
                     classifier=clf_dir, block_size=4, download=False, device="cpu")
    m = fid.run(cfg, rt=Runtime())
    report = json.loads((cfg.out / fid.METRICS).read_text())
    assert report == json.loads(json.dumps(m.extra))
    x, y = _in_memory(images_artifact, "val")
    with np.load(reference / fid.REFERENCE) as z:
        ref_stats = metrics.GaussianStats(z["dino_cls.mu"], z["dino_cls.sigma"])
    expected = metrics.frechet_from_stats(metrics.feature_stats(_cls_features(encoder_dir, x)), ref_stats)
    got = report["metrics"]
    assert got["fd_dinov2"]["space"] == "dino_cls"
    assert got["fd_dinov2"]["value"] == pytest.approx(expected, rel=1e-4)
    pred = classifier.load_classifier(clf_dir)[0].predict(x)
    assert got["class_consistency"]["value"] == pytest.approx(np.mean(pred == y))
    assert got["class_consistency"]["per_class"]["cat"] == pytest.approx(np.mean(pred[y == 0] == 0))
    for name in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert got[name]["value"] is None and "Inception weights not found" in got[name]["reason"]
        assert str(metrics.inception_cache_path()) in got[name]["reason"]
    proto = report["protocol"]
    assert proto["sampler"]["cfg_scale"] == 1.5 and proto["sample_models"] == {"dit": {"sha256": "abc"}}
    assert proto["num_samples"] == len(x) and proto["reference"]["kind"] == "fid_ref"
    assert sum(proto["class_counts"].values()) == len(x)
    line = fid.summary(m)
    assert report["summary"] == line
    assert "FID n/a | sFID n/a" in line and f"FD-DINOv2(cls) {expected:.4f}" in line and "TF-graph" not in line
    assert fid.run(cfg, rt=Runtime()).fingerprint == m.fingerprint  # re-run: no-op


def test_fid_refuses_another_encoder(reference, samples_dir, tmp_path):
    other = init_rae_dir(tmp_path / "enc1", "tiny", seed=1)
    cfg = fid.Config(samples=samples_dir, reference=reference, out=tmp_path / "fid", encoder=str(other),
                     download=False, device="cpu")
    with pytest.raises(ArtifactError, match="FD-DINOv2 needs the same encoder"):
        fid.run(cfg, rt=Runtime())


def test_adm_reference_batch_matches_fid_ref(reference, samples_dir, images_artifact, encoder_dir, tmp_path):
    x, y = _in_memory(images_artifact, "train")
    np.savez(tmp_path / "VIRTUAL_ref.npz", x, y, mu=np.zeros(3), sigma=np.eye(3))  # ADM layout (stats unused here)
    common = dict(samples=samples_dir / "samples.npz", encoder=str(encoder_dir), block_size=5, download=False,
                  device="cpu")
    adm = fid.run(fid.Config(reference=tmp_path / "VIRTUAL_ref.npz", out=tmp_path / "a", **common), rt=Runtime())
    ours = fid.run(fid.Config(reference=reference, out=tmp_path / "b", **common), rt=Runtime())
    assert adm.extra["protocol"]["reference"]["kind"] == "adm"
    for name in ("fd_dinov2", "fd_dinov2_patch_mean"):
        assert adm.extra["metrics"][name]["value"] == pytest.approx(ours.extra["metrics"][name]["value"], rel=1e-4)
    assert adm.extra["metrics"]["class_consistency"]["reason"] == "no --classifier"


def test_npz_array_memmaps_stored_and_reads_compressed(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", a, np.arange(3))
    np.savez_compressed(tmp_path / "c.npz", a)
    stored = fid.npz_array(tmp_path / "s.npz", "arr_0")
    assert isinstance(stored, np.memmap) and np.array_equal(stored, a)
    assert np.array_equal(fid.npz_array(tmp_path / "c.npz", "arr_0"), a)
    np.testing.assert_array_equal(fid.npz_array(tmp_path / "s.npz", "arr_1"), np.arange(3))


def test_open_samples_errors(tmp_path):
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "samples.npz", np.zeros((2, 4, 4, 3), np.uint8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="expected exactly one of"):
        fid.open_samples(tmp_path / "empty")
    np.savez(tmp_path / "f.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ArtifactError, match="must be uint8"):
        fid.open_samples(tmp_path / "f.npz")
    s = fid.open_samples(tmp_path / "d" / "samples.npz")
    assert s.labels is None and s.manifest is None and len(s.fingerprint) == 64


@pytest.mark.slow
def test_inception_metrics_end_to_end_with_random_weights(images_artifact, samples_dir, tmp_path):
    from test_metrics_inception import write_random_inception_weights

    weights = write_random_inception_weights(tmp_path / "inception.pth", seed=3)
    x, _ = _in_memory(images_artifact, "val")
    pool, logits, spatial = metrics.inception_features(metrics.load_inception(weights), x)
    ref_dir = tmp_path / "ref"
    fid.run_ref(fid.RefConfig(images=images_artifact, out=ref_dir, split="val", inception_weights=weights,
                              block_size=4, download=False, device="cpu"), rt=Runtime())
    st, sp = metrics.feature_stats(pool), metrics.feature_stats(spatial)
    np.savez(tmp_path / "adm.npz", x, mu=st.mu, sigma=st.sigma, mu_s=sp.mu, sigma_s=sp.sigma)
    for name, ref in (("art", ref_dir), ("adm", tmp_path / "adm.npz")):
        m = fid.run(fid.Config(samples=samples_dir, reference=ref, out=tmp_path / name, inception_weights=weights,
                               block_size=4, download=False, device="cpu"), rt=Runtime())
        got = m.extra["metrics"]
        assert abs(got["fid"]["value"]) < 1e-6 * np.trace(st.sigma)  # the samples are the reference images
        assert abs(got["sfid"]["value"]) < 1e-6 * np.trace(sp.sigma)
        tf = got["fid"]["reference_statistics"] == fid.TF_GRAPH
        assert tf == (name == "adm") and (got["sfid"]["reference_statistics"] == fid.TF_GRAPH) == tf
        assert got["precision"]["value"] == 1.0 and got["recall"]["value"] == 1.0
        assert got["inception_score"]["value"] == pytest.approx(metrics.inception_score(logits)[0], rel=1e-5)
        assert m.extra["protocol"]["inception"]["sha256"] == file_sha256(weights)
    with np.load(ref_dir / fid.REFERENCE) as z:
        np.testing.assert_allclose(z["pool.mu"], st.mu, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(z["pool.sigma"], st.sigma, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(z["spatial.mu"], sp.mu, rtol=1e-5, atol=1e-7)
        assert z["spatial.sigma"].shape == (2023, 2023) and "spatial" not in z.files


def test_open_reference_reads_the_adm_batch_layout(tmp_path):
    rng = np.random.default_rng(8)
    imgs = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mu, sigma = rng.standard_normal(6).astype(np.float32), np.eye(6, dtype=np.float32)
    np.savez(tmp_path / "ref.npz", imgs, np.arange(4), mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)  # ADM keys
    ref = fid.open_reference(tmp_path / "ref.npz")
    assert ref.kind == "adm" and ref.num_images == 4 and isinstance(ref.images, np.memmap)
    np.testing.assert_array_equal(ref.images, imgs)
    assert ref.stats["pool"].mu.dtype == np.float64 and np.array_equal(ref.stats["pool"].mu, mu.astype(np.float64))
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    assert fid.open_reference(tmp_path / "stats_only.npz").images is None
    np.savez(tmp_path / "bad.npz", foo=mu)
    with pytest.raises(ArtifactError, match="not an ADM reference batch"):
        fid.open_reference(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a readable .npz"):
        fid.open_reference(tmp_path / "junk.npz")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    from test_metrics_inception import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inc") / "inception.pth", seed=5)


def test_sfid_and_fid_against_adm_tf_graph_statistics(samples_dir, images_artifact, inception_weights, tmp_path):
    """An ADM batch holding only mu/sigma and mu_s/sigma_s: closed-form FID and sFID from features recomputed
    independently (torch-fidelity's own forward; mixed_6/conv step by step), and an honest report."""
    from test_metrics_inception import _mixed_6_conv

    x, _ = _in_memory(images_artifact, "val")
    model = metrics.load_inception(inception_weights)
    with torch.no_grad():
        pool = model(torch.from_numpy(x).permute(0, 3, 1, 2))[0].double().numpy()
        spatial = _mixed_6_conv(model, x)[..., :7].reshape(len(x), -1).astype(np.float64)
    p_mu, p_sigma = pool.mean(0), np.cov(pool, rowvar=False)
    s_mu, s_sigma = spatial.mean(0), np.cov(spatial, rowvar=False)
    rng = np.random.default_rng(0)
    d_pool, d_spatial = rng.normal(size=2048) * 0.1, rng.normal(size=2023) * 0.1
    np.savez(tmp_path / "VIRTUAL.npz", mu=p_mu + d_pool, sigma=p_sigma, mu_s=s_mu + d_spatial, sigma_s=4 * s_sigma)
    m = fid.run(fid.Config(samples=samples_dir, reference=tmp_path / "VIRTUAL.npz", out=tmp_path / "fid",
                           inception_weights=inception_weights, block_size=4, device="cpu"), rt=Runtime())
    got = m.extra["metrics"]
    assert got["fid"]["value"] == pytest.approx(d_pool @ d_pool, rel=1e-4)  # same covariance: |d mu|^2 only
    # sigma_s = 4 S: tr S + 4 tr S - 2 tr (4 S^2)^(1/2) = tr S
    assert got["sfid"]["value"] == pytest.approx(d_spatial @ d_spatial + np.trace(s_sigma), rel=1e-4)
    for name in ("fid", "sfid"):
        assert got[name]["reference_statistics"] == fid.TF_GRAPH and got[name]["samples_statistics"] == fid.TORCH_PORT
    proto = m.extra["protocol"]
    assert proto["reference"]["tf_graph_statistics"] == ["pool", "spatial"] and proto["reference"]["num_images"] == 0
    assert "FID and sFID: samples through torch-fidelity" in proto["inception_implementations"]
    assert got["precision"]["value"] is None and "no pool_3 features" in got["precision"]["reason"]
    line = fid.summary(m)
    assert f"sFID {got['sfid']['value']:.4f}" in line
    assert line.endswith("FID/sFID vs TF-graph reference statistics (samples: torch-fidelity inception-v3-compat)")


def test_absent_inception_is_reported_at_once_offline_or_refused(reference, samples_dir, images_artifact, tmp_path,
                                                                 monkeypatch):
    import socket

    from click.testing import CliRunner

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    m = fid.run(fid.Config(samples=samples_dir, reference=reference, out=tmp_path / "a", device="cpu"), rt=Runtime())
    reason = m.extra["metrics"]["fid"]["reason"]  # the defaults: no download attempt, the fix spelled out
    assert str(metrics.inception_cache_path()) in reason and "--inception-weights FILE" in reason
    with pytest.raises(fid.UserError, match="--require-inception: Inception weights not found"):
        fid.run(fid.Config(samples=samples_dir, reference=reference, out=tmp_path / "b", device="cpu",
                           require_inception=True), rt=Runtime())
    result = CliRunner().invoke(fid.cli, ["--samples", str(samples_dir), "--reference", str(reference), "--out",
                                          str(tmp_path / "c"), "--device", "cpu", "--require-inception"])
    assert result.exit_code == 2 and "weights-inception-2015-12-05-6726825d.pth" in result.output
    with pytest.raises(fid.UserError, match="--require-inception"):
        fid.run_ref(fid.RefConfig(images=images_artifact, out=tmp_path / "r", require_inception=True, device="cpu"),
                    rt=Runtime())


def test_blocks_without_a_space_are_refused_not_merged_into_a_subset(reference, samples_dir, encoder_dir, tmp_path):
    """A run resumed across an upgrade (old blocks lack sFID's moments) must not report statistics of a subset."""
    cfg = fid.Config(samples=samples_dir, reference=reference, out=tmp_path / "f", encoder=str(encoder_dir),
                     block_size=4, device="cpu")
    fid.run(cfg, rt=Runtime())
    first = tmp_path / "f" / "samples-000000.npz"
    with np.load(first) as z:
        kept = {k: z[k] for k in z.files if not k.startswith("dino_cls.")}  # as if written before that space existed
    np.savez(first, **kept)
    record = first.with_name(first.name + RECORD_SUFFIX)
    record.write_text(json.dumps({**json.loads(record.read_text()), "bytes": first.stat().st_size}))
    (tmp_path / "f" / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="dino_cls statistics are missing from some blocks"):
        fid.run(cfg, rt=Runtime())
