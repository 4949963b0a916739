"""Loading weights files handed to us without running them: torch's weights-only unpickler, and one line for a file
it refuses (torch's own message spans many lines and advises turning the guard off, which would execute whatever
the file holds)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+)")
UNSAFE_CLASS = re.compile(r"got <class '([^']+)'>")
UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


class WeightsFileError(ValueError):
    """A weights file that cannot be read, or holds more than tensors and plain values; the message is one line."""


# Checkpoints written before the RNG states were stored as tensors hold numpy's RNG key array (uint32). These
# three globals can only rebuild a numeric array: an object array would need further, still refused, globals.
_LEGACY_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                         getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


def safe_torch_load(path, map_location="cpu", mmap: bool = False):
    """torch.load that can only build tensors and plain Python values: a file whose pickle would import or call
    anything else (code execution, foreign classes) is refused by torch's weights-only unpickler, never run."""
    with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def weights_only_refusal(exc: Optional[BaseException]) -> Optional[str]:
    """Why torch's weights-only unpickler refused a file, as a phrase ("it holds a pickled object (posix.system)"), or
    None when `exc` is not such a refusal. torch's own message spans many lines and suggests turning the guard off,
    which would execute whatever the file holds: callers turn it into one line with this."""
    seen = set()
    while exc is not None and id(exc) not in seen:  # libraries (diffusers) re-raise it as the cause of their own
        seen.add(id(exc))
        text = str(exc)
        if "Weights only load failed" in text:
            unsafe = UNSAFE_GLOBAL.search(text) or UNSAFE_CLASS.search(text)
            if unsafe:
                return f"it holds a pickled object ({unsafe.group(1).rstrip('.,')}) besides tensors and plain values"
            detail = UNPICKLER_DETAIL.search(text)
            return f"its pickle does not read as tensors and plain values ({detail.group(1) if detail else 'damaged'})"
        exc = exc.__cause__ or exc.__context__
    return None


def load_failure(path: Path, exc: Exception, what: str = "checkpoint") -> str:
    """One line for a file torch.load refused or could not read."""
    refusal = weights_only_refusal(exc)
    if refusal is not None:
        return (f"{what} {path} is not a plain weights file: {refusal}; weights are loaded weights-only and never "
                f"run code")
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{what} {path} cannot be read ({type(exc).__name__}: {first})"


def load_weights_file(path, what: str, map_location="cpu"):
    """safe_torch_load for a weights file handed to us (LPIPS trunk, a detector, a cache): a file that is damaged or
    holds more than tensors and plain values raises WeightsFileError, one line naming `what` and `path`."""
    try:
        return safe_torch_load(path, map_location)
    except Exception as exc:  # torch raises several types for a damaged or unsafe file
        raise WeightsFileError(load_failure(Path(path), exc, what)) from None
