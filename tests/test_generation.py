"""training.generation.generate, the one path from labels to videos, on tiny randomly initialised models."""
import pytest
import torch

from benchmarks.flops import TINY_CONFIG_DIR, load_stage_configs
from models.autoencoder import build_autoencoder
from models.dit import build_dit
from training.generation import CMDModels, Denoiser, SamplingOptions, generate, generate_content_frames
from training.latents import LatentScaler

STEPS = 3  # few sampling steps keep each call fast; the path is the same at any count


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode with noise on every weight: DiT's zero-initialised output layers would otherwise make
    every video the same (all zeros), whatever its seed, content or index."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    configs = load_stage_configs(TINY_CONFIG_DIR)
    ae_cfg = configs["autoencoder"]
    ae = randomised(build_autoencoder(ae_cfg.model, ae_cfg.data))
    scaler = LatentScaler.identity(ae)
    denoisers = {}
    for stage in ("content", "motion"):
        cfg = configs[stage]
        model = build_dit(stage, cfg.model, int(cfg.data.num_classes), ae.content_shape, ae.motion_shape)
        denoisers[stage] = Denoiser.from_config(randomised(model), cfg, scaler, SamplingOptions(STEPS))
    return CMDModels(ae, motion=denoisers["motion"], content=denoisers["content"], ae_cfg=ae_cfg)


def test_a_video_depends_on_its_index_and_seed_not_on_its_batch(models):
    labels = torch.tensor([0, 1, 2, 3])
    videos, contents = generate(models, labels, seed=7, indices=[10, 11, 12, 13])
    assert videos.shape == (4, *models.ae.clip_shape) and videos.dtype == torch.float32
    assert contents.shape == (4, *models.ae.content_shape)
    assert videos.min() >= -1 and videos.max() <= 1
    # Video 12 alone, and in another batch with another neighbour, is the same video (up to float rounding).
    alone, alone_content = generate(models, labels[2:3], seed=7, indices=[12])
    mixed, _ = generate(models, torch.tensor([1, 2]), seed=7, indices=[5, 12])
    torch.testing.assert_close(alone[0], videos[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone_content[0], contents[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], videos[2], atol=1e-5, rtol=0)
    other_seed, _ = generate(models, labels[2:3], seed=8, indices=[12])
    assert not torch.allclose(other_seed[0], videos[2])


def test_without_a_seed_the_global_generator_draws_the_noise(models):
    labels = torch.tensor([0, 1])
    torch.manual_seed(3)
    first, _ = generate(models, labels)
    torch.manual_seed(3)
    again, _ = generate(models, labels)
    torch.testing.assert_close(first, again)


def test_given_content_frames_are_animated_as_they_are_without_a_content_denoiser(models):
    frame = torch.rand(*models.ae.content_shape) * 2 - 1  # an image in [-1, 1], as sample.load_image gives
    given = frame.expand(2, -1, -1, -1)
    image_only = CMDModels(models.ae, motion=models.motion)  # --content-frame loads no content denoiser
    videos, contents = generate(image_only, torch.tensor([2, 2]), seed=0, indices=[0, 1], content=given)
    assert torch.equal(contents, given)
    assert videos.shape == (2, *models.ae.clip_shape)
    assert not torch.allclose(videos[0], videos[1])  # each index draws its own motion


def test_sampled_content_is_the_first_step_of_generate(models):
    labels = torch.tensor([1, 3])
    sampled = generate_content_frames(models, labels, seed=4, indices=[0, 1])
    videos, contents = generate(models, labels, seed=4, indices=[0, 1])
    torch.testing.assert_close(contents, sampled)
    # The motion noise of an index does not depend on where its content frame came from.
    given_videos, _ = generate(models, labels, seed=4, indices=[0, 1], content=sampled)
    torch.testing.assert_close(given_videos, videos)


def test_real_content_frames_of_held_out_clips_drive_the_motion(models):
    import sample

    motion_cfg = load_stage_configs(TINY_CONFIG_DIR)["motion"]
    labels = [0, 1, 0]
    real = sample.real_content_frames(models.ae, motion_cfg.data, 0, labels, "cpu")
    assert real.shape == (3, *models.ae.content_shape)
    videos, contents = generate(CMDModels(models.ae, motion=models.motion), torch.tensor(labels), seed=0,
                                indices=[0, 1, 2], content=real)
    assert torch.equal(contents, real)
    assert videos.shape == (3, *models.ae.clip_shape)
    assert not torch.allclose(real[0], real[2])  # the next clip of the class, not the same one again
