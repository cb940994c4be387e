"""`flatdino fid-ref` and `flatdino fid`: reference statistics from image shards, and sample-quality metrics.

Protocol (SPEC.md 9, 13.15): images are uint8 256x256 (shards go through the ADM centre crop first, as samples and
reconstructions already are); torch-fidelity's `inception-v3-compat` resizes them to 299 itself and gives pool_3
(FID, precision/recall with k = 3), the first 7 channels of `mixed_6/conv` (sFID, 2,023 dims) and the unbiased
logits (IS in splits of 5,000); our frozen DINOv2 encoder gives the CLS token (FD-DINOv2, the headline) and the mean
patch token. Fréchet distances are float64 (pipeline.metrics). The reference is ADM's
`VIRTUAL_imagenet256_labeled.npz` (its mu/sigma and mu_s/sigma_s for FID and sFID, its images for precision/recall
and FD-DINOv2), any ADM-format image npz, or a `fid-ref` artifact. ADM computed the npz's statistics with
TensorFlow's Inception graph while the samples go through torch-fidelity's port of it; metrics.json and the summary
line say so whenever that is the case. rFID is `fid` on `flatdino reconstruct`'s flatdino.npz against its
originals.npz (or `fid-ref --split val`). gFID against training-set statistics is the ADM convention, hence
`fid-ref --split train` by default.

Work is split into blocks of global sample indices (rank r takes blocks r::W); each block stores the moments of
every feature space plus the raw features that later steps need, and the main process merges blocks in index
order, so every number is identical whatever the number of processes. Metrics whose network is unavailable
(Inception weights absent) are reported as unavailable with what to do about it, at once and without touching the
network (`--download` fetches the weights; `--require-inception` makes their absence an error); the others are still
computed.
"""

from __future__ import annotations

import io
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch

from models.encoder import FeatureEncoder, adm_center_crop, load_rae
from pipeline import metrics
from pipeline.config import Checked, command_from_config, config_to_dict, opt
from pipeline.manifest import (local_dirs, ArtifactError, Manifest, OutputDir, UserError, atomic_write_bytes, atomic_write_json,
                               file_sha256, read_manifest, require_complete)
from pipeline.runtime import Runtime, environment, get_logger, launch, progress
from pipeline.shards import ImageShards, ShardSpec, load_rgb, plan_shards
from pipeline import demo_metrics
from stages.classifier import DigitClassifier, load_classifier, to_grid

log = get_logger(__name__)

REFERENCE = "reference.npz"
METRICS = "metrics.json"
SAMPLE_NAMES = ("samples.npz",)  # what `sample` writes; `reconstruct`'s npz files are passed by path
MOMENT_SPACES = ("pool", "spatial", "dino_cls", "dino_patch_mean")  # feature spaces with Fréchet statistics
MOMENTS_ONLY = ("spatial",)  # spaces whose raw per-image features no later step needs (2,023 dims each)
TF_GRAPH = "ADM npz (TensorFlow Inception graph, classify_image_graph_def.pb)"
TORCH_PORT = "torch-fidelity inception-v3-compat"
DINO_SPACES = {"dino_cls": "fd_dinov2", "dino_patch_mean": "fd_dinov2_patch_mean"}


# ----------------------------------------------------------------------------------------------- configs


def _download_field():
    return field(default=False, metadata=opt(
        "download the Inception weights into the torch.hub cache when absent (off: nothing touches the network)",
        runtime=True))


def _require_inception_field():
    return field(default=False, metadata=opt(
        "fail (exit non-zero) when the Inception weights are absent, instead of reporting FID etc. as n/a",
        runtime=True))


@dataclass(frozen=True)
class RefConfig(Checked):
    images: Path = field(metadata=opt("images artifact (flatdino images --out)", runtime=True))
    out: Path = field(metadata=opt("output directory, e.g. shards/fid-ref/demo", runtime=True))
    split: Literal["train", "val"] = field(default="train", metadata=opt(
        "train for gFID (ADM uses training-set statistics), val for rFID against `flatdino reconstruct`"))
    encoder: str | None = field(default=None, metadata=opt("RAE directory for FD-DINOv2 (omit: no DINOv2 stats)", runtime=True))
    inception_weights: Path | None = field(default=None, metadata=opt(
        "torch-fidelity inception-v3-compat weights (.pth); default: the torch.hub cache (see --download)", runtime=True))
    pr_subset: int = field(default=10000, metadata=opt(
        "reference images whose pool_3 features are kept for precision/recall (seeded subset; ADM's batch is 10k)", min=1))
    seed: int = field(default=0, metadata=opt("seed of the precision/recall subset", min=0))
    block_size: int = field(default=10000, metadata=opt(
        "images per work block (the unit of resume and of ranks); each block keeps float64 (D, D) scatter matrices "
        "(~75 MB with Inception pool_3 and sFID), so ImageNet-train takes ~9.6 GB of blocks at 10,000", min=1))
    batch_size: int = field(default=64, metadata=opt("images per network forward", runtime=True, min=1))
    num_workers: int = field(default=4, metadata=opt("image decoding threads per process", runtime=True, min=1))
    download: bool = _download_field()
    require_inception: bool = _require_inception_field()
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda, cuda:1 ...", runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing artifact made with another config",
                                                        runtime=True))


