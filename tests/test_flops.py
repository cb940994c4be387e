"""`flatdino flops`: counted MACs equal the analytic count (attention included) and reproduce SPEC.md 10.3."""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from models.dit import PRESETS, DiTConfig
from stages import flops


def analytic_macs(c: DiTConfig) -> int:
    """Forward MACs per image: linears + attention matmuls (2 N^2 D per block); adaLN/time MLP run once per image."""
    w, h, n = c.width, c.mlp_hidden, c.tokens
    block = n * (4 * w * w + 3 * w * h) + 2 * n * n * w + 6 * w * w
    return n * c.channels * w + (2 * c.time_freqs * w + w * w) + c.depth * block + 2 * w * w + n * w * c.channels


@pytest.mark.parametrize("preset,shape", [("S", (32, 128)), ("B", (256, 768)), ("T", (32, 32))])
def test_counted_macs_equal_analytic_including_attention(preset, shape):
    costs = flops.dit_costs(preset, *shape)
    cfg = dataclasses.replace(PRESETS[preset], tokens=shape[0], channels=shape[1])
    assert costs["gmacs"] * 1e9 == pytest.approx(analytic_macs(cfg), rel=1e-9)
    # forward + backward = 3x forward, minus the input gradients nobody needs: x_embedder's (the latents) and the
    # time MLP's first layer's (the fixed Fourier features)
    no_input_grad = shape[0] * shape[1] * cfg.width + 2 * cfg.time_freqs * cfg.width
    assert costs["train_gmacs"] * 1e9 == pytest.approx(3 * analytic_macs(cfg) - no_input_grad, rel=1e-9)


def test_xl_matches_spec_and_the_8x_claim():
    flat, grid = flops.dit_costs("XL", 32, 128), flops.dit_costs("XL", 256, 768)
    assert flat["gmacs"] == pytest.approx(14.6, abs=0.05)
    assert grid["gmacs"] == pytest.approx(119.1, abs=0.05)
    assert grid["gmacs"] / flat["gmacs"] >= 8
    assert flat["params"] / 1e6 == pytest.approx(675.5, abs=0.05)
    assert grid["params"] / 1e6 == pytest.approx(677.0, abs=0.05)


@pytest.mark.slow
def test_cli_report_frozen_encoders_and_step_ratio():
    result = CliRunner().invoke(flops.cli, ["--presets", "XL", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["dinov2"]["gmacs"] == pytest.approx(23.5, abs=0.1)
    assert report["dinov2"]["params"] / 1e6 == pytest.approx(86.6, abs=0.1)
    assert report["flatdino_encoder"]["gmacs"] == pytest.approx(34.2, abs=0.1)  # SPEC 4.2, ViT-B encoder
    (row,) = report["rows"]
    assert row["step_flat_gmacs"] == pytest.approx(3 * 14.6 + 23.5 + 34.2, abs=0.5)
    assert row["step_ratio"] == pytest.approx(3.8, abs=0.1)  # SPEC 10.3: 381 / 101


def test_unknown_preset_is_a_user_error():
    result = CliRunner().invoke(flops.cli, ["--presets", "XXL"])
    assert result.exit_code == 2 and "unknown DiT presets" in result.output
