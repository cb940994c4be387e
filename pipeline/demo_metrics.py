"""The digits demo's own metrics: within-class diversity, precision/recall in a digit feature space, seed spread.

`make demo` samples the same networks with three noise seeds at each guidance scale (`flatdino sample --seed K`);
`python -m pipeline.demo_metrics` reads those sample artifacts, the demo classifier and the `fid` metrics of seed 0,
and writes one report, `shards/report/<run>/metrics.json`, with a summary line per guidance scale. Definitions:

- **Within-class diversity**: each image (uint8 256 x 256) is block-averaged back to the digits' 8 x 8 grid and put on
  their 0..16 scale (grayscale, `stages.classifier.to_grid` x 16); per class, the mean L2 distance over all pairs of
  its samples; averaged over the classes. The real training digits give 36.1 (scikit-learn's `load_digits` gives the
  same on its raw 0..16 arrays). `ratio` = generated / real: 1 means as varied as the data, near 0 means copies.
- **Precision / recall**: improved precision and recall with k = 3 (Kynkaanniemi et al. 2019, `pipeline.metrics.
  precision_recall`, the definition used for Inception features), in the penultimate layer of the demo classifier's
  feature network (64 ReLU units of a one-hidden-layer MLP trained on the same 8 x 8 grids), against all real training
  digits. Precision: share of samples inside the real digits' k-NN balls (are they digit-like); recall: share of real
  digits inside the samples' balls (is the variety of the data covered). Held-out real digits against the training
  digits give the ceiling for this sample size (`reference.real_val`).
- **Seed spread**: each metric for every seed, the mean over seeds (the headline) and max - min.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import click
import numpy as np

from pipeline.manifest import ArtifactError, atomic_write_json, require_complete

DIGIT_MAX = 16.0  # scikit-learn's digits are integers 0..16
DIVERSITY = ("mean L2 distance over pairs of samples of the same class, images block-averaged to the digits' 8 x 8 "
             "grid on their 0..16 scale, averaged over classes; ratio = generated / real training digits")
SCHEMA = 1


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
    """{seed: value} -> the mean over seeds (headline), every seed's value, max - min and the population std."""
    v = np.array(list(values.values()), dtype=np.float64)
    return {"value": float(v.mean()), "per_seed": {str(k): float(x) for k, x in values.items()},
            "spread": float(v.max() - v.min()), "std": float(v.std())}


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


def _sampler_key(extra: dict) -> tuple:
    """What must agree between the seeds of one guidance setting: everything in the sampling protocol but the seed."""
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in extra.items() if k != "seed"))


def group_by_setting(sample_dirs: list[Path]) -> list[list[tuple[int, Path, dict]]]:
    """Sample artifacts grouped by sampling setting (same networks and protocol, different seeds), in given order."""
    groups: dict[tuple, list] = {}
    for d in sample_dirs:
        m = require_complete(d, "sample")
        key = (_sampler_key(m.extra), json.dumps(m.models, sort_keys=True))
        group = groups.setdefault(key, [])
        if any(seed == m.extra["seed"] for seed, _, _ in group):
            raise ArtifactError(f"{d}: seed {m.extra['seed']} appears twice for the same sampling setting")
        group.append((int(m.extra["seed"]), d, m.extra))
    return list(groups.values())


def _fid_of(fid_dirs: list[Path], sample_dir: Path) -> dict | None:
    """The metrics.json of the fid run over `sample_dir`'s samples, if one was given."""
    for f in fid_dirs:
        report = json.loads((f / "metrics.json").read_text())
        if Path(report["protocol"]["samples"]["path"]).parent.resolve() == sample_dir.resolve():
            return report
    return None


