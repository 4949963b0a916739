"""Generation quality on the synthetic dataset: class accuracy and Fréchet distance of a small real-clip classifier."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

if __name__ == "__main__" and not __package__:  # run as a file: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from datasets.synthetic import MAX_CLASSES, SyntheticMovingShapes, class_name, label_from_caption
from datasets.transforms import to_uint8_videos
from evals.fvd import frechet_distance
from evals.recon import patch_grid_ratio
from core.checkpoint import atomic_torch_save
from core.files import write_output
from models.weights_file import load_weights_file
from core.cli import HelpFormatter, positive_int

log = logging.getLogger(__name__)

# Bump when the architecture, preprocessing, training recipe or reference protocol changes: it is part of the
# cache key, so old cache files are simply never looked up again.
CLASSIFIER_VERSION = 1
CACHE_ENV = "CMD_CACHE_DIR"
# Frames larger than this (longer side) are area-downsampled first: the shapes stay >= 4 px wide and the
# classifier costs the same at any dataset resolution.
WORKING_SIZE = 32
# Training recipe; part of the cache key. max(min_clips, clips_per_class * classes) distinct clips x 3 epochs
# reach ~99% held-out accuracy at 32x32, 8 frames, 4 classes (2048 clips) in 25-40 s on one CPU thread; more
# classes need more clips per class seen, not just more steps (2048 clips for 12 classes stop near 88%).
TRAINING = {"min_clips": 2048, "clips_per_class": 512, "epochs": 3, "batch_size": 32, "lr": 3e-3,
            "weight_decay": 1e-4, "width": 16}
# Real clips behind the reference statistics: the held-out 'test' clips every Fréchet distance is measured
# against, and as many 'train' clips the classifier never saw (for the real-vs-real floor and no-motion score).
REFERENCE_CLIPS = 256
INFERENCE_BATCH = 64
RENDER_CHUNK = 256
GRID_PATCH = 4  # the patch size of the tiny configs' autoencoder and content DiT


# --------------------------------------------------------------------------------------------------------------
# Real clips and the shared preprocessing.


def render_real_clips(
    resolution: Sequence[int], n_frames: int, num_classes: int, split: str, start: int, count: int, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """Clips start..start+count-1 of `split`: uint8 (N, T, H, W, 3) videos as in sample.py's npz, int64 labels."""
    dataset = SyntheticMovingShapes(
        size=start + count, num_classes=num_classes, resolution=tuple(resolution), n_frames=n_frames,
        split=split, seed=seed,
    )
    videos, labels = [], []
    for chunk_start in range(start, start + count, RENDER_CHUNK):
        items = [dataset[index] for index in range(chunk_start, min(chunk_start + RENDER_CHUNK, start + count))]
        # Through uint8, exactly as generated clips reach the npz: both sides see the same quantisation.
        videos.append(to_uint8_videos(torch.stack([item["x"] for item in items])))
        labels.extend(item["y"] for item in items)
    return np.concatenate(videos), np.asarray(labels, dtype=np.int64)


def remove_motion(videos_uint8: np.ndarray) -> np.ndarray:
    """Every frame replaced by the clip's temporal mean frame: the content stays, the motion is gone."""
    videos = np.asarray(videos_uint8)
    mean = videos.astype(np.float64).mean(axis=1, keepdims=True)
    return np.broadcast_to(np.rint(mean).astype(np.uint8), videos.shape).copy()


