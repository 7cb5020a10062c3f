"""The glyph model's text encoder: a word-level tokenizer over a fixed vocabulary and a small
transformer, trained from scratch with the UNet (no downloads).

A prompt such as ``"the letter g, serif bold"`` is split into words (commas and spaces separate
them; case is kept, "g" and "G" are different words), prefixed with ``<start>`` and padded with
``<pad>`` to ``max_length`` tokens. The empty prompt ``""`` (the unconditional prompt of
classifier-free guidance) is ``<start>`` and padding. The encoder maps token ids [B, L] to hidden
states [B, L, width] that the UNet cross-attends to.

Saved as ``text_encoder.safetensors`` (float32 weights) and ``text_encoder.json`` (its
``TextEncoderConfig``, vocabulary included).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..engine.errors import SaRAError
from ..engine.files import atomic_output, read_safetensors_header
from .glyphs import ALL_FONTS, CHARACTERS

START = "<start>"
PAD = "<pad>"
WEIGHTS_FILE = "text_encoder.safetensors"
CONFIG_FILE = "text_encoder.json"
_WORD = re.compile(r"[^\s,]+")


def glyph_vocabulary() -> list[str]:
    """The demo's words: special tokens, prompt words, every character, every catalogued style word
    (the held-out font's "italic" included: it exists, but the base never trains on it)."""
    style_words = sorted({word for font in ALL_FONTS for word in font.style.split()})
    return [START, PAD, "the", "letter", "digit", *CHARACTERS, *style_words]


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a ``TextEncoder``. ``vocabulary`` lists the known words; ids are list positions."""

    vocabulary: tuple[str, ...]
    max_length: int = 8
    width: int = 128
    layers: int = 2
    heads: int = 4
    feedforward: int = 256

    def __post_init__(self) -> None:
        if (
            len(set(self.vocabulary)) != len(self.vocabulary)
            or START not in self.vocabulary
            or PAD not in self.vocabulary
        ):
            raise SaRAError(
                f"text encoder vocabulary must hold distinct words including {START!r} "
                f"and {PAD!r}; got {list(self.vocabulary)}"
            )
        if self.width % self.heads:
            raise SaRAError(f"text encoder width {self.width} is not divisible by heads {self.heads}")


class WordTokenizer:
    """Prompts -> token ids [B, max_length] (int64): ``<start>`` + words + ``<pad>``s."""

    def __init__(self, vocabulary: Sequence[str], max_length: int) -> None:
        self.vocabulary = list(vocabulary)
        self.max_length = max_length
        self.ids = {word: index for index, word in enumerate(self.vocabulary)}

    def words(self, prompt: str) -> list[str]:
        """The words of ``prompt`` (split at spaces and commas)."""
        return _WORD.findall(prompt)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [len(prompts), max_length]. Raises ``SaRAError`` naming an unknown word (with
        the vocabulary) or a prompt with more than ``max_length - 1`` words."""
        rows = []
        for prompt in prompts:
            words = self.words(prompt)
            for word in words:
                if word not in self.ids:
                    raise SaRAError(
                        f"prompt {prompt!r}: unknown word {word!r}; the glyph text encoder "
                        f"knows only these words: {' '.join(self.vocabulary[2:])}"
                    )
            if len(words) > self.max_length - 1:
                raise SaRAError(
                    f"prompt {prompt!r} has {len(words)} words; at most {self.max_length - 1} fit the text encoder"
                )
            ids = [self.ids[START]] + [self.ids[word] for word in words]
            rows.append(ids + [self.ids[PAD]] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)


class TextEncoder(nn.Module):
    """Token embedding + learned positions + pre-norm ``nn.TransformerEncoder`` + final LayerNorm.

    ``forward(token_ids [B, L]) -> hidden_states [B, L, width]`` (float32 unless the module was
    cast). No dropout: the output depends only on the ids and the weights.
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = WordTokenizer(config.vocabulary, config.max_length)
        self.token_embedding = nn.Embedding(len(config.vocabulary), config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        layer = nn.TransformerEncoderLayer(
            config.width,
            config.heads,
            config.feedforward,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        states = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
        return self.final_norm(self.transformer(states))

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Hidden states [len(prompts), max_length, width] of ``prompts``, on the module's device."""
        token_ids = self.tokenizer.encode(prompts).to(self.token_embedding.weight.device)
        return self(token_ids)


def save_text_encoder(encoder: TextEncoder, folder: str | Path) -> None:
    """Write ``folder/text_encoder.safetensors`` (float32) and ``folder/text_encoder.json``,
    each atomically."""
    folder = Path(folder)
    state = {key: value.detach().float().cpu().contiguous() for key, value in encoder.state_dict().items()}
    with atomic_output(folder / WEIGHTS_FILE) as temp:
        temp.write_bytes(save(state, metadata={"format": "sara-glyph-text-encoder"}))
    with atomic_output(folder / CONFIG_FILE) as temp:
        temp.write_text(json.dumps(asdict(encoder.config), indent=1) + "\n")


def load_text_encoder(folder: str | Path) -> TextEncoder:
    """The encoder saved by ``save_text_encoder`` in ``folder``, in eval mode (float32, CPU).

    Raises ``SaRAError`` naming the file if either file is missing or malformed, or the weights do
    not fit the config.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    try:
        fields = json.loads(config_path.read_text())
        fields["vocabulary"] = tuple(fields["vocabulary"])
        config = TextEncoderConfig(**fields)
    except FileNotFoundError:
        raise SaRAError(f"{config_path}: no such file (a glyph text encoder config)") from None
    except (json.JSONDecodeError, KeyError, TypeError, SaRAError) as exc:
        raise SaRAError(f"{config_path}: not a valid text encoder config ({exc})") from None
    weights_path = folder / WEIGHTS_FILE
    read_safetensors_header(weights_path)
    encoder = TextEncoder(config)
    try:
        encoder.load_state_dict(load_file(str(weights_path)))
    except (RuntimeError, SafetensorError) as exc:
        raise SaRAError(f"{weights_path} does not fit the config in {config_path}: {exc}") from None
    return encoder.eval()
