"""API-format ComfyUI graphs around the SaRA nodes, shared by the tests and the benchmark.

``train_graph`` is the tests' standard training graph: the tiny SD1.5 checkpoint
(``tiny_full.safetensors``), a CLIP-encoded prompt and ``images`` VAE-encoded PNGs batched into
SaRA Train. Saved files follow the nodes' numbering (``<prefix>_<NNNNN>_.safetensors``);
``saved_delta`` finds the newest one for a prefix.
"""

from __future__ import annotations

from pathlib import Path

CKPT = "tiny_full.safetensors"


def sara_train_inputs(**overrides) -> dict:
    """Every widget input of SaRA Train at the values the tests and benchmarks start from (fp32 for
    exact comparisons, 2 images a step), updated with ``overrides``; the caller links ``model``,
    ``latents`` and ``positive``."""
    inputs = {
        "steps": 30,
        "batch_size": 2,
        "grad_accumulation": 1,
        "learning_rate": 1e-2,
        "budget": 0.05,
        "threshold": 0.0,
        "rank_loss_weight": 1e-4,
        "progressive_fraction": 0.5,
        "seed": 7,
        "training_dtype": "fp32",
        "gradient_checkpointing": True,
        "save_every": 0,
        "save_prefix": "run",
        "existing_delta": "[None]",
        "timestep_sampling": "uniform",
        "min_snr_gamma": 0.0,
        "caption_dropout": 0.0,
        "ema_decay": 0.0,
    }
    inputs.update(overrides)
    return inputs


def train_graph(steps: int = 30, learning_rate: float = 1e-2, images: int = 2, **options) -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode, LoadImage x images -> VAEEncode -> LatentBatch -> SaRATrain."""
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red square"}},
    }
    latents = None
    for i in range(images):
        graph[f"img{i}"] = {"class_type": "LoadImage", "inputs": {"image": f"train_{i}.png"}}
        graph[f"enc{i}"] = {"class_type": "VAEEncode", "inputs": {"pixels": [f"img{i}", 0], "vae": ["ckpt", 2]}}
        if latents is None:
            latents = [f"enc{i}", 0]
        else:
            graph[f"batch{i}"] = {
                "class_type": "LatentBatch",
                "inputs": {"samples1": latents, "samples2": [f"enc{i}", 0]},
            }
            latents = [f"batch{i}", 0]
    graph["train"] = {
        "class_type": "SaRATrain",
        "inputs": {
            "model": ["ckpt", 0],
            "latents": latents,
            "positive": ["pos", 0],
            **sara_train_inputs(steps=steps, learning_rate=learning_rate, **options),
        },
    }
    return graph


def with_save(graph: dict, prefix: str, values_dtype: str = "fp32") -> dict:
    """``graph`` plus SaRA Save of the Train node's delta as ``models/sara/<prefix>_NNNNN_.safetensors``."""
    graph["save"] = {
        "class_type": "SaRASave",
        "inputs": {"delta": ["train", 1], "filename_prefix": prefix, "values_dtype": values_dtype},
    }
    return graph


def saved_delta(comfyui_base: Path, prefix: str) -> Path:
    """The newest ``models/sara/<prefix>_NNNNN_.safetensors`` under a server's base folder."""
    files = sorted((Path(comfyui_base) / "models" / "sara").glob(f"{prefix}_[0-9][0-9][0-9][0-9][0-9]_.safetensors"))
    if not files:
        raise FileNotFoundError(f"no saved delta {prefix}_NNNNN_.safetensors in {comfyui_base}/models/sara")
    return files[-1]


def with_model_save(graph: dict, model: list, prefix: str) -> dict:
    """``graph`` plus ModelSave of ``model`` as ``output/diffusion_models/tr_<prefix>_NNNNN_.safetensors``."""
    graph[f"modelsave_{prefix}"] = {
        "class_type": "ModelSave",
        "inputs": {"model": model, "filename_prefix": f"diffusion_models/tr_{prefix}"},
    }
    return graph


def with_sampling(
    graph: dict,
    model: list,
    prefix: str,
    positive: list | None = None,
    negative: list | None = None,
    latents: list | None = None,
) -> dict:
    """``graph`` plus 2 Euler steps with ``model``, saved as ``output/latents/tr_<prefix>_NNNNN_.latent``.
    Conditioning defaults to the prompt node ``pos`` (both sides), latents to an empty 64x64 SD latent."""
    if latents is None:
        graph[f"empty_{prefix}"] = {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        }
        latents = [f"empty_{prefix}", 0]
    positive = positive or ["pos", 0]
    graph[f"ks_{prefix}"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "positive": positive,
            "negative": negative or positive,
            "latent_image": latents,
            "seed": 3,
            "steps": 2,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
        },
    }
    graph[f"sl_{prefix}"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [f"ks_{prefix}", 0], "filename_prefix": f"latents/tr_{prefix}"},
    }
    return graph


def family_train_graph(
    family: str, model_file: str, steps: int, learning_rate: float = 1e-2, weight_dtype: str = "default", **options
) -> dict:
    """UNETLoader(``models/diffusion_models/<model_file>``) and the test node's random conditioning and
    latents for ``family`` (``tools/comfyui_test_nodes``) -> SaRATrain. Sample with
    ``with_sampling(graph, model, prefix, *FAMILY_SAMPLING)``."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": model_file, "weight_dtype": weight_dtype}},
        "data": {
            "class_type": "TestConditioningAndLatents",
            "inputs": {"family": family, "seed": 0, "size": 32, "batch_size": 2, "tokens": 8},
        },
        "train": {
            "class_type": "SaRATrain",
            "inputs": {
                "model": ["unet", 0],
                "latents": ["data", 2],
                "positive": ["data", 0],
                **sara_train_inputs(steps=steps, learning_rate=learning_rate, **options),
            },
        },
    }


FAMILY_SAMPLING = (["data", 0], ["data", 1], ["data", 2])
"""``with_sampling``'s positive, negative and latents in a ``family_train_graph``."""


def output_file(server, folder: str, prefix: str) -> str:
    """The one file a ModelSave / SaveLatent of this module wrote with ``prefix``."""
    matches = sorted((server.base / "output" / folder).glob(f"tr_{prefix}_0*"))
    assert len(matches) == 1, matches
    return str(matches[0])


def unet_of(checkpoint: dict) -> dict:
    """The diffusion model's tensors of a saved checkpoint, without the ``model.diffusion_model.`` prefix."""
    return {
        k.removeprefix("model.diffusion_model."): v
        for k, v in checkpoint.items()
        if k.startswith("model.diffusion_model.")
    }
