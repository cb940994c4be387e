"""FlatDINO model, loss, weight-decay mask and WSD schedule (models/flatdino.py)."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.flatdino import (
    PRESETS,
    SIZES,
    FlatDINO,
    FlatDINOConfig,
    Posterior,
    Trunk,
    ViTSize,
    config_from_json,
    config_to_json,
    default_kl_weight,
    kl_anneal,
    kl_divergence,
    load_weights,
    param_groups,
    vae_loss,
    wsd_lr,
)
from models.layers import Attention, rope_1d

SMALL = FlatDINOConfig(encoder="micro", decoder="micro", num_tokens=4, latent_dim=8, feature_dim=48, num_patches=16)


def small(**kw) -> FlatDINO:
    torch.manual_seed(0)
    return FlatDINO(FlatDINOConfig(**{**SMALL.__dict__, **kw})).eval()


def test_shapes_and_dtypes():
    model = small()
    tokens = torch.randn(3, 16, 48)
    post = model.encode(tokens)
    assert post.mu.shape == post.logvar.shape == (3, 4, 8)
    out = model(tokens, torch.randn(3, 4, 8))
    assert out.recon.shape == (3, 16, 48) and out.recon.dtype == torch.float32
    assert PRESETS["32-bl-128"].latent_shape == (32, 128)


def test_encoder_readout_is_channel_split_after_registers():
    model = small(encoder_registers=2)
    enc, tokens = model.encoder, torch.randn(2, 16, 48)
    x = torch.cat([enc.registers.expand(2, -1, -1), enc.latent_tokens.expand(2, -1, -1), enc.in_proj(tokens)], 1)
    h = enc.out_proj(enc.trunk(x))  # (B, 2 + T + N, 2F), projected on every token as the official code does
    post = model.encode(tokens)
    torch.testing.assert_close(post.mu, h[:, 2:6, :8])
    torch.testing.assert_close(post.logvar, h[:, 2:6, 8:])


def test_decoder_readout_queries_first_then_latents():
    model = small(decoder_registers=1)
    dec, z = model.decoder, torch.randn(2, 4, 8)
    lat = dec.latent_proj(z) + dec.pos_embed
    x = torch.cat([dec.registers.expand(2, -1, -1), dec.queries.expand(2, -1, -1), lat], 1)
    torch.testing.assert_close(model.decode(z), dec.out_proj(dec.trunk(x))[:, 1:17])


def test_trunk_last_block_computes_only_the_tokens_read_out():
    """`keep` skips the query, MLP and output work of the tokens nobody reads (every token stays a key and value):
    values and gradients equal the full trunk's, sliced, over two blocks."""
    torch.manual_seed(0)
    trunk, keep = Trunk(ViTSize(32, 2, 4, 64), "sdpa"), slice(3, 9)
    for p in trunk.parameters():  # non-trivial norms and biases, so a wrong slice cannot hide behind zeros
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 20, 32, requires_grad=True)
    full = trunk(x)[:, keep]
    g_full = torch.autograd.grad(full.square().sum(), [x, *trunk.parameters()])
    part = trunk(x, keep=keep)
    g_part = torch.autograd.grad(part.square().sum(), [x, *trunk.parameters()])
    assert part.shape == (2, 6, 32)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (g_full[0][:, 12:] != 0).any()  # tokens outside `keep` still feed the kept ones as keys and values


def test_attention_keep_with_rope_matches_the_full_rows():
    torch.manual_seed(0)
    attn, x = Attention(32, 4, qk_norm=True), torch.randn(2, 10, 32)
    rope = rope_1d(8, torch.arange(10))
    torch.testing.assert_close(attn(x, rope, keep=slice(2, 7)), attn(x, rope)[:, 2:7], atol=1e-6, rtol=1e-5)


