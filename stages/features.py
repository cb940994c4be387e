"""`flatdino features`: frozen DINOv2-with-registers patch features for every image, as float16 webdataset shards.

Per image: ADM centre crop to 256 (CPU, PIL), optional horizontal flip as view 1, bicubic resize to 224
(antialiased as the official FlatDINO code, or plain as RAE and diffusers with `--resize rae`), ImageNet
normalisation, DINOv2 with the affine-free final LayerNorm, CLS and registers dropped by name. Stored as
`<key>.feat.npy` of shape (views, patches, dim) float16 plus `<key>.cls`, one output shard per input shard, so the
output is the same whatever the number of processes. Images that fail to decode are skipped and listed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import torch

from models.encoder import PATCH_EMBED_SCALE, FeatureEncoder, encoder_fingerprint, init_rae_dir, load_rae
from models.imaging import decode_item, worker_init
from pipeline.config import Checked, command_from_config, config_to_dict, opt
from pipeline.manifest import ArtifactError, Manifest, OutputDir, TooManyFailures, local_dirs
from pipeline.runtime import Runtime, autocast, environment, get_logger, launch, progress
from pipeline.shards import IMAGE_EXTS, ImageShards, encode_int, encode_npy, write_tar_shard

log = get_logger(__name__)


OWNS = ("features-*.tar",)  # what this stage writes (--overwrite deletes only these)


@dataclass(frozen=True)
class Config(Checked):
    images: Path = field(metadata=opt("input images artifact (flatdino images --out)", runtime=True))
    encoder: str = field(metadata=opt(
        "RAE directory (config.json + safetensors; `flatdino init-encoder` makes a random one) or a hub id such as "
        "nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08 (needs network)", runtime=True))
    out: Path = field(metadata=opt("output artifact directory, e.g. shards/features/demo", runtime=True))
    views: int = field(default=2, metadata=opt("1 = centre crop only; 2 = centre crop + its horizontal flip", min=1,
                                                max=2))
    resize: Literal["flatdino", "rae"] = field(default="flatdino", metadata=opt(
        "256 -> 224 resize: flatdino = bicubic with antialias (the official FlatDINO code; to reproduce the paper's "
        "VAE); rae = plain bicubic (RAE's and diffusers' encode, what the released pixel decoder was trained on)"))
    batch_size: int = field(default=64, metadata=opt("images per encoder forward", min=1))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=opt(
        "encoder compute precision; the official code runs DINOv2 in fp32"))
    max_failed_fraction: float = field(default=0.001, metadata=opt(
        "fail if more than this share of images cannot be decoded (they are skipped and listed in the manifest); a "
        "tolerance, not identity: raise it on a re-run to accept the committed shards", runtime=True, min=0.0,
        max=1.0))
    num_workers: int = field(default=4, metadata=opt(
        "decode workers per process (JPEG decode + ADM crop; a GPU needs 10-20)", runtime=True, min=1))
    decode_in: Literal["processes", "threads"] = field(default="processes", metadata=opt(
        "decode workers are processes (no GIL: scales with cores) or threads", runtime=True))
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda, cuda:1 ...", runtime=True))
    overwrite: bool = field(default=False, metadata=opt(
        "delete this stage's own files in --out (a folder holding anything else is refused) and start again",
        runtime=True))


def _records(images: ImageShards, rec: dict) -> Iterator[tuple]:
    """(key, cls, image bytes or None) for each sample of an image shard (checked against its index); a sample
    without a class is structural."""
    for s in images.iter_shard(rec):
        if "cls" not in s:
            raise ArtifactError(f"{images.root / rec['name']}: sample {s['__key__']} has no cls member; re-run "
                                f"`flatdino images` to rewrite this shard")
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        yield s["__key__"], int(s["cls"]), None if ext is None else s[ext]


def decode_pool(cfg: Config, close_fds: tuple[int, ...] = ()):
    """Decode workers: processes (each its own GIL, so one GPU process can use every core) or threads.

    Processes are forked, as torch's DataLoader workers are (spawned ones would re-import the caller's main module),
    all at once before this stage starts any thread of its own; they only decode with PIL and never touch torch."""
    if cfg.decode_in == "threads":
        return ThreadPoolExecutor(cfg.num_workers, thread_name_prefix="decode")
    import multiprocessing

    pool = ProcessPoolExecutor(cfg.num_workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=worker_init, initargs=(close_fds,))
    list(pool.map(decode_item, [("warm-up", 0, None)] * cfg.num_workers))  # fork every worker now
    return pool


def _prefetch(pool, items: Iterable, fn, depth: int) -> Iterator:
    """Ordered map over `items` on a worker pool with at most `depth` items in flight."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(decoded: Iterator, batch_size: int, failures: list[dict]) -> Iterator[tuple]:
    keys, classes, images = [], [], []
    for key, cls, image in decoded:
        if isinstance(image, str):
            failures.append({"key": key, "reason": image})
            continue
        keys.append(key), classes.append(cls), images.append(image)
        if len(keys) == batch_size:
            yield keys, classes, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, 256, 256) uint8
            keys, classes, images = [], [], []
    if keys:
        yield keys, classes, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


