"""Random corruption of shards fed to every reader: each read is the clean result or a clear ArtifactError naming the
shard, never a traceback and never a silently different result (issue 14).

Corruptions (seeded): bit flips at random offsets of a shard (or of its index), truncation at a random offset, a
member duplicated into the middle of the tar. Readers: ImageShards.iter / .image, FeatureShards.iter / .get (whole
sample and one view), PairData.rows (the image/feature join), and `read_tar_shard` / `index_tar_shard` for tars that
are not ours (the images stage's tar sources), where no checksum exists: there a corruption must be an ArtifactError,
a sample the images stage skips and counts (undecodable), or bytes that differ only inside an image payload.
"""

from __future__ import annotations

import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import ArtifactError
from pipeline.shards import FeatureShards, ImageShards, PairData, read_tar_shard

FAST_SEEDS = range(16)
SLOW_SEEDS = range(16, 216)  # 200 more in the slow suite


def _corrupt(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(["flip", "flip", "truncate", "duplicate"] if path.suffix == ".tar" else ["flip", "truncate"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data)) :]
    else:  # a member (header + data) copied into the middle, at a block boundary
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
        m = rng.choice(members)
        chunk = bytes(data[m.offset : m.offset_data + -(-m.size // 512) * 512])
        at = rng.choice(members).offset
        data[at:at] = chunk
    path.write_bytes(bytes(data))
    return kind


def _read_images(root: Path) -> dict:
    art = ImageShards(root)
    out = {}
    for split in art.splits:
        for pos, key, cls, data, ext in art.iter(split):
            out[(split, pos)] = (key, cls, data, ext)
            assert art.image(split, pos) == (key, data)
    return out


def _read_features(root: Path) -> dict:
    art = FeatureShards(root)
    out = {}
    for split in art.splits:
        for pos, key, cls, f in art.iter(split):
            out[(split, pos)] = (key, cls, f.tobytes())
            k2, c2, whole = art.get(pos, split)
            _, _, view1 = art.get(pos, split, view=1)
            assert (k2, c2) == (key, cls) and np.array_equal(whole, f) and np.array_equal(view1, f[1])
    return out


def _read_pairs(images_root: Path, features_root: Path) -> bytes:
    data = PairData(ImageShards(images_root), FeatureShards(features_root), "train", cache_bytes=0)
    feats, crops = data.rows(list(range(len(data))))
    return feats.numpy().tobytes() + crops.numpy().tobytes()


@pytest.fixture(scope="module")
def clean(images_artifact, features_artifact):
    return {"images": _read_images(images_artifact), "features": _read_features(features_artifact),
            "pairs": _read_pairs(images_artifact, features_artifact)}


def _fuzz(seed: int, tmp_path: Path, images_artifact: Path, features_artifact: Path, clean: dict) -> None:
    rng = random.Random(seed)
    imgs, feats = tmp_path / "img", tmp_path / "feat"
    shutil.copytree(images_artifact, imgs)
    shutil.copytree(features_artifact, feats)
    which = rng.choice(["images", "features"])
    root = imgs if which == "images" else feats
    shards = sorted(root.glob("*.tar"))
    target = rng.choice(shards)
    if rng.random() < 0.2:
        target = target.with_name(target.name + ".idx.npz")  # the index can rot too
    kind = _corrupt(target, rng)
    reader = _read_images if which == "images" else _read_features
    try:
        got = reader(root)
    except ArtifactError as e:
        name = target.name.removesuffix(".idx.npz")
        assert name in str(e) and ("re-run" in str(e) or "delete" in str(e)), (kind, str(e))
    else:
        assert got == clean[which], f"seed {seed}: {kind} of {target.name} gave a silently different result"
    try:
        pairs = _read_pairs(imgs, feats)
    except ArtifactError:
        pass
    else:
        assert pairs == clean["pairs"], f"seed {seed}: the image/feature join changed silently"


def _fuzz_foreign(seed: int, tmp_path: Path, images_artifact: Path) -> None:
    """A corrupted tar that is not ours (an images source): an ArtifactError, or samples that differ from the clean
    ones only inside member payloads (which the images stage decodes, skipping and counting what does not decode)."""
    rng = random.Random(seed)
    src = sorted(images_artifact.glob("*.tar"))[0]
    clean = list(read_tar_shard(src))
    tar = tmp_path / "source.tar"
    shutil.copy(src, tar)
    kind = _corrupt(tar, rng)
    try:
        got = list(read_tar_shard(tar))
    except ArtifactError as e:
        assert "source.tar" in str(e), (kind, str(e))
        return
    assert [s["__key__"] for s in got] == [s["__key__"] for s in clean], f"seed {seed}: {kind} changed the listing"
    for a, b in zip(got, clean):
        assert {k: len(v) for k, v in a.items() if k != "__key__"} == \
            {k: len(v) for k, v in b.items() if k != "__key__"}, f"seed {seed}: {kind} changed a sample's members"


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_corrupt_shards_are_errors_or_the_clean_result(seed, tmp_path, images_artifact, features_artifact, clean):
    _fuzz(seed, tmp_path, images_artifact, features_artifact, clean)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_corrupt_shards_are_errors_or_the_clean_result_more_seeds(seed, tmp_path, images_artifact,
                                                                 features_artifact, clean):
    _fuzz(seed, tmp_path, images_artifact, features_artifact, clean)


@pytest.mark.parametrize("seed", range(12))
def test_corrupt_foreign_tars_are_errors_or_payload_changes(seed, tmp_path, images_artifact):
    _fuzz_foreign(seed, tmp_path, images_artifact)
