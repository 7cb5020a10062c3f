"""A1111 / Forge / reForge start-up entry of the SaRA extension: ``<sara:name:weight>`` for SaRA
delta files in ``models/sara`` (see ``sara_webui.hooks``). The webui imports this file with the
extension's folder on ``sys.path``; it needs the built-in Lora extension, loaded before it."""

import logging
import os

from modules import extra_networks, paths, script_callbacks, shared

try:
    import network
    import networks
except ImportError:  # the built-in Lora extension is disabled
    network = networks = None

if networks is None:
    logging.getLogger("sara_webui").warning("SaRA: the built-in Lora extension is not loaded; <sara:…> is unavailable")
else:
    from sara_webui.hooks import install

    folder = os.path.join(paths.models_path, "sara")
    os.makedirs(folder, exist_ok=True)
    style = install(networks, network, [folder], shared, extra_networks, script_callbacks.on_before_ui)
    print(f"SaRA: <sara:name:weight> loads deltas from {folder} ({style} style)")
