"""The training captions and their text tokens, each distinct caption encoded once and kept with the latent
cache."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from models.weights_file import load_weights_file
from core.checkpoint import atomic_write
from core.config import ConfigError
from core.distributed import DistInfo, barrier


def dataset_captions(dataset, what: str) -> list:
    """The caption of every video of `dataset` (its caption_of), read without decoding a clip."""
    if not hasattr(dataset, "caption_of"):
        raise ConfigError(f"config key 'text.encoder' is set but {what} has no captions: use dataset 'captions' "
                          f"(a video folder and data.captions) or 'synthetic'")
    return [dataset.caption_of(index) for index in range(len(dataset))]


def caption_table(encoder, captions: list, dist: DistInfo, logger, cache_root=None, fingerprint: Optional[str] = None):
    """A CaptionTable on `dist.device` holding every distinct caption of `captions`, encoded once: by rank 0, saved
    under <cache_root>/text-<key>.pt (the key: the encoder's weights `fingerprint` and the captions) and loaded by
    the other ranks and by later runs of the same data. Without `cache_root` nothing is saved."""
    from models.text_encoder import CaptionTable

    table = CaptionTable(encoder, dist.device)
    if cache_root is None:
        table.add(captions)
        return table
    unique = sorted(set(captions))
    key = hashlib.sha1(json.dumps([fingerprint, unique]).encode()).hexdigest()[:16]
    path = Path(cache_root) / f"text-{key}.pt"
    if not path.is_file() and dist.is_main:
        logger.info(f"text cache: encoding {len(unique)} distinct captions into {path}")
        table.add(unique)
        atomic_write(path, lambda handle: torch.save(table.state_dict(), handle))
    barrier()
    if not len(table):
        logger.info(f"text cache: reusing {path} ({len(unique)} captions)")
        table.load_state_dict(load_weights_file(path, "text cache"))
    return table
