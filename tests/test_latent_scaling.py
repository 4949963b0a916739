"""Latent standardisation: per-channel statistics measured once per run, applied in training and sampling, kept in
every diffusion checkpoint and restored on resume; checkpoints from before them sample with identity statistics."""
import contextlib
import io
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusion import create_diffusion
from tests.helpers.chain import TINY_AE, TINY_DIFFUSION, sample, train
from core.checkpoint import CheckpointError, load_checkpoint
from core.config import config_from_dict
from sampling.generation import sample_latents
from core.distributed import DistInfo
from core.frozen_autoencoder import encode, load_autoencoder
from core.latent_cache import MOMENTS_FILE, STATS_CLIPS, LatentCache
from core.latent_stats import STD_FLOOR, LatentMoments, LatentScaler

SHAPES = SimpleNamespace(content_shape=(3, 16, 16), motion_shape=(4, 10, 8))  # the tiny autoencoder's latents


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-step autoencoder; motion trained from the latent cache (the tiny config's default), content from
    clips under 2 processes (each encodes its share of the clips the statistics are measured over)."""
    tmp = tmp_path_factory.mktemp("scaling")
    train(tmp, "train_ae.py", "autoencoder", "ae", 1, *TINY_AE)
    ae = tmp / "ae" / "checkpoints" / "last.pt"
    common = ["--ae-ckpt", ae, *TINY_DIFFUSION]
    motion = train(tmp, "train_motion_diffusion.py", "motion", "motion", 2, *common)
    content = train(tmp, "train_content_diffusion.py", "content", "content", 2, *common, "diffusion.latent_cache=false",
                    nproc=2)
    return {"tmp": tmp, "ae": ae, "common": common, "motion": tmp / "motion" / "checkpoints" / "last.pt",
            "content": tmp / "content" / "checkpoints" / "last.pt",
            "logs": {"motion": motion.stdout, "content": content.stdout}}


def numpy_stats(z: np.ndarray) -> tuple:
    """Float64 per-channel (mean, std) of a (B, channels, ...) array over all other axes."""
    axes = tuple(i for i in range(z.ndim) if i != 1)
    z = z.astype(np.float64)
    return z.mean(axes), z.std(axes)


def first_clip_stats(ae_path, ckpt: dict, count: int) -> dict:
    """What a run without a latent cache measures: the first `count` training clips of the checkpoint's data config."""
    from datasets import build_dataset

    cfg = config_from_dict(ckpt["stage"], ckpt["config"])
    dataset = build_dataset(cfg.data, split=cfg.data.split, seed=cfg.train.global_seed)
    clips = torch.stack([dataset[(i, 0)]["x"] for i in range(min(count, len(dataset)))])
    ae, _ = load_autoencoder(ae_path, "cpu")
    z_c, z_m = encode(ae, clips, contextlib.nullcontext())
    return {"content": numpy_stats(z_c.numpy()), "motion": numpy_stats(z_m.numpy())}


def assert_stats(state: dict, want: dict, **tolerance) -> None:
    """A latent_stats entry equals float64 reference (mean, std) per latent, with the std floor applied."""
    for kind, (mean, std) in want.items():
        floored = np.maximum(std, STD_FLOOR)
        torch.testing.assert_close(state[f"{kind}_mean"], torch.as_tensor(mean, dtype=torch.float32), **tolerance)
        torch.testing.assert_close(state[f"{kind}_std"], torch.as_tensor(floored, dtype=torch.float32), **tolerance)


def with_stats(path, out, state) -> str:
    """A copy of checkpoint `path` with `latent_stats` replaced by `state` (None: removed, as in older runs)."""
    ckpt = load_checkpoint(path)
    ckpt.pop("latent_stats")
    if state is not None:
        ckpt["latent_stats"] = state
    torch.save(ckpt, out)
    return out


def random_scaler(seed: int = 0) -> LatentScaler:
    generator = torch.Generator().manual_seed(seed)
    c, d = SHAPES.content_shape[0], SHAPES.motion_shape[0]
    return LatentScaler(torch.rand(c, generator=generator) - 0.5, torch.rand(c, generator=generator) * 0.5 + 0.05,
                        torch.rand(d, generator=generator) * 0.2 - 0.1, torch.rand(d, generator=generator) * 0.3 + 0.01)


# ---- statistics ------------------------------------------------------------------------------------------------
def test_cache_statistics_are_the_float64_moments_of_the_cached_arrays(runs, tmp_path):
    cache = next((runs["tmp"] / "latent_cache").iterdir())
    want = {"content": numpy_stats(np.load(cache / "z_c.npy")), "motion": numpy_stats(np.load(cache / "z_m.npy"))}
    ckpt = load_checkpoint(runs["motion"])
    assert_stats(ckpt["latent_stats"], want)  # float32 tolerance: what the run applies
    assert "latent stats over the 64 cached latents" in runs["logs"]["motion"]
    moments = LatentMoments.load(cache / MOMENTS_FILE)  # summed while the cache was built
    for kind, (mean, std) in want.items():
        np.testing.assert_allclose(moments.mean_std(kind)[0].numpy(), mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(moments.mean_std(kind)[1].numpy(), std, rtol=1e-10)
    # A cache built before the sums were saved: they are summed over its arrays (in chunks) and saved with it.
    old = tmp_path / "old_cache"
    shutil.copytree(cache, old, ignore=shutil.ignore_patterns(MOMENTS_FILE))
    again = LatentCache(old).moments(DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")), chunk=5)
    assert (old / MOMENTS_FILE).is_file()
    for kind in want:
        torch.testing.assert_close(again.sums[kind], moments.sums[kind], rtol=1e-12, atol=1e-9)


def test_without_a_cache_the_ranks_measure_the_first_clips_together(runs):
    ckpt = load_checkpoint(runs["content"])
    assert "latent stats over the first 64 training clips" in runs["logs"]["content"]
    # Encoded here in one batch, there in per-rank batches of 2: equal up to float32 rounding.
    assert_stats(ckpt["latent_stats"], first_clip_stats(runs["ae"], ckpt, STATS_CLIPS), rtol=1e-5, atol=1e-6)


def test_std_is_floored_for_constant_channels():
    moments = LatentMoments(3, 4)
    z_c = torch.randn(5, 3, 2, 2)
    z_c[:, 1] = 0.25  # a channel the autoencoder never varies
    moments.add(z_c, torch.randn(5, 4, 3, 2))
    scaler, floored = LatentScaler.from_moments(moments)
    assert floored == {"content": [1]}
    assert scaler.stats["content"][1][1] == STD_FLOOR and scaler.stats["content"][0][1] == 0.25
    assert torch.isfinite(scaler.normalize("content", z_c)).all()


# ---- the scaler --------------------------------------------------------------------------------------------------
def test_normalize_denormalize_round_trip_and_bounds():
    scaler = random_scaler()
    generator = torch.Generator().manual_seed(1)
    for kind, shape in (("content", SHAPES.content_shape), ("motion", SHAPES.motion_shape)):
        z = torch.rand(2, *shape, generator=generator) * 2 - 1
        standard = scaler.normalize(kind, z)
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(scaler.denormalize(kind, standard), z, rtol=0, atol=2 * eps)  # |z| <= 1
        mean, std = scaler.stats[kind]
        torch.testing.assert_close(standard[:, 1], (z[:, 1] - mean[1]) / std[1])  # per channel
        low, high = scaler.bounds(kind, z.ndim)
        assert low.shape == high.shape == (1, shape[0], 1, 1)
        assert (standard >= low - 1e-5).all() and (standard <= high + 1e-5).all()
        torch.testing.assert_close(scaler.denormalize(kind, low.expand(1, *shape)), -torch.ones(1, *shape))
        torch.testing.assert_close(scaler.denormalize(kind, high.expand(1, *shape)), torch.ones(1, *shape))


def test_state_dict_is_plain_tensors_and_checkpoints_without_it_are_identity():
    scaler = random_scaler()
    state = scaler.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert sorted(loaded) == sorted(LatentScaler.KEYS)
    restored = LatentScaler.from_checkpoint({"latent_stats": loaded}, "x.pt", SHAPES)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key])
    identity = LatentScaler.from_checkpoint({}, "old.pt", SHAPES).state_dict()
    assert identity["content_mean"].tolist() == [0.0] * 3 and identity["motion_std"].tolist() == [1.0] * 4
    state["motion_std"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"^x\.pt: latent_stats\['motion_std'\] is not a \(4,\) tensor"):
        LatentScaler.from_checkpoint({"latent_stats": state}, "x.pt", SHAPES)


# ---- clipping and sampling ---------------------------------------------------------------------------------------
def test_predicted_x0_is_clipped_to_per_channel_bounds():
    diffusion = create_diffusion("4", learn_sigma=False, loss_type="mse")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 50
    t = torch.full((2,), 3)

    def model(x_t, _t, **_):
        return -x_t  # an x0 prediction far outside any bound

    low = torch.tensor([-3.0, -0.5, 0.0]).view(1, 3, 1, 1)
    high = torch.tensor([1.0, 0.5, 2.0]).view(1, 3, 1, 1)
    clipped = diffusion.p_mean_variance(model, x, t, clip_denoised=(low, high))["pred_x0"]
    assert clipped.dtype == torch.float64
    for channel in range(3):
        values = clipped[:, channel]
        assert values.min() == low.flatten()[channel] and values.max() == high.flatten()[channel]
    plain = diffusion.p_mean_variance(model, x, t, clip_denoised=True)["pred_x0"]
    assert plain.min() == -1 and plain.max() == 1  # True keeps meaning [-1, 1]
    assert diffusion.p_mean_variance(model, x, t)["pred_x0"].abs().max() > 2


def test_sample_latents_standardises_the_condition_and_denormalises_the_sample():
    scaler = random_scaler()
    standard = torch.randn(2, *SHAPES.motion_shape) * 3  # the sampler's output: standardised, partly out of range
    seen = {}

    def fake_sample(model_fn, shape, **kwargs):
        seen.update(kwargs, shape=shape)
        return standard if shape == standard.shape else torch.zeros(shape)

    sampling = SimpleNamespace(sample=fake_sample)
    model = SimpleNamespace(num_classes=4)
    content = torch.rand(2, *SHAPES.content_shape) * 2 - 1
    y = torch.tensor([0, 1])
    z_m = sample_latents(model, sampling, "ddim", "motion", SHAPES.motion_shape, y, 1.0, scaler, content=content)
    torch.testing.assert_close(seen["model_kwargs"]["content"], scaler.normalize("content", content))
    low, high = seen["clip_denoised"]
    torch.testing.assert_close(low, scaler.bounds("motion", 4)[0])
    torch.testing.assert_close(high, scaler.bounds("motion", 4)[1])
    torch.testing.assert_close(z_m, scaler.denormalize("motion", standard).clamp(-1, 1))
    z_c = sample_latents(model, sampling, "ddim", "content", SHAPES.content_shape, y, 1.0, scaler)
    assert "content" not in seen["model_kwargs"]
    torch.testing.assert_close(z_c, scaler.stats["content"][0].view(1, 3, 1, 1).expand(2, *SHAPES.content_shape))
    # Latent mode: content frames of VAE latents have no bound; neither x0 nor the sample is clipped.
    standard = torch.randn(2, *SHAPES.content_shape) * 3
    z_c = sample_latents(model, sampling, "ddim", "content", SHAPES.content_shape, y, 1.0, scaler, bound=None)
    assert seen["clip_denoised"] is False
    torch.testing.assert_close(z_c, scaler.denormalize("content", standard))
    assert z_c.abs().max() > 1


# ---- checkpoints, resume, sample.py ------------------------------------------------------------------------------
def test_checkpoint_keeps_the_stats_and_resume_restores_them(runs, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(runs["tmp"] / "motion", results / "motion")
    last = results / "motion" / "checkpoints" / "last.pt"
    # Statistics no measurement of this data would give: only a restore can bring them back.
    planted = random_scaler(seed=3).state_dict()
    with_stats(last, last, planted)
    # Resumed without the cache: a measurement would run over the training clips instead.
    proc = train(results, "train_motion_diffusion.py", "motion", "motion", 3, *runs["common"],
                 "diffusion.latent_cache=false", "--resume", results / "motion")
    assert "latent stats restored from" in proc.stdout and "latent stats over" not in proc.stdout
    after = load_checkpoint(last)
    assert after["step"] == 3
    assert all(torch.equal(after["latent_stats"][key], planted[key]) for key in LatentScaler.KEYS)


def test_resuming_a_run_without_stats_keeps_identity_stats(runs, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(runs["tmp"] / "content", results / "content")
    last = results / "content" / "checkpoints" / "last.pt"
    with_stats(last, last, None)
    proc = train(results, "train_content_diffusion.py", "content", "content", 3, *runs["common"],
                 "--resume", results / "content")
    assert "has none (a run from before latents were standardised)" in proc.stdout
    assert "latent stats over" not in proc.stdout  # not measured: the model trained on the raw latents
    saved = load_checkpoint(last)
    assert saved["step"] == 3
    identity = LatentScaler.identity(SHAPES).state_dict()
    assert all(torch.equal(saved["latent_stats"][key], identity[key]) for key in LatentScaler.KEYS)


def test_sample_applies_the_stats_and_samples_old_checkpoints_as_identity(runs, tmp_path):
    identity = LatentScaler.identity(SHAPES).state_dict()
    videos = {}
    for name, state in (("measured", "keep"), ("identity", identity), ("old", None)):
        chain = {"ae": runs["ae"], "motion": runs["motion"], "content": runs["content"]}
        if state != "keep":
            chain = {**chain, **{stage: with_stats(runs[stage], tmp_path / f"{stage}_{name}.pt", state)
                                 for stage in ("motion", "content")}}
        # DDIM: these 3-step models predict eps ~ 0, so DPM-Solver's first x0 (at t = 999, scaled by 1/sqrt(abar) ~
        # 158) clips every latent to its bounds, which are the same with or without stats; DDIM starts at t = 750.
        sample(chain, tmp_path / name, "--num-videos", 2, "--npz", tmp_path / f"{name}.npz", "--preset", "ddim")
        with np.load(tmp_path / f"{name}.npz") as archive:  # the content frames show the stats before the decoder
            videos[name] = np.concatenate([archive[key].reshape(2, -1) for key in ("videos", "content_frames")], 1)
    assert np.array_equal(videos["old"], videos["identity"])  # no stats = identity stats
    assert not np.array_equal(videos["measured"], videos["identity"])  # the stats are applied
