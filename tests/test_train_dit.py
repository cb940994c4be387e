"""`flatdino train-dit` end to end on a tiny latents artifact: checkpoints, bitwise resume, no-op re-run, refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.dit import load_dit
from pipeline import latents_store
from pipeline.manifest import ConfigMismatch, Manifest, UserError, write_manifest
from conftest import Killed
from pipeline.runtime import Runtime
from pipeline.train import TrainingDiverged
from stages import train_dit

N, T, F, CLASSES = 24, 8, 16, 3


def make_latents(root, seed: int = 0, scale: float = 2.0, shape: tuple[int, int] = (T, F)):
    """A complete latents artifact: class-dependent means, per-(token, channel) offsets and scale."""
    rng = np.random.default_rng(seed)
    label = np.arange(N) % CLASSES
    mu = (rng.normal(size=(N, *shape)) + label[:, None, None] + 0.5) * scale
    path = root / latents_store.STORE
    latents_store.create_latents(path, N, *shape, chunk=8, attrs={"test": True})
    latents_store.write_rows(path, 0, mu, label, np.arange(N) // 2, np.arange(N) % 2,
                             np.array([f"train_{i:08d}" for i in range(N)]))
    latents_store.finalize_stats(path)
    write_manifest(root, Manifest(stage="latents", complete=True, extra={"classes": ["a", "b", "c"]}))
    return root


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return make_latents(tmp_path_factory.mktemp("latents"))


def config(latents, out, **kw) -> train_dit.Config:
    base = dict(latents=latents, out=out, preset="T", steps=6, global_batch=8, lr=1e-3, ckpt_every=2, keep=2,
                log_every=1, device="cpu")
    return train_dit.Config(**{**base, **kw})


def weights(out):
    return load_file(str(out / "ckpt" / "model.safetensors")), load_file(str(out / "ckpt" / "ema.safetensors"))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(latents, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    manifest = train_dit.run(config(latents, out))
    return out, manifest


def test_run_writes_checkpoint_manifest_and_logs(reference, latents):
    out, m = reference
    assert m.complete and m.stage == "train_dit" and m.extra["step"] == 6
    assert m.inputs["latents"]["fingerprint"] == Manifest.from_json(
        json.loads((latents / "manifest.json").read_text())).fingerprint
    assert m.extra["kappa"] == pytest.approx(np.sqrt(T * F / 4096))
    cfg = json.loads((out / "ckpt" / "config.json").read_text())
    assert cfg["step"] == 6 and cfg["flow"]["kappa"] == m.extra["kappa"] and cfg["standardize_latents"] is False
    assert cfg["dit"]["tokens"] == T and cfg["dit"]["channels"] == F and cfg["dit"]["num_classes"] == CLASSES
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000000004", "000000006"]  # keep = 2
    assert json.loads((out / "latest.json").read_text())["step"] == 6
    assert (out / "loss.png").stat().st_size > 0 and any((out / "tb").iterdir())
    model, ema = weights(out)
    assert not torch.equal(model["final_layer.linear.weight"], torch.zeros_like(model["final_layer.linear.weight"]))
    stats = load_file(str(out / "ckpt" / "latent_stats.safetensors"))
    art = latents_store.open_latents(latents)
    assert np.array_equal(stats["mean"].numpy(), art.mean) and stats["mean"].dtype == torch.float64


def test_ema_is_the_documented_average(latents, tmp_path):
    """With decay 0 the EMA equals the weights; with decay 1 it stays at the initialisation."""
    out0 = tmp_path / "d0"
    train_dit.run(config(latents, out0, steps=2, ema_decay=0.0))
    model, ema = weights(out0)
    assert_same(model, ema)
    out1 = tmp_path / "d1"
    train_dit.run(config(latents, out1, steps=2, ema_decay=1.0))
    _, ema1 = weights(out1)
    assert torch.equal(ema1["final_layer.linear.weight"], torch.zeros(F, 128))  # zero-init output layer


def test_loaded_ema_samples(reference):
    out, _ = reference
    model, full = load_dit(out)
    assert full["step"] == 6 and not model.training
    v = model(torch.randn(2, T, F), torch.rand(2), torch.tensor([0, CLASSES]))
    assert v.shape == (2, T, F) and torch.isfinite(v).all()


def test_kill_and_resume_is_bitwise(reference, latents, tmp_path, crash_at):
    out = tmp_path / "run"
    disarm = crash_at(4)  # killed after the step-4 checkpoint, in the middle of step 5
    with pytest.raises(Killed):
        train_dit.run(config(latents, out))
    assert json.loads((out / "latest.json").read_text())["step"] == 4
    assert not (out / "manifest.json").exists()
    disarm()
    m = train_dit.run(config(latents, out, log_every=3))  # runtime-only knobs may change on resume
    assert m.complete
    ref_model, ref_ema = weights(reference[0])
    model, ema = weights(out)
    assert_same(model, ref_model)
    assert_same(ema, ref_ema)


def test_rerun_is_noop_and_other_config_refused(reference, latents):
    out, m = reference
    before = (out / "ckpt" / "ema.safetensors").stat().st_mtime_ns
    again = train_dit.run(config(latents, out))
    assert again.fingerprint == m.fingerprint
    assert (out / "ckpt" / "ema.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ConfigMismatch, match="lr"):
        train_dit.run(config(latents, out, lr=5e-4))


def test_micro_batches_accumulate_to_the_global_batch(latents, tmp_path):
    a, b = tmp_path / "full", tmp_path / "micro"
    train_dit.run(config(latents, a, steps=2, weight_decay=0.0))
    train_dit.run(config(latents, b, steps=2, weight_decay=0.0, micro_batch=2))
    for (k, x), y in zip(weights(a)[0].items(), weights(b)[0].values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=k)
    with pytest.raises(UserError, match="not a multiple"):
        train_dit.run(config(latents, tmp_path / "bad", steps=2, micro_batch=3))


def test_batches_cover_each_epoch_once_and_depend_only_on_step():
    seen = torch.cat([train_dit.batch_indices(10, 4, s, seed=0) for s in range(5)])  # 20 rows = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(train_dit.batch_indices(10, 4, 3, seed=0), seen[12:16])
    assert not torch.equal(train_dit.batch_indices(10, 4, 0, seed=1), seen[:4])


def test_standardized_training_data_is_standardized(latents, tmp_path):
    cfg = config(latents, tmp_path / "run", standardize_latents=True)
    data = train_dit.map_rows(cfg, train_dit.load_data(cfg), Runtime())
    flat = torch.from_numpy(np.array(data.z)).double()
    torch.testing.assert_close(flat.mean(0), torch.zeros(T, F, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.std(0, unbiased=False), torch.ones(T, F, dtype=torch.float64), atol=1e-5, rtol=0)


def test_rows_are_memory_mapped_from_one_cache_file_that_the_run_removes(latents, reference, tmp_path):
    """Rank 0 writes the rows once; every process maps them (one page-cache copy per node); the exact stored
    float32 values; a cache left by a killed run is reused; a finished run leaves no cache behind."""
    cfg = config(latents, tmp_path / "run")
    data = train_dit.map_rows(cfg, train_dit.load_data(cfg), Runtime())
    path = train_dit.cache_path(cfg, data)
    assert isinstance(data.z, np.memmap) and Path(data.z.filename) == path and not data.z.flags.writeable
    np.testing.assert_array_equal(data.z, latents_store.open_latents(latents).mu[...])
    stamp = path.stat().st_mtime_ns
    assert train_dit.map_rows(cfg, train_dit.load_data(cfg), Runtime(1, 2)).z.shape == (N, T, F)  # a rank that waits
    train_dit.map_rows(cfg, train_dit.load_data(cfg), Runtime())
    assert path.stat().st_mtime_ns == stamp  # an existing cache (say, of a killed run) is reused, not rewritten
    train_dit.run(cfg)
    assert not (tmp_path / "run" / "cache").exists()
    assert_same(weights(tmp_path / "run")[1], weights(reference[0])[1])  # the same training as the reference


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(latents, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real = train_dit.flow_loss
    calls = {"n": 0}

    def poisoned(model, z, d):
        calls["n"] += 1
        res = real(model, z, d)
        return res if calls["n"] < 3 else res._replace(loss=res.loss * float("nan"),
                                                       per_sample=res.per_sample * float("nan"))

    monkeypatch.setattr(train_dit, "flow_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="update 2.*the last checkpoint, step 2, is kept"):
        train_dit.run(config(latents, out))
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    assert (out / "checkpoints" / "000000002" / "ema.safetensors").exists()


def test_missing_latents_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="flatdino latents"):
        train_dit.run(config(tmp_path / "nothing", tmp_path / "out"))


@pytest.mark.slow
def test_sample_grid_through_flatdino_and_pixel_decoder(encoder_dir, features_artifact, tmp_path):
    """Periodic grids decode EMA samples through the shared `pipeline.sampling.generate` with a trained FlatDINO run and
    the RAE pixel decoder of the encoder it was trained on (random weights); PNG on disk and in TensorBoard."""
    from PIL import Image

    import stages.train_vae as tv
    from pipeline.artifacts import load_flatdino

    vae = tmp_path / "vae"
    tv.run(tv.Config(out=vae, features=features_artifact, preset="demo", variant="demo", steps=2, global_batch=6,
                     micro_batch=6, val_samples=3, num_workers=1, device="cpu"))
    lat = tmp_path / "lat"
    lat.mkdir()
    make_latents(lat, shape=load_flatdino(vae)[1].latent_shape)
    out = tmp_path / "grid"
    train_dit.run(config(lat, out, steps=2, sample_every=1, flatdino=vae, rae=encoder_dir))
    pngs = sorted((out / "samples").iterdir())
    assert [p.name for p in pngs] == ["step-000000001.png", "step-000000002.png"]
    img = np.asarray(Image.open(pngs[0]))
    assert img.shape == (CLASSES * 258 + 2, 4 * 258 + 2, 3) and img.std() > 0
    assert not np.array_equal(img, np.asarray(Image.open(pngs[1])))  # the EMA moved between the two grids
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [1, 2]


def test_dit_dh_trains_resumes_and_loads(latents, tmp_path, crash_at):
    """--arch dit-dh through the same trainer: checkpoint config says the arch, load_generator rebuilds it, and a
    killed run resumes to the same weights."""
    from models.dit_dh import DiTDH, load_generator

    full = train_dit.run(config(latents, tmp_path / "a", arch="dit-dh", preset="ditt-dh"))
    assert full.extra["arch"] == "dit-dh" and full.extra["dit"]["dh_width"] == 256
    disarm = crash_at(3)
    with pytest.raises(Killed):
        train_dit.run(config(latents, tmp_path / "b", arch="dit-dh", preset="ditt-dh"))
    disarm()
    train_dit.run(config(latents, tmp_path / "b", arch="dit-dh", preset="ditt-dh"))
    assert_same(weights(tmp_path / "a")[1], weights(tmp_path / "b")[1])
    model, cfg = load_generator(tmp_path / "a")
    assert isinstance(model, DiTDH) and cfg["arch"] == "dit-dh"
    with pytest.raises(UserError, match="choose one of dits-dh"):
        train_dit.run(config(latents, tmp_path / "c", arch="dit-dh", preset="T"))


def test_official_generator_names_resolve_and_are_recorded(latents, tmp_path):
    m = train_dit.run(config(latents, tmp_path / "a", steps=2, preset="XL", experiment="dits-kappa3-norm"))
    assert m.extra["experiment"] == "dits-kappa3-norm" and m.extra["arch"] == "dit" and m.extra["kappa"] == 3.0
    assert m.extra["standardize_latents"] is True and m.extra["dit"]["width"] == 384  # dit-s
    with pytest.raises(UserError, match="sets these options itself: --kappa 2.0"):
        train_dit.run(config(latents, tmp_path / "b", experiment="dits-kappa3", preset="XL", kappa=2.0))
    with pytest.raises(UserError, match="-xpred"):
        train_dit.run(config(latents, tmp_path / "c", experiment="ditxl-xpred", preset="XL"))


@pytest.fixture(scope="module")
def eval_chain(tmp_path_factory, images_artifact, features_artifact, encoder_dir):
    """A real chain for in-training evaluation: a VAE on the tiny encoder's features, its latents, a fid-ref."""
    import stages.fid as fid
    import stages.latents as lt
    import stages.train_vae as tv

    root = tmp_path_factory.mktemp("eval")
    tv.run(tv.Config(out=root / "vae", features=features_artifact, preset="demo", variant="demo", steps=2,
                     global_batch=6, micro_batch=6, num_workers=1, device="cpu"))
    lt.run(lt.Config(features=features_artifact, vae=root / "vae", out=root / "lat", shard_samples=8))
    fid.run_ref(fid.RefConfig(images=images_artifact, out=root / "ref", encoder=str(encoder_dir), device="cpu",
                              batch_size=8))
    return root


