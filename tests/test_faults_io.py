"""Write errors, concurrent writers and wall-clock kills (issue #8).

- ENOSPC injected in the sinks (tar writer, fsync, atomic writes, checkpoint saves) through the real CLI: a clear
  message naming the path, exit code 2, no traceback, no partial file left, nothing marked complete; the same command
  run again finishes with the same bytes as a clean run.
- Two writers on one --out: the second is refused by the lock, the first finishes unharmed.
- SIGKILL after a random wall-clock delay of a fresh interpreter (no call counting): the re-run is byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fault_harness import (Injector, make_features_artifact, make_latents_artifact, run_forked, script_command,
                           script_env, snapshot, start_forked, wait_for, wait_forked)
from pipeline.manifest import MANIFEST, UserError, read_manifest


def cli_args(config: dict) -> list[str]:
    """click arguments for a config dict (the options map one to one onto the fields)."""
    args = []
    for k, v in config.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(name if v else "--no-" + k.replace("_", "-"))
        else:
            args += [name, str(v)]
    return args


def stage_configs(request, tmp_path_factory) -> dict:
    """name -> (module, config dict) of the stages under test, tiny."""
    images = request.getfixturevalue("images_artifact")
    latents = make_latents_artifact(tmp_path_factory.mktemp("latents"))
    feats, _ = make_features_artifact(tmp_path_factory.mktemp("feats") / "f", n_train=20)
    vae = {"features": str(feats), "preset": "demo", "variant": "demo", "epochs": 1, "global_batch": 8,
           "micro_batch": 4, "lr_peak": 2e-3, "val_every": 2, "ckpt_every": 2, "log_every": 1, "num_workers": 1,
           "device": "cpu"}
    vae_dir = tmp_path_factory.mktemp("vae") / "run"
    assert run_forked({"stage": "stages.train_vae", "config": {**vae, "out": str(vae_dir)}},
                      vae_dir.parent / "r.json")[0] == 0
    return {
        "train_vae": ("stages.train_vae", vae),
        "latents": ("stages.latents", {"features": str(feats), "vae": str(vae_dir), "shard_samples": 4,
                                       "batch_size": 3, "device": "cpu"}),
        "images": ("stages.images", {"source": str(request.getfixturevalue("image_folder")), "shard_size": 5,
                                     "val_fraction": 0.25}),
        "features": ("stages.features", {"images": str(images), "encoder": str(request.getfixturevalue("encoder_dir")),
                                         "views": 2, "batch_size": 4, "num_workers": 1}),
        "train_classifier": ("stages.classifier", {"images": str(images), "min_val_accuracy": 0.0}),
        "train_dit": ("stages.train_dit", {"latents": str(latents), "preset": "T", "steps": 4, "global_batch": 8,
                                           "lr": 1e-3, "ckpt_every": 2, "keep": 2, "log_every": 1, "device": "cpu"}),
    }


@pytest.fixture(scope="module")
def configs(request, tmp_path_factory):
    return stage_configs(request, tmp_path_factory)


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


def assert_same_artifact(out: Path, clean: Path) -> None:
    a, b = comparable(out), comparable(clean)
    diff = sorted(k for k in set(a["files"]) | set(b["files"]) if a["files"].get(k) != b["files"].get(k))
    assert not diff, f"files differ from the clean run: {diff}"
    assert a == b


def comparable(out: Path) -> dict:
    """What must match a clean run: shard/weight bytes (the manifest fingerprint of path-independent stages)."""
    m = read_manifest(out)
    files = {k: v for k, v in snapshot(out).items() if k.endswith((".tar", ".safetensors", ".npz"))}
    return {"complete": m.complete, "counts": m.counts, "files": files,
            "shards": [s.get("sha256") for s in m.shards]}


# (stage, sink, k): a tar shard refused up front, the fsync of a shard/record (the real writer cleans up its
# .tmp), the manifest/record atomic writes, and the checkpoint savers
_SLOW = pytest.mark.slow
ENOSPC = [("images", "tar", 2), ("images", "fsync", 3), ("features", "fsync", 1),
          pytest.param("features", "atomic", 2, marks=_SLOW), ("train_classifier", "atomic", 2),
          ("train_dit", "save_tensors", 2), pytest.param("train_dit", "save_tensors", 7, marks=_SLOW),
          pytest.param("train_dit", "atomic", 1, marks=_SLOW), ("latents", "zarr", 6), ("train_vae", "save_tensors", 2)]


@pytest.mark.parametrize("stage,sink,k", ENOSPC)
def test_disk_full_is_a_clear_message_and_the_rerun_resumes(configs, tmp_path, stage, sink, k):
    import importlib

    module_name, config = configs[stage]
    module = importlib.import_module(module_name)
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert CliRunner().invoke(module.cli, cli_args({**config, "out": clean})).exit_code == 0
    with Injector([sink], k, "enospc") as inj:
        res = CliRunner().invoke(module.cli, cli_args({**config, "out": out}))
    assert inj.total >= k, "the fault was never injected"
    assert res.exit_code == 2, res.output
    assert "No space left on device while writing" in res.output and "re-run the same command" in res.output
    assert "Traceback" not in res.output
    # no partial file; training stages may leave their (empty or partial) .tmp checkpoint folder, never read
    assert not [p for p in out.rglob("*.tmp") if p.is_file()], "a failed write left a partial file"
    assert not (out / MANIFEST).exists() or not read_manifest(out).complete
    res = CliRunner().invoke(module.cli, cli_args({**config, "out": out}))
    assert res.exit_code == 0, res.output
    assert not leftovers(out), "the re-run left temporary files or folders"
    assert_same_artifact(out, clean)


def test_other_storage_errors_get_the_same_treatment_and_code_errors_do_not(tmp_path):
    import errno

    from pipeline.config import command_from_config

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        out: Path

    def fails_with(code):
        def run(cfg):
            raise OSError(code, "boom", str(cfg.out / "x.tar"))
        return command_from_config(Cfg, run, "x", "help")

    for code, text in [(errno.EDQUOT, "Disk quota exceeded"), (errno.EIO, "I/O error"),
                       (errno.EROFS, "Read-only file system")]:
        res = CliRunner().invoke(fails_with(code), ["--out", str(tmp_path)])
        assert res.exit_code == 2 and f"{text} while writing {tmp_path / 'x.tar'}" in res.output
    res = CliRunner().invoke(fails_with(errno.ENOENT), ["--out", str(tmp_path)])
    assert res.exit_code == 1 and isinstance(res.exception, FileNotFoundError)  # a bug, not the disk: traceback


LOCKED = [("images", "tar", 2), ("train_dit", "save_tensors", 1)]


@pytest.mark.parametrize("stage,sink,k", LOCKED, ids=[p[0] for p in LOCKED])
def test_second_writer_is_refused_and_first_finishes_unharmed(configs, tmp_path, stage, sink, k):
    import importlib

    from pipeline.config import config_from_dict

    module_name, config = configs[stage]
    module = importlib.import_module(module_name)
    clean, out, marker = tmp_path / "clean", tmp_path / "out", str(tmp_path / "marker")
    assert run_forked({"stage": module_name, "config": {**config, "out": str(clean)}}, tmp_path / "c.json")[0] == 0
    first = start_forked({"stage": module_name, "config": {**config, "out": str(out)}, "sinks": [sink], "k": k,
                          "action": "pause", "marker": marker}, tmp_path / "first.json")
    try:
        wait_for(Path(marker + ".paused"))
        before = snapshot(out)
        with pytest.raises(UserError, match="being written by another process"):
            module.run(config_from_dict(module.Config, {**config, "out": str(out)}))
        assert snapshot(out) == before  # the refused writer touched nothing
    finally:
        Path(marker + ".go").touch()
        sig, res = wait_forked(first, tmp_path / "first.json")
    assert sig == 0 and res["status"] == "ok", res
    assert_same_artifact(out, clean)


def _wall_clock_kill(configs, tmp_path, stage: str, seed: int) -> None:
    module_name, config = configs[stage]
    clean, out = tmp_path / "clean", tmp_path / "out"
    t0 = time.time()
    assert run_forked({"stage": module_name, "config": {**config, "out": str(clean)}}, tmp_path / "c.json")[0] == 0
    duration = time.time() - t0
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"stage": module_name, "config": {**config, "out": str(out)}}))
    proc = subprocess.Popen(script_command(spec), env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(out / ".config.json", timeout=300)  # imports done, the stage has taken its output directory
    time.sleep(random.Random(seed).uniform(0.0, 0.7 * duration))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill; nothing was tested"
    assert not (out / MANIFEST).exists() or read_manifest(out).complete
    sig, res = run_forked({"stage": module_name, "config": {**config, "out": str(out)}}, tmp_path / "r.json")
    assert sig == 0 and res["status"] == "ok", res
    assert_same_artifact(out, clean)
    assert not leftovers(out)


def test_kill_after_a_random_delay_then_rerun_is_identical(configs, tmp_path):
    _wall_clock_kill(configs, tmp_path, "features", seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage,seed", [("features", 1), ("train_dit", 0), ("train_dit", 1), ("images", 0)])
def test_kill_after_a_random_delay_more_seeds(configs, tmp_path, stage, seed):
    _wall_clock_kill(configs, tmp_path, stage, seed)
