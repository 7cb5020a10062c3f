"""Streaming merge of deltas into a single-file safetensors checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TinyNet
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sara_train

PREFIX = "model.diffusion_model."


def make_delta(model: TinyNet, seed: int, **config) -> sara_train.SparseDelta:
    handle = sara_train.inject(model, sara_train.SaRAConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    delta = handle.delta()
    handle.remove()
    return delta


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint holding TinyNet's weights (base of seed 0) under ``model.diffusion_model.``, in
    mixed dtypes, beside unrelated tensors of other dtypes."""
    torch.manual_seed(0)
    unet = TinyNet().state_dict()
    tensors = {PREFIX + k: (v.half() if "proj" in k else v) for k, v in unet.items()}
    tensors["first_stage_model.decoder.weight"] = torch.randn(4, 4).to(torch.bfloat16)
    tensors["cond_stage_model.position_ids"] = torch.arange(7)
    tensors["scalar"] = torch.tensor(3.0)
    path = tmp_path / "base.safetensors"
    save_file(tensors, str(path), metadata={"modelspec.title": "tiny"})
    return path, tensors


def delta_base() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def test_merge_equals_applying_to_the_state_dict(checkpoint, tmp_path: Path) -> None:
    path, tensors = checkpoint
    first, second = make_delta(delta_base(), 1, budget=0.2), make_delta(delta_base(), 2, threshold=0.05)
    second_file = second.save(tmp_path / "second.safetensors")
    out = sara_train.merge_checkpoint(path, [first, second_file], tmp_path / "merged.safetensors", strength=[1.0, 0.5])
    merged = load_file(str(out))
    expected = {k: v.clone() for k, v in tensors.items()}
    first.apply_to(expected)
    second.apply_to(expected, strength=0.5)
    assert set(merged) == set(tensors)
    for key, tensor in expected.items():
        assert merged[key].dtype == tensors[key].dtype
        if key.startswith(PREFIX) and key[len(PREFIX) :] in first.layers:
            torch.testing.assert_close(merged[key], tensor, rtol=0, atol=1e-3 if tensor.dtype == torch.half else 1e-7)
            assert not torch.equal(merged[key], tensors[key])
        else:
            assert torch.equal(merged[key], tensors[key]), f"{key} changed"
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.title"] == "tiny"
    records = json.loads(metadata["sara_merged"])
    assert [r["strength"] for r in records] == [1.0, 0.5]
    assert len({r["delta"] for r in records}) == 2


def test_merge_refuses_a_delta_from_another_base(checkpoint, tmp_path: Path) -> None:
    path, _ = checkpoint
    torch.manual_seed(99)
    foreign = make_delta(TinyNet(), 1, budget=0.2)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"previous content")
    with pytest.raises(sara_train.DeltaMismatchError, match="another model"):
        sara_train.merge_checkpoint(path, foreign, out, overwrite=True)
    assert out.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "merged.safetensors"]
    with pytest.raises(sara_train.SaRAError, match="already exists"):
        sara_train.merge_checkpoint(path, foreign, out, check_base=False)
    sara_train.merge_checkpoint(path, foreign, out, check_base=False, overwrite=True)
    assert set(load_file(str(out))) == set(load_file(str(path)))


def test_merge_refuses_unknown_keys_and_non_safetensors(checkpoint, tmp_path: Path) -> None:
    path, _ = checkpoint
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    delta = make_delta(other, 0, budget=0.5)
    with pytest.raises(sara_train.DeltaMismatchError, match="not in checkpoint"):
        sara_train.merge_checkpoint(path, delta, tmp_path / "x.safetensors")
    fake = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, fake)
    with pytest.raises(sara_train.SaRAError, match="not a safetensors file"):
        sara_train.merge_checkpoint(fake, make_delta(delta_base(), 1, budget=0.2), tmp_path / "y.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_merge_refuses_fp8_weights_with_the_reason(checkpoint, tmp_path: Path) -> None:
    path, tensors = checkpoint
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k.startswith(PREFIX) and v.dim() > 1 else v) for k, v in tensors.items()}
    fp8_path = tmp_path / "fp8.safetensors"
    save_file(fp8, str(fp8_path))
    with pytest.raises(sara_train.DeltaMismatchError, match=r"stored in fp8 \(F8_E4M3\).*bf16/fp16/fp32 file"):
        sara_train.merge_checkpoint(fp8_path, make_delta(delta_base(), 1, budget=0.2), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
