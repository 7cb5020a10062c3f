"""Run by test_dit_namings.py in a subprocess (ComfyUI's import changes process-wide state):
``python dit_namings_check.py <comfyui dir> <repo>``. Builds Flux and SD3.5 small in diffusers and in
ComfyUI, checks our naming tables between them and prints one JSON line of results per family."""
# ruff: noqa: E402  (ComfyUI and the project are importable only after the sys.path line)

import json
import sys

import torch

sys.path[:0] = [sys.argv[1], sys.argv[2]]
import comfy.cli_args

comfy.cli_args.args.cpu = True
import comfy.ops
import comfy.utils
from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from tiny_dit import original_state  # the original-naming state dict, built through the naming table

import sara_train
from sara_train.families import flux, sd3


def randomise(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)


def trained_delta(module, seed):
    handle = sara_train.inject(module, sara_train.SaRAConfig(budget=0.2, include_bias=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for values in handle.parameters():
            values.add_(torch.randn(values.shape, generator=generator) * 0.05)
    delta = handle.delta()
    handle.remove(merge=False)
    return delta


def check(name, naming, diffusers_model, comfy_model, keymap, run_diffusers, run_comfy):
    randomise(diffusers_model, 1)
    state = original_state(naming, diffusers_model.state_dict())
    comfy_model.load_state_dict(state, strict=True)
    ours = {}
    for key, pieces in naming.table({k: tuple(v.shape) for k, v in state.items()}).items():
        for piece in pieces:
            ours[piece.key] = (key, piece.start, piece.stop, piece.target_row)
    agree = (
        all(  # ComfyUI's own diffusers key map: {diffusers key: comfy key or (comfy key, (dim, offset, size), ...)}
            (ours[d][0] == (c if isinstance(c, str) else c[0]))
            and (isinstance(c, str) or len(c) > 2 or (ours[d][1] == c[1][1] and ours[d][2] - ours[d][1] == c[1][2]))
            for d, c in keymap.items()
            if d in ours
        )
    )
    with torch.no_grad():
        same = (run_diffusers() - run_comfy()).abs().max().item()
    results = {
        "outputs": same,
        "keymap_agrees": agree,
        "keymap_covered": sum(d in ours for d in keymap),
        "keys": len(ours),
    }
    for direction, source, target, run_target in (
        ("diffusers->comfy", diffusers_model, comfy_model, run_comfy),
        ("comfy->diffusers", comfy_model, diffusers_model, run_diffusers),
    ):
        delta = trained_delta(source, 2)
        restore = delta.apply_to(target)
        with torch.no_grad():
            target_out = run_target()
        restore.restore()
        restore = delta.apply_to(source)
        with torch.no_grad():
            source_out = (run_diffusers if source is diffusers_model else run_comfy)()
        restore.restore()
        fitted = delta.fit(target)
        results[direction] = {
            "difference": (target_out - source_out).abs().max().item(),
            "entries": [delta.num_entries, fitted.num_entries],
            "fused": sum(1 for k in fitted.layers if k.endswith("qkv.weight") or "linear1" in k),
        }
    print(json.dumps({name: results}))


D = 32
generator = torch.Generator().manual_seed(3)
img, txt, y = (
    torch.randn(1, 16, 64, generator=generator),
    torch.randn(1, 5, 32, generator=generator),
    torch.randn(1, 32, generator=generator),
)
img_ids = torch.zeros(4, 4, 3)
img_ids[..., 1], img_ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
img_ids, txt_ids = img_ids.reshape(16, 3), torch.zeros(5, 3)
t, guidance = torch.tensor([0.7]), torch.tensor([3.5])
diffusers_flux = FluxTransformer2DModel(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
comfy_flux = Flux(
    in_channels=16,
    out_channels=16,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=D,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[4, 6, 6],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
    dtype=torch.float32,
    device="cpu",
    operations=comfy.ops.disable_weight_init,
)
check(
    "flux",
    flux.NAMING,
    diffusers_flux,
    comfy_flux,
    comfy.utils.flux_to_diffusers({"depth": 2, "depth_single_blocks": 2, "hidden_size": D}, output_prefix=""),
    lambda: diffusers_flux(
        hidden_states=img,
        encoder_hidden_states=txt,
        pooled_projections=y,
        timestep=t,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )[0],
    lambda: comfy_flux.forward_orig(img.clone(), img_ids[None], txt.clone(), txt_ids[None], t, y, guidance=guidance),
)

layers, dual = 3, [0, 1]
x, context, pooled = (
    torch.randn(1, 16, 8, 8, generator=generator),
    torch.randn(1, 5, 32, generator=generator),
    torch.randn(1, 32, generator=generator),
)
step = torch.tensor([700.0])
diffusers_sd3 = SD3Transformer2DModel(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=layers,
    attention_head_dim=64,
    num_attention_heads=layers,
    joint_attention_dim=32,
    caption_projection_dim=64 * layers,
    pooled_projection_dim=32,
    out_channels=16,
    pos_embed_max_size=16,
    dual_attention_layers=tuple(dual),
    qk_norm="rms_norm",
)
comfy_sd3 = MMDiT(
    input_size=None,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    depth=layers,
    mlp_ratio=4.0,
    adm_in_channels=32,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 64 * layers}},
    num_patches=256,
    pos_embed_max_size=16,
    pos_embed_scaling_factor=None,
    qk_norm="rms",
    x_block_self_attn_layers=dual,
    dtype=torch.float32,
    device="cpu",
    operations=comfy.ops.disable_weight_init,
)
check(
    "sd3.5",
    sd3.NAMING,
    diffusers_sd3,
    comfy_sd3,
    comfy.utils.mmdit_to_diffusers({"depth": layers}, output_prefix=""),
    lambda: diffusers_sd3(
        hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=step, return_dict=False
    )[0],
    lambda: comfy_sd3(x.clone(), step, y=pooled, context=context),
)
