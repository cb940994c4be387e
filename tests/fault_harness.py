"""Fault injection for the pipeline stages: make the k-th call of a sink die, fail or pause, then run a stage.

No production code knows about faults: this module patches the sinks the stages write through (the tar writer,
atomic writes, `os.replace`, `os.fsync`, checkpoint tensor saves, zarr array writes) in the process that
runs the stage, then calls the stage's `run(cfg)`. A patched sink counts its calls; on call `k` it acts:

    kill_before   SIGKILL before the real call (nothing of this write reaches the disk)
    kill_during   the write is torn: a partial file is left where the real writer would be interrupted (the
                  `.tmp` of a tar / atomic write, or the target itself for non-atomic savers), then SIGKILL
    kill_after    SIGKILL right after the real call returns (e.g. a shard renamed but its record not yet written)
    enospc        the sink raises OSError(ENOSPC) before writing (as a full disk does)
    pause         create `<marker>.paused`, wait for `<marker>.go`, then make the real call (a slow first writer)
    count         only count (a clean run that reports how many calls each sink saw)

Two ways to run a spec (a JSON-able dict, see `execute`):
- `run_forked(spec)`: fork the already-initialised test process (torch imported once: a kill test costs the stage's
  work, not 10 s of imports) and wait for the child; returns (exit status, result dict).
- `PYTHONPATH=. python tests/fault_harness.py SPEC.json`: a fresh interpreter, for wall-clock kills with Popen +
  SIGKILL.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import latents_store
from pipeline.manifest import MANIFEST, Manifest, OutputDir, file_sha256, read_manifest, write_manifest
from pipeline.shards import encode_int, encode_npy, write_tar_shard

REPO = Path(__file__).resolve().parent.parent

# sink name -> (module, attribute path) of the function patched; aliases made by `from m import f` are patched too
SINKS: dict[str, tuple[str, str]] = {
    "tar": ("pipeline.shards", "write_tar_shard"),
    "atomic": ("pipeline.manifest", "atomic_write_bytes"),
    "replace": ("os", "replace"),
    "fsync": ("os", "fsync"),
    "save_tensors": ("pipeline.checkpoint", "save_tensors"),
    "zarr": ("zarr", "Array.__setitem__"),
    "tar_member": ("tarfile", "TarFile.addfile"),
}


def _kill() -> None:
    sys.stdout.flush(), sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate(path: Path) -> None:
    """Keep the first half of a file (a write torn by the kill)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def _torn(sink: str, real: Callable, args: tuple, kwargs: dict) -> None:
    """Leave on disk what an interrupted call of `sink` leaves."""
    if sink == "tar":  # the shard was being written to <name>.tmp; nothing renamed yet
        path = Path(args[0])
        real(*args, **kwargs)
        tmp = path.with_name(path.name + ".tmp")
        os.rename(path, tmp)
        _truncate(tmp)
    elif sink == "atomic":
        path, data = Path(args[0]), args[1]
        path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
    elif sink == "save_tensors":  # writes straight to its target (inside a temporary folder): a half-written target
        real(*args, **kwargs)
        _truncate(Path(args[0]))
    elif sink == "tar_member":  # a member half-written into the open tar
        args[0].fileobj.write(b"\0" * 100)
        args[0].fileobj.flush()
    # replace / fsync / zarr: rename is atomic and fsync writes nothing new; a torn call equals kill_before


class Injector:
    """Counts calls of the chosen sinks and acts on call `k` (1-based, counted over all chosen sinks)."""

    def __init__(self, sinks: list[str], k: int, action: str, marker: str | None = None):
        self.sinks, self.k, self.action, self.marker = sinks, k, action, marker
        self.calls = {s: 0 for s in sinks}
        self.total = 0
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, sink: str, real: Callable) -> Callable:
        def patched(*args, **kwargs):
            self.calls[sink] += 1
            self.total += 1
            if self.total == self.k:
                return self._act(sink, real, args, kwargs)
            return real(*args, **kwargs)

        patched.__wrapped__ = real
        return patched

    def _act(self, sink: str, real: Callable, args: tuple, kwargs: dict):
        if self.action == "kill_before":
            _kill()
        if self.action == "kill_during":
            _torn(sink, real, args, kwargs)
            _kill()
        if self.action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.action == "pause":
            Path(self.marker + ".paused").touch()
            while not Path(self.marker + ".go").exists():
                time.sleep(0.02)
        out = real(*args, **kwargs)
        if self.action == "kill_after":
            _kill()
        return out

    def __enter__(self) -> "Injector":
        for sink in self.sinks:
            module, attr = SINKS[sink]
            owner = importlib.import_module(module)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            real = getattr(owner, name)
            patched = self.wrap(sink, real)
            self._set(owner, name, patched)
            if not path:  # `from module import name` copies: patch those too
                for mod in list(sys.modules.values()):
                    if mod is not owner and getattr(mod, "__dict__", {}).get(name) is real:
                        self._set(mod, name, patched)
        return self

    def _set(self, owner: Any, name: str, value: Any) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self._undo):
            setattr(owner, name, value)
        self._undo.clear()


