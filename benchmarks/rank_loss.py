"""The rank loss on DiT-wide layers: exact (Gram + eigh) against the sparse estimate.

    python -m benchmarks.rank_loss                 # Flux.1 layer shapes, 1% and 5% of entries trained
    python -m benchmarks.rank_loss --density 0.02

Each row is one layer of a Flux.1 block (ComfyUI's shapes: fused qkv 9216 x 3072, MLP 12288 x 3072
and 3072 x 12288, single-block linear1 21504 x 3072, projections 3072 x 3072) with SaRA selecting
the given fraction of entries (budget) of a randomly initialised Linear, and a trained-like update:
Gaussian values whose scale differs by row (1x to 4x). Times are one call each on this machine's
threads; "norm err" is |estimate / exact - 1|; "grad cos" the cosine between the two gradients at
the trainable entries. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import sara_train
from sara_train.engine import rank_loss

FLUX_LAYERS = {
    "img_attn.proj": (3072, 3072),
    "img_attn.qkv": (9216, 3072),
    "img_mlp.0": (12288, 3072),
    "img_mlp.2": (3072, 12288),
    "single linear1": (21504, 3072),
}


def trained_like_update(out_features: int, in_features: int, density: float) -> sara_train.SaRAHandle:
    torch.manual_seed(0)
    handle = sara_train.inject(nn.Linear(in_features, out_features, bias=False), sara_train.SaRAConfig(budget=density))
    (update,) = handle.layers.values()
    rows = update.flat_indices.long() // in_features
    row_scale = 1 + 3 * torch.rand(out_features)
    with torch.no_grad():
        update.values.add_(0.3 * handle.threshold * torch.randn(update.values.shape) * row_scale[rows])
    return handle


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, nargs="+", default=[0.01, 0.05])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| layer | shape | trained | exact s | estimate s | speed-up | norm err | grad cos |")
    print("|---|---|---|---|---|---|---|---|")
    for density in args.density:
        for name, (out_features, in_features) in FLUX_LAYERS.items():
            handle = trained_like_update(out_features, in_features, density)
            (update,) = handle.layers.values()
            exact_s, (exact_norm, exact_grad) = timed(rank_loss.exact_nuclear_norm_and_grad, update)
            estimate_s, (norm, grad) = timed(rank_loss.estimated_nuclear_norm_and_grad, update)
            cosine = float(torch.nn.functional.cosine_similarity(grad.double(), exact_grad.double(), dim=0))
            print(
                f"| {name} | {out_features}x{in_features} | {density:.0%} | {exact_s:.2f} | {estimate_s:.3f} "
                f"| {exact_s / estimate_s:.0f}x | {abs(float(norm / exact_norm) - 1):.4f} | {cosine:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
