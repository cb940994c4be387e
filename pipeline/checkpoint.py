"""Training checkpoints and published weights: safetensors + JSON only (no pickle), atomic, kept N, damage-tolerant.

Layout of a run directory (written by `pipeline.train`):

    checkpoints/<step:09d>/      one folder per checkpoint, written as `.tmp-<step>` and renamed in one step
        <name>.safetensors         a state dict per module ("model", "ema", ...) and per optimizer ("optimizer")
        trainer.json               step, logged history, the stage's own JSON state, optimizer hyper-parameters
    latest.json                  {"step", "path"} of the newest checkpoint, rewritten atomically after the rename
    <published>/                 what the stage publishes (weights + config.json), swapped in atomically

Resume reads `latest.json`, never a file name or size; a checkpoint that does not read (a torn copy, a bad disk) is
skipped with a warning for the newest older one that does (STYLE.md P6). Tensors are written by our own streaming
safetensors writer, so a full disk is a plain `OSError(ENOSPC)` (the CLI's clear message) rather than a
`SafetensorError` or a C++ `basic_ios::clear`, and nothing is serialised to memory first.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from pipeline.manifest import ArtifactError, _fsync_dir, atomic_write_json

LATEST = "latest.json"
ROOT = "checkpoints"
TRAINER = "trainer.json"

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


# ------------------------------------------------------------------------------------------------ tensors


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as a safetensors file (readable by `safetensors.torch.load_file`), streamed tensor by tensor.

    The header is the format's own (8-byte little-endian length, JSON, then the raw little-endian bytes in
    header order); storage errors surface as `OSError` with their errno.
    """
    items = sorted((k, v.detach().to("cpu").contiguous()) for k, v in tensors.items())
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for _, t in items:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file as a dict of tensors on `device`; ArtifactError naming the file if it does not read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))  # on CPU ("cuda:0"-style devices are moved below)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    return {k: v.to(device) for k, v in tensors.items()} if str(device) != "cpu" else tensors


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as safetensors-able tensors `{"<param>.<key>": t}` and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{pid}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `optimizer_tensors`: a state dict for `optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------------ folders


def fsync_tree(root: Path) -> None:
    """fsync every file under `root` and every folder (so a rename of `root` commits durable contents)."""
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted({p.parent for p in root.rglob("*")} | {root}):
        _fsync_dir(d)


def write_folder(final: Path, fill: Callable[[Path], None]) -> None:
    """`fill(tmp)` writes a folder beside `final`; it is fsynced and swapped in (final -> .old, tmp -> final).

    A failure leaves `final` as it was and removes the temporary folder; a kill between the two renames leaves
    `.old`, which `recover_folder` puts back.
    """
    tmp, old = final.with_name(".tmp-" + final.name), final.with_name(".old-" + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: Path) -> None:
    """Finish a swap killed between its renames (`.old-<name>` left without `<name>`); drop a torn `.tmp-<name>`."""
    old = final.with_name(".old-" + final.name)
    if old.exists() and not final.exists():
        os.replace(old, final)
    shutil.rmtree(final.with_name(".tmp-" + final.name), ignore_errors=True)


def publish(out: Path, name: str, tensors: dict[str, dict[str, torch.Tensor]], json_files: dict[str, Any]) -> Path:
    """Write `<out>/<name>/` atomically: `<file>` -> tensors (safetensors) and `<file>` -> JSON-able objects."""

    def fill(tmp: Path) -> None:
        for file, state in tensors.items():
            save_tensors(tmp / file, state)
        for file, obj in json_files.items():
            (tmp / file).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    final = out / name
    write_folder(final, fill)
    return final


# ------------------------------------------------------------------------------------------------ checkpoints


class Saved(NamedTuple):
    """One checkpoint, read in full before any of it is applied."""

    step: int
    states: dict[str, dict[str, torch.Tensor]]  # "<name>" -> state dict (modules and optimizers)
    trainer: dict  # trainer.json
    path: Path


class Checkpoints:
    """`<run>/checkpoints/<step>/` + `<run>/latest.json`: save, prune to `keep`, and resume from the newest readable."""

    def __init__(self, run: Path, keep: int = 2):
        self.run, self.root, self.keep = Path(run), Path(run) / ROOT, keep

    def save(self, step: int, states: dict[str, dict[str, torch.Tensor]], trainer: dict) -> Path:
        """Write checkpoint `step` (every file in a temporary folder, then one rename), point latest.json at it, prune."""
        final = self.root / f"{step:09d}"
        self.root.mkdir(parents=True, exist_ok=True)

        def fill(tmp: Path) -> None:
            for name, state in states.items():
                save_tensors(tmp / f"{name}.safetensors", state)
            (tmp / TRAINER).write_text(json.dumps({**trainer, "step": step}, sort_keys=True) + "\n")

        write_folder(final, fill)
        atomic_write_json(self.run / LATEST, {"step": step, "path": f"{ROOT}/{final.name}"})
        self._prune(final.name)
        return final

    def _prune(self, newest: str) -> None:
        """Keep the last `keep` checkpoints up to `newest`; later ones belong to an abandoned run (a resume that fell
        back from a damaged checkpoint) and are re-made as training reaches them."""
        names = sorted(p.name for p in self.root.iterdir() if p.name[0].isdigit())
        kept = [n for n in names if n <= newest][-self.keep :]
        for name in names:
            if name not in kept:
                shutil.rmtree(self.root / name)
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-"):  # a save killed before its rename
                shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Path | None:
        """The folder latest.json names (None for a fresh run)."""
        if not (self.run / LATEST).exists():
            return None
        try:
            return self.run / json.loads((self.run / LATEST).read_text())["path"]
        except (ValueError, KeyError) as e:
            raise ArtifactError(f"{self.run / LATEST}: unreadable ({e}); delete it to resume from the newest "
                                f"checkpoint in {self.root}") from None

    def load(self, names: list[str], device: str | torch.device = "cpu", warn: Callable[[str], None] = print
             ) -> Saved | None:
        """The newest readable checkpoint at or before latest.json, with the state dicts `names`; None if none."""
        latest = self.latest()
        if latest is None:
            return None
        for p in self.root.iterdir() if self.root.is_dir() else []:
            if p.name.startswith(".old-"):
                recover_folder(self.root / p.name[len(".old-"):])
        older = sorted((p for p in self.root.iterdir() if p.name[0].isdigit() and p.name < latest.name),
                       reverse=True) if self.root.is_dir() else []
        errors = []
        for ckpt in [latest, *older]:
            try:
                saved = self.read(ckpt, names, device)
            except ArtifactError as e:
                errors.append(str(e))
                continue
            if errors:
                warn(f"{'; '.join(errors)}; resuming from {ckpt} instead (later steps are retrained and their "
                     "checkpoints rewritten)")
            return saved
        raise ArtifactError(f"{errors[0]}; there is no older readable checkpoint. Restore it, or delete {self.root} "
                            f"and {self.run / LATEST} (or re-run with --overwrite) to train from step 0")

    @staticmethod
    def read(ckpt: Path, names: list[str], device: str | torch.device = "cpu") -> Saved:
        """Every file of one checkpoint; ArtifactError naming the folder if any is missing or unreadable."""
        if not ckpt.is_dir():
            raise ArtifactError(f"{ckpt}: unreadable checkpoint (missing)")
        try:
            trainer = json.loads((ckpt / TRAINER).read_text())
            step = int(trainer["step"])
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{ckpt}: unreadable checkpoint ({type(e).__name__}: {e})") from None
        if ckpt.name != f"{step:09d}":
            raise ArtifactError(f"{ckpt}: unreadable checkpoint (its {TRAINER} says step {step})")
        try:
            states = {n: load_tensors(ckpt / f"{n}.safetensors", device) for n in names}
        except ArtifactError as e:
            raise ArtifactError(f"{ckpt}: unreadable checkpoint ({e})") from None
        return Saved(step, states, trainer, ckpt)
