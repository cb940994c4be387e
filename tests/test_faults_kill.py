"""SIGKILL anywhere, then re-run: the artifact is byte-identical to a clean run (issue #8, DESIGN.md "Artifacts").

Each stage runs in a forked child whose k-th call of one sink (tar writer, atomic write, rename, fsync, checkpoint
save, zarr write) kills the process before, in the middle of, or right after the real write (tests/fault_harness.py).
k is drawn by a seeded RNG over the calls a clean run makes. The re-run must finish, leave no stray file, and give the
same files (sha256) and manifest fingerprint as the clean run; for training, the same weights bit for bit (CPU).
"""

from __future__ import annotations

import pytest

from fault_harness import Case, kill_then_resume, make_features_artifact, make_latents_artifact, pick_k, reference_run

SHARD_SINKS = ("tar", "atomic", "replace", "fsync", "tar_member")
TRAIN_SINKS = ("save_tensors", "atomic", "replace")


def _images_case(request) -> Case:
    folder = request.getfixturevalue("image_folder")
    return Case("images", "stages.images", {"source": str(folder), "shard_size": 5, "val_fraction": 0.25},
                SHARD_SINKS)


def _features_case(request) -> Case:
    return Case("features", "stages.features",
                {"images": str(request.getfixturevalue("images_artifact")),
                 "encoder": str(request.getfixturevalue("encoder_dir")), "views": 2, "batch_size": 4,
                 "num_workers": 1}, SHARD_SINKS, dist=(0, 1))


def _classifier_case(request) -> Case:
    return Case("train_classifier", "stages.classifier",
                {"images": str(request.getfixturevalue("images_artifact")), "min_val_accuracy": 0.0},
                ("atomic", "replace"))


def _train_dit_case(request) -> Case:
    latents = make_latents_artifact(request.getfixturevalue("tmp_path_factory").mktemp("latents"))
    return Case("train_dit", "stages.train_dit",
                {"latents": str(latents), "preset": "T", "steps": 6, "global_batch": 8, "lr": 1e-3, "ckpt_every": 2,
                 "keep": 2, "log_every": 1, "device": "cpu"}, TRAIN_SINKS)


def _vae_config(features) -> dict:
    return {"features": str(features), "preset": "demo", "variant": "demo", "epochs": 2, "global_batch": 8,
            "micro_batch": 4, "lr_peak": 2e-3, "val_every": 2, "ckpt_every": 2, "log_every": 1, "num_workers": 1,
            "device": "cpu"}


def _train_vae_case(request) -> Case:
    feats, _ = make_features_artifact(request.getfixturevalue("tmp_path_factory").mktemp("vae-feats") / "f")
    return Case("train_vae", "stages.train_vae", _vae_config(feats), VAE_SINKS, dist=(0, 1))


def _latents_case(request) -> Case:
    import stages.train_vae as tv
    from pipeline.config import config_from_dict

    root = request.getfixturevalue("tmp_path_factory").mktemp("lat-in")
    feats, _ = make_features_artifact(root / "f", n_train=20)
    tv.run(config_from_dict(tv.Config, {**_vae_config(feats), "epochs": 1, "out": str(root / "vae")}))
    return Case("latents", "stages.latents", {"features": str(feats), "vae": str(root / "vae"), "shard_samples": 4,
                                              "batch_size": 3, "device": "cpu"}, ("zarr", "atomic", "replace"),
                dist=(0, 1))


def _train_decoder_case(request) -> Case:
    return Case("train_decoder", "stages.train_decoder",
                {"images": str(request.getfixturevalue("images_artifact")),
                 "features": str(request.getfixturevalue("features_artifact")),
                 "encoder": str(request.getfixturevalue("encoder_dir")), "steps": 6, "preset": "demo", "batch_size": 4,
                 "eval_every": 3, "ckpt_every": 2, "eval_samples": 4, "grid_samples": 3, "lpips": "off",
                 "device": "cpu"}, ("atomic", "replace"))


def _sample_case(request) -> Case:
    from stages import train_dit
    from test_sample import make_latents, make_vae

    root = request.getfixturevalue("tmp_path_factory").mktemp("chain")
    encoder = request.getfixturevalue("encoder_dir")
    vae = make_vae(root / "vae", encoder)
    latents = make_latents(root / "latents", vae)
    train_dit.run(train_dit.Config(latents=latents, out=root / "dit", preset="T", steps=2, global_batch=8,
                                   standardize_latents=True, device="cpu", ckpt_every=2, log_every=1))
    return Case("sample", "stages.sample",
                {"dit": str(root / "dit"), "vae": str(vae), "decoder": str(encoder), "per_class": 2, "steps": 3,
                 "cfg_scale": 2.0, "cfg_interval": [0.2, 1.0], "chunk_size": 2, "batch_size": 3, "grid_columns": 2,
                 "device": "cpu"}, ("atomic", "replace"), dist=(0, 1))


