"""v-prediction and Min-SNR-gamma weighting in diffusion.GaussianDiffusion: the target, the conversion every sampler
makes, the learned-variance bound, and the loss weights against a hand computation."""
import numpy as np
import pytest
import torch

from diffusion import create_diffusion, get_beta_schedule, space_timesteps

F64 = torch.finfo(torch.float64).eps


def _alphas_cumprod(schedule="linear", steps=1000):
    return np.cumprod(1.0 - get_beta_schedule(schedule, steps))


class OracleV:
    """The exact v of a known x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), v = sqrt(abar) eps - sqrt(1 - abar) x0,
    at the ORIGINAL timestep the model is called with."""

    def __init__(self, x0, alphas_cumprod, learn_sigma):
        self.x0, self.learn_sigma = x0, learn_sigma
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=x0.dtype)
        self.seen = set()

    def __call__(self, x, t):
        self.seen.update(t.tolist())
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * self.x0) / (1.0 - abar).sqrt()
        v = abar.sqrt() * eps - (1.0 - abar).sqrt() * self.x0
        return torch.cat([v, torch.zeros_like(v)], dim=1) if self.learn_sigma else v


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_v_target_gives_back_x0_and_eps_exactly(schedule):
    diffusion = create_diffusion(noise_schedule=schedule, learn_sigma=False, loss_type="mse", prediction_type="v")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 5, 5, generator=generator, dtype=torch.float64) * 1.7  # beyond [-1, 1], as latents are
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    xt = diffusion.q_sample(x0, t, noise)
    v = diffusion.v_target(x0, t, noise)
    # x0 = sqrt(abar) x_t - sqrt(1 - abar) v uses abar + (1 - abar) = 1: a few roundings of values of size ~|x0|.
    tolerance = 16 * F64 * float(x0.abs().max() + noise.abs().max())
    torch.testing.assert_close(diffusion.predict_x0_from_v(xt, t, v), x0, rtol=0, atol=tolerance)
    torch.testing.assert_close(diffusion.predict_eps_from_v(xt, t, v), noise, rtol=0, atol=tolerance)
    # The same in float32, the training precision.
    x32, n32 = x0.float(), noise.float()
    xt32, v32 = diffusion.q_sample(x32, t, n32), diffusion.v_target(x32, t, n32)
    tolerance32 = 16 * torch.finfo(torch.float32).eps * float(x0.abs().max() + noise.abs().max())
    torch.testing.assert_close(diffusion.predict_x0_from_v(xt32, t, v32), x32, rtol=0, atol=tolerance32)


def test_the_v_objective_trains_on_v_and_the_eps_objective_on_eps():
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([200, 400, 600, 999])  # not near 0, where v ~ eps
    v_diffusion = create_diffusion(learn_sigma=False, loss_type="mse", prediction_type="v")
    eps_diffusion = create_diffusion(learn_sigma=False, loss_type="mse")
    exact_v = v_diffusion.v_target(x0, t, noise)
    v_terms = v_diffusion.training_losses(lambda x, s: exact_v, x0, t, noise=noise)
    assert v_terms["loss"].abs().max() < 1e-20  # the exact v costs nothing under the v objective
    eps_terms = eps_diffusion.training_losses(lambda x, s: exact_v, x0, t, noise=noise)
    torch.testing.assert_close(eps_terms["mse"], ((noise - exact_v) ** 2).mean(dim=(1, 2, 3)))
    assert (eps_terms["mse"] > 0.1).all()


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("sampler,respacing", [("ddim", "ddim25"), ("ddpm", "25"), ("dpm++2m", "logsnr12")])
def test_every_sampler_turns_an_exact_v_model_into_its_x0(sampler, respacing, learn_sigma):
    loss_type = "hybrid" if learn_sigma else "mse"
    diffusion = create_diffusion(respacing, "scaled_linear", learn_sigma, loss_type=loss_type, prediction_type="v")
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 4, 4, generator=generator, dtype=torch.float64) * 2.0
    oracle = OracleV(x0, _alphas_cumprod("scaled_linear"), learn_sigma)
    out = diffusion.sample(oracle, x0.shape, sampler=sampler, noise=torch.randn(x0.shape, generator=generator,
                                                                               dtype=torch.float64),
                           generator=torch.Generator().manual_seed(3))
    # Every step's x0 prediction is exact, so the result is x0 up to float64 rounding through 25 steps.
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
    if respacing.startswith("ddim"):
        assert oracle.seen == space_timesteps(1000, respacing)  # called with the original timesteps


