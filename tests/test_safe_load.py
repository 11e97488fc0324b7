"""Checkpoints load with ``weights_only=True``: a pickle carrying code is refused in one line."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hawq.checkpoint import load_model, save_model
from hawq.errors import HawqError
from hawq.io import load_torch, save_torch
from hawq.quant import Plan, quantize_
from hawq.safe_load import allowed_globals

REPO = Path(__file__).resolve().parent.parent
TINY = {"_target_": "hawq.models.vit.ViT", "image_size": 32, "patch_size": 8, "num_classes": 10,
        "dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "dropout": 0.0}  # fmt: skip


class _Payload:
    """Unpickling calls ``fn(*args)``: the classic pickle exploit."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Unlisted(nn.Module):
    """A module class that is not on hawq's allow-list."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)


def _payloads(marker: Path) -> dict:
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.open": _Payload(open, str(marker), "w"),
        "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
        "unlisted module": _Unlisted(),
    }


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch.save", "pickle.dump", "inside a checkpoint"])
@pytest.mark.parametrize("name", ["os.system", "builtins.open", "builtins.exec",
                                  "subprocess.call", "unlisted module"])  # fmt: skip
def test_code_carrying_pickle_is_refused_in_one_line(tmp_path, fmt, name):
    marker = tmp_path / "pwned"
    obj = _payloads(marker)[name]
    path = tmp_path / "evil.pt"
    if fmt == "torch.save":
        torch.save(obj, path)
    elif fmt == "pickle.dump":  # the legacy (non-zip) format torch.load also reads
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:  # a plausible model checkpoint with the payload hidden in its meta
        torch.save({"schema": 1, "model_cfg": TINY, "state_dict": {}, "meta": {"x": obj}}, path)
    for load in (load_torch, load_model):
        with pytest.raises(HawqError) as info:
            load(path)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"refusing to load {path}"), msg
        assert not marker.exists(), "the payload ran"


def test_cli_refuses_a_payload_checkpoint(tmp_path):
    """``paths.checkpoint=<evil file>``: exit 2, one stderr line, the payload never runs."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save(_Payload(os.system, f"touch {marker}"), evil)
    cmd = [sys.executable, "-m", "hawq.run", "stages=[evaluate]", "model=vit_tiny",
           "data=synthetic", f"paths.checkpoint={evil}", f"paths.run_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HAWQ_DEBUG", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hawq: error: refusing to load"), proc.stderr
    assert "posix.system" in lines[0] or "os.system" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_files_are_corrupt_not_refused(tmp_path, kind):
    path = tmp_path / "bad.pt"
    good = save_torch(tmp_path / "good.pt", {"w": torch.ones(100)}).read_bytes()
    path.write_bytes({"garbage": b"\x00garbage", "truncated": good[: len(good) // 2],
                      "empty": b""}[kind])  # fmt: skip
    with pytest.raises(HawqError, match=f"^corrupt checkpoint {path}: ") as info:
        load_torch(path)
    assert "\n" not in str(info.value)


def test_hawq_checkpoints_still_load(tmp_path):
    """FP, fake-quant and whole-module checkpoints round-trip bit for bit under the allow-list."""
    torch.manual_seed(0)
    model = load_model(save_model(tmp_path / "m.pt", _vit(), TINY, epochs=1, test_acc=1.5))[0]
    x = torch.randn(2, 3, 32, 32)
    ref = _vit()
    ref.load_state_dict(model.state_dict())
    assert torch.equal(model(x), ref(x))

    q = quantize_(_vit(), Plan.from_dict({"_default": {"w_bits": 4, "a_bits": 8}}))
    q.eval()
    back = load_torch(save_torch(tmp_path / "whole.pt", q))  # a whole pickled module
    assert type(back) is type(q) and torch.equal(back(x), q(x))
    state = {"epoch": 3, "history": [{"loss": 0.5}], "model": q.state_dict(),
             "optimizer": torch.optim.AdamW(q.parameters()).state_dict()}  # fmt: skip
    assert load_torch(save_torch(tmp_path / "state.pt", state))["epoch"] == 3


def test_allow_list_is_classes_not_callables():
    """Only hawq/torch.nn classes: no functions, no builtins that could run code."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in allowed_globals()}
    assert all(isinstance(c, type) for c in allowed_globals())
    assert all(n.startswith(("hawq.", "torch.nn.")) for n in names), names
    assert "hawq.integer.graph.convert.IntegerGraph" in names
    assert "hawq.quant.modules.QuantLinear" in names


def _vit() -> nn.Module:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(TINY).eval()