def test_encoder_has_no_positional_embedding():
    """Without a positional embedding the encoder is invariant to a permutation of the patch tokens."""
    model, tokens = small(), torch.randn(2, 16, 48)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    a, b = model.encode(tokens), model.encode(tokens[:, perm])
    torch.testing.assert_close(a.mu, b.mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logvar, b.logvar, atol=1e-5, rtol=1e-5)


def test_encoder_pos_embed_is_one_table_added_after_the_input_projection():
    """`encoder_pos_embed` (the demo preset's departure): a learned (1, N, width) table added to the projected patch
    tokens, which breaks the permutation invariance above; the paper presets keep none."""
    model, tokens = small(encoder_pos_embed=True), torch.randn(2, 16, 48)
    enc = model.encoder
    assert enc.pos_embed.shape == (1, 16, 64) and enc.pos_embed.std() > 0.01  # initialised like the other tables
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in small().encoder.parameters()) + 16 * 64
    x = torch.cat([enc.latent_tokens.expand(2, -1, -1), enc.in_proj(tokens) + enc.pos_embed], 1)
    h = enc.out_proj(enc.trunk(x))
    torch.testing.assert_close(model.encode(tokens).mu, h[:, :4, :8])
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    assert (model.encode(tokens).mu - model.encode(tokens[:, perm]).mu).abs().max() > 1e-2
    with pytest.raises(ValueError, match="built for 16 patch tokens"):
        model.encode(tokens[:, :8])
    assert PRESETS["demo"].encoder_pos_embed and not any(PRESETS[k].encoder_pos_embed for k in PRESETS if k != "demo")


def test_logvar_init_starts_the_posterior_noise_small_and_changes_nothing_else():
    """`logvar_init` (the demo preset's departure): the logvar half of the read-out LayerNorm's bias starts at the
    given value, so the initial posterior sigma is ~exp(logvar_init / 2) instead of ~1; mu and every other weight
    are those of the plain init. It exists only where the read-out is that LayerNorm (width = 2F)."""
    plain, low = small(latent_dim=32), small(latent_dim=32, logvar_init=-8.0)
    assert isinstance(low.encoder.out_proj, torch.nn.Identity)
    a, b = plain.state_dict(), low.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["encoder.trunk.norm.bias"]
    assert torch.equal(b["encoder.trunk.norm.bias"], torch.cat([torch.zeros(32), torch.full((32,), -8.0)]))
    tokens, noise = torch.randn(3, 16, 48), torch.randn(3, 4, 32)
    p, q = plain.encode(tokens), low.encode(tokens)
    torch.testing.assert_close(q.mu, p.mu)
    torch.testing.assert_close(q.logvar, p.logvar - 8.0)
    z_noise = low(tokens, noise).z - q.mu
    assert 0.005 < z_noise.abs().mean() / noise.abs().mean() < 0.06  # sigma ~ exp(-4) = 0.018, not ~1
    with pytest.raises(ValueError, match="logvar_init"):
        FlatDINOConfig(**{**SMALL.__dict__, "logvar_init": -8.0})  # 2F = 16 != width 64: a projection reads out
    assert PRESETS["demo"].logvar_init < 0 and not any(PRESETS[k].logvar_init for k in PRESETS if k != "demo")


def test_projections_bias_free_and_skipped_at_feature_width():
    model = small()
    assert model.encoder.in_proj.bias is None and model.encoder.out_proj.bias is None
    assert model.decoder.latent_proj.bias is None and model.decoder.out_proj.bias is None
    same = small(feature_dim=64)  # micro width is 64: no input / output projection (the ViT-B case)
    assert isinstance(same.encoder.in_proj, torch.nn.Identity) and isinstance(same.decoder.out_proj, torch.nn.Identity)
    blk = model.encoder.trunk.blocks[0]
    assert blk.attn.qkv.bias is not None and blk.mlp.gate.bias is not None and blk.mlp.gate.out_features == 256
    assert blk.attn.q_norm.bias is None and blk.attn.q_norm.eps == 1e-6


