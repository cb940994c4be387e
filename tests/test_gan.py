"""The adversarial pieces of pixel-decoder training: DINO discriminator, DiffAugment, hinge losses, adaptive weight.

Everything runs offline from real classes (transformers' ViTModel, diffusers' RAE decoder) with small random configs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from models.discriminator import (PRESETS, BatchNormLocal, DinoDiscriminator, DiscriminatorConfig, build_discriminator,
                                  build_heads, default_key_depths, init_backbone_dir, load_backbone,
                                  load_discriminator)
from pipeline.gan import (DiffAugDraw, DiffAugPolicy, GANConfig, adaptive_weight, apply_diff_augment, diff_augment,
                          disc_lr, disc_optimizer, discriminator_loss, draw_diff_augment, gan_phase,
                          generator_adv_loss, generator_gan_loss, hinge_d_loss, quantize_pm1)
from pipeline.manifest import ArtifactError

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
OFF = DiffAugPolicy(prob=1.0, translation=0.0, color=False, cutout=0.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b=2, h=16, w=16, seed=0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=gen(seed)) * 2 - 1


@pytest.fixture(scope="module")
def disc() -> DinoDiscriminator:
    return build_discriminator("tiny", seed=0)


# ---------------------------------------------------------------- losses


def test_hinge_and_generator_losses_match_the_formula():
    real = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.5, 0.9]])
    fake = torch.tensor([[-2.0, -0.5, 1.0], [0.3, -1.2, 0.0]])
    ref_real = sum(max(0.0, 1.0 - v) for v in real.flatten().tolist()) / real.numel()  # 0.5+0+2, 1+0+0.1 -> 3.6/6
    ref_fake = sum(max(0.0, 1.0 + v) for v in fake.flatten().tolist()) / fake.numel()  # 0+0.5+2, 1.3+0+1 -> 4.8/6
    assert ref_real == pytest.approx(0.6) and ref_fake == pytest.approx(0.8)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (ref_real + ref_fake), abs=1e-7)
    assert generator_adv_loss(fake).item() == pytest.approx(-sum(fake.flatten().tolist()) / 6, abs=1e-7)
    # a perfect discriminator beyond the margins has zero loss; the generator's loss keeps pushing
    assert hinge_d_loss(torch.full((2, 3), 1.5), torch.full((2, 3), -1.5)).item() == 0.0
    assert generator_adv_loss(torch.full((2, 3), -1.5)).item() == 1.5


def _fd_grad_norm(loss_fn, w: torch.Tensor, h: float = 1e-6) -> float:
    """||d loss / d w|| by central finite differences, one element at a time (float64)."""
    total = 0.0
    for i in range(w.numel()):
        wp, wm = w.clone(), w.clone()
        wp.view(-1)[i] += h
        wm.view(-1)[i] -= h
        total += ((loss_fn(wp) - loss_fn(wm)).item() / (2 * h)) ** 2
    return math.sqrt(total)


def test_adaptive_weight_is_the_ratio_of_finite_difference_gradient_norms():
    g = gen(0)
    x, target = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a = torch.randn(3, generator=g, dtype=torch.float64)
    rec_fn = lambda w: ((x @ w.T - target) ** 2).mean() + 0.1 * (x @ w.T).sin().mean()
    gan_fn = lambda w: -torch.tanh((x @ w.T) * a).mean()
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    rec, gan = rec_fn(w), gan_fn(w)
    got = adaptive_weight(rec, gan, w)
    with torch.no_grad():
        ref = _fd_grad_norm(rec_fn, w.detach()) / (_fd_grad_norm(gan_fn, w.detach()) + 1e-6)
    assert got.item() == pytest.approx(ref, rel=1e-6)
    assert not got.requires_grad and ref > 0
    (rec + got * gan).backward()  # both graphs were retained
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_adaptive_weight_clamps_and_uses_the_official_epsilon():
    w = torch.ones(2, 2, requires_grad=True)
    rec = (w * 3.0).sum()  # ||grad|| = 6
    assert adaptive_weight(rec, (w * 0.0).sum(), w, max_weight=1e9).item() == pytest.approx(6 / 1e-6, rel=1e-5)
    assert adaptive_weight(rec, (w * 0.0).sum(), w).item() == 1e4  # the default clamp
    assert adaptive_weight(rec, (w * 1.5).sum(), w).item() == pytest.approx(6 / (3 + 1e-6), rel=1e-6)


# ---------------------------------------------------------------- DiffAugment


def test_diff_augment_is_a_pure_function_of_the_generator():
    x = images(3, 24, 20)
    torch.manual_seed(123)
    a = diff_augment(x, DiffAugPolicy(cutout=0.25), gen(7))
    torch.manual_seed(456)  # the global RNG plays no part
    b = diff_augment(x, DiffAugPolicy(cutout=0.25), gen(7))
    c = diff_augment(x, DiffAugPolicy(cutout=0.25), gen(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(diff_augment(x, DiffAugPolicy(prob=0.0, cutout=0.25), gen(7)), x)  # prob 0: identity


def test_draw_ranges_match_the_official_parameters():
    B, H, W = 4000, 32, 24
    d = draw_diff_augment((B, 3, H, W), DiffAugPolicy(cutout=0.2), gen(0))
    assert d.translate and d.color and d.cutout  # prob 1.0: every op on
    dh, dw = round(H * 0.125), round(W * 0.125)  # 4, 3
    assert (d.shift_h.min().item(), d.shift_h.max().item()) == (-dh, dh)
    assert (d.shift_w.min().item(), d.shift_w.max().item()) == (-dw, dw)
    assert set(d.shift_h.tolist()) == set(range(-dh, dh + 1))  # every integer shift occurs
    assert -0.5 <= d.brightness.min() < -0.49 and 0.49 < d.brightness.max() < 0.5
    assert 0.0 <= d.saturation.min() < 0.01 and 1.99 < d.saturation.max() < 2.0
    assert 0.5 <= d.contrast.min() < 0.51 and 1.49 < d.contrast.max() < 1.5
    ch = round(H * 0.2)  # 6 (even) -> centres in [0, H + 1 - 0) = [0, 32]
    assert (d.cutout_h.min().item(), d.cutout_h.max().item()) == (0, H + (1 - ch % 2) - 1)
    # one draw per op per batch: with prob 0.5 some calls skip an op
    coins = [draw_diff_augment((1, 3, 8, 8), DiffAugPolicy(prob=0.5), g)[:2] for g in [gen(0)] for _ in range(40)]
    assert {c[0] for c in coins} == {True, False} and {c[1] for c in coins} == {True, False}


def _draw(B, **kw) -> DiffAugDraw:
    base = dict(translate=False, color=False, cutout=False, shift_h=torch.zeros(B, dtype=torch.long),
                shift_w=torch.zeros(B, dtype=torch.long), brightness=torch.zeros(B), saturation=torch.ones(B),
                contrast=torch.ones(B), cutout_h=torch.zeros(B, dtype=torch.long),
                cutout_w=torch.zeros(B, dtype=torch.long))
    return DiffAugDraw(**{**base, **kw})


def test_translation_shifts_content_by_the_drawn_amount_with_zero_fill():
    x = images(2, 12, 10)
    d = _draw(2, translate=True, shift_h=torch.tensor([3, -2]), shift_w=torch.tensor([-4, 1]))
    out = apply_diff_augment(x, d, DiffAugPolicy())
    for b, (sh, sw) in enumerate([(3, -4), (-2, 1)]):
        for i in range(12):
            for j in range(10):
                src_i, src_j = i + sh, j + sw
                inside = 0 <= src_i < 12 and 0 <= src_j < 10
                want = x[b, :, src_i, src_j] if inside else torch.zeros(3)
                assert torch.equal(out[b, :, i, j], want), (b, i, j)
    # a drawn call shifts by the draw it reports
    policy = DiffAugPolicy(color=False)
    drawn = draw_diff_augment(x.shape, policy, gen(3))
    assert torch.equal(diff_augment(x, policy, gen(3)), apply_diff_augment(x, drawn, policy))
    sh, sw = drawn.shift_h[0].item(), drawn.shift_w[0].item()
    ref = torch.zeros_like(x[0])
    ref[:, max(0, -sh):12 - max(0, sh), max(0, -sw):10 - max(0, sw)] = \
        x[0][:, max(0, sh):12 + min(0, sh), max(0, sw):10 + min(0, sw)]
    assert torch.equal(diff_augment(x, policy, gen(3))[0], ref)


def test_cutout_zeroes_a_rectangle_of_the_configured_size():
    x = torch.ones(3, 3, 20, 20)
    policy = DiffAugPolicy(translation=0.0, color=False, cutout=0.25)  # 5 x 5
    d = _draw(3, cutout=True, cutout_h=torch.tensor([10, 0, 19]), cutout_w=torch.tensor([7, 0, 19]))
    out = apply_diff_augment(x, d, policy)
    zero = out[:, 0] == 0
    assert torch.equal(out[:, 1:] == 0, zero[:, None].expand(-1, 2, -1, -1))  # the same mask on every channel
    assert zero[0].sum() == 25 and zero[0, 8:13, 5:10].all()  # centred: rows 10-2..10+2, cols 7-2..7+2
    assert zero[1].sum() == 9 and zero[1, :3, :3].all()  # clipped at the corner
    assert zero[2].sum() == 9 and zero[2, 17:, 17:].all()
    out = diff_augment(x, policy, gen(0))  # drawn: one 5 x 5 square (or clipped) per image, zeros only there
    for b in range(3):
        rows, cols = (out[b, 0] == 0).nonzero(as_tuple=True)
        assert 0 < len(rows) <= 25 and len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert (out[out != 0] == 1).all()


def test_color_ops_change_brightness_saturation_and_contrast_as_configured():
    x = images(2, 8, 8) * 0.5
    policy = DiffAugPolicy()
    bright = apply_diff_augment(x, _draw(2, color=True, brightness=torch.tensor([0.3, -0.4])), policy)
    assert torch.allclose(bright, x + torch.tensor([0.3, -0.4]).view(2, 1, 1, 1), atol=1e-6)
    s = torch.tensor([0.0, 1.7])
    sat = apply_diff_augment(x, _draw(2, color=True, saturation=s), policy)
    m = x.mean(1, keepdim=True)
    assert torch.allclose(sat.mean(1, keepdim=True), m, atol=1e-6)  # per-pixel grey level kept
    assert torch.allclose(sat - m, (x - m) * s.view(2, 1, 1, 1), atol=1e-6)  # chroma scaled (0 = greyscale)
    c = torch.tensor([0.5, 1.4])
    con = apply_diff_augment(x, _draw(2, color=True, contrast=c), policy)
    mi = x.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(con.mean((1, 2, 3), keepdim=True), mi, atol=1e-6)
    assert torch.allclose(con - mi, (x - mi) * c.view(2, 1, 1, 1), atol=1e-6)
    # a drawn colour op is the three in the official order with the drawn factors
    d = draw_diff_augment(x.shape, DiffAugPolicy(translation=0.0), gen(5))
    y = x + d.brightness.view(2, 1, 1, 1)
    y = (y - y.mean(1, keepdim=True)) * d.saturation.view(2, 1, 1, 1) + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * d.contrast.view(2, 1, 1, 1) + y.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(diff_augment(x, DiffAugPolicy(translation=0.0), gen(5)), y, atol=1e-6)


def test_gradients_flow_through_diff_augment():
    x = images(2, 12, 12).requires_grad_(True)
    d = _draw(2, translate=True, shift_h=torch.tensor([2, 0]), shift_w=torch.tensor([0, -3]))
    apply_diff_augment(x, d, DiffAugPolicy()).sum().backward()
    want = torch.zeros(2, 3, 12, 12)
    want[0, :, 2:, :] = 1  # rows 0-1 of image 0 left the frame
    want[1, :, :, :9] = 1  # columns 9-11 of image 1 left the frame
    assert torch.equal(x.grad, want)
    x.grad = None
    out = diff_augment(x, DiffAugPolicy(cutout=0.3), gen(1))
    (out ** 2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_one_draw_can_augment_real_and_fake_alike_and_official_draws_are_independent():
    real, fake = images(2, 16, 16, seed=0), images(2, 16, 16, seed=1)
    spatial = DiffAugPolicy(color=False, cutout=0.25)  # translation + cutout: linear in the image for a fixed draw
    d = draw_diff_augment(real.shape, spatial, gen(0))
    assert d.translate and d.cutout and (d.shift_h != 0).any()
    shared = apply_diff_augment(real, d, spatial) - apply_diff_augment(fake, d, spatial)
    assert torch.allclose(shared, apply_diff_augment(real - fake, d, spatial), atol=1e-6)  # the same transform
    # consecutive draws from one generator (fake, then real, as the official step) are different transforms
    g = gen(0)
    d1, d2 = draw_diff_augment(fake.shape, spatial, g), draw_diff_augment(real.shape, spatial, g)
    assert not (torch.equal(d1.shift_h, d2.shift_h) and torch.equal(d1.shift_w, d2.shift_w))
    indep = apply_diff_augment(real, d2, spatial) - apply_diff_augment(fake, d1, spatial)
    assert not torch.allclose(indep, apply_diff_augment(real - fake, d1, spatial), atol=1e-3)


# ---------------------------------------------------------------- discriminator


def test_presets_and_key_depths():
    vits8 = PRESETS["dino-vits8"]
    assert (vits8.hidden_size, vits8.num_hidden_layers, vits8.num_attention_heads, vits8.intermediate_size,
            vits8.patch_size, vits8.image_size, vits8.layer_norm_eps) == (384, 12, 6, 1536, 8, 224, 1e-12)
    assert (vits8.key_depths, vits8.kernel_size, vits8.norm_eps, vits8.virtual_bs) == ((2, 5, 8, 11), 9, 1e-6, 1)
    assert vits8.num_patches == 784 and vits8.num_outputs == 5 * 784
    assert default_key_depths(12) == (2, 5, 8, 11) and default_key_depths(4) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="key_depths"):
        DiscriminatorConfig(num_hidden_layers=4, key_depths=(2, 5))
    with pytest.raises(ValueError, match="odd"):
        DiscriminatorConfig(kernel_size=4)


def test_output_shape_and_resize(disc):
    cfg = disc.cfg
    for size in (64, 80, 48):
        assert disc(images(3, size, size)).shape == (3, cfg.num_outputs) == (3, 5 * 64)
    x = images(2, 80, 80)
    want = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(disc.preprocess(x), ((want + 1) / 2 - MEAN) / STD, atol=1e-6)
    rae_resize = build_heads(disc.backbone, replace(cfg, resize="rae"), seed=0)  # RAE's: no antialias
    want = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(rae_resize.preprocess(x), ((want + 1) / 2 - MEAN) / STD, atol=1e-6)
    assert not torch.allclose(rae_resize.preprocess(x), disc.preprocess(x), atol=1e-3)


def test_dino_vits8_preset_builds_the_real_architecture():
    d = build_discriminator("dino-vits8", seed=0)
    assert sum(p.numel() for p in d.backbone.parameters()) == 21_670_272  # DINO ViT-S/8 without the pooler
    per_head = (384 * 384 * 1 + 384 + 2 * 384) + (384 * 384 * 9 + 384 + 2 * 384) + (384 + 1)
    assert sum(p.numel() for p in d.trainable_parameters()) == 5 * per_head
    with torch.no_grad():
        assert d(images(1, 256, 256)).shape == (1, 5 * 28 * 28)


def test_taps_are_the_vit_hidden_states_without_cls(disc):
    x = images(2, 64, 64)
    pixels = ((x + 1) / 2 - MEAN) / STD  # 64 px: no resize
    out = disc.backbone(pixel_values=pixels, output_hidden_states=True)
    taps = disc.taps(x)
    assert len(taps) == 5
    assert torch.allclose(taps[0], out.hidden_states[-1][:, 1:].transpose(1, 2), atol=1e-5)  # before the final LN
    assert not torch.allclose(taps[0], out.last_hidden_state[:, 1:].transpose(1, 2), atol=1e-3)
    for tap, d in zip(taps[1:], (0, 1, 2, 3)):
        assert torch.allclose(tap, out.hidden_states[d + 1][:, 1:].transpose(1, 2), atol=1e-5)


def test_batchnorm_local_matches_per_group_statistics():
    x = torch.randn(4, 6, 10, generator=gen(0)) * 3 + 1
    for vbs in (1, 2):
        bn = BatchNormLocal(6, virtual_bs=vbs, eps=1e-6)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, 6))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, 6))
        ref = torch.empty_like(x)
        for g in range(4 // vbs):
            for c in range(6):
                v = x[g * vbs:(g + 1) * vbs, c]  # (vbs, N): samples of the group x tokens
                mean, var = v.mean(), ((v - v.mean()) ** 2).mean()
                ref[g * vbs:(g + 1) * vbs, c] = (v - mean) / math.sqrt(var + 1e-6) * bn.weight[c] + bn.bias[c]
        assert torch.allclose(bn(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match="virtual_bs"):
        BatchNormLocal(6, virtual_bs=3)(x)


def _sn_weight(conv) -> torch.Tensor:
    """Spectrally-normalised weight from the stored power-iteration vectors: W / (u^T W v)."""
    p = conv.parametrizations.weight
    w = p.original
    sigma = torch.dot(p[0]._u, w.flatten(1) @ p[0]._v)
    return w / sigma


def test_head_matches_an_explicit_computation(disc):
    disc.eval()
    head, k = disc.heads[2], disc.cfg.kernel_size
    t = torch.randn(2, 64, 64, generator=gen(0))

    def block(x, b, ks):
        x = F.pad(x, (ks // 2, ks // 2), mode="circular")
        x = F.conv1d(x, _sn_weight(b.conv), b.conv.bias)
        m, v = x.mean(2, keepdim=True), x.var(2, unbiased=False, keepdim=True)  # virtual_bs 1: per sample
        x = (x - m) / torch.sqrt(v + 1e-6) * b.norm.weight[:, None] + b.norm.bias[:, None]
        return torch.where(x >= 0, x, 0.2 * x)

    with torch.no_grad():
        h = block(t, head.block, 1)
        h = (block(h, head.residual.fn, k) + h) / math.sqrt(2)
        ref = F.conv1d(h, _sn_weight(head.proj), head.proj.bias)[:, 0]
        assert torch.allclose(head(t), ref, atol=1e-5)
        w = head.residual.fn.conv.parametrizations.weight.original.flatten(1)
        sigma = torch.dot(head.residual.fn.conv.parametrizations.weight[0]._u, w @ head.residual.fn.conv.
                          parametrizations.weight[0]._v)
        assert sigma.item() == pytest.approx(torch.linalg.matrix_norm(w, 2).item(), rel=0.05)  # 15 init steps


def test_backbone_frozen_heads_train():
    disc = build_discriminator("tiny", seed=0)  # its own: a train-mode forward moves the spectral-norm vectors
    disc.train()
    assert disc.training and not disc.backbone.training
    assert not any(m.training for m in disc.backbone.modules())
    assert all(m.training for m in disc.heads.modules())
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    head_ids = {id(p) for p in disc.heads.parameters()}
    assert {id(p) for p in disc.trainable_parameters()} == head_ids
    assert {id(p) for p in disc.parameters() if p.requires_grad} == head_ids
    x = images(2, 64, 64).requires_grad_(True)
    disc.zero_grad(set_to_none=True)
    disc(x).mean().backward()
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())
    assert x.grad.abs().sum() > 0  # the generator's gradient reaches the images through the frozen ViT


def test_spectral_norm_vectors_update_only_in_train_mode():
    d = build_discriminator("tiny", seed=1)
    u = d.heads[0].residual.fn.conv.parametrizations.weight[0]._u  # (D,): the k-conv's left singular vector
    before = u.clone()
    d.eval()
    with torch.no_grad():
        d(images(2, 64, 64))
    assert torch.equal(u, before)
    d.train()
    with torch.no_grad():
        d(images(2, 64, 64))
    assert not torch.equal(u, before)


def test_state_dict_round_trip_is_bitwise_including_spectral_norm_vectors(tmp_path):
    from safetensors.torch import load_file, save_file

    a = build_discriminator("tiny", seed=0)
    opt = disc_optimizer(a)
    a.train()
    for s in range(2):  # a couple of real updates: weights, Adam state and the power-iteration vectors move
        loss, _ = discriminator_loss(a, images(2, 64, 64, seed=s), images(2, 64, 64, seed=10 + s), DiffAugPolicy(),
                                     gen(s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    state = a.state_dict()
    assert sum(k.endswith(("._u", "._v")) for k in state) == 2 * 3 * 5  # u and v of 3 convs in each of 5 heads
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "disc.safetensors")
    heads = {k: v.clone() for k, v in a.heads.state_dict().items()}

    b = build_discriminator("tiny", seed=1)  # other heads and backbone
    b.load_state_dict(load_file(tmp_path / "disc.safetensors"), strict=True)
    c = build_heads(a.backbone, a.cfg, seed=2)  # same backbone, other heads: the heads' state alone suffices
    c.heads.load_state_dict(heads, strict=True)
    x = images(2, 64, 64, seed=99)
    for m in (a, b, c):
        m.eval()
    with torch.no_grad():
        ref = a(x)
        assert torch.equal(b(x), ref) and torch.equal(c(x), ref)
        for m in (a, b, c):
            m.train()
        ref_train = a(x)  # one more power iteration each: still identical
        assert torch.equal(b(x), ref_train) and torch.equal(c(x), ref_train)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_load_discriminator_from_a_local_directory(tmp_path):
    disc = build_discriminator("tiny", seed=0)
    root = init_backbone_dir(tmp_path / "vit", "tiny", seed=0)
    loaded = load_discriminator(root, seed=0, kernel_size=3)
    assert loaded.cfg == disc.cfg
    for k, v in disc.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[k], v), k
    assert loaded.backbone_fingerprint == disc.backbone_fingerprint
    assert not loaded.backbone.training and not any(p.requires_grad for p in loaded.backbone.parameters())
    x = images(2, 64, 64)
    disc.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), disc(x))  # same backbone and same seeded heads
    assert load_discriminator(root).cfg.kernel_size == 9  # official default


LEGACY = [("layers.", "encoder.layer."), ("attention.q_proj", "attention.attention.query"),
          ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
          ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
          ("mlp.fc2", "output.dense")]


def test_load_backbone_from_a_pytorch_model_bin_in_the_released_layout(tmp_path, disc):
    """facebook/dino-vits8's layout: transformers-4 key names, pytorch_model.bin, with a pooler we do not use."""
    import json

    state = {}
    for k, v in disc.backbone.state_dict().items():
        for new, old in LEGACY:
            k = k.replace(new, old)
        state[k] = v.clone()
    state["pooler.dense.weight"], state["pooler.dense.bias"] = torch.zeros(64, 64), torch.zeros(64)
    (tmp_path / "vit").mkdir()
    torch.save(state, tmp_path / "vit" / "pytorch_model.bin")
    (tmp_path / "vit" / "config.json").write_text(json.dumps({**disc.cfg.vit_config().to_dict(),
                                                              "architectures": ["ViTModel"]}))
    backbone = load_backbone(tmp_path / "vit")
    for k, v in disc.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[k], v), k
    # a checkpoint that lacks a block the config promises is refused, not half-loaded
    del state["encoder.layer.3.attention.attention.query.weight"]
    torch.save(state, tmp_path / "vit" / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match="missing"):
        load_backbone(tmp_path / "vit")
    state["encoder.layer.3.attention.attention.query.weight"] = disc.backbone.layers[3].attention.q_proj.weight
    state["head.weight"] = torch.zeros(3)  # weights of something else: refused too (only a pooler may be left over)
    torch.save(state, tmp_path / "vit" / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match=r"unexpected \['head.weight'\]"):
        load_backbone(tmp_path / "vit")
    (tmp_path / "vit" / "pytorch_model.bin").unlink()  # a config without weights
    with pytest.raises(ArtifactError, match="from the local directory"):
        load_backbone(tmp_path / "vit")


