"""The digits demo's own metrics: within-class diversity, precision/recall in a digit feature space, seed spread.

`flatdino demo-report` (stages/report.py) samples the demo's chain at several noise seeds per guidance scale and
measures each seed's samples with these definitions; `flatdino fid --classifier` measures one sample artifact with
the same ones. Definitions:

- **Within-class diversity**: each image (uint8 256 x 256) is block-averaged back to the digits' 8 x 8 grid and put on
  their 0..16 scale (grayscale, `stages.classifier.to_grid` x 16); per class, the mean L2 distance over all pairs of
  its samples; averaged over the classes. The real training digits give 36.1 (scikit-learn's `load_digits` gives the
  same on its raw 0..16 arrays). `ratio` = generated / real: 1 means as varied as the data, near 0 means copies.
- **Precision / recall**: improved precision and recall with k = 3 (Kynkaanniemi et al. 2019, `pipeline.metrics.
  precision_recall`, the definition used for Inception features), in the penultimate layer of the demo classifier's
  feature network (64 ReLU units of a one-hidden-layer MLP trained on the same 8 x 8 grids), against all real training
  digits. Precision: share of samples inside the real digits' k-NN balls (are they digit-like); recall: share of real
  digits inside the samples' balls (is the variety of the data covered). Recall depends on the number of samples (the
  samples' k-NN balls shrink as it grows), so it is only comparable at equal sample counts. Held-out real digits
  against the training digits give the ceiling for their own sample size (`reference.real_val`).
- **Seed spread**: each metric for every seed, the mean over seeds (the headline), max - min, and the standard error
  of the mean (sample standard deviation over seeds / sqrt(seeds)).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipeline.manifest import ArtifactError

DIGIT_MAX = 16.0  # scikit-learn's digits are integers 0..16
DIVERSITY = ("mean L2 distance over pairs of samples of the same class, images block-averaged to the digits' 8 x 8 "
             "grid on their 0..16 scale, averaged over classes; ratio = generated / real training digits")
SCHEMA = 2  # 2: the report samples the chain itself (stages/report.py); standard errors over seeds


def digit_grids(images: np.ndarray, grid: int = 8) -> np.ndarray:
    """uint8 images (N, H, W, 3) -> (N, grid * grid) float64 on the digits' 0..16 scale (block average, then luma)."""
    from stages.classifier import to_grid

    return to_grid(images, grid) * DIGIT_MAX


def _mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean L2 distance over all unordered pairs of rows of x (n, D), n >= 2; float64, from the differences."""
    from scipy.spatial.distance import pdist

    return float(pdist(x, "euclidean").mean())


def within_class_diversity(x: np.ndarray, labels: np.ndarray) -> tuple[float, dict[int, float]]:
    """Mean over classes of the mean pairwise L2 distance between rows (N, D) of the same class (classes with at least
    two rows); returns (mean, {class: value})."""
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels)
    per_class = {int(c): _mean_pairwise_distance(x[labels == c]) for c in np.unique(labels)
                 if np.sum(labels == c) >= 2}
    if not per_class:
        raise ValueError("within-class diversity needs at least two samples of some class")
    return float(np.mean(list(per_class.values()))), per_class


def spread(values: dict[int, float]) -> dict:
    """{seed: value} -> the mean over seeds (headline), every seed's value, max - min, the population std and the
    standard error of the mean (sample std / sqrt(seeds); None for one seed)."""
    v = np.array(list(values.values()), dtype=np.float64)
    sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
    return {"value": float(v.mean()), "per_seed": {str(k): float(x) for k, x in values.items()},
            "spread": float(v.max() - v.min()), "std": float(v.std()), "sem": sem}


class Reference(NamedTuple):
    """The real training digits as the classifier saw them: 0..16 grids, labels, features, within-class diversity."""

    grids: np.ndarray  # (N, 64) on 0..16
    labels: np.ndarray  # (N,)
    features: np.ndarray  # (N, H) feature-network activations
    diversity: float


def reference(clf) -> Reference:
    """The classifier artifact's real training digits, their features and within-class diversity."""
    if clf.net is None:
        raise ArtifactError("the classifier artifact has no feature network or real digits (written by an older "
                            "version); re-run `flatdino train-classifier` with --overwrite")
    grids = clf.train.grid * DIGIT_MAX
    return Reference(grids, clf.train.label, clf.net.features(clf.train.grid),
                     within_class_diversity(grids, clf.train.label)[0])


