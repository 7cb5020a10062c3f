"""ComfyUI's real front end in headless Chromium (Debian's ``chromium``, driven by Playwright).

``ComfyUIPage(server)`` opens the UI of a running ``ComfyUIServer``; ``build(spec)`` makes a graph
from a compact spec through LiteGraph (as a user would), ``load``/``set_widgets`` edit workflows,
``to_api_prompt`` converts the open graph with the front end's own ``graphToPrompt``.
"""

from __future__ import annotations

import json
import shutil
import urllib.request

from playwright.sync_api import sync_playwright

BUILD_GRAPH_JS = """(spec) => {
  const graph = app.graph;
  graph.clear();
  const made = {};
  for (const [name, n] of Object.entries(spec.nodes)) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error(`unknown node type ${n.type}`);
    node.pos = n.pos;
    graph.add(node);
    if (n.title) node.title = n.title;
    if (n.size) node.size = n.size;
    for (const [key, value] of Object.entries(n.widgets || {})) {
      const widget = node.widgets.find((w) => w.name === key);
      if (!widget) throw new Error(`${n.type} has no widget ${key}`);
      widget.value = value;
    }
    made[name] = node;
  }
  for (const [source, slot, target, input] of spec.links) {
    const index = made[target].inputs.findIndex((i) => i.name === input);
    if (index < 0) throw new Error(`${spec.nodes[target].type} has no input ${input}`);
    made[source].connect(slot, made[target], index);
  }
  graph.setDirtyCanvas(true, true);
  return JSON.stringify(graph.serialize());  // JSON drops undefined fields, as ComfyUI's own export does
}"""

SET_WIDGETS_JS = """([values]) => {
  for (const [type, widgets] of Object.entries(values)) {
    const nodes = app.graph._nodes.filter((n) => n.type === type);
    if (!nodes.length) throw new Error(`no ${type} node in the graph`);
    for (const node of nodes) for (const [key, value] of Object.entries(widgets)) {
      const widget = node.widgets.find((w) => w.name === key);
      if (!widget) throw new Error(`${type} has no widget ${key}`);
      widget.value = value;
    }
  }
}"""


class ComfyUIPage:
    """A Chromium page on ComfyUI's UI; use as a context manager."""

    def __init__(self, server, width: int = 1500, height: int = 900) -> None:
        self.server = server
        self.size = {"width": width, "height": height}
        self.errors: list[str] = []

    def __enter__(self) -> ComfyUIPage:
        for setting, value in {"Comfy.TutorialCompleted": True, "Comfy.Graph.CanvasInfo": False}.items():
            request = urllib.request.Request(
                f"{self.server.url}/settings/{setting}",
                json.dumps(value).encode(),
                {"Content-Type": "application/json"},
                method="POST",
            )
            urllib.request.urlopen(request, timeout=30).close()
        self._playwright = sync_playwright().start()
        executable = shutil.which("chromium") or shutil.which("chromium-browser")
        if executable is None:
            raise RuntimeError("Chromium is not installed (make test installs Debian's chromium package)")
        self._browser = self._playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        self.page = self._browser.new_page(viewport=self.size)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(self.server.url)
        self.page.wait_for_function(
            "window.app && window.app.graph && window.LiteGraph && app.canvas", timeout=120_000
        )
        self.page.keyboard.press("Escape")
        return self

    def __exit__(self, *exc) -> None:
        self._browser.close()
        self._playwright.stop()

    def build(self, spec: dict) -> dict:
        """Build the graph of ``spec`` (see tools/build_example_workflows.py); returns the workflow."""
        return json.loads(self.page.evaluate(BUILD_GRAPH_JS, spec))

    def fit_view(self) -> None:
        """Zoom the canvas so the whole graph is visible (ComfyUI's "." shortcut; for screenshots)."""
        self.page.evaluate("() => app.canvas.deselectAll()")
        self.page.locator("canvas#graph-canvas").focus()
        self.page.keyboard.press(".")
        self.page.wait_for_timeout(500)

    def load(self, workflow: dict) -> None:
        self.page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", workflow)

    def set_widgets(self, values: dict[str, dict]) -> None:
        """``{node type: {widget: value}}`` for every node of that type in the open graph."""
        self.page.evaluate(SET_WIDGETS_JS, [values])

    def to_api_prompt(self) -> dict:
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def queue(self) -> None:
        """Queue the open graph from the page (so its websocket receives the node's UI output)."""
        self.page.evaluate("async () => { await app.queuePrompt(0, 1); }")
