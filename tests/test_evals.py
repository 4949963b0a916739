"""Tests for evals/: Fréchet distance, I3D detector loading (port layout and TorchScript), FVD CLI, PSNR/SSIM."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import datasets
from datasets.transforms import to_uint8_videos
from evals import fvd
from evals.i3d import MIN_FRAMES, InceptionI3d, preprocess_for_i3d
from evals.recon import psnr, ssim
from sampling.media import write_mp4

FRAMES = MIN_FRAMES  # the shortest clip I3D accepts keeps the 224-px forward passes cheap on CPU


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def scipy_reference(mu_a, sigma_a, mu_b, sigma_b) -> float:
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b - 2.0 * np.real(root)))


def random_videos(seed: int, count: int, frames: int = FRAMES, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, frames, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_same_covariance_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    sigma = random_covariance(rng, 16)
    mu_a, mu_b = rng.normal(size=16), rng.normal(size=16)
    expected = float(np.sum((mu_a - mu_b) ** 2))
    assert fvd.frechet_distance_from_stats(mu_a, sigma, mu_b, sigma) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    var_a, var_b = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    mu_a, mu_b = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = fvd.frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(2)
    features_a = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24))
    features_b = rng.normal(loc=0.5, size=(250, 24)) @ rng.normal(size=(24, 24))
    stats_a, stats_b = fvd.compute_stats(features_a), fvd.compute_stats(features_b)
    expected = scipy_reference(*stats_a, *stats_b)
    assert fvd.frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-7)
    # Not symmetric in its formula but symmetric in value.
    assert fvd.frechet_distance(features_b, features_a) == pytest.approx(expected, rel=1e-7)


def test_frechet_of_identical_sets_is_zero_and_stats_are_float64_biased():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 120)).astype(np.float32)  # fewer samples than dims: singular covariance
    assert fvd.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    mu, sigma = fvd.compute_stats(features)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False, bias=True), atol=1e-12)


def test_frechet_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="sigma_b"):
        fvd.frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_protocol_name():
    assert fvd.fvd_protocol_name(2048, 16) == "fvd2048_16f"


# ---------------------------------------------------------------------------------------------- I3D detector


@pytest.fixture(scope="module")
def i3d_checkpoint(tmp_path_factory):
    """A randomly initialised InceptionI3d saved like the public port checkpoint (no BN step counters)."""
    torch.manual_seed(0)
    model = InceptionI3d()
    # Calibrate BN statistics on one random batch (cumulative average = that batch's statistics): with the
    # default mean 0 / var 1 the random network's logits barely depend on the input, which would let
    # feature-path bugs pass unnoticed; it also makes the buffers non-trivial for the loader to restore.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(preprocess_for_i3d(torch.from_numpy(random_videos(99, 2))))
    model.eval()
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt"
    torch.save(state, path)
    return path, model


def test_port_state_dict_names_match_public_layout():
    keys = InceptionI3d().state_dict()
    assert tuple(keys["Conv3d_1a_7x7.conv3d.weight"].shape) == (64, 3, 7, 7, 7)
    assert "Conv3d_1a_7x7.bn.running_mean" in keys
    assert tuple(keys["Mixed_3b.b0.conv3d.weight"].shape) == (64, 192, 1, 1, 1)
    assert tuple(keys["Mixed_4f.b2b.conv3d.weight"].shape) == (128, 32, 3, 3, 3)
    assert tuple(keys["Mixed_5c.b3b.conv3d.weight"].shape) == (128, 832, 1, 1, 1)
    assert tuple(keys["logits.conv3d.weight"].shape) == (400, 1024, 1, 1, 1)
    assert tuple(keys["logits.conv3d.bias"].shape) == (400,)
    assert not any(key.startswith("logits.bn") for key in keys)


def test_port_checkpoint_gives_400d_features_and_fvd_of_itself_is_zero(i3d_checkpoint):
    path, original = i3d_checkpoint
    detector = fvd.load_detector(str(path))
    assert isinstance(detector, fvd.PortI3D) and "i3d_pretrained_400" in detector.name
    videos = random_videos(0, 2)
    # An iterable of one-video batches: the path sample.py-style generators take.
    features = fvd.extract_features((videos[i : i + 1] for i in range(2)), detector, batch_size=1)
    assert features.shape == (2, 400) and features.dtype == np.float64 and np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 1e-2 * np.abs(features).max()
    with torch.no_grad():
        expected = original(preprocess_for_i3d(torch.from_numpy(videos))).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    assert fvd.frechet_distance(features, expected) == pytest.approx(0.0, abs=1e-6)


def test_port_detector_rejects_short_clips(i3d_checkpoint):
    detector = fvd.load_detector(str(i3d_checkpoint[0]))
    with pytest.raises(ValueError, match=f"at least {MIN_FRAMES} frames"):
        detector(torch.from_numpy(random_videos(0, 1, frames=MIN_FRAMES - 1)))


def test_preprocess_resizes_shorter_side_and_center_crops():
    video = np.zeros((1, 2, 20, 40, 3), dtype=np.uint8)
    video[:, :, :, :8] = 255  # bright side bands fall outside the central 224x224 crop of the 224x448 resize
    video[:, :, :, -8:] = 255
    clip = preprocess_for_i3d(torch.from_numpy(video))
    assert clip.shape == (1, 3, 2, 224, 224)
    assert torch.allclose(clip, torch.full_like(clip, -1.0))
    white = preprocess_for_i3d(torch.full((1, 2, 30, 30, 3), 255, dtype=torch.uint8))
    assert torch.allclose(white, torch.ones_like(white))


def test_wrong_key_gives_one_line_error_naming_it(i3d_checkpoint, tmp_path):
    state = torch.load(i3d_checkpoint[0], weights_only=True)
    extra = dict(state, **{"Mixed_9z.conv3d.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="Mixed_9z.conv3d.weight") as error:
        fvd.load_detector(str(tmp_path / "extra.pt"))
    assert "\n" not in str(error.value)

    missing = {key: value for key, value in state.items() if key != "Mixed_4b.b0.conv3d.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="Mixed_4b.b0.conv3d.weight"):
        fvd.load_detector(str(tmp_path / "missing.pt"))

    wrong_shape = dict(state, **{"Conv3d_2b_1x1.conv3d.weight": torch.zeros(64, 64, 3, 3, 3)})
    torch.save(wrong_shape, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"Conv3d_2b_1x1.conv3d.weight.*\(64, 64, 1, 1, 1\)"):
        fvd.load_detector(str(tmp_path / "shape.pt"))


def test_wrapped_and_data_parallel_state_dicts_load(i3d_checkpoint, tmp_path):
    state = torch.load(i3d_checkpoint[0], weights_only=True)
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}}, tmp_path / "wrapped.pt")
    detector = fvd.load_detector(str(tmp_path / "wrapped.pt"))
    assert torch.equal(detector.module.logits.conv3d.bias, state["logits.conv3d.bias"])


def test_missing_detector_errors_name_path_and_source(monkeypatch, tmp_path):
    monkeypatch.delenv(fvd.DETECTOR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=fvd.DETECTOR_ENV) as error:
        fvd.load_detector(None)
    assert "i3d_torchscript.pt" in str(error.value) and "i3d_pretrained_400.pt" in str(error.value)
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        fvd.load_detector(str(missing))


def test_detector_path_from_environment(monkeypatch, i3d_checkpoint):
    monkeypatch.setenv(fvd.DETECTOR_ENV, str(i3d_checkpoint[0]))
    assert isinstance(fvd.load_detector(), fvd.PortI3D)


class StandInTorchScriptI3D(torch.nn.Module):
    """Same call signature as StyleGAN-V's detector; its 'features' echo what it was called with."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        batch = x.shape[0]
        report = torch.zeros(batch, 400)
        report[:, 0] = float(rescale)
        report[:, 1] = float(resize)
        report[:, 2] = float(return_features)
        report[:, 3] = float(x.dtype == torch.uint8)
        report[:, 4] = float(x.shape[1])  # channels first: (N, C, T, H, W)
        report[:, 5] = float(x.shape[2])
        report[:, 6] = x.float().flatten(1).mean(dim=1)
        return report


