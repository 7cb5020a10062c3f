"""Python start-up for a ComfyUI that looks like a ComfyUI-Manager install of this pack: only
ComfyUI's requirements and our requirements.txt. Put this folder first on PYTHONPATH.

The packages a Manager install does not have are hidden from the import system (``find_spec``
returns None, as for a package that is not installed), and the editable install of
``sara_train`` made by ``make test`` is removed, so ComfyUI must load ``sara_train`` from the
cloned pack itself. One line in the log shows it took effect.
"""

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys

NOT_INSTALLED = {"diffusers", "accelerate", "matplotlib", "peft"}


class WithoutPackages(importlib.abc.MetaPathFinder):
    """The standard path finder, minus ``NOT_INSTALLED``."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in NOT_INSTALLED:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def find_distributions(self, context=None):
        context = context or importlib.metadata.DistributionFinder.Context()
        if (context.name or "").replace("-", "_").lower() in NOT_INSTALLED:
            return iter(())
        return importlib.machinery.PathFinder.find_distributions(context)

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [
    WithoutPackages() if finder is importlib.machinery.PathFinder else finder
    for finder in sys.meta_path
    if "editable" not in getattr(finder, "__name__", "").lower()
]
found = importlib.util.find_spec("sara_train") is not None
print(
    f"manager-like environment: sara_train importable on its own: {found}; blocked: {sorted(NOT_INSTALLED)}",
    flush=True,
)
