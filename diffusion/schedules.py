"""Beta schedules (linear DDPM, cosine improved-DDPM) and timestep respacing."""

import math
from typing import Iterable, List, Sequence, Set, Union

import numpy as np

NOISE_SCHEDULES = ("linear", "cosine", "scaled_linear")

# Improved DDPM caps beta so the cosine schedule never destroys all signal in one step.
MAX_COSINE_BETA = 0.999
# Offset s of the cosine schedule: keeps beta_0 from being vanishingly small near t = 0.
COSINE_OFFSET = 0.008


def get_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Return betas (num_timesteps,) float64 for schedule `name` (NOISE_SCHEDULES)."""
    if num_timesteps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {num_timesteps}")
    if name == "linear":
        # Ho et al. use 1e-4 .. 0.02 for T = 1000; scaling by 1000 / T keeps the total noise
        # level comparable when T differs.
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        alpha_bar = np.cos((steps + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2.0) ** 2
        betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
        return np.minimum(betas, MAX_COSINE_BETA)
    if name == "scaled_linear":
        # Stable Diffusion's (latent diffusion's) schedule: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012) over
        # 1000 steps; a pretrained SD UNet is fine-tuned on the schedule it learned.
        scale = 1000.0 / num_timesteps
        return np.linspace(math.sqrt(scale * 0.00085), math.sqrt(scale * 0.012), num_timesteps, dtype=np.float64) ** 2
    raise ValueError(f"unknown noise_schedule {name!r}; expected one of {NOISE_SCHEDULES}")


def _evenly_spaced(start: int, length: int, count: int) -> List[int]:
    """`count` integer steps from [start, start + length) including both ends when count > 1."""
    if count == 1:
        return [start]
    stride = (length - 1) / (count - 1)
    return [start + round(i * stride) for i in range(count)]


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> Set[int]:
    """Return the set of original timesteps kept when respacing a `num_timesteps` process.

    section_counts:
      "ddimN"    -> range(0, num_timesteps, stride) with the integer stride giving exactly N steps
                    (the DDIM paper's uniform skip; always contains 0);
      "logsnrN"  -> not here: it depends on the betas (create_diffusion handles it with logsnr_timesteps);
      "N" or N   -> N steps evenly spaced over [0, num_timesteps - 1];
      "a,b,c" or [a, b, c] -> the process is cut into equal sections and section i keeps
                    section_counts[i] evenly spaced steps (improved DDPM);
      ""         -> all steps.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text == "":
            return set(range(num_timesteps))
        if text.startswith("ddim"):
            try:
                wanted = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad timestep_respacing {section_counts!r}") from None
            for stride in range(1, num_timesteps + 1):
                kept = range(0, num_timesteps, stride)
                if len(kept) == wanted:
                    return set(kept)
            raise ValueError(
                f"timestep_respacing {section_counts!r}: no integer stride gives {wanted} of {num_timesteps} steps"
            )
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"bad timestep_respacing {section_counts!r}") from None
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    elif isinstance(section_counts, Iterable):
        counts = [int(count) for count in section_counts]
    else:
        raise ValueError(f"bad timestep_respacing {section_counts!r}")

    if not counts:
        raise ValueError(f"bad timestep_respacing {section_counts!r}")
    # Distribute the remainder over the first sections so all steps are covered exactly.
    base_size, extra = divmod(num_timesteps, len(counts))
    kept: Set[int] = set()
    start = 0
    for index, count in enumerate(counts):
        size = base_size + (1 if index < extra else 0)
        if count < 1 or count > size:
            raise ValueError(
                f"timestep_respacing {section_counts!r}: section {index} of {size} steps cannot keep {count}"
            )
        kept.update(_evenly_spaced(start, size, count))
        start += size
    return kept


def logsnr_timesteps(betas: np.ndarray, count: int) -> List[int]:
    """`count` distinct timesteps, 0 and T-1 among them, spaced evenly in log-SNR lambda = log(alpha / sigma).

    The spacing DPM-Solver recommends for its multistep solvers (Lu et al. 2022): every solver step then covers the
    same lambda interval h, so the second-order extrapolation sees step ratios near 1. Where rounding to whole
    timesteps would repeat one (lambda changes fast near t = 0), the later point moves to the next free timestep.
    """
    num_timesteps = len(betas)
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"timestep_respacing 'logsnr{count}': need 1..{num_timesteps} steps")
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    log_snr = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # decreasing in t
    if count == 1:
        return [num_timesteps - 1]
    targets = np.linspace(log_snr[0], log_snr[-1], count)
    kept: List[int] = []
    for index, target in enumerate(targets):
        nearest = int(np.argmin(np.abs(log_snr - target)))
        # Distinct and increasing, leaving room for the points still to come below T.
        nearest = max(nearest, kept[-1] + 1 if kept else 0)
        kept.append(min(nearest, num_timesteps - count + index))
    kept[-1] = num_timesteps - 1
    return kept


def respace_betas(betas: np.ndarray, kept_timesteps: Iterable[int]) -> np.ndarray:
    """Betas of the process that visits only `kept_timesteps`, with the same alpha_bar there."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    previous = 1.0
    new_betas = []
    for step in sorted(kept_timesteps):
        # alpha_bar_new[i] = prod_{j<=i} (1 - beta_new[j]) must equal alpha_bar[step].
        new_betas.append(1.0 - alphas_cumprod[step] / previous)
        previous = alphas_cumprod[step]
    return np.asarray(new_betas, dtype=np.float64)