def _reconstruct_case(request) -> Case:
    from test_sample import make_vae

    encoder = request.getfixturevalue("encoder_dir")
    vae = make_vae(request.getfixturevalue("tmp_path_factory").mktemp("rc-vae") / "run", encoder)
    return Case("reconstruct", "stages.reconstruct",
                {"images": str(request.getfixturevalue("images_artifact")),
                 "features": str(request.getfixturevalue("features_artifact")), "vae": str(vae),
                 "decoder": str(encoder), "split": "val", "limit": 5, "chunk_size": 2, "batch_size": 2,
                 "grid_samples": 3, "device": "cpu"}, ("atomic", "replace"), dist=(0, 1))


def _fid_ref_case(request) -> Case:
    return Case("fid_ref", "stages.fid", {"images": str(request.getfixturevalue("images_artifact")),
                                          "encoder": str(request.getfixturevalue("encoder_dir")), "block_size": 4,
                                          "pr_subset": 5, "download": False, "device": "cpu"},
                OUTPUT_SINKS, run="run_ref", config_class="RefConfig", dist=(0, 1))


CASES = {"images": _images_case, "fid_ref": _fid_ref_case, "train_decoder": _train_decoder_case, "sample": _sample_case,
         "reconstruct": _reconstruct_case, "train_vae": _train_vae_case, "latents": _latents_case,
         "features": _features_case, "train_classifier": _classifier_case, "train_dit": _train_dit_case}

# (stage, sink, action, seed): the default set covers every stage at a shard/checkpoint rename, mid-write and
# after-write; the slow set adds seeds and every sink.
FAST = [
    ("images", "tar", "kill_during", 0),
    ("images", "replace", "kill_after", 0),
    ("features", "tar_member", "kill_before", 0),
    ("features", "replace", "kill_after", 1),
    ("features", "atomic", "kill_during", 0),
    ("train_classifier", "atomic", "kill_during", 0),
    ("train_dit", "save_tensors", "kill_during", 0),
    ("train_dit", "replace", "kill_after", 0),
    ("train_dit", "save_tensors", "kill_before", 1),
    ("train_vae", "save_tensors", "kill_during", 0),
    ("train_vae", "replace", "kill_after", 0),
    ("latents", "zarr", "kill_after", 0),
    ("latents", "atomic", "kill_during", 0),
    pytest.param("train_decoder", "atomic", "kill_during", 0, marks=pytest.mark.slow),
    ("sample", "replace", "kill_after", 0),
    ("reconstruct", "atomic", "kill_during", 0),
    ("fid_ref", "atomic", "kill_during", 0),
]
VAE_SINKS = TRAIN_SINKS
OUTPUT_SINKS = ("atomic", "replace")
TORN = ("tar", "atomic", "save_tensors", "tar_member")  # sinks where kill_during differs from kill_before
SLOW = [(stage, sink, action, 1) for stage, sinks in
        [("images", SHARD_SINKS), ("features", SHARD_SINKS), ("train_classifier", OUTPUT_SINKS),
         ("train_dit", TRAIN_SINKS), ("train_vae", VAE_SINKS), ("latents", ("zarr", "atomic", "replace")),
         ("train_decoder", OUTPUT_SINKS), ("sample", OUTPUT_SINKS), ("reconstruct", OUTPUT_SINKS),
         ("fid_ref", OUTPUT_SINKS)]
        for sink in sinks for action in ("kill_before", "kill_during", "kill_after")
        if (action != "kill_during" or sink in TORN) and (stage, sink, action, 1) not in FAST]

KNOWN_BUGS: dict = {}
SLOW = [pytest.param(*p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[p])) if p in KNOWN_BUGS else p
        for p in SLOW]

_REFS: dict = {}


@pytest.fixture
def reference(request, tmp_path_factory):
    """Clean run of a stage (cached per session), with the sink call counts."""

    def get(name: str):
        if name not in _REFS:
            case = CASES[name](request)
            _REFS[name] = case, reference_run(case, tmp_path_factory.mktemp(f"kill-{name}") / "out")
        return _REFS[name]

    return get


@pytest.mark.parametrize("stage,sink,action,seed", FAST)
def test_kill_and_rerun_is_byte_identical(reference, stage, sink, action, seed):
    case, ref = reference(stage)
    kill_then_resume(case, ref, ref.out.with_name("out"), sink, action, pick_k(ref, case, sink, action, seed))


@pytest.mark.slow
@pytest.mark.parametrize("stage,sink,action,seed", SLOW)
def test_kill_and_rerun_is_byte_identical_more_points(reference, stage, sink, action, seed):
    case, ref = reference(stage)
    kill_then_resume(case, ref, ref.out.with_name("out"), sink, action, pick_k(ref, case, sink, action, seed))


def test_kill_between_checkpoint_commit_and_latent_stats(reference):
    case, ref = reference("train_dit")
    last = ref.calls["save_tensors"]  # the last call is the published ckpt/'s latent_stats
    kill_then_resume(case, ref, ref.out.with_name("out"), "save_tensors", "kill_before", last)
