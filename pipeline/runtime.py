"""Process-level runtime: distribution info, rank-0 logging, progress bars, seeding, precision, versions.

Nothing here touches global state at import. Stages call these helpers inside `run()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Dist:
    """Rank and world size of this process; work is split by a plan over global indices, never by rank alone."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_dist() -> Dist:
    """Rank/world from the launcher (accelerate/torchrun set these variables), else a single process."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CUDA-less hosts, else it reports 1 process
        return Dist(state.process_index, state.num_processes)
    return Dist()


def barrier(dist: Dist) -> None:
    """Wait for every process (no-op for a single process or an emulated rank)."""
    if dist.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return int(os.environ.get("RANK", "0")) == 0


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


def progress(total: int | None, desc: str, unit: str = "it", dist: Dist | None = None, initial: int = 0) -> tqdm:
    """A tqdm bar with rate and ETA on the main process; silent elsewhere and when stderr is not a terminal in CI."""
    disable = dist is not None and not dist.is_main
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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global RNGs (for code we do not control; our noise uses explicit generators)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def stage_device(name: str, dist: Dist) -> torch.device:
    """This process's device: accelerate's (one GPU per process) when launched on several, else `name` resolved."""
    if dist.world > 1 and name in ("auto", "cuda"):
        from accelerate import PartialState

        return PartialState().device
    return resolve_device(name)


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
    """Versions and flags recorded in every manifest."""
    import diffusers
    import transformers

    try:
        import xformers  # optional CUDA backend

        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "xformers": xformers_version,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "hostname": platform.node(),
        **git_version(),
    }
