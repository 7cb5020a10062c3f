"""Peak memory and step time of SaRA vs other ways to fine-tune the SD1.5 UNet.

    python -m benchmarks.memory_speed                      # CPU setting: batch 2, 32x32 latents
    python -m benchmarks.memory_speed --setting realistic  # batch 4, 64x64 latents (use a GPU)
    python -m benchmarks.memory_speed --device cuda --dtype bf16 --batch 8 --size 128 --checkpointing \
        --methods floor sara sara_8bit lora lora_bf16             # a GPU table row

Every method runs in its own process on a diffusers ``UNet2DConditionModel`` with the SD1.5
configuration and random weights. Peak memory is the peak RSS of the training loop on CPU (the
kernel's VmHWM, reset after the model is built) or ``torch.cuda.max_memory_allocated`` on GPU.
The "floor" back-propagates through the frozen UNet to its input with nothing trainable: what any
adapter pays anyway. Overhead = peak - floor peak.

State per trainable entry: the bytes of every tensor a method keeps for its trainable entries (values
or adapter weights, optimizer state, SaRA's positions and pretrained values), gradients not
counted, divided by the trainable count; split into the compute device and elsewhere (SaRA's
pretrained values with ``base_device="cpu"``: on a CPU-only run that is the same memory).
``sara`` is SaRA with fp32 AdamW; ``sara_dense`` the same with ``weight_gradient="dense"`` (every
layer's dense weight gradient, gathered; no difference on a GPU); ``sara_8bit`` with 8-bit moments
and, on a GPU, the pretrained values in CPU memory; ``sara_low_res`` leaves the full-resolution
layers out (the same count trains on the others). ``lora`` has fp32 adapters (cast: peft makes them in the base
layer's dtype), ``lora_bf16`` its adapters in the model's dtype (bf16 with ``--dtype bf16``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sara_train.evidence.methods import lora_rank_for

SETTINGS = {"cpu": (2, 32), "realistic": (4, 64)}
METHODS = [
    "floor",
    "sara",
    "sara_dense",
    "sara_8bit",
    "sara_low_res",
    "lora",
    "lora_bf16",
    "supertuning",
    "masked_dense",
    "full",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRAINABLE = 50_000_000


def build_unet(device: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).to(device, dtype)


def linear_and_conv_names(unet: nn.Module, linear_only: bool = False) -> list[str]:
    types = (nn.Linear,) if linear_only else (nn.Linear, nn.Conv2d)
    return [name for name, m in unet.named_modules() if isinstance(m, types)]


def setup(
    method: str, unet: nn.Module, rank_layers_per_step: int, device: str
) -> tuple[list[torch.Tensor], callable, torch.optim.Optimizer | None, callable]:
    """Make ``method``'s tensors trainable. Returns (trainable tensors, extra loss term fn, optimizer or
    None for the default AdamW, fn giving the state bytes ``(on the compute device, elsewhere)``)."""
    import sara_train

    unet.requires_grad_(False)
    no_extra = lambda: 0.0
    if method == "floor":
        return [], no_extra, None, lambda: (0, 0, {})
    if method == "full":
        unet.requires_grad_(True)
        return list(unet.parameters()), no_extra, None, None
    if method in ("sara", "sara_dense", "sara_8bit", "sara_low_res"):
        from sara_train.engine.optim import sara_optimizer_class
        from sara_train.families.sd_unet import full_resolution_modules

        base_device = "cpu" if method == "sara_8bit" and device != "cpu" else None
        exclude = full_resolution_modules(unet.config) if method == "sara_low_res" else []
        weight_gradient = "dense" if method == "sara_dense" else "auto"
        config = sara_train.SaRAConfig(
            budget=TRAINABLE, base_device=base_device, exclude=exclude, weight_gradient=weight_gradient
        )
        optimizer = sara_optimizer_class("8bit" if method == "sara_8bit" else "fp32")(unet, lr=1e-5, config=config)
        handle = optimizer.handle
        tensors = lambda: [t for update in handle.layers.values() for t in (*update.buffers(), update.values)]
        return (
            list(handle.parameters()),
            lambda: 1e-4 * handle.rank_loss(rank_layers_per_step),
            optimizer,
            lambda: (*state_bytes([*tensors(), *optimizer_state(optimizer)], device), sara_breakdown(optimizer)),
        )
    if method == "masked_dense":
        from sara_train.engine.selection import find_targets, select_entries

        targets = find_targets(unet, sara_train.SaRAConfig())
        weights = {t.name: getattr(t.module, t.param_name) for t in targets}
        _, indices = select_entries(weights, sara_train.SaRAConfig(budget=TRAINABLE))
        params = []
        for name, flat in indices.items():
            weight = weights[name]
            mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            mask[flat.long()] = True
            weight.requires_grad_(True)
            weight.register_hook(functools.partial(torch.mul, other=mask.view_as(weight)))
            params.append(weight)
        return params, no_extra, None, None
    from peft import LoraConfig, inject_adapter_in_model

    if method in ("lora", "lora_bf16"):
        rank = lora_rank_for(unet, TRAINABLE)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=linear_and_conv_names(unet))
    elif method == "supertuning":
        from peft import SupertuningConfig

        names = linear_and_conv_names(unet, linear_only=True)
        total = sum(unet.get_submodule(n).weight.numel() for n in names)
        config = SupertuningConfig(target_modules=names, sparsity=1 - TRAINABLE / total, select_top=False)
    else:
        raise SystemExit(f"unknown method {method}")
    inject_adapter_in_model(config, unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    adapter_dtype = next(unet.parameters()).dtype if method == "lora_bf16" else torch.float32
    for param in params:  # peft makes adapters in the base layer's dtype
        param.data = param.data.to(adapter_dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    return params, no_extra, optimizer, lambda: (*state_bytes([*params, *optimizer_state(optimizer)], device), {})


def sara_breakdown(optimizer) -> dict[str, int]:
    """Bytes of SaRA's state by what it holds."""
    roles = {
        "values": ("values",),
        "positions": ("columns", "row_starts"),
        "pretrained values": ("base_values", "frozen_base"),
    }
    parts = dict.fromkeys([*roles, "Adam moments", "other"], 0)
    for update in optimizer.handle.layers.values():
        for name, tensor in [*update.named_buffers(), ("values", update.values)]:
            role = next((role for role, names in roles.items() if name in names), "other")
            parts[role] += tensor.numel() * tensor.element_size()
    parts["Adam moments"] = sum(
        t.numel() * t.element_size() for t in {id(t): t for t in optimizer_state(optimizer)}.values()
    )
    return parts


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]


