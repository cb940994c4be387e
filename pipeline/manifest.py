"""Self-describing artifacts: the manifest, atomic writes, fingerprints and the output-directory protocol.

Every stage writes one artifact directory with a `manifest.json`. Shards are committed one by one: the shard file is
written under a temporary name, fsynced and renamed, and only then is its record (`<shard>.json`) written, itself
atomically. A run killed at any moment therefore leaves nothing that a later run mistakes for complete, and a re-run
plans the same shards, skips the committed ones and ends with the same bytes (STYLE.md P6).
"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
RECORD_SUFFIX = ".record.json"


class UserError(Exception):
    """A problem the user can fix; the CLI prints the message without a traceback."""


class ConfigMismatch(UserError):
    """An output directory holds an artifact made with another configuration."""


class ArtifactError(UserError):
    """An input artifact is missing, incomplete, corrupt or does not belong with the others."""


class TooManyFailures(UserError):
    """More inputs failed than the configured tolerance allows."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_with(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`; it is fsynced and renamed into place. On any failure the
    temporary file is removed (disk full, I/O error, a bad input: no partial file is left behind)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory, fsync, then rename."""
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented, key-sorted JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_sha256(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Manifest:
    """The record of one artifact: what made it, from what, and what it holds."""

    stage: str
    config: dict = field(default_factory=dict)
    config_hash: str = ""
    inputs: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)
    shards: list = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"written": 0, "skipped": 0, "failed": 0})
    failures: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    complete: bool = False
    schema_version: int = SCHEMA_VERSION

    @property
    def fingerprint(self) -> str:
        """Identity of the artifact's content: stage, config and every shard's sha256 (timings excluded)."""
        return json_sha256(
            {
                "stage": self.stage,
                "config_hash": self.config_hash,
                "shards": [s.get("sha256") for s in self.shards],
                "extra": self.extra,
            }
        )

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        names = {f.name for f in dataclasses.fields(cls)}
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(f"manifest schema {d.get('schema_version')} is not {SCHEMA_VERSION}; re-run the stage")
        return cls(**{k: v for k, v in d.items() if k in names})


def read_manifest(out: str | Path) -> Manifest:
    """Read `out/manifest.json`; ArtifactError if missing or unreadable."""
    path = Path(out) / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{out}: no {MANIFEST} here; produce this artifact first")
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: corrupt manifest ({e}); delete the directory and re-run its stage") from e


def require_complete(out: str | Path, stage: str) -> Manifest:
    """The manifest of a finished artifact of `stage`, or an ArtifactError that says how to make it."""
    path = Path(out)
    hint = f"run `flatdino {stage.replace('_', '-')}` (or its make target) to produce it"
    if not (path / MANIFEST).exists():
        raise ArtifactError(f"{path}: no {stage} artifact here ({MANIFEST} missing); {hint}")
    m = read_manifest(path)
    if m.stage != stage:
        raise ArtifactError(f"{path}: expected a {stage!r} artifact but found a {m.stage!r} one; check the path")
    if not m.complete:
        raise ArtifactError(f"{path}: the {stage} artifact is incomplete (interrupted run?); re-run to resume it")
    return m


def damaged_shards(out: str | Path, manifest: Manifest) -> list[str]:
    """Names of the manifest's shard files that are missing or whose size differs from their record."""
    bad = []
    for rec in manifest.shards:
        if "name" in rec and "bytes" in rec:
            path = Path(out) / rec["name"]
            if not path.is_file() or path.stat().st_size != rec["bytes"]:
                bad.append(rec["name"])
    return bad


def write_manifest(out: str | Path, manifest: Manifest) -> None:
    atomic_write_json(Path(out) / MANIFEST, manifest.to_json())


# what every stage may leave in its directory besides its own outputs (stamp, lock, records, manifest, temporaries)
COMMON_OWNED = (MANIFEST, ".config.json", LOCK, "*" + RECORD_SUFFIX, "*.tmp", ".tmp-*", ".old-*")


