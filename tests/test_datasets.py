"""Tests for datasets/: real encoded videos (mpeg4 .avi, h264 .mp4) in a UCF-101-style tree, and the synthetic set."""
from __future__ import annotations

import logging
import os
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler

import datasets
from datasets import video_decode, video_index
from datasets.build import build_dataset
from datasets.errors import DatasetError
from datasets.synthetic import DIRECTION_VECTORS, DIRECTIONS, SHAPES, SyntheticMovingShapes
from datasets.transforms import frames_to_clip
from tests.helpers.videos import HEIGHT, WIDTH, read_pattern_index, write_video

NTSC = Fraction(30000, 1001)


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except (av.error.FFmpegError, ValueError):
        return False
    return True


HAS_X264 = has_encoder("libx264")


# Class order in classInd differs from sorted folder order on purpose: labels must follow classInd.
CLASS_ORDER = ["Zebra", "Apple", "Mango"]
MP4_CODEC = "libx264" if HAS_X264 else "mpeg4"
GOOD_VIDEOS = {
    # relative path: (frames, rate, codec)
    "Zebra/v_Zebra_g01_c01.avi": (40, 25, "mpeg4"),
    "Zebra/v_Zebra_g02_c01.mp4": (40, NTSC, MP4_CODEC),
    "Apple/v_Apple_g01_c01.avi": (30, NTSC, "mpeg4"),
    "Apple/v_Apple_g02_c01.avi": (36, 25, "mpeg4"),
    "Mango/v_Mango_g01_c01.avi": (40, 25, "mpeg4"),
    "Mango/v_Mango_g02_c01.mp4": (24, 25, MP4_CODEC),
}
BAD_VIDEOS = ["Mango/v_Mango_g01_c02.avi", "Apple/v_Apple_g01_c02.avi", "Zebra/v_Zebra_g01_c02.avi"]
SHORT, ZERO_BYTES, TRUNCATED = BAD_VIDEOS


def make_ucf_tree(base: Path, lists_inside: bool = False) -> Path:
    """<base>/UCF-101/<Class>/*.avi|mp4 and ucfTrainTestlist beside it (or inside it)."""
    root = base / "UCF-101"
    for relative_path, (n_frames, rate, codec) in GOOD_VIDEOS.items():
        write_video(root / relative_path, n_frames, rate, codec)
    write_video(root / SHORT, 6)
    (root / ZERO_BYTES).write_bytes(b"")
    write_video(root / TRUNCATED, 40)
    data = (root / TRUNCATED).read_bytes()
    (root / TRUNCATED).write_bytes(data[: int(len(data) * 0.8)])
    lists = (root if lists_inside else base) / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{n + 1} {name}\n" for n, name in enumerate(CLASS_ORDER)))
    group1 = [path for path in list(GOOD_VIDEOS) + BAD_VIDEOS if "_g01_" in path]
    group2 = [path for path in GOOD_VIDEOS if "_g02_" in path]
    for fold, (train, test) in {1: (group1, group2), 2: (group2, group1), 3: (group1, group2)}.items():
        train_lines = [f"{path} {CLASS_ORDER.index(path.split('/')[0]) + 1}" for path in train]
        (lists / f"trainlist0{fold}.txt").write_text("\n".join(train_lines) + "\n")
        (lists / f"testlist0{fold}.txt").write_text("\n".join(test) + "\n")
    return root


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory) -> Path:
    return make_ucf_tree(tmp_path_factory.mktemp("ucf"))


