"""Sample-quality metrics: Fréchet distance, Inception Score, improved precision/recall, and their plumbing.

Lineage: the numbers follow OpenAI's guided-diffusion TF evaluator (`evaluations/evaluator.py`, which the official
FlatDINO `metrics/adm.py` ports verbatim): FID from pool_3 mean/covariance, sFID from the first 7 channels of the
`mixed_6/conv` spatial map (17 x 17 x 7 = 2,023 dims, flattened in ADM's NHWC order), IS from the unbiased logits of
the Inception softmax head in splits of 5,000 samples, and improved precision/recall (Kynkäänniemi et al. 2019) with
k = 3 on pool_3 features, squared Euclidean distances and `<=` ball membership. The Inception network itself is
torch-fidelity's `inception-v3-compat` port of the same TF graph; ADM's reference batches hold mu/sigma (and
mu_s/sigma_s) that ADM computed with the TensorFlow graph itself, so a FID against them mixes the two
implementations (reported as such by `flatdino fid`).

Departures, all deliberate:
- The matrix square root in the Fréchet distance is eigen-based (symmetric PSD square root of sigma1, then the
  eigenvalues of sqrt(S1) S2 sqrt(S1)), in float64. It equals `scipy.linalg.sqrtm` on well-conditioned inputs and
  stays real and finite on the rank-deficient covariances that small sample sets produce, where sqrtm needs ADM's
  "add eps to the diagonal" retry.
- Means and covariances are accumulated as per-block moments (count, mean, centred scatter) merged with Chan et
  al.'s pairwise formula in a fixed block order, so statistics are identical whatever the number of processes, and
  ImageNet-train reference statistics never need every feature in memory.
- Distances for precision/recall are computed in float64 (ADM uses float32 on GPU), so results are exact on ties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch

IS_SPLIT_SIZE = 5000  # ADM evaluator: Inception Score over consecutive splits of 5,000 samples
PR_NEIGHBOURS = 3  # improved precision/recall, k = 3 (ADM, Kynkäänniemi et al.)
INCEPTION_FEATURES = ("2048", "logits_unbiased")  # pool_3 and the bias-free softmax logits (ADM's IS input)
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_HASH_PREFIX = "6726825d"  # sha256 prefix in the file name (torch.hub convention)
# sFID (ADM evaluator): tensor "mixed_6/conv:0" of the TF graph, i.e. the 1x1 branch of the 4th 17x17 block, which
# torch-fidelity's weight converter maps to Mixed_6d.branch1x1 (ReLU output, (B, 192, 17, 17)); ADM keeps [..., :7].
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7


class MetricUnavailable(Exception):
    """A metric cannot be computed here (e.g. Inception weights absent offline); the reason goes into metrics.json."""


def elementwise_mean_std(chunks: Callable[[], Iterable[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean and population std over axis 0 of the concatenated chunks that `chunks()` yields (called once
    per pass). Two passes (mean, then centred second moment) so nothing cancels, in the chunks' fixed order, so
    every process that runs it gets the same bits whatever wrote the data."""
    total, n = 0.0, 0
    for c in chunks():
        total = total + c.astype(np.float64).sum(0)
        n += len(c)
    mean = total / n
    m2 = np.zeros_like(mean)
    for c in chunks():
        m2 += ((c.astype(np.float64) - mean) ** 2).sum(0)
    return mean, np.sqrt(m2 / n)


class Moments(NamedTuple):
    """Sufficient statistics of a feature set: count, mean (D,) and centred scatter sum (D, D), all float64."""

    n: int
    mean: np.ndarray
    m2: np.ndarray


class GaussianStats(NamedTuple):
    """Mean (D,) and unbiased covariance (D, D) of a feature set, float64, as stored in ADM reference batches."""

    mu: np.ndarray
    sigma: np.ndarray


