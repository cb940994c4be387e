"""`flatdino sample`: the decoding chain against an independent recomputation, determinism across batch sizes and
world sizes, chunked resume, the ADM npz format, grids, and refusal of networks that do not belong together."""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.encoder import FeatureEncoder, PixelDecoder, init_rae_dir, load_rae
from models.flatdino import PRESETS as VAE_PRESETS, FlatDINO, config_to_json
from pipeline import latents_store
from pipeline.manifest import ArtifactError, ConfigMismatch, Manifest, file_sha256, read_manifest, write_manifest
from pipeline.npz import rows_from_chunks, write_npz_streaming
from pipeline.runtime import Runtime
from stages import sample as sm

CLASSES = ["zero", "one", "two"]
N_LATENTS = 24


pytestmark = pytest.mark.usefixtures("single_thread")


def make_vae(root: Path, encoder_dir: Path, seed: int = 0) -> Path:
    """A finished train-vae run directory (best/ and last/) holding a random demo FlatDINO for `encoder_dir`."""
    torch.manual_seed(seed)
    cfg = replace(VAE_PRESETS["demo"], num_patches=FeatureEncoder(load_rae(encoder_dir)).num_patches)
    model = FlatDINO(cfg)
    shards, models = [], {}
    for which in ("best", "last"):
        (root / which).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / which / "model.safetensors")
        (root / which / "config.json").write_text(json.dumps({"model": config_to_json(cfg)}))
        sha = file_sha256(root / which / "model.safetensors")
        shards.append({"name": f"{which}/model.safetensors", "sha256": sha})
        models[which] = {"path": f"{which}/model.safetensors", "sha256": sha}
    fp = FeatureEncoder(load_rae(encoder_dir)).fingerprint
    write_manifest(root, Manifest(stage="train_vae", complete=True, shards=shards, models=models,
                                  extra={"encoder": {"source": str(encoder_dir), "fingerprint": fp},
                                         "latent_shape": list(cfg.latent_shape)}))
    return root


def make_latents(root: Path, vae: Path, classes: list[str] = CLASSES) -> Path:
    """A latents artifact 'made by' `vae`: class-dependent latents with a non-trivial mean/std."""
    rng = np.random.default_rng(0)
    shape = VAE_PRESETS["demo"].latent_shape
    label = np.arange(N_LATENTS) % len(classes)
    mu = (rng.normal(size=(N_LATENTS, *shape)) + label[:, None, None]) * 3.0 + 1.0
    path = root / latents_store.STORE
    latents_store.create_latents(path, N_LATENTS, *shape, chunk=8, attrs={})
    latents_store.write_rows(path, 0, mu, label, np.arange(N_LATENTS), np.zeros(N_LATENTS),
                             np.array([f"train_{i:08d}" for i in range(N_LATENTS)]))
    latents_store.finalize_stats(path)
    vae_fp = read_manifest(vae).fingerprint
    write_manifest(root, Manifest(stage="latents", complete=True,
                                  inputs={"vae": {"path": str(vae), "fingerprint": vae_fp, "weights": "best"}},
                                  extra={"classes": list(classes)}))
    return root


@pytest.fixture(scope="module")
def chain_dirs(tmp_path_factory, encoder_dir) -> dict:
    from stages import train_dit

    root = tmp_path_factory.mktemp("chain")
    vae = make_vae(root / "vae", encoder_dir)
    latents = make_latents(root / "latents", vae)
    dit = root / "dit"
    train_dit.run(train_dit.Config(latents=latents, out=dit, preset="T", steps=2, global_batch=8, standardize_latents=True,
                                   device="cpu", ckpt_every=2, log_every=1))
    return {"vae": vae, "latents": latents, "dit": dit, "decoder": str(encoder_dir)}