def config(root, **overrides):
    values = dict(
        dataset_name="UCF101", data_path=None if root is None else str(root), resolution=[32, 32], n_frames=8,
        frame_stride=1, fold=1, num_classes=None, synthetic_size=64, index_cache_dir=None,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def relative_paths(dataset):
    return sorted(entry.path.relative_to(dataset.root).as_posix() for entry in dataset.entries)


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("relative_path", sorted(GOOD_VIDEOS))
def test_seek_decode_equals_full_decode(ucf_root, relative_path):
    path = str(ucf_root / relative_path)
    full = video_decode.decode_all_frames(path)
    n_frames = GOOD_VIDEOS[relative_path][0]
    assert full.shape == (n_frames, HEIGHT, WIDTH, 3)
    assert [read_pattern_index(frame) for frame in full] == list(range(n_frames))
    assert video_decode.probe_video(path).num_frames == n_frames
    rng = np.random.default_rng(0)
    requests = [[0], [n_frames - 1], list(range(n_frames - 5, n_frames)), [9, 10, 17]]
    requests += [sorted(rng.choice(n_frames, size=4, replace=False).tolist()) for _ in range(6)]
    for indices in requests:
        assert np.array_equal(video_decode.decode_frames(path, indices), full[indices]), indices


def test_x264_available_or_skip():
    if not HAS_X264:
        pytest.skip("PyAV has no libx264 encoder here: the .mp4 files were written with mpeg4 instead")
    container = av.open(os.devnull, "w", format="mp4")
    assert container.add_stream("libx264", rate=25).codec_context.name == "libx264"
    container.close()


# ------------------------------------------------------------------------------- folder dataset


def test_shapes_range_labels_from_class_index(ucf_root):
    dataset = build_dataset(config(ucf_root, resolution=[16, 16]), split="train")
    assert dataset.class_names == CLASS_ORDER
    assert dataset.num_classes == 3
    assert len(dataset) == 3  # the three good g01 videos; the three bad g01 files are skipped
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["x"].shape == (3, 8, 16, 16) and item["x"].dtype == torch.float32
        assert -1.0 <= item["x"].min() and item["x"].max() <= 1.0 and item["x"].max() > 0.5
        folder = dataset.entries[item["index"]].path.parent.name
        assert item["y"] == CLASS_ORDER.index(folder) and isinstance(item["y"], int)
        assert item["index"] == index


def test_fold_and_split_selection(ucf_root):
    good1 = sorted(path for path in GOOD_VIDEOS if "_g01_" in path)
    good2 = sorted(path for path in GOOD_VIDEOS if "_g02_" in path)
    assert relative_paths(build_dataset(config(ucf_root, fold=1), "train")) == good1
    assert relative_paths(build_dataset(config(ucf_root, fold=1), "test")) == good2
    assert relative_paths(build_dataset(config(ucf_root, fold=2), "train")) == good2
    assert relative_paths(build_dataset(config(ucf_root, fold=2), "test")) == good1
    assert relative_paths(build_dataset(config(ucf_root, fold=3), "all")) == sorted(GOOD_VIDEOS)
    with pytest.raises(DatasetError, match="fold"):
        build_dataset(config(ucf_root, fold=4), "train")
    with pytest.raises(DatasetError, match="split"):
        build_dataset(config(ucf_root), "val")


def test_clip_frames_stride_and_crop_match_full_decode(ucf_root):
    dataset = build_dataset(config(ucf_root, n_frames=4, frame_stride=3), split="all")
    for index in range(len(dataset)):
        for epoch in range(3):
            indices = dataset.clip_frame_indices(index, epoch)
            assert np.diff(indices).tolist() == [3, 3, 3]
            clip = dataset[(index, epoch)]["x"]  # (3, 4, 32, 32): center 32 of 40 columns, no resize
            frames = ((clip.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round()
            assert [read_pattern_index(frame, left=0) for frame in frames] == indices
            # The 4-pixel red and blue stripes at the sides are cropped away.
            assert frames[..., :2, 0].mean() < 200 and frames[..., -2:, 2].mean() < 200
            full = video_decode.decode_all_frames(str(dataset.entries[index].path))
            assert torch.equal(clip, frames_to_clip(full[indices], (32, 32)))


def test_resize_covers_then_center_crops_non_square(ucf_root):
    dataset = build_dataset(config(ucf_root, resolution=[16, 24], n_frames=2), split="all")
    clip = dataset[(0, 0)]["x"]
    assert clip.shape == (3, 2, 16, 24)
    frames = video_decode.decode_all_frames(str(dataset.entries[0].path))[dataset.clip_frame_indices(0, 0)]
    # 32x40 -> scale max(16/32, 24/40) = 0.6 to cover 16x24 -> 19x24, then rows 1..17, all 24 columns.
    expected = F.interpolate(
        torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(19, 24), mode="bilinear", antialias=True
    )[:, :, 1:17, :]
    assert torch.allclose(clip, (expected / 127.5 - 1).permute(1, 0, 2, 3), atol=1.01 / 127.5)  # uint8 rounding


def test_reproducible_starts(ucf_root):
    first = build_dataset(config(ucf_root, n_frames=4), split="all", seed=3)
    second = build_dataset(config(ucf_root, n_frames=4), split="all", seed=3)
    other_seed = build_dataset(config(ucf_root, n_frames=4), split="all", seed=4)
    for index in range(len(first)):
        assert torch.equal(first[(index, 5)]["x"], second[(index, 5)]["x"])
        assert torch.equal(first[(index, 0)]["x"], second[index]["x"])  # an int key is epoch 0
        starts = {first.clip_start(index, epoch) for epoch in range(12)}
        assert len(starts) > min(3, first.entries[index].num_frames - 4)  # a new epoch usually moves the clip
    assert any(
        first.clip_start(index, 0) != other_seed.clip_start(index, 0) for index in range(len(first))
    )


def test_bad_files_are_skipped_and_counted(ucf_root, caplog):
    with caplog.at_level(logging.WARNING, logger="datasets"):
        dataset = build_dataset(config(ucf_root), split="train")
    reasons = {Path(path).name: reason for path, reason in dataset.skipped}
    assert set(reasons) == {Path(path).name for path in BAD_VIDEOS}
    assert reasons[Path(SHORT).name].startswith("too short")
    assert "truncated" in reasons[Path(TRUNCATED).name]
    assert reasons[Path(ZERO_BYTES).name].startswith("unreadable")
    for path in BAD_VIDEOS:
        assert Path(path).name in caplog.text
    summary = dataset.summary()
    assert "skipped: 3" in summary and "train" in summary and "Zebra" in summary


def test_index_cache_is_reused_and_refreshed(tmp_path, monkeypatch):
    root = tmp_path / "videos"
    for relative_path in ("Apple/v_Apple_g01_c01.avi", "Mango/v_Mango_g01_c01.avi"):
        write_video(root / relative_path, 20)
    first = build_dataset(config(root, dataset_name="folder"), split="all")
    assert first.index_stats["probed"] == 2
    assert list((root / ".cmd_index_cache").glob("index_*.json"))  # default location: inside data_path
    calls = []
    real_probe = video_decode.probe_video

    def counting_probe(path):
        calls.append(path)
        return real_probe(path)

    monkeypatch.setattr(video_decode, "probe_video", counting_probe)
    again = build_dataset(config(root, dataset_name="folder"), split="all")
    assert calls == [] and again.index_stats["reused"] == 2
    assert [entry.num_frames for entry in again.entries] == [20, 20]
    write_video(root / "Mango/v_Mango_g01_c01.avi", 25)  # new size and mtime: only this file is probed again
    refreshed = build_dataset(config(root, dataset_name="folder"), split="all")
    assert [Path(path).name for path in calls] == ["v_Mango_g01_c01.avi"]
    assert [entry.num_frames for entry in refreshed.entries] == [20, 25]


def test_index_cache_falls_back_to_home_when_data_path_is_not_writable(tmp_path, monkeypatch):
    root = tmp_path / "videos"
    write_video(root / "Apple/a.avi", 12)
    (root / ".cmd_index_cache").write_text("a file where the cache folder would go")  # mkdir fails even as root
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "home"))
    dataset = build_dataset(config(root, dataset_name="folder"), split="all")
    assert Path(dataset.index_stats["cache_file"]).parent == tmp_path / "home" / ".cache" / "cmd"
    explicit = build_dataset(config(root, dataset_name="folder", index_cache_dir=str(tmp_path / "c")), "all")
    assert Path(explicit.index_stats["cache_file"]).parent == tmp_path / "c"


def test_file_corrupted_after_indexing_is_replaced(tmp_path):
    root = tmp_path / "videos"
    for name in ("a", "b", "c"):
        write_video(root / f"Apple/{name}.avi", 20)
    dataset = build_dataset(config(root, dataset_name="folder"), split="all")
    assert len(dataset) == 3 and dataset.skipped == []
    broken = root / "Apple/b.avi"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, broken.stat().st_size, dtype=np.uint8).tobytes())
    item = dataset[1]
    assert item["index"] == 2 and item["x"].shape == (3, 8, 32, 32)
    assert [Path(path).name for path, _ in dataset.skipped] == ["b.avi"]
    assert dataset[1]["index"] == 2 and len(dataset.skipped) == 1  # counted once, not per access
    assert dataset[0]["index"] == 0


