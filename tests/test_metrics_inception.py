"""The torch-fidelity Inception path end to end, on a weight file of random values saved in its real format."""

import math

import numpy as np
import pytest
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from pipeline import metrics


class _Unloaded(FeatureExtractorInceptionV3):
    """The real architecture with its default init: the constructor's weight load is skipped."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def write_random_inception_weights(path, seed=0):
    """Save a state dict with the exact keys/shapes torch-fidelity loads, filled with seeded random values.

    Conv weights are He-scaled and BatchNorm statistics near identity, so activations stay O(1) through the net
    and the features are informative enough for the plumbing tests.
    """
    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    template = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in template.items():
        noise = torch.randn(t.shape, generator=g) if t.is_floating_point() else None
        if name.endswith("conv.weight"):
            state[name] = noise * math.sqrt(2.0 / t[0].numel())
        elif name.endswith(("bn.weight", "bn.running_var")):
            state[name] = 1.0 + 0.1 * noise.abs()
        elif name.endswith(("bn.bias", "bn.running_mean")):
            state[name] = 0.1 * noise
        elif name.startswith("fc."):
            state[name] = 0.05 * noise
        else:
            state[name] = t.clone()  # num_batches_tracked
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "weights-random.pth")


def _images(seed, n, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 1, 1, 3))  # per-image colour + noise texture: varied, non-degenerate inputs
    return np.clip(base + rng.integers(0, 56, (n, 64, 64, 3)) + shift, 0, 255).astype(np.uint8)


class _TensorSet(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_random_weight_file_loads_strictly_and_gives_informative_features(inception_weights):
    model = metrics.load_inception(inception_weights)
    pool, logits, spatial = metrics.inception_features(model, _images(0, 4), batch_size=4)
    assert pool.shape == (4, 2048) and logits.shape == (4, 1008) and spatial.shape == (4, 7 * 17 * 17)
    assert pool.dtype == np.float32 and np.isfinite(pool).all() and pool.std(0).mean() > 1e-3
    assert spatial.dtype == np.float32 and (spatial >= 0).all() and spatial.std(0).mean() > 1e-3  # ReLU outputs
    again = metrics.inception_features(metrics.load_inception(inception_weights), _images(0, 4), batch_size=3)
    np.testing.assert_allclose(again.pool, pool, rtol=1e-5, atol=1e-6)  # batch size does not change features
    np.testing.assert_allclose(again.spatial, spatial, rtol=1e-5, atol=1e-6)


def _mixed_6_conv(model, images: np.ndarray) -> np.ndarray:
    """ADM's `mixed_6/conv:0`, recomputed from torch-fidelity's modules step by step: (N, 17, 17, 192) NHWC."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
        x = getattr(model, name)(x)
    with torch.no_grad():
        branch = model.Mixed_6d.branch1x1  # TF mixed_6/conv: conv -> batchnorm -> relu (torch-fidelity's weight map)
        y = torch.relu(branch.bn(branch.conv(x)))  # (N, 192, 17, 17)
    return y.numpy().transpose(0, 2, 3, 1)


def test_sfid_features_are_adm_mixed_6_conv_first_7_channels_in_nhwc_order(inception_weights):
    model = metrics.load_inception(inception_weights)
    images = _images(4, 3)
    ours = metrics.inception_features(model, images, batch_size=2).spatial
    with torch.no_grad():
        nhwc = _mixed_6_conv(model, images)
    assert nhwc.shape == (3, 17, 17, 192)
    expected = np.empty((3, 2023), np.float32)
    for h in range(17):
        for w in range(17):
            for c in range(7):
                expected[:, (h * 17 + w) * 7 + c] = nhwc[:, h, w, c]  # numpy reshape of [..., :7], as ADM does
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    channel_major = nhwc[..., :7].transpose(0, 3, 1, 2).reshape(3, -1)
    assert np.abs(channel_major - ours).max() > 1e-2  # the flatten order matters, and it is ADM's


@pytest.mark.slow
def test_fid_and_is_match_torch_fidelity_on_the_same_weights(inception_weights):
    a, b = _images(1, 6), _images(2, 6, shift=40)
    model = metrics.load_inception(inception_weights)
    (pa, la, _), (pb, _, _) = metrics.inception_features(model, a), metrics.inception_features(model, b)
    ours_fid = metrics.frechet_from_stats(metrics.feature_stats(pa), metrics.feature_stats(pb))
    ours_is = metrics.inception_score(la)[0]
    ref = torch_fidelity.calculate_metrics(
        input1=_TensorSet(a), input2=_TensorSet(b), fid=True, isc=True, isc_splits=1, samples_shuffle=False,
        feature_extractor_weights_path=str(inception_weights), cache=False, verbose=False, cuda=False,
        save_cpu_ram=True,
    )
    assert ours_fid > 0
    assert ours_fid == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert ours_is == pytest.approx(ref["inception_score_mean"], rel=1e-5)


def test_weights_resolution_offline(tmp_path, monkeypatch, inception_weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert metrics.resolve_inception_weights(inception_weights, download=False) == inception_weights
    with pytest.raises(FileNotFoundError, match="does not exist"):
        metrics.resolve_inception_weights(tmp_path / "missing.pth", download=False)
    with pytest.raises(metrics.MetricUnavailable, match="pass --download") as info:
        metrics.resolve_inception_weights(None, download=False)
    assert str(metrics.inception_cache_path()) in str(info.value) and "--inception-weights FILE" in str(info.value)

    def offline(url, dst, hash_prefix=None, progress=True):
        assert hash_prefix == "6726825d"
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(metrics.MetricUnavailable, match="download failed: network unreachable"):
        metrics.resolve_inception_weights(None, download=True)
    cached = metrics.inception_cache_path()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(inception_weights.read_bytes())
    assert metrics.resolve_inception_weights(None, download=False) == cached


def test_absent_weights_never_touch_the_network_unless_asked(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(metrics.MetricUnavailable, match="Inception weights not found"):
        metrics.resolve_inception_weights(None, download=False)
    assert not (tmp_path / "hub").exists()  # nothing created either


def test_load_inception_rejects_a_foreign_file(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an inception-v3-compat state dict"):
        metrics.load_inception(tmp_path / "other.pth")
