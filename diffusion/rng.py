"""Gaussian noise drawn per batch element so a sample does not depend on its batch."""

from typing import Optional, Sequence, Union

import torch

GeneratorArg = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def _draw(shape, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    # Draw where the generator lives, then move: a CPU generator then gives the same numbers
    # whichever device the sampler runs on.
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def randn_like_per_sample(shape, generators: GeneratorArg, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal tensor of `shape`; row i comes from generators[i] when a list is given.

    generators may be None (global RNG), one torch.Generator (whole tensor from it) or a
    sequence of shape[0] generators.
    """
    shape = tuple(shape)
    if generators is None or isinstance(generators, torch.Generator):
        return _draw(shape, generators, device, dtype)
    generators = list(generators)
    if len(generators) != shape[0]:
        raise ValueError(f"generator list has {len(generators)} entries for batch size {shape[0]}")
    return torch.stack([_draw(shape[1:], generator, device, dtype) for generator in generators])