def test_missing_empty_and_unknown_paths_name_the_problem(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(missing)):
        build_dataset(config(missing), "train")
    empty = tmp_path / "empty"
    (empty / "SomeClass").mkdir(parents=True)
    (empty / "SomeClass" / "notes.txt").write_text("not a video")
    with pytest.raises(DatasetError, match=str(empty)) as error:
        build_dataset(config(empty), "train")
    assert "\n" not in str(error.value)
    only_bad = tmp_path / "only_bad"
    (only_bad / "Class").mkdir(parents=True)
    (only_bad / "Class" / "broken.avi").write_bytes(b"")
    with pytest.raises(DatasetError, match=str(only_bad)):
        build_dataset(config(only_bad), "all")
    with pytest.raises(DatasetError, match="data_path"):
        build_dataset(config(None), "train")
    with pytest.raises(DatasetError, match="synthetic"):
        build_dataset(config(empty, dataset_name="kinetics"), "train")
    with pytest.raises(DatasetError, match="num_classes"):
        build_dataset(config(missing.parent / "x", dataset_name="synthetic", num_classes=13), "train")


def test_folder_without_split_lists_uses_sorted_classes_and_all_videos(tmp_path, caplog):
    root = tmp_path / "clips"
    files = {"b_class/one.mkv": "mpeg4", "a_class/sub/three.MOV": "mpeg4"}
    if has_encoder("libvpx-vp9"):
        files["a_class/two.webm"] = "libvpx-vp9"
    for relative_path, codec in files.items():
        write_video(root / relative_path, 12, codec=codec)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        dataset = build_dataset(config(root, dataset_name="Folder"), split="test")
    assert "no testlist01.txt" in caplog.text
    assert dataset.class_names == ["a_class", "b_class"]
    assert relative_paths(dataset) == sorted(files)
    assert [dataset[index]["y"] for index in range(len(files))] == [0] * (len(files) - 1) + [1]