def test_in_training_evaluation_keeps_best_and_is_not_redone_on_resume(eval_chain, encoder_dir, tmp_path,
                                                                       crash_at, monkeypatch):
    import pipeline.evaluation as ev

    def cfg(out, **kw):
        return config(eval_chain / "lat", out, steps=4, ckpt_every=100, eval_every=2, eval_samples=6,
                      eval_steps=4, eval_ref=eval_chain / "ref", flatdino=eval_chain / "vae", rae=encoder_dir, **kw)

    m = train_dit.run(cfg(tmp_path / "a"))
    evals = m.extra["evals"]
    assert [e["step"] for e in evals] == [2, 4] and all(np.isfinite(e["fd_dinov2"]) for e in evals)
    best = min(evals, key=lambda e: e["fd_dinov2"])
    assert m.extra["best"]["step"] == best["step"] and "fid" not in best  # no Inception weights offline
    saved = json.loads((tmp_path / "a" / "best" / "eval.json").read_text())
    assert saved == m.extra["best"] and (tmp_path / "a" / "best" / "ema.safetensors").exists()
    calls = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    disarm = crash_at(3)  # after the evaluation (and its checkpoint) at step 2
    with pytest.raises(Killed):
        train_dit.run(cfg(tmp_path / "b"))
    disarm()
    calls.clear()
    again = train_dit.run(cfg(tmp_path / "b"))
    assert len(calls) == 1 and again.extra["evals"] == evals  # only step 4 evaluated again; same numbers
    assert_same(weights(tmp_path / "a")[1], weights(tmp_path / "b")[1])


