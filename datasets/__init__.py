"""Video datasets: UCF-101 / class-folder videos decoded with PyAV, and a built-in synthetic moving-shapes set."""
from datasets.build import DATASET_NAMES, build_dataset
from datasets.errors import DatasetError, VideoReadError
from datasets.synthetic import SyntheticMovingShapes
from datasets.video_folder import VideoFolderDataset

__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "SyntheticMovingShapes",
    "VideoFolderDataset",
    "VideoReadError",
    "build_dataset",
]
