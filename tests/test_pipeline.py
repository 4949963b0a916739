"""The three training scripts and sample.py, end to end on tiny configs: torchrun, checkpoints, resume, samples."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.chain import TINY_AE, TINY_DIFFUSION, sample, train
from tests.helpers.processes import run_python
from core.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # trains or launches scripts for minutes: scheduled first (conftest.py)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """AE (2 processes, then resumed), motion and content (2 processes each): the checkpoints of one chain."""
    tmp = tmp_path_factory.mktemp("chain")
    train(tmp, "train_ae.py", "autoencoder", "ae", 2, *TINY_AE, "train.eval_every=2", nproc=2)
    resumed = train(tmp, "train_ae.py", "autoencoder", "ae", 4, *TINY_AE, "train.eval_every=2", "--resume", "auto")
    ae = tmp / "ae" / "checkpoints" / "last.pt"
    common = ["--ae-ckpt", ae, *TINY_DIFFUSION]
    motion = train(tmp, "train_motion_diffusion.py", "motion", "motion", 2, *common, nproc=2)
    content = train(tmp, "train_content_diffusion.py", "content", "content", 2, *common, nproc=2)
    return {"tmp": tmp, "ae": ae, "motion": tmp / "motion" / "checkpoints" / "last.pt",
            "content": tmp / "content" / "checkpoints" / "last.pt",
            "logs": {"ae_resumed": resumed.stdout, "motion": motion.stdout, "content": content.stdout}}


def test_autoencoder_trains_under_torchrun_writes_eval_media_and_resumes(chain):
    run_dir = chain["tmp"] / "ae"
    ckpt = load_checkpoint(chain["ae"])
    assert ckpt["step"] == 4 and ckpt["stage"] == "autoencoder"
    assert ckpt["config"]["data"]["num_classes"] == 4  # recorded for the next stages
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["0000002.pt", "0000004.pt", "last.pt"]
    assert "resumed from" in chain["logs"]["ae_resumed"] and "step 0000003" in chain["logs"]["ae_resumed"]
    assert "step 0000001" not in chain["logs"]["ae_resumed"]  # the count continued instead of restarting
    for name in ("reconstruction_0000002.mp4", "reconstruction_0000004.png", "content_frames_0000004.png"):
        assert (run_dir / "eval" / name).stat().st_size > 0
    assert re.search(r"eval step 0000004 \|.* psnr=\d+\.\d+ .*ssim=\d+\.\d+ swap_gap=-?\d+\.\d+",
                     (run_dir / "log.txt").read_text())


@pytest.mark.parametrize("stage", ["motion", "content"])
def test_diffusion_stages_train_under_torchrun_and_write_samples(chain, stage):
    ckpt = load_checkpoint(chain[stage])
    assert ckpt["step"] == 2 and ckpt["stage"] == stage and ckpt["ema"] is not None
    assert ckpt["config"]["ae_ckpt"] == str(chain["ae"])
    samples = list((chain["tmp"] / stage / "samples").glob("*.png"))
    assert samples and all(p.stat().st_size > 0 for p in samples)
    assert "loss=" in chain["logs"][stage]


def test_diffusion_stage_finds_the_autoencoder_and_resumes(chain):
    # No --ae-ckpt, as in NVlabs/CMD's commands: the newest autoencoder run in the same results folder is used.
    tmp = chain["tmp"]
    train(tmp, "train_content_diffusion.py", "content", "c", 2, *TINY_DIFFUSION)
    # The step file of the newest checkpoint, not last.pt, which moves on while the autoencoder run goes on.
    assert (load_checkpoint(tmp / "c" / "checkpoints" / "last.pt")["config"]["ae_ckpt"]
            == str(chain["ae"].with_name("0000004.pt")))
    proc = train(tmp, "train_content_diffusion.py", "content", "c", 3, *TINY_DIFFUSION, "--resume", tmp / "c")
    assert "resumed from" in proc.stdout and load_checkpoint(tmp / "c" / "checkpoints" / "last.pt")["step"] == 3


def test_motion_stage_trains_from_the_latent_cache(chain, tmp_path):
    args = ["--ae-ckpt", chain["ae"], *TINY_DIFFUSION, "diffusion.latent_cache=true",
            "diffusion.latent_cache_clips_per_video=2", "data.synthetic_size=8"]
    proc = train(tmp_path, "train_motion_diffusion.py", "motion", "m", 2, *args)
    assert "latent cache: encoding 16 clips" in proc.stdout
    cache = next((tmp_path / "latent_cache").iterdir())
    assert np.load(cache / "z_m.npy", mmap_mode="r").shape == (16, 4, 10, 8)
    proc = train(tmp_path, "train_motion_diffusion.py", "motion", "m2", 2, *args)
    assert "latent cache: reusing" in proc.stdout  # a second run does not encode again


def test_autoencoder_reports_reconstruction_fvd_with_a_detector(chain, tmp_path):
    from evals.i3d import InceptionI3d

    torch.manual_seed(0)
    torch.save(InceptionI3d().state_dict(), tmp_path / "i3d.pt")
    train(tmp_path, "train_ae.py", "autoencoder", "ae", 1, *TINY_AE, "train.eval_every=1",
          f"train.fvd_detector={tmp_path / 'i3d.pt'}", "train.fvd_eval_videos=4")
    assert re.search(r"eval step 0000001 \|.* fvd_recon=\d+\.\d+", (tmp_path / "ae" / "log.txt").read_text())


@pytest.mark.parametrize("script,config", [("train_motion_diffusion.py", "motion"),
                                           ("train_content_diffusion.py", "content")])
def test_wrong_stage_as_ae_ckpt_is_refused(chain, tmp_path, script, config):
    proc = train(tmp_path, script, config, "x", 2, "--ae-ckpt", chain["motion"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {chain['motion']} is a 'motion' checkpoint, but a 'autoencoder' checkpoint is expected here")


def test_sample_is_independent_of_batch_size_and_process_count(chain, tmp_path):
    runs = {"b4": ("--batch-size", 4), "b1": ("--batch-size", 1)}
    for name, extra in runs.items():
        sample(chain, tmp_path / name, "--num-videos", 5, "--npz", tmp_path / f"{name}.npz", *extra)
    sample(chain, tmp_path / "p2", "--num-videos", 5, "--npz", tmp_path / "p2.npz", "--batch-size", 2, nproc=2)
    b4, b1, p2 = (np.load(tmp_path / f"{n}.npz") for n in ("b4", "b1", "p2"))
    assert b4["videos"].shape == (5, 10, 16, 16, 3) and b4["videos"].dtype == np.uint8
    assert b4["labels"].tolist() == [0, 1, 2, 3, 0]  # all classes round-robin
    for other in (b1, p2):
        # Same per-video seeds; only float rounding of different batch shapes may move a pixel by one level. The
        # content frames are compared too: a 4-step autoencoder with the conv output head decodes nearly flat videos.
        for key in ("videos", "content_frames"):
            assert np.abs(b4[key].astype(int) - other[key]).max() <= 1
            assert np.abs(b4[key].astype(int) - other[key]).mean() < 0.01
    assert len(list((tmp_path / "p2" / "videos").glob("*.mp4"))) == 5
    assert (tmp_path / "b4" / "grid.mp4").stat().st_size > 0 and (tmp_path / "b4" / "grid.png").stat().st_size > 0
    other_seed = sample(chain, tmp_path / "s1", "--num-videos", 5, "--npz", tmp_path / "s1.npz", "--seed", 1)
    assert other_seed.returncode == 0
    assert not np.array_equal(np.load(tmp_path / "s1.npz")["content_frames"], b4["content_frames"])


def test_image_to_video_keeps_the_given_content_frame(chain, tmp_path):
    image = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "frame.png")
    sample(chain, tmp_path / "i2v", "--content-frame", tmp_path / "frame.png", "--classes", "2", "--num-videos", 2,
           "--npz", tmp_path / "i2v.npz")
    out = np.load(tmp_path / "i2v.npz")
    assert out["labels"].tolist() == [2, 2]
    assert np.abs(out["content_frames"].astype(int) - image[None]).max() <= 1


def test_sample_rejects_bad_class_and_wrong_stage(chain, tmp_path):
    proc = sample(chain, tmp_path / "bad", "--classes", "0,9", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == (
        "error: --classes: class id 9 is out of range; the models know classes 0..3")
    args = ["sample.py", "--ae-ckpt", chain["ae"], "--motion-ckpt", chain["content"],
            "--content-ckpt", chain["content"], "--out-dir", tmp_path / "x"]
    proc = run_python(args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {chain['content']} is a 'content' checkpoint, but a 'motion' checkpoint is expected here")


def test_end_to_end_fvd_cli_prints_a_number(chain, tmp_path):
    from evals.i3d import InceptionI3d

    torch.manual_seed(0)
    detector = tmp_path / "i3d_random.pt"
    torch.save(InceptionI3d().state_dict(), detector)  # the public port's layout, random weights
    sample(chain, tmp_path / "fake", "--num-videos", 4, "--npz", tmp_path / "fake.npz")
    proc = run_python(["-m", "evals.fvd", "--real", "synthetic", "--fake", tmp_path / "fake.npz",
                       "--detector", detector, "--num-videos", 4, "--n-frames", 10, "--resolution", 16, 16,
                       "--cache-dir", tmp_path / "cache"])
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("fvd4_10f[i3d-port:i3d_random]: ")
    assert float(lines[-1]) >= 0.0


def test_self_conditioned_content_model_trains_and_samples(chain, tmp_path):
    # Two processes with 2 clips each: a rank often has no clip for the estimate's pass while the other has.
    train(tmp_path, "train_content_diffusion.py", "content", "sc", 3, "--ae-ckpt", chain["ae"], *TINY_DIFFUSION,
          "model.self_condition=true", nproc=2)
    ckpt = load_checkpoint(tmp_path / "sc" / "checkpoints" / "last.pt")
    assert ckpt["config"]["model"]["self_condition"] is True
    # Its patch embedding reads the noisy frame and the estimate: twice the content frame's channels.
    assert ckpt["ema"]["x_embedder.proj.weight"].shape[1] == 2 * 3
    sc_chain = {**chain, "content": tmp_path / "sc" / "checkpoints" / "last.pt"}
    for sampler in ("dpm++2m", "ddpm"):
        sample(sc_chain, tmp_path / sampler, "--content-sampler", sampler, "--num-videos", 2,
               "--npz", tmp_path / f"{sampler}.npz")
        out = np.load(tmp_path / f"{sampler}.npz")
        # The content frames the model sampled from noise differ (the 4-step autoencoder still decodes flat videos).
        assert out["videos"].shape[0] == 2 and out["content_frames"].std() > 0
