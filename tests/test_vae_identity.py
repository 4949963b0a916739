"""Latent mode's VAE is part of what every stage learned: each latent-mode checkpoint, export and latent cache records
the fingerprint of its weights, and resume, `--resume auto`, the diffusion stages and sample.py refuse another VAE in
one line naming both. Two tiny random SD-shaped VAEs of the same shape (scripts/make_tiny_sd.py, seeds 0 and 1)."""
import json
import shutil

import pytest
import torch

from core.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, resume_differences
from core.config import config_from_dict
from core.frozen_autoencoder import load_autoencoder, vae_fingerprint
from models.vae import load_frame_vae
from scripts.make_tiny_sd import make_tiny_sd
from tests.helpers.chain import TINY_LATENT_RUN
from tests.helpers.processes import run_python

pytestmark = pytest.mark.slow  # trains the tiny stages in subprocesses

AE = ["train_ae.py", "--config", "configs/tiny_latent/autoencoder.yaml", *TINY_LATENT_RUN, "model.hidden_size=32",
      "model.depth=1", "model.num_heads=2", "train.eval_every=2"]
MOTION = ["train_motion_diffusion.py", "--config", "configs/tiny_latent/motion.yaml", *TINY_LATENT_RUN,
          "diffusion.sample_steps=2", "train.sample_every=2"]


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """{name: (folder, fingerprint)} of two VAEs of one shape and other weights."""
    root = tmp_path_factory.mktemp("vaes")
    found = {}
    for name, seed in (("a", 0), ("b", 1)):
        folder = make_tiny_sd(root / name, seed=seed, text=False) / "vae"
        found[name] = (folder, vae_fingerprint(load_frame_vae(str(folder))))
    return found


@pytest.fixture(scope="module")
def chain(vaes, tmp_path_factory):
    """An autoencoder (results/000-autoencoder) and a motion run trained with VAE a."""
    results = tmp_path_factory.mktemp("runs")
    vae_a = vaes["a"][0]
    run_python([*AE, "--results-dir", results, "--vae", vae_a])
    ae = results / "000-autoencoder" / "checkpoints" / "0000002.pt"  # last.pt moves on when a test resumes the run
    run_python([*MOTION, "--results-dir", results, "--exp-name", "motion", "--ae-ckpt", ae])
    return {"results": results, "ae": ae, "motion": results / "motion" / "checkpoints" / "last.pt"}


def refused(proc, *named) -> str:
    """The one `error:` line of a refused command, naming each of `named`."""
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-3000:]
    for name in named:
        assert str(name) in line, f"{name} not named in: {line}"
    return line


def test_the_fingerprint_names_the_weights_not_the_folder(vaes, tmp_path):
    (folder_a, fp_a), (_, fp_b) = vaes["a"], vaes["b"]
    copy = shutil.copytree(folder_a, tmp_path / "elsewhere")
    assert vae_fingerprint(load_frame_vae(str(copy))) == fp_a  # the same weights moved
    assert fp_a != fp_b and len(fp_a) == 16  # same shapes, other weights


def test_every_latent_mode_checkpoint_cache_and_export_records_the_vae(vaes, chain, tmp_path):
    fp_a = vaes["a"][1]
    for ckpt in (chain["ae"], chain["motion"]):
        assert load_checkpoint(ckpt)["config"]["vae_fingerprint"] == fp_a
    caches = sorted((chain["results"] / "latent_cache").glob("*/done"))
    assert len(caches) == 2  # the autoencoder's VAE latents and the motion stage's (z_c, z_m)
    for done in caches:
        assert json.loads(done.read_text())["vae"] == fp_a
    export = tmp_path / "ae.safetensors"
    run_python(["-m", "training.export", chain["ae"], export])
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as handle:
        assert handle.metadata()["cmd.vae_fingerprint"] == fp_a
    with pytest.raises(CheckpointError) as other:
        load_autoencoder(export, "cpu", vae=str(vaes["b"][0]))
    message = str(other.value)
    assert "\n" not in message and fp_a in message and vaes["b"][1] in message and str(vaes["b"][0]) in message


def test_resume_and_resume_auto_refuse_another_vae_and_continue_with_the_same(vaes, chain):
    (folder_a, fp_a), (folder_b, fp_b) = vaes["a"], vaes["b"]
    results, run_dir = chain["results"], chain["ae"].parent.parent
    before = sorted(p.name for p in results.iterdir()), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    for resume in (run_dir, "auto"):
        proc = run_python([*AE, "--results-dir", results, "--vae", folder_b, "--resume", resume], check=False)
        refused(proc, folder_a, fp_a, folder_b, fp_b)
    # Nothing changed: no new run folder, no new checkpoint.
    assert (sorted(p.name for p in results.iterdir()),
            sorted(p.name for p in (run_dir / "checkpoints").iterdir())) == before
    run_python([*AE, "--results-dir", results, "--vae", shutil.copytree(folder_a, results.parent / "a_moved"),
                "--resume", "auto", "--max-steps", 3])
    resumed = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert resumed["step"] == 3 and resumed["config"]["vae_fingerprint"] == fp_a


