"""Gaussian diffusion (DDPM / improved DDPM / DDIM): forward process, losses, sample loops."""

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from diffusion.rng import GeneratorArg, randn_like_per_sample

LOSS_TYPES = ("hybrid", "mse")
# What the denoiser's first C output channels predict: the noise eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0
# (Salimans & Ho 2022; Stable Diffusion 2's 768-v models).
PREDICTION_TYPES = ("eps", "v")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def check_snr_gamma(snr_gamma) -> None:
    if snr_gamma is not None and not snr_gamma >= 0:
        raise ValueError(f"snr_gamma must be non-negative (0 or None: off), got {snr_gamma}")


def check_loss_type(loss_type: str, learn_sigma: bool) -> None:
    """ValueError unless loss_type is known and fits learn_sigma (hybrid trains the learned variance, mse has none)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if loss_type == "hybrid" and not learn_sigma:
        raise ValueError("loss_type 'hybrid' trains the variance and needs learn_sigma=True")
    if loss_type == "mse" and learn_sigma:
        raise ValueError(
            "loss_type 'mse' would leave the learned variance untrained; use 'hybrid' or learn_sigma=False"
        )
# ddim: deterministic DDIM (eta 0); ddpm: ancestral sampling; dpm++2m: DPM-Solver++(2M), a second-order multistep
# solver of the same probability-flow ODE as DDIM (Lu et al. 2022), which needs fewer steps for the same quality.
SAMPLERS = ("ddim", "ddpm", "dpm++2m")

# How sampling clips the predicted x0: False = not at all, True = to [-1, 1], or a pair (low, high) of tensors
# broadcastable against x (e.g. per channel, shaped (1, C, 1, 1)) for data whose range is not [-1, 1].
ClipDenoised = Union[bool, Tuple[torch.Tensor, torch.Tensor]]


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion with epsilon or v prediction.

    The denoiser is called as ``model(x_t, t, **model_kwargs)`` where t is a LongTensor (B,) of
    ORIGINAL timestep indices (``timestep_map[t]``), so a model trained on the full process can be
    sampled with a respaced one. Its output has C channels (fixed variance) or 2C channels
    ([prediction, r], learned range: r in [-1, 1] interpolates between log posterior variance and log beta).

    prediction_type: "eps" (the first C channels predict the noise) or "v" (they predict
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0); the losses train that target and every sampler converts it to
    x0 and eps.
    snr_gamma: Min-SNR-gamma weighting of the MSE term (Hang et al. 2023), min(SNR_t, gamma) / SNR_t for eps and
    min(SNR_t, gamma) / (SNR_t + 1) for v, SNR_t = abar_t / (1 - abar_t); None or 0: unweighted.

    loss_type:
      "hybrid" (requires learn_sigma): MSE on the prediction + the variational bound term for the variance,
               with the mean frozen, scaled by num_timesteps / 1000 (improved DDPM's L_hybrid).
      "mse"    (requires learn_sigma=False): MSE on the prediction only; sampling uses the "fixed large"
               variance beta_t (posterior variance at t = 0). A learned variance trained by no loss
               would be noise at sampling time, so "mse" with learn_sigma=True is refused.
    """

    def __init__(
        self,
        betas: np.ndarray,
        learn_sigma: bool = True,
        loss_type: str = "hybrid",
        timestep_map: Optional[Sequence[int]] = None,
        prediction_type: str = "eps",
        snr_gamma: Optional[float] = None,
    ):
        check_loss_type(loss_type, learn_sigma)
        check_prediction_type(prediction_type)
        check_snr_gamma(snr_gamma)
        self.prediction_type = prediction_type
        self.snr_gamma = float(snr_gamma) if snr_gamma else None
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be a non-empty 1-D array in (0, 1]")
        self.learn_sigma = learn_sigma
        self.loss_type = loss_type
        self.betas = betas
        self.num_timesteps = len(betas)
        if timestep_map is None:
            timestep_map = range(self.num_timesteps)
        self.timestep_map = np.asarray(sorted(timestep_map), dtype=np.int64)
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {self.num_timesteps} betas")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_t (1 - abar_{t-1}) / (1 - abar_t)).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value so the
        # learned-range interpolation and the KL stay finite.
        first_positive = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first_positive, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # "Fixed large" variance of Ho et al. (sigma_t^2 = beta_t), with the posterior variance
        # at t = 0 so the last step does not add beta_0-sized noise.
        self.fixed_large_log_variance = np.log(np.append(first_positive, betas[1:]))
        self._device_cache: Dict[tuple, torch.Tensor] = {}

    # ----------------------------------------------------------------------------- helpers
    def _table(self, name: str, device) -> torch.Tensor:
        """Schedule array `name` as a float64 tensor on `device` (cached per device)."""
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = torch.as_tensor(getattr(self, name), device=device)
        return self._device_cache[key]

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Values of schedule `name` at t (B,), shaped (B, 1, ..., 1) to broadcast against `like`."""
        values = self._table(name, like.device)[t].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    @staticmethod
    def _working_dtype(x: torch.Tensor) -> torch.dtype:
        # Diffusion arithmetic never runs in half precision; fp64 is kept for exact tests.
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map indices of this (possibly respaced) process to the original process' timesteps."""
        return self._table("timestep_map", t.device)[t]

    def _run_model(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs) -> torch.Tensor:
        output = model(x, self.original_timesteps(t), **(model_kwargs or {}))
        channels = x.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if output.shape[0] != x.shape[0] or output.shape[1] != expected or output.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"model output shape {tuple(output.shape)} does not match input {tuple(x.shape)} "
                f"with {expected} channels (learn_sigma={self.learn_sigma})"
            )
        # Models may run under bf16 autocast; the diffusion arithmetic must not.
        return output.to(x.dtype)

    # ----------------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self._extract("sqrt_alphas_cumprod", t, x0) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._extract("posterior_mean_coef1", t, xt) * x0 + self._extract("posterior_mean_coef2", t, xt) * xt
        variance = self._extract("posterior_variance", t, xt)
        log_variance = self._extract("posterior_log_variance_clipped", t, xt)
        return mean, variance.expand_as(xt), log_variance.expand_as(xt)

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        scale_xt = self._extract("sqrt_recip_alphas_cumprod", t, xt)
        scale_eps = self._extract("sqrt_recipm1_alphas_cumprod", t, xt)
        return scale_xt * xt - scale_eps * eps

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, xt) * xt - x0) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, xt
        )

    def _scales(self, t: torch.Tensor, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)), the signal and noise scales of x_t, shaped to broadcast against `like`."""
        return self._extract("sqrt_alphas_cumprod", t, like), self._extract("sqrt_one_minus_alphas_cumprod", t, like)

    def predict_x0_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
        signal, noise = self._scales(t, xt)
        return signal * xt - noise * v

    def predict_eps_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
        signal, noise = self._scales(t, xt)
        return noise * xt + signal * v

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """x0 from the model's prediction, eps or v by this process' prediction_type."""
        if self.prediction_type == "v":
            return self.predict_x0_from_v(xt, t, prediction)
        return self.predict_x0_from_eps(xt, t, prediction)

    def self_conditioned(self, model: Callable) -> Callable:
        """`model` fed its own previous estimate of x0 as the keyword `x_sc` (self-conditioning, Chen et al. 2022,
        "Analog Bits"): zeros at the first call, then the x0 of its last output. For one sampling loop: the loops
        call the model once per step, in order. The estimate is unclipped, as training computes it."""
        estimate = None

        def run(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
            nonlocal estimate
            output = model(x, t, x_sc=torch.zeros_like(x) if estimate is None else estimate, **kwargs)
            index = torch.searchsorted(self._table("timestep_map", t.device), t)  # t is an original timestep
            estimate = self.predict_x0(x, index, output[:, : x.shape[1]].to(x.dtype))
            return output

        return run

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0, what a v-prediction model learns."""
        signal, sigma = self._scales(t, x0)
        return signal * noise - sigma * x0

    def mse_weights(self, t: torch.Tensor, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Min-SNR-gamma weights (B,) of the MSE term at timesteps t of this process, or None when off."""
        if self.snr_gamma is None:
            return None
        snr = self._table("snr", like.device)[t]
        clipped = snr.clamp(max=self.snr_gamma)
        return (clipped / snr if self.prediction_type == "eps" else clipped / (snr + 1.0)).to(like.dtype)

    # ------------------------------------------------------------------------ reverse process
    @staticmethod
    def _clip(x0: torch.Tensor, clip_denoised: ClipDenoised) -> torch.Tensor:
        if not isinstance(clip_denoised, (tuple, list)):
            return x0.clamp(-1.0, 1.0)
        low, high = (torch.as_tensor(bound, dtype=x0.dtype, device=x0.device) for bound in clip_denoised)
        return torch.clamp(x0, low, high)

    def _output_to_distribution(
        self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: ClipDenoised
    ):
        """Turn a raw model output into p(x_{t-1} | x_t): mean, variance, log variance, x0, eps."""
        channels = xt.shape[1]
        prediction = output[:, :channels]
        if self.learn_sigma:
            fraction = (output[:, channels:] + 1.0) / 2.0
            min_log = self._extract("posterior_log_variance_clipped", t, xt)
            max_log = self._extract("betas", t, xt).log()
            log_variance = fraction * max_log + (1.0 - fraction) * min_log
        else:
            log_variance = self._extract("fixed_large_log_variance", t, xt).expand_as(xt)
        if self.prediction_type == "v":
            pred_x0, eps = self.predict_x0_from_v(xt, t, prediction), self.predict_eps_from_v(xt, t, prediction)
        else:
            eps = prediction
            pred_x0 = self.predict_x0_from_eps(xt, t, eps)
        if isinstance(clip_denoised, (tuple, list)) or clip_denoised:
            pred_x0 = self._clip(pred_x0, clip_denoised)
            # Keep eps consistent with the clipped x0 (matters for DDIM).
            eps = self.predict_eps_from_x0(xt, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        return {
            "mean": mean,
            "variance": log_variance.exp(),
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "eps": eps,
        }

    def p_mean_variance(
        self, model: Callable, xt: torch.Tensor, t: torch.Tensor, clip_denoised: ClipDenoised = False,
        model_kwargs=None,
    ):
        """p(x_{t-1} | x_t) from the model: dict with mean, variance, log_variance, pred_x0, eps.

        clip_denoised: see ClipDenoised (True clips the predicted x0 to [-1, 1]); the sampling methods pass it on.
        """
        xt = xt.to(self._working_dtype(xt))
        output = self._run_model(model, xt, t, model_kwargs)
        return self._output_to_distribution(output, xt, t, clip_denoised)

    # -------------------------------------------------------------------------------- losses
    def _variational_bound_terms(
        self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample L_{t-1} in bits: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        predicted = self._output_to_distribution(output, xt, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance, predicted["mean"], predicted["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, predicted["mean"], 0.5 * predicted["log_variance"])
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self, model: Callable, x0: torch.Tensor, t: torch.Tensor, model_kwargs=None, noise=None,
        estimator: Optional[Callable] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-sample losses (B,): "loss", "mse" (unweighted, on the prediction type's target) and, with a learned
        variance, "vb". With snr_gamma the loss holds the Min-SNR-weighted MSE; the bound term is not weighted.

        estimator: self-conditioning; the model also takes `x_sc`, an estimate of x0. Half the clips, drawn at random,
        get the estimate of a first pass of `estimator` without gradient, the others zeros, as sampling's first step
        does. `estimator` is the model's own module outside any DDP wrapper: the ranks make that pass on batches of
        different sizes, or skip it, so it must not take part in what a wrapped forward does across ranks (a
        broadcast of the buffers)."""
        x0 = x0.to(self._working_dtype(x0))
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise.to(x0.dtype))
        if estimator is not None:
            model_kwargs = {**(model_kwargs or {}), "x_sc": self._self_condition_input(estimator, xt, t, model_kwargs)}
        output = self._run_model(model, xt, t, model_kwargs)
        channels = x0.shape[1]
        target = noise if self.prediction_type == "eps" else self.v_target(x0, t, noise)
        terms = {"mse": mean_flat((target - output[:, :channels]) ** 2)}
        weights = self.mse_weights(t, x0)
        weighted_mse = terms["mse"] if weights is None else weights * terms["mse"]
        if self.learn_sigma:
            # Stop-grad on the prediction: the bound only trains the variance, L_simple trains the mean.
            frozen = torch.cat([output[:, :channels].detach(), output[:, channels:]], dim=1)
            # The bound is a sum over T terms but we sample one t; T / 1000 with lambda = 1e-3
            # in improved DDPM amounts to this rescaling.
            terms["vb"] = self._variational_bound_terms(frozen, x0, xt, t) * (self.num_timesteps / 1000.0)
            terms["loss"] = weighted_mse + terms["vb"]
        else:
            terms["loss"] = weighted_mse
        return terms

    def _self_condition_input(self, model: Callable, xt: torch.Tensor, t: torch.Tensor, model_kwargs) -> torch.Tensor:
        """x_sc for training: the model's x0 estimate (no gradient) for a random half of the clips, zeros elsewhere."""
        x_sc = torch.zeros_like(xt)
        chosen = torch.rand(xt.shape[0], device=xt.device) < 0.5
        if chosen.any():
            batch = xt.shape[0]
            subset = {name: value[chosen] if torch.is_tensor(value) and value.shape[:1] == (batch,) else value
                      for name, value in (model_kwargs or {}).items()}
            with torch.no_grad():
                first = self._run_model(model, xt[chosen], t[chosen], {**subset, "x_sc": x_sc[chosen]})
                x_sc[chosen] = self.predict_x0(xt[chosen], t[chosen], first[:, : xt.shape[1]])
        return x_sc

    # ------------------------------------------------------------------------------ sampling
    @staticmethod
    def _resolve_device(model, noise, device):
        if device is not None:
            return torch.device(device)
        if noise is not None:
            return noise.device
        if isinstance(model, torch.nn.Module):
            parameter = next(model.parameters(), None)
            if parameter is not None:
                return parameter.device
        return torch.device("cpu")

    def _initial_noise(self, model, shape, noise, device, generator):
        device = self._resolve_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} differs from requested shape {tuple(shape)}")
            return noise.to(device=device, dtype=self._working_dtype(noise))
        return randn_like_per_sample(shape, generator, device=device, dtype=torch.float32)

    def _timestep_iterator(self, progress: bool, description: str):
        steps = list(range(self.num_timesteps))[::-1]
        return tqdm(steps, desc=description, leave=False) if progress else steps

    def p_sample_step(self, model, x, t, clip_denoised: ClipDenoised = False, model_kwargs=None,
                      generator: GeneratorArg = None, final: Optional[bool] = None):
        """One ancestral step x_t -> x_{t-1} (all elements share the same t).

        `final` (t == 0) may be given by a loop that knows it, sparing a device sync per step on CUDA.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        if (int(t[0]) == 0) if final is None else final:
            return out["mean"]
        noise = randn_like_per_sample(x.shape, generator, device=x.device, dtype=out["mean"].dtype)
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample_step(
        self, model, x, t, clip_denoised: ClipDenoised = False, model_kwargs=None, eta=0.0,
        generator: GeneratorArg = None, final: Optional[bool] = None,
    ):
        """One DDIM step x_t -> x_{t-1}; eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        x = x.to(out["eps"].dtype)
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = (
            eta * torch.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)) * torch.sqrt(1.0 - alpha_bar / alpha_bar_prev)
        )
        # The clamp only absorbs rounding: sigma^2 <= 1 - abar_prev for any eta <= 1.
        direction = torch.sqrt((1.0 - alpha_bar_prev - sigma**2).clamp(min=0.0))
        mean = out["pred_x0"] * alpha_bar_prev.sqrt() + direction * out["eps"]
        if eta == 0.0 or ((int(t[0]) == 0) if final is None else final):
            return mean
        noise = randn_like_per_sample(x.shape, generator, device=x.device, dtype=mean.dtype)
        return mean + sigma * noise

    def p_sample_loop(
        self, model, shape, noise=None, model_kwargs=None, device=None, progress=False,
        generator: GeneratorArg = None, clip_denoised: ClipDenoised = False,
    ):
        """Ancestral (DDPM) sampling from x_T to x_0; returns x_0 (float32, or float64 for fp64 noise)."""
        x = self._initial_noise(model, shape, noise, device, generator)
        for step in self._timestep_iterator(progress, "DDPM"):
            t = torch.full((shape[0],), step, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x = self.p_sample_step(model, x, t, clip_denoised, model_kwargs, generator, final=step == 0)
        return x

    def ddim_sample_loop(
        self, model, shape, noise=None, model_kwargs=None, device=None, progress=False, eta=0.0,
        generator: GeneratorArg = None, clip_denoised: ClipDenoised = False,
    ):
        """DDIM sampling from x_T to x_0 over this process' (typically respaced) timesteps."""
        x = self._initial_noise(model, shape, noise, device, generator)
        for step in self._timestep_iterator(progress, "DDIM"):
            t = torch.full((shape[0],), step, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x = self.ddim_sample_step(model, x, t, clip_denoised, model_kwargs, eta, generator, final=step == 0)
        return x

    def dpm_solver_sample_loop(
        self, model, shape, noise=None, model_kwargs=None, device=None, progress=False,
        generator: GeneratorArg = None, clip_denoised: ClipDenoised = False,
    ):
        """DPM-Solver++(2M) from x_T to x_0 over this process' (respaced) timesteps: N steps, N model calls.

        The probability-flow ODE in data prediction, x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D with
        h = lambda_s - lambda_t (lambda = log alpha / sigma), where D is the model's x0 at t (first and last solver
        step) or its linear extrapolation from the last two x0 predictions (Lu et al., "DPM-Solver++", 2022,
        algorithm 2). It runs on any respacing; log-SNR-uniform time points ("logsnrN", see create_diffusion) suit
        it best. The last step goes to clean data (sigma = 0) and returns the x0 prediction, as DDIM's last step
        does. Deterministic given the initial noise; the learned variance is unused, and `clip_denoised` clips
        every x0 prediction.
        Coefficients are Python floats from the float64 schedule: the loop has no host sync of its own.
        """
        x = self._initial_noise(model, shape, noise, device, generator)
        alpha = np.sqrt(self.alphas_cumprod)
        sigma = np.sqrt(1.0 - self.alphas_cumprod)
        log_snr = np.log(alpha) - np.log(sigma)  # lambda_t, increasing as t falls
        previous_x0, previous_h = None, None
        for step in self._timestep_iterator(progress, "DPM-Solver++(2M)"):
            t = torch.full((shape[0],), step, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x0 = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)["pred_x0"]
            if step == 0:
                return x0
            h = float(log_snr[step - 1] - log_snr[step])
            if previous_x0 is None or step == 1:
                # First order on the first step (no history) and on the last solver step, the one into t = 0 (DPM-
                # Solver's "lower order final"): that step's h can be many times the previous one on a time-spaced
                # process, and the extrapolation then overshoots.
                data = x0
            else:
                # D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev with r = h_prev / h.
                half_inverse_r = 0.5 * h / previous_h
                data = (1.0 + half_inverse_r) * x0 - half_inverse_r * previous_x0
            x = float(sigma[step - 1] / sigma[step]) * x.to(x0.dtype) - float(alpha[step - 1] * math.expm1(-h)) * data
            previous_x0, previous_h = x0, h
        return x

    def sample(
        self, model, shape, sampler="ddim", noise=None, model_kwargs=None, device=None, progress=False, eta=0.0,
        generator: GeneratorArg = None, clip_denoised: ClipDenoised = False, self_condition: bool = False,
    ):
        """Dispatch to ddim_sample_loop, p_sample_loop or dpm_solver_sample_loop by name (see SAMPLERS);
        self_condition: the model takes its previous x0 estimate (self_conditioned)."""
        if self_condition:
            model = self.self_conditioned(model)
        if sampler == "ddim":
            return self.ddim_sample_loop(
                model, shape, noise, model_kwargs, device, progress, eta, generator, clip_denoised
            )
        if sampler == "ddpm":
            if eta != 0.0:
                raise ValueError(f"eta={eta} only applies to the ddim sampler")
            return self.p_sample_loop(model, shape, noise, model_kwargs, device, progress, generator, clip_denoised)
        if sampler == "dpm++2m":
            if eta != 0.0:
                raise ValueError(f"eta={eta} only applies to the ddim sampler")
            return self.dpm_solver_sample_loop(model, shape, noise, model_kwargs, device, progress, generator,
                                               clip_denoised)
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