def test_param_counts_match_spec_table():
    """SPEC 4.2: encoder/decoder params for 32 x 128 (t 7.3M, s 28.8M)."""
    with torch.device("meta"):  # shapes only: skips the slow random init
        model = FlatDINO(FlatDINOConfig(encoder="t", decoder="s"))
    assert round(sum(p.numel() for p in model.encoder.parameters()) / 1e5) == 73
    assert round(sum(p.numel() for p in model.decoder.parameters()) / 1e5) == 288


def test_forward_sampling_and_eval_determinism():
    model, tokens, noise = small(), torch.randn(2, 16, 48), torch.randn(2, 4, 8)
    out = model(tokens, noise)
    torch.testing.assert_close(out.z, out.posterior.mu + torch.exp(0.5 * out.posterior.logvar) * noise)
    torch.testing.assert_close(model(tokens).z, model.encode(tokens).mu)
    assert torch.equal(model.encode(tokens).mu, model.encode(tokens).mu)


def test_init_truncated_normal_tables_and_zero_biases():
    model = FlatDINO(PRESETS["demo"])
    q = model.decoder.queries
    assert q.abs().max() <= 0.04 + 1e-7 and 0.012 < q.std() < 0.02
    assert all((b == 0).all() for n, b in model.named_parameters() if n.endswith("qkv.bias"))


def test_kl_matches_closed_form_distribution():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(kl_divergence(Posterior(mu, logvar)), ref)


def test_loss_is_mean_huber_plus_beta_summed_kl():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 16, 48, generator=g)
    recon = target + 2.0 * torch.randn(3, 16, 48, generator=g)  # both Huber regimes present
    post = Posterior(torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g))
    d = (recon - target).abs()
    huber = torch.where(d <= 1, 0.5 * d**2, d - 0.5).mean()
    kl_sum = kl_divergence(post).sum(dim=(1, 2)).mean()
    out = vae_loss(recon, target, post, beta=0.01)
    torch.testing.assert_close(out.recon, huber)
    torch.testing.assert_close(out.total, huber + 0.01 * kl_sum)
    torch.testing.assert_close(out.kl_per_token.sum(), kl_sum)
    floor = vae_loss(recon, target, Posterior(torch.zeros(3, 4, 8), torch.zeros(3, 4, 8)), beta=0.5, free_bits=0.25)
    torch.testing.assert_close(floor.total, huber + 0.5 * 0.25 * 32)  # KL is 0 everywhere, floored to 0.25


def test_default_beta():
    assert default_kl_weight(32, 128) == pytest.approx(1.25e-7, rel=1e-12)
    assert default_kl_weight(32, 64) == pytest.approx(2.5e-7, rel=1e-12)
    assert PRESETS["32-bl-128"].default_kl_weight == pytest.approx(1.25e-7, rel=1e-12)
    assert kl_anneal(0, 0) == 1.0 and kl_anneal(250, 1000) == 0.25 and kl_anneal(5000, 1000) == 1.0


def test_weight_decay_mask_is_exactly_the_2d_weights():
    model = small(encoder_registers=1, decoder_registers=1)
    decay, rest = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert decayed == linear_weights and decay["weight_decay"] == 0.02 and rest["weight_decay"] == 0.0
    excluded = {names[id(p)] for p in rest["params"]}
    assert {"encoder.latent_tokens", "decoder.queries", "decoder.pos_embed", "encoder.registers"} <= excluded
    assert len(decayed) + len(excluded) == len(names)


def test_wsd_schedule_boundaries_fast_variant():
    """SPEC 5.2 'fast': 125,113 updates, 12,510 warmup, 12,510 decay starting at 112,603."""
    lr = lambda s: wsd_lr(s, total=125_113, warmup=12_510, decay=12_510, init=1e-6, peak=1e-4, final=1e-8)
    assert lr(0) == 1e-6
    assert lr(6_255) == pytest.approx((1e-6 + 1e-4) / 2)
    assert lr(12_510) == 1e-4 and lr(112_603) == 1e-4
    assert lr(112_603 + 6_255) == pytest.approx((1e-4 + 1e-8) / 2)
    assert lr(125_113) == pytest.approx(1e-8) and lr(10**6) == pytest.approx(1e-8)
    assert all(lr(s) >= lr(s + 1) for s in range(112_600, 125_113, 97))