def preprocess(videos_uint8: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> float32 (N, 3, T, h, w) in [-1, 1], area-downsampled to at most WORKING_SIZE."""
    videos = torch.as_tensor(np.asarray(videos_uint8))
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be uint8 (N, T, H, W, 3), got {videos.dtype} {tuple(videos.shape)}")
    count, frames, height, width, _ = videos.shape
    x = videos.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    target = _working_size((height, width))
    if target != (height, width):
        flat = x.permute(0, 2, 1, 3, 4).reshape(count * frames, 3, height, width)
        flat = F.interpolate(flat, size=target, mode="area")
        x = flat.reshape(count, frames, 3, *target).permute(0, 2, 1, 3, 4)
    return x.contiguous()


def _working_size(resolution: Sequence[int]) -> Tuple[int, int]:
    height, width = int(resolution[0]), int(resolution[1])
    scale = WORKING_SIZE / max(height, width)
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


# --------------------------------------------------------------------------------------------------------------
# The classifier.


class QualityClassifier(nn.Module):
    """Three Conv3d blocks, global average + max pooling, a linear head; input from `preprocess`.

    Max pooling matters: the class is carried by one object (the largest), and its strongest local response
    tells square from disc much sooner in training than the average over a mostly-background frame.
    """

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()

        def block(channels_in: int, channels_out: int, stride: Tuple[int, int, int]) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv3d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm3d(channels_out),
                nn.ReLU(inplace=True),
            )

        # Temporal kernels of 3 in every block: the direction of motion is visible only across frames.
        self.body = nn.Sequential(
            block(3, width, (1, 2, 2)), block(width, 2 * width, (1, 2, 2)), block(2 * width, 4 * width, (2, 2, 2))
        )
        self.feature_dim = 8 * width
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.num_classes = num_classes
        # Filled by load_or_train_classifier.
        self.settings: dict = {}
        self.held_out_accuracy = float("nan")
        self.train_seconds = float("nan")
        self.loaded_from_cache = False
        self.cache_path: Optional[Path] = None
        self.reference: Optional["RealReference"] = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (N, 8 * width): channel means and maxima over time and space."""
        hidden = self.body(x)
        return torch.cat([hidden.mean(dim=(2, 3, 4)), hidden.amax(dim=(2, 3, 4))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classify_videos(
    classifier: QualityClassifier, videos_uint8: np.ndarray, batch_size: int = INFERENCE_BATCH
) -> Tuple[np.ndarray, np.ndarray]:
    """Features (N, D) float64 and predicted labels (N,) int64 of uint8 (N, T, H, W, 3) videos."""
    videos = np.asarray(videos_uint8)
    _check_videos(videos, classifier.settings, "videos")
    classifier.eval()
    features, predictions = [], []
    with torch.no_grad():
        for start in range(0, videos.shape[0], batch_size):
            batch_features = classifier.features(preprocess(videos[start : start + batch_size]))
            features.append(batch_features.double().numpy())
            predictions.append(classifier.head(batch_features).argmax(dim=1).numpy())
    if not features:
        return np.zeros((0, classifier.feature_dim)), np.zeros((0,), dtype=np.int64)
    return np.concatenate(features), np.concatenate(predictions).astype(np.int64)


def _check_videos(videos: np.ndarray, settings: dict, name: str) -> None:
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 (N, T, H, W, 3), got {videos.dtype} {videos.shape}")
    if settings:
        expected = (settings["n_frames"], *settings["resolution"])
        if tuple(videos.shape[1:4]) != tuple(expected):
            raise ValueError(
                f"{name} have T, H, W = {tuple(videos.shape[1:4])}, but the classifier was trained on {tuple(expected)}"
            )


def _settings(resolution: Sequence[int], n_frames: int, num_classes: int, seed: int) -> dict:
    if len(resolution) != 2 or min(resolution) < 1 or n_frames < 1:
        raise ValueError(f"resolution must be (H, W) >= 1 and n_frames >= 1, got {tuple(resolution)} and {n_frames}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES} for the synthetic dataset, got {num_classes}")
    return {"resolution": [int(resolution[0]), int(resolution[1])], "n_frames": int(n_frames),
            "num_classes": int(num_classes), "seed": int(seed)}


def training_clip_count(num_classes: int) -> int:
    """How many 'train' clips (indices 0..count-1) the classifier learns from; the reference uses the next ones."""
    return max(TRAINING["min_clips"], TRAINING["clips_per_class"] * num_classes)


def train_classifier(settings: dict) -> QualityClassifier:
    """Trains a classifier on real synthetic 'train' clips 0..training_clip_count-1; deterministic per settings."""
    recipe = TRAINING
    threads = torch.get_num_threads()
    # One thread: CPU kernels reduce in a thread-count-dependent order, so this keeps the weights identical
    # whatever OMP_NUM_THREADS the caller runs with. fork_rng leaves the caller's global RNG untouched.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings["seed"])
            return _train(settings, recipe)
    finally:
        torch.set_num_threads(threads)


def _train(settings: dict, recipe: dict) -> QualityClassifier:
    started = time.perf_counter()
    clips = []
    count = training_clip_count(settings["num_classes"])
    for start in range(0, count, RENDER_CHUNK):
        videos, labels = render_real_clips(
            settings["resolution"], settings["n_frames"], settings["num_classes"], "train", start,
            min(RENDER_CHUNK, count - start), settings["seed"],
        )
        # float16 halves the memory of the preprocessed set (400 MB -> 200 MB at 16 frames); batches go back
        # to float32 before the forward pass.
        clips.append((preprocess(videos).half(), torch.from_numpy(labels)))
    inputs = torch.cat([pair[0] for pair in clips])
    targets = torch.cat([pair[1] for pair in clips])

    classifier = QualityClassifier(settings["num_classes"], recipe["width"])
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    batch_size = min(recipe["batch_size"], len(inputs))
    steps_per_epoch = len(inputs) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe["lr"], total_steps=recipe["epochs"] * steps_per_epoch
    )
    order_generator = torch.Generator().manual_seed(settings["seed"])
    classifier.train()
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(inputs), generator=order_generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(classifier(inputs[batch].float()), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    classifier.eval()
    classifier.settings = dict(settings)
    classifier.train_seconds = time.perf_counter() - started
    return classifier


# --------------------------------------------------------------------------------------------------------------
# Real-clip reference statistics.


@dataclass
class RealReference:
    """Classifier features of real clips, computed once per settings and cached with the classifier.

    test_*: the REFERENCE_CLIPS held-out 'test' clips every Fréchet distance is measured against.
    train_features / no_motion_features: as many 'train' clips the classifier never saw, as they are and with
    every frame replaced by the temporal mean; they give the real-vs-real floor and the no-motion score.
    """

    test_features: np.ndarray
    test_labels: np.ndarray
    train_features: np.ndarray
    train_labels: np.ndarray
    no_motion_features: np.ndarray
    real_accuracy: float  # classifier accuracy on the held-out test clips

    @property
    def num_clips(self) -> int:
        return int(self.test_features.shape[0])

    @property
    def frechet_floor(self) -> float:
        return self.baselines()["frechet_floor"]

    @property
    def frechet_no_motion(self) -> float:
        return self.baselines()["frechet_no_motion"]

    def test_mask(self, classes: Optional[Sequence[int]] = None) -> np.ndarray:
        if classes is None:
            return np.ones(self.test_labels.shape, dtype=bool)
        return np.isin(self.test_labels, np.asarray(list(classes)))

    def baselines(self, count: Optional[int] = None, classes: Optional[Sequence[int]] = None) -> dict:
        """Floor and no-motion Fréchet distances with `count` real clips (capped at num_clips) of `classes`.

        The Fréchet distance of a finite sample is biased upwards, more so for fewer clips: comparing a set of
        N generated clips with baselines from N real clips keeps the three numbers on one scale.
        """
        train_mask = np.ones(self.train_labels.shape, dtype=bool) if classes is None else np.isin(
            self.train_labels, np.asarray(list(classes))
        )
        chosen = np.flatnonzero(train_mask)
        if count is not None:
            chosen = chosen[: max(int(count), 1)]
        test = self.test_features[self.test_mask(classes)]
        return {
            "frechet_floor": frechet_distance(self.train_features[chosen], test),
            "frechet_no_motion": frechet_distance(self.no_motion_features[chosen], test),
            "baseline_clips": int(chosen.size),
            "reference_clips": int(test.shape[0]),
        }

    def to_state(self) -> dict:
        """Tensors and plain numbers only, so the cache loads with torch.load(weights_only=True)."""
        return {
            "test_features": torch.from_numpy(self.test_features),
            "test_labels": torch.from_numpy(self.test_labels),
            "train_features": torch.from_numpy(self.train_features),
            "train_labels": torch.from_numpy(self.train_labels),
            "no_motion_features": torch.from_numpy(self.no_motion_features),
            "real_accuracy": float(self.real_accuracy),
        }

    @classmethod
    def from_state(cls, state: dict, feature_dim: int) -> "RealReference":
        arrays = {}
        for key, dtype in (("test_features", np.float64), ("test_labels", np.int64), ("train_features", np.float64),
                           ("train_labels", np.int64), ("no_motion_features", np.float64)):
            value = state[key]
            if not torch.is_tensor(value):
                raise ValueError(f"reference entry '{key}' is not a tensor")
            arrays[key] = value.numpy().astype(dtype)
        for key in ("test_features", "train_features", "no_motion_features"):
            if arrays[key].ndim != 2 or arrays[key].shape[1] != feature_dim or arrays[key].shape[0] == 0:
                raise ValueError(f"reference entry '{key}' has shape {arrays[key].shape}")
        return cls(real_accuracy=float(state["real_accuracy"]), **arrays)


def compute_reference(classifier: QualityClassifier, num_clips: int = REFERENCE_CLIPS) -> RealReference:
    """Features of held-out real 'test' clips and of unseen real 'train' clips (as they are and without motion)."""
    settings = classifier.settings
    shape = (settings["resolution"], settings["n_frames"], settings["num_classes"])
    test_videos, test_labels = render_real_clips(*shape, "test", 0, num_clips, settings["seed"])
    # Train-split clips after the ones the classifier learnt from: real data it has not memorised.
    train_videos, train_labels = render_real_clips(
        *shape, "train", training_clip_count(settings["num_classes"]), num_clips, settings["seed"]
    )
    test_features, test_predictions = classify_videos(classifier, test_videos)
    train_features, _ = classify_videos(classifier, train_videos)
    no_motion_features, _ = classify_videos(classifier, remove_motion(train_videos))
    return RealReference(
        test_features=test_features,
        test_labels=test_labels,
        train_features=train_features,
        train_labels=train_labels,
        no_motion_features=no_motion_features,
        real_accuracy=float(np.mean(test_predictions == test_labels)),
    )


def real_reference(classifier: QualityClassifier) -> RealReference:
    """The classifier's real-clip reference: cached with it by load_or_train_classifier, else computed now."""
    if classifier.reference is None:
        classifier.reference = compute_reference(classifier)
    return classifier.reference


# --------------------------------------------------------------------------------------------------------------
# Cache.


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cmd" / "quality_classifier")


def cache_file(settings: dict, cache_dir: Union[str, Path, None] = None) -> Path:
    """Where the classifier for `settings` lives: the name hashes the settings, version and training recipe."""
    key = {"version": CLASSIFIER_VERSION, "settings": settings, "training": TRAINING,
           "working_size": WORKING_SIZE, "reference_clips": REFERENCE_CLIPS}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"quality-classifier-{digest}.pt"


def _load_cached(path: Path, settings: dict) -> QualityClassifier:
    """The cached classifier; any exception means the file is unusable (damaged, foreign or stale)."""
    state = load_weights_file(path, "quality classifier cache")
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a dict")
    if state.get("version") != CLASSIFIER_VERSION or state.get("settings") != settings:
        raise ValueError(f"written for version {state.get('version')} / settings {state.get('settings')}")
    classifier = QualityClassifier(settings["num_classes"], int(state["width"]))
    classifier.load_state_dict(state["state_dict"])  # strict: a missing or mis-shaped tensor raises
    classifier.eval()
    classifier.settings = dict(settings)
    classifier.train_seconds = float(state["train_seconds"])
    classifier.reference = RealReference.from_state(state["reference"], classifier.feature_dim)
    classifier.held_out_accuracy = classifier.reference.real_accuracy
    return classifier


def load_or_train_classifier(
    resolution: Sequence[int], n_frames: int, num_classes: int, seed: int = 0,
    cache_dir: Union[str, Path, None] = None,
) -> QualityClassifier:
    """The classifier (with its real-clip reference) for these settings: from the cache, else trained and cached.

    A missing cache file is trained silently; an unreadable one is reported in one log line and replaced.
    """
    settings = _settings(resolution, n_frames, num_classes, seed)
    path = cache_file(settings, cache_dir)
    if path.is_file():
        try:
            classifier = _load_cached(path, settings)
        except Exception as exc:  # torch.load alone raises several types for a damaged file
            reason = str(exc).splitlines()[0] if str(exc) else ""
            log.warning("quality classifier cache %s is unusable (%s: %s); retraining", path, type(exc).__name__,
                        reason[:200])
        else:
            classifier.loaded_from_cache = True
            classifier.cache_path = path
            return classifier
    classifier = train_classifier(settings)
    classifier.reference = compute_reference(classifier)
    classifier.held_out_accuracy = classifier.reference.real_accuracy
    state = {
        "version": CLASSIFIER_VERSION,
        "settings": settings,
        "width": TRAINING["width"],
        "state_dict": classifier.state_dict(),
        "train_seconds": classifier.train_seconds,
        "reference": classifier.reference.to_state(),
    }
    try:
        atomic_torch_save(state, path)
    except OSError as exc:
        # A read-only or full cache folder costs a retraining next time, not this evaluation.
        log.warning("cannot write the quality classifier cache %s (%s); continuing without it", path, exc)
    else:
        classifier.cache_path = path
    return classifier


# --------------------------------------------------------------------------------------------------------------
# The metric.


def evaluate_videos(
    videos_uint8: np.ndarray, labels: np.ndarray, classifier: QualityClassifier,
    reference: Optional[RealReference] = None,
) -> dict:
    """Class accuracy and Fréchet distance of videos generated for `labels`, with the real-clip baselines.

    The Fréchet distance compares with the held-out real clips of the classes present in `labels` (a file
    sampled for a few classes is not penalised for missing the others); the floor (real train clips vs the same
    held-out clips) and the no-motion score use as many real clips as there are videos (at most num_clips).
    """
    videos = np.asarray(videos_uint8)
    labels = np.asarray(labels)
    _check_videos(videos, classifier.settings, "videos")
    if labels.ndim != 1 or labels.shape[0] != videos.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({videos.shape[0]},), got {labels.dtype} {labels.shape}")
    if videos.shape[0] == 0:
        raise ValueError("no videos to evaluate")
    num_classes = classifier.num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    reference = reference if reference is not None else real_reference(classifier)
    features, predictions = classify_videos(classifier, videos)
    classes = sorted(int(label) for label in np.unique(labels))
    correct = predictions == labels
    result = {
        "num_videos": int(videos.shape[0]),
        "num_classes": num_classes,
        "classes": classes,
        "accuracy": float(correct.mean()),
        "chance": 1.0 / num_classes,
        "per_class_accuracy": {class_name(label): float(correct[labels == label].mean()) for label in classes},
        "real_accuracy": float(reference.real_accuracy),
        "frechet": frechet_distance(features, reference.test_features[reference.test_mask(classes)]),
    }
    result.update(reference.baselines(count=videos.shape[0], classes=classes))
    result["feature_dim"] = int(features.shape[1])
    # (N, T, H, W, 3) -> frames (N, T, 3, H, W): how visible a 4-pixel patch grid is (real clips score about 1).
    result["patch_grid_ratio"] = patch_grid_ratio(torch.from_numpy(videos).permute(0, 1, 4, 2, 3), GRID_PATCH)
    return result


# --------------------------------------------------------------------------------------------------------------
# CLI.


def _read_npz(path: str, num_classes: Optional[int]) -> Tuple[np.ndarray, np.ndarray, int]:
    """videos, labels and the class count of one sample.py npz; any problem -> ValueError naming file and key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # not a zip, a damaged zip, pickled content: numpy raises several types
        raise ValueError(f"{path}: cannot be read as an .npz file ({type(exc).__name__})") from None
    with archive:
        for key in ("videos", "labels"):
            if key not in archive.files:
                raise ValueError(f"{path}: no key '{key}' (found {sorted(archive.files)})")
        try:
            videos, labels = archive["videos"], archive["labels"]
            stored_classes = archive["num_classes"] if "num_classes" in archive.files else None
            captions = archive["captions"] if "captions" in archive.files else None
        except Exception as exc:
            raise ValueError(f"{path}: cannot read its arrays ({type(exc).__name__})") from None
    if captions is not None:  # text-to-video samples: each video's class is the one its prompt names
        labels = np.array([label_from_caption(str(caption)) for caption in captions.reshape(-1)], dtype=object)
        unknown = [str(c) for c, label in zip(captions.reshape(-1), labels) if label is None]
        if unknown:
            raise ValueError(f"{path}: the caption {unknown[0]!r} names no shape and direction of the built-in "
                             f"dataset, so it has no class to be judged by")
        labels = labels.astype(np.int64)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3 or videos.shape[0] == 0:
        raise ValueError(
            f"{path}: 'videos' must be uint8 (N, T, H, W, 3) with N >= 1, got {videos.dtype} {videos.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != videos.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: 'labels' must be integers of shape ({videos.shape[0]},) like 'videos', "
            f"got {labels.dtype} {labels.shape}"
        )
    if stored_classes is not None:
        if stored_classes.size != 1 or not np.issubdtype(stored_classes.dtype, np.integer):
            raise ValueError(
                f"{path}: 'num_classes' must be one integer, got {stored_classes.dtype} {stored_classes.shape}"
            )
        stored_classes = int(stored_classes.reshape(()))
        if num_classes is not None and num_classes != stored_classes:
            raise ValueError(
                f"{path}: --num-classes {num_classes} disagrees with its 'num_classes' entry {stored_classes}"
            )
    # max(label) + 1 is not used as a default: a file sampled for some classes only would get the wrong task.
    classes = num_classes if num_classes is not None else stored_classes
    if classes is None:
        raise ValueError(f"{path}: no 'num_classes' entry; pass --num-classes (the models' class count)")
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"{path}: num_classes must be in 1..{MAX_CLASSES} for the synthetic dataset, got {classes}")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"{path}: 'labels' must be in 0..{classes - 1}, got {labels.min()}..{labels.max()}")
    return videos, labels.astype(np.int64), classes


def format_result(name: str, result: dict) -> str:
    """The one line the CLI prints per file."""
    return (
        f"{name}: class accuracy {result['accuracy']:.3f} (chance {result['chance']:.2f}, real clips "
        f"{result['real_accuracy']:.3f}) | Fréchet {result['frechet']:.2f} (floor real-vs-real "
        f"{result['frechet_floor']:.2f}, no-motion reference {result['frechet_no_motion']:.2f}) | "
        f"{GRID_PATCH}-px patch grid {result['patch_grid_ratio']:.2f} | "
        f"{result['num_videos']} videos vs {result['reference_clips']} held-out real clips"
    )


def _write_json(path: str, payload: dict) -> None:
    text = (json.dumps(payload, indent=2) + "\n").encode("utf-8")
    write_output(path, lambda handle: handle.write(text), "--json")  # atomic: never a truncated JSON


def run(args: argparse.Namespace) -> List[dict]:
    if args.prepare:
        if args.npz or args.num_classes is None:
            raise ValueError("--prepare trains (or finds) the classifier for --resolution/--frames/--num-classes; "
                             "it takes no --npz and needs --num-classes")
        classifier = load_or_train_classifier(args.resolution, args.frames, args.num_classes, args.seed, args.cache_dir)
        print(f"quality classifier ready at {classifier.cache_path} (held-out accuracy "
              f"{classifier.held_out_accuracy:.3f})")
        return []
    if not args.npz:
        raise ValueError("give at least one --npz (or --prepare)")
    # Every file is checked before any classifier trains, so a typo fails in a second, not after training.
    files = [(path, *_read_npz(path, args.num_classes)) for path in args.npz]
    classifiers: Dict[str, QualityClassifier] = {}
    results = []
    for path, videos, labels, num_classes in files:
        settings = _settings(videos.shape[2:4], videos.shape[1], num_classes, args.seed)
        key = json.dumps(settings, sort_keys=True)
        if key not in classifiers:
            classifier = load_or_train_classifier(
                settings["resolution"], settings["n_frames"], num_classes, args.seed, args.cache_dir
            )
            classifiers[key] = classifier
            how = ("loaded from" if classifier.loaded_from_cache
                   else f"trained in {classifier.train_seconds:.1f} s, cached at")
            print(
                f"quality classifier ({settings['resolution'][0]}x{settings['resolution'][1]}, {settings['n_frames']} "
                f"frames, {num_classes} classes, dataset seed {args.seed}): {how} {classifier.cache_path}",
                file=sys.stderr,
            )
            print(
                f"reference: {REFERENCE_CLIPS} held-out real 'test' clips; floor and no-motion scores from as many "
                f"unseen real 'train' clips as each file has videos (at most {REFERENCE_CLIPS})",
                file=sys.stderr,
            )
        classifier = classifiers[key]
        result = evaluate_videos(videos, labels, classifier, real_reference(classifier))
        result.update(npz=path, resolution=settings["resolution"], n_frames=settings["n_frames"], seed=args.seed,
                      classifier_cache=str(classifier.cache_path), classifier_version=CLASSIFIER_VERSION)
        print(format_result(path, result), flush=True)
        results.append(result)
    if args.json:
        _write_json(args.json, {"results": results})
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evals.synthetic_quality", formatter_class=HelpFormatter,
        description="Class accuracy and Fréchet distance of generated synthetic-dataset videos (sample.py --npz), "
        "in the feature space of a small classifier trained on real clips (cached per settings)."
    )
    parser.add_argument("--npz", action="append", default=[], metavar="FILE",
                        help="sample.py output: 'videos' uint8 (N, T, H, W, 3), 'labels' (N,); repeat for several")
    parser.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                        help="the models' class count; required unless the npz has a 'num_classes' entry")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed of the training run (train.global_seed)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help=f"the classifier cache (default: ${CACHE_ENV}, else ~/.cache/cmd/quality_classifier)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the numbers to this JSON file")
    parser.add_argument("--prepare", action="store_true",
                        help="only train and cache the classifier for --resolution H W, --frames, --num-classes")
    parser.add_argument("--resolution", type=positive_int, nargs=2, default=(32, 32), metavar=("H", "W"),
                        help="--prepare: the clip size of the classifier (an npz gives its own)")
    parser.add_argument("--frames", type=positive_int, default=8, metavar="T",
                        help="--prepare: frames per clip of the classifier (an npz gives its own)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The CLI; a user error ends as one line `error: ...` and exit code 1 (the project's one error reporter)."""
    from core.cli import run_reporting_user_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    run_reporting_user_errors(run, parse_args(argv))


if __name__ == "__main__":
    main()
