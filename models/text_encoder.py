"""Text-to-video: captions -> token embeddings of a frozen CLIP text encoder (transformers), as Stable Diffusion
conditions on them.

- `TextEncoder` tokenizes captions (padded to the tokenizer's length, 77 for SD) and returns the last hidden
  states (B, L, D): the context SD's UNet cross-attends to (SD 2.x's converted encoder already ends at the layer
  SD uses). The content model takes them as they are; the motion DiT pools them into its adaLN conditioning
  (models.dit.TextEmbedder). The null condition of guidance is the empty prompt's encoding.
- `load_text_encoder` reads a pipeline folder (text_encoder/ and tokenizer/, as Stable Diffusion ships), a CLIP
  folder holding both, or a hub id.
- `CaptionTable` encodes each distinct caption once and looks batches up; captions it has not seen are encoded
  when they come.

transformers is imported when an encoder is loaded, not with this module: class-conditional runs never pay it.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from models.vae import from_pretrained

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")  # a folder holding a tokenizer has one


class TextEncoderLoadError(ValueError):
    """A text encoder path or id that does not load; the message is one line that names it."""


class TextEncoder(nn.Module):
    """A frozen tokenizer + CLIP text model: captions -> (B, L, D) float32 token embeddings."""

    def __init__(self, tokenizer, model: nn.Module, chunk: int = 256):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        positions = int(model.config.max_position_embeddings)
        given = getattr(tokenizer, "model_max_length", positions) or positions
        self.length = min(int(given), positions)  # tokenizers without a limit report a huge model_max_length
        self.dim = int(model.config.hidden_size)
        self.chunk = int(chunk)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: its outputs are cached, so they must never change

    @property
    def shape(self) -> tuple[int, int]:
        """(L, D): tokens per caption and their width."""
        return self.length, self.dim

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> (B, L, D) float32 on the encoder's device, `chunk` captions per model call."""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(captions), self.chunk):
            tokens = self.tokenizer(list(captions[start : start + self.chunk]), padding="max_length",
                                    max_length=self.length, truncation=True, return_tensors="pt")
            out.append(self.model(tokens.input_ids.to(device)).last_hidden_state.float())
        return torch.cat(out) if out else torch.zeros(0, self.length, self.dim, device=device)


def load_text_encoder(source: str, device="cpu") -> TextEncoder:
    """The frozen CLIP text encoder and its tokenizer from a local folder (a Stable Diffusion pipeline folder
    holding text_encoder/ and tokenizer/, or one folder holding both) or a hub id (its text_encoder/ and tokenizer/
    subfolders when it is a pipeline)."""
    from transformers import CLIPTextModel, CLIPTokenizer  # here: class-conditional runs never import transformers
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per load in every rank's log says nothing

    if not source:
        raise TextEncoderLoadError("config key 'text.encoder' is empty: text conditioning needs a CLIP text encoder "
                                   "folder or hub id")
    model = from_pretrained(CLIPTextModel, source, "text_encoder", "text.encoder", TextEncoderLoadError)
    tokenizer = from_pretrained(CLIPTokenizer, source, "tokenizer", "text.encoder", TextEncoderLoadError,
                                files=TOKENIZER_FILES)
    return TextEncoder(tokenizer, model).to(device)


class CaptionTable:
    """Token embeddings of captions, each distinct caption encoded once: `table(captions)` -> (B, L, D) on the
    table's device. `add` encodes a set of captions ahead (a run's training captions); others are encoded and kept
    when first asked for."""

    def __init__(self, encoder: TextEncoder, device):
        self.encoder, self.device = encoder, torch.device(device)
        self.rows: dict[str, int] = {}
        self.values = torch.zeros(0, *encoder.shape, device=self.device)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, captions: Iterable[str]) -> None:
        new = [c for c in dict.fromkeys(captions) if c not in self.rows]
        if not new:
            return
        self.rows.update({caption: len(self.rows) + i for i, caption in enumerate(new)})
        self.values = torch.cat([self.values, self.encoder(new).to(self.device)])

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        self.add(captions)
        return self.values[torch.tensor([self.rows[c] for c in captions], device=self.device)]

    def state_dict(self) -> dict:
        return {"captions": list(self.rows), "values": self.values.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.rows = {caption: i for i, caption in enumerate(state["captions"])}
        self.values = state["values"].to(self.device)