def setting_report(group: list[tuple[int, Path, dict]], clf, ref: Reference, fid_dirs: list[Path]) -> dict:
    """Every metric of one sampling setting over its seeds."""
    from stages.fid import open_samples

    per_seed: dict[str, dict[int, float]] = {}
    for seed, d, _ in sorted(group, key=lambda g: g[0]):
        s = open_samples(d)
        for name, value in sample_metrics(np.asarray(s.images), s.labels, clf, ref).items():
            per_seed.setdefault(name, {})[seed] = value
    seed, first, extra = min(group, key=lambda g: g[0])
    out = {"cfg_scale": extra["cfg_scale"], "cfg_interval": extra["cfg_interval"], "steps": extra["steps"],
           "num_samples": extra["num_samples"], "seeds": sorted(g[0] for g in group),
           "samples": [str(g[1]) for g in sorted(group, key=lambda g: g[0])],
           **{name: spread(values) for name, values in per_seed.items()}}
    out["diversity"]["real"] = ref.diversity
    fid = _fid_of(fid_dirs, first)
    if fid is not None:
        out["fid"] = {"seed": seed, "summary": fid["summary"],
                      "fd_dinov2": fid["metrics"]["fd_dinov2"]["value"],
                      "class_consistency": fid["metrics"]["class_consistency"]["value"]}
    return out


def summary_line(s: dict) -> str:
    """One line per guidance setting: the headline (mean over seeds) and the spread of class-consistency."""
    cc, n = s["class_consistency"], len(s["seeds"])
    fd = f" | FD-DINOv2(cls) {s['fid']['fd_dinov2']:.4f} (seed {s['fid']['seed']})" if "fid" in s else ""
    return (f"w = {s['cfg_scale']:g}: class-consistency {cc['value']:.3f} (spread {cc['spread']:.3f} over {n} seeds) "
            f"| diversity {s['diversity']['value']:.1f} vs real {s['diversity']['real']:.1f}, ratio "
            f"{s['diversity_ratio']['value']:.2f} | precision {s['precision']['value']:.3f} recall "
            f"{s['recall']['value']:.3f} (classifier features, k=3){fd} | {s['num_samples']} samples x {n} seeds")


def report(classifier: Path, sample_dirs: list[Path], fid_dirs: list[Path]) -> dict:
    """The demo report over every sampling setting found among `sample_dirs`."""
    from stages.classifier import load_classifier

    clf, clf_m = load_classifier(classifier)
    ref = reference(clf)  # refuses an artifact without the feature network
    net = clf_m.extra["feature_net"]
    real_val = real_val_metrics(clf, ref)
    settings = [setting_report(g, clf, ref, fid_dirs) for g in group_by_setting(sample_dirs)]
    return {
        "schema": SCHEMA,
        "definitions": __doc__.split("\n\n", 2)[2],
        "classifier": {"path": str(classifier), "fingerprint": clf_m.fingerprint,
                       "val_accuracy": clf_m.extra["val_accuracy"],
                       "feature_space": f"hidden layer of the classifier's feature network "
                                        f"({net['hidden']} ReLU units, held-out accuracy {net['val_accuracy']:.3f})"},
        "reference": {"num_real": int(len(ref.labels)), "diversity": ref.diversity, "real_val": real_val},
        "settings": settings,
        "summary": [summary_line(s) for s in settings],
    }


@click.command("demo-report", help="The digits demo's report: within-class diversity (and its ratio to the real "
               "digits), precision / recall in the demo classifier's feature layer and class-consistency of every "
               "sampling setting among SAMPLES, each as the mean over its seeds with the spread; writes --out "
               "(metrics.json) and prints one line per setting. See pipeline/demo_metrics.py for the definitions.")
@click.option("--classifier", type=click.Path(path_type=Path), required=True, help="train-classifier artifact")
@click.option("--fid", "fid_dirs", type=click.Path(path_type=Path), multiple=True,
              help="fid artifacts whose summaries join the report (matched to the samples they measured)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="the report, e.g. .../metrics.json")
@click.argument("samples", nargs=-1, required=True, type=click.Path(path_type=Path))
def cli(classifier: Path, fid_dirs: tuple[Path, ...], out: Path, samples: tuple[Path, ...]) -> None:
    try:
        rep = report(classifier, list(samples), list(fid_dirs))
    except ArtifactError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, rep)
    for line in rep["summary"]:
        click.echo(line)


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.demo_metrics ...`, the same as `flatdino demo-report ...`."""
    cli.main(args=argv, prog_name="flatdino demo-report", standalone_mode=True)


if __name__ == "__main__":
    main()
