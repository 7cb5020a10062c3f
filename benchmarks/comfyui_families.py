"""SaRA Train per model family in a real ComfyUI: peak memory above the loaded model and time per step.

    python -m benchmarks.comfyui_families                   # every case below
    python -m benchmarks.comfyui_families --cases flux flux_fp8 --steps 2

The models are the test models of ``tools.comfyui_models`` (ComfyUI's own classes, random weights:
SD3 and Wan 2.1 tiny, Flux.1 and Qwen-Image one block deep at full width, stored in bf16), loaded by
UNETLoader with the case's ``weight_dtype``; conditioning and latents (2 x 32x32 images, 8 tokens)
come from the test node. SaRA Train runs with the node's defaults (budget 0.05, rank-loss weight
1e-4, progressive step half way, fp32 compute, gradient checkpointing). Each case runs in a fresh
server: the model and data are loaded first (two sampling steps); peak is the server's VmHWM during an N-step training
run minus its RSS before it; s/step is (2N-step run - N-step run) / N. CPU only (ComfyUI --cpu).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.comfyui_train import rss_kib, timed_run
from tools.comfyui_graphs import FAMILY_SAMPLING, family_train_graph, with_sampling
from tools.comfyui_models import write_model
from tools.comfyui_server import ComfyUIServer

CASES = {  # name: (family, stored dtype of the file, UNETLoader weight_dtype)
    "sd3": ("sd3", "fp32", "default"),
    "sd3_fp8": ("sd3", "fp32", "fp8_e4m3fn"),
    "wan21": ("wan21", "fp32", "default"),
    "flux": ("flux", "bf16", "default"),
    "flux_fp8": ("flux", "bf16", "fp8_e4m3fn"),
    "qwen_image": ("qwen_image", "bf16", "default"),
    "qwen_image_fp8": ("qwen_image", "bf16", "fp8_e4m3fn"),
}


def loaded_graph(family: str, model_file: str, weight_dtype: str) -> dict:
    """The model and the data, loaded and cached by the server: two sampling steps with the model."""
    graph = family_train_graph(family, model_file, 1, weight_dtype=weight_dtype)
    del graph["train"]
    return with_sampling(graph, ["unet", 0], "warm", *FAMILY_SAMPLING)


def measure(base: Path, case: str, steps: int) -> tuple[float, float, float]:
    """(RSS with the model loaded, peak above it during training, both MiB; seconds per step)."""
    family, stored, weight_dtype = CASES[case]
    model_file = f"{family}_{stored}.safetensors"
    server = ComfyUIServer(base)
    try:
        timed_run(server, loaded_graph(family, model_file, weight_dtype))
        before = rss_kib(server.process.pid, "VmRSS")
        Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # reset VmHWM
        short = timed_run(server, family_train_graph(family, model_file, steps, 1e-4, weight_dtype))
        peak = rss_kib(server.process.pid, "VmHWM")
        long = timed_run(server, family_train_graph(family, model_file, 2 * steps, 1e-4, weight_dtype))
        return before / 1024, (peak - before) / 1024, (long - short) / steps
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=4, help="N: the runs take N and 2N steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        rows = []
        for case in args.cases:
            family, stored, _ = CASES[case]
            path = base / "models" / "diffusion_models" / f"{family}_{stored}.safetensors"
            if not path.exists():
                write_model(family, path, stored)
            rows.append((case, *measure(base, case, args.steps)))
        print("| case | RSS with model loaded (MiB) | peak above it while training (MiB) | s/step |")
        print("|---|---:|---:|---:|")
        for case, loaded, peak, seconds in rows:
            print(f"| {case} | {loaded:,.0f} | {peak:,.0f} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
