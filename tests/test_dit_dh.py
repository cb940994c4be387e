"""DiT^DH (models/dit_dh.py): official data flow, zero init, parameter counts, CFG, learning, checkpoint round trip."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models import dit, flow
from models.dit_dh import (
    ARCH,
    PRESETS,
    DiTDH,
    DiTDHConfig,
    config_from_dict,
    config_to_dict,
    load_dit_dh,
    load_generator,
)
from models.layers import apply_rope, rope_1d

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = DiTDHConfig(width=32, depth=2, heads=2, mlp_hidden=64, dh_width=48, dh_depth=2, dh_heads=2, dh_mlp_hidden=96,
                   tokens=8, channels=6, num_classes=3, time_freqs=16)


def perturbed(cfg: DiTDHConfig = TINY, seed: int = 0) -> DiTDH:
    """A model whose zero-initialised layers get random values, so that outputs are not trivially zero."""
    torch.manual_seed(seed)
    model = DiTDH(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(cfg: DiTDHConfig = TINY, b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.tokens, cfg.channels, generator=g)
    t = torch.rand(b, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (b,), generator=g)
    return x, t, y


# ------------------------------------------------------------------ the official data flow, written out by hand


def ref_rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def ref_block(blk, x, c, heads, cos, sin):
    """LightningDDTBlock.__call__ (official flatdino/decoder/dit_dh.py): c (B, 1, D) or (B, T, D)."""
    mod = F.linear(F.silu(c), blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias)
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, -1)
    h = ref_rms(x, blk.norm1.weight) * (1 + sc1) + sh1
    B, T, D = h.shape
    q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, T, 3, heads, D // heads).unbind(2)
    q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # (B, H, T, Dh)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), -1) @ v
    x = x + g1 * F.linear(att.transpose(1, 2).reshape(B, T, D), blk.attn.proj.weight, blk.attn.proj.bias)
    h = ref_rms(x, blk.norm2.weight) * (1 + sc2) + sh2
    mlp = F.silu(F.linear(h, blk.mlp.gate.weight, blk.mlp.gate.bias)) * F.linear(h, blk.mlp.up.weight, blk.mlp.up.bias)
    return x + g2 * F.linear(mlp, blk.mlp.down.weight, blk.mlp.down.bias)


def reference_forward(m: DiTDH, x, t, y):
    """DiTDH.__call__ (official, patch_size=None) from the module's parameters."""
    cfg = m.cfg
    ang = 2 * math.pi * t[:, None] * m.t_embedder.freqs[None]
    t_emb = m.t_embedder.mlp(torch.cat([ang.sin(), ang.cos()], -1))
    c = F.silu(t_emb + m.y_embedder.weight[y])[:, None]  # (B, 1, W)
    pos = torch.arange(cfg.tokens)
    s = F.linear(x, m.s_embedder.weight, m.s_embedder.bias) + m.pos_embed
    cos, sin = rope_1d(cfg.width // cfg.heads, pos)
    for blk in m.blocks:
        s = ref_block(blk, s, c, cfg.heads, cos, sin)
    s = F.silu(t_emb[:, None] + s)  # no final norm on the body
    s = F.linear(s, m.s_projector.weight, m.s_projector.bias)
    h = F.linear(x, m.x_embedder.weight, m.x_embedder.bias)  # the head embeds the noisy input itself
    cos, sin = rope_1d(cfg.dh_width // cfg.dh_heads, pos)
    for blk in m.head_blocks:
        h = ref_block(blk, h, s, cfg.dh_heads, cos, sin)
    fl = m.final_layer
    shift, scale = F.linear(F.silu(s), fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias).chunk(2, -1)
    return F.linear(ref_rms(h, fl.norm.weight) * (1 + scale) + shift, fl.linear.weight, fl.linear.bias)


def test_forward_is_the_official_data_flow():
    model = perturbed()
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference_forward(model, x, t, y), rtol=1e-5, atol=1e-5)


def test_output_exactly_zero_at_init():
    model = DiTDH(TINY)
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))


