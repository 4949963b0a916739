"""sampling.generation.generate, the one path from labels to videos, on tiny randomly initialised models."""
import copy
import warnings

import pytest
import torch

from benchmarks.flops import TINY_CONFIG_DIR, load_stage_configs
from models.autoencoder import build_autoencoder
from models.dit import build_dit
from sampling.generation import (CMDModels, Denoiser, SamplingOptions, compile_models, generate,
                                 generate_content_frames, real_content_frames, set_precision)
from core.latent_stats import LatentScaler

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


def rebuilt(models: CMDModels, sampler: str, steps: int = STEPS, device="cpu") -> CMDModels:
    """A copy of `models` on `device` whose two denoisers sample with `sampler` at `steps`."""
    models = copy.deepcopy(models)
    denoisers = {}
    for stage in ("motion", "content"):
        denoiser = getattr(models, stage).with_options(SamplingOptions(steps, sampler))
        denoiser.model, denoiser.scaler = denoiser.model.to(device), denoiser.scaler.to(device)
        denoisers[stage] = denoiser
    return CMDModels(models.ae.to(device), ae_cfg=models.ae_cfg, **denoisers)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_a_video_depends_on_its_index_and_seed_not_on_its_batch(models, sampler):
    models = rebuilt(models, sampler)
    labels = torch.tensor([0, 1, 2, 3])
    videos, contents = generate(models, labels, seed=7, indices=[10, 11, 12, 13])
    assert videos.shape == (4, *models.ae.clip_shape) and videos.dtype == torch.float32
    assert contents.shape == (4, *models.ae.content_shape)
    assert videos.min() >= -1 and videos.max() <= 1
    # Video 12 alone, and in another batch with another neighbour, is the same video up to float rounding: a batch
    # of another size may sum in another order (~eps32 per model output), and the x0 prediction at the noisiest step
    # scales the model's eps by sqrt(1 / abar_T - 1) ~ 158 (linear schedule); a few such steps per stage.
    alphas_cumprod_last = models.motion.sampler.diffusion.alphas_cumprod[-1]
    atol = 4 * STEPS * torch.finfo(torch.float32).eps * (1.0 / alphas_cumprod_last - 1.0) ** 0.5
    alone, alone_content = generate(models, labels[2:3], seed=7, indices=[12])
    mixed, _ = generate(models, torch.tensor([1, 2]), seed=7, indices=[5, 12])
    torch.testing.assert_close(alone[0], videos[2], atol=atol, rtol=0)
    torch.testing.assert_close(alone_content[0], contents[2], atol=atol, rtol=0)
    torch.testing.assert_close(mixed[1], videos[2], atol=atol, rtol=0)
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
    frame = torch.rand(*models.ae.content_shape) * 2 - 1  # an image in [-1, 1], as datasets.transforms.load_image gives
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
    motion_cfg = load_stage_configs(TINY_CONFIG_DIR)["motion"]
    labels = [0, 1, 0]
    real = real_content_frames(models.ae, motion_cfg.data, 0, labels, "cpu")
    assert real.shape == (3, *models.ae.content_shape)
    videos, contents = generate(CMDModels(models.ae, motion=models.motion), torch.tensor(labels), seed=0,
                                indices=[0, 1, 2], content=real)
    assert torch.equal(contents, real)
    assert videos.shape == (3, *models.ae.clip_shape)
    assert not torch.allclose(real[0], real[2])  # the next clip of the class, not the same one again


def test_precision_changes_nothing_on_the_cpu(models):
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert set_precision(copy.copy(models), "bf16", "cpu") == (False, False)
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    with pytest.raises(ValueError, match="fp16"):
        set_precision(copy.copy(models), "fp16", "cpu")


# ---- the GPU path (run where CUDA is available) -----------------------------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast, TF32 and host syncs are CUDA matters")


def _sample_on_cuda(models, labels, seed=3):
    videos, _ = generate(models, labels.cuda(), seed=seed, indices=range(len(labels)))
    return videos.cpu()


@cuda_only
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_sampling_on_cuda_has_one_host_sync_per_step_at_most(models, sampler):
    steps = 6
    gpu = rebuilt(models, sampler, steps, "cuda")
    labels = torch.tensor([0, 1, 2, 3])
    _sample_on_cuda(gpu, labels)  # warm-up: schedule tables and kernels are uploaded once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate(gpu, labels.cuda(), seed=3, indices=range(4))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 2 * steps, syncs  # two stages of `steps` steps each


@cuda_only
def test_bf16_precision_autocasts_the_denoisers_and_stays_close_to_fp32(models):
    labels = torch.tensor([0, 1, 2, 3])
    fp32 = rebuilt(models, "dpm++2m", 10, "cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        assert set_precision(fp32, "fp32", "cuda") == (False, False)
        reference = _sample_on_cuda(fp32, labels)
        bf16 = rebuilt(models, "dpm++2m", 10, "cuda")
        assert set_precision(bf16, "bf16", "cuda") == (True, True)
        assert torch.backends.cuda.matmul.allow_tf32
        seen = []
        bf16.motion.model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cuda")))
        videos = _sample_on_cuda(bf16, labels)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen and all(seen)
    assert videos.dtype == torch.float32 and torch.isfinite(videos).all()
    # bf16 keeps 8 bits of mantissa (relative error 2^-8 per model call); over 10 steps per stage the videos in
    # [-1, 1] may drift by ~10 x 2^-8 = 0.04 on average, not more.
    assert (videos - reference).abs().mean() < 10 * 2.0**-8


@cuda_only
def test_compiled_sampling_gives_the_eager_videos(models):
    labels = torch.tensor([0, 1, 2])
    eager = rebuilt(models, "dpm++2m", 5, "cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        set_precision(eager, "fp32", "cuda")
        reference = _sample_on_cuda(eager, labels)
        compiled = rebuilt(models, "dpm++2m", 5, "cuda")
        set_precision(compiled, "fp32", "cuda")
        compile_models(compiled)
        videos = _sample_on_cuda(compiled, labels)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    # Fused kernels reorder fp32 sums (relative error ~ 1e-7 x depth); a few hundred ops deep over 2 x 5 steps,
    # 1e-3 on values in [-1, 1] leaves room and still catches a wrong graph.
    torch.testing.assert_close(videos, reference, atol=1e-3, rtol=0)
