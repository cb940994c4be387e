"""`flatdino train-classifier`: the demo's digit classifier, trained on the real demo training images.

Images go through the evaluation protocol (ADM centre crop 256), then to grayscale (PIL "L" luma weights) and back
down to the digits' native 8x8 grid by area averaging; a multinomial logistic regression (scikit-learn) is fitted on
the train split and scored on the held-out val split. Only its coefficients are stored (`classifier.npz`, no
pickle), and prediction is our own numpy code, so the stored parameters are exactly what the val accuracy measures.
`flatdino fid --classifier DIR` uses it for class-consistency: the share of generated samples classified as the
class they were conditioned on.

The artifact also holds what the demo's other metrics (`pipeline.demo_metrics`) need: a feature network, a
one-hidden-layer ReLU MLP fitted on the same grids (L-BFGS, the same L2 strength), whose hidden layer is the
feature space of the demo's precision/recall (the role Inception's pool_3 plays on ImageNet), and the grids of the
real train and val digits, the reference of within-class diversity and precision/recall.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.encoder import adm_center_crop
from pipeline.config import Checked, command_from_config, config_to_dict, opt
from pipeline.manifest import (ArtifactError, Manifest, OutputDir, UserError, atomic_write_bytes, file_sha256,
                               require_complete)
from pipeline.runtime import environment, get_logger
from pipeline.shards import ImageShards, load_rgb

log = get_logger(__name__)

STAGE = "train_classifier"
WEIGHTS = "classifier.npz"
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL's "L" conversion


@dataclass(frozen=True)
class Config(Checked):
    # paths are runtime knobs (artifacts may move); the images are pinned by fingerprint in the output's config
    images: Path = field(metadata=opt("images artifact with 'train' and 'val' splits (flatdino images --out)",
                                      runtime=True))
    out: Path = field(metadata=opt("output directory, e.g. shards/classifier/demo", runtime=True))
    grid: int = field(default=8, metadata=opt("side of the area-averaged grayscale grid (8 = the digits' own)", min=1))
    c: float = field(default=1.0, metadata=opt("inverse L2 regularisation strength of the logistic regression", min=0, min_open=True))
    max_iter: int = field(default=2000, metadata=opt("L-BFGS iterations", min=1))
    hidden: int = field(default=64, metadata=opt(
        "ReLU units of the feature network (its activations are the demo's precision/recall feature space)", min=1))
    net_max_iter: int = field(default=200, metadata=opt("L-BFGS iterations of the feature network", min=1))
    seed: int = field(default=0, metadata=opt("seed of the feature network's initial weights"))
    min_val_accuracy: float = field(default=0.9, metadata=opt(
        "refuse to write a classifier whose held-out accuracy is below this (it would make class-consistency noise)", min=0, max=1))
    overwrite: bool = field(default=False, metadata=opt("delete an existing artifact made with another config",
                                                        runtime=True))


class FeatureNet(NamedTuple):
    """The hidden layer of a one-hidden-layer ReLU MLP trained to classify the grids: the demo's feature space."""

    w1: np.ndarray  # (grid*grid, H)
    b1: np.ndarray  # (H,)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Grids (N, grid*grid) in [0, 1] -> activations (N, H) float64."""
        return np.maximum(np.asarray(x, dtype=np.float64) @ self.w1 + self.b1, 0.0)


class RealDigits(NamedTuple):
    """Real digits of one split as the classifier sees them."""

    grid: np.ndarray  # (N, grid*grid) float64 in [0, 1]
    label: np.ndarray  # (N,) int64


class DigitClassifier(NamedTuple):
    """Linear softmax classifier on area-averaged grayscale grids (+ the feature network and the real digits)."""

    coef: np.ndarray  # (C, grid*grid)
    intercept: np.ndarray  # (C,)
    grid: int
    net: FeatureNet | None = None  # None in artifacts written before the demo metrics
    train: RealDigits | None = None
    val: RealDigits | None = None

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, 3) -> predicted class indices (N,) int64."""
        return self.predict_grids(to_grid(images, self.grid))

    def predict_grids(self, x: np.ndarray) -> np.ndarray:
        """Grids (N, grid*grid) in [0, 1] (`to_grid`) -> predicted class indices (N,) int64."""
        return np.argmax(x @ self.coef.T + self.intercept, axis=1).astype(np.int64)

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, 3) -> feature-network activations (N, hidden)."""
        return self.net.features(to_grid(images, self.grid))


