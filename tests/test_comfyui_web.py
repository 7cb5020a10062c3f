"""The front end in a real browser: example workflows run, and SaRA Train draws its live loss chart.

Headless Chromium opens the test server's UI; the example workflows from ``example_workflows/``
are loaded as a user would, pointed at the tiny test models, and queued.
Set ``SARA_SCREENSHOTS=docs/images`` to also save the screenshots used in the README.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tools.comfyui_browser import ComfyUIPage
from tools.comfyui_graphs import saved_delta
from tools.comfyui_server import REPO, execution_error

EXAMPLES = REPO / "example_workflows"
TEST_VALUES = {
    "CheckpointLoaderSimple": {"ckpt_name": "tiny_full.safetensors"},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
}
TRAIN_STEPS = 12

CHART_STATE_JS = """() => {
  const node = app.graph._nodes.find((n) => n.type === 'SaRATrain');
  const element = document.querySelector('.sara-loss-chart');
  const canvas = element && element.querySelector('canvas');
  let inked = 0;
  if (canvas && canvas.width) {
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 0; i < pixels.length; i += 4) if (pixels[i + 2] > 200 && pixels[i] < 150) inked++;
  }
  return {status: node.saraChart.status, points: Number(element && element.dataset.points), inked,
          stored: node.properties.sara_loss.length, events: window.__saraEvents.length};
}"""


def wait_until_idle(server, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = server.get("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.3)
    raise AssertionError("the queue did not empty")


def screenshot(page: ComfyUIPage, name: str) -> None:
    folder = os.environ.get("SARA_SCREENSHOTS")
    if folder:
        page.fit_view()
        Path(folder).mkdir(parents=True, exist_ok=True)
        size = page.page.viewport_size  # below the top banner, left of the side bar's queue panel
        page.page.screenshot(
            path=str(Path(folder) / name),
            clip={"x": 60, "y": 80, "width": size["width"] - 60, "height": size["height"] - 80},
        )


@pytest.fixture(scope="module")
def page(comfy):
    server, _ = comfy
    with ComfyUIPage(server, width=2200, height=1250) as page:  # wide enough to render text when fitted
        yield page
    assert not page.errors, page.errors


def test_train_example_draws_the_live_loss_chart(comfy, page) -> None:
    server, _ = comfy
    page.load(json.loads((EXAMPLES / "sara_train_and_sample.json").read_text()))
    page.set_widgets(
        {
            **TEST_VALUES,
            "LoadImage": {"image": "train_0.png"},
            "SaRATrain": {"steps": TRAIN_STEPS, "training_dtype": "fp32", "save_every": 0},
            "SaRASave": {"filename_prefix": "web_example"},
        }
    )
    page.page.evaluate(
        "() => { window.__saraEvents = []; "
        "app.api.addEventListener('sara.loss', (e) => window.__saraEvents.push(e.detail)); }"
    )
    page.queue()
    page.page.wait_for_function(
        "() => app.graph._nodes.find((n) => n.type === 'SaRATrain').saraChart.status.startsWith('done')",
        timeout=300_000,
    )
    state = page.page.evaluate(CHART_STATE_JS)
    assert state["events"] == TRAIN_STEPS  # one live event per step, received while training
    assert state["points"] == state["stored"] == TRAIN_STEPS
    assert state["inked"] > 50, state  # the curve is drawn in the canvas
    assert state["status"].startswith(f"done: {TRAIN_STEPS}/{TRAIN_STEPS} steps")
    saved = page.page.evaluate(
        "() => app.graph.serialize().nodes.find((n) => n.type === 'SaRATrain').properties.sara_loss.length"
    )
    assert saved == TRAIN_STEPS  # kept with the workflow after the run
    wait_until_idle(server)
    assert saved_delta(server.base, "web_example").exists()
    assert list((server.base / "output").glob("sara_*.png")), "the example's SaveImage wrote the sample"
    screenshot(page, "sara_train_workflow.png")


def test_load_example_runs_through_the_http_api(comfy, page) -> None:
    server, _ = comfy
    page.load(json.loads((EXAMPLES / "sara_load_and_sample.json").read_text()))
    page.set_widgets(
        {
            **TEST_VALUES,
            "SaRALoader": {"delta_name": "a.safetensors"},
            "SaveImage": {"filename_prefix": "web_load_example"},
        }
    )
    entry = server.run(page.to_api_prompt())
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert images and images[0]["filename"].startswith("web_load_example")
    screenshot(page, "sara_load_workflow.png")


def test_flux_example_converts_to_a_prompt_of_known_nodes(comfy, page) -> None:
    """The Flux example (fp8 UNETLoader -> SaRA Train with FluxGuidance conditioning -> KSampler)
    loads in the front end and converts to an API prompt of nodes this server knows, wired as
    built. It is not run: that needs the real Flux, CLIP-L/T5 and VAE files."""
    server, _ = comfy
    page.load(json.loads((EXAMPLES / "sara_flux_train_and_sample.json").read_text()))
    prompt = page.to_api_prompt()
    known = server.get("/object_info")
    assert {node["class_type"] for node in prompt.values()} <= known.keys()
    by_type = {node["class_type"]: (key, node["inputs"]) for key, node in prompt.items()}
    unet_key, unet_inputs = by_type["UNETLoader"]
    assert unet_inputs["weight_dtype"] == "fp8_e4m3fn"
    _, train_inputs = by_type["SaRATrain"]
    assert train_inputs["model"] == [unet_key, 0]
    assert train_inputs["positive"] == [by_type["FluxGuidance"][0], 0]
    assert train_inputs["training_dtype"] == "bf16" and train_inputs["gradient_checkpointing"] is True
    assert by_type["KSampler"][1]["model"] == [by_type["SaRATrain"][0], 0]
    assert by_type["SaRASave"][1]["delta"] == [by_type["SaRATrain"][0], 1]
