"""The package's layers: imports point one way (engine <- families <- applications), and the library
works where only torch and safetensors are installed (no diffusers, transformers, accelerate,
matplotlib or peft)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sara_train"
LAYERS = {"engine": set(), "families": {"engine"}, "plots": {"engine"}, "export": {"engine", "families"}}
"""Which sibling packages each lower layer may import (applications may import anything below)."""
ALLOWED_THIRD_PARTY = {
    "engine": {"torch", "safetensors"},
    "families": {"torch", "safetensors"},
    "plots": {"torch", "PIL", "matplotlib"},
    "export": {"torch", "safetensors"},
}
OPTIONAL_THIRD_PARTY = {"engine/optim8bit.py": {"bitsandbytes"}}
"""Optional dependencies one module may import (imported only when its feature is asked for)."""
STDLIB = sys.stdlib_module_names


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(relative level, module)`` of every import in a file (level 0: absolute)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_lower_layers_import_only_what_is_below_them(layer: str) -> None:
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for level, module in imports_of(path):
            where = f"{path.relative_to(PACKAGE.parent)} imports {'.' * level}{module}"
            if level == 0:
                top = module.split(".")[0]
                optional = OPTIONAL_THIRD_PARTY.get(f"{layer}/{path.name}", set())
                assert top in STDLIB or top in ALLOWED_THIRD_PARTY[layer] | optional, where
            elif level == 2:
                assert module.split(".")[0] in LAYERS[layer], where
            else:
                assert level == 1, where


BLOCKED = ("diffusers", "transformers", "accelerate", "matplotlib", "peft")
WITHOUT_APPLICATION_PACKAGES = f"""
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
import torch
import sara_train
from sara_train.families.sd_unet import delta_to_ldm_keys

torch.manual_seed(0)
unet_like = torch.nn.ModuleDict({{"conv_in": torch.nn.Conv2d(4, 8, 3), "conv_out": torch.nn.Conv2d(8, 4, 3)}})
handle = sara_train.inject(unet_like, sara_train.SaRAConfig(budget=0.1))
optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2)
unet_like["conv_out"](unet_like["conv_in"](torch.randn(1, 4, 9, 9))).square().mean().backward()
optimizer.step()
delta = handle.delta()
layout = {{"layers_per_block": 1, "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"],
           "mid_block_type": None}}
print(sorted(delta_to_ldm_keys(delta, layout).layers), delta.num_entries > 0)
print(sorted(name for name in sys.modules if name.split(".")[0] in {BLOCKED!r}))
"""


def test_import_sara_train_needs_no_application_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_APPLICATION_PACKAGES],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PACKAGE.parent,
    )
    assert result.returncode == 0, result.stderr
    keys, loaded = result.stdout.strip().splitlines()
    assert keys == "['input_blocks.0.0.weight', 'out.2.weight'] True"
    assert loaded == "[]"