def test_head_modulation_is_per_token():
    """The head's adaLN sees the body output per token: its shift/scale differ across tokens (global in the body)."""
    model = perturbed()
    x, t, y = inputs()
    seen = {}
    for name, mod in (("body", model.blocks[0]), ("head", model.head_blocks[0])):
        mod.adaLN_modulation.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
    model(x, t, y)
    assert seen["body"].shape == (3, 6 * TINY.width)  # one global condition per sample
    assert seen["head"].shape == (3, TINY.tokens, 6 * TINY.dh_width)
    assert not torch.allclose(seen["head"][:, 0], seen["head"][:, 1])


def test_same_widths_have_no_projector():
    cfg = dataclasses.replace(TINY, dh_width=32, dh_mlp_hidden=64)
    model = DiTDH(cfg)
    assert isinstance(model.s_projector, torch.nn.Identity)
    assert expected_params(cfg) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ parameter counts from the official configs

# flatdino/models/dit.py LIGHTNING_DIT_CONFIGS (embed_dim, num_layers, mlp_hidden_dim, num_heads); the `-dh` head is
# DiTDHConfig's default decoder_dim 2048, decoder_depth 2, decoder_heads 16 (flatdino/decoder/dit_dh.py), and
# train_generator.py build_config sets mlp_ratio = mlp_hidden_dim / embed_dim for body and head alike.
OFFICIAL = {"dits-dh": (384, 12, 1024, 6), "ditb-dh": (768, 12, 2048, 12), "ditl-dh": (1024, 24, 2731, 16),
            "ditxl-dh": (1152, 28, 3072, 16)}


def block_params(w: int, hidden: int) -> int:
    """LightningDDTBlock: qkv + proj (biases), SwiGLU (3 biased linears), two RMSNorm scales, adaLN 6w."""
    return (3 * w * w + 3 * w) + (w * w + w) + (3 * w * hidden + 2 * hidden + w) + 2 * w + (w * 6 * w + 6 * w)


def official_params(w, depth, hidden, w_dh, depth_dh, hidden_dh, tokens, channels, classes=1000) -> int:
    """Trainable parameters of the official DiTDH(patch_size=None) from its dimensions."""
    embed = (channels * w + w) + (channels * w_dh + w_dh)  # s_embedder, x_embedder
    proj = w * w_dh + w_dh if w != w_dh else 0  # s_projector
    cond = (2 * 256 * w + w + w * w + w) + (classes + 1) * w  # Fourier MLP (W itself is not a Param), labels
    final = w_dh + (w_dh * 2 * w_dh + 2 * w_dh) + (w_dh * channels + channels)
    return (embed + proj + cond + tokens * w + depth * block_params(w, hidden)
            + depth_dh * block_params(w_dh, hidden_dh) + final)


def expected_params(c: DiTDHConfig) -> int:
    return official_params(c.width, c.depth, c.mlp_hidden, c.dh_width, c.dh_depth, c.dh_mlp_hidden, c.tokens,
                           c.channels, c.num_classes) - (2 * 256 * c.width - 2 * c.time_freqs * c.width)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_presets_param_counts(name):
    w, depth, mlp, heads = OFFICIAL[name]
    ratio = mlp / w
    hidden, hidden_dh = int(w * ratio), int(2048 * ratio)  # LightningDDTBlock: int(hidden_size * mlp_ratio)
    cfg = PRESETS[name]
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_hidden) == (w, depth, heads, hidden)
    assert (cfg.dh_width, cfg.dh_depth, cfg.dh_heads, cfg.dh_mlp_hidden) == (2048, 2, 16, hidden_dh)
    for tokens, channels in ((32, 128), (256, 768)):
        model = DiTDH(dataclasses.replace(cfg, tokens=tokens, channels=channels), device="meta")
        counted = sum(p.numel() for p in model.parameters())
        assert counted == official_params(w, depth, hidden, 2048, 2, hidden_dh, tokens, channels)


