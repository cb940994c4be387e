"""LightningDiT model: adaLN-Zero init, parameter counts, time embedding, checkpoint round trip, invariances."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from models.dit import PRESETS, DiT, DiTConfig, config_from_dict, config_to_dict, load_dit
from models.layers import rope_1d, sincos_1d

TINY = DiTConfig(width=64, depth=2, heads=4, mlp_hidden=128, tokens=8, channels=6, num_classes=3, time_freqs=16)


def perturbed(cfg: DiTConfig = TINY, seed: int = 0) -> DiT:
    """A model whose zero-initialised layers are given random values, so outputs are not trivially zero."""
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(cfg: DiTConfig = TINY, b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.tokens, cfg.channels, generator=g)
    t = torch.rand(b, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (b,), generator=g)
    return x, t, y


def analytic_params(c: DiTConfig) -> int:
    w, h = c.width, c.mlp_hidden
    block = (w * 3 * w + 3 * w) + (w * w + w) + (3 * w * h + 2 * h + w) + (w * 6 * w + 6 * w) + 2 * w
    embed = (c.channels * w + w) + (2 * c.time_freqs * w + w + w * w + w) + (c.num_classes + 1) * w
    final = w + (w * 2 * w + 2 * w) + (w * c.channels + c.channels)
    return embed + c.depth * block + final


def test_output_exactly_zero_at_init():
    model = DiT(TINY)
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", ["S", "B", "L", "XL", "T"])
def test_param_count_matches_analytic(name):
    cfg = PRESETS[name]
    model = DiT(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == analytic_params(cfg)


def test_xl_param_counts_match_spec():
    xl = PRESETS["XL"]
    n_flat = sum(p.numel() for p in DiT(xl, device="meta").parameters())
    grid = dataclasses.replace(xl, tokens=256, channels=768)
    n_grid = sum(p.numel() for p in DiT(grid, device="meta").parameters())
    assert round(n_flat / 1e6, 1) == 675.5  # SPEC.md 7.1
    assert round(n_grid / 1e6, 1) == 677.0


def test_time_embedding_is_fixed_gaussian_fourier_in_state_dict():
    model = DiT(TINY)
    w = torch.randn(TINY.time_freqs, generator=torch.Generator().manual_seed(TINY.time_seed))
    assert torch.equal(model.state_dict()["t_embedder.freqs"], w)
    assert "t_embedder.freqs" not in dict(model.named_parameters())
    t = torch.tensor([0.0, 0.25, 1.0])
    feats = torch.cat([torch.sin(2 * math.pi * t[:, None] * w), torch.cos(2 * math.pi * t[:, None] * w)], -1)
    torch.testing.assert_close(model.t_embedder(t), model.t_embedder.mlp(feats))
    other = DiT(dataclasses.replace(TINY, time_seed=1))
    assert not torch.equal(other.t_embedder.freqs, model.t_embedder.freqs)


def test_fixed_tables_are_sincos_and_interleaved_rope():
    model = DiT(TINY)
    pos = torch.arange(TINY.tokens)
    torch.testing.assert_close(model.pos_embed, sincos_1d(TINY.width, pos))
    cos, sin = rope_1d(TINY.head_dim, pos)
    torch.testing.assert_close(model.rope_cos, cos)
    torch.testing.assert_close(model.rope_sin, sin)
    assert torch.equal(model.rope_cos[:, 0], model.rope_cos[:, 1])  # pairs share a frequency


def test_position_embedding_breaks_token_permutation_symmetry():
    model = perturbed()
    x, t, y = inputs()
    perm = torch.randperm(TINY.tokens, generator=torch.Generator().manual_seed(0))
    out, out_perm = model(x, t, y), model(x[:, perm], t, y)
    assert not torch.allclose(out[:, perm], out_perm, atol=1e-4)


def test_samples_are_independent_of_batch():
    model = perturbed()
    x, t, y = inputs(b=4)
    full = model(x, t, y)
    for i in range(4):
        torch.testing.assert_close(model(x[i : i + 1], t[i : i + 1], y[i : i + 1]), full[i : i + 1])


def test_label_and_time_change_output():
    model = perturbed()
    x, t, y = inputs()
    base = model(x, t, y)
    assert not torch.allclose(base, model(x, t, torch.full_like(y, TINY.null_class)))
    assert not torch.allclose(base, model(x, 1 - t, y))


def test_grad_checkpointing_same_output_and_grads():
    ref = perturbed().train()
    ckpt = DiT(dataclasses.replace(TINY, grad_checkpointing=True)).train()
    ckpt.load_state_dict(ref.state_dict())
    x, t, y = inputs()
    out_ref, out_ck = ref(x, t, y), ckpt(x, t, y)
    torch.testing.assert_close(out_ref, out_ck)
    out_ref.square().sum().backward()
    out_ck.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_meta_construction_allocates_nothing():
    model = DiT(PRESETS["XL"], device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_config_round_trip_and_unknown_keys():
    d = config_to_dict(PRESETS["XL"])
    assert config_from_dict(json.loads(json.dumps(d))) == PRESETS["XL"]
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({**d, "widht": 3})


def write_ckpt(tmp_path, model: DiT, ema: DiT):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(model.state_dict(), str(ckpt / "model.safetensors"))
    save_file(ema.state_dict(), str(ckpt / "ema.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"dit": config_to_dict(model.cfg), "step": 7}))
    return ckpt


def test_load_dit_strict_round_trip(tmp_path):
    model, ema = perturbed(seed=0), perturbed(seed=1)
    write_ckpt(tmp_path, model, ema)
    x, t, y = inputs()
    loaded, full = load_dit(tmp_path, ema=True)  # the run folder holding ckpt/
    assert full["step"] == 7 and not loaded.training
    torch.testing.assert_close(loaded(x, t, y), ema(x, t, y), rtol=0, atol=0)
    raw, _ = load_dit(tmp_path / "ckpt", ema=False)
    torch.testing.assert_close(raw(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_load_dit_rejects_mismatched_weights(tmp_path):
    model = perturbed()
    ckpt = write_ckpt(tmp_path, model, model)
    state = model.state_dict()
    state.pop("final_layer.linear.bias")
    save_file(state, str(ckpt / "ema.safetensors"))
    with pytest.raises(RuntimeError, match="final_layer.linear.bias"):
        load_dit(ckpt)