def to_grid(images: np.ndarray, grid: int, chunk: int = 256) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, grid*grid) float64 in [0, 1]: the mean over each (H/grid, W/grid) cell, then luma.

    Both steps are linear, so averaging first equals PIL-style grayscale followed by area averaging. The luma is an
    elementwise weighted sum rather than a matmul, whose kernel (and rounding) depends on how many rows a call holds:
    a row's grid does not depend on the batch it came in.
    """
    n, h, w, _ = images.shape
    if h % grid or w % grid:
        raise ValueError(f"image size {h}x{w} is not a multiple of the {grid}x{grid} grid")
    out = np.empty((n, grid * grid))
    for s in range(0, n, chunk):
        x = images[s : s + chunk].reshape(-1, grid, h // grid, grid, w // grid, 3)
        cells = x.mean(axis=(2, 4), dtype=np.float64)  # (n, grid, grid, 3)
        luma = cells[..., 0] * LUMA[0] + cells[..., 1] * LUMA[1] + cells[..., 2] * LUMA[2]
        out[s : s + chunk] = (luma / 255.0).reshape(-1, grid * grid)
    return out


def load_split(images: ImageShards, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of a split through the evaluation protocol: uint8 (N, 256, 256, 3) and labels (N,)."""
    xs, ys = [], []
    for _, _, cls, data, _ in images.iter(split):
        xs.append(np.asarray(adm_center_crop(load_rgb(data)), dtype=np.uint8))
        ys.append(cls)
    if not xs:
        raise ArtifactError(f"{images.root}: the {split!r} split is empty; the classifier needs train and val images")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Accuracy per class index (None where a class has no samples)."""
    return [float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else None for c in range(num_classes)]


def load_classifier(path: str | Path) -> tuple[DigitClassifier, Manifest]:
    """The classifier of a finished `train-classifier` artifact, and its manifest."""
    manifest = require_complete(path, STAGE)
    with np.load(Path(path) / WEIGHTS, allow_pickle=False) as z:
        extra = {}
        if "net_w1" in z.files:
            extra = dict(net=FeatureNet(z["net_w1"], z["net_b1"]), train=RealDigits(z["train_grid"], z["train_label"]),
                         val=RealDigits(z["val_grid"], z["val_label"]))
        clf = DigitClassifier(z["coef"], z["intercept"], int(z["grid"]), **extra)
    return clf, manifest


def _fit(x: np.ndarray, y: np.ndarray, cfg: Config, num_classes: int) -> DigitClassifier:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=cfg.c, max_iter=cfg.max_iter).fit(to_grid(x, cfg.grid), y)
    coef = np.zeros((num_classes, cfg.grid**2))
    intercept = np.full(num_classes, -np.inf)  # classes absent from train are never predicted
    coef[model.classes_], intercept[model.classes_] = model.coef_, model.intercept_
    return DigitClassifier(coef, intercept, cfg.grid)


def _fit_net(x: np.ndarray, y: np.ndarray, cfg: Config) -> tuple[FeatureNet, object]:
    """The feature network on grids (N, grid*grid): sklearn's MLP, L-BFGS, L2 alpha = 1 / c (the logistic
    regression's penalty in sklearn's per-sample scaling); returns its hidden layer and the fitted model."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=(cfg.hidden,), alpha=1.0 / cfg.c, solver="lbfgs",
                          max_iter=cfg.net_max_iter, random_state=cfg.seed)
    with warnings.catch_warnings():  # a fixed iteration budget is the recipe, not a failure
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return FeatureNet(model.coefs_[0], model.intercepts_[0]), model


def run(cfg: Config) -> Manifest:
    """Fit on the train split, score on val, store the coefficients and the accuracies."""
    t0 = time.time()
    images = ImageShards(cfg.images)
    config = {**config_to_dict(cfg, semantic_only=True), "images_fingerprint": images.manifest.fingerprint}
    with OutputDir(cfg.out, STAGE, config, overwrite=cfg.overwrite, owns=(WEIGHTS,), inputs=[cfg.images]) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        (x_tr, y_tr), (x_val, y_val) = load_split(images, "train"), load_split(images, "val")
        clf = _fit(x_tr, y_tr, cfg, len(images.classes))
        g_tr, g_val = to_grid(x_tr, cfg.grid), to_grid(x_val, cfg.grid)
        net, net_model = _fit_net(g_tr, y_tr, cfg)
        clf = clf._replace(net=net, train=RealDigits(g_tr, y_tr), val=RealDigits(g_val, y_val))
        val_pred = clf.predict_grids(g_val)
        val_acc = float(np.mean(val_pred == y_val))
        if val_acc < cfg.min_val_accuracy:
            raise UserError(f"held-out accuracy {val_acc:.3f} is below --min-val-accuracy {cfg.min_val_accuracy}; "
                            f"this classifier cannot score class-consistency (wrong images artifact?)")
        buf = io.BytesIO()
        np.savez(buf, coef=clf.coef, intercept=clf.intercept, grid=np.int64(clf.grid), net_w1=net.w1, net_b1=net.b1,
                 train_grid=g_tr, train_label=y_tr, val_grid=g_val, val_label=y_val)
        atomic_write_bytes(od.path / WEIGHTS, buf.getvalue())
        log.info("classifier: val accuracy %.4f on %d images", val_acc, len(y_val))
        return od.finish(Manifest(
            stage=STAGE, complete=True, versions=environment(),
            counts={"written": 1, "skipped": 0, "failed": 0},
            inputs={"images": {"path": str(cfg.images), "fingerprint": images.manifest.fingerprint}},
            shards=[{"name": WEIGHTS, "sha256": file_sha256(od.path / WEIGHTS)}],
            extra={"val_accuracy": val_acc, "train_accuracy": float(np.mean(clf.predict_grids(g_tr) == y_tr)),
                   "val_accuracy_per_class": per_class_accuracy(val_pred, y_val, len(images.classes)),
                   "num_train": len(y_tr), "num_val": len(y_val), "classes": images.classes, "grid": cfg.grid,
                   "feature_net": {"hidden": cfg.hidden, "val_accuracy": float(net_model.score(g_val, y_val)),
                                   "train_accuracy": float(net_model.score(g_tr, y_tr))}},
            timings={"seconds": round(time.time() - t0, 3)}))


cli = command_from_config(
    Config, run, "train-classifier", __doc__.split("\n\n")[1],
    summary=lambda m: f"train-classifier: val accuracy {m.extra['val_accuracy']:.4f} "
                      f"({m.extra['num_val']} held-out images, train {m.extra['train_accuracy']:.4f})")
