"""Stage configs are frozen dataclasses; click options are generated from their fields one to one.

A field's metadata carries its help text and whether it is a runtime-only knob (`runtime=True`: workers, progress
bars, `--overwrite`), which does not change the artifact's bytes and is left out of the config hash that guards
an output directory against mixed runs.
"""

from __future__ import annotations

import dataclasses
import errno
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import click

from pipeline.manifest import UserError


def opt(help: str, *, runtime: bool = False) -> dict:
    """Field metadata: `x: int = field(default=8, metadata=opt("what x does"))`."""
    return {"help": help, "runtime": runtime}


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
    elif typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        kw["type"], kw["nargs"] = args[0], len(args)
    elif base is Path:
        kw["type"] = click.Path(path_type=Path)
    elif base in (int, float, str):
        kw["type"] = base
    else:
        raise TypeError(f"no click mapping for field {f.name}: {tp}")
    return click.option(name, f.name, default=default, required=required, **kw)


def command_from_config(cls: type, run: Callable, name: str, help: str, summary: Callable | None = None) -> click.Command:
    """A click command whose options are exactly the fields of `cls`; calls `run(cls(**options))`.

    `summary(manifest)` returns the one line printed at the end (default: stage, output and counts).
    """
    hints = typing.get_type_hints(cls)

    def callback(**kwargs):
        from pipeline.train import Interrupted

        try:
            cfg = cls(**kwargs)
            result = run(cfg)
        except Interrupted as e:  # SIGTERM/SIGINT during training: a checkpoint of the current step is on disk
            click.secho(str(e), fg="yellow", err=True)
            sys.exit(e.exit_code)
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


# write errors that mean "the storage failed us", not "the code is wrong": reported without a traceback
STORAGE_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                  errno.EIO: "I/O error", errno.EROFS: "Read-only file system"}


def storage_error_message(e: OSError, out: Any = None) -> str:
    """The user-facing message for a storage OSError: what failed, where, and that committed work is kept."""
    where = e.filename or (f"under {out}" if out is not None else "the output")
    action = "free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the storage"
    return (f"{STORAGE_ERRNOS[e.errno]} while writing {where}: {action} and re-run the same command; "
            f"committed shards and checkpoints are kept and the run resumes from them")


def _default_summary(name: str, cfg: Any, manifest: Any) -> str:
    out = getattr(cfg, "out", None)
    counts = getattr(manifest, "counts", {})
    shown = ", ".join(f"{k} {v}" for k, v in counts.items())
    return f"{name}: done -> {out} ({shown})"
