"""Flux and SD3/3.5 deltas across namings, against the real model classes built small: diffusers'
``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` and ComfyUI's own ``Flux`` / ``MMDiT`` (the
original naming, fused q/k/v). The naming tables turn one model's weights into the other's (same
outputs, and the same keys as ComfyUI's own diffusers key map says), and a SaRA delta trained on
either applies to the other with the same result: indices remapped into and out of fused tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.comfyui_server import REPO, comfyui_dir

CHECK = Path(__file__).with_name("dit_namings_check.py")


@pytest.fixture(scope="module")
def results() -> dict:
    out = subprocess.run(
        [sys.executable, str(CHECK), str(comfyui_dir()), str(REPO)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    merged = {}
    for line in out.stdout.strip().splitlines():
        if line.startswith("{"):
            merged |= json.loads(line)
    return merged


@pytest.mark.parametrize("family", ["flux", "sd3.5"])
def test_the_naming_turns_one_model_into_the_other(results: dict, family: str) -> None:
    result = results[family]
    assert result["outputs"] < 1e-4, result  # the same function, through our table
    assert result["keymap_agrees"] and result["keymap_covered"] > 0.9 * result["keys"], result


@pytest.mark.parametrize("family", ["flux", "sd3.5"])
@pytest.mark.parametrize("direction", ["diffusers->comfy", "comfy->diffusers"])
def test_a_delta_trained_on_either_applies_to_the_other(results: dict, family: str, direction: str) -> None:
    result = results[family][direction]
    assert result["difference"] < 1e-4, result
    before, after = result["entries"]
    assert before == after > 0  # every entry placed exactly once
    assert result["fused"] > 0 if direction == "diffusers->comfy" else result["fused"] == 0