def test_evaluation_does_not_depend_on_the_batch_it_samples_in(eval_chain, encoder_dir):
    import pipeline.evaluation as ev
    from models.dit import DiT, PRESETS as DIT
    from pipeline.sampling import Chain, Sampling

    device = torch.device("cpu")
    setup = ev.open_eval(eval_chain / "ref", encoder_dir, None, device)
    vae, vae_cfg, pixels = ev.decoders(eval_chain / "vae", encoder_dir, device)
    torch.manual_seed(0)
    dit = DiT(dataclasses_replace(DIT["T"], tokens=8, channels=32, num_classes=CLASSES)).eval()
    chain = Chain(dit, vae, pixels, 1.0, None, None, CLASSES, (8, 32), {}, {})
    a = ev.evaluate(setup, chain, Sampling(steps=3), 6, CLASSES, Runtime(), batch_size=1)
    b = ev.evaluate(setup, chain, Sampling(steps=3), 6, CLASSES, Runtime(), batch_size=4)
    assert a == b and a["samples"] == 6


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_latents_on_device_train_the_same_weights(reference, latents, tmp_path):
    train_dit.run(config(latents, tmp_path / "dev", latents_on_device=True))
    for a, b in zip(weights(tmp_path / "dev"), weights(reference[0])):
        assert_same(a, b)