def state_bytes(tensors: list[torch.Tensor], device: str) -> tuple[int, int]:
    """Bytes of the distinct ``tensors`` (a tensor held twice counts once): (on ``device``, elsewhere)."""
    distinct = {id(t): t for t in tensors}.values()
    on = sum(t.numel() * t.element_size() for t in distinct if t.device.type == torch.device(device).type)
    return on, sum(t.numel() * t.element_size() for t in distinct) - on


def peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(method: str, args: argparse.Namespace) -> dict:
    batch, size, device, dtype = args.batch, args.size, args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    unet = build_unet(device, dtype)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params, extra_loss, optimizer, measure_state = setup(method, unet, args.rank_layers_per_step, device)
    if optimizer is None and params:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, size, size, generator=generator).to(device, dtype)
    target = torch.randn(batch, 4, size, size, generator=generator).to(device, dtype)
    text = torch.randn(batch, 77, 768, generator=generator).to(device, dtype)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    if method == "floor":
        latents.requires_grad_(True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        peak_rss_reset()
    times, extra_times = [], []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(unet(latents, timesteps, text).sample.float(), target.float())
        extra_start = time.perf_counter()
        loss = loss + extra_loss()
        extra_times.append(time.perf_counter() - extra_start)
        loss.backward()
        if optimizer:
            optimizer.step()
        latents.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    trainable = sum(p.numel() for p in params)
    on_device, elsewhere, breakdown = measure_state() if measure_state else (None, None, {})
    return {
        "method": method,
        "trainable": trainable,
        "state_per_entry": (on_device / trainable, elsewhere / trainable) if on_device and trainable else None,
        "state_breakdown": {role: size / trainable for role, size in breakdown.items()},
        "peak_bytes": peak,
        "step_s": statistics.median(times[1:]),
        "rank_loss_s": statistics.median(extra_times[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, default="cpu", help="batch and latent size, unless given")
    parser.add_argument("--batch", type=int, help="images per step (overrides --setting)")
    parser.add_argument("--size", type=int, help="latent side (overrides --setting)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="the UNet's weights and activations")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--rank-layers-per-step", type=int, default=4)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or SETTINGS[args.setting][0]
    args.size = args.size or SETTINGS[args.setting][1]
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    results = {}
    for method in args.methods:
        command = [sys.executable, __file__, "--worker", method, "--device", args.device, "--dtype", args.dtype]
        command += ["--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps)]
        command += ["--rank-layers-per-step", str(args.rank_layers_per_step)]
        command += ["--checkpointing"] if args.checkpointing else []
        print(f"running {method} ...", file=sys.stderr, flush=True)
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(output.strip().splitlines()[-1])
    print_table(results, args)


def print_table(results: dict, args) -> None:
    floor = results.get("floor", {}).get("peak_bytes")
    gib = 2**30
    print(
        f"\nSD1.5 UNet, {args.device}, batch {args.batch}, {args.size}x{args.size} latents, {args.dtype}, "
        f"checkpointing {'on' if args.checkpointing else 'off'}, median of {args.steps} steps\n"
    )
    print(
        "| method | trainable | state B/entry (compute device + elsewhere) | peak memory (GiB) "
        "| overhead above floor (GiB) | step (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for method, r in results.items():
        overhead = f"{(r['peak_bytes'] - floor) / gib:.2f}" if floor is not None and method != "floor" else "-"
        state = "-" if not r["state_per_entry"] else "{:.2f} + {:.2f}".format(*r["state_per_entry"])
        print(
            f"| {method} | {r['trainable'] / 1e6:.1f}M | {state} | {r['peak_bytes'] / gib:.2f} | {overhead} "
            f"| {r['step_s']:.2f} |"
        )
    for method, r in results.items():
        if r["state_breakdown"]:
            parts = ", ".join(f"{role} {size:.2f}" for role, size in r["state_breakdown"].items())
            print(f"{method} state, bytes per trainable entry: {parts}")
    if "sara" in results:
        sara = results["sara"]
        print(
            f"\nSaRA rank loss ({args.rank_layers_per_step} layers/step): {sara['rank_loss_s']:.3f} s/step, "
            f"{sara['rank_loss_s'] / sara['step_s']:.1%} of the step"
        )
        for other in ("lora", "supertuning"):
            if other in results and floor is not None:
                ratio = (sara["peak_bytes"] - floor) / (results[other]["peak_bytes"] - floor)
                print(f"SaRA overhead / {other} overhead: {ratio:.2f} (target <= 0.8)")
        if "full" in results:
            print(
                f"SaRA peak / full fine-tuning peak: {sara['peak_bytes'] / results['full']['peak_bytes']:.2f} "
                "(target <= 0.45)"
            )
        if "lora" in results:
            print(f"SaRA step / LoRA step: {sara['step_s'] / results['lora']['step_s']:.2f} (target <= 1.10)")


if __name__ == "__main__":
    main()