def test_split_lists_inside_data_path(tmp_path):
    root = make_ucf_tree(tmp_path, lists_inside=True)
    dataset = build_dataset(config(root, dataset_name="ucf101"), split="test")
    assert dataset.class_names == CLASS_ORDER
    assert relative_paths(dataset) == sorted(path for path in GOOD_VIDEOS if "_g02_" in path)


def labelled_paths(dataset):
    return sorted((entry.path.relative_to(dataset.root).as_posix(), entry.label) for entry in dataset.entries)


def test_symlink_aliases_and_loops_are_skipped_not_indexed_twice(tmp_path, caplog):
    root = tmp_path / "clips"
    write_video(root / "Apple/a.avi", 12)
    write_video(root / "Mango/m.avi", 12)
    write_video(tmp_path / "elsewhere/Zoo/z.avi", 12)
    links = {
        # link (relative to root): (target, what its one warning line must say)
        "C": (".", "data root"),  # the whole tree again: once a phantom class "C" of duplicates
        "AAlias": ("Apple", "alias of Apple"),  # sorts before its target: the real folder must still win
        "Mango/up": ("..", "data root"),  # a loop inside a class folder
        "Mango/again.avi": ("../Apple/a.avi", "alias of Apple/a.avi"),  # a second name of an indexed file
        "Zoo2": (str(tmp_path / "elsewhere/Zoo"), "alias of Zoo"),  # second link to the same outside folder
        "Gone": (str(tmp_path / "missing"), "broken"),
    }
    for link, (target, _) in links.items():
        (root / link).symlink_to(target)
    # A link to a real folder outside the tree that aliases nothing indexed is a class like any other.
    (root / "Zoo").symlink_to(tmp_path / "elsewhere/Zoo")
    with caplog.at_level(logging.INFO, logger="datasets"):
        dataset = build_dataset(config(root, dataset_name="folder", num_classes=3), split="all")
    assert dataset.class_names == ["Apple", "Mango", "Zoo"] and dataset.num_classes == 3
    assert labelled_paths(dataset) == [("Apple/a.avi", 0), ("Mango/m.avi", 1), ("Zoo/z.avi", 2)]
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    for link, (target, reason) in links.items():
        lines = [message for message in messages if f"{root / link} -> " in message]
        assert len(lines) == 1 and reason in lines[0] and "\n" not in lines[0], (link, messages)
    assert not [message for message in messages if f"{root / 'Zoo'} -> " in message]
    assert sorted(path for path, _ in dataset.listing.skipped_links) == sorted(links)
    again = build_dataset(config(root, dataset_name="folder"), split="all")  # from the index cache: same listing
    assert again.index_stats["reused"] == 3 and labelled_paths(again) == labelled_paths(dataset)


