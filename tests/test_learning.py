"""Does each stage learn what it exists for? On the built-in dataset and against a baseline that shows failure: the
autoencoder's motion latent must carry the motion (motion-swap gap), and motion samples decoded with real content
frames must move the way their class, or their prompt, says. These are the failures a pipeline that only runs
hides: a collapsed motion latent, a label the motion model ignores.

The tests share one autoencoder trained for 250 steps (the demo's config), so they live in one file: pytest-xdist
(scripts/test.sh) keeps a file on one worker, which trains it once.
"""
import re

import numpy as np
import pytest
import torch

from datasets import build_dataset
from datasets.synthetic import DIRECTIONS, SHAPES
from datasets.transforms import to_uint8_videos
from diffusion import create_diffusion
from core.frozen_autoencoder import load_autoencoder
from sampling.generation import SamplingOptions, generate, load_denoiser, load_models, real_content_frames
from scripts.make_tiny_sd import make_tiny_clip
from tests.helpers.processes import LONE_PROCESS_ENV, run_python

pytestmark = pytest.mark.slow  # trains for minutes: scheduled first (conftest.py)

MOTION_STEPS = 1000
RIGHT, LEFT = 0, 3  # square-right and square-left in the 4-class tiny config: same shape, opposite motion
assert DIRECTIONS[RIGHT // len(SHAPES)] == "right" and DIRECTIONS[LEFT // len(SHAPES)] == "left"


@pytest.fixture(scope="module")
def trained_tiny_ae(tmp_path_factory):
    """The demo's autoencoder config trained for 250 steps (about a minute): (checkpoint path, train_ae.py stdout)."""
    results = tmp_path_factory.mktemp("trained_ae")
    proc = run_python(["train_ae.py", "--config", "configs/tiny/autoencoder.yaml", "--results-dir", results,
                       "--exp-name", "ae", "--max-steps", 250, "train.eval_every=250", "train.ckpt_every=250"],
                      env=LONE_PROCESS_ENV)
    return results / "ae" / "checkpoints" / "last.pt", proc.stdout


def test_tiny_autoencoder_learns_a_motion_latent_the_decoder_uses(trained_tiny_ae):
    """The demo's autoencoder config, trained for 250 steps, must already route motion through z_m.

    Before the motion latent was centred over time, z_m collapsed to one constant within ~50 steps and the
    motion-swap gap stayed at 0.00 dB for thousands of steps. A decoder that uses z_m loses > 1 dB when it gets
    another clip's z_m (~26% more squared error); the centred latent measures 3.5 dB after 200 steps.
    """
    _, stdout = trained_tiny_ae
    summary = [line for line in stdout.splitlines() if "summary (EMA" in line]
    assert summary, stdout[-2000:]
    gap = float(re.search(r"motion-swap gap (-?[\d.]+) dB", summary[0]).group(1))
    spread = float(re.search(r"z_m spread ([\d.]+)", summary[0]).group(1))
    assert gap > 1.0, summary[0]
    assert spread > 0.05, summary[0]
    assert "WARNING" not in stdout, summary[0]


def horizontal_velocity(videos: np.ndarray) -> np.ndarray:
    """(N, T, H, W, 3) uint8 -> (N,) least-squares slope over time of the horizontal centre of what changes.

    What changes over a clip is mostly the main (largest) object: the background is static. On real held-out clips
    the sign of this slope matches the class direction for about 95% of the clips.
    """
    x = videos.astype(np.float64)
    change = np.abs(x - x.mean(axis=1, keepdims=True)).sum(axis=-1)  # (N, T, H, W)
    columns = change.sum(axis=2)  # (N, T, W)
    centre = (columns * np.arange(columns.shape[-1])).sum(-1) / np.maximum(columns.sum(-1), 1e-9)  # (N, T)
    t = np.arange(x.shape[1]) - (x.shape[1] - 1) / 2
    return (centre * t).sum(-1) / (t * t).sum()


def test_motion_samples_move_the_way_their_label_says(trained_tiny_ae, python_runner, tmp_path):
    """Motion-only samples (real content frames, generated z_m) decoded to videos: each held-out content frame is
    sampled twice with the same noise, once labelled square-right and once square-left. The two classes share
    their shape and differ only in direction, so only the label can make the two videos drift apart, and it must
    make them drift its way."""
    ae, _ = trained_tiny_ae
    python_runner(["train_motion_diffusion.py", "--config", "configs/tiny/motion.yaml", "--results-dir", tmp_path,
                   "--exp-name", "motion", "--ae-ckpt", ae, "--max-steps", MOTION_STEPS,
                   f"train.sample_every={MOTION_STEPS}", f"train.ckpt_every={MOTION_STEPS}"], env=LONE_PROCESS_ENV)
    models = load_models(ae, tmp_path / "motion" / "checkpoints" / "last.pt",
                         motion_options=SamplingOptions(steps=15, sampler="dpm++2m", guidance_scale=4.0))
    clips = [RIGHT] * 16 + [LEFT] * 16  # content frames of held-out clips of both directions
    content = real_content_frames(models.ae, models.motion.cfg.data, 0, clips, "cpu")
    velocity = {}
    for label in (RIGHT, LEFT):
        videos, _ = generate(models, torch.full((len(clips),), label), seed=0, content=content)
        velocity[label] = horizontal_velocity(to_uint8_videos(videos))
    drift = velocity[RIGHT] - velocity[LEFT]  # per content frame and noise: how much further right "right" goes
    assert np.abs(drift).max() > 0, "both labels give the same videos: the motion model ignores the label"
    # Paired t over 32 pairs. A motion latent that is ignored, constant or blind to the label gives identical
    # videos for both labels (drift exactly 0); a label that acts at random makes t >= 3 a chance of < 0.3%
    # (one-sided, 31 degrees of freedom). Measured with the tiny config's decaying rate: t = 7.1 at 1,000 steps (31
    # of 32 pairs drift the label's way); at the constant 1e-3 it used before, 5.8 at 1,500 steps and 2.6 at 1,000:
    # the label shows in sampled videos later than in the denoising loss.
    paired_t = drift.mean() / (drift.std(ddof=1) / np.sqrt(len(drift)))
    assert paired_t >= 3.0, (paired_t, drift.round(3))


TEXT_MOTION_STEPS = 500


def run_diffusion(cfg):
    """The diffusion a diffusion run trained with (its schedule, variance and prediction type)."""
    return create_diffusion(None, cfg.diffusion.noise_schedule, cfg.model.learn_sigma, cfg.diffusion.diffusion_steps,
                            cfg.diffusion.loss_type, cfg.diffusion.prediction_type)


def predicted_noise(diffusion, output, x_t, t):
    """The noise a denoiser's output (eps or v in its first channels) implies for x_t."""
    prediction = output[:, : x_t.shape[1]]
    return diffusion.predict_eps_from_v(x_t, t, prediction) if diffusion.prediction_type == "v" else prediction


def test_text_conditioned_motion_model_reads_the_direction_from_the_prompt(trained_tiny_ae, python_runner, tmp_path):
    """The motion DiT trained on the built-in captions (tiny random CLIP) must take the direction from the text: on
    held-out clips of a square moving right or left, its noise prediction must be better with the clip's own
    caption than with the opposite direction's, at the same timestep and noise. The content frame is the same in
    both, so only the text can make the difference; a model blind to it predicts the same for both captions."""
    ae, _ = trained_tiny_ae
    clip = make_tiny_clip(tmp_path / "clip")
    python_runner(["train_motion_diffusion.py", "--config", "configs/tiny_text/motion.yaml", "--results-dir", tmp_path,
                   "--exp-name", "motion", "--ae-ckpt", ae, "--text-encoder", clip, "--max-steps", TEXT_MOTION_STEPS,
                   f"train.sample_every={TEXT_MOTION_STEPS}", f"train.ckpt_every={TEXT_MOTION_STEPS}"],
                  env=LONE_PROCESS_ENV)
    models = load_models(ae, tmp_path / "motion" / "checkpoints" / "last.pt")
    cfg, model, scaler = models.motion.cfg, models.motion.model, models.motion.scaler
    held_out = build_dataset(cfg.data, split="test", seed=0)
    indices = [i for i in range(len(held_out)) if held_out.label_of(i) in (RIGHT, LEFT)][:64]
    with torch.no_grad():
        z_c, z_m = models.ae.encode(torch.stack([held_out[i]["x"] for i in indices]))
    directions = ["right" if held_out.label_of(i) == RIGHT else "left" for i in indices]
    own = models.encode_prompts([f"a square moving {d}" for d in directions])
    opposite = models.encode_prompts([f"a square moving {'left' if d == 'right' else 'right'}" for d in directions])
    x0, content = scaler.normalize("motion", z_m), scaler.normalize("content", z_c)
    diffusion = run_diffusion(cfg)
    generator, gaps = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for _ in range(8):  # timestep and noise draws per clip, shared by the two captions
            t = torch.randint(0, diffusion.num_timesteps, (len(indices),), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = diffusion.q_sample(x0, t, noise=noise)
            errors = [(predicted_noise(diffusion, model(x_t, t, y, content), x_t, t) - noise).square().mean((1, 2, 3))
                      for y in (own, opposite)]
            gaps.append(errors[1] - errors[0])
    gap = torch.stack(gaps).mean(0).double().numpy()  # per clip: how much worse the wrong direction predicts
    assert np.abs(gap).max() > 0, "the motion model predicts the same for both directions: it ignores the text"
    # Paired t over 64 clips; a text-blind model gives gap 0 everywhere. Measured ~10 at this budget (500 steps);
    # t >= 3 by chance has probability < 0.2% (one-sided, 63 degrees of freedom).
    paired_t = gap.mean() / (gap.std(ddof=1) / np.sqrt(len(gap)))
    assert paired_t >= 3.0, (paired_t, gap.round(4))



CONTENT_STEPS = 600


def test_content_model_learns_the_shape_its_class_names(trained_tiny_ae, python_runner, tmp_path):
    """The content model (the demo's config) must learn what its class adds to a content frame. Classes 0-2 are a
    square, a disc and a triangle, all moving right: on held-out clips of these classes its estimate of the clean
    content frame from a noisy one (here: of its noise) must be better with the clip's own class than with another
    shape's, at the same timestep and noise. A model that ignores the class, or draws no shape, predicts alike for
    both labels."""
    ae_path, _ = trained_tiny_ae
    python_runner(["train_content_diffusion.py", "--config", "configs/tiny/content.yaml", "--results-dir", tmp_path,
                   "--exp-name", "content", "--ae-ckpt", ae_path, "--max-steps", CONTENT_STEPS,
                   f"train.sample_every={CONTENT_STEPS}", f"train.ckpt_every={CONTENT_STEPS}"], env=LONE_PROCESS_ENV)
    ae, _ = load_autoencoder(ae_path, "cpu")
    model, cfg, scaler = load_denoiser(tmp_path / "content" / "checkpoints" / "last.pt", "content", ae, "cpu")
    held_out = build_dataset(cfg.data, split="test", seed=0)
    indices = [i for i in range(len(held_out)) if held_out.label_of(i) < len(SHAPES)][:96]
    labels = torch.tensor([held_out.label_of(i) for i in indices])
    with torch.no_grad():
        x0 = scaler.normalize("content", ae.encode(torch.stack([held_out[i]["x"] for i in indices]))[0])
    diffusion = run_diffusion(cfg)
    generator, gaps = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for shift in (1, 2, 1, 2):  # timestep and noise draws per clip, shared by the two labels
            t = torch.randint(100, 700, (len(indices),), generator=generator)  # where the shape is being decided
            noise = torch.randn(x0.shape, generator=generator)
            x_t = diffusion.q_sample(x0, t, noise=noise)
            errors = [(predicted_noise(diffusion, model(x_t, t, y), x_t, t) - noise).square().mean((1, 2, 3))
                      for y in (labels, (labels + shift) % len(SHAPES))]
            gaps.append(errors[1] - errors[0])
    gap = torch.stack(gaps).mean(0).double().numpy()  # per clip: how much worse another shape's label predicts
    assert np.abs(gap).max() > 0, "the content model predicts the same for every class: it ignores the label"
    # Paired t over 96 clips; a class-blind model gives gap 0 everywhere, and t >= 3 by chance has probability
    # below 0.2% (one-sided, 95 degrees of freedom).
    paired_t = gap.mean() / (gap.std(ddof=1) / np.sqrt(len(gap)))
    assert paired_t >= 3.0, (paired_t, gap.round(4))