@dataclass(frozen=True)
class Config(Checked):
    samples: Path = field(metadata=opt(
        "an ADM-format .npz (arr_0 uint8 NHWC, arr_1 labels) or a `flatdino sample` directory; for rFID, "
        "`flatdino reconstruct`'s flatdino.npz (or rae.npz)", runtime=True))
    reference: Path = field(metadata=opt(
        "ADM reference batch .npz (VIRTUAL_imagenet256_labeled.npz), any ADM-format image npz (rFID: reconstruct's "
        "originals.npz), or a fid-ref directory", runtime=True))
    out: Path = field(metadata=opt("output directory for metrics.json, e.g. shards/fid/demo", runtime=True))
    encoder: str | None = field(default=None, metadata=opt("RAE directory for FD-DINOv2 (must match the reference's)", runtime=True))
    classifier: Path | None = field(default=None, metadata=opt("train-classifier artifact: adds class_consistency", runtime=True))
    inception_weights: Path | None = field(default=None, metadata=opt(
        "torch-fidelity inception-v3-compat weights (.pth); default: the torch.hub cache (see --download)", runtime=True))
    block_size: int = field(default=5000, metadata=opt("samples per work block (the unit of resume and of ranks)", min=1))
    batch_size: int = field(default=64, metadata=opt("images per network forward", runtime=True, min=1))
    download: bool = _download_field()
    require_inception: bool = _require_inception_field()
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda, cuda:1 ...", runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing artifact made with another config",
                                                        runtime=True))


# ----------------------------------------------------------------------------------------------- networks


class Extractors(NamedTuple):
    """The networks that turn images into features, each possibly absent with the reason why."""

    inception: torch.nn.Module | None
    inception_info: dict  # {"available", "sha256", "path"} or {"available": False, "reason"}
    encoder: FeatureEncoder | None
    encoder_info: dict
    classifier: DigitClassifier | None
    classifier_info: dict


def _load_inception(path: Path | None, download: bool, require: bool, device: torch.device) -> tuple:
    try:
        weights = metrics.resolve_inception_weights(path, download)
    except FileNotFoundError as e:
        raise UserError(f"--inception-weights: {e}") from e
    except metrics.MetricUnavailable as e:
        if require:
            raise UserError(f"--require-inception: {e}") from e
        log.warning("Inception metrics (FID, sFID, IS, precision/recall) unavailable: %s", e)
        return None, {"available": False, "reason": str(e)}
    try:
        model = metrics.load_inception(weights, device)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{weights}: not usable Inception weights ({e})") from e
    return model, {"available": True, "path": str(weights), "sha256": file_sha256(weights),
                   "network": f"{TORCH_PORT} (TF1 bilinear resize to 299)",
                   "spatial": f"{metrics.SPATIAL_LAYER} (TF mixed_6/conv)[:, :{metrics.SPATIAL_CHANNELS}], NHWC order"}


def _load_encoder(source: str | None, device: torch.device) -> tuple:
    if source is None:
        return None, {"available": False, "reason": "no --encoder given"}
    encoder = FeatureEncoder(load_rae(source)).to(device).eval()
    return encoder, {"available": True, "source": str(source), "fingerprint": encoder.fingerprint}


def load_extractors(inception: Path | None, download: bool, encoder: str | None, classifier: Path | None,
                    device: torch.device, require_inception: bool = False) -> Extractors:
    """Inception (or why not), the DINOv2 encoder (or why not) and the demo classifier (optional)."""
    inc, inc_info = _load_inception(inception, download, require_inception, device)
    enc, enc_info = _load_encoder(encoder, device)
    if classifier is None:
        return Extractors(inc, inc_info, enc, enc_info, None, {"available": False, "reason": "no --classifier"})
    clf, m = load_classifier(classifier)
    info = {"available": True, "path": str(classifier), "fingerprint": m.fingerprint,
            "val_accuracy": m.extra["val_accuracy"]}
    return Extractors(inc, inc_info, enc, enc_info, clf, info)


