"""PSNR and LPIPS (pipeline.image_metrics) against independent computations and against the `lpips` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import image_metrics as im
from pipeline.manifest import UserError


def test_psnr_against_numpy():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    mse = ((a.astype(np.float64) - b) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(im.psnr(torch.from_numpy(a), torch.from_numpy(b)).numpy(), 10 * np.log10(255**2 / mse))


def lpips_file(path: Path, suffix: str = ".pth", drop: str | None = None) -> Path:
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in im.vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier: it must be dropped
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(im.VGG_CHANNELS)}
    state = {**vgg, **heads}
    if drop:
        state.pop(drop)
    f = path / f"lpips{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, f)
    else:
        torch.save(state, f)
    return f


def test_vgg16_trunk_has_torchvisions_layout():
    from torchvision.models.vgg import cfgs, make_layers

    theirs = {k: v.shape for k, v in make_layers(cfgs["D"]).state_dict().items()}
    ours = {k: v.shape for k, v in im.vgg16_features().state_dict().items()}
    assert ours == theirs  # torchvision's trunk ends with a weight-free max-pool after relu5_3


def test_lpips_from_a_local_file(tmp_path):
    model = im.load_lpips(lpips_file(tmp_path))
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    d_ab, d_ba, d_aa = model(a, b), model(b, a), model(a, a)
    assert d_aa.abs().max() == 0
    torch.testing.assert_close(d_ab, d_ba)
    assert (d_ab > 0).all()
    # a slightly perturbed image is closer than an unrelated one
    assert (model(a, a + 0.05 * torch.randn(a.shape, generator=g)) < d_ab).all()
    st = im.load_lpips(lpips_file(tmp_path, ".safetensors"))
    torch.testing.assert_close(st(a, b), d_ab)


def test_lpips_file_is_loaded_strictly(tmp_path):
    with pytest.raises(UserError, match="not an LPIPS"):
        im.load_lpips(lpips_file(tmp_path, drop="lin2.model.1.weight"))
    with pytest.raises(UserError, match="no such file"):
        im.load_lpips(tmp_path / "missing.pth")


def _package_lpips():
    import lpips  # the dev extra, installed by `make install`
    torch.manual_seed(0)  # the package's random VGG trunk (pnet_rand: no ImageNet download), its bundled v0.1 heads
    return lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()


def _as_our_file(theirs, path: Path) -> Path:
    """The package's weights in the layout `load_lpips` reads: torchvision `features.<i>.*` + `lin<k>.model.1.weight`."""
    state = {}
    for k, v in theirs.state_dict().items():
        if k.startswith("net.slice"):
            state["features." + k.split(".", 2)[2]] = v  # net.slice<j>.<i>.weight keeps torchvision's index i
        elif k.startswith("lin") and not k.startswith("lins."):
            state[k] = v
    torch.save(state, path / "lpips.pth")
    return path / "lpips.pth"


def test_lpips_equals_the_lpips_package(tmp_path):
    """Same VGG16 and heads, several image pairs (random, near-identical, shifted, large): equal to 1e-6."""
    theirs = _package_lpips()
    ours = im.load_lpips(_as_our_file(theirs, tmp_path))
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    pairs = [(a, torch.rand(4, 3, 64, 64, generator=g) * 2 - 1), (a, (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(-1, 1)),
             (a, a.roll(3, dims=-1)), (a[:1].repeat(2, 1, 1, 1), -a[:2]),
             (torch.rand(2, 3, 128, 96, generator=g) * 2 - 1, torch.rand(2, 3, 128, 96, generator=g) * 2 - 1)]
    with torch.no_grad():
        for x, y in pairs:
            want = theirs(x, y).flatten().double()
            got = ours(x, y).double()
            assert want.abs().min() > 0 or torch.equal(x, y)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_lpips_taps_matter(tmp_path):
    """A wrong tap (one layer off) or a wrong constant gives another distance: the parity test can fail."""
    theirs = _package_lpips()
    ours = im.load_lpips(_as_our_file(theirs, tmp_path))
    g = torch.Generator().manual_seed(2)
    x, y = (torch.rand(2, 3, 64, 64, generator=g) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        want = theirs(x, y).flatten()
        ours.shift.add_(0.01)
        assert not torch.allclose(ours(x, y), want, rtol=1e-4)
