"""Flow matching: time shift, interpolant, loss, CFG with interval, Euler/Heun order, per-sample noise, learning."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.dit import DiT, DiTConfig
from models.flow import (
    FlowDraw,
    class_balanced_labels,
    default_kappa,
    draw,
    drop_labels,
    flow_loss,
    guided_velocity,
    integrate,
    interpolate,
    sample,
    sample_noise,
    shift_time,
    time_grid,
)


class FakeCfg:
    null_class = 5


class LabelModel(nn.Module):
    """v = x * (1 + y) + t, recording the labels and times it was called with."""

    cfg = FakeCfg()

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((float(t[0]), y.clone()))
        return x * (1 + y.float()).view(-1, 1, 1) + t.view(-1, 1, 1)


def test_default_kappa():
    assert default_kappa(32, 128) == 1.0
    assert default_kappa(256, 768) == math.sqrt(48)
    assert default_kappa(32, 32) == 0.5


def test_kappa_one_is_identity_and_shift_values():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_time(u, 1.0), u)
    torch.testing.assert_close(shift_time(torch.tensor(0.5), 3.0), torch.tensor(0.25))
    s = 1 - u  # RAE convention s = 1 - t: s' = k s / (1 + (k - 1) s)
    torch.testing.assert_close(1 - shift_time(u, 3.0), 3 * s / (1 + 2 * s))
    assert shift_time(u, 3.0)[0] == 0 and shift_time(u, 3.0)[-1] == 1
    assert (shift_time(u[1:-1], 3.0) < u[1:-1]).all()  # kappa > 1 moves mass toward noise (t = 0)


def test_interpolant_endpoints():
    z, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(interpolate(z, noise, torch.zeros(2)), noise)
    assert torch.equal(interpolate(z, noise, torch.ones(2)), z)
    torch.testing.assert_close(interpolate(z, noise, torch.tensor([0.25, 0.5]))[1], 0.5 * (z[1] + noise[1]))


def test_flow_loss_is_velocity_mse():
    model = LabelModel()
    z = torch.randn(4, 3, 2)
    d = FlowDraw(torch.randn(4, 3, 2), torch.rand(4), torch.tensor([0, 1, 2, 5]))
    out = flow_loss(model, z, d)
    x_t = (1 - d.t.view(-1, 1, 1)) * d.noise + d.t.view(-1, 1, 1) * z
    v = model(x_t, d.t, d.y)
    torch.testing.assert_close(out.loss, ((v - (z - d.noise)) ** 2).mean())
    torch.testing.assert_close(out.per_sample.mean(), out.loss)


def test_draw_is_replayable_and_shifted():
    z, y = torch.zeros(4096, 2, 2), torch.zeros(4096, dtype=torch.int64)
    a = draw(z, y, 3.0, 0.1, 9, torch.Generator().manual_seed(0))
    b = draw(z, y, 3.0, 0.1, 9, torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert 0.07 < (a.y == 9).float().mean() < 0.13  # label dropout 0.1
    # shifted t with kappa 3: P(t < 0.25) = P(u < 0.5) = 0.5
    assert 0.46 < (a.t < 0.25).float().mean() < 0.54


def test_drop_labels_zero_probability_is_identity():
    y = torch.arange(10)
    assert torch.equal(drop_labels(y, 0.0, 10, None), y)
    assert torch.equal(drop_labels(y, 1.0, 10, None), torch.full_like(y, 10))


def test_cfg_scale_one_equals_conditional():
    model, x, y = LabelModel(), torch.randn(3, 2, 2), torch.tensor([0, 1, 2])
    v = guided_velocity(model, x, 0.5, y, 1.0, (0.0, 1.0), 5)
    torch.testing.assert_close(v, model(x, torch.full((3,), 0.5), y))


def test_cfg_combines_all_channels_inside_interval():
    model, x, y = LabelModel(), torch.randn(3, 2, 2), torch.tensor([0, 1, 2])
    v = guided_velocity(model, x, 0.5, y, 2.5, (0.3, 1.0), 5)
    t = torch.full((3,), 0.5)
    v_c, v_u = model(x, t, y), model(x, t, torch.full_like(y, 5))
    torch.testing.assert_close(v, v_u + 2.5 * (v_c - v_u))


@pytest.mark.parametrize("t", [0.0, 0.1, 0.3, 1.0])
def test_no_guidance_outside_interval(t):
    model, x, y = LabelModel(), torch.randn(3, 2, 2), torch.tensor([0, 1, 2])
    v = guided_velocity(model, x, t, y, 4.0, (0.3, 1.0), 5)
    assert torch.equal(v, model(x, torch.full((3,), t), y))


def test_sampler_guides_only_on_warped_interval():
    model = LabelModel()
    sample(model, torch.tensor([0, 1]), torch.randn(2, 2, 2), steps=10, cfg_scale=2.0, cfg_interval=(0.3, 1.0),
           kappa=3.0)
    grid = time_grid(10, 3.0)[:-1].tolist()
    uncond_times = [t for t, y in model.calls if (y == 5).all()]
    assert uncond_times == pytest.approx([t for t in grid if 0.3 < t < 1.0])
    assert len(model.calls) == len(grid) + len(uncond_times)


def test_time_grid_is_the_official_float32_linspace():
    """jnp.linspace(0, 1, n, dtype=float32) under XLA: iota * float32(1 / (n - 1)), then the endpoint itself."""
    for steps in (7, 50, 250):
        recip = np.float32(1) / np.float32(steps)
        expected = np.append(np.arange(steps, dtype=np.float32) * recip, np.float32(1))
        np.testing.assert_array_equal(time_grid(steps, 1.0).numpy(), expected)
        u = expected
        k = np.float32(3.0)
        np.testing.assert_array_equal(time_grid(steps, 3.0).numpy(), u / (k - (k - np.float32(1)) * u))
    grid = time_grid(50, 1.0)
    assert grid.dtype == torch.float32 and grid[0] == 0 and grid[-1] == 1
    assert grid[15].item() == 0.29999998211860657  # the official value; float32(15 / 50) would be 0.30000001
    assert np.float32(15 / 50) == np.float32(0.30000001192092896) and grid[15].item() < 0.3


def test_default_settings_guide_34_of_50_steps():
    """steps 50, interval (0.3, 1.0), kappa 1: the official sampler guides steps 16..49 (t_15 = 0.29999998)."""
    model = LabelModel()
    sample(model, torch.tensor([0, 1]), torch.randn(2, 2, 2), steps=50, cfg_scale=2.0, kappa=1.0)
    uncond = [t for t, y in model.calls if (y == 5).all()]
    assert len(uncond) == 34 and len(model.calls) == 50 + 34
    assert min(uncond) == pytest.approx(16 / 50) and max(uncond) == pytest.approx(49 / 50)


def test_euler_is_exact_for_constant_velocity_and_first_order():
    x0 = torch.tensor([1.0])
    const = integrate(lambda x, t: torch.full_like(x, 2.0), x0, time_grid(7, 3.0))
    torch.testing.assert_close(const, torch.tensor([3.0]))
    errs = [(integrate(lambda x, t: x, x0, time_grid(n, 1.0)) - math.e).abs().item() for n in (50, 100, 200)]
    assert 1.9 < errs[0] / errs[1] < 2.1 and 1.9 < errs[1] / errs[2] < 2.1


def test_heun_is_exact_for_linear_in_t_and_second_order():
    x0 = torch.tensor([0.0], dtype=torch.float64)
    lin = integrate(lambda x, t: torch.full_like(x, 2 * t), x0, time_grid(5, 1.0).double(), "heun")
    torch.testing.assert_close(lin, torch.tensor([1.0], dtype=torch.float64))  # int_0^1 2t dt
    x1 = torch.tensor([1.0], dtype=torch.float64)
    errs = [(integrate(lambda x, t: x, x1, time_grid(n, 1.0).double(), "heun") - math.e).abs().item()
            for n in (25, 50, 100)]
    assert 3.8 < errs[0] / errs[1] < 4.2 and 3.8 < errs[1] / errs[2] < 4.2


def test_point_mass_flow_reaches_data_exactly_with_euler():
    """For data = z0, the true velocity (z0 - x) / (1 - t) carries any noise to z0 on any Euler grid.

    (Heun's last corrector evaluates this field at its singularity t = 1, so it is not exact here.)
    """
    z0 = torch.tensor([[[1.5, -2.0]]])

    class PointMass(nn.Module):
        cfg = FakeCfg()

        def forward(self, x, t, y):
            return (z0 - x) / (1 - t).clamp_min(1e-6).view(-1, 1, 1)

    out = sample(PointMass(), torch.tensor([0, 0]), torch.randn(2, 1, 2), steps=8, sampler="euler", kappa=2.0)
    torch.testing.assert_close(out, z0.expand(2, 1, 2), atol=1e-5, rtol=0)


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        integrate(lambda x, t: x, torch.zeros(1), time_grid(2, 1.0), "rk4")


def test_class_balanced_labels():
    labels = class_balanced_labels(10, 5)
    assert labels.shape == (50,) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels), torch.full((10,), 5))


def test_sample_noise_depends_only_on_seed_and_index():
    a = sample_noise(3, [0, 1, 2, 3], (4, 2))
    b = sample_noise(3, torch.tensor([2, 7]), (4, 2))
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(sample_noise(4, [0], (4, 2))[0], a[0])
    big = sample_noise(0, range(2000), (4, 8))
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02


def toy_data(n: int, g: torch.Generator):
    """Two classes on 4 tokens x 4 channels with distinct means, std 0.3."""
    means = torch.stack([torch.linspace(-1, 1, 16).view(4, 4), -torch.linspace(-1, 1, 16).view(4, 4).flip(0)])
    y = torch.randint(0, 2, (n,), generator=g)
    return means[y] + 0.3 * torch.randn(n, 4, 4, generator=g), y, means


def train_toy(steps: int = 600) -> tuple[DiT, torch.Tensor]:
    torch.manual_seed(0)
    cfg = DiTConfig(width=32, depth=1, heads=2, mlp_hidden=64, tokens=4, channels=4, num_classes=2, time_freqs=16)
    model = DiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        z, y, means = toy_data(64, g)
        loss = flow_loss(model, z, draw(z, y, 1.0, 0.1, cfg.null_class, g)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), means


def test_tiny_dit_learns_class_conditional_means():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CPU (~4 s single-threaded)
    try:
        model, means = train_toy()
        labels = class_balanced_labels(2, 200)
        out = sample(model, labels, sample_noise(0, range(400), (4, 4)), steps=20)
    finally:
        torch.set_num_threads(threads)
    for c in range(2):
        gen = out[labels == c]
        err = (gen.mean(0) - means[c]).abs().max().item()
        assert err < 0.15, f"class {c} mean off by {err}"  # the two class means differ by up to 2
        assert 0.2 < gen.std(0).mean().item() < 0.4  # not collapsed: close to the data's 0.3
