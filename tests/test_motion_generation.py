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


def test_motion_only_samples_move_in_their_class_direction(trained_tiny_ae, python_runner, tmp_path):
    ae, _ = trained_tiny_ae
    python_runner(["train_motion_diffusion.py", "--config", "configs/tiny/motion.yaml", "--results-dir", tmp_path,
                   "--exp-name", "motion", "--ae-ckpt", ae, "--max-steps", MOTION_STEPS,
                   f"train.sample_every={MOTION_STEPS}", f"train.ckpt_every={MOTION_STEPS}"], env=LONE_PROCESS_ENV)
    npz = tmp_path / "motion_only.npz"
    python_runner(["sample.py", "--ae-ckpt", ae, "--motion-ckpt", tmp_path / "motion" / "checkpoints" / "last.pt",
                   "--real-content", "--classes", f"{RIGHT},{LEFT}", "--num-videos", 32, "--motion-steps", 25,
                   "--motion-cfg-scale", 4.0,
                   "--out-dir", tmp_path / "samples", "--npz", npz, "--quiet"])
    samples = np.load(npz)
    velocity, labels = horizontal_velocity(samples["videos"]), samples["labels"]
    right, left = velocity[labels == RIGHT], velocity[labels == LEFT]
    assert len(right) == len(left) == 16
    # The two classes share their shape and differ only in direction, so their generated motions must differ the
    # class's way. Welch's t of (right - left) drift: a motion latent that is ignored, constant or blind to the
    # label gives both classes the same drift distribution, and t >= 2 then happens with probability < 3%
    # (one-sided, ~30 degrees of freedom). At this training budget t measures ~3; at the demo's it is far larger
    # (62 of 64 motion-only videos drift the right way).
    welch_t = (right.mean() - left.mean()) / np.sqrt(right.var(ddof=1) / len(right) + left.var(ddof=1) / len(left))
    assert welch_t >= 2.0, (welch_t, right.round(3), left.round(3))


def test_real_content_and_content_frame_are_exclusive(trained_tiny_ae, python_runner, tmp_path):
    ae, _ = trained_tiny_ae
    proc = python_runner(["sample.py", "--ae-ckpt", ae, "--motion-ckpt", ae, "--real-content", "--content-frame",
                          "x.png", "--out-dir", tmp_path], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "choose one" in proc.stderr
