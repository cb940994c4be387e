"""The demo digit classifier: grid recovery, sklearn parity, held-out accuracy on real digits, artifact behaviour."""

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.manifest import UserError
from pipeline.shards import ImageShards
from stages import classifier, images


def _digit_rgb(pixels8: np.ndarray, size: int) -> np.ndarray:
    gray = np.round(pixels8 * (255.0 / 16.0)).astype(np.uint8)
    return np.asarray(Image.fromarray(gray, mode="L").resize((size, size), Image.NEAREST).convert("RGB"))


@pytest.fixture(scope="module")
def digits_artifact(tmp_path_factory):
    """400 real digits (40 per class) as a 64x64 ImageFolder -> images artifact with a 25% val split."""
    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    for c in range(10):
        (root / "src" / str(c)).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == c)[:40]):
            Image.fromarray(_digit_rgb(d.images[i], 64)).save(root / "src" / str(c) / f"{j:03d}.png")
    images.run(images.Config(out=root / "img", source=str(root / "src"), shard_size=100, val_fraction=0.25))
    return root / "img"


def test_to_grid_recovers_the_8x8_digit_exactly():
    d = load_digits()
    x = np.stack([_digit_rgb(d.images[i], 256) for i in range(5)])
    expected = np.round(d.images[:5] * (255.0 / 16.0)).reshape(5, 64) / 255.0
    np.testing.assert_allclose(classifier.to_grid(x, 8, chunk=2), expected, atol=1e-12)
    with pytest.raises(ValueError, match="not a multiple"):
        classifier.to_grid(np.zeros((1, 10, 10, 3), np.uint8), 8)


def test_predict_matches_sklearn_and_unseen_classes_are_never_predicted():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    y = rng.choice([0, 2, 3], 60)  # class 1 absent from training
    cfg = classifier.Config(images=None, out=None, grid=4, c=0.5)
    clf = classifier._fit(x, y, cfg, num_classes=4)
    ref = LogisticRegression(C=0.5, max_iter=2000).fit(classifier.to_grid(x, 4), y)
    np.testing.assert_array_equal(clf.predict(x), ref.predict(classifier.to_grid(x, 4)))
    assert 1 not in clf.predict(rng.integers(0, 256, (200, 16, 16, 3), dtype=np.uint8))


def test_train_classifier_on_real_digits(digits_artifact, tmp_path):
    cfg = classifier.Config(images=digits_artifact, out=tmp_path / "clf")
    m = classifier.run(cfg)
    assert m.complete and m.extra["num_val"] == 100 and m.extra["num_train"] == 300
    assert m.extra["val_accuracy"] >= 0.9
    clf, loaded = classifier.load_classifier(tmp_path / "clf")
    x_val, y_val = classifier.load_split(ImageShards(digits_artifact), "val")
    acc = float(np.mean(clf.predict(x_val) == y_val))
    assert acc == m.extra["val_accuracy"] and loaded.fingerprint == m.fingerprint
    per_class = m.extra["val_accuracy_per_class"]
    assert len(per_class) == 10 and min(per_class) >= 0.5
    assert classifier.run(cfg).fingerprint == m.fingerprint  # re-run: no-op
    with pytest.raises(UserError, match="below --min-val-accuracy"):
        classifier.run(classifier.Config(images=digits_artifact, out=tmp_path / "strict", min_val_accuracy=min(1.0, m.extra["val_accuracy"] + 0.005)))