@torch.no_grad()
def encode_views(encoder: FeatureEncoder, x: torch.Tensor, views: int, precision: str) -> tuple[torch.Tensor, ...]:
    """uint8 crops (B, 3, 256, 256) -> float16 features (B, V, N, D) on the CPU and whether each sample is finite
    (checked on the device, after the float16 cast, so an overflow is caught); view 1 is the flipped crop."""
    crops = [x, x.flip(-1)][:views]
    device = encoder.mean.device
    with autocast(precision, device):
        feats = [encoder.encode_images(c.to(device)).patches.float() for c in crops]
    f16 = torch.stack(feats, dim=1).to(torch.float16)
    return f16.cpu(), torch.isfinite(f16).flatten(1).all(1).cpu()


class ShardWriter:
    """Writes one output shard on a background thread from a bounded queue of (key, cls, features): the npy
    encoding, the tar, its sha256 (hashed while written) and the fsync leave the main thread, which only encodes."""

    _END, _ABORT = object(), object()

    def __init__(self, path: Path, depth: int = 512):
        self.path, self.queue, self.result, self.error = path, queue.Queue(depth), None, None
        self.thread = threading.Thread(target=self._run, name=f"write {path.name}", daemon=True)
        self.thread.start()

    def _samples(self) -> Iterator[dict]:
        while (item := self.queue.get()) is not self._END:
            if item is self._ABORT:
                raise _Aborted()
            key, cls, f = item
            yield {"__key__": key, "feat.npy": encode_npy(f), "cls": encode_int(cls)}

    def _run(self) -> None:
        try:
            self.result = write_tar_shard(self.path, self._samples())
        except BaseException as e:  # handed to the main thread by put/close
            self.error = e

    def put(self, item: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> dict:
        """Wait for the shard to be on disk; its record."""
        self.queue.put(self._END)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result

    def abort(self) -> None:
        """Drop the shard in flight (its temporary file is removed by the writer); a no-op once it is closed."""
        if self.thread.is_alive():
            self.queue.put(self._ABORT)
            self.thread.join()


class _Aborted(Exception):
    pass


def _encode_shard(encoder, cfg: Config, precision: str, records: Iterator, pool, failures: list[dict], bar,
                  writer: ShardWriter) -> None:
    decoded = _prefetch(pool, records, decode_item, depth=4 * cfg.batch_size)
    for keys, classes, x in _batches(decoded, cfg.batch_size, failures):
        feats, finite = encode_views(encoder, x, cfg.views, precision)
        feats, finite = feats.numpy(), finite.numpy()
        for key, cls, f, ok in zip(keys, classes, feats, finite):
            if not ok:  # fp16 overflow or a broken encoder: never store it silently
                failures.append({"key": key, "reason": "non-finite features (float16 overflow?)"})
                continue
            writer.put((key, cls, f))
        bar.update(len(keys))


def encode_shards(encoder, cfg: Config, precision: str, images: ImageShards, todo: list, od: OutputDir, bar) -> None:
    """Every shard of `todo`, committed in order; the writer of shard k finishes while shard k + 1 is encoded."""
    pending: tuple | None = None  # (writer, shard, failures) whose tail still runs
    with decode_pool(cfg, close_fds=od.lock_fds()) as pool:
        try:
            for shard in todo:
                writer, failures = ShardWriter(od.path / _out_name(shard)), []
                try:
                    _encode_shard(encoder, cfg, precision, _records(images, shard), pool, failures, bar, writer)
                    if pending is not None:
                        _commit(od, *pending)
                except BaseException:
                    writer.abort()  # the shard in flight leaves no temporary file
                    raise
                pending = (writer, shard, failures)
            if pending is not None:
                _commit(od, *pending)
                pending = None
        finally:
            if pending is not None:
                pending[0].abort()


def _commit(od: OutputDir, writer: ShardWriter, shard: dict, failures: list[dict]) -> None:
    rec = writer.close()
    od.commit({**rec, "split": shard["split"], "source": shard["name"], "failed": failures})


def run(cfg: Config, rt: Runtime | None = None) -> Manifest:
    """Encode every image shard (this rank's share of the plan); the main process writes the manifest."""
    rt, t0 = (rt or launch()).on(cfg.device, cfg.precision), time.time()
    images = ImageShards(cfg.images)
    rae = load_rae(cfg.encoder)
    # paths are runtime knobs (artifacts may move); what they point at is pinned by fingerprint
    config = {**config_to_dict(cfg, semantic_only=True), "images_fingerprint": images.manifest.fingerprint,
              "encoder_fingerprint": encoder_fingerprint(rae)}
    with OutputDir(cfg.out, "features", config, overwrite=cfg.overwrite, rt=rt, owns=OWNS,
                   inputs=[cfg.images, *local_dirs(cfg.encoder)]) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        encoder = FeatureEncoder(rae, cfg.resize).to(rt.device).eval()
        plan = [s for s in images.manifest.shards]
        committed = od.committed()
        todo = [s for s in rt.share(plan) if _out_name(s) not in committed]
        this_run = sum(s["count"] for s in todo)
        bar = progress(this_run, "features", "img", rt)
        t_loop = time.time()  # after the one-time load: the loop's rate is what decoding must hide behind
        encode_shards(encoder, cfg, rt.precision, images, todo, od, bar)
        bar.close()
        t_end = time.time()
        rt.barrier()
        if not rt.is_main:
            return None
        timings = {"seconds": round(t_end - t0, 3), "load_seconds": round(t_loop - t0, 3),
                   "images_this_run": this_run,
                   "images_per_second": round(this_run / max(t_end - t_loop, 1e-9), 2)}  # main rank's share
        return _finish(od, cfg, images, encoder, plan, timings)


def _out_name(image_shard: dict) -> str:
    return "features-" + image_shard["name"]


def _finish(od: OutputDir, cfg: Config, images: ImageShards, encoder: FeatureEncoder, plan,
            timings: dict) -> Manifest | None:
    shards = od.collect([_out_name(s) for s in plan])
    if shards is None:
        return None
    failures = [f for s in shards for f in s["failed"]]
    total = sum(s["count"] for s in plan)
    if total and len(failures) / total > cfg.max_failed_fraction:
        raise TooManyFailures(f"{len(failures)} of {total} images failed to decode (more than --max-failed-fraction "
                              f"{cfg.max_failed_fraction}); first: {failures[:3]}. To accept them, re-run with a higher "
                              f"--max-failed-fraction (a tolerance: the committed shards are kept); to replace them, "
                              f"fix the images artifact first (flatdino images)")
    written = sum(s["count"] for s in shards)
    manifest = Manifest(
        stage="features", shards=shards, failures=failures, versions=environment(), complete=True,
        counts={"written": written, "skipped": 0, "failed": len(failures)},
        inputs={"images": {"path": str(cfg.images), "fingerprint": images.manifest.fingerprint}},
        models={"encoder": {"source": str(cfg.encoder), "fingerprint": encoder.fingerprint, "resize": cfg.resize}},
        fields={"feat.npy": {"dtype": "float16", "shape": [cfg.views, encoder.num_patches, encoder.dim], "codec": "npy"},
                "cls": {"dtype": "int", "codec": "text"}},
        extra={"views": cfg.views, "resize": cfg.resize, "num_patches": encoder.num_patches, "dim": encoder.dim,
               "classes": images.classes, "encoder": {"fingerprint": encoder.fingerprint},
               "splits": {k: sum(s["count"] for s in shards if s["split"] == k) for k in images.splits}},
        timings=timings,
    )
    return od.finish(manifest)


cli = command_from_config(Config, run, "features", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])


