"""The one training loop behind train-vae, train-dit and train-decoder.

A stage supplies a `Recipe`: its model, optimizer, step count and global batch, the learning rate as a pure function
of the step, its data order (`feed(step, positions)`), the step's random draws (`draw(step, device)`, the whole
global batch at once, on the device), a `loss(model, batch, draws, step) -> (loss, scalars)` per micro-batch (scalars: means over it), optional
clipping and EMA, and `events` (validation, sample grids, publishing `best/`). `Trainer.fit()` owns the rest:

- the update: the global batch is cut into this process's share ([rank G/W, (rank+1) G/W)) and micro-batches of at
  most `micro_batch`; each micro-batch loss is weighted by its share of the global batch and gradients are all-reduced
  once (accelerate's `no_sync` on all but the last), so the update is the global-batch mean whatever the world size
  or micro-batch; clipping; one non-finite guard (before the weights move) that names the last checkpoint; the LR set
  from the step; EMA with an optional warm-up;
- checkpoints (`pipeline.checkpoint`): every `ckpt_every` updates, at the end, and when SIGTERM/SIGINT arrive (all
  ranks agree on the step, then the process exits 143/130 with a message saying how to resume); resume restores
  model, EMA, optimizer, step and history, so a resumed run replays exactly (bitwise on CPU);
- logging: rank-0 progress (rate, ETA, loss), accelerate's trackers (TensorBoard with `purge_step` on resume, or
  Weights & Biases), a loss plot at the end.

Every random number and every sample of step s is a function of (seed, s) and the global position, so the state of a
run is its weights, optimizer moments, EMA, step and history.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import torch
import torch.nn as nn

from pipeline.checkpoint import Checkpoints, optimizer_state, optimizer_tensors
from pipeline.config import Checked, opt
from pipeline.manifest import UserError, atomic_write_bytes
from pipeline.runtime import Runtime, get_logger, progress

log = get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainOptions(Checked):
    """Options every trainer has; none of them changes the trained weights (runtime knobs, not identity)."""

    ckpt_every: int = field(default=1000, metadata=opt(
        "write a checkpoint every N updates (also at the end and on SIGTERM/SIGINT)", runtime=True, min=1))
    keep: int = field(default=2, metadata=opt("checkpoints kept", runtime=True, min=1))
    log_every: int = field(default=20, metadata=opt("log scalars every N updates", runtime=True, min=1))
    log_with: Literal["tensorboard", "wandb"] = field(default="tensorboard", metadata=opt(
        "experiment tracker (accelerate): tensorboard (<out>/tb) or wandb (needs the wandb package)", runtime=True))
    compile: bool = field(default=False, metadata=opt(
        "torch.compile the model's forward (worth it on GPUs; 20-40 s of compilation, no gain on CPU)", runtime=True))
    max_steps_this_run: int | None = field(default=None, metadata=opt(
        "stop (resumably, with a checkpoint) after this many updates in this invocation, e.g. for a job time limit",
        runtime=True, min=1))
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda ... (accelerate's device under a launcher)",
                                                     runtime=True))


class Ema(NamedTuple):
    """EMA of the trained parameters: decay, and the warm-up constant k of min(decay, (1 + s) / (k + s)) (0: none)."""

    decay: float
    warmup: int = 0


class Event(NamedTuple):
    """`fn(step) -> dict | None` every `every` updates and after the last; its scalars are logged as `name/<key>` and
    kept in the run's history (so a resumed run does not redo it); `checkpoint=True` writes a checkpoint right after."""

    name: str
    every: int
    fn: Callable[[int], dict | None]
    checkpoint: bool = False