def test_empty_class_folder_keeps_its_label_and_is_named(tmp_path, caplog):
    root = tmp_path / "clips"
    write_video(root / "Apple/a.avi", 12)
    (root / "Banana").mkdir()
    (root / "Banana/notes.txt").write_text("no videos yet")
    write_video(root / "Cherry/c.avi", 12)
    (root / "Durian").mkdir()
    with caplog.at_level(logging.WARNING, logger="datasets"):
        dataset = build_dataset(config(root, dataset_name="folder", num_classes=4), split="all")
    # Dropping an empty folder would renumber Cherry to 1 and break every checkpoint trained before it emptied.
    assert dataset.class_names == ["Apple", "Banana", "Cherry", "Durian"] and dataset.num_classes == 4
    assert labelled_paths(dataset) == [("Apple/a.avi", 0), ("Cherry/c.avi", 2)]
    lines = [record.getMessage() for record in caplog.records if "Banana" in record.getMessage()]
    assert len(lines) == 1 and "Durian" in lines[0] and str(root) in lines[0] and "no videos" in lines[0]

    # With classInd.txt the labels follow it; a listed class with no videos (empty or no folder) is named too.
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Cherry\n2 Banana\n3 Apple\n4 Fig\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datasets"):
        listed = build_dataset(config(root, dataset_name="folder"), split="all")
    assert listed.class_names == ["Cherry", "Banana", "Apple", "Fig"] and listed.num_classes == 4
    assert labelled_paths(listed) == [("Apple/a.avi", 2), ("Cherry/c.avi", 0)]
    lines = [record.getMessage() for record in caplog.records if "Banana" in record.getMessage()]
    assert len(lines) == 1 and "Fig" in lines[0] and "no videos" in lines[0]


def test_cli_prints_summary(ucf_root, capsys):
    from datasets.__main__ import main

    assert main(["--dataset-name", "UCF101", "--data-path", str(ucf_root), "--fold", "2", "--n-frames", "8"]) == 0
    output = capsys.readouterr().out
    assert "classes: 3 (Zebra, Apple, Mango)" in output and "skipped: 3" in output
    assert "train:      3 videos (split list), 3 usable of 3 indexed" in output


# ------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_splits_are_disjoint():
    train = build_dataset(config(None, dataset_name="synthetic", resolution=[24, 40], n_frames=5), "train", seed=1)
    again = build_dataset(config(None, dataset_name="SYNTHETIC", resolution=[24, 40], n_frames=5), "train", seed=1)
    test = build_dataset(config(None, dataset_name="synthetic", resolution=[24, 40], n_frames=5), "test", seed=1)
    assert len(train) == 64 and train.num_classes == 12 and len(train.class_names) == 12
    for index in (0, 7, 63):
        item = train[index]
        assert item["x"].shape == (3, 5, 24, 40) and item["y"] == index % 12 and item["index"] == index
        assert -1 <= item["x"].min() and item["x"].max() <= 1
        assert torch.equal(item["x"], again[(index, 9)]["x"])
        assert not torch.equal(item["x"], test[index]["x"])
    assert not torch.equal(train[0]["x"], train[12]["x"])  # same class, different clip
    few = build_dataset(config(None, dataset_name="synthetic", num_classes=5), "train")
    assert few.num_classes == 5 and [few[index]["y"] for index in range(7)] == [0, 1, 2, 3, 4, 0, 1]


def test_synthetic_clip_is_fast():
    dataset = SyntheticMovingShapes(size=32, resolution=(64, 64), n_frames=16)
    dataset[0]
    durations = []
    for index in range(20):
        start = time.perf_counter()
        dataset[index]
        durations.append(time.perf_counter() - start)
    # The target is well under 5 ms; the bound is loose because tests share two busy cores.
    assert np.median(durations) < 0.02