def build_config(spec: dict):
    """The stage module and its config object from a spec."""
    from pipeline.config import config_from_dict

    module = importlib.import_module(spec["stage"])
    cls = getattr(module, spec.get("config_class", "Config"))
    return module, config_from_dict(cls, spec["config"])


def execute(spec: dict) -> dict:
    """Run `spec` in this process: {"stage": "stages.images", "config": {...}, "run": "run", "sinks": [...], "k": 3,
    "action": "kill_after", "marker": path, "dist": [rank, world]}. Returns {"status", "error", "message", "calls"}."""
    import torch

    torch.set_num_threads(1)
    module, cfg = build_config(spec)
    fn = getattr(module, spec.get("run", "run"))
    args = (cfg,)
    if "dist" in spec:
        from pipeline.runtime import Runtime

        args = (cfg, Runtime(*spec["dist"]))
    inj = Injector(spec.get("sinks", []), spec.get("k", 0), spec.get("action", "count"), spec.get("marker"))
    try:
        with inj:
            fn(*args)
        return {"status": "ok", "calls": inj.calls}
    except Exception as e:  # reported to the test, which asserts on type and message
        return {"status": "error", "error": type(e).__name__, "errno": getattr(e, "errno", None),
                "message": str(e), "calls": inj.calls, "traceback": traceback.format_exc()}


def start_forked(spec: dict, result: Path) -> int:
    """Fork a child that runs `spec` and writes its result JSON to `result`; returns the child's pid."""
    result = Path(result)
    result.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # child: never return into the test runner
        code = 0
        try:
            result.write_text(json.dumps(execute(spec)))
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    return pid


def wait_forked(pid: int, result: Path, timeout: float = 300.0) -> tuple[int, dict | None]:
    """Wait for a forked child: (signal number if it was killed, else minus its exit code; its result or None)."""
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"fault harness child {pid} ran over {timeout} s")
        time.sleep(0.02)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
    result = Path(result)
    return sig, (json.loads(result.read_text()) if result.exists() else None)


def run_forked(spec: dict, result: Path, timeout: float = 300.0) -> tuple[int, dict | None]:
    """Run `spec` in a forked child and wait for it (see `wait_forked`)."""
    return wait_forked(start_forked(spec, result), result, timeout)


def wait_for(path: Path, timeout: float = 120.0) -> None:
    """Poll until `path` exists."""
    deadline = time.time() + timeout
    while not Path(path).exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


UNCOMPARED_DIRS = ("tb",)  # TensorBoard event files carry wall-clock times and host names by design
UNCOMPARED_FILES = (MANIFEST, ".lock")  # the manifest is compared by fingerprint (its timings differ per run)


@dataclass
class Case:
    """One stage with a tiny configuration: how to run it through the harness, and which sinks it writes with."""

    name: str
    stage: str
    config: dict
    sinks: tuple[str, ...]
    run: str = "run"
    config_class: str = "Config"
    dist: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)

    def spec(self, out: Path, **fault) -> dict:
        spec = {"stage": self.stage, "run": self.run, "config_class": self.config_class,
                "config": {**self.config, "out": str(out)}, **fault}
        if self.dist is not None:
            spec["dist"] = list(self.dist)
        return spec


VOLATILE_KEYS = ("samples_per_s",)  # throughput logged inside JSON state (train-vae's curve): wall-clock by nature


def _drop_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of an artifact directory (stray .tmp files included: a resume must not leave any).

    JSON files are compared without their VOLATILE_KEYS (measured throughput); everything else byte for byte."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in UNCOMPARED_DIRS and p.name not in UNCOMPARED_FILES:
            if p.suffix == ".json" and any(k.encode() in p.read_bytes() for k in VOLATILE_KEYS):
                out[str(rel)] = "json:" + hashlib.sha256(json.dumps(_drop_volatile(json.loads(p.read_text())),
                                                                   sort_keys=True).encode()).hexdigest()
            else:
                out[str(rel)] = file_sha256(p)
    return out


@dataclass
class Reference:
    """A clean run of a case: its directory, snapshot, manifest and how often it called each sink."""

    out: Path
    files: dict[str, str]
    manifest: Manifest
    calls: dict[str, int]


def reference_run(case: Case, out: Path) -> Reference:
    """A clean run into `out`, snapshotted, then moved aside to `out.ref` so that fault runs can use the same `out`
    (several stages hash their --out into the config, so byte comparisons need the same path)."""
    sig, res = run_forked(case.spec(out, sinks=list(case.sinks), action="count"), out.parent / "ref-result.json")
    assert sig == 0 and res["status"] == "ok", res
    ref = Reference(out.with_name(out.name + ".ref"), snapshot(out), read_manifest(out), res["calls"])
    os.replace(out, ref.out)
    return ref


