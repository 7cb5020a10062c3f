"""A test-only ComfyUI node: random conditioning and latents for the models ``tools.comfyui_models``
builds, so a graph can train and sample any family without its text encoders or VAE.

``ComfyUIServer`` links this folder into the test server's ``custom_nodes``; it is not part of the
node pack. Output shapes follow ``FAMILY_INPUTS``: context ``[B, tokens, context_dim]`` with the
family's extra keys (``pooled_output``, ``guidance``), latents ``[B, C, h, w]`` or, for video
families, ``[B, C, 1, h, w]``; ``h, w`` = size / 8. Deterministic in ``seed``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from comfy_api.latest import ComfyExtension, io

# ComfyUI imports this folder as a top-level package (no ``tools`` parent): load the sibling module by path.
_spec = importlib.util.spec_from_file_location(
    "sara_test_models", Path(__file__).resolve().parent.parent / "comfyui_models.py"
)
_models = sys.modules["sara_test_models"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(_models)
FAMILY_INPUTS = _models.FAMILY_INPUTS


def random_conditioning(family: str, generator: torch.Generator, batch: int, tokens: int) -> list:
    """ComfyUI CONDITIONING ``[[context, extras]]`` for ``family`` drawn from ``generator``."""
    inputs = FAMILY_INPUTS[family]
    context = torch.randn(batch, tokens, inputs.context_dim, generator=generator)
    extras = {}
    if inputs.pooled_dim is not None:
        extras["pooled_output"] = torch.randn(batch, inputs.pooled_dim, generator=generator)
    if inputs.guidance is not None:
        extras["guidance"] = inputs.guidance
    return [[context, extras]]


class TestConditioningAndLatents(io.ComfyNode):
    """Random positive and negative conditioning and a batch of random latents for a model family."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TestConditioningAndLatents",
            display_name="Test Conditioning + Latents",
            category="testing",
            inputs=[
                io.Combo.Input("family", options=list(FAMILY_INPUTS)),
                io.Int.Input("seed", default=0, min=0, max=2**32 - 1),
                io.Int.Input("size", default=32, min=8, max=1024, step=8, tooltip="image side in pixels"),
                io.Int.Input("batch_size", default=2, min=1, max=64),
                io.Int.Input("tokens", default=8, min=1, max=512),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.Latent.Output(display_name="latents"),
            ],
        )

    @classmethod
    def execute(cls, family: str, seed: int, size: int, batch_size: int, tokens: int) -> io.NodeOutput:
        generator = torch.Generator().manual_seed(seed)
        positive = random_conditioning(family, generator, batch_size, tokens)
        negative = random_conditioning(family, generator, batch_size, tokens)
        inputs = FAMILY_INPUTS[family]
        frames = (1,) if inputs.video else ()
        shape = (batch_size, inputs.latent_channels, *frames, size // 8, size // 8)
        return io.NodeOutput(positive, negative, {"samples": torch.randn(shape, generator=generator)})


class TestNodes(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TestConditioningAndLatents]


async def comfy_entrypoint() -> TestNodes:
    return TestNodes()