def test_load_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ArtifactError, match="no such directory, and not a hub id"):
        load_discriminator(tmp_path / "absent" / "dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no config.json"):
        load_discriminator(tmp_path / "empty")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ArtifactError, match=r"offline mode.*pass its local directory"):
        load_discriminator("someone/no-such-dino-for-tests")
    with pytest.raises(TypeError, match="unknown head options"):
        load_discriminator(tmp_path / "empty", kernal_size=3)


# ---------------------------------------------------------------- the step's pieces together


def test_discriminator_loss_on_quantised_fakes(disc):
    real, fake = images(2, 64, 64, seed=0), images(2, 64, 64, seed=1) * 1.3  # some fakes outside [-1, 1]
    fake.requires_grad_(True)
    q = quantize_pm1(fake.detach())
    levels = (q + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and q.min() >= -1 and q.max() <= 1
    assert (q - fake.detach().clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6
    disc.eval()
    loss, metrics = discriminator_loss(disc, real, fake, OFF, gen(0))
    with torch.no_grad():
        lr, lf = disc(real), disc(q)
    ref = 0.5 * (torch.clamp(1 - lr, min=0).mean() + torch.clamp(1 + lf, min=0).mean())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert metrics["disc_accuracy"].item() == pytest.approx((lr > lf).float().mean().item())
    loss.backward()
    assert fake.grad is None  # the fake batch is detached
    disc.zero_grad(set_to_none=True)


def test_generator_step_through_a_real_rae_decoder_and_the_discriminator(disc):
    """The wiring the trainer uses: decoder -> [-1, 1] -> D; adaptive weight on `decoder.decoder_pred.weight`."""
    from models.encoder import PixelDecoder, build_rae

    torch.manual_seed(0)
    rae = build_rae("tiny")
    decoder = PixelDecoder(rae).train()
    tokens = torch.randn(2, 256, 192, generator=gen(0))
    target = torch.rand(2, 3, 256, 256, generator=gen(1))  # [0, 1]
    pixels = decoder(tokens) * STD + MEAN  # ImageNet-normalised -> [0, 1]
    rec = (pixels - target).abs().mean()
    disc.eval()
    gan = generator_gan_loss(disc, pixels * 2 - 1, GANConfig().policy, gen(2))
    last = rae.decoder.decoder_pred.weight
    w = adaptive_weight(rec, gan, last)
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(gan, last, retain_graph=True)[0].norm()
    assert w.item() == pytest.approx(min((g_rec / (g_gan + 1e-6)).item(), 1e4), rel=1e-5) and w.item() > 0
    (rec + GANConfig().gan_weight * w * gan).backward()
    assert last.grad is not None and last.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.backbone.parameters())
    disc.zero_grad(set_to_none=True)  # the generator's step leaves head gradients: clear before the D step


def test_schedule_and_optimizer_facts():
    cfg = GANConfig()
    assert (cfg.disc_start_epoch, cfg.gan_start_epoch, cfg.lpips_start_epoch) == (6, 8, 0)
    assert (cfg.gan_weight, cfg.lpips_weight, cfg.max_d_weight, cfg.adaptive_eps) == (0.75, 1.0, 1e4, 1e-6)
    assert (cfg.disc_lr, cfg.disc_lr_final, cfg.disc_betas, cfg.disc_weight_decay) == (2e-4, 2e-5, (0.9, 0.95), 0.0)
    assert cfg.policy == DiffAugPolicy(prob=1.0, translation=0.125, color=True, cutout=0.0)
    spe = 10
    assert gan_phase(0, spe) == (True, False, False)
    assert gan_phase(59, spe) == (True, False, False) and gan_phase(60, spe) == (True, True, False)
    assert gan_phase(79, spe) == (True, True, False) and gan_phase(80, spe) == (True, True, True)
    assert disc_lr(0, spe) == 0.0 and disc_lr(5, spe) == pytest.approx(1e-4) and disc_lr(10, spe) == 2e-4
    at_end = 2e-5 + (2e-4 - 2e-5) * 0.5 * (1 + math.cos(math.pi * 9 / 15))  # 10 of the 16 epochs of updates
    assert disc_lr(100, spe) == pytest.approx(at_end) and at_end == pytest.approx(8.22e-5, rel=1e-3)
    assert disc_lr(10_000, spe) == pytest.approx(2e-5)
    opt = disc_optimizer(build_discriminator("tiny", seed=0))
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (2e-4, (0.9, 0.95), 0.0, 1e-8)
