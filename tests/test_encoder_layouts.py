"""RAE directories in both DINOv2 key layouts: the pure renaming, strict loads, fingerprints that survive a
transformers upgrade, bit-identical features, and the `--resize rae` path against diffusers' own encode/decode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import encoder as enc
from models.encoder import (FeatureEncoder, PixelDecoder, adm_center_crop, canonical_dinov2_names, legacy_dinov2_names,
                            encoder_fingerprint, load_rae, meta_tensors, rae_checkpoint_filter, state_fingerprint, uses_legacy_dinov2_names)
from pipeline.manifest import ArtifactError
from pipeline.shards import load_rgb  # noqa: E402
from pipeline.runtime import Runtime
from pipeline.shards import FeatureShards, ImageShards
from release_layout import canonical_state, release_state, write_installed_dir, write_photo_folder, write_release_dir
from stages import features, images

pytestmark = pytest.mark.usefixtures("single_thread")

LEGACY = {
    "encoder.encoder.layer.3.attention.attention.query.weight": "encoder.encoder.layer.3.attention.q_proj.weight",
    "encoder.encoder.layer.3.attention.attention.key.bias": "encoder.encoder.layer.3.attention.k_proj.bias",
    "encoder.encoder.layer.11.attention.attention.value.weight": "encoder.encoder.layer.11.attention.v_proj.weight",
    "encoder.encoder.layer.0.attention.output.dense.bias": "encoder.encoder.layer.0.attention.o_proj.bias",
}
UNTOUCHED = ["encoder.encoder.layer.0.mlp.fc1.weight", "encoder.embeddings.register_tokens",
             "decoder.decoder_layers.0.attention.to_q.weight", "decoder.decoder_layers.1.output.dense.weight",
             "encoder.encoder.layer.0.layer_scale1.lambda1", "encoder_mean"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The same random tiny weights as a release-layout directory and as an installed-layout one."""
    root = tmp_path_factory.mktemp("layouts")
    release, rae = write_release_dir(root / "release", "tiny", seed=3)
    return {"release": release, "installed": write_installed_dir(root / "installed", rae), "rae": rae}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos of mixed sizes and colour modes as an images artifact (12 images, 3 classes)."""
    root = tmp_path_factory.mktemp("photos")
    out = root / "images"
    images.run(images.Config(out=out, source=str(write_photo_folder(root / "folder")), shard_size=5,
                             val_fraction=0.25))
    return out


def test_legacy_names_convert_both_ways_and_touch_nothing_else():
    values = {k: torch.full((2,), float(i)) for i, k in enumerate([*LEGACY, *UNTOUCHED])}
    canon = canonical_dinov2_names(values)
    assert sorted(canon) == sorted([*LEGACY.values(), *UNTOUCHED])
    for old, new in LEGACY.items():
        assert canon[new] is values[old]  # values are not copied or changed
    assert all(canon[k] is values[k] for k in UNTOUCHED)
    assert canonical_dinov2_names(canon) == canon  # idempotent on the canonical layout
    assert legacy_dinov2_names(canon) == values  # the exact inverse
    assert uses_legacy_dinov2_names(values) and not uses_legacy_dinov2_names(canon)
    with pytest.raises(ValueError, match="mixed DINOv2 key layouts"):
        canonical_dinov2_names({**values, "encoder.encoder.layer.3.attention.q_proj.weight": torch.zeros(2)})


def test_checkpoint_filter_targets_the_installed_layout_and_drops_the_affine():
    state = {**{k: torch.zeros(1) for k in LEGACY}, "encoder.layernorm.weight": torch.ones(1),
             "decoder.decoder_pos_embed": torch.zeros(1)}
    assert sorted(rae_checkpoint_filter(state)) == sorted(LEGACY.values())
    assert sorted(rae_checkpoint_filter(state, legacy_names=True)) == sorted(LEGACY)
    assert sorted(rae_checkpoint_filter(canonical_dinov2_names(state), legacy_names=True)) == sorted(LEGACY)
    import transformers
    from packaging.version import Version

    installed = enc.build_rae("tiny").state_dict()
    legacy = Version(transformers.__version__) < Version("5.18")  # 5.18 renamed them q/k/v/o_proj
    assert uses_legacy_dinov2_names(installed) == legacy
    assert any(k.endswith("attention.attention.query.weight" if legacy else "attention.q_proj.weight")
               for k in installed)


def test_release_layout_loads_strictly_with_the_same_weights_and_fingerprints(dirs):
    a, b = load_rae(dirs["release"]), load_rae(dirs["installed"])
    assert meta_tensors(a) == [] and meta_tensors(b) == []
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
    fa, fb = FeatureEncoder(a).fingerprint, FeatureEncoder(b).fingerprint
    assert fa == fb == encoder_fingerprint(dirs["rae"])
    assert state_fingerprint(a, "encoder.") == state_fingerprint(dirs["rae"], "encoder.")
    assert PixelDecoder(a).fingerprint == PixelDecoder(b).fingerprint
    # the fingerprint is over canonical names: a module whose keys are the legacy ones hashes the same
    legacy_module = _StateModule(release_state(dirs["rae"].state_dict()))
    assert state_fingerprint(legacy_module, "encoder.") == state_fingerprint(a, "encoder.")
    # ... and it is the plain sha256 over the state in >= 5.18 names: artifacts made before keep matching
    assert state_fingerprint(a, "encoder.") == _plain_fingerprint(canonical_state(dirs["rae"].state_dict()),
                                                                   "encoder.")
    other = dict(dirs["rae"].state_dict())
    key = next(k for k in other if k.startswith("encoder.encoder.layer.1.attention."))
    other[key] = other[key] + 1e-3
    assert state_fingerprint(_StateModule(other), "encoder.") != state_fingerprint(a, "encoder.")


class _StateModule(torch.nn.Module):
    """A module whose state_dict is exactly the given one (any key names)."""

    def __init__(self, state):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):
        return dict(self._state)


def _plain_fingerprint(state, prefix):
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        if name.startswith(prefix):
            t = t.detach().cpu().contiguous()
            h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_a_tensor_left_on_the_meta_device_is_an_error_naming_it(dirs, monkeypatch):
    from diffusers import AutoencoderRAE

    real = AutoencoderRAE.from_config.__func__

    def with_meta_buffer(cls, config, **kw):
        model = real(cls, config, **kw)
        model.decoder.decoder_pos_embed = torch.empty(model.decoder.decoder_pos_embed.shape, device="meta")
        return model

    monkeypatch.setattr(AutoencoderRAE, "from_config", classmethod(with_meta_buffer))
    with pytest.raises(ArtifactError, match=r"1 tensors were never loaded .*decoder\.decoder_pos_embed"):
        load_rae(dirs["release"])


def test_wrong_weights_in_the_release_layout_are_refused(dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(dirs["release"], bad)
    state = load_file(bad / enc.WEIGHTS_NAME)
    state.pop("encoder.encoder.layer.1.attention.attention.value.bias")
    save_file(state, bad / enc.WEIGHTS_NAME)
    missing = r"layer\.1\.attention\.(v_proj|attention\.value)\.bias"  # named as the installed transformers does
    with pytest.raises(ArtifactError, match=r"(?s)do not match its config.json.*" + missing):
        load_rae(bad)


def _features(photos, encoder_dir, out, resize="flatdino"):
    return features.run(features.Config(images=photos, encoder=str(encoder_dir), out=out, views=2, batch_size=4,
                                        num_workers=1, resize=resize, device="cpu"), rt=Runtime())


def _hashes(path):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.tar"))}


def test_features_of_the_release_layout_equal_the_installed_layout_bit_for_bit(dirs, photos, tmp_path):
    a = _features(photos, dirs["release"], tmp_path / "release")
    b = _features(photos, dirs["installed"], tmp_path / "installed")
    assert a.counts == b.counts == {"written": 12, "skipped": 0, "failed": 0}
    assert _hashes(tmp_path / "release") == _hashes(tmp_path / "installed") and len(_hashes(tmp_path / "release")) > 1
    assert a.config["encoder_fingerprint"] == b.config["encoder_fingerprint"]
    assert a.fingerprint == b.fingerprint  # the same artifact: downstream stages accept either
    assert a.extra["resize"] == "flatdino" and a.models["encoder"]["resize"] == "flatdino"


def _diffusers_tokens(rae, crops: np.ndarray) -> np.ndarray:
    """diffusers' AutoencoderRAE.encode on [0, 1] images, its latent normalisation undone: (B, N, D) float32."""
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        z = rae.encode(x).latent  # (B, D, h, w), (tokens - mean) / (std + 1e-5)
    z = z * (rae._latents_std + 1e-5) + rae._latents_mean
    return z.flatten(2).transpose(1, 2).numpy()


