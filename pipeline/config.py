"""Stage configs are frozen dataclasses; click options are generated from their fields one to one.

A field's metadata carries its help text, the range a number must lie in (checked when the option is parsed, shown
in `--help`, and checked again when a config is built in code), and whether it is a runtime-only knob
(`runtime=True`: paths, workers, tolerances, `--overwrite`), which does not change the artifact's bytes and is left out
of the config hash that guards an output directory against mixed runs. Identity is content: configuration that
changes results plus input fingerprints, never a path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import signal
import sys
import threading
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import click

from pipeline.manifest import UserError


def opt(help: str, *, runtime: bool = False, min: float | None = None, max: float | None = None,
        min_open: bool = False, max_open: bool = False) -> dict:
    """Field metadata: `x: int = field(default=8, metadata=opt("what x does", min=1))`; `min`/`max` bound a number
    (or each element of a tuple of numbers), open bounds exclude the value itself."""
    rng = None if min is None and max is None else (min, max, min_open, max_open)
    return {"help": help, "runtime": runtime, "range": rng}


def _describe(rng: tuple) -> str:
    lo, hi, lo_open, hi_open = rng
    parts = ([f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []) + \
        ([f"{'<' if hi_open else '<='} {hi}"] if hi is not None else [])
    return " and ".join(parts)


def _in_range(v: float, rng: tuple) -> bool:
    lo, hi, lo_open, hi_open = rng
    return not ((lo is not None and (v < lo or (lo_open and v == lo))) or
                (hi is not None and (v > hi or (hi_open and v == hi))))


def check_ranges(cfg: Any) -> None:
    """UserError naming the first field of `cfg` whose number lies outside its declared range."""
    for f in dataclasses.fields(cfg):
        rng, value = f.metadata.get("range"), getattr(cfg, f.name)
        if rng is None or value is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _in_range(v, rng):
                raise UserError(f"--{f.name.replace('_', '-')} must be {_describe(rng)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Checked:
    """Base of stage configs: numeric fields are range-checked on construction (CLI or code)."""

    def __post_init__(self):
        check_ranges(self)


def config_to_dict(cfg: Any, *, semantic_only: bool = False) -> dict:
    """JSON-able dict of a config dataclass (Paths as strings, tuples as lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if semantic_only and f.metadata.get("runtime", False):
            continue
        out[f.name] = _jsonable(getattr(cfg, f.name))
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if dataclasses.is_dataclass(v):
        return config_to_dict(v)
    return v


def config_from_dict(cls: type, d: dict) -> Any:
    """Rebuild a config dataclass from `config_to_dict` output; unknown keys are an error."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise UserError(f"unknown {cls.__name__} fields {sorted(unknown)}; the artifact was written by another version")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(hints[k], v) for k, v in d.items()})


def _coerce(tp: Any, v: Any) -> Any:
    if v is None:
        return None
    base = _strip_optional(tp)
    if base is Path:
        return Path(v)
    if typing.get_origin(base) is tuple:
        return tuple(v)
    return v


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _click_option(f: dataclasses.Field, tp: Any) -> Callable:
    name = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    base = _strip_optional(tp)
    kw: dict[str, Any] = {"help": help_text, "show_default": default is not None and not required}
    if base is bool:
        return click.option(f"{name}/--no-{f.name.replace('_', '-')}", default=bool(default), **kw)
    if typing.get_origin(base) is Literal:
        kw["type"] = click.Choice([str(a) for a in typing.get_args(base)])
    elif typing.get_origin(base) is tuple and typing.get_args(base)[1:] == (Ellipsis,):  # tuple[X, ...]: repeatable
        kw["type"], kw["multiple"] = _ranged(typing.get_args(base)[0], f), True
    elif typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        kw["type"], kw["nargs"] = _ranged(args[0], f), len(args)
    elif base is Path:
        kw["type"] = click.Path(path_type=Path)
    elif base in (int, float, str):
        kw["type"] = _ranged(base, f)
    else:
        raise TypeError(f"no click mapping for field {f.name}: {tp}")
    return click.option(name, f.name, default=default, required=required, **kw)


def _ranged(tp: type, f: dataclasses.Field):
    """click's IntRange/FloatRange for a ranged number field (the range shows in --help), else the plain type."""
    rng = f.metadata.get("range")
    if rng is None or tp not in (int, float):
        return tp
    lo, hi, lo_open, hi_open = rng
    cls = click.IntRange if tp is int else click.FloatRange
    return cls(lo, hi, min_open=lo_open, max_open=hi_open)


def command_from_config(cls: type, run: Callable, name: str, help: str, summary: Callable | None = None) -> click.Command:
    """A click command whose options are exactly the fields of `cls`; calls `run(cls(**options))`.

    `summary(manifest)` returns the one line printed at the end (default: stage, output and counts).
    """
    hints = typing.get_type_hints(cls)

    def callback(**kwargs):
        from pipeline.train import Interrupted

        try:
            with _stop_on_signals():
                cfg = cls(**kwargs)
                result = run(cfg)
        except Interrupted as e:  # SIGTERM/SIGINT during training: a checkpoint of the current step is on disk
            click.secho(str(e), fg="yellow", err=True)
            sys.exit(e.exit_code)
        except Stopped as e:  # SIGTERM/SIGINT in a shard stage: the shard in flight was dropped (atomic writes)
            click.secho(f"{signal.Signals(e.signum).name}: stopped; the shards committed so far are kept and the one "
                        f"in flight was dropped; re-run the same command to resume", fg="yellow", err=True)
            sys.exit(128 + e.signum)
        except UserError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in STORAGE_ERRNOS:
                raise
            click.secho(f"error: {storage_error_message(e, kwargs.get('out'))}", fg="red", err=True)
            sys.exit(2)
        if result is not None:
            click.echo(summary(result) if summary else _default_summary(name, cfg, result))

    cmd = callback
    for f in reversed(dataclasses.fields(cls)):
        cmd = _click_option(f, hints[f.name])(cmd)
    return click.command(name=name, help=help, context_settings={"show_default": True, "max_content_width": 110})(cmd)


class Stopped(BaseException):
    """SIGTERM/SIGINT outside a training loop: raised where the signal lands, so every atomic write in flight removes
    its temporary file on the way out (a BaseException, like KeyboardInterrupt, so no `except Exception` eats it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM (what Slurm and Kubernetes send before SIGKILL) and SIGINT raise `Stopped` for the duration."""
    def handle(signum, frame):
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# errors that mean "the storage failed us", not "the code is wrong": reported without a traceback
STORAGE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                  errno.EIO: "I/O error", errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied",
                  errno.EPERM: "Operation not permitted"}


def storage_error_message(e: OSError, out: Any = None) -> str:
    """The user-facing message for a storage OSError: what failed, where, and that committed work is kept."""
    where = e.filename or (f"under {out}" if out is not None else "the output")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        verb, action = "while writing", "free space"
    elif e.errno in (errno.EACCES, errno.EPERM):
        verb, action = "on", "fix the permissions (or use another --out)"
    else:
        verb, action = "while writing", "fix the storage"
    return (f"{STORAGE_ERRNOS[e.errno]} {verb} {where}: {action} and re-run the same command; "
            f"committed shards and checkpoints are kept and the run resumes from them")


def _default_summary(name: str, cfg: Any, manifest: Any) -> str:
    out = getattr(cfg, "out", None)
    counts = getattr(manifest, "counts", {})
    shown = ", ".join(f"{k} {v}" for k, v in counts.items())
    return f"{name}: done -> {out} ({shown})"