def test_xl_head_hidden_and_totals():
    """SPEC 7.1: head hidden 5461 for XL (5462 for L); totals on FlatDINO latents and on the DINOv2 grid."""
    assert PRESETS["ditxl-dh"].dh_mlp_hidden == 5461 and PRESETS["ditl-dh"].dh_mlp_hidden == 5462
    flat = sum(p.numel() for p in DiTDH(PRESETS["ditxl-dh"], device="meta").parameters())
    grid_cfg = dataclasses.replace(PRESETS["ditxl-dh"], tokens=256, channels=768)
    grid = sum(p.numel() for p in DiTDH(grid_cfg, device="meta").parameters())
    assert round(flat / 1e6, 2) == 835.06 and round(grid / 1e6, 2) == 838.68


def test_xl_grid_count_equals_raes_ditdh_xl_config():
    """RAE configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml: hidden [1152, 2048], depth [28, 2], heads 16,
    mlp_ratio 4 with SwiGLUFFN(int(2/3 * int(h * 4))) (src/stage2/models/DDT.py), patch 1 on 16 x 16 x 768. RAE
    keeps the Fourier W and the (fixed) pos_embed as nn.Parameters: its W is the one tensor ours stores as a buffer."""
    hid, hid_dh = int(2 / 3 * int(1152 * 4.0)), int(2 / 3 * int(2048 * 4.0))
    rae = official_params(1152, 28, hid, 2048, 2, hid_dh, 256, 768) + 256  # + W (256,)
    ours = DiTDH(dataclasses.replace(PRESETS["ditxl-dh"], tokens=256, channels=768), device="meta")
    assert sum(p.numel() for p in ours.parameters()) + ours.t_embedder.freqs.numel() == rae


def test_meta_construction_allocates_nothing():
    model = DiTDH(PRESETS["ditxl-dh"], device="meta")
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())


# ------------------------------------------------------------------ flow conventions, CFG, learning


def test_time_embedding_is_the_dit_one():
    """Same Gaussian Fourier features of t in [0, 1] (fixed W from time_seed, in the state dict) as models.dit."""
    model = DiTDH(TINY)
    ref = dit.DiT(dit.DiTConfig(width=32, depth=1, heads=2, mlp_hidden=64, tokens=8, channels=6, num_classes=3,
                                time_freqs=16))
    assert torch.equal(model.state_dict()["t_embedder.freqs"], ref.t_embedder.freqs)
    assert "t_embedder.freqs" not in dict(model.named_parameters())
    assert set(model.state_dict()) >= {"pos_embed", "s_embedder.weight", "x_embedder.weight", "s_projector.weight"}
    assert not any("rope" in k for k in model.state_dict())  # fixed tables are recomputed, not stored


def test_cfg_through_the_flow_sampler():
    """w = 1 is the conditional ODE; w = 3 combines the null-class and conditional DiT^DH passes on all channels."""
    model = perturbed()
    g = torch.Generator().manual_seed(2)
    noise, y = torch.randn(4, TINY.tokens, TINY.channels, generator=g), torch.tensor([0, 1, 2, 1])
    grid = flow.time_grid(6, 2.0)
    cond = flow.integrate(lambda x, t: model(x, torch.full((4,), t), y), noise.clone(), grid)
    torch.testing.assert_close(flow.sample(model, y, noise, steps=6, cfg_scale=1.0, kappa=2.0), cond)
    x, t = noise, 0.5
    tt = torch.full((4,), t)
    v_c, v_u = model(x, tt, y), model(x, tt, torch.full_like(y, TINY.null_class))
    guided = flow.guided_velocity(model, x, t, y, 3.0, (0.0, 1.0), model.cfg.null_class)
    torch.testing.assert_close(guided, v_u + 3.0 * (v_c - v_u))
    assert not torch.allclose(guided, v_c)


