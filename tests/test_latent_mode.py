"""Latent mode (the paper's main setting, docs/METHOD.md): a Stable Diffusion VAE frame by frame, the CMD autoencoder
on latent clips, a content model fine-tuned from a pretrained diffusers UNet. Tiny random SD-shaped models
(scripts/make_tiny_sd.py), nothing downloaded."""
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from diffusion.schedules import get_beta_schedule
from models.content_unet import ContentUNet, UNetLoadError, load_pretrained_unet, pretrained_prediction_type
from models.vae import FrameVAE, LatentModeAutoencoder, VAELoadError, load_frame_vae
from models.autoencoder import CMDAutoencoder
from scripts.make_tiny_sd import TINY_UNET, TINY_VAE, make_tiny_sd
from tests.helpers.chain import TINY_LATENT_RUN
from tests.helpers.processes import run_python
from core.checkpoint import load_checkpoint
from datasets import build_dataset
from core.config import ConfigError, config_from_dict, load_config
from core.frozen_autoencoder import load_frames

pytestmark = pytest.mark.slow  # trains or launches scripts for minutes: scheduled first (conftest.py)

F32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def clips(batch=2, frames=3, size=16, seed=0):
    return torch.rand(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_frame_vae_encodes_each_frame_with_the_scaling_factor_and_decodes_back(tiny_sd):
    frames = load_frame_vae(str(tiny_sd / "vae"))
    assert (frames.latent_channels, frames.downsample) == (4, 2)
    frames.chunk = 4  # 6 frames in two chunks: chunking must not change a frame's latent
    x = clips()
    z = frames.encode(x)
    assert z.shape == (2, 4, 3, 8, 8)
    vae = frames.vae
    with torch.no_grad():
        for b in range(2):
            for t in range(3):
                direct = vae.encode(x[b:b + 1, :, t]).latent_dist.mean * vae.config.scaling_factor
                torch.testing.assert_close(z[b, :, t], direct[0], rtol=0, atol=1e3 * F32 * direct.abs().max().item())
        # decode undoes the scaling: decode(encode(x)) is the VAE's own reconstruction of every frame.
        back = frames.decode(z)
        assert back.shape == x.shape
        own = vae.decode(vae.encode(x[1:, :, 2]).latent_dist.mean).sample
        torch.testing.assert_close(back[1:, :, 2], own, rtol=0, atol=1e3 * F32 * own.abs().max().item())
    assert torch.equal(frames.encode(x), z)  # the posterior mean: deterministic, so a latent cache is well defined


def test_a_pipeline_folder_holding_vae_loads_and_a_wrong_path_is_one_line_naming_it(tiny_sd, tmp_path):
    assert isinstance(load_frame_vae(str(tiny_sd)), FrameVAE)  # an SD folder: its vae/ subfolder
    with pytest.raises(VAELoadError) as err:
        load_frame_vae(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VAELoadError, match="describes UNet2DConditionModel, not AutoencoderKL"):
        load_frame_vae(str(tiny_sd / "unet"))
    three_channels = load_config("autoencoder", "configs/tiny_latent/autoencoder.yaml",
                                 [f"vae={tiny_sd / 'vae'}", "model.channels=3"])
    with pytest.raises(ConfigError, match="'model.channels' is 3 but the VAE .* makes 4-channel latents"):
        load_frames(three_channels, "cpu")
    with pytest.raises(UNetLoadError, match=str(tmp_path)):
        load_pretrained_unet(str(tmp_path))
    # A v-prediction pipeline (SD 2.1 768-v) loads; what it predicts comes from its scheduler config
    # (tests/test_latent_fidelity.py), an x0-prediction one is refused by name.
    (tmp_path / "unet").symlink_to(tiny_sd / "unet", target_is_directory=True)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "v_prediction"}')
    assert load_pretrained_unet(str(tmp_path)).config.cross_attention_dim == 32
    assert pretrained_prediction_type(str(tmp_path)) == "v"
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "sample"}')
    with pytest.raises(UNetLoadError, match="'sample'"):
        pretrained_prediction_type(str(tmp_path))


def test_wrong_vae_path_stops_train_ae_in_one_line_before_a_run_folder_exists(tmp_path):
    missing = tmp_path / "no_such_vae"
    proc = run_python(["train_ae.py", "--config", "configs/tiny_latent/autoencoder.yaml", "--vae", missing,
                       "--results-dir", tmp_path / "results"], check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], proc.stderr
    assert not (tmp_path / "results").exists()


