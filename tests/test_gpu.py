"""CUDA-only checks (`make test-gpu`): attention backends agree, bf16 stays close to fp32, CUDA matches the CPU."""

from __future__ import annotations

import pytest
import torch

from models.dit import DiT, PRESETS as DIT_PRESETS
from models.layers import Attention, attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_xformers_matches_sdpa():
    pytest.importorskip("xformers")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 77, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    ref = attention(q, k, v, "sdpa").float()
    out = attention(q, k, v, "xformers").float()
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    layer = Attention(64, 2, qk_norm=True).cuda()
    x = torch.randn(3, 10, 64, device="cuda")
    layer_x = Attention(64, 2, qk_norm=True, backend="xformers").cuda()
    layer_x.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer_x(x), layer(x), atol=1e-3, rtol=1e-3)


def test_dit_bf16_close_to_fp32_and_cuda_matches_cpu():
    torch.manual_seed(0)
    model = DiT(DIT_PRESETS["T"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # adaLN-Zero output is exactly 0 at init
    x, t, y = torch.randn(4, 32, 32), torch.rand(4), torch.arange(4)
    cpu = model(x, t, y)
    model = model.cuda()
    with torch.no_grad():
        fp32 = model(x.cuda(), t.cuda(), y.cuda()).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(x.cuda(), t.cuda(), y.cuda()).float().cpu()
    torch.testing.assert_close(fp32, cpu.detach(), atol=1e-4, rtol=1e-3)
    assert (bf16 - fp32).norm() / fp32.norm() < 2e-2
