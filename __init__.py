"""ComfyUI entry point of the SaRA node pack.

ComfyUI imports this folder as a package and awaits ``comfy_entrypoint()``. The engine,
``sara_train``, lives beside ``nodes/``. When the pack is installed by cloning (ComfyUI-Manager)
rather than ``pip install``, ``sara_train`` is loaded from this folder under its own name, without
putting the folder on ``sys.path`` (that would also expose ``nodes``, ``tests``, ``tools``... to
every other import). ``nodes`` is imported only when ComfyUI asks for the extension, so importing
this file outside ComfyUI (e.g. by pytest) needs no ComfyUI modules.
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("sara_train") is None:
    _package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sara_train")
    _spec = importlib.util.spec_from_file_location(
        "sara_train", os.path.join(_package, "__init__.py"), submodule_search_locations=[_package]
    )
    sys.modules["sara_train"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["sara_train"])

WEB_DIRECTORY = "./web"
"""Front-end extension served by ComfyUI: the live loss chart of SaRA Train."""


async def comfy_entrypoint():
    from .nodes import SaRAExtension

    return SaRAExtension()