def test_rae_resize_features_equal_diffusers_encode_within_float16(dirs, photos, tmp_path):
    rae = load_rae(dirs["release"])
    assert rae._latents_std.shape == (192, 16, 16) and not torch.allclose(rae._latents_std, torch.ones(1))
    stored = {"rae": _features(photos, dirs["release"], tmp_path / "rae", "rae"),
              "flatdino": _features(photos, dirs["release"], tmp_path / "flatdino", "flatdino")}
    assert stored["rae"].fingerprint != stored["flatdino"].fingerprint
    assert stored["rae"].config["resize"] == "rae" and stored["rae"].extra["resize"] == "rae"
    art = ImageShards(photos)
    crops = {key: np.asarray(adm_center_crop(load_rgb(data)), dtype=np.uint8)
             for _, key, _, data, _ in art.iter("train")}
    feats = {name: {key: f for _, key, _, f in FeatureShards(tmp_path / name).iter("train")} for name in stored}
    keys = sorted(crops)
    ref = _diffusers_tokens(rae, np.stack([crops[k] for k in keys]))
    ref_flip = _diffusers_tokens(rae, np.stack([crops[k][:, ::-1] for k in keys]))
    ours = np.stack([feats["rae"][k] for k in keys]).astype(np.float32)  # (B, V, N, D)
    # float16 storage: within half an ulp (2^-11 relative) of diffusers' float32 tokens, plus round-off
    np.testing.assert_allclose(ours[:, 0], ref, rtol=2**-10, atol=1e-5)
    np.testing.assert_allclose(ours[:, 1], ref_flip, rtol=2**-10, atol=1e-5)
    # the antialiased (official FlatDINO) resize is measurably another input
    aa = np.stack([feats["flatdino"][k] for k in keys]).astype(np.float32)
    assert np.abs(aa[:, 0] - ref).max() > 100 * np.abs(ours[:, 0] - ref).max()


