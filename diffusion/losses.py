"""Gaussian KL and discretized Gaussian log-likelihood terms of the variational bound."""

import torch

# Data in [-1, 1] quantised to 256 levels: bins are 2 / 255 wide (Ho et al., decoder L_0).
HALF_BIN = 1.0 / 255.0
# Outside this range the first / last bin extends to -inf / +inf.
EDGE = 0.999


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the batch one: (B, ...) -> (B,)."""
    return tensor.mean(dim=tuple(range(1, tensor.ndim)))


def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) in nats."""
    return 0.5 * (
        -1.0
        + log_var2
        - log_var1
        + torch.exp(log_var1 - log_var2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """Elementwise log P(bin of x) under N(mean, exp(log_scale)^2), x in [-1, 1], 256 bins."""
    centered = x - mean
    inverse_std = torch.exp(-log_scale)
    upper = inverse_std * (centered + HALF_BIN)
    lower = inverse_std * (centered - HALF_BIN)
    # log_ndtr keeps the tail probabilities accurate where a difference of CDFs would underflow.
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    bin_probability = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_bin = torch.log(bin_probability.clamp(min=1e-12))
    return torch.where(x < -EDGE, log_cdf_upper, torch.where(x > EDGE, log_survival_lower, log_bin))