def test_diffusion_stage_and_sample_refuse_another_vae(vaes, chain, tmp_path):
    (folder_a, fp_a), (folder_b, fp_b) = vaes["a"], vaes["b"]
    proc = run_python([*MOTION, "--results-dir", tmp_path / "r", "--ae-ckpt", chain["ae"], "--vae", folder_b],
                      check=False)
    refused(proc, chain["ae"], fp_a, folder_b, fp_b)
    sample = ["sample.py", "--ae-ckpt", chain["ae"], "--motion-ckpt", chain["motion"], "--real-content",
              "--num-videos", 1, "--motion-steps", 2, "--quiet"]
    refused(run_python([*sample, "--vae", folder_b, "--out-dir", tmp_path / "b"], check=False),
            chain["ae"], fp_a, folder_b, fp_b)
    run_python([*sample, "--vae", folder_a, "--out-dir", tmp_path / "a"])  # the same VAE samples
    assert len(list((tmp_path / "a" / "videos").glob("*.mp4"))) == 1


def test_checkpoints_without_a_fingerprint_load_with_a_warning(vaes, chain, tmp_path, caplog):
    ckpt = torch.load(chain["ae"], map_location="cpu", weights_only=True)
    del ckpt["config"]["vae_fingerprint"]
    older = tmp_path / "older.pt"
    atomic_torch_save(ckpt, older)
    with caplog.at_level("WARNING"):
        ae, ae_cfg = load_autoencoder(older, "cpu", vae=str(vaes["b"][0]))
    assert any("records no VAE fingerprint" in r.getMessage() and str(older) in r.getMessage() for r in caplog.records)
    assert ae_cfg.vae_fingerprint == vaes["b"][1]  # what it runs with from now on
    cfg = config_from_dict("autoencoder", {**ckpt["config"], "vae_fingerprint": vaes["b"][1]})
    assert resume_differences(ckpt, cfg) == []  # nothing recorded to compare
    run_python([*AE, "--results-dir", tmp_path / "r", "--exp-name", "resumed", "--vae", vaes["b"][0], "--resume", older,
                "--max-steps", 3])
    log = (tmp_path / "r" / "resumed" / "log.txt").read_text()
    assert "WARNING" in log and "records no VAE fingerprint" in log
    resumed = load_checkpoint(tmp_path / "r" / "resumed" / "checkpoints" / "last.pt")
    assert resumed["step"] == 3 and resumed["config"]["vae_fingerprint"] == vaes["b"][1]


def test_latent_cache_of_another_vae_is_refused_and_one_without_a_record_is_used_with_a_warning(vaes, chain, tmp_path,
                                                                                                   caplog):
    """The cache key holds the fingerprint, so another VAE looks in another folder; a cache copied by hand under the
    other VAE's key is caught by the fingerprint its `done` file records."""
    import logging

    from core.distributed import DistInfo
    from core.latent_cache import LatentCache, LatentEncoder, build_latent_cache, latent_cache_key

    cfg = config_from_dict("autoencoder", load_checkpoint(chain["ae"])["config"])
    (built,) = [done.parent for done in (chain["results"] / "latent_cache").glob("*/done")
                if "x" in json.loads(done.read_text())["arrays"]]
    build = dict(data_cfg=cfg.data, cache_root=tmp_path / "cache", logger=logging.getLogger("test_vae_identity"),
                 dist=DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    encoder_b = LatentEncoder.frames(load_frame_vae(str(vaes["b"][0])), cfg.data)
    clips = int(cfg.latent_cache_clips_per_video)
    copied = shutil.copytree(built, tmp_path / "cache" / latent_cache_key(encoder_b.key, cfg.data, clips))
    with pytest.raises(CheckpointError) as other:
        build_latent_cache(encoder_b, None, clips, 4, **build)
    assert str(copied) in str(other.value) and vaes["a"][1] in str(other.value) and vaes["b"][1] in str(other.value)
    done = json.loads((copied / "done").read_text())
    del done["vae"]
    (copied / "done").write_text(json.dumps(done))
    with caplog.at_level("WARNING"):
        reused = build_latent_cache(encoder_b, None, clips, 4, **build)
    assert isinstance(reused, LatentCache)
    assert any("records no VAE fingerprint" in record.getMessage() for record in caplog.records)
