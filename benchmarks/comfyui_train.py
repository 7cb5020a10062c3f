"""SaRA Train vs ComfyUI's built-in Train LoRA, in one real ComfyUI, on one model and data.

    .venv/bin/python -m benchmarks.comfyui_train [--steps 8] [--image-size 64]

Runs a ComfyUI server (``COMFYUI_DIR``, ``make test`` fetches one) on the CPU with the tiny
SD1.5-detected UNet inside a random full checkpoint (see tools/comfyui_server.py), and reports:

1. Training, same latents/prompt/batch/fp32/gradient checkpointing, LoRA rank chosen so both train
   about the same number of parameters: peak RSS of the server during training above its RSS
   before, and seconds per step (wall time of a 2N-step run minus an N-step run, over N).
   Each method runs in a fresh server so its peak is its own.
2. Applying: time to load and patch a SaRA delta vs a LoRA file of about equal size onto the UNet
   (``ModelPatcher`` with the patches written into the weights), median of 5, in-process.
3. Sampling: seconds per sampler step with the delta loaded vs the base model (same graph).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.comfyui_models import write_model
from tools.comfyui_server import (
    REPO,
    ComfyUIServer,
    comfyui_dir,
    make_delta,
    write_tiny_sd15_checkpoint,
    write_training_images,
)

CKPT = "tiny_full.safetensors"
BUDGET = 0.05


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def base_graph() -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red square"}},
        "img0": {"class_type": "LoadImage", "inputs": {"image": "train_0.png"}},
        "img1": {"class_type": "LoadImage", "inputs": {"image": "train_1.png"}},
        "enc0": {"class_type": "VAEEncode", "inputs": {"pixels": ["img0", 0], "vae": ["ckpt", 2]}},
        "enc1": {"class_type": "VAEEncode", "inputs": {"pixels": ["img1", 0], "vae": ["ckpt", 2]}},
        "batch": {"class_type": "LatentBatch", "inputs": {"samples1": ["enc0", 0], "samples2": ["enc1", 0]}},
        # A list of single latents: Train LoRA of ComfyUI 0.3.75 fails on a single LATENT batch
        # (UnboundLocalError 'multi_res'); SaRA Train takes either.
        "latent_list": {"class_type": "RebatchLatents", "inputs": {"latents": ["batch", 0], "batch_size": 1}},
    }


def train_node(method: str, steps: int, rank: int) -> dict:
    common = {
        "model": ["ckpt", 0],
        "latents": ["latent_list", 0],
        "positive": ["pos", 0],
        "steps": steps,
        "batch_size": 2,
        "seed": 0,
        "training_dtype": "fp32",
        "gradient_checkpointing": True,
    }
    if method == "sara":
        return {
            "class_type": "SaRATrain",
            "inputs": {
                **common,
                "grad_accumulation": 1,
                "learning_rate": 1e-4,
                "budget": BUDGET,
                "threshold": 0.0,
                "rank_loss_weight": 1e-4,
                "progressive_fraction": 0.5,
                "save_every": 0,
                "save_prefix": "bench",
                "existing_delta": "[None]",
                "timestep_sampling": "uniform",
                "min_snr_gamma": 0.0,
                "caption_dropout": 0.0,
                "ema_decay": 0.0,
            },
        }
    return {
        "class_type": "TrainLoraNode",
        "inputs": {
            **common,
            "grad_accumulation_steps": 1,
            "learning_rate": 1e-4,
            "rank": rank,
            "optimizer": "AdamW",
            "loss_function": "MSE",
            "lora_dtype": "fp32",
            "algorithm": "LoRA",
            "existing_lora": "[None]",
        },
    }


def train_graph(method: str, steps: int, rank: int) -> dict:
    graph = base_graph()
    graph["train"] = train_node(method, steps, rank)
    graph["plot"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["train", 2], "filename_prefix": method}}
    return graph


def timed_run(server: ComfyUIServer, graph: dict) -> float:
    started = time.perf_counter()
    entry = server.run(graph, timeout=3600)
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"graph failed:\n{server.read_log()}")
    return time.perf_counter() - started


def measure_training(base: Path, method: str, steps: int, rank: int) -> tuple[float, float]:
    """(peak RSS above the pre-training RSS in MiB, seconds per step) in a fresh server."""
    server = ComfyUIServer(base)
    try:
        warm = base_graph()
        warm["noop"] = {"class_type": "SaveLatent", "inputs": {"samples": ["batch", 0], "filename_prefix": "warm"}}
        timed_run(server, warm)  # loads the checkpoint, encodes latents and prompt
        before = rss_kib(server.process.pid, "VmRSS")
        Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # reset VmHWM
        short = timed_run(server, train_graph(method, steps, rank))
        peak = rss_kib(server.process.pid, "VmHWM")
        long = timed_run(server, train_graph(method, 2 * steps, rank))
        return (peak - before) / 1024, (long - short) / steps
    finally:
        server.stop()


def trainable_counts(unet_sd: dict) -> tuple[int, int]:
    """(SaRA entries at BUDGET, Train LoRA parameters per rank, Train LoRA rank-independent parameters)."""
    per_rank = fixed = targeted = 0
    for key, tensor in unet_sd.items():
        if key.endswith("weight") and tensor.dim() >= 2:
            per_rank += tensor.shape[0] + tensor[0].numel()
            targeted += tensor.numel()
        else:
            fixed += tensor.numel()  # Train LoRA trains a full diff of every bias and 1-D weight
    return round(BUDGET * targeted), per_rank, fixed


APPLY_SCRIPT = """
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.sd, comfy.utils, torch
import sara_train
from nodes.adapter import patch_model
def apply(load_patches):
    times = []
    for _ in range(5):
        model = comfy.sd.load_diffusion_model(sys.argv[3])
        started = time.perf_counter()
        patched = load_patches(model)
        patched.patch_model()
        times.append(time.perf_counter() - started)
        patched.unpatch_model()
    return statistics.median(times)
