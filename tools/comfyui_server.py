"""A real ComfyUI server for the node tests: started headless on 127.0.0.1 with this pack in
``custom_nodes/``, driven over HTTP. ``COMFYUI_DIR`` names the ComfyUI checkout (``make test``
fetches one into ``.cache/comfyui``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch

import sara_train
from sara_train.engine.delta import LayerDelta
from sara_train.engine.selection import select_entries
from sara_train.engine.sparse import probe_positions

REPO = Path(__file__).resolve().parent.parent

TINY_SD15_CHECKPOINT = """
import sys, torch
from safetensors.torch import load_file, save_file
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
from comfy.ldm.models.autoencoder import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel
torch.manual_seed(1)
checkpoint = {"model.diffusion_model." + k: v for k, v in load_file(sys.argv[2]).items()}
clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
checkpoint.update({"cond_stage_model.transformer." + k: v.half() for k, v in clip.state_dict().items()})
vae = AutoencoderKL(ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                              "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                              "dropout": 0.0}, embed_dim=4)
with torch.no_grad():
    for param in vae.parameters():
        param.normal_(0.0, 0.02)
checkpoint.update({"first_stage_model." + k: v.half() for k, v in vae.state_dict().items()})
save_file({k: v.contiguous() for k, v in checkpoint.items()}, sys.argv[3])
"""


def comfyui_dir() -> Path:
    path = Path(os.environ.get("COMFYUI_DIR", REPO / ".cache" / "comfyui"))
    if not (path / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {path}: run `make test` (it fetches one) or set COMFYUI_DIR")
    return path


def write_tiny_sd15_checkpoint(unet: Path, path: Path) -> Path:
    """A full SD1.5-style checkpoint: ``unet`` (fp32) + random CLIP-L and SD VAE (fp16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-c", TINY_SD15_CHECKPOINT, str(comfyui_dir()), str(unet), str(path)], check=True, timeout=600
    )
    return path


class ComfyUIServer:
    """``python main.py --cpu`` with ``base`` as its base directory (models, output, custom_nodes),
    this pack and the test node (``tools/comfyui_test_nodes``) installed."""

    def __init__(self, base: Path, env: dict[str, str] | None = None) -> None:
        """Start the server on ``base`` (models, input, output, custom_nodes); ``env`` is added to
        the server's environment."""
        self.base = base
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        for name, target in (("comfyui-sara", REPO), ("sara-test-nodes", REPO / "tools" / "comfyui_test_nodes")):
            link = base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (base / "server.log").open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--base-directory",
                str(base),
                "--disable-auto-launch",
                "--database-url",
                "sqlite:///:memory:",
            ],
            cwd=comfyui_dir(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.read_log()}")
            try:
                self.get("/object_info/KSampler")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
                continue
            self.log.flush()
            log = (self.base / "server.log").read_text()
            failed = [
                line.strip() for line in log.splitlines() if "(IMPORT FAILED)" in line and "custom_nodes" in line
            ]
            if failed:
                self.stop()
                raise RuntimeError(f"ComfyUI could not import a custom node: {failed}\n{self.read_log()}")
            return
        self.stop()
        raise RuntimeError(f"ComfyUI did not start within 180 s:\n{self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return (self.base / "server.log").read_text()[-6000:]

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Queue an API-format graph and wait for it; returns its history entry (raises on a
        validation error, returns the entry with status "error" on an execution error)."""
        body = json.dumps({"prompt": graph, "client_id": uuid.uuid4().hex}).encode()
        request = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                prompt_id = json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"ComfyUI refused the graph: {exc.read().decode()}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.2)
        raise AssertionError(f"graph did not finish within {timeout} s:\n{self.read_log()}")

    def run_ok(self, graph: dict, timeout: float = 600) -> dict:
        """``run`` and assert that the graph succeeded (the failure message carries the node error
        and the end of the server log)."""
        entry = self.run(graph, timeout=timeout)
        assert entry["status"]["status_str"] == "success", execution_error(entry) + self.read_log()
        return entry

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def execution_error(entry: dict) -> str:
    """The exception message of a failed graph ("" if it succeeded)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""


def make_delta(base: dict[str, torch.Tensor], seed: int, budget: float) -> sara_train.SparseDelta:
    """A delta over the base's 2-D+ weights: random updates at the smallest-|w| entries, probes at
    the largest, exactly as ``SaRAHandle.delta`` records them."""
    weights = {k: v for k, v in base.items() if k.endswith("weight") and v.dim() >= 2}
    _, indices = select_entries(weights, sara_train.SaRAConfig(budget=budget))
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for key, flat in indices.items():
        probe = probe_positions(weights[key].flatten(), flat, 4)
        layers[key] = LayerDelta(
            tuple(weights[key].shape),
            flat,
            torch.randn(flat.numel(), generator=generator) * 0.01,
            probe,
            weights[key].flatten()[probe.long()].float(),
        )
    return sara_train.SparseDelta(layers)


LORA_TARGETS = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.ff.net.2")


def make_lora(base: dict[str, torch.Tensor], rank: int = 4) -> dict[str, torch.Tensor]:
    """A random LoRA in ComfyUI's key format on two Linear layers of the tiny UNet."""
    generator = torch.Generator().manual_seed(5)
    lora = {}
    for name in LORA_TARGETS:
        out_features, in_features = base[name + ".weight"].shape
        lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
        lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
    return lora


def write_training_images(folder: Path, count: int = 4, size: int = 64) -> list[str]:
    """``count`` distinct RGB images (colour gradients with a square) as ``train_<i>.png``."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
        draw = ImageDraw.Draw(image)
        draw.rectangle([8 + 8 * i, 8, 24 + 8 * i, 40], fill=(255 - 50 * i, 40 * i, 120))
        names.append(f"train_{i}.png")
        image.save(folder / names[-1])
    return names
