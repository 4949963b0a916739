"""Latent mode as Stable Diffusion's models expect it: the autoencoder reconstructs unsquashed VAE latents, a
pretrained SD UNet trains on raw scaled latents with diffusers' own objective, and a v-prediction UNet trains on v
(or is refused by name) whatever form its path takes. Tiny random SD-shaped models (scripts/make_tiny_sd.py)."""
import contextlib
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch.utils.data import default_collate

from core.checkpoint import _comparable, load_checkpoint
from core.config import config_from_dict, load_config
from core.frozen_autoencoder import encode, load_autoencoder
from datasets import build_dataset
from models.autoencoder import CMDAutoencoder, build_autoencoder
from models.content_unet import UNetLoadError, pretrained_prediction_type
from sampling.generation import Denoiser, load_denoiser
from scripts.make_tiny_sd import make_tiny_sd
from tests.helpers.processes import REPO, run_python
from training.diffusion_stage import diffusion_losses, training_diffusion

F32 = torch.finfo(torch.float32).eps
SMALL = ["data.resolution=[16,16]", "data.n_frames=4", "data.num_workers=0", "data.synthetic_size=8",
         "train.global_batch_size=4", "train.num_eval_videos=2"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), text=False)


@pytest.fixture(scope="module")
def tiny_sd_v(tmp_path_factory):
    """The same layout with a scheduler that says v_prediction (as SD 2.1-768's does)."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), text=False, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def latent_ae(tiny_sd, tmp_path_factory):
    """A one-step latent-mode autoencoder checkpoint on the tiny VAE."""
    results = tmp_path_factory.mktemp("ae_runs")
    run_python(["train_ae.py", "--config", "configs/tiny_latent/autoencoder.yaml", "--vae", tiny_sd / "vae",
                "--results-dir", results, "--exp-name", "ae", "--max-steps", 1, "--ckpt-every", 1, *SMALL,
                "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.eval_every=100"])
    return results / "ae" / "checkpoints" / "last.pt"


@pytest.fixture
def content_run(latent_ae, tmp_path):
    """train_content_diffusion.main in process, for a latent-mode content run on the tiny AE of `steps` steps (run
    folder r/run unless train.exp_name says otherwise): returns the config as the run decided it. Restores the
    signal handlers the run installs."""
    import train_content_diffusion

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def train(*overrides, steps=1):
        cfg = load_config("content", str(REPO / "configs/tiny_latent/content.yaml"),
                          [f"ae_ckpt={latent_ae}", f"train.results_dir={tmp_path / 'r'}", "train.exp_name=run", *SMALL,
                           f"train.max_steps={steps}", *overrides])
        train_content_diffusion.main(cfg)
        return cfg

    yield train
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def last_checkpoint(cfg):
    return Path(cfg.train.results_dir) / cfg.train.exp_name / "checkpoints" / "last.pt"


def trained_denoiser(cfg):
    """(the frozen autoencoder, the run's last EMA denoiser, its config and latent statistics), as sample.py loads
    them."""
    ae, _ = load_autoencoder(cfg.ae_ckpt, "cpu")
    return (ae, *load_denoiser(last_checkpoint(cfg), "content", ae, "cpu"))


# ---- the autoencoder's output ------------------------------------------------------------------------------------
def test_latent_mode_autoencoder_reconstructs_latents_beyond_one():
    """Scaled SD latents have about unit variance: a third of their values lie beyond +-1, where tanh cannot reach."""
    cfg = load_config("autoencoder", str(REPO / "configs/tiny_latent/autoencoder.yaml"),
                      ["data.resolution=[16,16]", "data.n_frames=4", "model.hidden_size=32", "model.depth=1",
                       "model.num_heads=2"])
    assert cfg.model.output_squash is False  # resolved from the mode
    torch.manual_seed(0)
    ae = build_autoencoder(cfg.model, cfg.data, downsample=2)
    # Static clips of unit-variance latents: the content frame is the frame itself, the decoder has to pass it on.
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = z[:, :, None].expand(-1, -1, 4, -1, -1).contiguous()
    beyond = x.abs() > 1
    assert beyond.float().mean() > 0.25
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    for _ in range(150):
        loss = (ae(x)[0] - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x_hat = ae(x)[0]
    # The least error any output squashed into (-1, 1) makes on those entries: (|x| - 1)^2.
    squashed_floor = ((x.abs() - 1) ** 2)[beyond].mean()
    assert ((x_hat - x) ** 2)[beyond].mean() < 0.1 * squashed_floor
    assert x_hat.abs().max() > 2.0


def test_pixel_mode_and_old_checkpoints_keep_the_tanh():
    cfg = load_config("autoencoder", str(REPO / "configs/tiny/autoencoder.yaml"))
    assert cfg.model.output_squash is True
    # A checkpoint written before the key squashed in either mode; so does resuming one (the comparison of
    # run-defining keys reads its missing key as true).
    old = config_from_dict("autoencoder", {"mode": "latent", "model": {"channels": 4}})
    assert old.model.output_squash is True and _comparable("model.output_squash", None) is True
    torch.manual_seed(0)
    ae = CMDAutoencoder(channels=3, n_frames=2, resolution=(8, 8), patch_size=2, hidden_size=16, depth=1,
                        num_heads=2, motion_dim=2)
    with torch.no_grad():
        ae.output_proj.weight.normal_(std=3.0)  # pre-activations well beyond +-1
        z_c, z_m = ae.encode(torch.rand(2, 3, 2, 8, 8) * 2 - 1)
        squashed = ae.decode(z_c, z_m)
        ae.output_squash = False
        raw = ae.decode(z_c, z_m)
    assert torch.equal(squashed, torch.tanh(raw)) and raw.abs().max() > 1.5


def test_latent_reconstruction_metrics_see_errors_beyond_one():
    """train_ae.py's evaluation compares latent clips unclamped: an error that lies entirely beyond +-1 counts."""
    from evals.recon import psnr, ssim

    x = torch.full((2, 4, 3, 8, 8), 1.5)
    x_hat = x + 0.5  # wrong everywhere, but both beyond 1: clamped to [-1, 1] they would agree
    assert torch.isinf(psnr(x, x_hat)).all()
    # Peak 2 in the data's units: 10 log10(1 / (0.5 / 2)^2).
    torch.testing.assert_close(psnr(x, x_hat, clamp=False), torch.full((2,), 10 * math.log10(16.0)))
    assert (ssim(x, x_hat, clamp=False) < ssim(x, x_hat)).all()


def test_a_latent_autoencoder_checkpoint_records_its_unsquashed_output(latent_ae):
    recorded = load_checkpoint(latent_ae)["config"]["model"]
    assert recorded["output_squash"] is False


# ---- the pretrained UNet's objective --------------------------------------------------------------------------------
def clip_batch(cfg, count=4):
    return default_collate([build_dataset(cfg.data, cfg.data.split)[i] for i in range(count)])


def diffusers_loss(unet, scheduler, z_c, context, prediction_type):
    """diffusers' training loss (its train_text_to_image.py): noise, timesteps, add_noise, MSE to the target,
    drawn in the order training.diffusion_stage.diffusion_losses draws them."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z_c),))
    noise = torch.randn_like(z_c)
    noisy = scheduler.add_noise(z_c, noise, t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(z_c, noise, t)
    with torch.no_grad():
        return F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, target)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_pretrained_unet_trains_on_raw_latents_with_diffusers_own_loss(prediction, tiny_sd, tiny_sd_v, content_run):
    folder = tiny_sd if prediction == "epsilon" else tiny_sd_v
    cfg = content_run(f"model.pretrained={folder}")
    recorded = load_checkpoint(last_checkpoint(cfg))["config"]["diffusion"]
    assert recorded["standardize_latents"] is False
    assert recorded["prediction_type"] == {"epsilon": "eps"}.get(prediction, "v")
    ae, model, model_cfg, scaler = trained_denoiser(cfg)
    batch = clip_batch(cfg)
    z_c, _ = encode(ae, batch["x"], contextlib.nullcontext())  # the scaled VAE latents of the content frames
    context = model.y_embedder(batch["y"]).unsqueeze(1)  # eval mode: no label dropout
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    torch.manual_seed(0)
    expected = diffusers_loss(model.unet, scheduler, z_c, context, prediction)
    torch.manual_seed(0)
    with torch.no_grad():  # what the training loop minimises, through the run's latent statistics
        ours = diffusion_losses(training_diffusion(model_cfg), model, scaler.normalize("content", z_c),
                                {"y": batch["y"]})["loss"]
    # The schedules agree to float32 rounding (diffusers keeps alpha_bar in float32, a cumprod of 1000 factors).
    torch.testing.assert_close(ours, expected, rtol=1e3 * F32, atol=0)
    # Sampling inverts what training did: identity statistics and the run's prediction type come with the model.
    assert torch.equal(scaler.normalize("content", z_c), z_c)
    sampler = Denoiser.from_config(model, model_cfg, scaler).sampler
    assert sampler.diffusion.prediction_type == recorded["prediction_type"]


def test_content_dits_keep_their_measured_statistics(content_run):
    cfg = content_run("model.name=ContentDiT-T/4", "model.learn_sigma=true", "diffusion.loss_type=hybrid",
                      "diffusion.noise_schedule=linear")
    assert cfg.diffusion.standardize_latents is True and cfg.diffusion.prediction_type == "eps"
    ae, _, _, scaler = trained_denoiser(cfg)
    z_c, _ = encode(ae, clip_batch(cfg)["x"], contextlib.nullcontext())
    assert not torch.allclose(scaler.normalize("content", z_c), z_c)


# ---- v-prediction, whatever the path form ---------------------------------------------------------------------------
def test_v_prediction_is_read_from_every_path_form(tiny_sd_v, tmp_path, monkeypatch):
    import huggingface_hub.constants

    assert pretrained_prediction_type(str(tiny_sd_v)) == "v"  # a pipeline folder holding scheduler/
    assert pretrained_prediction_type(str(tiny_sd_v / "unet")) == "v"  # the unet/ folder itself
    # A hub id, from the local Hugging Face cache (nothing is downloaded).
    repo = tmp_path / "hub" / "models--someone--tiny-sd-v"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_sd_v / "scheduler", snapshot / "scheduler")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert pretrained_prediction_type("someone/tiny-sd-v") == "v"
    # Nowhere to read it from: refused in one line naming the source and the key, unless the key says.
    alone = tmp_path / "unet_alone"
    shutil.copytree(tiny_sd_v / "unet", alone)
    for source in (str(alone), "someone/not-cached"):
        with pytest.raises(UNetLoadError) as err:
            pretrained_prediction_type(source)
        message = str(err.value)
        assert source in message and "diffusion.prediction_type" in message and "\n" not in message
    assert pretrained_prediction_type(str(alone), "v") == "v"
    with pytest.raises(UNetLoadError, match="predicts v .* but diffusion.prediction_type is eps"):
        pretrained_prediction_type(str(tiny_sd_v / "unet"), "eps")


def test_a_unet_of_unknown_prediction_type_is_refused_before_a_run_folder_exists(tiny_sd_v, content_run, tmp_path):
    alone = tmp_path / "unet_alone"
    shutil.copytree(tiny_sd_v / "unet", alone)
    with pytest.raises(UNetLoadError, match="diffusion.prediction_type"):
        content_run(f"model.pretrained={alone}")
    assert not (tmp_path / "r").exists()
    cfg = content_run(f"model.pretrained={alone}", "diffusion.prediction_type=v")
    assert load_checkpoint(last_checkpoint(cfg))["config"]["diffusion"]["prediction_type"] == "v"


def test_a_resumed_run_keeps_the_prediction_type_it_trained_with(content_run):
    from core.checkpoint import CheckpointError

    dit = ["model.name=ContentDiT-T/4", "model.learn_sigma=true", "diffusion.loss_type=hybrid",
           "diffusion.noise_schedule=linear", "train.exp_name=dit"]
    cfg = content_run(*dit, "diffusion.prediction_type=v", "diffusion.snr_gamma=5")
    assert training_diffusion(cfg).prediction_type == "v" and training_diffusion(cfg).snr_gamma == 5.0
    ckpt = last_checkpoint(cfg)
    resumed = content_run(*dit, f"train.resume={ckpt}", steps=2)  # the command leaves the key unset: the run's v
    assert resumed.diffusion.prediction_type == "v" and resumed.diffusion.standardize_latents is True
    assert load_checkpoint(ckpt)["step"] == 2
    with pytest.raises(CheckpointError, match="prediction_type is eps but .* was trained with v"):
        content_run(*dit, f"train.resume={ckpt}", "diffusion.prediction_type=eps", steps=3)


def test_a_pretrained_unet_run_resumes_with_its_recorded_settings(tiny_sd_v, content_run):
    """The run records the UNet's architecture, prediction type and standardisation; a command that leaves them
    unset continues it (they are not differences)."""
    cfg = content_run(f"model.pretrained={tiny_sd_v}", "train.exp_name=unet")
    resumed = content_run(f"model.pretrained={tiny_sd_v}", "train.exp_name=unet",
                          f"train.resume={last_checkpoint(cfg)}", steps=2)
    assert resumed.diffusion.prediction_type == "v" and resumed.diffusion.standardize_latents is False
    _, _, _, scaler = trained_denoiser(resumed)
    assert torch.equal(scaler.normalize("content", torch.ones(1, 4, 8, 8)), torch.ones(1, 4, 8, 8))
