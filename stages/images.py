"""`flatdino images`: image shards from the bundled digits, an ImageFolder tree, or existing webdataset tars.

Original file bytes are kept (never re-encoded). Each sample gets a stable key `<split>_<index:08d>`, where index is
its position in the sorted source listing of its split; the source path or key rides along as `<key>.src`. Files that
do not decode as images are skipped and listed in the manifest with their reason.

The source is pinned by content, not by path: the sorted listing (relative path and size of every image, or tar
member) is fingerprinted into the run's config, so a resumed run whose source gained, lost or changed a file is
refused instead of silently mixing two listings; a moved source is the same source. ImageFolder trees follow
torchvision: classes are the sorted sub-folders of `train/` (or of the root), images are found recursively below
each class folder, hidden files and OS clutter (`.DS_Store`, `Thumbs.db`) are ignored (counted in the manifest).
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image

from pipeline.config import Checked, command_from_config, config_to_dict, opt
from pipeline.manifest import ArtifactError, Manifest, OutputDir, TooManyFailures, UserError, atomic_write_json
from pipeline.runtime import environment, get_logger, progress
from pipeline.shards import IMAGE_EXTS, encode_int, index_tar_shard, load_rgb, plan_shards, read_member, write_tar_shard

log = get_logger(__name__)

OWNS = ("*.tar", "classes.json")  # what this stage writes (--overwrite deletes only these)
CLUTTER = {"Thumbs.db", "desktop.ini", "Icon\r"}  # files that file managers drop into folders; never images


@dataclass(frozen=True)
class Config(Checked):
    out: Path = field(metadata=opt("output artifact directory, e.g. shards/images/demo", runtime=True))
    source: str = field(default="digits", metadata=opt(
        "'digits' (scikit-learn's bundled 8x8 digits), an ImageFolder directory DIR/<class>/** (or "
        "DIR/train/<class>/** + DIR/val/<class>/**), or a quoted glob of webdataset tars 'PATH/*.tar' with jpg/png "
        "+ cls members; pinned by the fingerprint of its listing, so it may move", runtime=True))
    shard_size: int = field(default=1000, metadata=opt("samples per tar shard", min=1))
    val_fraction: float = field(default=0.1, metadata=opt(
        "share of samples held out as the 'val' split (seeded), unless the source has its own val folder",
        min=0.0, max=1.0, max_open=True))
    num_classes: int | None = field(default=None, metadata=opt(
        "tar sources: the number of classes when some class indices are absent from the tars (default: the classes "
        "must be exactly 0..K-1)", min=1))
    digits_size: int = field(default=256, metadata=opt("side of the upscaled digits images (source=digits)", min=8))
    digits_upscale: Literal["nearest", "bicubic"] = field(default="nearest", metadata=opt(
        "resampling used to upscale the 8x8 digits: nearest keeps the 8x8 grid exactly recoverable by block averaging"))
    seed: int = field(default=0, metadata=opt("seed of the train/val split", min=0))
    max_failed_fraction: float = field(default=0.001, metadata=opt(
        "fail the run if more than this share of the inputs cannot be decoded (they are skipped and listed); a "
        "tolerance, not identity: raise it on a re-run to accept the committed shards", runtime=True, min=0.0,
        max=1.0))
    overwrite: bool = field(default=False, metadata=opt(
        "delete this stage's own files in --out (a folder holding anything else is refused) and start again",
        runtime=True))


@dataclass(frozen=True)
class Item:
    """One source image: where it comes from, its size (for the listing fingerprint), how to get its bytes."""

    src: str
    cls: int
    ext: str
    size: int
    read: Callable[[], bytes]


@dataclass
class Listing:
    """What `enumerate_source` found: classes, the items of each split, ignored files and the listing fingerprint."""

    kind: str
    classes: list[str]
    splits: dict[str, list[Item]]
    ignored: list[str]
    fingerprint: str


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

    content = hashlib.sha256(digits.images.tobytes() + digits.target.tobytes()).hexdigest()
    items = [Item(f"digits/{i}", int(digits.target[i]), "png", 0, lambda i=i: png(i))
             for i in range(len(digits.target))]
    return [str(c) for c in digits.target_names], items, content


def _is_clutter(name: str) -> bool:
    return name.startswith(".") or name in CLUTTER


def _folder_items(root: Path, classes: list[str], ignored: list[str], base: Path) -> list[Item]:
    """Images below each class folder, recursively, in sorted path order; hidden files and clutter are ignored.
    Sources are named relative to `base` (the --source directory), so a moved source lists the same."""
    items = []
    for c, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                p = Path(dirpath) / f
                (ignored.append(str(p.relative_to(base))) if _is_clutter(f) else found.append(p))
        for p in sorted(found):
            ext = p.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            items.append(Item(str(p.relative_to(base)), c, ext or "bin", p.stat().st_size, p.read_bytes))
    return items


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_classes(root: Path, classes: list[str], items: list[Item], split: str) -> None:
    """Refuse a class folder with no images: it would become a class the generator is asked for but never saw."""
    present = {i.cls for i in items}
    empty = [c for k, c in enumerate(classes) if k not in present]
    if empty and split == "train":
        raise UserError(f"{root}: class folder(s) {empty[:5]} hold no images; remove them or add images (a class "
                        f"without training images cannot be generated)")


def _imagefolder(root: Path, ignored: list[str]) -> tuple[list[str], dict[str, list[Item]] | list[Item]]:
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes = _class_folders(root / "train")
        extra = sorted(set(_class_folders(root / "val")) - set(classes))
        if extra:
            raise UserError(f"{root / 'val'} has class folder(s) that {root / 'train'} lacks: {extra[:5]}; a class "
                            f"index is the sorted position among the train classes, so these cannot be labelled: "
                            f"add them to train/ or remove them from val/")
        train = _folder_items(root / "train", classes, ignored, root)
        _check_classes(root / "train", classes, train, "train")
        return classes, {"train": train, "val": _folder_items(root / "val", classes, ignored, root)}
    classes = _class_folders(root)
    if not classes:
        raise UserError(f"{root}: no class folders found (expected DIR/<class>/<image files>)")
    items = _folder_items(root, classes, ignored, root)
    _check_classes(root, classes, items, "train")
    return classes, items


def _tar_items(pattern: str, num_classes: int | None) -> tuple[list[str], list[Item]]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ArtifactError(f"no tar files match {pattern!r}")
    items = []
    for path in paths:
        for key, members in index_tar_shard(path).items():  # duplicate keys are refused by the index
            ext = next((e for e in members if e in IMAGE_EXTS), None)
            if ext is None or "cls" not in members:
                raise ArtifactError(f"{path}: sample {key!r} lacks an image ({'/'.join(IMAGE_EXTS)}) or a cls member")
            text = read_member(path, *members["cls"]).decode(errors="replace").strip()
            if not text.isdigit():
                raise ArtifactError(f"{path}: sample {key!r} has class {text!r}; classes must be integers >= 0")
            items.append(Item(f"{Path(path).name}:{key}", int(text), ext, members[ext][1],
                              lambda p=path, m=members[ext]: read_member(p, *m)))
    present = sorted({i.cls for i in items})
    if num_classes is None:
        if present != list(range(len(present))):
            missing = sorted(set(range(present[-1] + 1)) - set(present))
            raise UserError(f"{pattern}: the tars hold classes {present[:3]}...{present[-3:]} with {len(missing)} "
                            f"absent below the largest ({missing[:5]}...); pass --num-classes K if the dataset really "
                            f"has K classes, some without samples here")
        num_classes = len(present)
    elif present[-1] >= num_classes:
        raise UserError(f"{pattern}: class {present[-1]} is not below --num-classes {num_classes}")
    return [str(c) for c in range(num_classes)], items


def _fingerprint(kind: str, splits: dict[str, list[Item]], extra: str = "") -> str:
    """sha256 of the sorted listing: split, source path or key, class and size of every item."""
    h = hashlib.sha256(f"{kind}\n{extra}\n".encode())
    for split in sorted(splits):
        for item in splits[split]:
            h.update(f"{split}\t{item.src}\t{item.cls}\t{item.size}\n".encode())
    return h.hexdigest()


def enumerate_source(cfg: Config) -> Listing:
    """Class names, the items of each split in their stable order, ignored files, and the listing fingerprint."""
    ignored: list[str] = []
    extra = ""
    if cfg.source == "digits":
        kind = "digits"
        classes, items, extra = _digits_items(cfg)
    elif cfg.source.endswith(".tar") or "*" in cfg.source:
        kind = "tars"
        classes, items = _tar_items(cfg.source, cfg.num_classes)
    else:
        root = Path(cfg.source)
        if not root.is_dir():
            raise UserError(f"--source {cfg.source!r}: not 'digits', a directory, or a glob of .tar files")
        kind = "imagefolder"
        classes, items = _imagefolder(root, ignored)
        if isinstance(items, dict):
            return Listing(kind, classes, items, ignored, _fingerprint(kind, items))
    if not items:
        raise UserError(f"source {cfg.source!r} holds no images")
    train, val = _split_indices(len(items), cfg.val_fraction, cfg.seed)
    splits = {"train": [items[i] for i in train], "val": [items[i] for i in val]}
    return Listing(kind, classes, splits, ignored, _fingerprint(kind, splits, extra))


def source_dirs(cfg: Config) -> list[Path]:
    """The folder or tar files the source reads (the output may not overlap them)."""
    if cfg.source == "digits":
        return []
    if cfg.source.endswith(".tar") or "*" in cfg.source:
        return sorted(Path(p) for p in glob.glob(cfg.source))
    return [Path(cfg.source)]


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
    src = enumerate_source(cfg)
    config = {**config_to_dict(cfg, semantic_only=True), "source_kind": src.kind,
              "source_fingerprint": src.fingerprint}
    with OutputDir(cfg.out, "images", config, overwrite=cfg.overwrite, owns=OWNS, inputs=source_dirs(cfg)) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        if src.ignored:
            log.info("ignoring %d non-image files (hidden files, OS clutter), e.g. %s", len(src.ignored),
                     src.ignored[0])
        committed = od.committed()
        splits = src.splits
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
            raise TooManyFailures(
                f"{len(failures)} of {total} images could not be decoded (more than --max-failed-fraction "
                f"{cfg.max_failed_fraction}); first: {failures[:3]}. To accept them, re-run with a higher "
                f"--max-failed-fraction (a tolerance: the committed shards are kept); to replace them, fix the source "
                f"and re-run with --overwrite (the source listing changes)")
        atomic_write_json(od.path / "classes.json", src.classes)
        manifest = Manifest(
            stage="images", shards=shards, failures=failures, versions=environment(), complete=True,
            counts={"written": sum(s["count"] for s in shards), "skipped": len(src.ignored), "failed": len(failures)},
            inputs={"source": {"path": cfg.source, "kind": src.kind, "fingerprint": src.fingerprint}},
            fields={"<image>": {"codec": "original bytes (png/jpg/...)"}, "cls": {"dtype": "int", "codec": "text"},
                    "src": {"codec": "utf-8 source path or key"}},
            extra={"classes": src.classes, "splits": {k: sum(s["count"] for s in shards if s["split"] == k)
                                                      for k in splits},
                   "ignored": src.ignored[:20]},
            timings={"seconds": round(time.time() - t0, 3)},
        )
        return od.finish(manifest)


cli = command_from_config(Config, run, "images", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
