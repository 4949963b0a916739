"""Tests for evals/synthetic_quality.py: the real-clip classifier, its cache, the metric and the CLI."""
from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch

from evals import synthetic_quality as sq

RESOLUTION = (32, 32)  # the tiny configs' settings: what the metric is run on in the demo
FRAMES = 8
CLASSES = 4  # square-right, disc-right, triangle-right, square-left
# Held-out clips that are not among the reference's test clips (0..REFERENCE_CLIPS-1), so distances to the
# reference are honest real-vs-real numbers.
FRESH_START = sq.REFERENCE_CLIPS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The classifier for the tiny settings, trained once per session into a fresh cache folder."""
    cache_dir = tmp_path_factory.mktemp("quality_cache")
    classifier = sq.load_or_train_classifier(RESOLUTION, FRAMES, CLASSES, seed=0, cache_dir=cache_dir)
    return classifier, cache_dir


@pytest.fixture(scope="module")
def fresh_real():
    return sq.render_real_clips(RESOLUTION, FRAMES, CLASSES, "test", FRESH_START, 256)


def test_classifier_recognises_held_out_real_clips(trained, fresh_real):
    classifier, _ = trained
    assert not classifier.loaded_from_cache and classifier.cache_path.is_file()
    videos, labels = fresh_real
    features, predictions = sq.classify_videos(classifier, videos)
    assert features.shape == (256, classifier.feature_dim) and features.dtype == np.float64
    accuracy = float(np.mean(predictions == labels))
    # 0.9 is above the best a direction-blind classifier can do here (disc and triangle right, square-right vs
    # square-left a coin flip: 0.75) and well below the ~0.99 measured, leaving room for platform float noise.
    assert accuracy >= 0.9, accuracy
    assert classifier.reference.real_accuracy >= 0.9
    for label in range(CLASSES):
        assert np.mean(predictions[labels == label] == label) >= 0.8, label


def test_removing_motion_lowers_accuracy_and_raises_frechet(trained, fresh_real):
    classifier, _ = trained
    videos, labels = fresh_real
    reference = sq.real_reference(classifier)
    real = sq.evaluate_videos(videos, labels, classifier, reference)
    frozen = sq.evaluate_videos(sq.remove_motion(videos), labels, classifier, reference)
    assert real["num_videos"] == 256 and real["chance"] == 0.25 and real["baseline_clips"] == 256
    assert real["accuracy"] >= 0.9
    # Without motion square-right and square-left look alike, so at least an eighth of the clips are lost.
    assert frozen["accuracy"] <= real["accuracy"] - 0.1, (frozen["accuracy"], real["accuracy"])
    # Real clips sit near the real-vs-real floor; motionless ones far away (measured: ~12 vs ~550).
    assert real["frechet"] <= 2.0 * real["frechet_floor"] + 1.0, real
    assert frozen["frechet"] > 3.0 * real["frechet"], (frozen["frechet"], real["frechet"])
    assert reference.frechet_no_motion > 3.0 * reference.frechet_floor
    # Fewer videos: the baselines are computed with as many real clips, so they move with the sample size.
    small = sq.evaluate_videos(videos[:32], labels[:32], classifier, reference)
    assert small["baseline_clips"] == 32 and small["frechet_floor"] > real["frechet_floor"]


def test_cache_is_reused(trained):
    classifier, cache_dir = trained
    started = time.perf_counter()
    again = sq.load_or_train_classifier(RESOLUTION, FRAMES, CLASSES, seed=0, cache_dir=cache_dir)
    elapsed = time.perf_counter() - started
    assert again.loaded_from_cache and again.cache_path == classifier.cache_path
    assert elapsed < classifier.train_seconds / 4, (elapsed, classifier.train_seconds)
    expected = classifier.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in again.state_dict().items())
    assert again.reference.real_accuracy == classifier.reference.real_accuracy
    # Other settings get their own file.
    assert sq.cache_file(sq._settings(RESOLUTION, FRAMES, CLASSES, 1), cache_dir) != classifier.cache_path


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_damaged_cache_is_retrained(tmp_path, monkeypatch, caplog, damage):
    # A much smaller recipe (its own cache key) keeps three retrainings to a second or two.
    monkeypatch.setattr(sq, "TRAINING", {**sq.TRAINING, "min_clips": 64, "clips_per_class": 16, "epochs": 1})
    monkeypatch.setattr(sq, "REFERENCE_CLIPS", 16)
    settings = ((16, 16), 4, 2)
    first = sq.load_or_train_classifier(*settings, cache_dir=tmp_path)
    path = first.cache_path
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"state_dict": {}}, path)  # a readable file of the wrong layout
    with caplog.at_level(logging.WARNING, logger=sq.__name__):
        second = sq.load_or_train_classifier(*settings, cache_dir=tmp_path)
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage() and "retraining" in warnings[0].getMessage()
    assert not second.loaded_from_cache
    # Same settings, same machine: the retrained weights are the same as the first ones.
    expected = first.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in second.state_dict().items())
    assert sq.load_or_train_classifier(*settings, cache_dir=tmp_path).loaded_from_cache


def _write_npz(path, videos, labels, **extra):
    np.savez(path, videos=videos, labels=labels.astype(np.int64), content_frames=videos[:, 0], **extra)
    return path


def test_cli_reports_accuracy_on_real_clips(trained, fresh_real, tmp_path, python_runner):
    _, cache_dir = trained
    videos, labels = fresh_real
    first = _write_npz(tmp_path / "real.npz", videos[:64], labels[:64])
    second = _write_npz(tmp_path / "real_with_classes.npz", videos[64:96], labels[64:96], num_classes=CLASSES)
    out = tmp_path / "quality.json"
    proc = python_runner(["-m", "evals.synthetic_quality", "--npz", first, "--npz", second, "--num-classes", CLASSES,
                          "--cache-dir", cache_dir, "--json", out])
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{first}: class accuracy ") and "Fréchet" in lines[0], proc.stdout
    assert "loaded from" in proc.stderr  # the fixture's cache, not a second training
    results = json.loads(out.read_text())["results"]
    assert [result["npz"] for result in results] == [str(first), str(second)]
    assert results[0]["accuracy"] >= 0.9 and results[0]["num_videos"] == 64 and results[1]["num_videos"] == 32
    for key in ("frechet", "frechet_floor", "frechet_no_motion", "real_accuracy", "chance"):
        assert np.isfinite(results[0][key]), key


def test_cli_bad_npz_is_one_line_error(tmp_path, python_runner):
    videos = np.zeros((2, FRAMES, *RESOLUTION, 3), np.uint8)
    no_labels = tmp_path / "no_labels.npz"
    np.savez(no_labels, videos=videos)
    proc = python_runner(["-m", "evals.synthetic_quality", "--npz", no_labels, "--num-classes", CLASSES,
                          "--cache-dir", tmp_path / "cache"], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and str(no_labels) in proc.stderr and "'labels'" in proc.stderr
    assert not (tmp_path / "cache").exists()  # the files are checked before anything trains


def test_cli_errors_name_the_file(tmp_path, capsys):
    labels = np.array([0, 1], np.int64)
    cases = {
        "missing.npz": None,
        "float.npz": dict(videos=np.zeros((2, FRAMES, *RESOLUTION, 3), np.float32), labels=labels),
        "short_labels.npz": dict(videos=np.zeros((2, FRAMES, *RESOLUTION, 3), np.uint8), labels=labels[:1]),
        "no_classes.npz": dict(videos=np.zeros((2, FRAMES, *RESOLUTION, 3), np.uint8), labels=labels),
        "big_label.npz": dict(videos=np.zeros((2, FRAMES, *RESOLUTION, 3), np.uint8), labels=labels + 4,
                              num_classes=np.int64(CLASSES)),
        "not_npz.npz": b"plain text",
    }
    expected = {"missing.npz": "not found", "float.npz": "'videos'", "short_labels.npz": "'labels'",
                "no_classes.npz": "--num-classes", "big_label.npz": "'labels' must be in 0..3",
                "not_npz.npz": "cannot be read"}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            np.savez(path, **content)
        with pytest.raises(SystemExit) as exit_info:
            sq.main(["--npz", str(path), "--cache-dir", str(tmp_path / "cache")])
        assert exit_info.value.code == 1, name
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and "\n" not in error, error
        assert str(path) in error and expected[name] in error, error
