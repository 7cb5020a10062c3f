"""Write ``example_workflows/*.json``: the graphs are built in ComfyUI's own front end (headless
Chromium against a real server with this pack), so the files are in exactly the format ComfyUI's
template browser and "Load" expect.

    .venv/bin/python -m tools.build_example_workflows   # needs chromium (make test installs it)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tools.comfyui_browser import ComfyUIPage
from tools.comfyui_server import REPO, ComfyUIServer

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
PROMPT = "a photo of sks plushie on a table"


def sampling_nodes(model: list, x: int) -> tuple[dict, list]:
    """KSampler -> VAEDecode -> SaveImage after ``model``; returns (nodes, links)."""
    nodes = {
        "empty": {"type": "EmptyLatentImage", "pos": [x, 560], "widgets": {"width": 512, "height": 512}},
        "sampler": {
            "type": "KSampler",
            "pos": [x + 320, 80],
            "widgets": {
                "seed": 42,
                "control_after_generate": "fixed",
                "steps": 25,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
            },
        },
        "decode": {"type": "VAEDecode", "pos": [x + 660, 80]},
        "save_image": {
            "type": "SaveImage",
            "pos": [x + 660, 200],
            "size": [400, 440],
            "widgets": {"filename_prefix": "sara"},
        },
    }
    links = [
        [model[0], model[1], "sampler", "model"],
        ["positive", 0, "sampler", "positive"],
        ["negative", 0, "sampler", "negative"],
        ["empty", 0, "sampler", "latent_image"],
        ["sampler", 0, "decode", "samples"],
        ["checkpoint", 2, "decode", "vae"],
        ["decode", 0, "save_image", "images"],
    ]
    return nodes, links


def text_nodes() -> tuple[dict, list]:
    nodes = {
        "checkpoint": {"type": "CheckpointLoaderSimple", "pos": [20, 80], "widgets": {"ckpt_name": CHECKPOINT}},
        "positive": {
            "type": "CLIPTextEncode",
            "pos": [380, 80],
            "title": "Prompt (training and sampling)",
            "widgets": {"text": PROMPT},
        },
        "negative": {
            "type": "CLIPTextEncode",
            "pos": [380, 330],
            "title": "Negative prompt",
            "widgets": {"text": "blurry, low quality"},
        },
    }
    links = [["checkpoint", 1, "positive", "clip"], ["checkpoint", 1, "negative", "clip"]]
    return nodes, links


def train_and_sample() -> dict:
    nodes, links = text_nodes()
    nodes.update(
        {
            "image_1": {"type": "LoadImage", "pos": [20, 300], "widgets": {"image": "sara_train_1.png"}},
            "image_2": {"type": "LoadImage", "pos": [20, 700], "widgets": {"image": "sara_train_2.png"}},
            "encode_1": {"type": "VAEEncode", "pos": [380, 580]},
            "encode_2": {"type": "VAEEncode", "pos": [380, 700]},
            "batch": {"type": "LatentBatch", "pos": [600, 640]},
            "train": {
                "type": "SaRATrain",
                "pos": [840, 80],
                "size": [380, 600],
                "widgets": {
                    "steps": 300,
                    "learning_rate": 1e-4,
                    "control_after_generate": "fixed",
                    "save_every": 100,
                    "save_prefix": "my_sara",
                },
            },
            "save_delta": {"type": "SaRASave", "pos": [1260, 700], "widgets": {"filename_prefix": "my_sara_delta"}},
        }
    )
    links += [
        ["image_1", 0, "encode_1", "pixels"],
        ["checkpoint", 2, "encode_1", "vae"],
        ["image_2", 0, "encode_2", "pixels"],
        ["checkpoint", 2, "encode_2", "vae"],
        ["encode_1", 0, "batch", "samples1"],
        ["encode_2", 0, "batch", "samples2"],
        ["checkpoint", 0, "train", "model"],
        ["batch", 0, "train", "latents"],
        ["positive", 0, "train", "positive"],
        ["train", 1, "save_delta", "delta"],
    ]
    sample_nodes, sample_links = sampling_nodes(["train", 0], 1260)
    nodes.update(sample_nodes)
    links += sample_links
    return {"nodes": nodes, "links": links}


def load_and_sample() -> dict:
    nodes, links = text_nodes()
    nodes["sara_load"] = {
        "type": "SaRALoader",
        "pos": [20, 330],
        "widgets": {"delta_name": "my_sara_delta_00001_.safetensors", "strength": 1.0},
    }
    links.append(["checkpoint", 0, "sara_load", "model"])
    sample_nodes, sample_links = sampling_nodes(["sara_load", 0], 700)
    nodes.update(sample_nodes)
    links += sample_links
    return {"nodes": nodes, "links": links}


def flux_train_and_sample() -> dict:
    """The Flux.1 recipe for a 24 GB card: the fp8 model file (SaRA trains it in the overlay mode,
    never writing the fp8 weights), CLIP-L + T5 text encoders, the Flux VAE, bf16 training with
    gradient checkpointing, then sampling with the result."""
    nodes = {
        "unet": {
            "type": "UNETLoader",
            "pos": [20, 60],
            "widgets": {"unet_name": "flux1-dev-fp8.safetensors", "weight_dtype": "fp8_e4m3fn"},
        },
        "clip": {
            "type": "DualCLIPLoader",
            "pos": [20, 220],
            "widgets": {
                "clip_name1": "clip_l.safetensors",
                "clip_name2": "t5xxl_fp8_e4m3fn.safetensors",
                "type": "flux",
            },
        },
        "vae": {"type": "VAELoader", "pos": [20, 420], "widgets": {"vae_name": "ae.safetensors"}},
        "positive": {
            "type": "CLIPTextEncode",
            "pos": [380, 80],
            "title": "Prompt (training and sampling)",
            "widgets": {"text": PROMPT},
        },
        "guidance": {"type": "FluxGuidance", "pos": [380, 330], "widgets": {"guidance": 3.5}},
        "negative": {"type": "ConditioningZeroOut", "pos": [380, 440]},
        "image_1": {"type": "LoadImage", "pos": [20, 540], "widgets": {"image": "sara_train_1.png"}},
        "image_2": {"type": "LoadImage", "pos": [20, 900], "widgets": {"image": "sara_train_2.png"}},
        "encode_1": {"type": "VAEEncode", "pos": [380, 600]},
        "encode_2": {"type": "VAEEncode", "pos": [380, 720]},
        "batch": {"type": "LatentBatch", "pos": [600, 660]},
        "train": {
            "type": "SaRATrain",
            "pos": [840, 80],
            "size": [380, 600],
            "widgets": {
                "steps": 500,
                "learning_rate": 1e-4,
                "control_after_generate": "fixed",
                "training_dtype": "bf16",
                "gradient_checkpointing": True,
                "save_every": 100,
                "save_prefix": "my_flux_sara",
            },
        },
        "save_delta": {"type": "SaRASave", "pos": [1260, 760], "widgets": {"filename_prefix": "my_flux_sara"}},
        "empty": {"type": "EmptySD3LatentImage", "pos": [1260, 560], "widgets": {"width": 1024, "height": 1024}},
        "sampler": {
            "type": "KSampler",
            "pos": [1580, 80],
            "widgets": {
                "seed": 42,
                "control_after_generate": "fixed",
                "steps": 20,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
            },
        },
        "decode": {"type": "VAEDecode", "pos": [1920, 80]},
        "save_image": {
            "type": "SaveImage",
            "pos": [1920, 200],
            "size": [400, 440],
            "widgets": {"filename_prefix": "sara_flux"},
        },
    }
    links = [
        ["clip", 0, "positive", "clip"],
        ["positive", 0, "guidance", "conditioning"],
        ["positive", 0, "negative", "conditioning"],
        ["image_1", 0, "encode_1", "pixels"],
        ["vae", 0, "encode_1", "vae"],
        ["image_2", 0, "encode_2", "pixels"],
        ["vae", 0, "encode_2", "vae"],
        ["encode_1", 0, "batch", "samples1"],
        ["encode_2", 0, "batch", "samples2"],
        ["unet", 0, "train", "model"],
        ["batch", 0, "train", "latents"],
        ["guidance", 0, "train", "positive"],
        ["train", 1, "save_delta", "delta"],
        ["train", 0, "sampler", "model"],
        ["guidance", 0, "sampler", "positive"],
        ["negative", 0, "sampler", "negative"],
        ["empty", 0, "sampler", "latent_image"],
        ["sampler", 0, "decode", "samples"],
        ["vae", 0, "decode", "vae"],
        ["decode", 0, "save_image", "images"],
    ]
    return {"nodes": nodes, "links": links}


EXAMPLES = {
    "sara_train_and_sample": train_and_sample,
    "sara_load_and_sample": load_and_sample,
    "sara_flux_train_and_sample": flux_train_and_sample,
}


def main() -> None:
    out = REPO / "example_workflows"
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as base:
        server = ComfyUIServer(Path(base))
        try:
            with ComfyUIPage(server) as page:
                for name, spec in EXAMPLES.items():
                    workflow = page.build(spec())
                    (out / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
                    print(f"wrote {out / name}.json ({len(workflow['nodes'])} nodes)")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
