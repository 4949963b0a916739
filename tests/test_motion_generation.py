"""Does the motion DiT generate motion? Motion-only samples (real content frames, generated z_m) must move the way
their class says, measured on the decoded videos; this is what a collapsed motion latent made impossible."""
import numpy as np

from datasets.synthetic import DIRECTIONS, SHAPES
from tests.conftest import LONE_PROCESS_ENV

MOTION_STEPS = 1500
RIGHT, LEFT = 0, 3  # square-right and square-left in the 4-class tiny config: same shape, opposite motion
assert DIRECTIONS[RIGHT // len(SHAPES)] == "right" and DIRECTIONS[LEFT // len(SHAPES)] == "left"


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
    import torch

    from datasets.transforms import to_uint8_videos
    from sampling.generation import SamplingOptions, generate, load_models, real_content_frames

    ae, _ = trained_tiny_ae
    python_runner(["train_motion_diffusion.py", "--config", "configs/tiny/motion.yaml", "--results-dir", tmp_path,
                   "--exp-name", "motion", "--ae-ckpt", ae, "--max-steps", MOTION_STEPS,
                   f"train.sample_every={MOTION_STEPS}", f"train.ckpt_every={MOTION_STEPS}"], env=LONE_PROCESS_ENV)
    models = load_models(ae, tmp_path / "motion" / "checkpoints" / "last.pt",
                         motion_options=SamplingOptions(steps=15, sampler="dpm++2m", cfg_scale=4.0))
    clips = [RIGHT] * 16 + [LEFT] * 16  # content frames of held-out clips of both directions
    content = real_content_frames(models.ae, models.motion.cfg.data, 0, clips, "cpu")
    velocity = {}
    for label in (RIGHT, LEFT):
        videos, _ = generate(models, torch.full((len(clips),), label), seed=0, content=content)
        velocity[label] = horizontal_velocity(to_uint8_videos(videos))
    drift = velocity[RIGHT] - velocity[LEFT]  # per content frame and noise: how much further right "right" goes
    # Paired t over 32 pairs. A motion latent that is ignored, constant or blind to the label gives identical
    # videos for both labels (drift exactly 0); a label that acts at random makes t >= 3 a chance of < 0.3%
    # (one-sided, 31 degrees of freedom). Measured: t = 5.8 at 1,500 steps (29 of 32 pairs drift the label's
    # way), 2.6 at 1,000 steps: the label shows in sampled videos later than in the denoising loss.
    paired_t = drift.mean() / (drift.std(ddof=1) / np.sqrt(len(drift)))
    assert paired_t >= 3.0, (paired_t, drift.round(3))


def test_real_content_and_content_frame_are_exclusive(trained_tiny_ae, python_runner, tmp_path):
    ae, _ = trained_tiny_ae
    proc = python_runner(["sample.py", "--ae-ckpt", ae, "--motion-ckpt", ae, "--real-content", "--content-frame",
                          "x.png", "--out-dir", tmp_path], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "choose one" in proc.stderr



TEXT_MOTION_STEPS = 500


def test_text_conditioned_motion_model_reads_the_direction_from_the_prompt(trained_tiny_ae, python_runner, tmp_path):
    """The motion DiT trained on the built-in captions (tiny random CLIP) must take the direction from the text: on
    held-out clips of a square moving right or left, its noise prediction must be better with the clip's own
    caption than with the opposite direction's, at the same timestep and noise. The content frame is the same in
    both, so only the text can make the difference; a model blind to it predicts the same for both captions."""
    import torch

    from datasets import build_dataset
    from diffusion import create_diffusion
    from scripts.make_tiny_sd import make_tiny_clip
    from sampling.generation import load_models

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
    diffusion = create_diffusion(None, cfg.diffusion.noise_schedule, cfg.model.learn_sigma,
                                 cfg.diffusion.diffusion_steps, cfg.diffusion.loss_type)
    generator, gaps = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for _ in range(8):  # timestep and noise draws per clip, shared by the two captions
            t = torch.randint(0, diffusion.num_timesteps, (len(indices),), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = diffusion.q_sample(x0, t, noise=noise)
            errors = [(model(x_t, t, y, content)[:, : x0.shape[1]] - noise).square().mean((1, 2, 3))
                      for y in (own, opposite)]
            gaps.append(errors[1] - errors[0])
    gap = torch.stack(gaps).mean(0).double().numpy()  # per clip: how much worse the wrong direction predicts
    assert np.abs(gap).max() > 0, "the motion model predicts the same for both directions: it ignores the text"
    # Paired t over 64 clips; a text-blind model gives gap 0 everywhere. Measured ~10 at this budget (500 steps);
    # t >= 3 by chance has probability < 0.2% (one-sided, 63 degrees of freedom).
    paired_t = gap.mean() / (gap.std(ddof=1) / np.sqrt(len(gap)))
    assert paired_t >= 3.0, (paired_t, gap.round(4))