def test_tiny_vae_overfits_a_handful_of_feature_maps():
    torch.manual_seed(0)
    model = FlatDINO(SMALL).train()
    tokens = F.layer_norm(torch.randn(8, 16, 48), (48,))  # DINO-like: per-token standardised
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=3e-3)
    noise_g = torch.Generator().manual_seed(1)
    first = None
    for _ in range(150):
        out = model(tokens, torch.randn(8, 4, 8, generator=noise_g))
        loss = vae_loss(out.recon, tokens, out.posterior, beta=default_kl_weight(4, 8))
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        first = loss.recon.item() if first is None else first
    with torch.no_grad():
        final = F.huber_loss(model.eval()(tokens).recon, tokens).item()
    assert final < first / 10, (first, final)


def test_load_weights_strict(tmp_path):
    import json

    from safetensors.torch import save_file

    model = small()
    (tmp_path / "config.json").write_text(json.dumps({"model": SMALL.__dict__}))
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    loaded, cfg = load_weights(tmp_path)
    tokens = torch.randn(1, 16, 48)
    assert cfg == SMALL and torch.equal(loaded.encode(tokens).mu, model.encode(tokens).mu)
    save_file({k: v for k, v in model.state_dict().items() if "queries" not in k}, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="queries"):
        load_weights(tmp_path)


def test_demo_preset_keeps_paper_ratios():
    cfg = PRESETS["demo"]
    assert cfg.num_patches // cfg.num_tokens == 8
    assert math.isclose(cfg.num_patches * cfg.feature_dim / (cfg.num_tokens * cfg.latent_dim), 48)


def test_standardize_feeds_the_encoder_floored_standardised_features():
    """`standardize=True` (the demo's departure) is exactly the plain encoder on (X - mean) / max(std, 0.1)."""
    plain, standard = small(), small(standardize=True)
    standard.load_state_dict(plain.state_dict(), strict=False)  # same weights; the statistics buffers stay
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(16, 48, generator=g), torch.rand(16, 48, generator=g) * 0.5  # some below the floor
    standard.set_feature_stats(mean, std)
    x = torch.randn(2, 16, 48, generator=g)
    torch.testing.assert_close(standard.encode(x).mu, plain.encode((x - mean) / std.clamp_min(0.1)).mu)
    assert torch.equal(standard.decode(torch.ones(1, 4, 8)), plain.decode(torch.ones(1, 4, 8)))  # target: raw X
    assert {"encoder.feature_mean", "encoder.feature_scale"} <= set(standard.state_dict())  # saved with weights
    with pytest.raises(ValueError, match="standardize=True"):
        plain.set_feature_stats(mean, std)


def test_standardized_models_measure_the_reconstruction_in_standardised_units():
    """With `standardize=True` the loss sees (X - mean) / scale: an error in a channel that barely varies between
    images costs as much as a large one in a channel that varies a lot; plain models keep the paper's raw loss."""
    plain, standard = small(), small(standardize=True)
    mean = torch.full((16, 48), 3.0)
    std = torch.ones(16, 48)
    std[:, :24] = 0.2
    standard.set_feature_stats(mean, std)
    x = torch.randn(2, 16, 48)
    assert plain.loss_units(x) is x
    torch.testing.assert_close(standard.loss_units(x), (x - 3.0) / standard.encoder.feature_scale)
    err = torch.zeros_like(x)
    err[..., 0], err[..., 30] = 0.1, 0.5  # 0.1 where std is 0.2, 0.5 where std is 1: the same in standard units
    d = standard.loss_units(x + err) - standard.loss_units(x)
    torch.testing.assert_close(d[..., 0], d[..., 30])