@torch.no_grad()
def extract(ex: Extractors, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Features of uint8 images (B, H, W, 3): pool (B, 2048), logits (B, 1008), spatial (B, 2023), dino_cls (B, D),
    dino_patch_mean (B, D), pred (B,), for whichever networks are present."""
    out: dict[str, np.ndarray] = {}
    if ex.inception is not None:
        inc = metrics.inception_features(ex.inception, images, batch_size)
        out["pool"], out["logits"], out["spatial"] = inc.pool, inc.logits, inc.spatial
    if ex.encoder is not None:
        cls, mean = [], []
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[s : s + batch_size])).permute(0, 3, 1, 2)  # a copy: may be read-only
            tokens = ex.encoder.encode_images(x.to(ex.encoder.mean.device))
            cls.append(tokens.cls.float().cpu().numpy())
            mean.append(tokens.patches.float().mean(dim=1).cpu().numpy())
        out["dino_cls"], out["dino_patch_mean"] = np.concatenate(cls), np.concatenate(mean)
    if ex.classifier is not None:
        grid = to_grid(images, ex.classifier.grid)  # (B, 64) in [0, 1], once for both
        out["pred"] = ex.classifier.predict_grids(grid)
        out["digit_grid"] = grid * demo_metrics.DIGIT_MAX  # on the digits' 0..16 scale
    return out


# ----------------------------------------------------------------------------------------------- image sources


def npz_array(path: Path, name: str) -> np.ndarray:
    """Array `name` of an .npz, memory-mapped when stored uncompressed (np.savez), else read into memory."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with zf.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        data_start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(
            local[28:30], "little")
        f.seek(data_start)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


class Samples(NamedTuple):
    images: np.ndarray  # (N, H, W, 3) uint8, possibly memory-mapped
    labels: np.ndarray | None  # (N,) int64
    path: Path
    fingerprint: str
    manifest: Manifest | None  # the producing stage's manifest (sample / reconstruct), when next to the npz


