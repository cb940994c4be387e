"""Manifest, output-directory protocol, shard plan, tar I/O, config <-> CLI mapping, latents store."""

from __future__ import annotations

import json
import multiprocessing as mp
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import latents_store, shards
from pipeline.config import command_from_config, config_from_dict, config_to_dict, opt
from pipeline.manifest import ConfigMismatch, Manifest, OutputDir, UserError, read_manifest, require_complete, ArtifactError
from pipeline.runtime import Runtime, stable_seed, torch_generator


def test_plan_covers_every_index_once_and_rank_split_partitions():
    plan = shards.plan_shards(23, 5, "x")
    assert [(s.start, s.stop) for s in plan] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert plan[3].name == "x-000003.tar"
    for world in (1, 2, 3, 7):
        parts = [Runtime(r, world).share(plan) for r in range(world)]
        assert sorted(s.index for p in parts for s in p) == list(range(5))


def test_tar_shard_is_deterministic_and_webdataset_readable(tmp_path):
    import webdataset as wds

    samples = [{"__key__": f"k_{i:03d}", "feat.npy": shards.encode_npy(np.full((2, 3), i, np.float16)),
                "cls": shards.encode_int(i % 3)} for i in range(7)]
    r1 = shards.write_tar_shard(tmp_path / "a.tar", samples)
    r2 = shards.write_tar_shard(tmp_path / "b.tar", samples)
    assert r1["sha256"] == r2["sha256"] and r1["count"] == 7 and r1["first_key"] == "k_000"
    assert not list(tmp_path.glob("*.tmp"))
    back = list(shards.read_tar_shard(tmp_path / "a.tar"))
    assert [s["__key__"] for s in back] == [s["__key__"] for s in samples]
    assert np.array_equal(shards.decode_npy(back[4]["feat.npy"]), np.full((2, 3), 4, np.float16))
    # the reference reader (webdataset) sees the same samples and fields
    ref = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in ref] == [s["__key__"] for s in samples]
    assert ref[2]["cls"] == b"2"
    index = shards.index_tar_shard(tmp_path / "a.tar")
    assert shards.read_member(tmp_path / "a.tar", *index["k_005"]["cls"]) == b"2"


def test_truncated_tar_is_a_clear_error(tmp_path):
    samples = [{"__key__": f"k{i}", "bin": bytes(5000)} for i in range(4)]
    rec = shards.write_tar_shard(tmp_path / "a.tar", samples)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: rec["bytes"] // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        list(shards.read_tar_shard(tmp_path / "a.tar"))


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="may not contain"):
        shards.write_tar_shard(tmp_path / "a.tar", [{"__key__": "a.b", "x": b""}])


def test_output_dir_noop_mismatch_and_overwrite(tmp_path):
    out = tmp_path / "art"
    with OutputDir(out, "s", {"a": 1}) as od:
        assert not od.done
        (od.path / "x-000000.tar").write_bytes(b"abc")
        od.commit({"name": "x-000000.tar", "bytes": 3, "sha256": "h"})
        od.finish(Manifest(stage="s", shards=[{"sha256": "h"}], complete=True))
    with OutputDir(out, "s", {"a": 1}) as od:
        assert od.done and od.manifest.complete
    with pytest.raises(ConfigMismatch, match="a: 1 -> 2"):
        OutputDir(out, "s", {"a": 2}).__enter__()
    with OutputDir(out, "s", {"a": 2}, overwrite=True, owns=("x-*.tar",)) as od:
        assert not od.done and not (out / "x-000000.tar").exists()


def test_overwrite_deletes_only_what_the_stage_wrote(tmp_path):
    """A user's file in an artifact directory stops --overwrite before anything is deleted, naming the file."""
    out = tmp_path / "art"
    with OutputDir(out, "s", {"a": 1}, owns=("x-*.tar",)) as od:
        (od.path / "x-000000.tar").write_bytes(b"abc")
    (out / "thesis.tex").write_text("years of work")
    (out / "photos").mkdir()
    with pytest.raises(UserError, match=r"--overwrite would delete .*photos, which s did not write \(2 such"):
        OutputDir(out, "s", {"a": 2}, overwrite=True, owns=("x-*.tar",)).__enter__()
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "x-000000.tar").exists()
    (out / "thesis.tex").unlink(), (out / "photos").rmdir()
    with OutputDir(out, "s", {"a": 2}, overwrite=True, owns=("x-*.tar",)):
        assert sorted(p.name for p in out.iterdir()) == [".config.json", ".lock"]


def test_a_folder_of_user_files_another_stage_or_a_file_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="not a s artifact .*thesis.tex"):
        OutputDir(mine, "s", {}, overwrite=True).__enter__()
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]  # not even a lock file left
    images = tmp_path / "images"
    with OutputDir(images, "images", {}) as od:
        od.finish(Manifest(stage="images", complete=True))
    with pytest.raises(UserError, match="holds a images artifact, not a features one; --overwrite never"):
        OutputDir(images, "features", {}, overwrite=True).__enter__()
    assert (images / "manifest.json").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is an existing file"):
        OutputDir(tmp_path / "file", "s", {}).__enter__()


@pytest.mark.parametrize("where", ["equal", "inside", "around"])
def test_out_may_not_overlap_an_input(tmp_path, where):
    inp = tmp_path / "in" / "art"
    inp.mkdir(parents=True)
    out = {"equal": inp, "inside": inp / "sub", "around": tmp_path / "in"}[where]
    with pytest.raises(UserError, match="overlaps the input"):
        OutputDir(out, "s", {}, inputs=[inp]).__enter__()


