"""`flatdino images`: image shards from the bundled digits, an ImageFolder tree, or existing webdataset tars.

Original file bytes are kept (never re-encoded). Each sample gets a stable key `<split>_<index:08d>`, where index is
its position in the sorted source listing of its split; the source path or key rides along as `<key>.src`. Files that
do not decode as images are skipped and listed in the manifest with their reason.
"""

from __future__ import annotations

import glob
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image

from pipeline.config import command_from_config, config_to_dict, opt
from pipeline.manifest import ArtifactError, Manifest, OutputDir, TooManyFailures, UserError, atomic_write_json
from pipeline.runtime import environment, get_logger, progress
from pipeline.shards import IMAGE_EXTS, encode_int, index_tar_shard, load_rgb, plan_shards, read_member, write_tar_shard

log = get_logger(__name__)


@dataclass(frozen=True)
class Config:
    out: Path = field(metadata=opt("output artifact directory, e.g. shards/images/demo", runtime=True))
    source: str = field(default="digits", metadata=opt(
        "'digits' (scikit-learn's bundled 8x8 digits), an ImageFolder directory DIR/<class>/* (or DIR/train/<class>/* "
        "+ DIR/val/<class>/*), or a quoted glob of webdataset tars 'PATH/*.tar' with jpg/png + cls members"))
    shard_size: int = field(default=1000, metadata=opt("samples per tar shard"))
    val_fraction: float = field(default=0.1, metadata=opt(
        "share of samples held out as the 'val' split (seeded), unless the source has its own val folder"))
    digits_size: int = field(default=256, metadata=opt("side of the upscaled digits images (source=digits)"))
    digits_upscale: Literal["nearest", "bicubic"] = field(default="nearest", metadata=opt(
        "resampling used to upscale the 8x8 digits: nearest keeps the 8x8 grid exactly recoverable by block averaging"))
    seed: int = field(default=0, metadata=opt("seed of the train/val split"))
    max_failed_fraction: float = field(default=0.001, metadata=opt(
        "fail the run if more than this share of the inputs cannot be decoded (they are skipped and listed)"))
    overwrite: bool = field(default=False, metadata=opt("delete an existing artifact made with another config", runtime=True))


@dataclass(frozen=True)
class Item:
    """One source image: where it comes from and how to get its bytes."""

    src: str
    cls: int
    ext: str
    read: Callable[[], bytes]


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def _digits_items(cfg: Config) -> tuple[list[str], list[Item]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    resample = Image.NEAREST if cfg.digits_upscale == "nearest" else Image.BICUBIC

    def png(i: int) -> bytes:
        pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
        image = Image.fromarray(pixels, mode="L").resize((cfg.digits_size,) * 2, resample=resample)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=False, compress_level=6)
        return buf.getvalue()

    items = [Item(f"digits/{i}", int(digits.target[i]), "png", lambda i=i: png(i)) for i in range(len(digits.target))]
    return [str(c) for c in digits.target_names], items


def _folder_items(root: Path, classes: list[str]) -> list[Item]:
    items = []
    for c, name in enumerate(classes):
        for p in sorted(q for q in (root / name).iterdir() if q.is_file()):
            ext = p.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            items.append(Item(str(p.relative_to(root.parent)), c, ext or "bin", p.read_bytes))
    return items


def _tar_items(pattern: str) -> tuple[list[str], list[Item]]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ArtifactError(f"no tar files match {pattern!r}")
    items = []
    for path in paths:
        for key, members in index_tar_shard(path).items():
            ext = next((e for e in members if e in IMAGE_EXTS), None)
            if ext is None or "cls" not in members:
                raise ArtifactError(f"{path}: sample {key!r} lacks an image (jpg/png) or a cls member")
            cls = int(read_member(path, *members["cls"]).decode())
            items.append(Item(f"{Path(path).name}:{key}", cls, ext, lambda p=path, m=members[ext]: read_member(p, *m)))
    n_classes = max(i.cls for i in items) + 1
    return [str(c) for c in range(n_classes)], items


def enumerate_source(cfg: Config) -> tuple[list[str], dict[str, list[Item]]]:
    """Class names and the items of each split, in their stable order."""
    if cfg.source == "digits":
        classes, items = _digits_items(cfg)
    elif cfg.source.endswith(".tar") or "*" in cfg.source:
        classes, items = _tar_items(cfg.source)
    else:
        root = Path(cfg.source)
        if not root.is_dir():
            raise UserError(f"--source {cfg.source!r}: not 'digits', a directory, or a glob of .tar files")
        if (root / "train").is_dir() and (root / "val").is_dir():
            classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
            return classes, {"train": _folder_items(root / "train", classes), "val": _folder_items(root / "val", classes)}
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise UserError(f"{root}: no class folders found (expected DIR/<class>/<image files>)")
        items = _folder_items(root, classes)
    if not items:
        raise UserError(f"source {cfg.source!r} holds no images")
    train, val = _split_indices(len(items), cfg.val_fraction, cfg.seed)
    return classes, {"train": [items[i] for i in train], "val": [items[i] for i in val]}


def _shard_samples(split: str, items: list[Item], start: int, failures: list[dict]):
    for offset, item in enumerate(items):
        key = f"{split}_{start + offset:08d}"
        try:
            data = item.read()
            load_rgb(data)
        except (OSError, ValueError) as e:
            failures.append({"key": key, "src": item.src, "reason": str(e)})
            continue
        yield {"__key__": key, item.ext: data, "cls": encode_int(item.cls), "src": item.src.encode()}


def run(cfg: Config) -> Manifest:
    """Write the image shards of every split; resumes by skipping committed shards."""
    t0 = time.time()
    with OutputDir(cfg.out, "images", config_to_dict(cfg, semantic_only=True), overwrite=cfg.overwrite) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        classes, splits = enumerate_source(cfg)
        committed = od.committed()
        plan = [(split, spec) for split, items in splits.items() for spec in plan_shards(len(items), cfg.shard_size, split)]
        bar = progress(sum(len(v) for v in splits.values()), "images", "img")
        for split, spec in plan:
            if spec.name not in committed:
                failures: list[dict] = []
                rec = write_tar_shard(od.path / spec.name,
                                      _shard_samples(split, splits[split][spec.start:spec.stop], spec.start, failures))
                committed[spec.name] = {**rec, "split": split, "start": spec.start, "stop": spec.stop,
                                        "failed": failures}
                od.commit(committed[spec.name])
            bar.update(len(spec))
        bar.close()
        shards = [committed[spec.name] for _, spec in plan]
        failures = [f for s in shards for f in s["failed"]]
        total = sum(len(v) for v in splits.values())
        if total and len(failures) / total > cfg.max_failed_fraction:
            raise TooManyFailures(f"{len(failures)} of {total} images could not be decoded (more than "
                                  f"--max-failed-fraction {cfg.max_failed_fraction}); first: {failures[:3]}")
        atomic_write_json(od.path / "classes.json", classes)
        manifest = Manifest(
            stage="images", shards=shards, failures=failures, versions=environment(), complete=True,
            counts={"written": sum(s["count"] for s in shards), "skipped": 0, "failed": len(failures)},
            fields={"<image>": {"codec": "original bytes (png/jpg)"}, "cls": {"dtype": "int", "codec": "text"},
                    "src": {"codec": "utf-8 source path or key"}},
            extra={"classes": classes, "splits": {k: sum(s["count"] for s in shards if s["split"] == k) for k in splits}},
            timings={"seconds": round(time.time() - t0, 3)},
        )
        return od.finish(manifest)


cli = command_from_config(Config, run, "images", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
