"""Pretrain the demo's glyph base model (``sara_train/demo/base/``) from scratch.

The committed base was made on one NVIDIA H100 (3 minutes) with:

    python -m tools.pretrain_glyph_base --out sara_train/demo/base --check-dir /tmp/glyph_checks

(defaults: 1900 steps of batch 256, AdamW lr 1e-3 with 500 warm-up steps and cosine decay to
1e-4, bias-corrected EMA 0.999, bf16 autocast on CUDA, seed 0). On a 2-core CPU the same command
would take about two days; ``--steps 200 --batch-size 32`` is a smoke test (~10 minutes).

Data: every character of every font in ``PRETRAINING_FONTS`` (upright fonts only; the demo's
held-out italic font and the word "italic" are never used), rendered by ``sara_train.demo.glyphs``.
Each example's caption is "the letter g, serif bold" (80%), "the letter g" (10%: the style left
to the model) or "" (10%: the unconditional prompt for classifier-free guidance). The UNet and the
text encoder train together on the v-prediction loss of the model's DDPM noise; the saved weights
are the exponential moving average. Seeded: the same command on the same device gives the same
weights up to the last bits (cuDNN is set deterministic; embedding gradients on CUDA use atomic
adds). With ``--check-dir`` it also samples every pretraining (font, character) pair, prints the
character accuracy per font and writes the grids there.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sara_train.demo.glyphs import CHARACTERS, PRETRAINING_FONTS, glyph_prompt, render_font
from sara_train.demo.metrics import character_accuracy
from sara_train.demo.model import GlyphModel, generate, glyph_grid, new_glyph_model, save_glyph_model

STYLE_LESS_FRACTION = 0.1
EMPTY_FRACTION = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("sara_train/demo/base"), help="model folder to write")
    parser.add_argument("--steps", type=int, default=1900)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument(
        "--check-dir",
        type=Path,
        default=None,
        help="sample every pretraining glyph after training; write grids and accuracies here",
    )
    return parser.parse_args(argv)


def pretraining_data(device: torch.device) -> tuple[torch.Tensor, list[list[str]]]:
    """Glyphs [F*62, 1, 32, 32] (font-major) and, per glyph, its three captions:
    [full, style-less, empty]."""
    glyphs = torch.cat([render_font(font) for font in PRETRAINING_FONTS]).to(device)
    captions = [
        [glyph_prompt(char, font.style), glyph_prompt(char), ""] for font in PRETRAINING_FONTS for char in CHARACTERS
    ]
    return glyphs, captions


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to ``args.lr``, then cosine decay to a tenth of it at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: GlyphModel, args: argparse.Namespace) -> list[float]:
    """Train ``model`` in place; its modules end up holding the exponential moving average of their
    weights, bias-corrected like Adam's moments: the EMA starts at the random initialisation
    ``w_0`` and after ``T`` updates still holds ``decay**T * w_0`` (15% at decay 0.999 and 1900
    steps), which ``(ema - decay**T * w_0) / (1 - decay**T)`` removes. Returns the loss of every
    ``log_every``-th step."""
    device = torch.device(args.device)
    glyphs, captions = pretraining_data(device)
    # Every caption encoded once per step as token ids: [num_glyphs, 3, L].
    token_ids = torch.stack([model.text_encoder.tokenizer.encode(variants) for variants in captions]).to(device)
    caption_choice = torch.tensor(
        [1.0 - STYLE_LESS_FRACTION - EMPTY_FRACTION, STYLE_LESS_FRACTION, EMPTY_FRACTION], device=device
    )
    modules = torch.nn.ModuleList([model.unet, model.text_encoder]).to(device).train()
    parameters = list(modules.parameters())
    initial = [p.detach().clone() for p in parameters]
    ema = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    num_timesteps = model.noise_scheduler.config.num_train_timesteps
    losses = []
    started = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        index = torch.randint(0, glyphs.shape[0], (args.batch_size,), device=device)
        variant = torch.multinomial(caption_choice, args.batch_size, replacement=True)
        clean = glyphs[index]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, num_timesteps, (args.batch_size,), device=device)
        noisy = model.noise_scheduler.add_noise(clean, noise, timesteps)
        velocity = model.noise_scheduler.get_velocity(clean, noise, timesteps)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            text = model.text_encoder(token_ids[index, variant])
            prediction = model.unet(noisy, timesteps, text).sample
        loss = F.mse_loss(prediction.float(), velocity)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in parameters], 1 - args.ema_decay)
        if step % args.log_every == 0 or step == args.steps - 1:
            losses.append(loss.item())
            print(
                f"step {step:6d}  loss {losses[-1]:.4f}  lr {learning_rate(step, args):.2e}  "
                f"{time.time() - started:7.1f}s",
                flush=True,
            )
    remaining_initial = args.ema_decay**args.steps
    with torch.no_grad():
        for param, average, start in zip(parameters, ema, initial):
            param.copy_((average - remaining_initial * start) / (1 - remaining_initial))
    modules.eval()
    return losses


def check(model: GlyphModel, folder: Path, seed: int) -> dict[str, float]:
    """Sample every (pretraining font, character) pair; write one grid per font group and return
    the character accuracy per style."""
    folder.mkdir(parents=True, exist_ok=True)
    accuracies = {}
    rows, labels = [], []
    for font in PRETRAINING_FONTS:
        generated = generate(model, [glyph_prompt(char, font.style) for char in CHARACTERS], seed=seed)
        accuracies[font.style] = character_accuracy(generated, list(CHARACTERS))
        rows += [list(render_font(font)), list(generated)]
        labels += [f"{font.style} (font)", f"{font.style} (generated)"]
    for part, columns in (("lower", slice(0, 26)), ("upper_digits", slice(26, 62))):
        glyph_grid([row[columns] for row in rows], labels, list(CHARACTERS[columns]), scale=2).save(
            folder / f"base_{part}.png"
        )
    return accuracies


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = True
    model = new_glyph_model(seed=args.seed)
    started = time.time()
    losses = train(model, args)
    seconds = time.time() - started
    device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    model.provenance = {
        "script": "tools/pretrain_glyph_base.py",
        "argv": sys.argv[1:],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "seed": args.seed,
        "device": device_name,
        "torch": torch.__version__,
        "train_seconds": round(seconds),
        "final_loss": round(losses[-1], 5),
        "fonts": {font.file_name: font.style for font in PRETRAINING_FONTS},
    }
    print(f"trained {args.steps} steps in {seconds:.0f}s on {device_name}", flush=True)
    if args.check_dir is not None:
        accuracies = check(model, args.check_dir, args.seed)
        for style, accuracy in accuracies.items():
            print(f"character accuracy  {style:12s} {accuracy:.3f}")
        mean = sum(accuracies.values()) / len(accuracies)
        print(f"character accuracy  mean         {mean:.3f}")
        model.provenance["character_accuracy"] = round(mean, 4)
    save_glyph_model(model.to("cpu"), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