# ------------------------------------------------------------------ projections only between different sizes


def analytic_side_params(size: str, depth: int, extra: int) -> int:
    """Parameters of one side from SPEC 4.1-4.2 dims: blocks + final LN + `extra` (tokens, projections)."""
    s = SIZES[size]
    w, h, hd = s.width, s.mlp_hidden, s.width // s.heads
    block = 2 * w + (3 * w * w + 3 * w) + 2 * hd + (w * w + w) + 2 * w + (3 * w * h + 2 * h + w)
    return depth * block + 2 * w + extra


def test_encoder_out_proj_is_identity_when_width_is_2f():
    """Official ViTEncoder: output_proj only when output_dim != width. micro width 64 = 2 x 32."""
    model = small(latent_dim=32)  # width 64, D = 48, T = 4
    enc = model.encoder
    assert isinstance(enc.out_proj, torch.nn.Identity) and isinstance(enc.in_proj, torch.nn.Linear)
    assert "encoder.out_proj.weight" not in model.state_dict()
    w = 64
    expected = analytic_side_params("micro", 1, extra=48 * w + 4 * w)  # in_proj + latent tokens, no out_proj
    assert sum(p.numel() for p in enc.parameters()) == expected
    tokens = torch.randn(2, 16, 48)
    h = enc.trunk(torch.cat([enc.latent_tokens.expand(2, -1, -1), enc.in_proj(tokens)], 1))  # (B, T + N, 64)
    post = model.encode(tokens)
    torch.testing.assert_close(post.mu, h[:, :4, :32])  # the final LayerNorm's channels are mu | logvar
    torch.testing.assert_close(post.logvar, h[:, :4, 32:])
    assert model(tokens, torch.randn(2, 4, 32)).recon.shape == (2, 16, 48)


def test_decoder_latent_proj_is_identity_when_f_is_width():
    model = small(latent_dim=64)  # decoder F = width = 64; the encoder now projects 64 -> 128
    dec = model.decoder
    assert isinstance(dec.latent_proj, torch.nn.Identity) and isinstance(model.encoder.out_proj, torch.nn.Linear)
    w = 64
    expected = analytic_side_params("micro", 1, extra=4 * w + 16 * w + w * 48)  # pos_embed, queries, out_proj
    assert sum(p.numel() for p in dec.parameters()) == expected
    z = torch.randn(2, 4, 64)
    x = torch.cat([dec.queries.expand(2, -1, -1), z + dec.pos_embed], 1)
    torch.testing.assert_close(model.decode(z), dec.out_proj(dec.trunk(x))[:, :16])


def test_demo_preset_encoder_ends_in_its_layernorm():
    """The demo (micro width 64, F = 32) has no encoder output projection since this change."""
    with torch.device("meta"):
        model = FlatDINO(PRESETS["demo"])
    assert isinstance(model.encoder.out_proj, torch.nn.Identity)
    assert isinstance(model.decoder.latent_proj, torch.nn.Linear)  # 32 -> 64


def test_load_weights_explains_a_checkpoint_with_a_legacy_projection(tmp_path):
    from safetensors.torch import save_file

    cfg = dataclasses.replace(SMALL, latent_dim=32)
    model = small(latent_dim=32)
    state = {**model.state_dict(), "encoder.out_proj.weight": torch.zeros(64, 64)}
    (tmp_path / "config.json").write_text(json.dumps({"model": config_to_json(cfg)}))
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="re-run `flatdino train-vae`"):
        load_weights(tmp_path)


# ------------------------------------------------------------------ -hl, -tanh, -klvarN


def test_config_json_without_new_fields_still_loads():
    """config.json files written before `half_depth` / `tanh` existed rebuild the same model."""
    old = {k: v for k, v in config_to_json(PRESETS["demo"]).items() if k not in ("half_depth", "tanh")}
    cfg = config_from_json(json.loads(json.dumps(old)))
    assert cfg == PRESETS["demo"] and not cfg.half_depth and not cfg.tanh


