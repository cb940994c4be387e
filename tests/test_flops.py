"""`flatdino flops`: counted MACs equal the analytic count (attention included) and reproduce SPEC.md 10.3, for
LightningDiT and DiT^DH."""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from models.dit import PRESETS, DiTConfig
from models.dit_dh import PRESETS as DH_PRESETS
from models.dit_dh import DiTDHConfig
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


def analytic_dh_macs(c: DiTDHConfig) -> int:
    """DiT^DH forward MACs: the body's adaLN runs once per image, the head's adaLN and final adaLN once per token."""
    w, h, v, hv, n, f = c.width, c.mlp_hidden, c.dh_width, c.dh_mlp_hidden, c.tokens, c.channels
    body = c.depth * (6 * w * w + n * (4 * w * w + 3 * w * h) + 2 * n * n * w)
    head = c.dh_depth * (n * (6 * v * v + 4 * v * v + 3 * v * hv) + 2 * n * n * v)
    embed = n * f * (w + v) + (2 * c.time_freqs * w + w * w) + (n * w * v if w != v else 0)
    return embed + body + head + n * 2 * v * v + n * v * f


@pytest.mark.parametrize("preset,shape", [("ditxl-dh", (32, 128)), ("dits-dh", (256, 768)), ("ditt-dh", (32, 32))])
def test_dit_dh_counted_macs_equal_analytic(preset, shape):
    costs = flops.dit_dh_costs(preset, *shape)
    cfg = dataclasses.replace(DH_PRESETS[preset], tokens=shape[0], channels=shape[1])
    assert costs["gmacs"] * 1e9 == pytest.approx(analytic_dh_macs(cfg), rel=1e-9)
    no_input_grad = shape[0] * shape[1] * (cfg.width + cfg.dh_width) + 2 * cfg.time_freqs * cfg.width  # 2 embedders
    assert costs["train_gmacs"] * 1e9 == pytest.approx(3 * analytic_dh_macs(cfg) - no_input_grad, rel=1e-9)


def test_dit_dh_xl_matches_spec():
    """SPEC 10.3: RAE's DiT^DH-XL on 256 x 768 is about 161.6 GMACs; on FlatDINO latents 19.8 (1.36x DiT-XL's 14.6)."""
    grid, flat = flops.dit_dh_costs("ditxl-dh", 256, 768), flops.dit_dh_costs("ditxl-dh", 32, 128)
    assert grid["gmacs"] == pytest.approx(161.6, abs=0.05)
    assert flat["gmacs"] == pytest.approx(19.77, abs=0.01)
    assert grid["gmacs"] / flops.dit_costs("XL", 32, 128)["gmacs"] == pytest.approx(11.1, abs=0.05)  # SPEC: ~11x


def test_cli_small_presets_report_dh_rows_and_table():
    result = CliRunner().invoke(flops.cli, ["--presets", "T", "--dh-presets", "ditt-dh", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    (row,), (dh,) = report["rows"], report["dh_rows"]
    assert row["preset"] == "T" and dh["preset"] == "ditt-dh"
    assert dh["flat"]["gmacs"] == pytest.approx(flops.dit_dh_costs("ditt-dh", 32, 128)["gmacs"], rel=1e-12)
    assert dh["step_flat_gmacs"] == pytest.approx(dh["flat"]["train_gmacs"] + report["dinov2"]["gmacs"]
                                                  + report["flatdino_encoder"]["gmacs"], rel=1e-12)
    table = flops.format_table(report)
    assert "DiT^DH" in table and table.index("ditt-dh") > table.index("DiT^DH") > table.index("\nT ")
    none = CliRunner().invoke(flops.cli, ["--presets", "T", "--dh-presets", "", "--json"])
    assert none.exit_code == 0 and json.loads(none.output)["dh_rows"] == []


@pytest.mark.slow
def test_cli_report_frozen_encoders_and_step_ratio():
    result = CliRunner().invoke(flops.cli, ["--presets", "XL", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["dinov2"]["gmacs"] == pytest.approx(23.5, abs=0.1)
    assert report["dinov2"]["params"] / 1e6 == pytest.approx(86.6, abs=0.1)
    # SPEC 10.3 counts 34.2 for the ViT-B encoder over all 288 tokens; its last block here updates only the 32
    # latent tokens it reads out, skipping the 256 patch tokens' q and output projections, SwiGLU and attention rows
    skipped = 256 * (2 * 768**2 + 3 * 768 * 3072 + 2 * 288 * 768) / 1e9
    assert report["flatdino_encoder"]["gmacs"] == pytest.approx(34.15 - skipped, abs=0.01)
    assert report["flatdino_encoder"]["gmacs"] == pytest.approx(31.9, abs=0.05)
    (row,) = report["rows"]
    assert row["step_flat_gmacs"] == pytest.approx(3 * 14.6 + 23.5 + 31.9, abs=0.5)
    assert row["step_ratio"] == pytest.approx(3.8, abs=0.1)  # SPEC 10.3: 381 / 101
    (dh,) = report["dh_rows"]  # ditxl-dh by default
    assert dh["step_grid_gmacs"] == pytest.approx(508, abs=1)  # SPEC 10.3: RAE DiT^DH-XL ~508 per image


def test_unknown_preset_is_a_user_error():
    result = CliRunner().invoke(flops.cli, ["--presets", "XXL"])
    assert result.exit_code == 2 and "unknown DiT presets" in result.output
    result = CliRunner().invoke(flops.cli, ["--presets", "T", "--dh-presets", "XL"])
    assert result.exit_code == 2 and "unknown DiT^DH presets" in result.output