class Objective(NamedTuple):
    """A second network trained in the same step after the main update (a GAN discriminator), on the step's
    micro-batches and draws: `loss(module, batch, draws, step) -> (loss, scalars)`, weighted and all-reduced as the
    main one, only at steps where `active(step)`; `state` is what its checkpoint holds (default: the module)."""

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[nn.Module, Any, dict, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    lr: Callable[[int], float]
    active: Callable[[int], bool] = lambda step: True
    clip: float | None = None
    state: nn.Module | None = None


@dataclass
class Recipe:
    """What a training stage supplies to `Trainer` (see the module docstring)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    steps: int
    global_batch: int
    micro_batch: int
    lr: Callable[[int], float]
    feed: Callable[[int, range], Any]  # (step, positions in [0, G)) -> micro-batch (CPU or device tensors)
    loss: Callable[[nn.Module, Any, dict, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    draw: Callable[[int, torch.device], dict[str, torch.Tensor]] = lambda step, device: {}
    clip: float | None = None
    ema: Ema | None = None
    events: list[Event] = field(default_factory=list)
    derive: Callable[[dict], dict] = lambda scalars: scalars  # logged scalars from the global means
    title: str = "training"
    extra: list[Objective] = field(default_factory=list)


class TrainingDiverged(UserError):
    """The loss or the gradient norm became non-finite; the weights were not updated."""


class Interrupted(Exception):
    """SIGTERM/SIGINT: a checkpoint of the current step was written; the CLI exits 128 + signal."""

    def __init__(self, step: int, signum: int, out: Path):
        self.step, self.signum, self.exit_code = step, signum, 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped at step {step}, checkpoint written to {out}; re-run the same command to "
                         f"resume")


def micro_slices(global_batch: int, micro: int, rt: Runtime) -> list[range]:
    """Positions (within a global batch) of this process's micro-batches: its contiguous share, cut into <= micro."""
    if global_batch % rt.world:
        raise UserError(f"the global batch {global_batch} is not divisible by the {rt.world} processes")
    share = global_batch // rt.world
    lo = rt.rank * share
    return [range(s, min(s + micro, lo + share)) for s in range(lo, lo + share, micro)]


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, e: Ema, step: int) -> None:
    """ema <- d ema + (1 - d) model over parameters (buffers are fixed tables); d warmed up when e.warmup > 0."""
    d = e.decay if e.warmup <= 0 else min(e.decay, (1 + step) / (e.warmup + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1.0 - d)


class _Signals:
    """SIGTERM/SIGINT set a flag that the loop turns into a checkpoint at the next step boundary; a second SIGINT
    interrupts at once."""

    def __init__(self):
        self.signum, self._old = 0, {}

    def __enter__(self) -> "_Signals":
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step with a checkpoint (send SIGINT again to abort)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


class Trainer:
    """Runs a `Recipe` from its last checkpoint to `steps` updates (or the per-invocation budget)."""

    def __init__(self, recipe: Recipe, opts: TrainOptions, out: Path, rt: Runtime, seed: int, ema: nn.Module | None = None):
        from accelerate import Accelerator

        self.r, self.opts, self.out, self.rt = recipe, opts, Path(out), rt
        if opts.log_with == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise UserError("--log-with wandb needs the wandb package (pip install wandb); or use tensorboard")
        self.acc = Accelerator(cpu=rt.device.type == "cpu", log_with=opts.log_with, project_dir=str(out))
        self.raw = recipe.model
        if opts.compile:
            self.raw.compile()
        self.model = self.acc.prepare(recipe.model) if rt.distributed else recipe.model
        self.extra = [(o, self.acc.prepare(o.module) if rt.distributed else o.module) for o in recipe.extra]
        self.ema = ema if ema is not None else (copy.deepcopy(recipe.model).requires_grad_(False).eval()
                                                if recipe.ema else None)
        self.ckpt = Checkpoints(out, opts.keep)
        self.state: dict = {"step": 0, "log": [], "events": {}, "stage": {}}
        self.seed = seed
        self._pool: ThreadPoolExecutor | None = None
        self._signals = _Signals()
        self._step = None
        self._pending: dict = {}

    # ------------------------------------------------------------------------------------------- state

    def _modules(self) -> dict[str, nn.Module]:
        mods = {"model": self.raw, **({"ema": self.ema} if self.ema is not None else {})}
        return mods | {o.name: o.state if o.state is not None else o.module for o in self.r.extra}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.r.optimizer} | {f"{o.name}_optimizer": o.optimizer for o in self.r.extra}

    def save(self) -> Path | None:
        """Checkpoint the current step (main process writes; every process waits)."""
        path = None
        if self.rt.is_main:
            states, metas = {n: m.state_dict() for n, m in self._modules().items()}, {}
            for name, optimizer in self._optimizers().items():
                states[name], metas[name] = optimizer_tensors(optimizer)
            path = self.ckpt.save(self.state["step"], states, {**self.state, "optimizers": metas})
        self.rt.barrier()
        return path

    def resume(self) -> int:
        """Load the newest readable checkpoint (if any); returns the step to continue from."""
        saved = self.ckpt.load([*self._modules(), *self._optimizers()], "cpu", warn=log.warning)
        if saved is None:
            return 0
        for name, module in self._modules().items():
            module.load_state_dict(saved.states[name], strict=True)
        metas = saved.trainer.pop("optimizers")
        for name, optimizer in self._optimizers().items():
            optimizer.load_state_dict(optimizer_state(saved.states[name], metas[name]))
        self.state = saved.trainer
        log.info("resuming from step %d (%s)", saved.step, saved.path)
        return saved.step

    # ------------------------------------------------------------------------------------------- one update

    def _batch(self, step: int, sl: range):
        """The micro-batch (step, sl), prepared in a background thread while the previous one trains."""
        key = (step, sl.start)
        fut = self._pending.pop(key, None)
        batch = fut.result() if fut is not None else self.r.feed(step, sl)
        return to_device(batch, self.rt.device)

    def _prefetch(self, step: int, sl: range) -> None:
        if step >= self.r.steps:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="feed")
        self._pending[(step, sl.start)] = self._pool.submit(self.r.feed, step, sl)

    def update(self, step: int) -> tuple[dict, bool]:
        """One optimizer update over global batch `step` (then the extra objectives'); returns (global-mean scalars,
        whether any rank stops)."""
        scalars, stop = self._apply(step, self.accumulate(step))
        for objective, wrapped in self.extra:
            if objective.active(step):
                scalars |= self._extra_update(step, objective, wrapped)
        self._step = None
        return scalars, stop

    def accumulate(self, step: int) -> dict[str, torch.Tensor]:
        """This process's share of global batch `step` into `.grad` (each micro-batch weighted by its share of the
        global batch, times the world size that DDP's average divides by); returns the weighted scalar sums."""
        r, G = self.r, self.r.global_batch
        slices = micro_slices(G, r.micro_batch, self.rt)
        draws = r.draw(step, self.rt.device)
        sums: dict[str, torch.Tensor] = {}
        self._step = (draws, []) if self.extra else None  # the extra objectives see the same batches and draws
        for i, sl in enumerate(slices):
            nxt = (step, slices[i + 1]) if i + 1 < len(slices) else (step + 1, slices[0])
            batch = self._batch(step, sl)
            if self._step is not None:
                self._step[1].append((sl, batch))
            self._prefetch(*nxt)
            part = {k: v[sl.start : sl.stop] for k, v in draws.items()}
            sync = contextlib.nullcontext() if i == len(slices) - 1 else self.acc.no_sync(self.model)
            w = len(sl) / G
            with sync:
                with self.rt.autocast():
                    loss, scalars = r.loss(self.model, batch, part, step)
                (loss * (w * self.rt.world)).backward()  # DDP averages over ranks: the sum is the global mean
            for k, v in {"loss": loss, **scalars}.items():
                v = v.detach().float().reshape(-1) * w
                sums[k] = sums[k] + v if k in sums else v
        return sums

    def _extra_update(self, step: int, o: Objective, wrapped: nn.Module) -> dict:
        """One update of an extra objective over this step's micro-batches (weighted as the main loss)."""
        draws, batches = self._step
        G, sums = self.r.global_batch, {}
        o.optimizer.zero_grad(set_to_none=True)  # drop what the main loss's backward left in its parameters
        for i, (sl, batch) in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else self.acc.no_sync(wrapped)
            w = len(sl) / G
            with sync:
                with self.rt.autocast():
                    loss, scalars = o.loss(wrapped, batch, {k: v[sl.start : sl.stop] for k, v in draws.items()}, step)
                (loss * (w * self.rt.world)).backward()
            for k, v in {"loss": loss, **scalars}.items():
                v = v.detach().float().reshape(-1) * w
                sums[k] = sums[k] + v if k in sums else v
        keys = list(sums)
        flat = self.rt.all_reduce_sum_(torch.cat([sums[k] for k in keys]))
        params = [p for p in wrapped.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, o.clip if o.clip else math.inf))
        values = flat.cpu().tolist()
        if not (math.isfinite(values[0]) and math.isfinite(norm)):
            o.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"{o.name}: " + self._diverged(step, values[0], norm))
        lr = o.lr(step)
        for group in o.optimizer.param_groups:
            group["lr"] = lr
        o.optimizer.step()
        o.optimizer.zero_grad(set_to_none=True)
        out, pos = {}, 0
        for k in keys:
            n = sums[k].numel()
            out[f"{o.name}_{k}"] = values[pos] if n == 1 else values[pos : pos + n]
            pos += n
        return out | {f"{o.name}_lr": lr, f"{o.name}_grad_norm": norm}

    def _apply(self, step: int, sums: dict[str, torch.Tensor]) -> tuple[dict, bool]:
        keys = list(sums)
        flag = torch.tensor([float(self._signals.signum)], device=sums["loss"].device)  # any rank's signal stops all
        flat = torch.cat([sums[k] for k in keys] + [flag])
        self.rt.all_reduce_sum_(flat)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.r.clip if self.r.clip else math.inf)
        values = flat.cpu().tolist()  # the one host sync of the step
        stop = values.pop() > 0
        grad_norm = float(norm)
        if not (math.isfinite(values[0]) and math.isfinite(grad_norm)):
            self.r.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._diverged(step, values[0], grad_norm))
        lr = self.r.lr(step)
        for group in self.r.optimizer.param_groups:
            group["lr"] = lr
        self.r.optimizer.step()
        self.r.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            ema_update_(self.ema, self.raw, self.r.ema, step)
        out, pos = {}, 0
        for k in keys:
            n = sums[k].numel()
            out[k] = values[pos] if n == 1 else values[pos : pos + n]
            pos += n
        return {**out, "lr": lr, "grad_norm": grad_norm}, stop

    def _diverged(self, step: int, loss: float, grad_norm: float) -> str:
        last = self.ckpt.latest()
        where = f"the last checkpoint, step {last.name.lstrip('0') or 0}, is kept in {last}" if last else \
            "no checkpoint was written yet"
        return (f"non-finite loss {loss} / gradient norm {grad_norm} at update {step}; the weights were not updated "
                f"and {where}. This is deterministic: re-running the same command reproduces it. Check the inputs "
                f"for non-finite values, or start a new run (another --out, or --overwrite) with a lower learning "
                f"rate, a tighter --grad-clip or --precision fp32")

    # ------------------------------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Resume, train to the end of the plan (or the per-invocation budget), checkpoint; returns the run's state."""
        start = self.resume()
        stop_at = self.r.steps if self.opts.max_steps_this_run is None else min(
            self.r.steps, start + self.opts.max_steps_this_run)
        # steps after `start` logged by a killed run are dropped from the curves (the resumed run logs them again)
        self.acc.init_trackers("tb", init_kwargs={"tensorboard": {"purge_step": start + 1 if start else None}})
        bar = progress(self.r.steps, self.r.title, "step", self.rt, initial=start)
        tick, done = time.time(), start
        try:
            with self._signals as signals:
                for step in range(start, stop_at):
                    scalars, stop = self.update(step)
                    done = self.state["step"] = step + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
                    if done % self.opts.log_every == 0 or done == self.r.steps:
                        rate = self.opts.log_every * self.r.global_batch / max(time.time() - tick, 1e-9)
                        self._log(done, scalars, rate)
                        tick = time.time()
                    forced = self._events(done)
                    if stop and done < self.r.steps:
                        self.save()
                        raise Interrupted(done, signals.signum or signal.SIGTERM, self.out)
                    if forced or done % self.opts.ckpt_every == 0 or done == self.r.steps:
                        self.save()
                if done < self.r.steps and done % self.opts.ckpt_every:
                    self.save()  # stopped by --max-steps-this-run: keep the position
        finally:
            bar.close()
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool, self._pending = None, {}
            self.acc.end_training()
        return self.state

    @property
    def complete(self) -> bool:
        return self.state["step"] >= self.r.steps

    def _log(self, step: int, scalars: dict, rate: float) -> None:
        row = {k: v for k, v in self.r.derive(scalars).items()}
        self.state["log"].append({"step": step, **row, "samples_per_s": rate})
        flat = {}
        for k, v in row.items():
            if isinstance(v, list):
                flat.update({f"{k}/{i:02d}": x for i, x in enumerate(v)})
            else:
                flat[f"train/{k}"] = v
        flat["perf/samples_per_s"] = rate
        if self.rt.device.type == "cuda":
            flat["perf/max_mem_gb"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
        self.acc.log(flat, step=step)

    def _events(self, step: int) -> bool:
        forced = False
        for ev in self.r.events:
            if step % ev.every and step != self.r.steps:
                continue
            result = ev.fn(step)
            if result is not None:
                self.state["events"].setdefault(ev.name, []).append({"step": step, **result})
                self.acc.log({f"{ev.name}/{k}": v for k, v in result.items() if isinstance(v, (int, float))},
                             step=step)
            forced |= ev.checkpoint
        return forced

    def log_image(self, name: str, image, step: int) -> None:
        """An (H, W, 3) uint8 image to the trackers (main process)."""
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, image, step, dataformats="HWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({name: [image]}, step)

    def plot(self, path: Path, ylabel: str, events: dict[str, str] | None = None) -> None:
        """`loss` against updates (log scale), with event series `{event: key}` as points; written atomically."""
        write_loss_plot(path, self.state, self.r.title, ylabel, events or {})


def write_loss_plot(path: Path, state: dict, title: str, ylabel: str, events: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if state["log"]:
        ax.plot([r["step"] for r in state["log"]], [r["loss"] for r in state["log"]], lw=1, label="train loss")
    for name, key in events.items():
        rows = [r for r in state["events"].get(name, []) if key in r]
        if rows:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-", label=f"{name} {key}")
    ax.set(xlabel="update", ylabel=ylabel, title=title)
    if ax.lines:
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
