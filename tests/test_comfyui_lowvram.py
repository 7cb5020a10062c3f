"""SaRA patches in ComfyUI's lowvram mode: the weights stay unpatched and ComfyUI's LowVramPatch
runs our WeightAdapterBase per forward. The test server is CPU-only (no vram management), so this
loads the model in-process with ``ModelPatcher.load(lowvram_model_memory=1)``, which puts every
module on that per-forward path, and compares with a full load."""

from __future__ import annotations

import json
import subprocess
import sys

from tools.comfyui_server import REPO, comfyui_dir

LOWVRAM_SCRIPT = """
import json, sys, torch
sys.path[:0] = [sys.argv[2], sys.argv[1]]  # our nodes/ (and tools/) before ComfyUI's nodes.py
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.sd
from safetensors.torch import load_file
from tools.comfyui_server import make_delta
from nodes.adapter import patch_model

model = comfy.sd.load_diffusion_model(sys.argv[3])
patched = patch_model(model, make_delta(load_file(sys.argv[3]), 1, 0.05), 1.0)
generator = torch.Generator().manual_seed(0)
x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 768, generator=generator)

def forward(patcher):
    with torch.no_grad():
        return patcher.model.diffusion_model(x, timesteps=torch.tensor([500.0]), context=context)

patched.load(torch.device("cpu"), lowvram_model_memory=1)
per_forward = sum(1 for m in patched.model.modules() if getattr(m, "weight_function", None))
lowvram = forward(patched)
patched.unpatch_model()
patched.load(torch.device("cpu"), full_load=True)
full = forward(patched)
patched.unpatch_model()
model.load(torch.device("cpu"), full_load=True)
base = forward(model)
print(json.dumps({"per_forward": per_forward, "lowvram_vs_full": (lowvram - full).abs().max().item(),
                  "full_vs_base": (full - base).abs().max().item()}))
"""


def test_lowvram_patching_equals_a_full_load(comfy) -> None:
    server, _ = comfy
    unet = server.base / "models" / "unet" / "tiny.safetensors"
    out = subprocess.run(
        [sys.executable, "-c", LOWVRAM_SCRIPT, str(comfyui_dir()), str(REPO), str(unet)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["per_forward"] > 20  # the delta was applied per forward, not merged at load
    assert result["lowvram_vs_full"] < 1e-6
    assert result["full_vs_base"] > 1e-3


TRAIN_SCRIPT = """
import json, sys, torch
sys.path[:0] = [sys.argv[2], sys.argv[1]]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm
import comfy.sd
from nodes.train import settings_from_options, train
from nodes.train_data import build_training_set
from tools.comfyui_graphs import sara_train_inputs

generator = torch.Generator().manual_seed(0)
data = build_training_set([{"samples": torch.randn(2, 4, 8, 8, generator=generator)}],
                          [[[torch.randn(1, 77, 768, generator=generator), {}]]])
options = sara_train_inputs(steps=3, seed=3)

def run(partial):
    model = comfy.sd.load_diffusion_model(sys.argv[3])
    if partial:  # ComfyUI sees a device with 40 MB free: it loads what fits and casts the rest per forward
        mm.is_device_cpu = lambda device: False
        mm.vram_state = mm.VRAMState.NORMAL_VRAM
        mm.get_free_memory = lambda dev=None, torch_free_too=False: (40e6, 40e6) if torch_free_too else 40e6
    seen = []  # whether ComfyUI had the model partially loaded, at every step
    outcome = train(model, data, settings_from_options(options),
                    lambda report: seen.append(bool(model.model.model_lowvram)), lambda: False)
    mm.unload_all_models()
    return outcome, all(seen) if seen else None

full, full_lowvram = run(False)
partial, partial_lowvram = run(True)
differences = [(full.delta.layers[k].values - partial.delta.layers[k].values).abs().max().item()
               for k in full.delta.layers]
print(json.dumps({"full_lowvram": full_lowvram, "partial_lowvram": partial_lowvram, "steps": len(partial.losses),
                  "same_layers": sorted(full.delta.layers) == sorted(partial.delta.layers),
                  "max_difference": max(differences), "losses": [full.losses, partial.losses]}))
"""


def test_training_a_partially_loaded_model_equals_a_full_load(comfy) -> None:
    """SaRA Train's own ``train`` on a model ComfyUI loads partially (its lowvram mode, decided by
    ComfyUI's loader from the device memory it reports) learns what a full load learns."""
    server, _ = comfy
    unet = server.base / "models" / "unet" / "tiny.safetensors"
    out = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(comfyui_dir()), str(REPO), str(unet)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["full_lowvram"] and result["partial_lowvram"], result
    assert result["steps"] == 3 and result["same_layers"]
    assert result["max_difference"] < 1e-6, result
    assert result["losses"][0] == result["losses"][1]
