"""`flatdino demo-report`: the same samples and metrics as `flatdino sample` + `pipeline.demo_metrics`, the headline
over seeds, resume to the same bytes, the fid join, and refusal of settings and artifacts that do not belong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from PIL import Image

from pipeline import demo_metrics as dm
from pipeline.manifest import ArtifactError, UserError, read_manifest
from pipeline.runtime import Runtime
from stages import classifier, images, report
from stages import sample as sm

pytestmark = pytest.mark.usefixtures("single_thread")

DIGITS = ["0", "1", "2"]  # the test chain's classes, as an images artifact of digits 0..2 names them


@pytest.fixture(scope="module")
def chain(tmp_path_factory, encoder_dir) -> dict:
    """A 3-class chain (random VAE, DiT trained 2 steps, the tiny RAE decoder) and a classifier of digits 0..2."""
    from test_sample import make_latents, make_vae

    from stages import train_dit

    root = tmp_path_factory.mktemp("report-chain")
    d = load_digits()
    for c in range(3):
        (root / "src" / str(c)).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == c)[:40]):
            gray = np.round(d.images[i] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(gray, mode="L").resize((64, 64), Image.NEAREST).convert("RGB").save(
                root / "src" / str(c) / f"{j:03d}.png")
    images.run(images.Config(out=root / "img", source=str(root / "src"), shard_size=200, val_fraction=0.25))
    classifier.run(classifier.Config(images=root / "img", out=root / "clf"))
    vae = make_vae(root / "vae", encoder_dir)
    latents = make_latents(root / "latents", vae, classes=DIGITS)
    train_dit.run(train_dit.Config(latents=latents, out=root / "dit", preset="T", steps=2, global_batch=8,
                                   standardize_latents=True, device="cpu", ckpt_every=2, log_every=1))
    return {"dit": root / "dit", "vae": vae, "decoder": str(encoder_dir), "classifier": root / "clf", "root": root}


def _cfg(chain: dict, out: Path, **kw) -> report.Config:
    base = dict(dit=chain["dit"], vae=chain["vae"], decoder=chain["decoder"], classifier=chain["classifier"],
                out=out, cfg_scale=(2.0, 1.0), seed=(0, 1), per_class=2, steps=3, cfg_interval=(0.2, 1.0),
                batch_size=4, device="cpu")
    return report.Config(**{**base, **kw})


@pytest.fixture(scope="module")
def finished(chain, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "r"
    report.run(_cfg(chain, out), rt=Runtime())
    return out


def test_report_measures_the_samples_of_flatdino_sample(chain, finished, tmp_path):
    """Seed 1 at w = 1: the report's grids are those of `flatdino sample`'s images with the same protocol, and its
    per-seed metrics are `pipeline.demo_metrics` of those images; the headline is their mean with its error."""
    sm.run(sm.Config(dit=chain["dit"], vae=chain["vae"], decoder=chain["decoder"], out=tmp_path / "s", per_class=2,
                     steps=3, cfg_scale=1.0, cfg_interval=(0.2, 1.0), seed=1, device="cpu"), rt=Runtime())
    with np.load(tmp_path / "s" / sm.SAMPLES) as z:
        x, y = z["arr_0"], z["arr_1"]
    clf, _ = classifier.load_classifier(chain["classifier"])
    with np.load(finished / report.unit_name(1.0, 1)) as z:
        np.testing.assert_array_equal(z["grid"], classifier.to_grid(x, 8))
        np.testing.assert_array_equal(z["label"], y)
        np.testing.assert_array_equal(z["pred"], clf.predict(x))
    rep = json.loads((finished / report.METRICS).read_text())
    w1 = {s["cfg_scale"]: s for s in rep["settings"]}[1.0]
    want = dm.sample_metrics(x, y, clf, dm.reference(clf))
    for name in ("class_consistency", "diversity", "diversity_ratio", "precision", "recall"):
        assert w1[name]["per_seed"]["1"] == pytest.approx(want[name], abs=1e-12)
        values = list(w1[name]["per_seed"].values())
        assert w1[name]["value"] == pytest.approx(np.mean(values))
        assert w1[name]["sem"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))
    assert w1["num_samples"] == 6 and w1["seeds"] == [0, 1] and (w1["steps"], w1["sampler"]) == (3, "euler")
    assert rep["reference"]["num_real"] == 90 and [s["cfg_scale"] for s in rep["settings"]] == [2.0, 1.0]
    m = read_manifest(finished)
    assert m.complete and m.stage == report.STAGE and m.extra["summary"] == rep["summary"]
    assert set(m.models) == {"dit", "vae", "decoder"} and m.inputs["classifier"]["fingerprint"]
    assert rep["summary"][1].startswith("w = 1: class-consistency") and "6 samples x 2 seeds" in rep["summary"][1]


def test_each_seed_draws_other_samples(finished):
    for w in (2.0, 1.0):
        a, b = (np.load(finished / report.unit_name(w, s))["grid"] for s in (0, 1))
        assert not np.array_equal(a, b) and a.shape == b.shape == (6, 64)


def test_killed_report_resumes_to_the_same_bytes(chain, finished, tmp_path, monkeypatch):
    calls = []
    real = report.write_unit

    def crash_on_third(*a, **k):
        calls.append(a[4:6])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while generating the third unit
        return real(*a, **k)

    monkeypatch.setattr(report, "write_unit", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        report.run(_cfg(chain, tmp_path / "r"), rt=Runtime())
    assert not (tmp_path / "r" / report.METRICS).exists() and not (tmp_path / "r" / "manifest.json").exists()
    calls.clear()
    report.run(_cfg(chain, tmp_path / "r"), rt=Runtime())
    assert calls == [(1.0, 0), (1.0, 1)]  # the two units committed before the kill are not generated again
    for name in [report.METRICS] + [report.unit_name(w, s) for w in (2.0, 1.0) for s in (0, 1)]:
        assert (tmp_path / "r" / name).read_bytes() == (finished / name).read_bytes(), name
    calls.clear()
    assert report.run(_cfg(chain, tmp_path / "r"), rt=Runtime()).complete and calls == []  # finished: a no-op


def test_fid_of_the_same_samples_joins_its_line_and_another_is_refused(chain, tmp_path):
    from stages import fid

    def fid_of(w: float, steps: int) -> Path:
        s = tmp_path / f"s-{w}-{steps}"
        sm.run(sm.Config(dit=chain["dit"], vae=chain["vae"], decoder=chain["decoder"], out=s, per_class=2,
                         steps=steps, cfg_scale=w, cfg_interval=(0.2, 1.0), device="cpu"), rt=Runtime())
        with np.load(s / sm.SAMPLES) as z:
            np.savez(tmp_path / "ref.npz", arr_0=z["arr_0"])
        fid.run(fid.Config(samples=s, reference=tmp_path / "ref.npz", out=tmp_path / f"fid-{w}-{steps}",
                           encoder=chain["decoder"], classifier=chain["classifier"], device="cpu"), rt=Runtime())
        return tmp_path / f"fid-{w}-{steps}"

    good = fid_of(2.0, 3)
    report.run(_cfg(chain, tmp_path / "r", fid=(good,)), rt=Runtime())
    rep = json.loads((tmp_path / "r" / report.METRICS).read_text())
    w2, w1 = rep["settings"]
    want = json.loads((good / "metrics.json").read_text())["metrics"]["fd_dinov2"]["value"]
    assert w2["fid"]["fd_dinov2"] == want and w2["fid"]["num_samples"] == 6 and "fid" not in w1
    assert f"FD-DINOv2(cls) {want:.4f} (6 samples, seed 0)" in rep["summary"][0]
    other = fid_of(2.0, 2)  # the same networks sampled with another protocol
    with pytest.raises(ArtifactError, match="another protocol"):
        report.run(_cfg(chain, tmp_path / "r2", fid=(other,)), rt=Runtime())
    assert not (tmp_path / "r2").exists()  # refused before anything was written


def test_settings_and_classifiers_that_cannot_be_measured_are_refused(chain, tmp_path):
    with pytest.raises(UserError, match="at least two different seeds"):
        report.run(_cfg(chain, tmp_path / "a", seed=(3,)), rt=Runtime())
    with pytest.raises(UserError, match="at least two different seeds"):
        report.run(_cfg(chain, tmp_path / "a", seed=(1, 1)), rt=Runtime())
    with pytest.raises(UserError, match="each guidance scale once"):
        report.run(_cfg(chain, tmp_path / "a", cfg_scale=(2.0, 2.0)), rt=Runtime())
    with pytest.raises(UserError, match=r"--per-class must be >= 1"):
        _cfg(chain, tmp_path / "a", per_class=0)
    ten = chain["root"] / "clf10"  # a classifier of other classes than the DiT's
    src = chain["root"] / "src10"
    d = load_digits()
    for c in range(10):
        (src / str(c)).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.target == c)[:12]):
            gray = np.round(d.images[i] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(gray, mode="L").convert("RGB").save(src / str(c) / f"{j:03d}.png")
    images.run(images.Config(out=chain["root"] / "img10", source=str(src), shard_size=200, val_fraction=0.25))
    classifier.run(classifier.Config(images=chain["root"] / "img10", out=ten, min_val_accuracy=0.0))
    with pytest.raises(ArtifactError, match="scores the classes"):
        report.run(_cfg(chain, tmp_path / "a", classifier=ten), rt=Runtime())
    assert not (tmp_path / "a").exists()


def test_command_line(chain, finished, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    args = ["demo-report", "--dit", str(chain["dit"]), "--vae", str(chain["vae"]), "--decoder", chain["decoder"],
            "--classifier", str(chain["classifier"]), "--out", str(tmp_path / "r"), "--cfg-scale", "2",
            "--cfg-scale", "1", "--seed", "0", "--seed", "1", "--per-class", "2", "--steps", "3", "--cfg-interval",
            "0.2", "1.0", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rep = json.loads((tmp_path / "r" / report.METRICS).read_text())
    assert result.stdout.strip().splitlines() == rep["summary"]
    assert (tmp_path / "r" / report.METRICS).read_bytes() == (finished / report.METRICS).read_bytes()
    result = CliRunner().invoke(main, args[:-2] + ["--seed", "5", "--device", "cpu"])  # 3 seeds: another config
    assert result.exit_code == 2 and "different config" in result.output
    help_text = CliRunner().invoke(main, ["demo-report", "--help"]).output
    assert "--cfg-scale" in help_text and "repeat the option" in help_text
