"""Flux.1 (dev, schnell; Chroma-style variants keep the same block names): the original naming
(Black Forest Labs' checkpoints, ComfyUI) <-> diffusers' ``FluxTransformer2DModel``.

Fused there, split here: each double block's image and text attention ``qkv`` (thirds), each
single block's ``linear1`` (q, k, v of the model width, then the MLP input). The final layer's
adaptive norm stores (shift, scale) in the original and (scale, shift) in diffusers. Everything else
is a rename. Verified against diffusers' own converter and ComfyUI's modules (tests/test_dit_namings.py).
"""

from __future__ import annotations

from .block_naming import ALL, REST, THIRD, WIDTH, BlockNaming, Rule, Scope

SCOPES = {
    "model": Scope(),
    "double": Scope("double_blocks.{i}.", "transformer_blocks.{i}."),
    "single": Scope("single_blocks.{i}.", "single_transformer_blocks.{i}."),
}


def _rename(scope: str, original: str, diffusers: str) -> Rule:
    return Rule(scope, original, ((diffusers, ALL),))


RULES = (
    _rename("model", "img_in.{wb}", "x_embedder.{wb}"),
    _rename("model", "txt_in.{wb}", "context_embedder.{wb}"),
    _rename("model", "time_in.in_layer.{wb}", "time_text_embed.timestep_embedder.linear_1.{wb}"),
    _rename("model", "time_in.out_layer.{wb}", "time_text_embed.timestep_embedder.linear_2.{wb}"),
    _rename("model", "vector_in.in_layer.{wb}", "time_text_embed.text_embedder.linear_1.{wb}"),
    _rename("model", "vector_in.out_layer.{wb}", "time_text_embed.text_embedder.linear_2.{wb}"),
    _rename("model", "guidance_in.in_layer.{wb}", "time_text_embed.guidance_embedder.linear_1.{wb}"),
    _rename("model", "guidance_in.out_layer.{wb}", "time_text_embed.guidance_embedder.linear_2.{wb}"),
    _rename("model", "final_layer.linear.{wb}", "proj_out.{wb}"),
    Rule("model", "final_layer.adaLN_modulation.1.{wb}", (("norm_out.linear.{wb}", ALL),), swap=True),
    _rename("double", "img_mod.lin.{wb}", "norm1.linear.{wb}"),
    _rename("double", "txt_mod.lin.{wb}", "norm1_context.linear.{wb}"),
    Rule(
        "double",
        "img_attn.qkv.{wb}",
        (("attn.to_q.{wb}", THIRD), ("attn.to_k.{wb}", THIRD), ("attn.to_v.{wb}", THIRD)),
    ),
    Rule(
        "double",
        "txt_attn.qkv.{wb}",
        (("attn.add_q_proj.{wb}", THIRD), ("attn.add_k_proj.{wb}", THIRD), ("attn.add_v_proj.{wb}", THIRD)),
    ),
    _rename("double", "img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    _rename("double", "img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    _rename("double", "txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    _rename("double", "txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
    _rename("double", "img_attn.proj.{wb}", "attn.to_out.0.{wb}"),
    _rename("double", "txt_attn.proj.{wb}", "attn.to_add_out.{wb}"),
    _rename("double", "img_mlp.0.{wb}", "ff.net.0.proj.{wb}"),
    _rename("double", "img_mlp.2.{wb}", "ff.net.2.{wb}"),
    _rename("double", "txt_mlp.0.{wb}", "ff_context.net.0.proj.{wb}"),
    _rename("double", "txt_mlp.2.{wb}", "ff_context.net.2.{wb}"),
    _rename("single", "modulation.lin.{wb}", "norm.linear.{wb}"),
    Rule(
        "single",
        "linear1.{wb}",
        (("attn.to_q.{wb}", WIDTH), ("attn.to_k.{wb}", WIDTH), ("attn.to_v.{wb}", WIDTH), ("proj_mlp.{wb}", REST)),
    ),
    _rename("single", "norm.query_norm.scale", "attn.norm_q.weight"),
    _rename("single", "norm.key_norm.scale", "attn.norm_k.weight"),
    _rename("single", "linear2.{wb}", "proj_out.{wb}"),  # input columns [attention | MLP] in both
)


def width(original: dict[str, tuple[int, ...]]) -> int:
    """The hidden size: the rows of ``img_in``."""
    return original["img_in.weight"][0]


NAMING = BlockNaming(
    "Flux naming (original <-> diffusers)",
    SCOPES,
    RULES,
    signatures={
        "original": ("img_in.weight", "double_blocks.0.img_attn.qkv.weight"),
        "diffusers": (
            "x_embedder.weight",
            "transformer_blocks.0.attn.to_q.weight",
            "single_transformer_blocks.0.proj_mlp.weight",
        ),
    },
    width=width,
)