class InceptionFeatures(NamedTuple):
    """Per-image Inception features, float32: pool_3 (N, 2048), unbiased logits (N, 1008), sFID spatial (N, 2023)."""

    pool: np.ndarray
    logits: np.ndarray
    spatial: np.ndarray


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def moments(feats: np.ndarray) -> Moments:
    """Moments of one block of features (N, D) in float64."""
    x = np.asarray(feats, dtype=np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    return Moments(len(x), mean, xc.T @ xc)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Combine the moments of two disjoint sets (Chan, Golub & LeVeque's pairwise update)."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.m2 + b.m2 + np.outer(delta, delta) * (a.n * b.n / n)
    return Moments(n, mean, m2)


def merge_all(parts: list[Moments]) -> Moments:
    """Merge block moments strictly left to right, so the result depends only on the block order."""
    total = parts[0]
    for part in parts[1:]:
        total = merge_moments(total, part)
    return total


def gaussian_stats(m: Moments) -> GaussianStats:
    """Mean and unbiased (ddof=1, as `np.cov`) covariance from moments."""
    if m.n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {m.n}")
    return GaussianStats(m.mean, m.m2 / (m.n - 1))


def feature_stats(feats: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance of features (N, D), float64."""
    return gaussian_stats(moments(feats))


def _clip_spectrum(w: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a PSD matrix that are round-off, as a rank tolerance does (|w| <= d eps max|w|)."""
    tol = len(w) * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), np.finfo(np.float64).tiny)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (round-off eigenvalues set to zero)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(_clip_spectrum(w))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}), with tr((S1 S2)^{1/2}) computed as the sum of the
    square roots of the eigenvalues of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2} (same spectrum as S1 S2).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(_clip_spectrum(eig)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance between two stored Gaussian statistics."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from unbiased logits (N, C), in consecutive splits (ADM).

    Each split of `split_size` rows (the last one may be shorter) scores exp(E_x KL(p(y|x) || p(y))).
    """
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    scores = []
    for start in range(0, len(x), split_size):
        chunk = x[start : start + split_size]
        log_p = chunk.log_softmax(dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(len(chunk))  # log mean_x p(y|x)
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (Na, Nb) in float64, clipped at zero."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


def manifold_radii(feats: torch.Tensor, k: int = PR_NEIGHBOURS, block: int = 4096) -> torch.Tensor:
    """Squared distance of each row of feats (N, D) to its k-th nearest neighbour, the point itself excluded."""
    if len(feats) <= k:
        raise ValueError(f"need more than k={k} feature vectors for precision/recall, got {len(feats)}")
    out = []
    for start in range(0, len(feats), block):
        d = _sq_dists(feats[start : start + block], feats)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # column 0 is the point itself
    return torch.cat(out)


def _covered(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """Boolean (Nq,): whether each query lies in at least one ball (centre, squared radius)."""
    hit = []
    for start in range(0, len(queries), block):
        d = _sq_dists(queries[start : start + block], centres)
        hit.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(hit)


def precision_recall(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    k: int = PR_NEIGHBOURS,
    device: str | torch.device = "cpu",
    block: int = 4096,
) -> PrecisionRecall:
    """Improved precision (share of fake inside the real manifold) and recall (share of real inside the fake one).

    Args:
        real: reference features (Nr, D).
        fake: generated features (Nf, D).
        k: neighbourhood size defining each point's ball radius.
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    precision = _covered(f, r, manifold_radii(r, k, block), block).double().mean()
    recall = _covered(r, f, manifold_radii(f, k, block), block).double().mean()
    return PrecisionRecall(float(precision), float(recall))


def inception_cache_path() -> Path:
    """Where torch-fidelity (torch.hub) caches the `inception-v3-compat` weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


def missing_inception_message(cached: Path) -> str:
    """What to do when the Inception weights are absent: which file goes where, or which flag to pass."""
    return (f"Inception weights not found (no --inception-weights given, nothing at {cached}). Put "
            f"{INCEPTION_URL.rsplit('/', 1)[1]} (torch-fidelity's inception-v3-compat, {INCEPTION_URL}) at {cached}, "
            f"or pass --inception-weights FILE; pass --download to fetch it when online")


def resolve_inception_weights(path: Path | None, download: bool) -> Path:
    """Find the Inception weights: an explicit file, else the torch.hub cache, else a download when asked for.

    Nothing touches the network unless `download` is set, so an offline run learns at once what is missing.

    Raises:
        FileNotFoundError: an explicit `path` does not exist (a user mistake, not an unavailable metric).
        MetricUnavailable: no explicit file, nothing cached, and downloading is off or fails (offline).
    """
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Inception weights file {path} does not exist")
        return Path(path)
    cached = inception_cache_path()
    if cached.is_file():
        return cached
    if not download:
        raise MetricUnavailable(missing_inception_message(cached))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), hash_prefix=INCEPTION_HASH_PREFIX, progress=False)
    except (OSError, RuntimeError) as e:  # URLError and socket errors are OSErrors; a hash mismatch a RuntimeError
        raise MetricUnavailable(f"Inception weights not cached at {cached} and download failed: {e}") from e
    return cached


def load_inception(weights: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's `inception-v3-compat` extractor giving pool_3 (2048) and unbiased logits (1008).

    The file is first opened with `weights_only=True`, so only a plain tensor state dict is ever unpickled
    (torch-fidelity itself loads with `weights_only=False`); its strict load then checks every key and shape.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{weights} is not an inception-v3-compat state dict (no 'fc.weight')")
    model = FeatureExtractorInceptionV3("inception-v3-compat", list(INCEPTION_FEATURES), str(weights))
    return model.to(device)


@torch.no_grad()
def inception_features(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> InceptionFeatures:
    """Pool_3 (N, 2048), unbiased logits (N, 1008) and sFID spatial features (N, 2023), float32, from uint8 images
    (N, H, W, 3), in one pass.

    The extractor resizes to 299 itself (TF1-compatible bilinear), as the ADM evaluator's graph does. The spatial
    features are the first 7 channels of `SPATIAL_LAYER`'s (B, 192, 17, 17) output, flattened as ADM flattens its
    NHWC tensor: index (h * 17 + w) * 7 + c.
    """
    device = next(model.parameters()).device
    pools, logits, spatial = [], [], []

    def keep_spatial(module, inputs, out):  # out: (B, 192, 17, 17) after BatchNorm + ReLU
        spatial.append(out[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float().cpu().numpy())

    hook = model.get_submodule(SPATIAL_LAYER).register_forward_hook(keep_spatial)
    try:
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)
            pool, logit = model(x.permute(0, 3, 1, 2))  # (B, H, W, 3) -> (B, 3, H, W) uint8
            pools.append(pool.cpu().numpy())
            logits.append(logit.cpu().numpy())
    finally:
        hook.remove()
    return InceptionFeatures(np.concatenate(pools), np.concatenate(logits), np.concatenate(spatial))
