"""Where SaRA's extra step time goes on a CPU: the weight gradient at the selected entries, three ways.

    python -m benchmarks.weight_gradient

For SD1.5 UNet layer shapes in the CPU setting of ``benchmarks.memory_speed`` (batch 2, 32x32
latents: 2048 tokens at the first level, 512, 128, 32 below; 154 text tokens for cross-attention
keys and values) and several densities of selected entries, the time of:

* dense: the layer's full weight gradient (``gyᵀ x``; for a 3x3 convolution the backward-weights
  kernel), then the k selected entries gathered: what SaRA does;
* sampled: only the k entries, as a sampled dense-dense product over the entries' CSR layout
  (``torch.sparse.sampled_addmm``; for a convolution after unfolding its input);
* gathered: the k dot products from gathered rows, in chunks of 4096 entries (plain PyTorch).

Printed as time relative to dense (below 1 = faster). Each is the median of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch.nn import functional

from sara_train.engine import positions

LINEAR_SHAPES = [  # (label, out, in, rows of the input: batch x tokens)
    ("attention q, level 1", 320, 320, 2048),
    ("cross-attention k", 320, 768, 154),
    ("feed-forward in, level 1", 2560, 320, 2048),
    ("feed-forward out, level 1", 320, 1280, 2048),
    ("attention q, level 2", 640, 640, 512),
    ("attention q, level 3", 1280, 1280, 128),
    ("feed-forward in, level 3", 10240, 1280, 128),
]
CONV_SHAPES = [  # (label, out, in, latent side), 3x3, batch 2
    ("conv 320, 32x32", 320, 320, 32),
    ("conv 640, 16x16", 640, 640, 16),
    ("conv 1280, 8x8", 1280, 1280, 8),
    ("conv 1280, 4x4", 1280, 1280, 4),
]
DENSITIES = (0.01, 0.05, 0.10, 0.20)
BATCH = 2


def median_ms(call: Callable[[], torch.Tensor], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def selected(out_features: int, in_features: int, density: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random sorted flat positions at ``density`` and their CSR layout (columns, row starts)."""
    count = max(1, int(out_features * in_features * density))
    flat = torch.randperm(out_features * in_features)[:count].sort().values.to(torch.int32)
    columns, row_starts = positions.compress(flat, (out_features, in_features))
    return flat, positions.column_indices(columns), row_starts


def sampled(grad_out: torch.Tensor, inputs: torch.Tensor, columns: torch.Tensor, row_starts: torch.Tensor):
    """``(grad_outᵀ inputs)`` at the CSR positions only: grad_out [n, out], inputs [n, in]."""
    shape = (grad_out.shape[1], inputs.shape[1])
    layout = torch.sparse_csr_tensor(row_starts, columns, torch.zeros(columns.numel()), shape)
    return torch.sparse.sampled_addmm(layout, grad_out.T.contiguous(), inputs.contiguous(), beta=0.0).values()


def gathered(grad_out: torch.Tensor, inputs: torch.Tensor, flat: torch.Tensor, in_features: int) -> torch.Tensor:
    grad_rows, input_rows = grad_out.T.contiguous(), inputs.T.contiguous()
    rows, cols = flat.long() // in_features, flat.long() % in_features
    out = torch.empty(flat.numel())
    for start in range(0, flat.numel(), 4096):
        part = slice(start, start + 4096)
        out[part] = (grad_rows[rows[part]] * input_rows[cols[part]]).sum(1)
    return out


def linear_row(out_features: int, in_features: int, tokens: int, density: float, repeats: int) -> list[float]:
    grad_out, inputs = torch.randn(tokens, out_features), torch.randn(tokens, in_features)
    flat, columns, row_starts = selected(out_features, in_features, density)
    dense = lambda: (grad_out.T @ inputs).view(-1)[flat]
    reference = dense()
    for other in (sampled(grad_out, inputs, columns, row_starts), gathered(grad_out, inputs, flat, in_features)):
        torch.testing.assert_close(other, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    base = median_ms(dense, repeats)
    return [
        base,
        median_ms(lambda: sampled(grad_out, inputs, columns, row_starts), repeats) / base,
        median_ms(lambda: gathered(grad_out, inputs, flat, in_features), repeats) / base,
    ]


def conv_row(out_channels: int, in_channels: int, side: int, density: float, repeats: int) -> list[float]:
    x = torch.randn(BATCH, in_channels, side, side)
    grad_out = torch.randn(BATCH, out_channels, side, side)
    weight_shape = (out_channels, in_channels, 3, 3)
    flat, columns, row_starts = selected(out_channels, in_channels * 9, density)

    def dense() -> torch.Tensor:
        mask = (False, True, False)  # the weight gradient only
        grad = torch.ops.aten.convolution_backward(
            grad_out, x, torch.empty(weight_shape), None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, mask
        )[1]
        return grad.reshape(-1)[flat]

    def unfolded() -> tuple[torch.Tensor, torch.Tensor]:
        columns_of_x = functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, in_channels * 9)
        return grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels), columns_of_x

    reference = dense()
    torch.testing.assert_close(
        sampled(*unfolded(), columns, row_starts), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max())
    )
    base = median_ms(dense, repeats)
    return [
        base,
        median_ms(lambda: sampled(*unfolded(), columns, row_starts), repeats) / base,
        median_ms(lambda: gathered(*unfolded(), flat, in_channels * 9), repeats) / base,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
    torch.manual_seed(0)
    print(f"\nCPU, {torch.get_num_threads()} threads, fp32; dense ms, then sampled / gathered relative to dense\n")
    header = " | ".join(f"{d:.0%}: dense ms, sampled, gathered" for d in DENSITIES)
    print(f"| layer | shape | {header} |")
    print("|---|---|" + "---|" * len(DENSITIES))
    for label, out_features, in_features, tokens in LINEAR_SHAPES:
        cells = [linear_row(out_features, in_features, tokens, d, args.repeats) for d in DENSITIES]
        shape = f"{out_features}x{in_features}, {tokens} rows"
        print(f"| {label} | {shape} | " + " | ".join(f"{c[0]:.1f}, {c[1]:.2f}, {c[2]:.2f}" for c in cells) + " |")
    for label, out_channels, in_channels, side in CONV_SHAPES:
        cells = [conv_row(out_channels, in_channels, side, d, args.repeats) for d in DENSITIES]
        shape = f"{out_channels}x{in_channels}x3x3, {BATCH}x{side}x{side}"
        print(f"| {label} | {shape} | " + " | ".join(f"{c[0]:.1f}, {c[1]:.2f}, {c[2]:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
