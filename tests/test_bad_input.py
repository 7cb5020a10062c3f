"""Bad input gets a clear error naming the problem, and nothing is changed or half-written."""

import copy
import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TinyNet
from safetensors.torch import save_file
from torch import nn

import sara_train
from sara_train import DeltaFormatError, DeltaMismatchError


@pytest.fixture
def delta(tiny_net: TinyNet) -> sara_train.SparseDelta:
    handle = sara_train.inject(tiny_net, sara_train.SaRAConfig(budget=0.2))
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(0.01)
    result = handle.delta()
    handle.remove()
    return result


@pytest.fixture
def base() -> TinyNet:
    torch.manual_seed(0)  # same seed as the tiny_net fixture: the delta's base model
    return TinyNet()


def write_delta_file(path: Path, shape: list[int], idx: torch.Tensor, val: torch.Tensor) -> Path:
    key = "w"
    tensors = {
        f"{key}::idx": idx,
        f"{key}::val": val,
        f"{key}::probe_idx": torch.zeros(0, dtype=torch.int32),
        f"{key}::probe_val": torch.zeros(0, dtype=torch.float32),
    }
    save_file(
        tensors,
        str(path),
        metadata={"format": "sara-delta", "format_version": "1", "shapes": json.dumps({key: shape})},
    )
    return path


class LeavesMarkerWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_renamed_to_safetensors_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(LeavesMarkerWhenUnpickled(marker), protocol=4))
    with pytest.raises(DeltaFormatError, match="pickle.*never unpickles"):
        sara_train.SparseDelta.load(path)
    torch_saved = tmp_path / "torch.safetensors"
    torch.save({"x": LeavesMarkerWhenUnpickled(marker)}, torch_saved)
    with pytest.raises(DeltaFormatError, match="zip archive"):
        sara_train.SparseDelta.load(torch_saved)
    assert not marker.exists()


def test_truncated_and_garbage_files(delta, tmp_path: Path) -> None:
    path = delta.save(tmp_path / "d.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(DeltaFormatError, match="truncated"):
        sara_train.SparseDelta.load(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:40])
    with pytest.raises(DeltaFormatError, match="not a valid safetensors"):
        sara_train.SparseDelta.load(tmp_path / "head.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(300))
    with pytest.raises(DeltaFormatError, match="not a valid safetensors"):
        sara_train.SparseDelta.load(tmp_path / "junk.safetensors")
    with pytest.raises(DeltaFormatError, match="no such file"):
        sara_train.SparseDelta.load(tmp_path / "missing.safetensors")


def test_plain_safetensors_is_not_a_delta(tmp_path: Path) -> None:
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(DeltaFormatError, match="not a SaRA delta"):
        sara_train.SparseDelta.load(tmp_path / "w.safetensors")


@pytest.mark.parametrize(
    "idx, val, message",
    [
        (torch.tensor([0, 5, 12], dtype=torch.int32), torch.ones(3), "out of range"),
        (torch.tensor([-1, 5], dtype=torch.int32), torch.ones(2), "out of range"),
        (torch.tensor([4, 2], dtype=torch.int32), torch.ones(2), "not sorted"),
        (torch.tensor([2, 2], dtype=torch.int32), torch.ones(2), "duplicated"),
        (torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.0, float("nan")]), "NaN or Inf"),
        (torch.tensor([1, 2], dtype=torch.int32), torch.tensor([float("inf"), 1.0]), "NaN or Inf"),
        (torch.tensor([1, 2], dtype=torch.int64), torch.ones(2), "dtype torch.int64"),
        (torch.tensor([1, 2], dtype=torch.int32), torch.ones(3), "2 indices but 3 values"),
    ],
)
def test_invalid_indices_or_values(tmp_path: Path, idx, val, message: str) -> None:
    path = write_delta_file(tmp_path / "bad.safetensors", [3, 4], idx, val)
    with pytest.raises(DeltaFormatError, match=message) as info:
        sara_train.SparseDelta.load(path)
    assert "bad.safetensors" in str(info.value) and "'w'" in str(info.value)


def test_delta_for_another_architecture(delta) -> None:
    other = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    with pytest.raises(DeltaMismatchError, match="3 of 3 delta keys are not in the target"):
        delta.apply_to(other)


def test_shape_mismatch(delta, base: TinyNet) -> None:
    base.proj = nn.Linear(8, 12)
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(DeltaMismatchError, match=r"'proj.weight' has shape \(16, 8\).*\(12, 8\)"):
        delta.apply_to(base)
    for key, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[key]), "a failed apply changed the target"


def test_fingerprint_mismatch_and_override(delta, base: TinyNet) -> None:
    torch.manual_seed(123)
    other_weights = TinyNet()  # same architecture, different base weights
    with pytest.raises(DeltaMismatchError, match="trained from another model.*check_base=False"):
        delta.apply_to(other_weights)
    delta.apply_to(other_weights, check_base=False)
    delta.apply_to(base)  # the right base passes, also in half precision
    delta.apply_to(base.to(torch.bfloat16), strength=0)


def test_failed_apply_restores_what_it_had_changed(delta, base: TinyNet, monkeypatch) -> None:
    import sara_train.engine.apply as delta_module

    real = delta_module.add_sparse_
    calls = []

    def fail_on_third(weight, layer, strength):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure while writing")
        real(weight, layer, strength)

    before = copy.deepcopy(base.state_dict())
    monkeypatch.setattr(delta_module, "add_sparse_", fail_on_third)
    with pytest.raises(RuntimeError, match="simulated"):
        delta.apply_to(base)
    for key, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[key])


def test_save_is_atomic_when_the_disk_fills(delta, tmp_path: Path) -> None:
    path = delta.save(tmp_path / "d.safetensors")
    good = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import sara_train
        delta = sara_train.SparseDelta.load({str(path)!r})
        big = sara_train.SparseDelta.stack([delta])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # the "disk" holds 200 bytes per file
        try:
            big.save({str(path)!r})
        except sara_train.SaRAError as exc:
            print("SaRAError", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert f"SaRAError could not write {path}:" in result.stdout and "File too large" in result.stdout, result.stderr
    assert path.read_bytes() == good, "the existing file was damaged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"], "a temporary file was left"


def test_apply_to_injected_model_is_refused(delta, base: TinyNet) -> None:
    sara_train.inject(base, sara_train.SaRAConfig(budget=0.1))
    with pytest.raises(sara_train.SaRAError, match="handle.remove"):
        delta.apply_to(base)
    with pytest.raises(sara_train.SaRAError, match="already parametrized"):
        sara_train.inject(base, sara_train.SaRAConfig(budget=0.1))


def test_saved_files_get_the_usual_permissions(delta, tmp_path: Path) -> None:
    """safetensors recreates the file it writes; the atomic writer still gives it 0666 & ~umask."""
    path = delta.save(tmp_path / "d.safetensors")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