def main_object_mask(clip: torch.Tensor) -> np.ndarray:
    """(T, H, W) mask of bright pixels: objects are light and saturated, the background stays below 0.55."""
    frames = (clip.numpy() + 1) / 2  # (3, T, H, W) in [0, 1]
    return frames.max(axis=0) > 0.67


@pytest.mark.parametrize("label", range(12))
def test_synthetic_class_decides_shape_and_direction(label):
    dataset = SyntheticMovingShapes(size=48, resolution=(64, 64), n_frames=8, max_distractors=0, seed=2)
    fills, shifts = [], []
    for index in range(label, 48, 12):  # four clips of this class
        mask = main_object_mask(dataset[index]["x"])
        for frame in mask:
            rows, columns = np.nonzero(frame)
            box = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
            fills.append(frame.sum() / box)
        centroids = np.array([np.argwhere(frame).mean(axis=0) for frame in mask])  # (T, 2) as (y, x)
        shifts.append(centroids[-1] - centroids[0])
    fill = float(np.mean(fills))
    expected_fill = {"square": 1.0, "disc": np.pi / 4, "triangle": 0.5}[SHAPES[label % 3]]
    assert abs(fill - expected_fill) < 0.08, (SHAPES[label % 3], fill)
    direction = np.array(DIRECTION_VECTORS[DIRECTIONS[label // 3]])
    for shift in shifts:
        along = float(shift @ direction)
        across = float(np.abs(shift - along * direction).max())
        assert along > 8 and along > 2 * across, (DIRECTIONS[label // 3], shift)


# ------------------------------------------------------------------------------ loader integration


class EpochTaggingSampler(Sampler):
    """Like the lead's infinite sampler: yields (index, epoch) so persistent workers know the epoch."""

    def __init__(self, dataset, epoch: int):
        self.inner = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0)
        self.inner.set_epoch(epoch)
        self.epoch = epoch

    def __iter__(self):
        return ((index, self.epoch) for index in self.inner)

    def __len__(self):
        return len(self.inner)


def test_dataloader_with_workers_and_distributed_sampler(ucf_root):
    dataset = build_dataset(config(ucf_root, n_frames=4, resolution=[16, 16]), split="all")
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            assert batch["x"].shape[1:] == (3, 4, 16, 16) and batch["y"].dtype == torch.int64
            seen.extend(batch["index"].tolist())
        assert seen == list(sampler)
    tagged = DataLoader(dataset, batch_size=3, sampler=EpochTaggingSampler(dataset, epoch=7), num_workers=2)
    batch = next(iter(tagged))
    for position, index in enumerate(batch["index"].tolist()):
        assert torch.equal(batch["x"][position], dataset[(index, 7)]["x"])
    synthetic = build_dataset(config(None, dataset_name="synthetic", n_frames=4, resolution=[16, 16]), "train")
    loader = DataLoader(synthetic, batch_size=8, sampler=DistributedSampler(synthetic, 2, 1), num_workers=2)
    assert sum(batch["x"].shape[0] for batch in loader) == 32


def test_public_api_exports():
    assert datasets.build_dataset is build_dataset and issubclass(datasets.DatasetError, ValueError)
    assert video_index.VIDEO_EXTENSIONS == (".avi", ".mp4", ".mkv", ".webm", ".mov")


def test_build_from_omegaconf_data_config(ucf_root):
    from omegaconf import OmegaConf

    from core.config import DataConfig

    synthetic = OmegaConf.structured(DataConfig(synthetic_size=8, resolution=[16, 24], n_frames=3, num_classes=4))
    dataset = build_dataset(synthetic, split=synthetic.eval_split, seed=0)
    assert len(dataset) == 8 and dataset.num_classes == 4 and dataset[0]["x"].shape == (3, 3, 16, 24)
    folder = OmegaConf.structured(DataConfig(dataset_name="ucf101", data_path=str(ucf_root), n_frames=8))
    assert build_dataset(folder, split="test").num_classes == 3
    folder.num_classes = 5
    with pytest.raises(DatasetError, match="num_classes=5"):
        build_dataset(folder, split="test")
