"""Model-family knowledge: how each family names its weights in each tool, and its checkpoint
layouts. Importing this package registers every family's key naming with the engine's delta path
(``sara_train.engine.apply.register_naming``); ``import sara_train`` does that.

    sd_unet.py           Stable Diffusion 1.x/2.x/XL UNets: diffusers <-> original (LDM/ComfyUI) names
    flux.py, sd3.py      Flux.1 and SD3/3.5 transformers: original (ComfyUI) <-> diffusers, fused q/k/v split
    block_naming.py      the rule tables those two are written in
    diffusers_folder.py  merging deltas into a diffusers pipeline folder (shards, variants)
"""

from ..engine.apply import register_naming
from . import flux, sd3
from .sd_unet import StableDiffusionUNetNaming

register_naming(StableDiffusionUNetNaming())
register_naming(flux.NAMING)
register_naming(sd3.NAMING)