def _cfg(dirs: dict, out: Path, **kw) -> sm.Config:
    base = dict(dit=dirs["dit"], vae=dirs["vae"], decoder=dirs["decoder"], out=out, per_class=2, steps=3,
                cfg_scale=2.0, cfg_interval=(0.2, 1.0), chunk_size=4, batch_size=3, grid_columns=2, device="cpu")
    return sm.Config(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(chain_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples") / "ref"
    sm.run(_cfg(chain_dirs, out), rt=Runtime())
    return out


def test_samples_npz_in_adm_format_with_protocol(reference, chain_dirs):
    from stages.fid import npz_array

    m = read_manifest(reference)
    assert m.complete and m.stage == "sample"
    with np.load(reference / sm.SAMPLES) as z:
        images, labels = z["arr_0"], z["arr_1"]
        assert sorted(z.files) == ["arr_0", "arr_1"]
    assert images.dtype == np.uint8 and images.shape == (6, 256, 256, 3)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])  # class-balanced, class-major
    # the way the ADM evaluator / our fid stage reads it: zip member header, then a memory map of the raw rows
    np.testing.assert_array_equal(npz_array(reference / sm.SAMPLES, "arr_0"), images)
    np.testing.assert_array_equal(npz_array(reference / sm.SAMPLES, "arr_1"), labels)
    with zipfile.ZipFile(reference / sm.SAMPLES) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    e = m.extra
    assert (e["sampler"], e["steps"], e["cfg_scale"], e["cfg_interval"], e["per_class"], e["num_samples"]) == \
        ("euler", 3, 2.0, [0.2, 1.0], 2, 6)
    assert e["ema"] is True and e["standardized_latents"] is True
    dit_cfg = json.loads((chain_dirs["dit"] / "ckpt" / "config.json").read_text())
    assert e["kappa"] == dit_cfg["flow"]["kappa"]
    assert set(m.models) == {"dit", "vae", "decoder"} and m.inputs["latents"]["fingerprint"]
    from PIL import Image

    grid = Image.open(reference / sm.GRID)
    assert grid.size == (2 * (128 + 2) + 2, 3 * (128 + 2) + 2)  # 3 class rows x 2 columns of 128 px thumbnails


