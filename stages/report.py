"""`flatdino demo-report`: the digits demo's report, measured on samples it draws from the chain itself.

For every guidance scale and noise seed it generates `per_class` samples per class through `pipeline.sampling.generate`
(the code `flatdino sample` runs: EMA DiT, Euler/Heun with CFG in its interval, FlatDINO decoder, pixel decoder;
sample i depends only on (seed, i)), reduces each image to the digits' 8 x 8 grid at once, and measures each seed
with `pipeline.demo_metrics`: class-consistency, within-class diversity and its ratio to the real digits, precision
and recall (k = 3) in the demo classifier's feature layer. The headline of each metric is its mean over the seeds,
with the standard error and the spread.

Why it samples in memory instead of reading `flatdino sample` artifacts: a digit metric at 200 samples moves by
0.02-0.03 between two draws of the same networks (bench/RESULTS.md, issue 17), so the report needs ~1,000 samples per
seed, and six such artifacts would be 1.2 GB of 256 x 256 images written only to be averaged down to 8 x 8. Each
(scale, seed) unit is committed as a small npz of its grids, labels and predictions, so a killed report resumes at the
next unit and ends with the same bytes; under a launcher, rank r takes units r::W.

`--fid DIR` joins the FD-DINOv2 of `flatdino fid` artifacts that measured samples of the same networks and sampling
protocol (`make sample`'s seed 0) into the line of their guidance scale.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline import demo_metrics as dm
from pipeline.config import Checked, command_from_config, config_to_dict, opt
from pipeline.manifest import (ArtifactError, Manifest, OutputDir, UserError, atomic_write_bytes, atomic_write_json,
                               content_identity, file_sha256, local_dirs, require_complete)
from pipeline.npz import npz_bytes
from pipeline.runtime import Runtime, environment, get_logger, launch, progress
from pipeline.sampling import Chain, Sampling, check_cfg_interval, generate, load_chain

log = get_logger(__name__)

STAGE = "demo_report"
METRICS = "metrics.json"


@dataclass(frozen=True)
class Config(Checked):
    dit: Path = field(metadata=opt("train-dit output directory (its EMA weights are sampled)", runtime=True))
    vae: Path = field(metadata=opt("train-vae output directory that made the DiT's latents", runtime=True))
    decoder: str = field(metadata=opt("pixel decoder: a train-decoder output or an RAE directory", runtime=True))
    classifier: Path = field(metadata=opt("train-classifier artifact (class-consistency, the feature space of "
                                          "precision/recall, the real digits)", runtime=True))
    out: Path = field(metadata=opt("output directory, e.g. shards/report/demo (metrics.json + manifest.json)",
                                   runtime=True))
    cfg_scale: tuple[float, ...] = field(default=(2.0, 1.0), metadata=opt(
        "guidance scales to measure, one report line each (repeat the option: --cfg-scale 2 --cfg-scale 1)", min=0))
    seed: tuple[int, ...] = field(default=(0, 1, 2), metadata=opt(
        "noise seeds per guidance scale (repeat the option); the headline is the mean over them", min=0))
    per_class: int = field(default=100, metadata=opt(
        "samples per class and seed (a digit metric at 20 per class moves 0.02-0.03 between draws)", min=1))
    steps: int = field(default=50, metadata=opt("ODE steps", min=1))
    sampler: Literal["euler", "heun"] = field(default="euler", metadata=opt("ODE solver"))
    cfg_interval: tuple[float, float] = field(default=(0.3, 1.0), metadata=opt(
        "guide only while t_min < t < t_max (t = 0 noise, t = 1 data), as `flatdino sample`", min=0, max=1))
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata=opt("compute precision"))
    vae_weights: Literal["best", "last"] | None = field(default=None, metadata=opt(
        "FlatDINO checkpoint (default: the one that made the DiT's latents; another one is refused)"))
    latents: Path | None = field(default=None, metadata=opt(
        "latents artifact the DiT was trained on (default: the path recorded in the DiT manifest)", runtime=True))
    fid: tuple[Path, ...] = field(default=(), metadata=opt(
        "fid artifacts of samples of the same networks and protocol whose FD-DINOv2 joins the line of their "
        "guidance scale (repeatable)", runtime=True))
    batch_size: int = field(default=200, metadata=opt(
        "samples per forward pass (does not change the output; 200 samples 22 % faster than 64 on 2 CPU cores)",
        runtime=True, min=1))
    device: str = field(default="auto", metadata=opt("auto, cpu, cuda ...", runtime=True))
    overwrite: bool = field(default=False, metadata=opt("delete an existing report made with another config",
                                                        runtime=True))


def unit_name(cfg_scale: float, seed: int) -> str:
    return f"grids-w{cfg_scale:g}-seed{seed}.npz"


def check(cfg: Config) -> None:
    """Refuse settings the report cannot measure, before any work."""
    if len(set(cfg.cfg_scale)) != len(cfg.cfg_scale) or not cfg.cfg_scale:
        raise UserError(f"--cfg-scale {list(cfg.cfg_scale)}: give each guidance scale once")
    if len(set(cfg.seed)) != len(cfg.seed) or len(cfg.seed) < 2:
        raise UserError(f"--seed {list(cfg.seed)}: the report measures the spread over seeds, so give at least two "
                        f"different seeds (e.g. --seed 0 --seed 1 --seed 2)")
    check_cfg_interval(cfg.cfg_interval)


def check_classes(chain: Chain, clf_manifest: Manifest, classifier: Path) -> None:
    """The classifier must score the classes the DiT was conditioned on, in the same order."""
    lat = require_complete(chain.inputs["latents"]["path"], "latents")
    theirs, ours = clf_manifest.extra["classes"], lat.extra.get("classes")
    if len(theirs) != chain.num_classes or (ours is not None and list(ours) != list(theirs)):
        raise ArtifactError(f"--classifier {classifier} scores the classes {theirs}, but the DiT generates "
                            f"{ours if ours is not None else chain.num_classes}; train the classifier on the images "
                            f"the DiT's latents came from")


def fid_entries(cfg: Config, chain: Chain) -> dict[float, dict]:
    """{guidance scale: what the line shows of its fid artifact}; refuses one that measured other samples."""
    out = {}
    for d in cfg.fid:
        m = require_complete(d, "fid")
        proto = m.extra["protocol"]
        s, models = proto["sampler"], proto.get("sample_models", {})
        mismatch = [k for k in ("dit", "vae", "decoder") if models.get(k, {}).get("fingerprint") !=
                    chain.models[k]["fingerprint"]]
        if (mismatch or s["cfg_scale"] not in cfg.cfg_scale or s["steps"] != cfg.steps or
                s["sampler"] != cfg.sampler or list(s["cfg_interval"]) != list(cfg.cfg_interval)):
            why = (f"other networks ({', '.join(mismatch)})" if mismatch else
                   f"another protocol (w = {s['cfg_scale']}, {s['sampler']} {s['steps']} steps, interval "
                   f"{s['cfg_interval']})")
            raise ArtifactError(f"--fid {d} measured samples of {why} than this report; pass the fid of `make "
                                f"sample` for these networks, or leave it out")
        out[s["cfg_scale"]] = {"path": str(d), "fingerprint": m.fingerprint, "seed": s["seed"],
                               "num_samples": proto["num_samples"], "summary": m.extra["summary"],
                               "fd_dinov2": m.extra["metrics"]["fd_dinov2"]["value"]}
    return out


def write_unit(out: Path, chain: Chain, clf, cfg: Config, cfg_scale: float, seed: int, labels: torch.Tensor,
               device: torch.device, bar) -> dict:
    """One (guidance scale, seed): generate, reduce to 8 x 8 grids, predict; commit grids + labels + predictions."""
    from stages.classifier import to_grid

    how = Sampling(seed, cfg.steps, cfg.sampler, cfg_scale, tuple(cfg.cfg_interval), cfg.precision)
    grids = []
    for s in range(0, len(labels), cfg.batch_size):
        idx = list(range(s, min(s + cfg.batch_size, len(labels))))
        grids.append(to_grid(generate(chain, how, idx, labels[idx], device), clf.grid))  # (b, 64) in [0, 1]
        bar.update(len(idx))
    grid = np.concatenate(grids)
    data = npz_bytes(grid=grid, label=labels.numpy(), pred=clf.predict_grids(grid))
    name = unit_name(cfg_scale, seed)
    atomic_write_bytes(out / name, data)
    return {"name": name, "count": len(labels), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "cfg_scale": cfg_scale, "seed": seed}


def build_report(od_path: Path, cfg: Config, clf, clf_m: Manifest, ref: dm.Reference, fids: dict[float, dict],
                 n: int) -> dict:
    """metrics.json from the committed units: per scale, every metric over the seeds, and the summary lines."""
    settings = []
    for w in cfg.cfg_scale:
        per_seed = {}
        for seed in cfg.seed:
            with np.load(od_path / unit_name(w, seed), allow_pickle=False) as z:
                per_seed[seed] = dm.grid_metrics(z["grid"] * dm.DIGIT_MAX, z["label"], z["pred"], clf, ref)
        s = {"cfg_scale": w, "cfg_interval": list(cfg.cfg_interval), "steps": cfg.steps, "sampler": cfg.sampler,
             "num_samples": n, "seeds": list(cfg.seed), **dm.setting_report(per_seed, ref)}
        if w in fids:
            s["fid"] = fids[w]
        settings.append(s)
    net = clf_m.extra["feature_net"]
    return {
        "schema": dm.SCHEMA,
        "definitions": dm.__doc__.split("\n\n", 2)[2],
        "classifier": {"path": str(cfg.classifier), "fingerprint": clf_m.fingerprint,
                       "val_accuracy": clf_m.extra["val_accuracy"],
                       "feature_space": f"hidden layer of the classifier's feature network ({net['hidden']} ReLU "
                                        f"units, held-out accuracy {net['val_accuracy']:.3f})"},
        "reference": {"num_real": int(len(ref.labels)), "diversity": ref.diversity,
                      "real_val": dm.real_val_metrics(clf, ref)},
        "settings": settings,
        "summary": [dm.summary_line(s) for s in settings],
    }


def run(cfg: Config, rt: Runtime | None = None) -> Manifest | None:
    """Sample and measure this rank's (scale, seed) units; the main process writes metrics.json and the manifest."""
    from models.flow import class_balanced_labels
    from stages.classifier import load_classifier

    check(cfg)
    rt, t0 = (rt or launch()).on(cfg.device, cfg.precision), time.time()
    chain = load_chain(cfg.dit, cfg.vae, cfg.decoder, rt.device, cfg.latents, cfg.vae_weights)
    clf, clf_m = load_classifier(cfg.classifier)
    ref = dm.reference(clf)  # refuses a classifier artifact without the feature network before any sampling
    check_classes(chain, clf_m, cfg.classifier)
    fids = fid_entries(cfg, chain)
    inputs = {**chain.inputs, "classifier": {"path": str(cfg.classifier), "fingerprint": clf_m.fingerprint},
              "fid": [{"path": f["path"], "fingerprint": f["fingerprint"]} for f in fids.values()]}
    config = {**config_to_dict(cfg, semantic_only=True),
              **content_identity({"models": chain.models, "inputs": inputs})}
    with OutputDir(cfg.out, STAGE, config, overwrite=cfg.overwrite, rt=rt, owns=("grids-*.npz", METRICS),
                   inputs=[cfg.dit, cfg.vae, cfg.latents, cfg.classifier, *cfg.fid,
                           *local_dirs(cfg.decoder)]) as od:
        if od.done:
            log.info("%s is already complete; nothing to do", cfg.out)
            return od.manifest
        labels = class_balanced_labels(chain.num_classes, cfg.per_class)  # (N,) class-major
        units = [(w, s) for w in cfg.cfg_scale for s in cfg.seed]
        committed = od.committed()
        todo = [u for u in rt.share(units) if unit_name(*u) not in committed]
        bar = progress(len(todo) * len(labels), "demo-report", "img", rt)
        for w, s in todo:
            od.commit(write_unit(od.path, chain, clf, cfg, w, s, labels, rt.device, bar))
        bar.close()
        rt.barrier()
        if not rt.is_main:
            return None
        records = od.collect([unit_name(*u) for u in units])
        if records is None:
            return None
        report = build_report(od.path, cfg, clf, clf_m, ref, fids, len(labels))
        atomic_write_json(od.path / METRICS, report)
        seconds = time.time() - t0
        return od.finish(Manifest(
            stage=STAGE, complete=True, versions=environment(), models=chain.models, inputs=inputs,
            shards=[*records, {"name": METRICS, "sha256": file_sha256(od.path / METRICS),
                               "bytes": (od.path / METRICS).stat().st_size}],
            counts={"written": len(units) * len(labels), "skipped": 0, "failed": 0},
            extra={"summary": report["summary"], "num_samples_per_seed": len(labels), "seeds": list(cfg.seed),
                   "cfg_scales": list(cfg.cfg_scale), "kappa": chain.kappa,
                   "standardized_latents": chain.mean is not None, "ema": True,
                   "noise": "per-sample generator seeded by (seed, global index); class-major order"},
            timings={"seconds": round(seconds, 3)}))


cli = command_from_config(
    Config, run, "demo-report", __doc__.split("\n\n")[0],
    summary=lambda m: "\n".join(m.extra["summary"]))
