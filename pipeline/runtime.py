"""Process-level runtime: distribution info, rank-0 logging, progress bars, seeding, precision, versions.

Nothing here touches global state at import. Stages call these helpers inside `run()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Runtime:
    """The one description of this process: rank, world size, device and precision, and its collectives.

    Built once per stage by `launch()` from accelerate's process state (or constructed directly: `Runtime(1, 2)`
    emulates rank 1 of 2 in one process for tests, with collectives that do nothing). Nothing else reads the rank.
    Work is split by a plan over global indices (`share`), never by rank alone, so outputs do not depend on `world`.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    distributed: bool = False  # a real process group exists (accelerate launch); False for emulated ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, plan: list) -> list:
        """This process's part of a plan: plan[rank::world]."""
        return plan[self.rank :: self.world]

    def barrier(self) -> None:
        """Wait for every process (no-op for one process or an emulated rank)."""
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over processes in place (no-op for one process or an emulated rank)."""
        if self.distributed:
            torch.distributed.all_reduce(t)
        return t

    def autocast(self):
        """bf16 autocast on this device for precision 'bf16', a null context for 'fp32'."""
        return autocast(self.precision, self.device)

    def on(self, device: str = "auto", precision: str = "auto") -> "Runtime":
        """The same process with its stage's device ('auto': accelerate's under a launcher, else cuda if available)
        and precision ('auto': bf16 on CUDA with bf16 support, else fp32)."""
        if self.distributed and device in ("auto", "cuda"):
            from accelerate import PartialState

            dev = PartialState().device
        else:
            dev = resolve_device(device)
        return replace(self, device=dev, precision=resolve_precision(precision, dev))


def launch(device: str = "auto", precision: str = "auto") -> Runtime:
    """This process's Runtime: rank and world from the launcher (accelerate/torchrun), else one process.

    On a CUDA-less host accelerate is brought up in CPU (gloo) mode: `PartialState()` alone reports a single
    process there under `accelerate launch --multi_gpu`, so every rank would believe it is rank 0 of 1.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        rt = Runtime(state.process_index, state.num_processes, distributed=state.num_processes > 1)
    else:
        rt = Runtime()
    _RankFilter.rank = rt.rank
    return rt.on(device, precision)


class _RankFilter(logging.Filter):
    """Lets records through on rank 0 only; `launch()` sets the rank."""

    rank = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return _RankFilter.rank == 0


def get_logger(name: str) -> logging.Logger:
    """A logger under `flatdino.` that only speaks on rank 0; configured once, on first use."""
    root = logging.getLogger("flatdino")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("FLATDINO_LOG_LEVEL", "INFO"))
        root.propagate = False
    return root.getChild(name.split(".")[-1])


def progress(total: int | None, desc: str, unit: str = "it", rt: Runtime | None = None, initial: int = 0) -> tqdm:
    """A tqdm bar with rate and ETA on the main process; silent elsewhere and when stderr is not a terminal in CI."""
    disable = rt is not None and not rt.is_main
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, dynamic_ncols=True,
                mininterval=1.0, smoothing=0.1)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and Python runs."""
    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def torch_generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from `parts` (e.g. seed, shard index), for noise that goes into an artifact."""
    g = torch.Generator(device=device)
    g.manual_seed(stable_seed(*parts))
    return g


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA with bf16 support, fp32 otherwise."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(precision: str, device: torch.device):
    """Autocast context for 'bf16', a null context for 'fp32'."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {precision!r}; use fp32, bf16 or auto")


def git_version() -> dict:
    """Commit sha and dirty flag of the code that runs (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "dirty": bool(status) if status is not None else None}


def environment() -> dict:
    """Versions and flags recorded in every manifest. Package versions come from their installed metadata: importing
    diffusers and transformers only to read `__version__` cost ~1 s in every stage that does not use them."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "transformers": installed("transformers"),
        "diffusers": installed("diffusers"),
        "xformers": installed("xformers"),  # optional CUDA backend
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "hostname": platform.node(),
        **git_version(),
    }