def test_committed_ignores_records_whose_shard_is_gone_or_short(tmp_path):
    with OutputDir(tmp_path, "s", {}) as od:
        (tmp_path / "a.tar").write_bytes(b"1234")
        od.commit({"name": "a.tar", "bytes": 4})
        od.commit({"name": "b.tar", "bytes": 4})  # shard never renamed into place
        (tmp_path / "c.tar").write_bytes(b"12")
        od.commit({"name": "c.tar", "bytes": 4})  # size differs from its record
        assert list(od.committed()) == ["a.tar"]


def _hold_lock(path, ready, release):
    with OutputDir(path, "s", {}):
        ready.set()
        release.wait(10)


def test_second_writer_is_refused_and_first_unharmed(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    p.start()
    assert ready.wait(10)
    with pytest.raises(UserError, match="another process"):
        OutputDir(tmp_path, "s", {}).__enter__()
    release.set()
    p.join(10)
    assert p.exitcode == 0
    with OutputDir(tmp_path, "s", {}) as od:  # lock released with the holder
        assert not od.done


def test_require_complete_messages(tmp_path):
    with pytest.raises(ArtifactError, match="flatdino features"):
        require_complete(tmp_path, "features")
    with OutputDir(tmp_path, "images", {}) as od:
        od.finish(Manifest(stage="images", complete=False))
    with pytest.raises(ArtifactError, match="incomplete"):
        require_complete(tmp_path, "images")
    with pytest.raises(ArtifactError, match="expected a 'features'"):
        require_complete(tmp_path, "features")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        read_manifest(tmp_path)


def test_fingerprint_ignores_timings_but_not_content():
    a = Manifest(stage="s", config_hash="c", shards=[{"sha256": "1"}], timings={"seconds": 1})
    b = Manifest(stage="s", config_hash="c", shards=[{"sha256": "1"}], timings={"seconds": 2})
    c = Manifest(stage="s", config_hash="c", shards=[{"sha256": "2"}])
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert Manifest.from_json(json.loads(json.dumps(a.to_json()))).fingerprint == a.fingerprint


@dataclass(frozen=True)
class _Cfg:
    out: Path = field(metadata=opt("output"))
    n: int = field(default=3, metadata=opt("a count"))
    mode: Literal["a", "b"] = field(default="a", metadata=opt("a choice"))
    interval: tuple[float, float] = field(default=(0.3, 1.0), metadata=opt("a pair"))
    flag: bool = field(default=False, metadata=opt("a flag", runtime=True))


def test_command_from_config_maps_fields_one_to_one(tmp_path):
    seen = []
    cmd = command_from_config(_Cfg, lambda cfg: seen.append(cfg), "x", "help")
    res = CliRunner().invoke(cmd, ["--out", str(tmp_path), "--n", "5", "--mode", "b", "--interval", "0", "0.5", "--flag"])
    assert res.exit_code == 0, res.output
    assert seen == [_Cfg(out=tmp_path, n=5, mode="b", interval=(0.0, 0.5), flag=True)]
    assert {p.name for p in cmd.params} == {"out", "n", "mode", "interval", "flag"}
    res = CliRunner().invoke(cmd, ["--out", "x", "--mode", "c"])
    assert res.exit_code == 2 and "'c' is not one of" in res.output
    d = config_to_dict(seen[0], semantic_only=True)
    assert "flag" not in d and d["interval"] == [0.0, 0.5]
    assert config_from_dict(_Cfg, config_to_dict(seen[0])) == seen[0]


def test_user_errors_exit_2_without_traceback():
    def boom(cfg):
        raise UserError("the input is wrong; do this")

    res = CliRunner().invoke(command_from_config(_Cfg, boom, "x", "help"), ["--out", "o"])
    assert res.exit_code == 2 and "error: the input is wrong; do this" in res.output and "Traceback" not in res.output


def test_stable_seeds():
    assert stable_seed(1, "a") == stable_seed(1, "a") != stable_seed(1, "b")
    import torch

    assert torch.equal(torch.randn(3, generator=torch_generator(0, 5)), torch.randn(3, generator=torch_generator(0, 5)))


def test_latents_store_stats_equal_numpy_float64(tmp_path):
    rng = np.random.default_rng(0)
    mu = (rng.standard_normal((37, 4, 3)) * 3 + 7).astype(np.float32)
    mu[:, 0, 0] = 5.0  # a collapsed channel: std floored at eps, never zero
    path = tmp_path / "latents.zarr"
    latents_store.create_latents(path, 37, 4, 3, chunk=8, attrs={"v": 1})
    for s in range(0, 37, 8):
        e = min(s + 8, 37)
        latents_store.write_rows(path, s, mu[s:e], np.arange(s, e) % 2, np.arange(s, e), np.zeros(e - s),
                                 [f"k{i}" for i in range(s, e)])
    mean, std = latents_store.finalize_stats(path, eps=1e-6)
    ref = mu.astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std[1:], ref.std(0)[1:], rtol=1e-10)
    assert std[0, 0] == 1e-6
    art = latents_store.open_latents(tmp_path)
    assert art.shape == (4, 3) and len(art) == 37 and art.key[5] == "k5" and art.label[3] == 1
    np.testing.assert_array_equal(art.mu[:], mu)
    with pytest.raises(ValueError, match="aligned"):
        latents_store.write_rows(path, 3, mu[:2], np.zeros(2), np.zeros(2), np.zeros(2), ["a", "b"])
    with pytest.raises(ArtifactError, match="another shape"):
        latents_store.create_latents(path, 38, 4, 3, chunk=8, attrs={"v": 1})