@dataclass(frozen=True)
class InitConfig(Checked):
    out: Path = field(metadata=opt("directory to write (config.json + diffusion_pytorch_model.safetensors)"))
    preset: Literal["tiny", "demo", "dinov2-b-xl"] = field(default="tiny", metadata=opt(
        "tiny: (256, 192) features and a 2-layer pixel decoder, for tests; demo: the same at 112 px, (64, 192) "
        "features, for the CPU demo; dinov2-b-xl: the paper's "
        "architecture (DINOv2-B/14-reg + RAE ViT-XL decoder) with random weights"))
    seed: int = field(default=0, metadata=opt("seed of the random weights", min=0))


def init_encoder(cfg: InitConfig) -> Path:
    """Write a random-weight RAE directory unless one made by the same recipe (preset, seed and the preset's
    patch-embedding scale, which changed the demo's weights for the same preset and seed) is already there."""
    stamp, recipe = cfg.out / "init.json", repr((cfg.preset, cfg.seed, PATCH_EMBED_SCALE.get(cfg.preset, 1.0)))
    if stamp.exists() and stamp.read_text() == recipe:
        log.info("%s already holds preset %s seed %d; nothing to do", cfg.out, cfg.preset, cfg.seed)
        return cfg.out
    init_rae_dir(cfg.out, cfg.preset, cfg.seed)
    stamp.write_text(recipe)
    return cfg.out


init_encoder_cli = command_from_config(
    InitConfig, init_encoder, "init-encoder",
    "Write a randomly initialised RAE encoder + pixel decoder directory, in the same format as a pretrained one, "
    "so tests and the demo run exactly the code path of a user with pretrained weights.",
    summary=lambda out: f"init-encoder: wrote {out}")
