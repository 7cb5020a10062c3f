"""ComfyUI entry point of the SaRA node pack.

ComfyUI imports this folder as a package and awaits ``comfy_entrypoint()``. The engine,
``sara_train``, lives beside ``nodes/``; when the pack is installed by cloning (ComfyUI-Manager)
rather than ``pip install``, this folder is put on ``sys.path`` so ``import sara_train`` finds it.
``nodes`` is imported only when ComfyUI asks for the extension, so importing this file outside
ComfyUI (e.g. by pytest) needs no ComfyUI modules.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("sara_train") is None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WEB_DIRECTORY = "./web"
"""Front-end extension served by ComfyUI: the live loss chart of SaRA Train."""


async def comfy_entrypoint():
    from .nodes import SaRAExtension

    return SaRAExtension()
