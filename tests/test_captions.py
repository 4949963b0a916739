"""Captions for text-to-video: the synthetic set's captions, captions files (CSV / JSONL / WebVid), and
CaptionedVideoDataset on tiny videos written here."""
from __future__ import annotations

import colorsys
import importlib.util
import json
import subprocess
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import datasets
from datasets.build import DATASET_NAMES, build_dataset
from datasets.captions import CaptionedVideoDataset, read_captions
from datasets.errors import DatasetError
from datasets.synthetic import (
    COLOR_NAMES,
    DIRECTIONS,
    MAX_CLASSES,
    SHAPES,
    SyntheticMovingShapes,
    caption_for_label,
    class_name,
    label_from_caption,
    render_moving_shapes,
    render_moving_shapes_with_color,
)
from tests.helpers.videos import read_pattern_index, write_video

REPO = Path(__file__).resolve().parents[1]
# The last commit before captions: its render_moving_shapes is the reference the pixels must keep matching.
PRE_CAPTIONS_COMMIT = "c709e3dff3034f5bed01f42d35d35e5b203ed3c3"


# ------------------------------------------------------------------------------------ synthetic


def load_pre_captions_synthetic():
    try:
        source = subprocess.run(
            ["git", "show", f"{PRE_CAPTIONS_COMMIT}:datasets/synthetic.py"], cwd=REPO, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git history with commit {PRE_CAPTIONS_COMMIT[:10]} not available")
    path = Path(__file__).parent / ".pre_captions_synthetic.py"
    spec = importlib.util.spec_from_loader("pre_captions_synthetic", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def test_synthetic_pixels_are_those_of_the_pre_captions_code():
    old = load_pre_captions_synthetic()
    for resolution, n_frames, distractors, seed, split in [((16, 20), 4, 2, 5, "train"), ((32, 32), 6, 0, 1, "test")]:
        before = old.SyntheticMovingShapes(24, None, resolution, n_frames, split, seed, distractors)
        after = SyntheticMovingShapes(24, None, resolution, n_frames, split, seed, distractors)
        for index in range(24):
            item = after[index]
            assert torch.equal(item["x"], before[index]["x"]), (resolution, index)
            assert item["y"] == before[index]["y"] and item["index"] == index
        rng_old, rng_new = np.random.default_rng(9), np.random.default_rng(9)
        assert np.array_equal(old.render_moving_shapes(4, rng_old, 3, 12, 12),
                              render_moving_shapes(4, rng_new, 3, 12, 12))
        assert rng_old.random() == rng_new.random()  # the same number of draws too


def test_synthetic_pixels_match_recorded_values():
    # Recorded before captions existed; the tolerance allows other platforms' float maths, not a changed draw.
    dataset = SyntheticMovingShapes(size=24, resolution=(16, 20), n_frames=4, seed=5)
    recorded = {
        0: ([-0.2387, -0.32, -0.3447], [-0.2037, -0.2956, -0.6038]),
        7: ([-0.5389, -0.5106, -0.7738], [-0.6643, 0.7782, -0.8745]),
        19: ([-0.6274, -0.3133, -0.5713], [-0.6865, -0.5191, 0.7933]),
    }
    for index, (means, pixels) in recorded.items():
        clip = dataset[index]["x"].numpy()
        assert np.allclose(clip.mean(axis=(1, 2, 3)), means, atol=2e-4)
        picked = [clip[c, t, h, w] for c, t, h, w in [(0, 0, 3, 4), (1, 3, 8, 10), (2, 2, 12, 15)]]
        assert np.allclose(picked, pixels, atol=2e-4)


def test_caption_for_label_and_label_from_caption_round_trip():
    for label in range(MAX_CLASSES):
        caption = caption_for_label(label)
        shape, direction = class_name(label).split("-")
        assert caption == f"a {shape} moving {direction}"
        assert label_from_caption(caption) == label
        assert label_from_caption(f"A BLUE {shape.upper()}, moving {direction}!") == label
    with pytest.raises(ValueError, match="12"):
        caption_for_label(MAX_CLASSES)
    assert label_from_caption("a red disc") is None  # no direction
    assert label_from_caption("something moving left") is None  # no shape
    assert label_from_caption("a disc and a square moving left") is None  # two shapes
    assert label_from_caption("a disc moving up then down") is None  # two directions
    assert label_from_caption("a discus moving leftward") is None  # whole words only
    assert label_from_caption("") is None


def test_synthetic_captions_name_the_class_and_are_deterministic():
    dataset = SyntheticMovingShapes(size=240, resolution=(8, 8), n_frames=2, seed=3)
    captions = [dataset.caption_of(index) for index in range(240)]
    assert captions == [SyntheticMovingShapes(size=240, resolution=(8, 8), n_frames=2, seed=3).caption_of(i)
                        for i in range(240)]
    for index, caption in enumerate(captions):
        assert label_from_caption(caption) == dataset.label_of(index)
        words = caption.split()
        assert words[0] == "a" and words[-2:] == ["moving", DIRECTIONS[dataset.label_of(index) // 3]]
        assert words[-3] == SHAPES[dataset.label_of(index) % 3]
        assert len(words) == 4 or (len(words) == 5 and words[1] in COLOR_NAMES), caption
    with_color = sum(len(caption.split()) == 5 for caption in captions)
    assert 80 < with_color < 160  # about half name the colour
    assert len({caption.split()[1] for caption in captions if len(caption.split()) == 5}) == 6  # every colour occurs
    other_seed = SyntheticMovingShapes(size=240, resolution=(8, 8), n_frames=2, seed=4)
    assert captions != [other_seed.caption_of(index) for index in range(240)]
    few = SyntheticMovingShapes(size=20, num_classes=5)
    assert [label_from_caption(few.caption_of(index)) for index in range(20)] == [i % 5 for i in range(20)]


@pytest.mark.parametrize("resolution, n_frames", [((8, 8), 2), ((24, 40), 5)])
def test_caption_of_equals_the_item_caption(resolution, n_frames):
    dataset = SyntheticMovingShapes(size=30, resolution=resolution, n_frames=n_frames, seed=7, split="test")
    for index in range(30):
        item = dataset[(index, 3)]
        assert isinstance(item["caption"], str) and item["caption"] == dataset.caption_of(index)
    with pytest.raises(IndexError):
        dataset.caption_of(30)


def hue_bin(rgb) -> str:
    """Nearest primary or secondary hue of an RGB colour, computed independently of datasets.synthetic."""
    hue_degrees = colorsys.rgb_to_hsv(*map(float, rgb))[0] * 360
    centres = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}
    return min(centres, key=lambda name: min(abs(hue_degrees - centres[name]), 360 - abs(hue_degrees - centres[name])))


def test_colour_word_is_the_main_objects_colour():
    dataset = SyntheticMovingShapes(size=60, resolution=(32, 32), n_frames=3, seed=11, max_distractors=0)
    checked = 0
    for index in range(60):
        caption = dataset.caption_of(index)
        if len(caption.split()) != 5:
            continue
        frames = (dataset[index]["x"].numpy() + 1) / 2  # (3, T, H, W) in [0, 1]
        bright = frames.max(axis=0) > 0.67  # the object is light, the background below 0.55 (test_datasets)
        object_rgb = np.median(frames[:, bright], axis=1)
        assert caption.split()[1] == hue_bin(object_rgb), (caption, object_rgb)
        checked += 1
    assert checked >= 15
    # The returned colour is the one painted: full-coverage pixels hold exactly it.
    clip, rgb = render_moving_shapes_with_color(2, np.random.default_rng(0), 2, 32, 32, max_distractors=2)
    assert np.isclose(clip.reshape(3, -1).T, rgb, atol=1e-5).all(axis=1).sum() > 20


# -------------------------------------------------------------------------------- captions files


def write_csv(path: Path, header: str, rows) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_read_csv_path_caption_with_skipped_rows(tmp_path):
    path = write_csv(
        tmp_path / "captions.csv",
        "path,caption",
        ['a/1.mp4,a dog runs', '"b/2.mp4","a cat, then a mouse"', 'c/3.mp4,"two\nlines"', "d/4.mp4,  ", ",no file", "",
         "e/5.mp4,last"],
    )
    rows, skipped = read_captions(path)
    assert [(row.path, row.caption, row.line) for row in rows] == [
        ("a/1.mp4", "a dog runs", 2), ("b/2.mp4", "a cat, then a mouse", 3), ("c/3.mp4", "two\nlines", 4),
        ("e/5.mp4", "last", 9),
    ]
    assert all(row.split is None for row in rows)
    assert skipped == [(str(path), "empty caption: line 6"), (str(path), "no path: line 7")]


def test_read_jsonl_and_webvid_columns(tmp_path):
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text(
        json.dumps({"path": "x.mp4", "caption": "first"}) + "\n\n"
        + json.dumps({"Path": "/abs/y.mp4", "Caption": " second ", "extra": 1}) + "\n"
        + json.dumps({"path": "z.mp4"}) + "\n"
    )
    rows, skipped = read_captions(jsonl)
    assert [(row.path, row.caption, row.line) for row in rows] == [("x.mp4", "first", 1), ("/abs/y.mp4", "second", 3)]
    assert skipped == [(str(jsonl), "empty caption: line 4")]

    webvid = write_csv(
        tmp_path / "results_2M_val.csv",
        "videoid,contentUrl,duration,page_dir,name",
        ["31353427,https://x/a.mp4,PT00H00M15S,1066_1,Aerial shot of a lake",
         "1,https://x/b.mp4,PT00H00M10S,,no page dir"],
    )
    rows, skipped = read_captions(webvid)
    assert [(row.path, row.caption) for row in rows] == [("1066_1/31353427.mp4", "Aerial shot of a lake")]
    assert skipped == [(str(webvid), "no path: line 3")]

    webvid_json = tmp_path / "webvid.json"
    webvid_json.write_text(json.dumps({"videoid": 7, "page_dir": "p", "name": "a boat"}) + "\n")
    assert [(row.path, row.caption) for row in read_captions(webvid_json)[0]] == [("p/7.mp4", "a boat")]


def test_split_column(tmp_path):
    path = write_csv(
        tmp_path / "captions.csv",
        "path,caption,split",
        ["a.mp4,one,train", "b.mp4,two,val", "c.mp4,three,Validation", "d.mp4,four,test", "e.mp4,five,holdout"],
    )
    rows, skipped = read_captions(path)
    assert [(row.path, row.split) for row in rows] == [("a.mp4", "train"), ("b.mp4", "test"), ("c.mp4", "test"),
                                                       ("d.mp4", "test")]
    assert skipped == [(str(path), "unknown split 'holdout': line 6")]


def test_hash_split_is_stable_disjoint_and_covers_every_row(tmp_path):
    from datasets.captions import select_split

    paths = [f"page_{index // 50}/{index}.mp4" for index in range(1000)]
    rows, _ = read_captions(write_csv(tmp_path / "c.csv", "path,caption", [f"{path},clip {path}" for path in paths]))
    train = {row.path for row in select_split(rows, "train")}
    test = {row.path for row in select_split(rows, "test")}
    assert train | test == set(paths) and not train & test
    assert test == {path for path in paths if zlib.crc32(path.encode()) % 100 == 0}
    assert 0 < len(test) < 40
    assert [row.path for row in select_split(rows, "all")] == paths


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("wrong.csv", "video,text\na.mp4,hi\n", "found video, text"),
        ("empty.csv", "", "empty"),
        ("bad.jsonl", '{"path": "a.mp4", "caption": "x"}\n{"path": \n', "bad.jsonl:2: not valid JSON"),
        ("array.json", '[{"path": "a.mp4", "caption": "x"}]\n', "JSON array"),
        ("scalar.jsonl", '"just a string"\n', "one JSON object per line"),
        ("keys.jsonl", '{"file": "a.mp4", "text": "x"}\n', "found file, text"),
        ("binary.csv", b"path,caption\n\xff\xfe\x00garbage\n", "not UTF-8"),
        ("captions.txt", "path,caption\n", "unknown extension '.txt'"),
        # An unterminated quote once took the rows after it into its caption, silently.
        ("open.csv", 'path,caption\na.mp4,ok\nb.mp4,"a red disc\nc.mp4,blue square\nd.mp4,green\n',
         r"open.csv:3: not valid CSV from this row to line 5 \(unexpected end of data; an unterminated quote\?\)"),
        ("closed_later.csv", 'path,caption\nb.mp4,"a red disc\nc.mp4,blue "square"\nd.mp4,green\n',
         "closed_later.csv:2: not valid CSV from this row to line 3"),
        # Non-string captions once became their Python repr ("['a', 'b']", "True") and were trained on.
        ("list.jsonl", '{"path": "a.mp4", "caption": "x"}\n{"path": "b.mp4", "caption": ["a", "b"]}\n',
         "list.jsonl:2: 'caption' is a JSON array, not a string"),
        ("bool.jsonl", '{"path": "a.mp4", "caption": true}\n', "bool.jsonl:1: 'caption' is a JSON bool, not a string"),
        ("object.jsonl", '{"path": {"p": 1}, "caption": "x"}\n', "object.jsonl:1: 'path' is a JSON object"),
        ("name.jsonl", '{"videoid": 7, "page_dir": "p", "name": 3.5}\n', "name.jsonl:1: 'name' is a JSON float"),
    ],
)
def test_malformed_captions_files_raise_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError, match=message) as error:
        read_captions(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_jsonl_numeric_webvid_ids_and_quoted_commas_still_read(tmp_path):
    jsonl = tmp_path / "ids.jsonl"
    jsonl.write_text('{"videoid": 1066, "page_dir": "000001_000050", "name": "a red disc"}\n')
    rows, _ = read_captions(jsonl)
    assert [(row.path, row.caption) for row in rows] == [("000001_000050/1066.mp4", "a red disc")]
    csv_file = tmp_path / "quoted.csv"
    csv_file.write_text('path,caption\na.mp4,"a disc, moving ""left"""\nb.mp4,plain\n')
    rows, _ = read_captions(csv_file)
    assert [(row.caption, row.line) for row in rows] == [('a disc, moving "left"', 2), ("plain", 3)]


def test_missing_captions_file(tmp_path):
    with pytest.raises(DatasetError, match=f"not found: {tmp_path / 'nope.csv'}$"):
        read_captions(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------ the dataset


def hashed_name(want_test: bool, start: int = 0) -> str:
    """A path under page/ whose crc32 puts it in the test (or train) split."""
    index = start
    while (zlib.crc32(f"page/v{index}.mp4".encode()) % 100 == 0) != want_test:
        index += 1
    return f"page/v{index}.mp4"


@pytest.fixture(scope="module")
def webvid_tree(tmp_path_factory):
    """A WebVid-like folder: <root>/page/*.mp4, an absolute path outside it, and bad rows of every kind."""
    base = tmp_path_factory.mktemp("webvid")
    root = base / "videos"
    train_a = hashed_name(False)
    train_b = hashed_name(False, int(train_a[6:-4]) + 1)
    held_out = hashed_name(True)
    good = {train_a: 20, train_b: 16, held_out: 12}
    for relative_path, n_frames in good.items():
        write_video(root / relative_path, n_frames)
    outside = base / "elsewhere" / "clip.avi"
    write_video(outside, 10)
    write_video(root / "page/short.mp4", 4)
    (root / "page/corrupt.mp4").write_bytes(b"\x00not a video" * 50)
    rows = [
        f"{train_a},a dog runs on the beach",
        f'{train_b},"a cat, sleeping"',
        f"{held_out},rain on a window",
        f"{outside},an absolute path",
        "page/short.mp4,too short",
        "page/corrupt.mp4,broken bytes",
        "page/missing.mp4,never downloaded",
        "page/empty_caption.mp4,",
    ]
    captions = write_csv(base / "captions.csv", "path,caption", rows)
    return SimpleNamespace(
        root=root, captions=captions, train_a=train_a, train_b=train_b, held_out=held_out, outside=outside,
        caption_of_path={
            str(root / train_a): "a dog runs on the beach", str(root / train_b): "a cat, sleeping",
            str(root / held_out): "rain on a window", str(outside): "an absolute path",
        },
    )


def captions_config(tree, **overrides):
    values = dict(
        dataset_name="captions", data_path=str(tree.root), captions=str(tree.captions), resolution=[16, 16],
        n_frames=8, frame_stride=1, num_classes=None, index_cache_dir=None,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def test_captioned_dataset_items_and_skips(webvid_tree):
    dataset = build_dataset(captions_config(webvid_tree), split="all", seed=1)
    assert isinstance(dataset, CaptionedVideoDataset)
    assert dataset.num_classes == 1 and dataset.class_names == ["video"]
    assert sorted(str(entry.path) for entry in dataset.entries) == sorted(webvid_tree.caption_of_path)
    for index in range(len(dataset)):
        item = dataset[(index, 2)]
        assert item["x"].shape == (3, 8, 16, 16) and item["x"].dtype == torch.float32
        assert -1 <= item["x"].min() and item["x"].max() <= 1
        assert item["y"] == 0 and item["index"] == index
        assert (item["caption"] == dataset.caption_of(index)
                == webvid_tree.caption_of_path[str(dataset.entries[index].path)])
    reasons = {Path(path).name: reason for path, reason in dataset.skipped}
    assert set(reasons) == {"short.mp4", "corrupt.mp4", "missing.mp4", "captions.csv"}
    assert reasons["short.mp4"].startswith("too short")
    assert reasons["corrupt.mp4"].startswith("unreadable")
    assert reasons["missing.mp4"].startswith("unreadable") and "No such file" in reasons["missing.mp4"]
    assert reasons["captions.csv"] == "empty caption: line 9"
    summary = dataset.summary()
    assert "skipped: 4" in summary and "4 usable videos" in summary and "8 rows, 7 usable rows" in summary
    assert "crc32(path) % 100 == 0" in summary and str(webvid_tree.captions) in summary


def test_captioned_clips_are_the_files_frames(webvid_tree):
    dataset = build_dataset(captions_config(webvid_tree, resolution=[32, 32], n_frames=4, frame_stride=2), "all")
    for index in range(len(dataset)):
        clip = dataset[(index, 5)]["x"]
        frames = ((clip.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round()
        assert [read_pattern_index(frame, left=0) for frame in frames] == dataset.clip_frame_indices(index, 5)


def test_hash_split_of_the_dataset(webvid_tree):
    train = build_dataset(captions_config(webvid_tree), "train")
    test = build_dataset(captions_config(webvid_tree), "test")
    root = webvid_tree.root
    assert sorted(str(entry.path) for entry in train.entries) == sorted(
        [str(root / webvid_tree.train_a), str(root / webvid_tree.train_b), str(webvid_tree.outside)]
    )
    assert [str(entry.path) for entry in test.entries] == [str(root / webvid_tree.held_out)]
    assert test.index_stats["probed"] == 0  # the train split's probe filled the index cache
    assert "<- this dataset" in test.summary().splitlines()[4]


def test_split_column_selects_rows(webvid_tree, tmp_path):
    captions = write_csv(
        tmp_path / "split.csv", "path,caption,split",
        [f"{webvid_tree.train_a},one,validation", f"{webvid_tree.held_out},two,train",
         f"{webvid_tree.train_b},three,train"],
    )
    test = build_dataset(captions_config(webvid_tree, captions=str(captions)), "test")
    assert [entry.caption for entry in test.entries] == ["one"]
    train = build_dataset(captions_config(webvid_tree, captions=str(captions)), "train")
    assert sorted(entry.caption for entry in train.entries) == ["three", "two"]
    assert "split column" in train.summary()


def test_video_broken_after_indexing_is_replaced_with_its_caption(webvid_tree, tmp_path):
    root = tmp_path / "videos"
    for name in ("a", "b", "c"):
        write_video(root / f"{name}.mp4", 12)
    captions = tmp_path / "c.jsonl"
    captions.write_text("".join(json.dumps({"path": f"{n}.mp4", "caption": f"clip {n}"}) + "\n" for n in "abc"))
    dataset = CaptionedVideoDataset(str(root), str(captions), split="all", resolution=(16, 16), n_frames=8)
    assert [entry.caption for entry in dataset.entries] == ["clip a", "clip b", "clip c"] and dataset.skipped == []
    (root / "b.mp4").write_bytes(b"\x00" * 4000)
    item = dataset[1]
    assert item["index"] == 2 and item["caption"] == "clip c"
    assert [Path(path).name for path, _ in dataset.skipped] == ["b.mp4"]


def test_build_dataset_captions_errors(webvid_tree, tmp_path):
    assert "captions" in DATASET_NAMES and datasets.CaptionedVideoDataset is CaptionedVideoDataset
    with pytest.raises(DatasetError, match="data.captions") as error:
        build_dataset(captions_config(webvid_tree, captions=None), "train")
    assert "\n" not in str(error.value)
    with pytest.raises(DatasetError, match="data.num_classes=3"):
        build_dataset(captions_config(webvid_tree, num_classes=3), "train")
    assert build_dataset(captions_config(webvid_tree, num_classes=1), "train").num_classes == 1
    with pytest.raises(DatasetError, match="data_path"):
        build_dataset(captions_config(webvid_tree, data_path=None), "train")
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        build_dataset(captions_config(webvid_tree, data_path=str(tmp_path / "nowhere")), "train")
    with pytest.raises(DatasetError, match=str(tmp_path / "nope.csv")):
        build_dataset(captions_config(webvid_tree, captions=str(tmp_path / "nope.csv")), "train")
    only_bad = write_csv(tmp_path / "bad.csv", "path,caption", ["page/short.mp4,short", "page/missing.mp4,gone"])
    with pytest.raises(DatasetError, match="no usable videos") as error:
        build_dataset(captions_config(webvid_tree, captions=str(only_bad)), "all")
    assert "\n" not in str(error.value)


def test_build_from_omegaconf_and_cli(webvid_tree, capsys):
    from omegaconf import OmegaConf

    from datasets.__main__ import main
    from core.config import DataConfig

    config = OmegaConf.structured(
        DataConfig(dataset_name="captions", data_path=str(webvid_tree.root), captions=str(webvid_tree.captions),
                   n_frames=8)
    )
    dataset = build_dataset(config, split="test")
    assert len(dataset) == 1 and dataset[0]["caption"] == "rain on a window"
    arguments = ["--dataset-name", "captions", "--data-path", str(webvid_tree.root), "--n-frames", "8"]
    assert main([*arguments, "--captions", str(webvid_tree.captions)]) == 0
    output = capsys.readouterr().out
    assert "dataset: captions" in output and "skipped: 4" in output
    assert main(arguments) == 2 and "data.captions" in capsys.readouterr().err