def content_identity(obj: Any) -> Any:
    """`obj` without its "path"/"source" entries (at any depth): what identifies inputs is their content
    (fingerprints, sha256), never where they are, so artifacts may move."""
    if isinstance(obj, dict):
        return {k: content_identity(v) for k, v in obj.items() if k not in ("path", "source")}
    if isinstance(obj, list):
        return [content_identity(v) for v in obj]
    return obj


def local_dirs(path_or_id: str | Path | None) -> list[Path]:
    """[the path] when it names something on disk (an RAE directory), [] for a hub id or None."""
    return [Path(path_or_id)] if path_or_id is not None and Path(path_or_id).exists() else []


def _inside(a: Path, b: Path) -> bool:
    """Whether path `a` is `b` or lies inside it (both resolved)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


class OutputDir:
    """Owns an artifact directory for one run: lock, config check, shard commit records, final manifest.

    Usage::

        with OutputDir(cfg.out, "features", config_dict, overwrite=cfg.overwrite, rt=rt, owns=("features-*.tar",),
                       inputs=[cfg.images]) as od:
            if od.done:
                return od.manifest
            ... for each planned shard not in od.committed(): write it, od.commit(record) ...
            od.finish(manifest)

    Safety rules: the directory is a new or empty one, or one this stage stamped (`.config.json`); another stage's
    artifact, a folder of the user's files, an existing file, or a path equal to / inside / around an input is refused.
    `--overwrite` deletes only what the stage writes (`owns` + the common stamp/lock/records/manifest/temporaries) and
    refuses when anything else is there, naming it. Under a launcher only the main process (`rt.is_main`) locks,
    checks, wipes and stamps; the others wait at the barrier and then only read.
    """

    def __init__(self, out: str | Path, stage: str, config: dict, overwrite: bool = False, *, rt=None,
                 owns: tuple[str, ...] = (), inputs: tuple | list = ()):
        self.path = Path(out)
        self.stage = stage
        self.config = config
        self.config_hash = json_sha256(config)
        self.rt = rt
        self.is_main = rt is None or rt.is_main
        self.overwrite = overwrite and self.is_main
        self.owns = (*COMMON_OWNED, *owns)
        self.inputs = [Path(p) for p in inputs if p is not None]
        self._lock_fd: int | None = None
        self.manifest: Manifest | None = None
        self.done = False

    def _barrier(self) -> None:
        if self.rt is not None:
            self.rt.barrier()

    def __enter__(self) -> "OutputDir":
        if not self.is_main:
            self._barrier()  # rank 0 has checked, wiped (--overwrite) and stamped the directory
            self.path.mkdir(parents=True, exist_ok=True)  # (emulated ranks in tests may come first)
            self._check_existing(read_only=True)
            return self
        try:
            self._check_place()
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
            self._check_existing()
        except BaseException:
            self._release_lock()
            self._barrier()
            raise
        self._barrier()
        return self

    def __exit__(self, *exc) -> None:
        self._release_lock()

    def _check_place(self) -> None:
        """Refuse a --out that is a file, that overlaps an input, or that holds something that is not ours."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is an existing file, not a directory; pass a directory path")
        for p in self.inputs:
            if _inside(self.path, p) or _inside(p, self.path):
                raise UserError(f"--out {self.path} overlaps the input {p} (equal, inside or around it); a stage "
                                f"never writes into its inputs: use another --out")
        if not self.path.is_dir():
            return
        stamp = self.path / ".config.json"
        if not stamp.exists():  # ours only if empty, or holding nothing but what this stage writes (a run killed
            foreign = self._foreign()  # while stamping, or other ranks that wrote before the main one stamped)
            if foreign:
                raise UserError(f"--out {self.path} already holds files that are not a {self.stage} artifact (e.g. "
                                f"{foreign[0]!r}); a stage writes only into a new or empty directory or its own "
                                f"artifact, so nothing of yours is overwritten: use another --out")
            self.overwrite = False  # nothing this stage recorded as its own: never wipe an unstamped directory
            return
        try:
            old = json.loads(stamp.read_text())
        except ValueError as e:
            raise ArtifactError(f"{stamp}: unreadable ({e}); delete it only if {self.path} is this stage's "
                                f"artifact") from None
        if old.get("stage", self.stage) != self.stage:
            raise UserError(f"--out {self.path} holds a {old['stage']} artifact, not a {self.stage} one; "
                            f"--overwrite never deletes another stage's artifact: use another --out")
        if self.overwrite:
            foreign = self._foreign()
            if foreign:
                raise UserError(f"--overwrite would delete {self.path / foreign[0]}, which {self.stage} did not "
                                f"write ({len(foreign)} such entr{'y' if len(foreign) == 1 else 'ies'}); move "
                                f"{'it' if len(foreign) == 1 else 'them'} out of {self.path} first, or use another "
                                f"--out")

    def _owned(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.owns)

    def _foreign(self) -> list[str]:
        return sorted(e.name for e in self.path.iterdir() if not self._owned(e.name))

    def _acquire_lock(self) -> None:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{self.path} is being written by another process (lock {LOCK} held); wait for it or use another --out"
            ) from None
        self._lock_fd = fd

    def lock_fds(self) -> tuple[int, ...]:
        """File descriptors a forked worker must close (the lock: a child holding it would keep it after we die)."""
        return () if self._lock_fd is None else (self._lock_fd,)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_existing(self, read_only: bool = False) -> None:
        stamp = self.path / ".config.json"
        if self.overwrite:
            self._wipe()
        elif stamp.exists():
            old = json.loads(stamp.read_text())
            if old["config_hash"] != self.config_hash:
                raise ConfigMismatch(self._mismatch_message(old["config"]))
            if (self.path / MANIFEST).exists():
                m = read_manifest(self.path)
                if m.complete and m.config_hash == self.config_hash:
                    damaged = damaged_shards(self.path, m)
                    if not damaged:
                        self.manifest, self.done = m, True
                        return
                    logging.getLogger("flatdino.manifest").warning(
                        "%s: %d shard(s) missing or truncated (%s); rewriting them", self.path, len(damaged),
                        ", ".join(damaged[:3]))
        if not read_only:
            atomic_write_json(stamp, {"stage": self.stage, "config_hash": self.config_hash, "config": self.config})

    def _mismatch_message(self, old: dict) -> str:
        diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {self.config.get(k)!r}" for k in diff[:6])
        inputs = [k for k in diff if "fingerprint" in k or k in ("input", "images", "features", "samples",
                                                                  "reference")]
        why = (f" Its input changed since this run started ({', '.join(inputs)}): restore the input it was made "
               f"from, use another --out, or pass --overwrite to delete this stage's files and start again."
               if inputs else " Use another --out, or pass --overwrite to delete this stage's files and start again.")
        return f"{self.path} already holds a {self.stage} artifact made with a different config ({shown}).{why}"

    def _wipe(self) -> None:
        """Delete what this stage wrote (checked in `_check_place`: nothing else is there)."""
        for p in self.path.iterdir():
            if p.name == LOCK or not self._owned(p.name):
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def committed(self) -> dict[str, dict]:
        """Records of the shards already committed, keyed by shard name (only those whose file still exists)."""
        out = {}
        for rec_path in sorted(self.path.glob("*" + RECORD_SUFFIX)):
            rec = json.loads(rec_path.read_text())
            target = self.path / rec["name"]
            if target.exists() and (not target.is_file() or target.stat().st_size == rec["bytes"]):
                out[rec["name"]] = rec
        return out

    def collect(self, names: list[str]) -> list[dict] | None:
        """The committed records of `names`, in that order; None (and a log line) while some are still missing,
        i.e. other ranks have not finished their share: the next run of the same command completes the artifact."""
        committed = self.committed()
        missing = [n for n in names if n not in committed]
        if missing:
            logging.getLogger("flatdino.manifest").info(
                "%s: %d of %d parts still missing (other ranks); run again to finish", self.path, len(missing),
                len(names))
            return None
        return [committed[n] for n in names]

    def commit(self, record: dict) -> None:
        """Mark one shard as finished by writing its record atomically (after the shard itself is in place)."""
        atomic_write_json(self.path / (record["name"] + RECORD_SUFFIX), record)

    def finish(self, manifest: Manifest) -> Manifest:
        """Write the final manifest (main process only)."""
        manifest.config, manifest.config_hash = self.config, self.config_hash
        write_manifest(self.path, manifest)
        self.manifest = manifest
        return manifest