def open_samples(path: Path) -> Samples:
    """An ADM-format npz (`arr_0` uint8 NHWC, optional `arr_1` labels), directly or inside a stage directory."""
    npz = path
    if path.is_dir():
        found = [path / n for n in SAMPLE_NAMES if (path / n).exists()]
        if len(found) != 1:
            raise ArtifactError(f"{path}: expected exactly one of {SAMPLE_NAMES}, found {[p.name for p in found]}")
        npz = found[0]
    if not npz.is_file():
        raise ArtifactError(f"{npz}: no such samples file; run `flatdino sample` (or reconstruct) first")
    manifest = read_manifest(npz.parent) if (npz.parent / "manifest.json").exists() else None
    if manifest is not None and not manifest.complete:
        raise ArtifactError(f"{npz.parent}: the {manifest.stage} artifact is incomplete; re-run it to finish")
    with zipfile.ZipFile(npz) as zf:
        names = zf.namelist()
    images = npz_array(npz, "arr_0")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ArtifactError(f"{npz}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    labels = np.asarray(npz_array(npz, "arr_1"), dtype=np.int64) if "arr_1.npy" in names else None
    fingerprint = manifest.fingerprint if manifest is not None else file_sha256(npz)
    return Samples(images, labels, npz, fingerprint, manifest)


def _crop(item: tuple) -> np.ndarray:
    _, key, _, data, _ = item
    try:
        return np.asarray(adm_center_crop(load_rgb(data)), dtype=np.uint8)
    except ValueError as e:
        raise ArtifactError(f"image {key} cannot be decoded ({e})") from e


def shard_block(shards: ImageShards, split: str, spec: ShardSpec, pool: ThreadPoolExecutor) -> tuple:
    """Images [start, stop) of a split through the ADM centre crop (decoded on `pool`): uint8 (B, 256, 256, 3)
    and labels (B,)."""
    items = list(shards.iter(split, spec.start, spec.stop))
    return np.stack(list(pool.map(_crop, items))), np.asarray([it[2] for it in items], dtype=np.int64)


# ----------------------------------------------------------------------------------------------- blocks


def _block_name(spec: ShardSpec) -> str:
    return f"{spec.prefix}-{spec.index:06d}.npz"


def write_block(od: OutputDir, spec: ShardSpec, images: np.ndarray, labels: np.ndarray | None,
                keep: np.ndarray, ex: Extractors, batch_size: int) -> dict:
    """Features of one block: moments of every space over all rows, raw arrays for the `keep` rows; committed."""
    feats = extract(ex, images, batch_size)
    arrays = {"index": np.arange(spec.start, spec.stop)[keep]}
    if labels is not None:
        arrays["label_all"] = np.asarray(labels, dtype=np.int64)
        arrays["label"] = arrays["label_all"][keep]
    for name, value in feats.items():
        if name not in MOMENTS_ONLY:
            arrays[name] = value[keep]
        if name in MOMENT_SPACES:
            m = metrics.moments(value)
            arrays[f"{name}.mean"], arrays[f"{name}.m2"] = m.mean, m.m2
    buf = io.BytesIO()
    np.savez(buf, count=np.int64(len(images)), **arrays)
    atomic_write_bytes(od.path / _block_name(spec), buf.getvalue())
    record = {"name": _block_name(spec), "bytes": len(buf.getvalue()), "count": len(images),
              "sha256": file_sha256(od.path / _block_name(spec))}
    od.commit(record)
    return record


def run_blocks(od: OutputDir, plan: list[ShardSpec], rt: Runtime, load: Callable, keep: np.ndarray,
               ex: Extractors, batch_size: int) -> None:
    """Compute this rank's uncommitted blocks of `plan`; `load(spec)` returns (images, labels or None)."""
    done = od.committed()
    todo = [s for s in rt.share(plan) if _block_name(s) not in done]
    if not todo:
        return
    bar = progress(sum(len(s) for s in todo), f"features {todo[0].prefix}", "img", rt)
    for spec in todo:
        images, labels = load(spec)
        write_block(od, spec, images, labels, keep[spec.start : spec.stop], ex, batch_size)
        bar.update(len(spec))
    bar.close()


class Gathered(NamedTuple):
    moments: dict[str, metrics.Moments]  # per feature space, merged in block order
    arrays: dict[str, np.ndarray]  # kept rows, concatenated in block order


def gather(od: OutputDir, plan: list[ShardSpec]) -> Gathered | None:
    """Merge committed blocks in plan order; None while some block is still missing (another rank)."""
    if od.collect([_block_name(s) for s in plan]) is None:
        return None
    parts: dict[str, list] = {}
    moments: dict[str, list] = {}
    for spec in plan:
        with np.load(od.path / _block_name(spec), allow_pickle=False) as z:
            n = int(z["count"])
            for name in z.files:
                if name.endswith(".mean"):
                    space = name[: -len(".mean")]
                    moments.setdefault(space, []).append(metrics.Moments(n, z[name], z[space + ".m2"]))
                elif not name.endswith(".m2") and name != "count":
                    parts.setdefault(name, []).append(z[name])
    partial = sorted(k for k, v in moments.items() if len(v) != len(plan))
    if partial:  # blocks written by another version (e.g. before sFID) must not be merged into a subset's statistics
        raise ArtifactError(f"{od.path}: the {', '.join(partial)} statistics are missing from some blocks (written by "
                            f"another version of flatdino); re-run with --overwrite")
    return Gathered({k: metrics.merge_all(v) for k, v in moments.items()},
                    {k: np.concatenate(v) for k, v in parts.items()})


def _available(info: dict, key: str) -> str | None:
    """`info[key]` of an available network, None for an unavailable one."""
    return info[key] if info["available"] else None


# ----------------------------------------------------------------------------------------------- fid-ref


def pr_mask(n: int, size: int, seed: int) -> np.ndarray:
    """Boolean (n,): the seeded subset of reference rows whose raw pool features are kept for precision/recall."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size, replace=False) if size < n else slice(None)] = True
    return mask


def _write_reference(od: OutputDir, g: Gathered) -> dict[str, int]:
    arrays = {}
    for space, m in g.moments.items():
        st = metrics.gaussian_stats(m)
        arrays[f"{space}.mu"], arrays[f"{space}.sigma"] = st.mu, st.sigma
    if "pool" in g.arrays:
        arrays["pool"] = g.arrays["pool"]
    buf = io.BytesIO()
    np.savez(buf, index=g.arrays["index"], label=g.arrays["label"], **arrays)
    atomic_write_bytes(od.path / REFERENCE, buf.getvalue())
    return {int(k): int(v) for k, v in zip(*np.unique(g.arrays["label_all"], return_counts=True))}


def run_ref(cfg: RefConfig, rt: Runtime | None = None) -> Manifest | None:
    """Reference statistics of one split of an images artifact; the main process writes reference.npz."""
    rt, t0 = (rt or launch()).on(cfg.device, "fp32"), time.time()
    shards = ImageShards(cfg.images)
    n = shards.num_samples(cfg.split)
    if n < 2:
        raise ArtifactError(f"{cfg.images}: the {cfg.split!r} split has {n} images; statistics need at least 2")
    device = rt.device
    ex = load_extractors(cfg.inception_weights, cfg.download, cfg.encoder, None, device, cfg.require_inception)
    config = {**config_to_dict(cfg, semantic_only=True), "images": shards.manifest.fingerprint,
              "inception": _available(ex.inception_info, "sha256"),
              "encoder": _available(ex.encoder_info, "fingerprint")}
    with OutputDir(cfg.out, "fid_ref", config, overwrite=cfg.overwrite, rt=rt, owns=("ref-*.npz", REFERENCE),
                   inputs=[cfg.images, *local_dirs(cfg.encoder)]) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        plan = plan_shards(n, cfg.block_size, "ref")
        with ThreadPoolExecutor(cfg.num_workers) as pool:
            run_blocks(od, plan, rt, lambda s: shard_block(shards, cfg.split, s, pool),
                       pr_mask(n, cfg.pr_subset, cfg.seed), ex, cfg.batch_size)
        rt.barrier()
        g = gather(od, plan) if rt.is_main else None
        if g is None:
            return None
        class_counts = _write_reference(od, g)
        return od.finish(Manifest(
            stage="fid_ref", complete=True, versions=environment(),
            counts={"written": n, "skipped": 0, "failed": 0},
            inputs={"images": {"path": str(cfg.images), "fingerprint": shards.manifest.fingerprint}},
            models={"inception": ex.inception_info, "encoder": ex.encoder_info},
            shards=[{"name": REFERENCE, "sha256": file_sha256(od.path / REFERENCE)}],
            extra={"split": cfg.split, "num_images": n, "class_counts": class_counts, "classes": shards.classes,
                   "pr_subset": int(len(g.arrays["pool"])) if "pool" in g.arrays else 0, "spaces": sorted(g.moments),
                   "inception": ex.inception_info, "encoder": ex.encoder_info,
                   "protocol": f"ADM centre crop 256, uint8; {TORCH_PORT} resizes to 299 (TF1 bilinear): pool_3 "
                               f"(FID) and mixed_6/conv[..., :7] (sFID); DINOv2 antialiased bicubic to 224"},
            timings={"seconds": round(time.time() - t0, 3)}))


# ----------------------------------------------------------------------------------------------- fid


class Reference(NamedTuple):
    kind: str  # "adm" (reference batch npz) or "fid_ref" (artifact)
    path: Path
    fingerprint: str
    stats: dict[str, metrics.GaussianStats]  # per feature space, as stored
    pool: np.ndarray | None  # stored pool_3 features for precision/recall
    images: np.ndarray | None  # ADM images still to go through the networks
    inception_sha: str | None
    encoder_fingerprint: str | None
    num_images: int
    tf_graph_spaces: tuple[str, ...] = ()  # spaces whose stored statistics ADM computed with the TF graph


def open_reference(path: Path) -> Reference:
    """An ADM reference batch (.npz with arr_0 and/or mu/sigma) or a `fid-ref` artifact directory."""
    if path.is_dir():
        m = require_complete(path, "fid_ref")
        with np.load(path / REFERENCE, allow_pickle=False) as z:
            stats = {s: metrics.GaussianStats(z[f"{s}.mu"], z[f"{s}.sigma"]) for s in m.extra["spaces"]}
            pool = z["pool"] if "pool" in z.files else None
        return Reference("fid_ref", path, m.fingerprint, stats, pool, None, _available(m.extra["inception"], "sha256"),
                         _available(m.extra["encoder"], "fingerprint"), m.extra["num_images"])
    if not path.is_file():
        raise ArtifactError(f"{path}: no such reference; pass VIRTUAL_imagenet256_labeled.npz or a fid-ref directory")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            stats = {space: metrics.GaussianStats(z[mu].astype(np.float64), z[sigma].astype(np.float64))
                     for space, mu, sigma in (("pool", "mu", "sigma"), ("spatial", "mu_s", "sigma_s"))
                     if {mu, sigma} <= names}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path}: not a readable .npz reference batch ({e})") from e
    images = npz_array(path, "arr_0") if "arr_0" in names else None
    if images is None and not stats:
        raise ArtifactError(f"{path}: neither images (arr_0) nor Inception mu/sigma; not an ADM reference batch")
    n = len(images) if images is not None else 0
    return Reference("adm", path, file_sha256(path), stats, None, images, None, None, n, tuple(sorted(stats)))


def check_compatible(ref: Reference, ex: Extractors) -> None:
    """Refuse statistics made with another network than the samples' (the distance would be meaningless)."""
    enc = _available(ex.encoder_info, "fingerprint")
    if ref.encoder_fingerprint and enc and ref.encoder_fingerprint != enc:
        raise ArtifactError(f"{ref.path}: its DINOv2 statistics come from encoder {ref.encoder_fingerprint[:12]}, "
                            f"but --encoder is {enc[:12]}; FD-DINOv2 needs the same encoder on both sides")
    inc = _available(ex.inception_info, "sha256")
    if ref.inception_sha and inc and ref.inception_sha != inc:
        raise ArtifactError(f"{ref.path}: its Inception statistics come from weights {ref.inception_sha[:12]}, "
                            f"but these are {inc[:12]}; use the same --inception-weights for both")


def _missing(reason: str) -> dict:
    return {"value": None, "reason": reason}


def _frechet(sg: Gathered, ref_stats: dict, space: str, net: dict, what: str) -> dict:
    if space not in sg.moments:
        return _missing(net["reason"] if not net["available"] else f"no {space} features for the samples")
    if space not in ref_stats:
        return _missing(f"the reference has no {what} statistics")
    return {"value": metrics.frechet_from_stats(metrics.gaussian_stats(sg.moments[space]), ref_stats[space])}


def _inception_frechet(sg: Gathered, ref: Reference, ref_stats: dict, space: str, net: dict) -> dict:
    """FID or sFID, saying which Inception implementation each side's statistics come from."""
    entry = _frechet(sg, ref_stats, space, net, "Inception " + space)
    if entry["value"] is not None:
        entry["samples_statistics"] = TORCH_PORT
        entry["reference_statistics"] = TF_GRAPH if space in ref.tf_graph_spaces else TORCH_PORT
    return entry


def _class_consistency(sg: Gathered, ex: Extractors, labels: np.ndarray | None, classes: list[str]) -> dict:
    if ex.classifier is None:
        return _missing(ex.classifier_info["reason"])
    if labels is None:
        return _missing("the samples carry no labels (arr_1)")
    pred, acc = sg.arrays["pred"], metrics_per_class(sg.arrays["pred"], labels, len(classes))
    return {"value": float(np.mean(pred == labels)), "per_class": dict(zip(classes, acc))}


def metrics_per_class(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Share of samples of each conditioning class predicted as that class (None for absent classes)."""
    return [float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else None for c in range(num_classes)]


def compute_metrics(sg: Gathered, ref: Reference, rg: Gathered | None, ex: Extractors, labels: np.ndarray | None,
                    classes: list[str], device: torch.device) -> dict:
    """Every metric, each either {"value": ...} or {"value": None, "reason": ...}."""
    ref_stats = dict(ref.stats)  # stored statistics take precedence (ADM uses the batch's own mu/sigma)
    ref_pool = ref.pool
    if rg is not None:
        for space, m in rg.moments.items():
            ref_stats.setdefault(space, metrics.gaussian_stats(m))
        ref_pool = rg.arrays["pool"] if "pool" in rg.arrays else None
    out = {"fid": _inception_frechet(sg, ref, ref_stats, "pool", ex.inception_info),
           "sfid": _inception_frechet(sg, ref, ref_stats, "spatial", ex.inception_info)}
    if "logits" in sg.arrays:
        mean, std = metrics.inception_score(sg.arrays["logits"])
        out["inception_score"] = {"value": mean, "std": std, "split_size": metrics.IS_SPLIT_SIZE}
    else:
        out["inception_score"] = _missing(ex.inception_info["reason"])
    if "pool" in sg.arrays and ref_pool is not None:
        pr = metrics.precision_recall(ref_pool, sg.arrays["pool"], metrics.PR_NEIGHBOURS, device)
        out["precision"], out["recall"] = {"value": pr.precision}, {"value": pr.recall}
    else:
        inc = ex.inception_info
        reason = "the reference has no pool_3 features" if inc["available"] else inc["reason"]
        out["precision"], out["recall"] = _missing(reason), _missing(reason)
    for space, name in DINO_SPACES.items():
        out[name] = {**_frechet(sg, ref_stats, space, ex.encoder_info, "DINOv2"), "space": space}
    out["class_consistency"] = _class_consistency(sg, ex, labels, classes)
    out.update(_digit_metrics(sg, ex, labels))
    return out


def _digit_metrics(sg: Gathered, ex: Extractors, labels: np.ndarray | None) -> dict:
    """The digits demo's within-class diversity (and its ratio to the real training digits) and precision / recall
    (k = 3) in the demo classifier's feature layer (`pipeline.demo_metrics`)."""
    names = ("diversity", "digit_precision", "digit_recall")
    if ex.classifier is None or ex.classifier.net is None:
        reason = ex.classifier_info.get("reason", "the classifier artifact has no feature network (an older version)")
        return {n: _missing(reason) for n in names}
    if labels is None:
        return {n: _missing("the samples carry no labels (arr_1)") for n in names}
    ref = demo_metrics.reference(ex.classifier)
    m = demo_metrics.grid_metrics(sg.arrays["digit_grid"], labels, sg.arrays["pred"], ex.classifier, ref)
    space = f"demo classifier's hidden layer ({ex.classifier.net.b1.shape[0]} ReLU units)"
    return {"diversity": {"value": m["diversity"], "ratio": m["diversity_ratio"], "real": ref.diversity,
                          "definition": demo_metrics.DIVERSITY},
            "digit_precision": {"value": m["precision"], "space": space, "k": 3},
            "digit_recall": {"value": m["recall"], "space": space, "k": 3}}


def protocol(samples: Samples, ref: Reference, ex: Extractors, classes: list[str]) -> dict:
    """Everything needed to trace a number: sample set, class balance, reference, sampler, networks."""
    counts = {}
    if samples.labels is not None:
        for c, k in zip(*np.unique(samples.labels, return_counts=True)):
            counts[classes[c] if c < len(classes) else str(c)] = int(k)
    m = samples.manifest
    return {
        "num_samples": int(len(samples.images)), "image_shape": list(samples.images.shape[1:]),
        "class_counts": counts, "class_balanced": len(set(counts.values())) == 1 if counts else None,
        "samples": {"path": str(samples.path), "fingerprint": samples.fingerprint, "stage": m.stage if m else None},
        "sampler": m.extra if m else None, "sample_models": m.models if m else None,
        "sample_inputs": m.inputs if m else None,
        "reference": {"kind": ref.kind, "path": str(ref.path), "fingerprint": ref.fingerprint,
                      "num_images": ref.num_images, "tf_graph_statistics": list(ref.tf_graph_spaces)},
        "inception_implementations": _implementations(ref),
        "inception": ex.inception_info, "encoder": ex.encoder_info, "classifier": ex.classifier_info,
        "inception_score_split_size": metrics.IS_SPLIT_SIZE, "precision_recall_k": metrics.PR_NEIGHBOURS,
        "frechet": "float64; trace sqrt via the eigenvalues of sqrt(S1) S2 sqrt(S1)",
    }


def _implementations(ref: Reference) -> str:
    """One sentence: which Inception computed what, so a number is compared with the right literature."""
    if not ref.tf_graph_spaces:
        return f"samples and reference through {TORCH_PORT} (the PyTorch port of ADM's TensorFlow graph)"
    which = " and ".join({"pool": "FID", "spatial": "sFID"}[s] for s in ("pool", "spatial") if s in ref.tf_graph_spaces)
    return (f"{which}: samples through {TORCH_PORT}, reference statistics from the {TF_GRAPH} "
            f"(the ADM evaluator runs TensorFlow on both sides)")


def _classes(ex: Extractors, ref: Reference, labels: np.ndarray | None) -> list[str]:
    if ref.kind == "fid_ref":
        return read_manifest(ref.path).extra["classes"]
    return [str(c) for c in range(int(labels.max()) + 1)] if labels is not None and len(labels) else []


def run(cfg: Config, rt: Runtime | None = None) -> Manifest | None:
    """Features of the samples (and of ADM reference images), then every metric; main writes metrics.json."""
    rt, t0 = (rt or launch()).on(cfg.device, "fp32"), time.time()
    samples, ref = open_samples(cfg.samples), open_reference(cfg.reference)
    device = rt.device
    ex = load_extractors(cfg.inception_weights, cfg.download, cfg.encoder, cfg.classifier, device,
                         cfg.require_inception)
    check_compatible(ref, ex)
    config = {**config_to_dict(cfg, semantic_only=True), "samples": samples.fingerprint, "reference": ref.fingerprint,
              "inception": _available(ex.inception_info, "sha256"),
              "encoder": _available(ex.encoder_info, "fingerprint"),
              "classifier": _available(ex.classifier_info, "fingerprint")}
    with OutputDir(cfg.out, "fid", config, overwrite=cfg.overwrite, rt=rt, owns=("samples-*.npz", "reference-*.npz", METRICS),
                   inputs=[cfg.samples, cfg.reference, cfg.classifier, *local_dirs(cfg.encoder)]) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        n = len(samples.images)
        plan = plan_shards(n, cfg.block_size, "samples")
        labels = samples.labels
        run_blocks(od, plan, rt, lambda s: (samples.images[s.start : s.stop],
                                              None if labels is None else labels[s.start : s.stop]),
                   np.ones(n, dtype=bool), ex, cfg.batch_size)
        ref_n = 0 if ref.images is None else len(ref.images)
        ref_plan = plan_shards(ref_n, cfg.block_size, "reference")
        run_blocks(od, ref_plan, rt, lambda s: (ref.images[s.start : s.stop], None), np.ones(ref_n, dtype=bool),
                   ex, cfg.batch_size)
        rt.barrier()
        sg = gather(od, plan) if rt.is_main else None
        rg = gather(od, ref_plan) if sg is not None and ref_plan else None
        if sg is None or (ref_plan and rg is None):
            return None
        classes = _classes(ex, ref, labels)
        report = {"metrics": compute_metrics(sg, ref, rg, ex, labels, classes, device),
                  "protocol": protocol(samples, ref, ex, classes)}
        report["summary"] = summary_line(report)
        atomic_write_json(od.path / METRICS, report)
        return od.finish(Manifest(
            stage="fid", complete=True, versions=environment(), extra=report,
            counts={"written": n, "skipped": 0, "failed": 0},
            inputs={"samples": {"path": str(samples.path), "fingerprint": samples.fingerprint},
                    "reference": {"path": str(ref.path), "fingerprint": ref.fingerprint}},
            models={"inception": ex.inception_info, "encoder": ex.encoder_info, "classifier": ex.classifier_info},
            shards=[{"name": METRICS, "sha256": file_sha256(od.path / METRICS)}],
            timings={"seconds": round(time.time() - t0, 3)}))


def _fmt(entry: dict, digits: int = 4) -> str:
    return "n/a" if entry["value"] is None else f"{entry['value']:.{digits}f}"


def summary(m: Manifest) -> str:
    """The one-line summary of a finished fid artifact."""
    return m.extra["summary"]


def summary_line(report: dict) -> str:
    """One line: every metric (n/a when unavailable), sample count and reference."""
    x, p = report["metrics"], report["protocol"]
    tf = [label for name, label in (("fid", "FID"), ("sfid", "sFID"))
          if x[name].get("reference_statistics") == TF_GRAPH]
    note = f" | {'/'.join(tf)} vs TF-graph reference statistics (samples: {TORCH_PORT})" if tf else ""
    return (f"fid: FID {_fmt(x['fid'])} | sFID {_fmt(x['sfid'])} | IS {_fmt(x['inception_score'], 2)} | precision "
            f"{_fmt(x['precision'], 3)} recall {_fmt(x['recall'], 3)} | FD-DINOv2(cls) {_fmt(x['fd_dinov2'])} | "
            f"class-consistency {_fmt(x['class_consistency'], 3)}{_digit_summary(x)} | {p['num_samples']} samples vs "
            f"{p['reference']['kind']} {p['reference']['path']}{note}")


def _digit_summary(x: dict) -> str:
    d = x["diversity"]
    if d["value"] is None:
        return ""
    return (f" | diversity {d['value']:.1f} (ratio {d['ratio']:.2f} to real) | digit precision "
            f"{_fmt(x['digit_precision'], 3)} recall {_fmt(x['digit_recall'], 3)}")


def ref_summary(m: Manifest) -> str:
    return (f"fid-ref: {m.extra['num_images']} {m.extra['split']} images, spaces {', '.join(m.extra['spaces'])}, "
            f"{m.extra['pr_subset']} pool_3 features kept for precision/recall")


cli = command_from_config(Config, run, "fid", "FID, sFID, IS, precision/recall (k=3), FD-DINOv2 and class-consistency "
                          "of a samples npz against an ADM reference batch or a fid-ref artifact; writes metrics.json.",
                          summary=summary)
fid_ref_cli = command_from_config(RefConfig, run_ref, "fid-ref", "Reference statistics (Inception pool_3 and sFID "
                                  "spatial, DINOv2 CLS and mean patch) of one split of an images artifact, ADM centre "
                                  "crop protocol.",
                                  summary=ref_summary)
