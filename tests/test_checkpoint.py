"""pipeline.checkpoint: our streaming safetensors writer, optimizer state without pickle, and the checkpoint folder."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import checkpoint as ck
from pipeline.manifest import ArtifactError


def test_save_tensors_is_a_standard_safetensors_file(tmp_path):
    """Every dtype round-trips through `safetensors.torch.load_file`, and the bytes equal safetensors' own writer."""
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(2, generator=g).double(),
               "i64": torch.arange(7), "u8": torch.arange(4, dtype=torch.uint8), "b": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "view": torch.randn(4, 4, generator=g).t()}
    ck.save_tensors(tmp_path / "ours.safetensors", tensors, {"note": "x"})
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "theirs.safetensors"), {"note": "x"})
    assert load_file(str(tmp_path / "theirs.safetensors")).keys() == back.keys()


def test_a_full_disk_is_a_plain_oserror(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Full(real_open(*a, **k)))
    with pytest.raises(OSError) as e:
        ck.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(3)})
    assert e.value.errno == errno.ENOSPC


def test_load_tensors_names_a_damaged_file(tmp_path):
    ck.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(100)})
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes()[:50])
    with pytest.raises(ArtifactError, match="x.safetensors: unreadable"):
        ck.load_tensors(tmp_path / "x.safetensors")


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = ck.optimizer_tensors(opt)
    restored = ck.optimizer_state(tensors, json.loads(json.dumps(meta)))
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(restored)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def test_checkpoints_keep_n_and_fall_back_past_damage(tmp_path):
    store = ck.Checkpoints(tmp_path, keep=2)
    for step in (2, 4, 6):
        store.save(step, {"model": {"w": torch.full((3,), float(step))}}, {"log": [step]})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["000000004", "000000006"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"step": 6, "path": "checkpoints/000000006"}
    (tmp_path / "checkpoints" / "000000006" / "model.safetensors").write_bytes(b"\0" * 8)
    warned = []
    saved = store.load(["model"], warn=warned.append)
    assert saved.step == 4 and torch.equal(saved.states["model"]["w"], torch.full((3,), 4.0))
    assert saved.trainer["log"] == [4] and "000000006: unreadable checkpoint" in warned[0]


def test_a_folder_swap_killed_between_its_renames_is_recovered(tmp_path):
    ck.publish(tmp_path, "best", {"model.safetensors": {"w": torch.ones(2)}}, {"config.json": {"step": 1}})
    (tmp_path / "best").rename(tmp_path / ".old-best")  # killed after final -> .old, before tmp -> final
    ck.recover_folder(tmp_path / "best")
    assert json.loads((tmp_path / "best" / "config.json").read_text()) == {"step": 1}