def grid_metrics(grids: np.ndarray, labels: np.ndarray, pred: np.ndarray, clf, ref: Reference) -> dict[str, float]:
    """Class-consistency, diversity (and its ratio to the real digits), precision and recall of 0..16 grids (N, 64)
    with their conditioning labels and the classifier's predictions."""
    from pipeline.metrics import precision_recall

    diversity, _ = within_class_diversity(grids, labels)
    pr = precision_recall(ref.features, clf.net.features(grids / DIGIT_MAX), k=3)
    return {"class_consistency": float(np.mean(pred == labels)), "diversity": diversity,
            "diversity_ratio": diversity / ref.diversity, "precision": pr.precision, "recall": pr.recall}


def sample_metrics(images: np.ndarray, labels: np.ndarray, clf, ref: Reference) -> dict[str, float]:
    """`grid_metrics` of uint8 images (N, H, W, 3)."""
    from stages.classifier import to_grid

    grid = to_grid(images, clf.grid)  # once, for the prediction and the metrics
    return grid_metrics(grid * DIGIT_MAX, labels, clf.predict_grids(grid), clf, ref)


def real_val_metrics(clf, ref: Reference) -> dict[str, float]:
    """The same metrics for the held-out real digits: what real data of about the samples' size scores."""
    grids = clf.val.grid * DIGIT_MAX
    return grid_metrics(grids, clf.val.label, clf.predict_grids(clf.val.grid), clf, ref)


# ----------------------------------------------------------------------------------------------- the report


def setting_report(per_seed: dict[int, dict[str, float]], ref: Reference) -> dict:
    """{seed: `grid_metrics` of that seed's samples} -> every metric's `spread` over the seeds (plus the real
    digits' diversity beside the samples')."""
    names = next(iter(per_seed.values())).keys()
    out = {name: spread({seed: m[name] for seed, m in sorted(per_seed.items())}) for name in names}
    out["diversity"]["real"] = ref.diversity
    return out


def _pm(entry: dict, digits: int = 3) -> str:
    """'mean ± standard error' of a `spread` entry (just the mean for one seed)."""
    sem = "" if entry["sem"] is None else f" ± {entry['sem']:.{digits}f}"
    return f"{entry['value']:.{digits}f}{sem}"


def summary_line(s: dict) -> str:
    """One line per guidance setting: every headline (mean over seeds ± standard error) and the sample counts."""
    cc, n = s["class_consistency"], len(s["seeds"])
    fd = ""
    if "fid" in s:  # FD-DINOv2 of `flatdino fid` on `make sample`'s artifact (n/a without an encoder)
        f = s["fid"]
        value = "n/a" if f["fd_dinov2"] is None else f"{f['fd_dinov2']:.4f}"
        fd = f" | FD-DINOv2(cls) {value} ({f['num_samples']} samples, seed {f['seed']})"
    return (f"w = {s['cfg_scale']:g}: class-consistency {_pm(cc)} (spread {cc['spread']:.3f}) | diversity "
            f"{s['diversity']['value']:.1f} vs real {s['diversity']['real']:.1f}, ratio {_pm(s['diversity_ratio'])} "
            f"| precision {_pm(s['precision'])} recall {_pm(s['recall'])} (classifier features, k=3){fd} | "
            f"{s['num_samples']} samples x {n} seeds, ± standard error over seeds")