def test_latent_mode_config_rules():
    with pytest.raises(ConfigError, match="'vae' is required"):
        load_config("autoencoder", "configs/tiny_latent/autoencoder.yaml", ["vae=null"])
    with pytest.raises(ConfigError, match="perceptual_weight"):
        load_config("autoencoder", "configs/tiny_latent/autoencoder.yaml", ["loss.perceptual_weight=1.0"])
    with pytest.raises(ConfigError, match="learn_sigma"):
        load_config("content", "configs/tiny_latent/content.yaml",
                    ["model.learn_sigma=true", "diffusion.loss_type=hybrid"])
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config("content", "configs/tiny_latent/content.yaml", ["model.pretrained=null"])
    with pytest.raises(ConfigError, match="needs mode latent"):
        load_config("autoencoder", "configs/tiny/autoencoder.yaml", ["latent_cache=true"])
    with pytest.raises(ConfigError, match="'mode'"):
        load_config("motion", "configs/tiny_latent/motion.yaml", ["mode=lattent"])


def test_scaled_linear_is_stable_diffusions_schedule():
    betas = get_beta_schedule("scaled_linear", 1000)
    assert betas[0] == pytest.approx(0.00085, rel=1e-12) and betas[-1] == pytest.approx(0.012, rel=1e-12)
    assert np.allclose(np.diff(np.sqrt(betas)), (np.sqrt(0.012) - np.sqrt(0.00085)) / 999, rtol=1e-9)


def test_content_unet_adds_only_the_class_tokens_and_conditions_on_the_class():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    model = ContentUNet(unet, num_classes=5, class_dropout_prob=0.1, input_size=(8, 8), in_channels=4).eval()
    new = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in unet.parameters())
    assert new == (5 + 1) * TINY_UNET["cross_attention_dim"]  # the K classes and the null class of guidance
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        out_a, out_b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([3, 3]))
        null = model(x, t, torch.tensor([5, 5]))  # the null label is a valid input (guidance asks for it)
    assert out_a.shape == x.shape and torch.isfinite(null).all()
    assert (out_a - out_b).abs().max() > 1e-3  # the class reaches the output through the cross-attention
    with pytest.raises(ValueError, match="channels"):
        ContentUNet(unet, 5, 0.1, (8, 8), in_channels=3)
    with pytest.raises(ValueError, match="downsampling"):
        ContentUNet(unet, 5, 0.1, (7, 7), in_channels=4)


def test_latent_mode_autoencoder_speaks_pixels_and_keeps_the_cmd_fingerprint():
    torch.manual_seed(0)
    frames = FrameVAE(AutoencoderKL(**TINY_VAE))
    cmd = CMDAutoencoder(channels=4, n_frames=3, resolution=(8, 8), patch_size=2, hidden_size=32, depth=1,
                         num_heads=2, motion_dim=2).eval()
    ae = LatentModeAutoencoder(frames, cmd)
    assert ae.clip_shape == (3, 3, 16, 16) and ae.content_shape == (4, 8, 8)
    assert ae.state_dict().keys() == cmd.state_dict().keys()  # the fingerprint is the autoencoder checkpoint's
    with torch.no_grad():
        x_hat, z_c, z_m = ae(clips())
        image = ae.decode_content(z_c)
        back = ae.encode_content(torch.zeros(2, 3, 16, 16))
    assert x_hat.shape == (2, 3, 3, 16, 16) and image.shape == (2, 3, 16, 16) and back.shape == (2, 4, 8, 8)


