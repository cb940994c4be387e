"""The demo's metrics: within-class diversity on the real digits, precision/recall in the classifier's feature space,
the spread over seeds and the report's lines (the `demo-report` stage itself: tests/test_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline import demo_metrics as dm
from pipeline.manifest import ArtifactError, Manifest, write_manifest
from stages import classifier, images

SIZE = 64  # fixture images: 8 x 8 digits upscaled (nearest) to 64 px, a multiple of the 8 x 8 grid


def _digit_rgb(pixels8: np.ndarray, size: int = SIZE) -> np.ndarray:
    gray = np.round(pixels8 * (255.0 / 16.0)).astype(np.uint8)
    return np.asarray(Image.fromarray(gray, mode="L").resize((size, size), Image.NEAREST).convert("RGB"))


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory) -> Path:
    """A train-classifier artifact fitted on 600 real digits (60 per class, 25% held out)."""
    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    for c in range(10):
        (root / "src" / str(c)).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == c)[:60]):
            Image.fromarray(_digit_rgb(d.images[i])).save(root / "src" / str(c) / f"{j:03d}.png")
    images.run(images.Config(out=root / "img", source=str(root / "src"), shard_size=200, val_fraction=0.25))
    classifier.run(classifier.Config(images=root / "img", out=root / "clf"))
    return root / "clf"


def fake_samples(out: Path, x: np.ndarray, y: np.ndarray, seed: int, cfg_scale: float) -> Path:
    """A finished `sample` artifact (ADM samples.npz + manifest) holding the given uint8 images."""
    out.mkdir(parents=True)
    np.savez(out / "samples.npz", arr_0=x, arr_1=y)
    extra = {"sampler": "euler", "steps": 50, "cfg_scale": cfg_scale, "cfg_interval": [0.3, 1.0], "per_class": 1,
             "num_classes": 10, "num_samples": len(y), "seed": seed}
    write_manifest(out, Manifest(stage="sample", complete=True, extra=extra,
                                 models={"dit": {"path": "somewhere", "fingerprint": "dit-fp"}}))
    return out


def test_within_class_diversity_of_the_real_digits_is_36_1_from_raw_arrays_and_from_upscaled_images():
    d = load_digits()
    value, per_class = dm.within_class_diversity(d.data, d.target)
    assert value == pytest.approx(36.115, abs=1e-3) and sorted(per_class) == list(range(10))
    subset = np.concatenate([np.flatnonzero(d.target == c)[:30] for c in range(10)])
    x = np.stack([_digit_rgb(d.images[i]) for i in subset])
    grids = dm.digit_grids(x)
    np.testing.assert_allclose(grids, d.data[subset], atol=16 / 255)  # the 0..255 rounding of the upscaled images
    raw, _ = dm.within_class_diversity(d.data[subset], d.target[subset])
    assert dm.within_class_diversity(grids, d.target[subset])[0] == pytest.approx(raw, rel=2e-3)


def test_within_class_diversity_definition():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [9.0, 9.0]])
    y = np.array([0, 0, 1, 1, 1, 2])  # class 2 has a single sample: no pair, left out
    value, per_class = dm.within_class_diversity(x, y)
    assert per_class[0] == pytest.approx(5.0)
    assert per_class[1] == pytest.approx((np.sqrt(2) * 2 + 0.0) / 3)
    assert 2 not in per_class and value == pytest.approx((per_class[0] + per_class[1]) / 2)
    assert dm.within_class_diversity(np.ones((4, 3)), np.array([0, 0, 1, 1]))[0] == 0.0  # copies
    with pytest.raises(ValueError, match="at least two"):
        dm.within_class_diversity(np.ones((2, 3)), np.array([0, 1]))


def test_spread_over_seeds():
    s = dm.spread({0: 0.95, 1: 0.97, 2: 0.93})
    assert s["value"] == pytest.approx(0.95) and s["spread"] == pytest.approx(0.04)
    assert s["per_seed"] == {"0": 0.95, "1": 0.97, "2": 0.93} and s["std"] == pytest.approx(np.std([0.95, 0.97, 0.93]))
    assert s["sem"] == pytest.approx(0.02 / np.sqrt(3))  # sample std (0.02) over sqrt(seeds)
    assert dm.spread({4: 0.5})["sem"] is None


def test_classifier_artifact_holds_the_feature_network_and_the_real_digits(digits_classifier):
    clf, m = classifier.load_classifier(digits_classifier)
    assert clf.train.grid.shape == (450, 64) and clf.val.grid.shape == (150, 64)
    assert m.extra["feature_net"]["hidden"] == 64 and m.extra["feature_net"]["val_accuracy"] >= 0.9
    x = np.stack([_digit_rgb(g.reshape(8, 8) * 16.0) for g in clf.val.grid[:5]])
    feats = clf.features(x)
    assert feats.shape == (5, 64) and (feats >= 0).all()
    np.testing.assert_allclose(feats, clf.net.features(classifier.to_grid(x, 8)), atol=1e-12)


def test_setting_report_tells_real_digits_from_copies(digits_classifier):
    """Held-out real digits score like data (ratio ~1, high recall); one repeated digit per class scores ratio 0 and
    low recall, with the same class-consistency; the headline is the mean over seeds with its standard error."""
    clf, _ = classifier.load_classifier(digits_classifier)
    ref = dm.reference(clf)
    grid, label = clf.val.grid, clf.val.label
    real, copies = {}, {}
    for seed in range(3):
        pick = np.random.default_rng(seed).permutation(len(label))[:100]
        real[seed] = dm.grid_metrics(grid[pick] * 16, label[pick], clf.predict_grids(grid[pick]), clf, ref)
        first = np.array([np.flatnonzero(label == c)[seed] for c in label[pick]])  # the class's seed-th digit, repeated
        copies[seed] = dm.grid_metrics(grid[first] * 16, label[pick], clf.predict_grids(grid[first]), clf, ref)
    r, c = dm.setting_report(real, ref), dm.setting_report(copies, ref)
    assert 0.85 < r["diversity_ratio"]["value"] < 1.15 and r["recall"]["value"] > 0.5 and r["precision"]["value"] > 0.7
    assert c["diversity_ratio"]["value"] == 0.0 and c["recall"]["value"] < 0.2
    assert r["diversity"]["real"] == pytest.approx(dm.within_class_diversity(clf.train.grid * 16, clf.train.label)[0])
    recalls = [real[k]["recall"] for k in range(3)]
    assert r["recall"]["per_seed"] == {str(k): v for k, v in enumerate(recalls)}
    assert r["recall"]["value"] == pytest.approx(np.mean(recalls))
    assert r["recall"]["sem"] == pytest.approx(np.std(recalls, ddof=1) / np.sqrt(3))
    line = dm.summary_line({**r, "cfg_scale": 2.0, "seeds": [0, 1, 2], "num_samples": 100})
    assert line.startswith("w = 2: class-consistency") and f"recall {r['recall']['value']:.3f} ± " in line
    assert "100 samples x 3 seeds" in line


def test_old_classifier_is_refused(digits_classifier):
    clf, _ = classifier.load_classifier(digits_classifier)
    with pytest.raises(ArtifactError, match="older version"):
        dm.reference(clf._replace(net=None))


def test_fid_with_the_classifier_reports_diversity_and_digit_precision_recall(digits_classifier, tmp_path):
    """`flatdino fid --classifier` writes the demo metrics of its samples into metrics.json and its summary line: the
    same numbers `pipeline.demo_metrics` computes, so `make fid` and the report agree on seed 0."""
    from stages import fid

    clf, _ = classifier.load_classifier(digits_classifier)
    x = np.stack([_digit_rgb(g.reshape(8, 8) * 16.0) for g in clf.val.grid])
    samples = fake_samples(tmp_path / "s", x, clf.val.label, 0, 2.0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=x)
    fid.run(fid.Config(samples=samples, reference=ref, out=tmp_path / "fid", classifier=digits_classifier,
                       device="cpu"))
    rep = json.loads((tmp_path / "fid" / "metrics.json").read_text())
    want = dm.sample_metrics(x, clf.val.label, clf, dm.reference(clf))
    got = rep["metrics"]
    assert got["diversity"]["value"] == pytest.approx(want["diversity"])
    assert got["diversity"]["ratio"] == pytest.approx(want["diversity_ratio"])
    assert got["digit_recall"]["value"] == pytest.approx(want["recall"]) and got["digit_recall"]["k"] == 3
    assert got["digit_precision"]["value"] == pytest.approx(want["precision"])
    assert got["class_consistency"]["value"] == pytest.approx(want["class_consistency"])
    assert 0.8 < got["diversity"]["ratio"] < 1.2  # held-out real digits are about as varied as the training ones
    assert f"ratio {want['diversity_ratio']:.2f} to real" in rep["summary"]
    copies = fake_samples(tmp_path / "c", np.repeat(x[:1], len(x), 0), clf.val.label, 0, 2.0)
    fid.run(fid.Config(samples=copies, reference=ref, out=tmp_path / "fid-c", classifier=digits_classifier,
                       device="cpu"))
    assert json.loads((tmp_path / "fid-c" / "metrics.json").read_text())["metrics"]["diversity"]["value"] == 0.0
