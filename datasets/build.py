"""build_dataset: the one entry point the training scripts use to turn a DataConfig into a Dataset."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from datasets.captions import CaptionedVideoDataset
from datasets.errors import DatasetError
from datasets.synthetic import SyntheticMovingShapes
from datasets.video_folder import VideoFolderDataset

DATASET_NAMES = ("synthetic", "UCF101", "folder", "captions")


def _field(config, name: str, default=None):
    """Read a config field from an OmegaConf DictConfig or any object with attributes."""
    # getattr with a default works for both: struct-mode DictConfig raises an AttributeError subclass.
    value = getattr(config, name, default)
    return default if value is None else value


def check_data_path(data_cfg) -> None:
    """The data folder a video dataset reads exists: a check cheap enough for every rank of a job to make before
    a run folder is claimed (indexing, which probes every video, comes later and reports the rest)."""
    key = str(_field(data_cfg, "dataset_name", "synthetic")).lower()
    path = _field(data_cfg, "data_path")
    if key not in ("ucf101", "folder", "captions") or path is None:
        return
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DatasetError(f"data path is not a folder: {root}")


def build_dataset(data_cfg, split: str, seed: int = 0) -> Dataset:
    """Dataset for `split` ("train" | "test" | "all") from the fields of core.config.DataConfig."""
    name = str(_field(data_cfg, "dataset_name", "synthetic"))
    resolution = _field(data_cfg, "resolution", [64, 64])
    resolution = resolution if isinstance(resolution, int) else list(resolution)  # ListConfig -> list
    n_frames = int(_field(data_cfg, "n_frames", 16))
    requested_classes = getattr(data_cfg, "num_classes", None)
    key = name.lower()
    if key == "synthetic":
        return SyntheticMovingShapes(
            size=int(_field(data_cfg, "synthetic_size", 4096)),
            num_classes=requested_classes,
            resolution=resolution,
            n_frames=n_frames,
            split=split,
            seed=seed,
        )
    if key in ("ucf101", "folder"):
        dataset = VideoFolderDataset(
            data_path=_field(data_cfg, "data_path"),
            split=split,
            fold=int(_field(data_cfg, "fold", 1)),
            resolution=resolution,
            n_frames=n_frames,
            frame_stride=int(_field(data_cfg, "frame_stride", 1)),
            seed=seed,
            index_cache_dir=_field(data_cfg, "index_cache_dir"),
            name="UCF101" if key == "ucf101" else "folder",
        )
        if requested_classes is not None and int(requested_classes) != dataset.num_classes:
            # A model built for another class count would index its label embedding out of range or waste rows.
            raise DatasetError(
                f"data.num_classes={requested_classes} but {dataset.root} has {dataset.num_classes} classes"
            )
        return dataset
    if key == "captions":
        if requested_classes is not None and int(requested_classes) != 1:
            raise DatasetError(f"data.num_classes={requested_classes} but captioned videos have 1 class "
                               f"(dataset 'captions')")
        return CaptionedVideoDataset(
            data_path=_field(data_cfg, "data_path"),
            captions=_field(data_cfg, "captions"),
            split=split,
            resolution=resolution,
            n_frames=n_frames,
            frame_stride=int(_field(data_cfg, "frame_stride", 1)),
            seed=seed,
            index_cache_dir=_field(data_cfg, "index_cache_dir"),
        )
    raise DatasetError(f"unknown data.dataset_name {name!r}; choices: {', '.join(DATASET_NAMES)}")