def test_latent_chain_autoencoder_motion_content_sample(tiny_sd, tmp_path):
    """AE -> motion -> content (the pretrained UNet) -> sample.py, in latent mode, with the tiny random VAE and UNet;
    the content checkpoint rebuilds its UNet from the recorded config, without the pretrained folder."""
    unet_dir = tmp_path / "unet"
    (tiny_sd / "unet").rename(unet_dir)  # a copy only this test sees, removed before sampling
    shutil.copytree(tiny_sd / "scheduler", tmp_path / "scheduler")  # beside it: what the UNet predicts
    try:
        common = ["--results-dir", tmp_path / "r", "--vae", tiny_sd / "vae", *TINY_LATENT_RUN]
        run_python(["train_ae.py", "--config", "configs/tiny_latent/autoencoder.yaml", "--exp-name", "ae", *common,
                    "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.eval_every=2"])
        ae = tmp_path / "r" / "ae" / "checkpoints" / "last.pt"
        ae_cfg = config_from_dict("autoencoder", load_checkpoint(ae)["config"])
        assert ae_cfg.mode == "latent" and ae_cfg.latent_cache
        # The autoencoder trained from a cache of VAE latents: the VAE ran once per clip.
        (cache,) = (tmp_path / "r" / "latent_cache").iterdir()
        vae_latents = np.load(cache / "x.npy")
        assert vae_latents.shape == (16, 4, 4, 8, 8) and not (cache / "z_c.npy").exists()
        clip = build_dataset(ae_cfg.data, split="train", seed=0)[(3, 0)]["x"]
        expected = load_frame_vae(str(tiny_sd / "vae")).encode(clip[None])[0]
        torch.testing.assert_close(torch.from_numpy(vae_latents[3]), expected, rtol=0,
                                   atol=1e3 * F32 * expected.abs().max().item())
        assert (tmp_path / "r" / "ae" / "eval" / "reconstruction_0000002.png").stat().st_size > 0  # decoded to pixels
        diffusion = ["--ae-ckpt", ae, *common[:2], *TINY_LATENT_RUN, "diffusion.sample_steps=2", "train.sample_every=2"]
        run_python(["train_motion_diffusion.py", "--config", "configs/tiny_latent/motion.yaml", "--exp-name", "motion",
                    *diffusion])
        # --mode (NVlabs/CMD's flag) must match the autoencoder's mode.
        wrong = run_python(["train_motion_diffusion.py", "--config", "configs/tiny_latent/motion.yaml",
                            "--mode", "pixel", "--exp-name", "wrong", *diffusion], check=False)
        assert wrong.returncode == 1 and "latent mode" in wrong.stderr.strip().splitlines()[-1]
        run_python(["train_content_diffusion.py", "--config", "configs/tiny_latent/content.yaml", "--exp-name",
                    "content", "model.pretrained=" + str(unet_dir), *diffusion])
    finally:
        unet_dir.rename(tiny_sd / "unet")
    content = tmp_path / "r" / "content" / "checkpoints" / "last.pt"
    content_ckpt = load_checkpoint(content)
    recorded = content_ckpt["config"]["model"]
    assert recorded["name"] == "UNet2DCondition" and '"cross_attention_dim": 32' in recorded["unet_config"]
    # The pretrained UNet learned raw scaled latents, eps (its scheduler's): the run records both, and its
    # statistics are the identity that sampling then undoes.
    assert content_ckpt["config"]["diffusion"]["prediction_type"] == "eps"
    assert content_ckpt["config"]["diffusion"]["standardize_latents"] is False
    stats = content_ckpt["latent_stats"]
    assert not stats["content_mean"].any() and torch.equal(stats["content_std"], torch.ones(4))
    assert load_checkpoint(ae)["config"]["model"]["output_squash"] is False
    hidden = tmp_path / "hidden"
    (tiny_sd / "unet").rename(hidden)
    try:
        out = tmp_path / "out"
        run_python(["sample.py", "--ae-ckpt", ae,
                    "--motion-ckpt", tmp_path / "r" / "motion" / "checkpoints" / "last.pt",
                    "--content-ckpt", content, "--num-videos", 2, "--content-steps", 2, "--motion-steps", 2,
                    "--out-dir", out, "--npz", out / "s.npz", "--quiet"])
        # The VAE moved: the autoencoder's recorded path fails in one line naming it, --vae finds it.
        moved = tmp_path / "moved_vae"
        (tiny_sd / "vae").rename(moved)
        try:
            lost = run_python(["sample.py", "--ae-ckpt", ae,
                               "--motion-ckpt", tmp_path / "r" / "motion" / "checkpoints" / "last.pt",
                               "--real-content", "--num-videos", 1, "--out-dir", tmp_path / "o2"], check=False)
            assert lost.returncode != 0 and str(tiny_sd / "vae") in lost.stderr.strip().splitlines()[-1]
            run_python(["sample.py", "--ae-ckpt", ae,
                        "--motion-ckpt", tmp_path / "r" / "motion" / "checkpoints" / "last.pt",
                        "--real-content", "--num-videos", 1, "--motion-steps", 2, "--vae", moved,
                        "--out-dir", tmp_path / "o3", "--quiet"])
        finally:
            moved.rename(tiny_sd / "vae")
    finally:
        hidden.rename(tiny_sd / "unet")
    samples = np.load(out / "s.npz")
    assert samples["videos"].shape == (2, 4, 16, 16, 3) and samples["content_frames"].shape == (2, 16, 16, 3)
    assert (out / "grid.mp4").stat().st_size > 0