def _adm_read_batches(path: Path, name: str, batch: int) -> np.ndarray:
    """The guided-diffusion evaluator's streaming read: open the zip member, parse the .npy header, read row blocks."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy", "r") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        assert not fortran
        row = int(np.prod(shape[1:])) * dtype.itemsize
        out, left = [], shape[0]
        while left:
            n = min(batch, left)
            out.append(np.frombuffer(f.read(n * row), dtype=dtype).reshape(n, *shape[1:]))
            left -= n
    return np.concatenate(out)


def test_samples_npz_streams_like_the_adm_evaluator_reads_it(reference):
    with np.load(reference / sm.SAMPLES) as z:
        np.testing.assert_array_equal(_adm_read_batches(reference / sm.SAMPLES, "arr_0", batch=4), z["arr_0"])
        np.testing.assert_array_equal(_adm_read_batches(reference / sm.SAMPLES, "arr_1", batch=4), z["arr_1"])


def test_chain_matches_an_independent_recomputation(reference, chain_dirs):
    """Noise (seed, index) -> DiT EMA Euler/CFG -> x std + mean from latents.zarr -> FlatDINO decode -> RAE -> uint8."""
    from models.dit import load_dit
    from models.flow import sample, sample_noise
    from pipeline.artifacts import load_flatdino

    dit, full = load_dit(chain_dirs["dit"], ema=True)
    vae, _, _ = load_flatdino(chain_dirs["vae"])
    dec = PixelDecoder(load_rae(chain_dirs["decoder"]))
    art = latents_store.open_latents(chain_dirs["latents"])
    idx = [3, 4]
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        noise = sample_noise(0, idx, VAE_PRESETS["demo"].latent_shape)
        z = sample(dit, labels, noise, steps=3, cfg_scale=2.0, cfg_interval=(0.2, 1.0), kappa=full["flow"]["kappa"])
        z = torch.from_numpy(z.double().numpy() * art.std + art.mean).float()
        want = dec.to_uint8(dec(vae.decode(z))).numpy()
    with np.load(reference / sm.SAMPLES) as f:
        got = f["arr_0"][idx]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert (got == want).mean() > 0.999


def test_batch_size_does_not_change_samples(reference, chain_dirs, tmp_path):
    sm.run(_cfg(chain_dirs, tmp_path / "b1", batch_size=1), rt=Runtime())
    with np.load(reference / sm.SAMPLES) as a, np.load(tmp_path / "b1" / sm.SAMPLES) as b:
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # float reduction order only
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_world_size_does_not_change_samples(reference, chain_dirs, tmp_path):
    cfg = _cfg(chain_dirs, tmp_path / "w2")
    assert sm.run(cfg, rt=Runtime(0, 2)) is None  # rank 0 writes chunk 0; chunk 1 is missing
    assert sm.run(cfg, rt=Runtime(1, 2)) is None  # rank 1 writes chunk 1 only
    assert not (cfg.out / sm.SAMPLES).exists()
    m = sm.run(cfg, rt=Runtime(0, 2))  # rank 0 again: nothing left to sample, assembles
    assert (cfg.out / sm.SAMPLES).read_bytes() == (reference / sm.SAMPLES).read_bytes()
    assert [s["sha256"] for s in m.shards] == [s["sha256"] for s in read_manifest(reference).shards]


def test_resume_after_a_crash_and_noop_rerun(reference, chain_dirs, tmp_path, monkeypatch):
    cfg = _cfg(chain_dirs, tmp_path / "crash")
    real, calls = sm.write_chunk, {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sm, "write_chunk", crashing)
    with pytest.raises(KeyboardInterrupt):
        sm.run(cfg, rt=Runtime())
    assert (cfg.out / "chunk-000000.npz").exists() and not (cfg.out / sm.SAMPLES).exists()
    monkeypatch.setattr(sm, "write_chunk", lambda *a, **k: pytest.fail("chunk 0 must not be regenerated")
                        if a[3].index == 0 else real(*a, **k))
    sm.run(cfg, rt=Runtime())
    assert (cfg.out / sm.SAMPLES).read_bytes() == (reference / sm.SAMPLES).read_bytes()
    monkeypatch.setattr(sm, "write_chunk", lambda *a, **k: pytest.fail("a finished run must not sample"))
    sm.run(cfg, rt=Runtime())
    with pytest.raises(ConfigMismatch):
        sm.run(replace(cfg, cfg_scale=3.0), rt=Runtime())


def test_refuses_a_vae_that_did_not_make_the_latents(chain_dirs, tmp_path, encoder_dir):
    other = make_vae(tmp_path / "vae2", encoder_dir, seed=1)
    with pytest.raises(ArtifactError, match="pass the VAE that made"):
        sm.run(replace(_cfg(chain_dirs, tmp_path / "s"), vae=other), rt=Runtime())


def test_refuses_another_vae_checkpoint_than_the_latents(chain_dirs, tmp_path):
    with pytest.raises(ArtifactError, match="drop --vae-weights"):
        sm.run(replace(_cfg(chain_dirs, tmp_path / "s"), vae_weights="last"), rt=Runtime())


def test_refuses_a_decoder_of_another_encoder(chain_dirs, tmp_path):
    other = init_rae_dir(tmp_path / "enc2", "tiny", seed=5)
    with pytest.raises(ArtifactError, match="belongs to encoder"):
        sm.run(replace(_cfg(chain_dirs, tmp_path / "s"), decoder=str(other)), rt=Runtime())
    assert not (tmp_path / "s").exists()  # refused before any work


def test_refuses_latents_that_are_not_the_dits(chain_dirs, tmp_path):
    lat = make_latents(tmp_path / "lat2", chain_dirs["vae"])
    m = read_manifest(lat)
    m.extra["classes"] = ["x", "y", "z"]  # another artifact (different fingerprint)
    write_manifest(lat, m)
    with pytest.raises(ArtifactError, match="--latents"):
        sm.run(replace(_cfg(chain_dirs, tmp_path / "s"), latents=lat), rt=Runtime())


def test_streaming_npz_equals_np_savez(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    y = np.arange(7, dtype=np.int64)
    parts = [lambda s=s: {"arr_0": a[s : s + 3], "arr_1": y[s : s + 3]} for s in range(0, 7, 3)]
    write_npz_streaming(tmp_path / "s.npz", {"arr_0": (np.uint8, a.shape), "arr_1": (np.int64, y.shape)}, parts)
    with np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], a)
        np.testing.assert_array_equal(z["arr_1"], y)
    with pytest.raises(ValueError, match="header says"):
        write_npz_streaming(tmp_path / "bad.npz", {"arr_0": (np.uint8, (8, 4, 5, 3))}, parts)
    assert not (tmp_path / "bad.npz").exists()


def test_grid_indices_pick_evenly_spaced_classes():
    rows = sm.grid_indices(100, per_class=3, classes=4, columns=2)
    assert rows == [[0, 1], [99, 100], [198, 199], [297, 298]]  # classes 0, 33, 66, 99
    assert sm.grid_indices(2, per_class=1, classes=10, columns=4) == [[0], [1]]


def test_rows_from_chunks_reads_across_chunk_boundaries(reference):
    records = [s for s in read_manifest(reference).shards if s["name"].startswith("chunk-")]
    with np.load(reference / sm.SAMPLES) as z:
        np.testing.assert_array_equal(rows_from_chunks(reference, records, [5, 0, 3, 4]), z["arr_0"][[5, 0, 3, 4]])
