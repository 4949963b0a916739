"""Video datasets: UCF-101 / class-folder videos decoded with PyAV, captioned videos (WebVid layout), and a built-in
synthetic moving-shapes set."""
from datasets.build import DATASET_NAMES, build_dataset
from datasets.captions import CaptionedVideoDataset, read_captions
from datasets.errors import DatasetError, VideoReadError
from datasets.synthetic import SyntheticMovingShapes, caption_for_label, label_from_caption
from datasets.video_folder import VideoFolderDataset

__all__ = [
    "DATASET_NAMES",
    "CaptionedVideoDataset",
    "DatasetError",
    "SyntheticMovingShapes",
    "VideoFolderDataset",
    "VideoReadError",
    "build_dataset",
    "caption_for_label",
    "label_from_caption",
    "read_captions",
]