def test_the_hybrid_bound_of_a_v_model_is_that_of_the_equivalent_eps_model():
    """The learned-variance bound sees the distribution the output means: a v output and the eps output that predict
    the same x0 (with the same variance channel) give the same vb and the same posterior."""
    generator = torch.Generator().manual_seed(4)
    x0 = torch.rand(4, 2, 3, 3, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 5, 400, 999])
    eps_d = create_diffusion(learn_sigma=True, loss_type="hybrid")
    v_d = create_diffusion(learn_sigma=True, loss_type="hybrid", prediction_type="v")
    eps_hat = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    r = torch.rand(x0.shape, generator=generator, dtype=torch.float64) * 2 - 1
    xt = eps_d.q_sample(x0, t, noise)
    x0_hat = eps_d.predict_x0_from_eps(xt, t, eps_hat)
    v_hat = v_d.v_target(x0_hat, t, eps_hat)  # v of the pair (x0_hat, eps_hat) that reproduces x_t
    eps_terms = eps_d.training_losses(lambda x, s: torch.cat([eps_hat, r], 1), x0, t, noise=noise)
    v_terms = v_d.training_losses(lambda x, s: torch.cat([v_hat, r], 1), x0, t, noise=noise)
    torch.testing.assert_close(v_terms["vb"], eps_terms["vb"], rtol=1e-9, atol=1e-12)
    v_target = v_d.v_target(x0, t, noise)
    torch.testing.assert_close(v_terms["mse"], ((v_target - v_hat) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(v_terms["loss"], v_terms["mse"] + v_terms["vb"])


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_min_snr_gamma_weights_the_mse_term_by_hand(prediction_type, learn_sigma):
    gamma = 5.0
    loss_type = "hybrid" if learn_sigma else "mse"
    weighted = create_diffusion(learn_sigma=learn_sigma, loss_type=loss_type, prediction_type=prediction_type,
                                snr_gamma=gamma)
    plain = create_diffusion(learn_sigma=learn_sigma, loss_type=loss_type, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(5)
    x0 = torch.rand(5, 2, 3, 3, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    output = torch.randn(5, 4 if learn_sigma else 2, 3, 3, generator=generator, dtype=torch.float64).clamp(-1, 1)
    t = torch.tensor([0, 100, 300, 600, 999])
    terms = weighted.training_losses(lambda x, s: output, x0, t, noise=noise)
    reference = plain.training_losses(lambda x, s: output, x0, t, noise=noise)
    # By hand: SNR_t = abar_t / (1 - abar_t) of the linear schedule (betas 1e-4 .. 0.02 over 1000 steps).
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[t.numpy()]
    snr = abar / (1.0 - abar)
    weight = np.minimum(snr, gamma) / (snr if prediction_type == "eps" else snr + 1.0)
    # The weights differ from 1 where they should: eps down-weights the low-noise steps (SNR > 5) only.
    assert (weight[snr > gamma] < 1).all() and (prediction_type == "v" or np.allclose(weight[snr <= gamma], 1.0))
    target = noise if prediction_type == "eps" else torch.from_numpy(np.sqrt(abar)).view(-1, 1, 1, 1) * noise \
        - torch.from_numpy(np.sqrt(1 - abar)).view(-1, 1, 1, 1) * x0
    mse = ((target - output[:, :2]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], mse)  # logged unweighted
    expected = torch.from_numpy(weight) * mse + (reference["vb"] if learn_sigma else 0.0)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-12, atol=0)
    if learn_sigma:
        torch.testing.assert_close(terms["vb"], reference["vb"])  # the bound is not weighted


def test_bad_prediction_type_or_gamma_is_refused_by_name():
    with pytest.raises(ValueError, match="'x0'"):
        create_diffusion(prediction_type="x0")
    with pytest.raises(ValueError, match="-1"):
        create_diffusion(snr_gamma=-1)
    assert create_diffusion(snr_gamma=0).snr_gamma is None  # 0 is off