def test_pixel_decoder_equals_diffusers_decode_on_the_release_layout(dirs):
    rae = load_rae(dirs["release"])
    tokens = torch.randn(2, 256, 192, generator=torch.Generator().manual_seed(0))
    ours = PixelDecoder(rae)(tokens) * torch.tensor(enc.IMAGENET_STD).view(1, 3, 1, 1) + \
        torch.tensor(enc.IMAGENET_MEAN).view(1, 3, 1, 1)
    z = tokens.transpose(1, 2).reshape(2, 192, 16, 16)
    z = (z - rae._latents_mean) / (rae._latents_std + 1e-5)  # what diffusers' encode would have handed over
    with torch.no_grad():
        theirs = rae.decode(z).sample
    assert ours.shape == theirs.shape == (2, 3, 256, 256)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_unknown_resize_is_refused(dirs):
    with pytest.raises(ValueError, match="unknown resize 'area'"):
        FeatureEncoder(load_rae(dirs["installed"]), "area")


def test_release_config_fields_are_what_the_conversion_script_writes(dirs):
    cfg = json.loads((dirs["release"] / "config.json").read_text())
    assert isinstance(cfg["latents_mean"][0][0], list) and cfg["encoder_type"] == "dinov2"
    rae = load_rae(dirs["release"])
    assert rae.config.encoder_hidden_size == 192 and rae.config.image_size is None


