"""Stable Diffusion 3 / 3.5 (MMDiT, and SD3.5's MMDiT-X dual attention): the original naming
(Stability's checkpoints, ComfyUI) <-> diffusers' ``SD3Transformer2DModel``.

Fused there, split here: the image and context attention ``qkv`` of each joint block, and the second
image attention of dual-attention blocks (thirds). Two adaptive norms store (shift, scale) in the
original and (scale, shift) in diffusers: the final layer's and the last joint block's context norm
(that block's context stream only conditions the image stream). Everything else is a rename.
Verified against diffusers' own converter and ComfyUI's modules (tests/test_dit_namings.py).
"""

from __future__ import annotations

from .block_naming import ALL, THIRD, BlockNaming, Rule, Scope

SCOPES = {
    "model": Scope(),
    "joint": Scope("joint_blocks.{i}.", "transformer_blocks.{i}."),
    "joint_last": Scope("joint_blocks.{i}.", "transformer_blocks.{i}.", blocks="last"),
    "joint_not_last": Scope("joint_blocks.{i}.", "transformer_blocks.{i}.", blocks="not_last"),
}


def _rename(scope: str, original: str, diffusers: str) -> Rule:
    return Rule(scope, original, ((diffusers, ALL),))


def _qkv(original: str, q: str, k: str, v: str) -> Rule:
    return Rule("joint", original, ((q, THIRD), (k, THIRD), (v, THIRD)))


RULES = (
    _rename("model", "pos_embed", "pos_embed.pos_embed"),
    _rename("model", "x_embedder.proj.{wb}", "pos_embed.proj.{wb}"),
    _rename("model", "t_embedder.mlp.0.{wb}", "time_text_embed.timestep_embedder.linear_1.{wb}"),
    _rename("model", "t_embedder.mlp.2.{wb}", "time_text_embed.timestep_embedder.linear_2.{wb}"),
    _rename("model", "y_embedder.mlp.0.{wb}", "time_text_embed.text_embedder.linear_1.{wb}"),
    _rename("model", "y_embedder.mlp.2.{wb}", "time_text_embed.text_embedder.linear_2.{wb}"),
    _rename("model", "context_embedder.{wb}", "context_embedder.{wb}"),
    _rename("model", "final_layer.linear.{wb}", "proj_out.{wb}"),
    Rule("model", "final_layer.adaLN_modulation.1.{wb}", (("norm_out.linear.{wb}", ALL),), swap=True),
    _qkv("x_block.attn.qkv.{wb}", "attn.to_q.{wb}", "attn.to_k.{wb}", "attn.to_v.{wb}"),
    _qkv("context_block.attn.qkv.{wb}", "attn.add_q_proj.{wb}", "attn.add_k_proj.{wb}", "attn.add_v_proj.{wb}"),
    _qkv("x_block.attn2.qkv.{wb}", "attn2.to_q.{wb}", "attn2.to_k.{wb}", "attn2.to_v.{wb}"),
    _rename("joint", "x_block.attn.ln_q.weight", "attn.norm_q.weight"),
    _rename("joint", "x_block.attn.ln_k.weight", "attn.norm_k.weight"),
    _rename("joint", "context_block.attn.ln_q.weight", "attn.norm_added_q.weight"),
    _rename("joint", "context_block.attn.ln_k.weight", "attn.norm_added_k.weight"),
    _rename("joint", "x_block.attn2.ln_q.weight", "attn2.norm_q.weight"),
    _rename("joint", "x_block.attn2.ln_k.weight", "attn2.norm_k.weight"),
    _rename("joint", "x_block.attn.proj.{wb}", "attn.to_out.0.{wb}"),
    _rename("joint", "context_block.attn.proj.{wb}", "attn.to_add_out.{wb}"),
    _rename("joint", "x_block.attn2.proj.{wb}", "attn2.to_out.0.{wb}"),
    _rename("joint", "x_block.adaLN_modulation.1.{wb}", "norm1.linear.{wb}"),
    _rename("joint", "x_block.mlp.fc1.{wb}", "ff.net.0.proj.{wb}"),
    _rename("joint", "x_block.mlp.fc2.{wb}", "ff.net.2.{wb}"),
    _rename("joint", "context_block.mlp.fc1.{wb}", "ff_context.net.0.proj.{wb}"),
    _rename("joint", "context_block.mlp.fc2.{wb}", "ff_context.net.2.{wb}"),
    _rename("joint_not_last", "context_block.adaLN_modulation.1.{wb}", "norm1_context.linear.{wb}"),
    Rule("joint_last", "context_block.adaLN_modulation.1.{wb}", (("norm1_context.linear.{wb}", ALL),), swap=True),
)

NAMING = BlockNaming(
    "SD3 naming (original <-> diffusers)",
    SCOPES,
    RULES,
    signatures={
        "original": ("x_embedder.proj.weight", "joint_blocks.0.x_block.attn.qkv.weight"),
        "diffusers": ("pos_embed.proj.weight", "transformer_blocks.0.attn.to_q.weight"),
    },
    width=lambda original: original["x_embedder.proj.weight"][0],
)