def test_half_depth_halves_both_sides():
    with torch.device("meta"):
        model = FlatDINO(FlatDINOConfig(encoder="b", decoder="l", half_depth=True))
        full = FlatDINO(FlatDINOConfig(encoder="b", decoder="l"))
    assert len(model.encoder.trunk.blocks) == 6 and len(model.decoder.trunk.blocks) == 12  # 12 // 2, 24 // 2
    assert len(full.encoder.trunk.blocks) == 12 and len(full.decoder.trunk.blocks) == 24
    enc_extra = 768 * 256 + 32 * 768  # out_proj 768 -> 2 x 128, latent tokens (no in_proj at width 768)
    assert sum(p.numel() for p in model.encoder.parameters()) == analytic_side_params("b", 6, enc_extra)
    assert small(half_depth=True).cfg.encoder_size.depth == 1  # max(1, 1 // 2)


def test_tanh_squashes_the_sample_and_mu_but_not_the_posterior():
    plain, squashed = small(), small(tanh=True)
    squashed.load_state_dict(plain.state_dict())
    tokens, noise = torch.randn(2, 16, 48), torch.randn(2, 4, 8)
    post = plain.encode(tokens)
    out = squashed(tokens, noise)
    torch.testing.assert_close(out.posterior.mu, post.mu)  # KL stays on the untransformed posterior
    torch.testing.assert_close(out.z, torch.tanh(post.mu + torch.exp(0.5 * post.logvar) * noise))
    torch.testing.assert_close(out.recon, plain.decode(out.z))
    torch.testing.assert_close(squashed.latents(tokens), torch.tanh(post.mu))
    torch.testing.assert_close(squashed(tokens).z, torch.tanh(post.mu))
    assert squashed.latents(tokens).abs().max() < 1 and not torch.equal(squashed.latents(tokens), post.mu)
    assert torch.equal(plain.latents(tokens), post.mu)


def test_kl_variance_term_matches_an_independent_computation():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(3, 16, 48, generator=g)
    recon = target + torch.randn(3, 16, 48, generator=g)
    mu, logvar = 2 * torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    beta, w, fb = 0.01, 1e-3, 0.2
    base = vae_loss(recon, target, Posterior(mu, logvar), beta=beta, free_bits=fb)
    out = vae_loss(recon, target, Posterior(mu, logvar), beta=beta, free_bits=fb, kl_var_weight=w)
    kl = (0.5 * (logvar.exp() + mu**2 - 1 - logvar)).double().numpy()
    variances = []
    for b in range(3):  # population variance over tokens of the floored per-token sums
        per_token = [sum(max(kl[b, t, f], fb) for f in range(8)) for t in range(4)]
        m = sum(per_token) / 4
        variances.append(sum((v - m) ** 2 for v in per_token) / 4)
    expected_var = sum(variances) / 3
    assert out.kl_var.item() == pytest.approx(expected_var, rel=1e-5) and expected_var > 1
    assert out.total.item() == pytest.approx(base.total.item() + beta * w * expected_var, rel=1e-6)
    assert torch.equal(base.kl_var, out.kl_var)
    # weight 0 (the default) is today's loss exactly
    huber = F.huber_loss(recon, target)
    torch.testing.assert_close(base.total, huber + beta * torch.from_numpy(kl).clamp_min(fb).sum((1, 2)).mean().float())


def test_kl_variance_gradient_flows_when_weighted():
    mu = torch.randn(2, 4, 8, requires_grad=True)
    post = Posterior(mu, torch.zeros(2, 4, 8))
    x = torch.zeros(2, 16, 48)
    vae_loss(x, x, post, beta=1.0, kl_var_weight=1.0).total.backward()
    g_var = mu.grad.clone()
    mu.grad = None
    vae_loss(x, x, post, beta=1.0).total.backward()
    assert not torch.allclose(g_var, mu.grad)  # the variance term pushes tokens towards equal KL