sara = apply(lambda m: patch_model(m, sara_train.SparseDelta.load(sys.argv[4]), 1.0))
lora_file = comfy.utils.load_torch_file(sys.argv[5], safe_load=True)
lora = apply(lambda m: comfy.sd.load_lora_for_models(m, None, lora_file, 1.0, 0)[0])
print(json.dumps({"sara": sara, "lora": lora}))
"""


def measure_apply(unet_path: Path, delta_path: Path, lora_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            APPLY_SCRIPT,
            str(comfyui_dir()),
            str(REPO),
            str(unet_path),
            str(delta_path),
            str(lora_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def sampling_graph(model: list, steps: int, seed: int, image_size: int) -> dict:
    graph = base_graph()
    graph["loader"] = {
        "class_type": "SaRALoader",
        "inputs": {"model": ["ckpt", 0], "delta_name": "bench.safetensors", "strength": 1.0},
    }
    graph["empty"] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": image_size, "height": image_size, "batch_size": 1},
    }
    graph["ks"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "positive": ["pos", 0],
            "negative": ["pos", 0],
            "latent_image": ["empty", 0],
            "seed": seed,
            "steps": steps,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
        },
    }
    graph["out"] = {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "bench"}}
    return graph


def measure_sampling(base: Path, steps: int, image_size: int) -> dict[str, float]:
    server = ComfyUIServer(base)
    try:
        result = {}
        for name, model in (("base", ["ckpt", 0]), ("sara", ["loader", 0])):
            timed_run(server, sampling_graph(model, 2, 0, image_size))  # load and patch once
            times = [timed_run(server, sampling_graph(model, steps, seed, image_size)) for seed in (1, 2, 3)]
            result[name] = statistics.median(times) / steps
        return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="training steps of the short run (the long run is 2x)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=20)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the built-in Plot Loss Graph divides by zero on one point)")

    import torch
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        unet_path = write_model("sd15", base / "models" / "unet" / "tiny.safetensors")
        write_tiny_sd15_checkpoint(unet_path, base / "models" / "checkpoints" / CKPT)
        write_training_images(base / "input", count=2, size=args.image_size)
        unet_sd = load_file(str(unet_path))
        sara_count, per_rank, fixed = trainable_counts(unet_sd)
        rank = max(1, round((sara_count - fixed) / per_rank))
        print(
            f"tiny SD1.5 UNet: {sum(t.numel() for t in unet_sd.values()):,} parameters; SaRA budget {BUDGET} = "
            f"{sara_count:,} entries; Train LoRA rank {rank} = {rank * per_rank + fixed:,} parameters "
            f"({fixed:,} of them bias/norm diffs)"
        )

        rows = []
        for method in ("sara", "lora"):
            peak, step = measure_training(base, method, args.steps, rank)
            rows.append((method, peak, step))

        delta = make_delta(unet_sd, 1, BUDGET)
        delta_path = delta.save(base / "models" / "sara" / "bench.safetensors", dtype=torch.float16)
        delta_bytes = delta_path.stat().st_size
        lora_rank = max(1, round(delta_bytes / 2 / per_rank))  # fp16 LoRA of about the same file size
        generator = torch.Generator().manual_seed(0)
        lora = {}
        for key, tensor in unet_sd.items():
            if key.endswith("weight") and tensor.dim() >= 2:
                name = "diffusion_model." + key.removesuffix(".weight")
                lora[f"{name}.lora_up.weight"] = (
                    torch.randn(tensor.shape[0], lora_rank, generator=generator) * 0.01
                ).half()
                lora[f"{name}.lora_down.weight"] = torch.randn(
                    lora_rank, tensor[0].numel(), generator=generator
                ).half()
        lora_path = base / "models" / "loras" / "bench_lora.safetensors"
        lora_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(lora, str(lora_path))
        lora_bytes = lora_path.stat().st_size
        apply = measure_apply(unet_path, delta_path, lora_path)
        sampling = measure_sampling(base, args.sample_steps, args.image_size)

    print(
        f"\nTraining ({args.image_size}x{args.image_size} images, batch 2, fp32, gradient checkpointing, CPU; "
        f"step time from {args.steps} vs {2 * args.steps} steps)"
    )
    print("| method | trainable | peak RSS above loaded model (MiB) | s/step |")
    print("|---|---:|---:|---:|")
    for method, peak, step in rows:
        label = "SaRA Train" if method == "sara" else f"Train LoRA (rank {rank})"
        count = sara_count if method == "sara" else rank * per_rank + fixed
        print(f"| {label} | {count:,} | {peak:.0f} | {step:.3f} |")
    print("\nApplying to the UNet (load file + patch weights, median of 5)")
    print("| file | size (MiB) | seconds |")
    print("|---|---:|---:|")
    print(f"| SaRA delta (fp16 values) | {delta_bytes / 2**20:.1f} | {apply['sara']:.3f} |")
    print(f"| LoRA rank {lora_rank} (fp16) | {lora_bytes / 2**20:.1f} | {apply['lora']:.3f} |")
    print(f"\nSampling ({args.sample_steps} Euler steps, {args.image_size}x{args.image_size}, median of 3)")
    print("| model | s/step |")
    print("|---|---:|")
    print(f"| base | {sampling['base']:.4f} |")
    print(f"| base + SaRA delta (SaRA Load) | {sampling['sara']:.4f} |")


if __name__ == "__main__":
    main()
