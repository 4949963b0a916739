"""CLI: index a dataset and print its summary (videos per split, classes, skipped files)."""
from __future__ import annotations

import argparse
import logging
import sys
from types import SimpleNamespace

from datasets.build import DATASET_NAMES, build_dataset
from datasets.errors import DatasetError
from datasets.synthetic import MAX_CLASSES


def build_parser() -> argparse.ArgumentParser:
    # datasets/ sits below core/ (core.cli.HelpFormatter): each help writes its default itself.
    parser = argparse.ArgumentParser(prog="python -m datasets", description=__doc__)
    parser.add_argument("--dataset-name", default="UCF101",
                        help=f"one of {', '.join(DATASET_NAMES)}, any case (default: %(default)s)")
    parser.add_argument("--data-path", default=None, help="the dataset's root folder (all but synthetic)")
    parser.add_argument("--captions", default=None, help="dataset captions: a CSV or JSONL of path, caption")
    parser.add_argument("--fold", type=int, default=1,
                        help="UCF-101's train/test split list, 1..3 (default: %(default)s)")
    parser.add_argument("--split", default="all", choices=("train", "test", "all"),
                        help="the split to index (default: %(default)s)")
    parser.add_argument("--resolution", type=int, nargs=2, default=[64, 64], metavar=("H", "W"),
                        help="clip size (default: %(default)s)")
    parser.add_argument("--n-frames", type=int, default=16, help="frames per clip (default: %(default)s)")
    parser.add_argument("--frame-stride", type=int, default=1, help="take every k-th frame (default: %(default)s)")
    parser.add_argument("--synthetic-size", type=int, default=4096,
                        help="clips per synthetic epoch (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help=f"synthetic: how many classes (default: all {MAX_CLASSES})")
    parser.add_argument("--index-cache-dir", default=None,
                        help="where the video index is cached (default: DATA_PATH/.cmd_index_cache)")
    parser.add_argument("--verbose", action="store_true", help="log every skipped file while indexing")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(message)s")
    config = SimpleNamespace(
        dataset_name=args.dataset_name,
        data_path=args.data_path,
        captions=args.captions,
        resolution=args.resolution,
        n_frames=args.n_frames,
        frame_stride=args.frame_stride,
        fold=args.fold,
        num_classes=args.num_classes,
        synthetic_size=args.synthetic_size,
        index_cache_dir=args.index_cache_dir,
    )
    try:
        dataset = build_dataset(config, split=args.split)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(dataset.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