def test_learns_a_class_conditional_toy_distribution():
    """A few hundred flow-matching steps on CPU: the loss falls and samples move to their class's mean."""
    cfg = dataclasses.replace(TINY, tokens=4, channels=4)
    torch.manual_seed(0)
    model = DiTDH(cfg).train()
    means = torch.randn(cfg.num_classes, cfg.tokens, cfg.channels, generator=torch.Generator().manual_seed(5)) * 2
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(6)
    losses = []
    for _ in range(300):
        y = torch.randint(0, cfg.num_classes, (64,), generator=g)
        z = means[y] + 0.1 * torch.randn(64, cfg.tokens, cfg.channels, generator=g)
        loss = flow.flow_loss(model, z, flow.draw(z, y, 1.0, 0.1, cfg.null_class, g)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.5 * first, (first, last)
    y = torch.arange(cfg.num_classes).repeat_interleave(16)
    z = flow.sample(model.eval(), y, torch.randn(len(y), cfg.tokens, cfg.channels, generator=g), steps=20)
    err = (z - means[y]).pow(2).mean().item()
    spread = (means[y] - means[y].mean(0)).pow(2).mean().item()  # what a class-blind model would be off by
    assert err < 0.1 * spread, (err, spread)


# ------------------------------------------------------------------ invariances, config and checkpoints


def test_grad_checkpointing_same_output_and_grads():
    ref = perturbed().train()
    ckpt = DiTDH(dataclasses.replace(TINY, grad_checkpointing=True)).train()
    ckpt.load_state_dict(ref.state_dict())
    x, t, y = inputs()
    out_ref, out_ck = ref(x, t, y), ckpt(x, t, y)
    torch.testing.assert_close(out_ref, out_ck)
    out_ref.square().sum().backward()
    out_ck.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_samples_are_independent_of_batch():
    model = perturbed()
    x, t, y = inputs(b=4)
    full = model(x, t, y)
    for i in range(4):
        torch.testing.assert_close(model(x[i : i + 1], t[i : i + 1], y[i : i + 1]), full[i : i + 1])


def test_config_round_trip_and_unknown_keys():
    d = config_to_dict(PRESETS["ditxl-dh"])
    assert config_from_dict(json.loads(json.dumps(d))) == PRESETS["ditxl-dh"]
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({**d, "dh_widht": 3})


def write_ckpt(tmp_path, model, ema, arch: str | None):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(model.state_dict(), str(ckpt / "model.safetensors"))
    save_file(ema.state_dict(), str(ckpt / "ema.safetensors"))
    to_dict = dit.config_to_dict if isinstance(model, dit.DiT) else config_to_dict
    full = {"dit": to_dict(model.cfg), "step": 7, **({"arch": arch} if arch else {})}
    (ckpt / "config.json").write_text(json.dumps(full))
    return ckpt


def test_meta_build_and_strict_load_round_trip(tmp_path):
    model, ema = perturbed(seed=0), perturbed(seed=1)
    ckpt = write_ckpt(tmp_path, model, ema, ARCH)
    x, t, y = inputs()
    loaded, full = load_dit_dh(tmp_path)
    assert full["step"] == 7 and not loaded.training and not loaded.rope_cos.is_meta
    torch.testing.assert_close(loaded(x, t, y), ema(x, t, y), rtol=0, atol=0)
    raw, _ = load_generator(ckpt, ema=False)
    assert isinstance(raw, DiTDH)
    torch.testing.assert_close(raw(x, t, y), model(x, t, y), rtol=0, atol=0)
    state = model.state_dict()
    state.pop("head_blocks.1.adaLN_modulation.1.bias")
    save_file(state, str(ckpt / "ema.safetensors"))
    with pytest.raises(RuntimeError, match="head_blocks.1.adaLN_modulation.1.bias"):
        load_dit_dh(ckpt)


def test_load_generator_reads_plain_dit_checkpoints_without_arch(tmp_path):
    cfg = dit.DiTConfig(width=32, depth=1, heads=2, mlp_hidden=64, tokens=8, channels=6, num_classes=3, time_freqs=16)
    torch.manual_seed(0)
    model = dit.DiT(cfg)
    write_ckpt(tmp_path, model, model, arch=None)
    loaded, _ = load_generator(tmp_path)
    assert isinstance(loaded, dit.DiT)
    x, t, y = inputs()
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
