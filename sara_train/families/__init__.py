"""Model-family knowledge: how each family names its weights in each tool, and its checkpoint
layouts. Importing this package registers every family's key naming with the engine's delta path
(``sara_train.engine.apply.register_naming``); ``import sara_train`` does that.

    sd_unet.py           Stable Diffusion 1.x/2.x/XL UNets: diffusers <-> original (LDM/ComfyUI) names
    diffusers_folder.py  merging deltas into a diffusers pipeline folder (shards, variants)
"""

from ..engine.apply import register_naming
from .sd_unet import StableDiffusionUNetNaming

register_naming(StableDiffusionUNetNaming())
