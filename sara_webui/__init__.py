"""The A1111 / Forge / reForge extension: ``<sara:name:weight>`` in prompts, for native SaRA delta
files in ``models/sara`` (or ``models/Lora``), applied through each webui's own LoRA machinery.

``scripts/sara_webui.py`` is the entry the webuis import at start-up; it calls ``hooks.install``
with the built-in Lora extension's modules. The hooks only need what they are given, so tests pass
small stand-ins of those modules (``tests/webui_standins.py``).

    hooks.py   list the files, load them (A1111: a sparse network module per layer; Forge/reForge:
               the exact "full" difference their loader reads), register the ``sara`` tag
"""