@pytest.fixture(scope="module")
def torchscript_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("torchscript") / "i3d_torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; the detector uses it
        torch.jit.save(torch.jit.script(StandInTorchScriptI3D()), str(path))
    return path


def test_torchscript_detector_is_detected_and_called_with_stylegan_v_kwargs(torchscript_checkpoint):
    detector = fvd.load_detector(str(torchscript_checkpoint))
    assert isinstance(detector, fvd.TorchScriptI3D) and "i3d_torchscript" in detector.name
    videos = random_videos(4, 3, frames=10)
    features = fvd.extract_features(videos, detector, batch_size=2)
    assert features.shape == (3, 400)
    np.testing.assert_array_equal(features[:, :6], [[1, 1, 1, 1, 3, 10]] * 3)
    np.testing.assert_allclose(features[:, 6], videos.reshape(3, -1).mean(axis=1), rtol=1e-5)
    # FVD(x, x) = 0 through the whole feature path.
    assert fvd.compute_fvd(videos, videos, detector) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- CLI


def run_cli(capsys, argv):
    code = fvd.main([str(item) for item in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def npz_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    real, fake = folder / "real.npz", folder / "fake.npz"
    np.savez(real, videos=random_videos(10, 2), labels=np.arange(2))
    np.savez(fake, videos=random_videos(11, 2))
    return real, fake


def test_cli_end_to_end_prints_value_last_and_caches_real_stats(capsys, tmp_path, npz_pair, i3d_checkpoint):
    real, fake = npz_pair
    argv = ["--real", real, "--fake", fake, "--detector", i3d_checkpoint[0], "--cache-dir", tmp_path / "cache",
            "--batch-size", 2, "--device", "cpu"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-2].startswith(f"fvd2_{FRAMES}f[i3d-port:i3d_pretrained_400]: ")
    value = float(lines[-1])
    assert value > 0.0
    cache_files = list((tmp_path / "cache").glob("*.npz"))
    assert len(cache_files) == 1 and cache_files[0].name.startswith(f"fvd2_{FRAMES}f-real-")
    assert "cached to" in err

    code, out, err = run_cli(capsys, argv)
    assert code == 0 and "loaded from cache" in err
    assert float(out.strip().splitlines()[-1]) == pytest.approx(value, rel=1e-6)

    # A different protocol (fewer videos) must not reuse those statistics.
    code, out, err = run_cli(capsys, argv + ["--num-videos", 1])
    assert code == 0 and "loaded from cache" not in err
    assert out.strip().splitlines()[-2].startswith(f"fvd1_{FRAMES}f[i3d-port:i3d_pretrained_400]: ")


def test_cli_errors_exit_2_with_one_line(capsys, tmp_path, npz_pair, torchscript_checkpoint):
    real, fake = npz_pair
    base = ["--detector", torchscript_checkpoint, "--no-cache", "--device", "cpu"]
    code, _, err = run_cli(capsys, ["--real", real, "--fake", fake, "--num-videos", 5] + base)
    assert code == 2 and "fewer than --num-videos 5" in err and len(err.strip().splitlines()) == 1

    longer = tmp_path / "longer.npz"
    np.savez(longer, videos=random_videos(12, 2, frames=FRAMES + 2))
    code, _, err = run_cli(capsys, ["--real", real, "--fake", longer] + base)
    assert code == 2 and "clip shapes differ" in err and len(err.strip().splitlines()) == 1
    assert f"'{real}' is {FRAMES}x16x16" in err and f"'{longer}' is {FRAMES + 2}x16x16" in err and "--n-frames" in err

    code, _, err = run_cli(capsys, ["--real", tmp_path / "absent.npz", "--fake", fake] + base)
    assert code == 2 and "absent.npz" in err

    np.savez(tmp_path / "nokey.npz", clips=random_videos(0, 1))
    code, _, err = run_cli(capsys, ["--real", tmp_path / "nokey.npz", "--fake", fake] + base)
    assert code == 2 and "'videos'" in err


def test_cache_dir_that_cannot_be_written_is_refused_before_any_feature(capsys, tmp_path, npz_pair, i3d_checkpoint,
                                                                       monkeypatch):
    real, fake = npz_pair
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    calls = []
    monkeypatch.setattr(fvd, "extract_features", lambda *args, **kwargs: calls.append(1))
    code, out, err = run_cli(capsys, ["--real", real, "--fake", fake, "--detector", i3d_checkpoint[0],
                                      "--device", "cpu", "--cache-dir", blocker / "cache"])
    assert code == 2 and calls == [] and out == ""
    assert err.strip() == f"error: --cache-dir {blocker / 'cache'}: {blocker} is a file, not a folder"


@pytest.mark.parametrize("flag, value, message", [
    ("--n-frames", "-3", "must be at least 1, got -3"), ("--n-frames", "0", "must be at least 1, got 0"),
    ("--batch-size", "0", "must be at least 1, got 0"), ("--batch-size", "-1", "must be at least 1, got -1"),
    ("--num-videos", "0", "must be at least 1, got 0"), ("--num-workers", "-1", "must be at least 0, got -1"),
    ("--resolution", "0", "must be at least 1, got 0"), ("--seed", "-5", "must be a seed"),
])
def test_cli_bad_numbers_are_refused_by_the_parser_naming_the_flag(capsys, npz_pair, flag, value, message):
    """Before any detector loads: --n-frames -3 once scored the clips' first 13 frames (a slice to -3), a zero
    --batch-size ended in range()'s message."""
    real, fake = npz_pair
    values = [value, "16"] if flag == "--resolution" else [value]
    with pytest.raises(SystemExit) as stop:
        fvd.parse_args(["--real", str(real), "--fake", str(fake), flag, *values])
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: {message}" in line, line


def test_cli_missing_detector_exits_2_as_a_script(tmp_path, npz_pair):
    real, fake = npz_pair
    environment = {key: value for key, value in os.environ.items() if key != fvd.DETECTOR_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "evals.fvd", "--real", str(real), "--fake", str(fake), "--detector",
         str(tmp_path / "no_i3d.pt")],
        capture_output=True, text=True, env=environment, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120,
    )
    assert result.returncode == 2
    assert "no_i3d.pt" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_reads_a_folder_of_video_files(capsys, tmp_path, npz_pair, torchscript_checkpoint):
    real, _ = npz_pair
    folder = tmp_path / "samples"
    folder.mkdir()
    for index, video in enumerate(random_videos(20, 3, frames=FRAMES + 3)):
        write_mp4(video, folder / f"{index:03d}.mp4")
    argv = ["--real", real, "--fake", folder, "--detector", torchscript_checkpoint, "--no-cache", "--device", "cpu"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    # The folder side follows the npz side's frame count (its files are longer).
    assert out.strip().splitlines()[-2].startswith(f"fvd2_{FRAMES}f[i3d_torchscript]: ")
    assert float(out.strip().splitlines()[-1]) > 0.0


def test_cli_dataset_tree_uses_build_dataset(capsys, tmp_path, npz_pair, torchscript_checkpoint, monkeypatch):
    fake, _ = npz_pair
    tree = tmp_path / "ucf"
    (tree / "ClassA").mkdir(parents=True)
    calls = []

    class FakeDataset:
        def __init__(self, data_cfg):
            self.data_cfg = data_cfg

        def __len__(self):
            return 5

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            height, width = self.data_cfg.resolution
            x = torch.rand(3, self.data_cfg.n_frames, height, width, generator=generator) * 2 - 1
            return {"x": x, "y": 0, "index": index}

    def fake_build_dataset(data_cfg, split, seed):
        calls.append((data_cfg, split, seed))
        return FakeDataset(data_cfg)

    monkeypatch.setattr(datasets, "build_dataset", fake_build_dataset, raising=False)
    argv = ["--real", tree, "--fake", fake, "--detector", torchscript_checkpoint, "--cache-dir", tmp_path / "cache",
            "--seed", 7, "--device", "cpu"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    data_cfg, split, seed = calls[0]
    assert data_cfg.dataset_name == "UCF101" and data_cfg.data_path == str(tree)
    assert data_cfg.n_frames == FRAMES and list(data_cfg.resolution) == [16, 16]
    assert (split, seed) == ("train", 7)
    assert out.strip().splitlines()[-2].startswith(f"fvd2_{FRAMES}f[i3d_torchscript]: ")


def test_cli_real_statistics_from_the_synthetic_dataset(capsys, tmp_path, npz_pair, torchscript_checkpoint):
    _, fake = npz_pair
    argv = ["--real", "synthetic", "--fake", fake, "--detector", torchscript_checkpoint, "--cache-dir",
            tmp_path / "cache", "--resolution", 16, 16, "--device", "cpu"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    assert out.strip().splitlines()[-2].startswith(f"fvd2_{FRAMES}f[i3d_torchscript]: ")
    assert len(list((tmp_path / "cache").glob(f"fvd2_{FRAMES}f-synthetic-*.npz"))) == 1


# ---------------------------------------------------------------------------------------------- trust boundaries


class NaNForBlackI3D(torch.nn.Module):
    """A TorchScript stand-in whose features are NaN for an all-black clip (a broken detector or input)."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        mean = x.float().flatten(1).mean(dim=1, keepdim=True)
        features = mean.repeat(1, 4) * torch.arange(1, 5).float()
        return torch.where(mean > 0, features, torch.full_like(features, float("nan")))


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("nan_detector") / "nan_for_black.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(NaNForBlackI3D()), str(path))
    return path


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("error: "), err
    assert not any(line.startswith("Traceback") for line in lines), err
    return lines[-1]


def test_cli_refuses_different_frame_sizes_unless_allow_resize(capsys, tmp_path, torchscript_checkpoint):
    small, large = tmp_path / "real32.npz", tmp_path / "fake64.npz"
    np.savez(small, videos=random_videos(30, 2, size=16))
    np.savez(large, videos=random_videos(31, 2, size=24))
    base = ["--real", small, "--fake", large, "--detector", torchscript_checkpoint, "--no-cache", "--device", "cpu"]
    code, out, err = run_cli(capsys, base)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    line = one_line_error(err)
    assert f"'{small}' is {FRAMES}x16x16" in line and f"'{large}' is {FRAMES}x24x24" in line
    assert "--allow-resize" in line

    code, out, err = run_cli(capsys, base + ["--allow-resize"])
    assert code == 0, err
    result_line = out.strip().splitlines()[-2]
    assert result_line.startswith(f"fvd2_{FRAMES}f[i3d_torchscript]: ")
    assert "16x16" in result_line and "24x24" in result_line and "resized" in result_line and "224x224" in result_line
    assert "note:" in err and "resized" in err
    assert float(out.strip().splitlines()[-1]) > 0.0

    # A dataset side read at an explicit --resolution that is not the other side's size is the same mismatch.
    code, _, err = run_cli(capsys, ["--real", "synthetic", "--fake", small, "--resolution", 24, 24, "--detector",
                                    torchscript_checkpoint, "--no-cache", "--device", "cpu"])
    assert code == 2 and "'synthetic' is" in one_line_error(err) and "x24x24" in err and "x16x16" in err


def test_compute_fvd_refuses_different_clip_shapes_unless_allowed(torchscript_checkpoint):
    detector = fvd.load_detector(str(torchscript_checkpoint))
    small, large = random_videos(32, 2, size=16), random_videos(33, 2, size=24)
    with pytest.raises(ValueError, match=f"real videos are {FRAMES}x16x16, fake videos are {FRAMES}x24x24"):
        fvd.compute_fvd(small, large, detector)
    # As one-video batches from a generator: refused while streaming, before the fake set is scored.
    with pytest.raises(ValueError, match="clip shapes differ"):
        fvd.compute_fvd(small, (large[i : i + 1] for i in range(2)), detector, batch_size=1)
    longer = random_videos(34, 2, frames=FRAMES + 1, size=16)
    with pytest.raises(ValueError, match="frames"):
        fvd.compute_fvd(small, longer, detector, allow_resize=True)  # resizing never covers the frame count
    assert fvd.compute_fvd(small, large, detector, allow_resize=True) > 0.0


def test_cli_non_finite_features_name_the_input(capsys, tmp_path, nan_checkpoint):
    real, black = tmp_path / "real.npz", tmp_path / "black.npz"
    np.savez(real, videos=random_videos(40, 3))
    np.savez(black, videos=np.zeros((3, FRAMES, 16, 16, 3), dtype=np.uint8))
    base = ["--detector", nan_checkpoint, "--no-cache", "--device", "cpu"]
    code, _, err = run_cli(capsys, ["--real", real, "--fake", black] + base)
    line = one_line_error(err)
    assert code == 2 and line.startswith(f"error: fake '{black}': ")
    assert "non-finite features" in line and "3 of 3 videos" in line and "nan_for_black" in line
    code, _, err = run_cli(capsys, ["--real", black, "--fake", real] + base)
    assert code == 2 and one_line_error(err).startswith(f"error: real '{black}': ")


def test_non_finite_features_and_statistics_are_named(nan_checkpoint):
    detector = fvd.load_detector(str(nan_checkpoint))
    videos = random_videos(41, 2)
    black = np.zeros_like(videos)
    with pytest.raises(ValueError, match="fake videos: detector .* non-finite features .* 2 of 2 videos"):
        fvd.compute_fvd(videos, black, detector)
    features = np.ones((3, 4))
    features[1, 2] = np.nan
    with pytest.raises(ValueError, match="features_b are not finite"):
        fvd.frechet_distance(np.random.default_rng(0).normal(size=(3, 4)), features)
    with pytest.raises(ValueError, match="mu_a is not finite"):
        fvd.frechet_distance_from_stats(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_cli_refuses_a_cached_non_finite_real_statistic(capsys, tmp_path, npz_pair, torchscript_checkpoint):
    real, fake = npz_pair
    argv = ["--real", real, "--fake", fake, "--detector", torchscript_checkpoint, "--cache-dir", tmp_path / "cache",
            "--device", "cpu"]
    assert run_cli(capsys, argv)[0] == 0
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    with np.load(cache_file) as cached:
        mu, sigma = cached["mu"], cached["sigma"]
    mu[0] = np.nan  # what a run before the feature check could have cached
    np.savez(cache_file, mu=mu, sigma=sigma, num_videos=2)
    code, out, err = run_cli(capsys, argv)
    assert code == 2 and str(cache_file) in one_line_error(err) and "--no-cache" in err and out == ""


def test_cli_empty_or_unreadable_npz_names_the_file(capsys, tmp_path, npz_pair, torchscript_checkpoint):
    _, fake = npz_pair
    base = ["--fake", fake, "--detector", torchscript_checkpoint, "--no-cache", "--device", "cpu"]
    no_videos = tmp_path / "no_videos.npz"
    np.savez(no_videos, videos=np.zeros((0, FRAMES, 16, 16, 3), dtype=np.uint8))
    code, _, err = run_cli(capsys, ["--real", no_videos] + base)
    line = one_line_error(err)
    assert code == 2 and str(no_videos) in line and "no videos" in line

    zero_bytes = tmp_path / "zero_bytes.npz"
    zero_bytes.write_bytes(b"")
    code, _, err = run_cli(capsys, ["--real", zero_bytes] + base)
    line = one_line_error(err)
    assert code == 2 and str(zero_bytes) in line and "not a readable .npz" in line

    empty_archive = tmp_path / "empty_archive.npz"
    np.savez(empty_archive)
    code, _, err = run_cli(capsys, ["--real", empty_archive] + base)
    line = one_line_error(err)
    assert code == 2 and str(empty_archive) in line and "'videos'" in line and "empty" in line

    bare_array = tmp_path / "bare_array.npz"
    with open(bare_array, "wb") as handle:
        np.save(handle, random_videos(0, 1))
    code, _, err = run_cli(capsys, ["--real", bare_array] + base)
    line = one_line_error(err)
    assert code == 2 and str(bare_array) in line and "'videos'" in line


def test_cli_dataset_name_folder_reads_a_flat_folder_of_mp4s(capsys, tmp_path, npz_pair, torchscript_checkpoint):
    real, _ = npz_pair
    folder = tmp_path / "samples"
    folder.mkdir()
    for index, video in enumerate(random_videos(21, 3, frames=FRAMES + 1)):
        write_mp4(video, folder / f"{index:03d}.MP4")  # upper-case extension: cameras write them
    (folder / "._000.MP4").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork, not a video
    (folder / ".cmd_index_cache").mkdir()  # hidden folders are not classes
    base = ["--real", real, "--fake", folder, "--detector", torchscript_checkpoint, "--no-cache", "--device", "cpu"]
    code, out, err = run_cli(capsys, base + ["--dataset-name", "folder"])
    assert code == 0, err
    assert f"fake: folder '{folder}'" in err
    assert out.strip().splitlines()[-2].startswith(f"fvd2_{FRAMES}f[i3d_torchscript]: ")

    # UCF101 needs class subfolders: say so, and how to read the files instead.
    code, _, err = run_cli(capsys, base + ["--dataset-name", "UCF101"])
    line = one_line_error(err)
    assert code == 2 and str(folder) in line and "3 video files" in line and "no class folders" in line


# ---------------------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_identical_is_infinite_and_known_offset():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 16, 16) - 0.5  # [-0.5, 0.5]: the offset below stays inside [-1, 1]
    assert torch.isinf(psnr(x, x)).all()
    # An offset of 0.1 in [-1, 1] is 0.05 in [0, 1]: MSE 0.0025 -> 10 log10(400) dB.
    np.testing.assert_allclose(psnr(x, x + 0.1).numpy(), [10 * np.log10(400.0)] * 2, rtol=1e-5)


def test_ssim_identity_constant_closed_form_and_monotone_in_noise():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 24, 24) * 2 - 1
    np.testing.assert_allclose(ssim(x, x).numpy(), [1.0, 1.0], atol=1e-6)
    # Constant frames: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1) on [0, 1] values.
    a, b = 0.25, 0.75
    constant_a = torch.full((1, 1, 2, 16, 16), 2 * a - 1)
    constant_b = torch.full((1, 1, 2, 16, 16), 2 * b - 1)
    c1 = 0.01**2
    assert ssim(constant_a, constant_b).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    scores = [ssim(x, (x + level * torch.randn_like(x)).clamp(-1, 1)).mean().item() for level in (0.05, 0.2, 0.6)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        psnr(torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 3, 2, 8, 4))


def test_to_uint8_videos_layout_and_values():
    x = torch.zeros(2, 3, 4, 5, 6)
    x[0, 0, 0, 0, 0], x[0, 1, 0, 0, 0], x[1, 2, 3, 4, 5] = -1.0, 1.0, 2.0
    videos = to_uint8_videos(x)
    assert videos.shape == (2, 4, 5, 6, 3) and videos.dtype == np.uint8
    assert videos[0, 0, 0, 0].tolist() == [0, 255, 128]
    assert videos[1, 3, 4, 5, 2] == 255  # clamped
    smooth = torch.rand(1, 1, 2, 3, 3) * 2 - 1
    gray = to_uint8_videos(smooth)
    assert gray.shape == (1, 2, 3, 3, 3) and (gray[..., 0] == gray[..., 2]).all()
    assert np.abs(gray[..., 0] / 127.5 - 1 - smooth[:, 0].numpy()).max() <= 0.5 / 127.5 + 1e-6


# ---------------------------------------------------------------------------------------------- FVD as papers report it


def test_cli_repeats_give_mean_and_std_over_disjoint_fake_sets_with_real_statistics_once(
        capsys, tmp_path, npz_pair, torchscript_checkpoint, monkeypatch):
    real, _ = npz_pair  # 2 real videos
    fake = tmp_path / "fake6.npz"
    videos = random_videos(40, 6)
    np.savez(fake, videos=videos)
    names = []
    extract = fvd.extract_features

    def counting(*args, name="videos", **kwargs):
        names.append(name)
        return extract(*args, name=name, **kwargs)

    monkeypatch.setattr(fvd, "extract_features", counting)
    base = ["--real", real, "--detector", torchscript_checkpoint, "--no-cache", "--device", "cpu"]
    code, out, err = run_cli(capsys, base + ["--fake", fake, "--repeats", 3])
    assert code == 0, err
    # The paper's "107 ± 9": one line carrying protocol, detector, mean ± std and K; the last line 'MEAN STD'.
    result, last = out.strip().splitlines()[-2:]
    assert result.startswith(f"fvd2_{FRAMES}f[i3d_torchscript]: ") and result.endswith(" (K=3)") and " ± " in result
    mean, std = map(float, last.split())
    assert sum(name.startswith("real") for name in names) == 1  # real statistics once, not once per set

    # Each set is fake videos 2i..2i+1, scored against the same real statistics.
    detector = fvd.load_detector(str(torchscript_checkpoint))
    real_stats = fvd.compute_stats(extract(np.load(real)["videos"], detector))
    each = [fvd.frechet_distance_from_stats(*real_stats, *fvd.compute_stats(extract(videos[i:i + 2], detector)))
            for i in (0, 2, 4)]
    assert len(set(np.round(each, 6))) == 3  # three different sets, so the std is a real spread
    assert mean == pytest.approx(np.mean(each), rel=1e-5) and std == pytest.approx(np.std(each), rel=1e-4)
    assert result == f"fvd2_{FRAMES}f[i3d_torchscript]: {np.mean(each):.4f} ± {np.std(each):.4f} (K=3)"

    code, _, err = run_cli(capsys, base + ["--fake", fake, "--repeats", 4, "--num-videos", 2])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"fake '{fake}' has 6 videos, fewer than --repeats 4 x --num-videos 2 = 8" in err


def test_recon_fvd_uses_its_own_clip_count_spread_over_the_split_and_sharded(torchscript_checkpoint):
    from datasets.synthetic import SyntheticMovingShapes
    from evals.reconstruction_fvd import ReconstructionFVD

    dataset = SyntheticMovingShapes(size=12, num_classes=4, resolution=(16, 16), n_frames=FRAMES, split="test")
    detector = fvd.load_detector(str(torchscript_checkpoint))
    seen = []

    def identity(x):  # a perfect autoencoder: FVD 0
        seen.append(len(x))
        return x, None, None

    shards = [ReconstructionFVD(dataset, 6, detector, rank, 2, batch_size=2) for rank in (0, 1)]
    picked = [index for shard in shards for index in shard.mine]
    # 6 distinct clips, disjoint over ranks, spread over the split rather than its first six.
    assert sorted(picked) == [0, 2, 4, 6, 8, 10] and not set(shards[0].mine) & set(shards[1].mine)
    recon = ReconstructionFVD(dataset, 6, detector, batch_size=4)
    assert recon.name(FRAMES) == f"fvd6_{FRAMES}f[i3d_torchscript]"
    assert recon(identity, "cpu") == pytest.approx(0.0, abs=1e-6) and sum(seen) == 6
    assert len(recon.real) == 6  # the real clips' features, kept for the next evaluation
    darker = recon(lambda x: (x * 0.5 - 0.5, None, None), "cpu")
    assert darker > 1.0
    assert ReconstructionFVD(dataset, 2048, detector).count == 12  # at most the whole split