def test_encoders_of_another_input_size_have_another_fingerprint():
    """Same weights, 112 instead of 224 px (an 8x8 instead of a 16x16 grid): another encoder, another fingerprint, so
    train-decoder, sample and latents refuse the mismatch; the pixel decoder's geometry is in its fingerprint too."""
    from models.encoder import build_rae

    torch.manual_seed(0)
    a = build_rae("tiny")
    torch.manual_seed(0)
    b = build_rae("tiny", encoder_input_size=112)
    assert state_fingerprint(a, "encoder.") == state_fingerprint(b, "encoder.")  # the weights are the same
    assert FeatureEncoder(a).fingerprint != FeatureEncoder(b).fingerprint
    torch.manual_seed(0)
    c = build_rae("tiny", patch_size=32)
    assert state_fingerprint(c.decoder) != state_fingerprint(a.decoder) or \
        PixelDecoder(c).fingerprint != PixelDecoder(a).fingerprint


def test_demo_encoder_patch_embedding_is_scaled_and_nothing_else(tmp_path):
    """`init-encoder --preset demo` = the usual random init with the patch embedding times 1/24 (PATCH_EMBED_SCALE);
    the tiny preset is the plain init. The scaled encoder keeps grey level and position comparable, which is what
    keeps the demo's features informative (bench/RESULTS.md, issue 17)."""
    from models.encoder import PATCH_EMBED_SCALE, PATCH_EMBED_WEIGHT, build_rae, init_rae_dir, load_rae

    for preset in ("demo", "tiny"):
        torch.manual_seed(3)
        plain = dict(build_rae(preset).named_parameters())
        written = dict(load_rae(init_rae_dir(tmp_path / preset, preset, seed=3)).named_parameters())
        assert written.keys() == plain.keys()
        scale = PATCH_EMBED_SCALE.get(preset, 1.0)
        for name, p in plain.items():
            torch.testing.assert_close(written[name], p * scale if name == PATCH_EMBED_WEIGHT else p, rtol=0, atol=0)
    assert PATCH_EMBED_SCALE == {"demo": 1 / 24}


def test_init_encoder_rewrites_a_demo_encoder_made_before_the_patch_embedding_scale(tmp_path):
    """init-encoder's stamp names the recipe, scale included: a demo encoder written by the unscaled init (same preset
    and seed) is re-made, one written by this recipe is left alone."""
    from models.encoder import PATCH_EMBED_WEIGHT, build_rae, load_rae
    from stages.features import InitConfig, init_encoder

    out = tmp_path / "enc"
    init_encoder(InitConfig(out=out, preset="demo", seed=0))
    torch.manual_seed(0)
    (out / "init.json").write_text(repr(("demo", 0)))  # the stamp of the unscaled recipe
    build_rae("demo").save_pretrained(out, safe_serialization=True)
    init_encoder(InitConfig(out=out, preset="demo", seed=0))
    first = dict(load_rae(out).named_parameters())[PATCH_EMBED_WEIGHT].detach().clone()
    assert first.std() < 0.02 / 10  # re-made with the scale
    mtime = (out / enc.WEIGHTS_NAME).stat().st_mtime_ns
    init_encoder(InitConfig(out=out, preset="demo", seed=0))
    assert (out / enc.WEIGHTS_NAME).stat().st_mtime_ns == mtime  # same recipe: nothing written