def pick_k(ref: Reference, case: Case, sink: str, action: str, seed: int) -> int:
    """A call index in [1, calls] chosen by a seeded RNG (kills land anywhere the sink is used)."""
    n = ref.calls[sink]
    assert n > 0, f"{case.name} never calls {sink}"
    return 1 + random.Random(f"{case.name}/{sink}/{action}/{seed}").randrange(n)


def kill_then_resume(case: Case, ref: Reference, out: Path, sink: str, action: str, k: int) -> dict:
    """Kill a run at the k-th `sink` call, check nothing partial is complete, resume, compare with the reference.

    `out` must be the path the reference was made at (it is emptied first)."""
    shutil.rmtree(out, ignore_errors=True)
    sig, res = run_forked(case.spec(out, sinks=[sink], k=k, action=action), out.parent / "kill-result.json")
    assert sig == signal.SIGKILL, f"expected SIGKILL at {sink} call {k}, got {sig}: {res}"
    if (out / MANIFEST).exists() and read_manifest(out).complete:
        # only the very last write (the manifest itself) may precede the kill: the artifact is then whole
        assert read_manifest(out).fingerprint == ref.manifest.fingerprint
    sig, res = run_forked(case.spec(out), out.parent / "resume-result.json")
    assert sig == 0 and res["status"] == "ok", res
    m = read_manifest(out)
    assert m.complete and m.fingerprint == ref.manifest.fingerprint
    assert m.counts == ref.manifest.counts and m.failures == ref.manifest.failures
    files = snapshot(out)
    diff = sorted(k for k in set(files) | set(ref.files) if files.get(k) != ref.files.get(k))
    assert not diff, f"after {action} at {sink} call {k}, these files differ from the clean run: {diff}"
    return res


def make_latents_artifact(root: Path, n: int = 24, tokens: int = 8, dim: int = 16, classes: int = 3,
                          seed: int = 0, attrs: dict | None = None) -> Path:
    """A complete, hand-made latents artifact (what `flatdino latents` writes) for the generator's tests."""
    rng = np.random.default_rng(seed)
    label = np.arange(n) % classes
    mu = (rng.normal(size=(n, tokens, dim)) + label[:, None, None] + 0.5) * 2.0
    path = root / latents_store.STORE
    latents_store.create_latents(path, n, tokens, dim, chunk=8, attrs=attrs or {"seed": seed})
    latents_store.write_rows(path, 0, mu, label, np.arange(n) // 2, np.arange(n) % 2,
                             np.array([f"train_{i:08d}" for i in range(n)]))
    latents_store.finalize_stats(path)
    write_manifest(root, Manifest(stage="latents", complete=True, extra={"classes": [str(c) for c in range(classes)],
                                                                       "seed": seed}))
    return root


def make_features_artifact(root: Path, damage: str | None = None, n_train: int = 16, n_val: int = 4,
                           n_patch: int = 16, dim: int = 24) -> tuple[Path, str]:
    """A complete features artifact of random (2, n_patch, dim) float16 features; `damage` puts a NaN or a wrong
    shape into train sample 5. Returns (path, damaged key)."""
    rng = np.random.default_rng(0)
    records = []
    with OutputDir(root, "features", {"fake": damage}) as od:
        for split, n in (("train", n_train), ("val", n_val)):
            samples = []
            for i in range(n):
                f = rng.standard_normal((2, n_patch, dim)).astype(np.float16)
                if split == "train" and i == 5 and damage == "nan":
                    f[1, 3, 7] = np.nan
                if split == "train" and i == 5 and damage == "shape":
                    f = f[:, :, : dim - 1]
                samples.append({"__key__": f"{split}_{i:08d}", "feat.npy": encode_npy(f), "cls": encode_int(i % 3)})
            records.append({**write_tar_shard(root / f"features-{split}-000000.tar", samples), "split": split})
        extra = {"views": 2, "num_patches": n_patch, "dim": dim, "classes": ["a", "b", "c"],
                 "encoder": {"source": "fake", "fingerprint": "enc0"}, "splits": {"train": n_train, "val": n_val}}
        od.finish(Manifest(stage="features", shards=records, extra=extra, complete=True))
    return root, "train_00000005"


def script_command(spec_path: Path) -> list[str]:
    """argv that runs a spec file in a fresh interpreter (run it with `script_env()`)."""
    return [sys.executable, str(Path(__file__).resolve()), str(spec_path)]


def script_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out = execute(spec)
    if "result" in spec:
        Path(spec["result"]).write_text(json.dumps(out))
    return 0 if out["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
