"""optim.warmup_steps / decay / decay_fraction / min_lr_ratio: the learning rate each update uses."""
import math
import signal
from types import SimpleNamespace

import pytest
import torch

from core.config import ConfigError, load_config
from training.optim import lr_factor, set_lr
from training.run import TrainingRun

TINY = "configs/tiny"


def schedule(warmup=0, decay="none", fraction=1.0, floor=0.0):
    return SimpleNamespace(warmup_steps=warmup, decay=decay, decay_fraction=fraction, min_lr_ratio=floor)


def factors(cfg, max_steps):
    return [lr_factor(cfg, step, max_steps) for step in range(max_steps)]


def test_constant_by_default():
    assert factors(schedule(), 50) == [1.0] * 50


def test_warmup_rises_linearly_to_the_full_rate():
    assert factors(schedule(warmup=4), 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decay_over_the_whole_run_reaches_the_floor_at_the_last_update(decay):
    values = factors(schedule(decay=decay, floor=0.1), 100)
    assert values[-1] == pytest.approx(0.1, abs=1e-12)
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))
    assert values[0] > 0.99  # the first update runs at (nearly) the full rate
    assert min(values) >= 0.1 - 1e-12


def test_cosine_midpoint_and_linear_slope():
    # decay over 10 updates: the 5th of them is half-way; cosine and linear agree there
    for decay in ("linear", "cosine"):
        assert lr_factor(schedule(decay=decay), 4, 10) == pytest.approx(0.5, abs=1e-12)
    assert lr_factor(schedule(decay="linear"), 1, 10) == pytest.approx(0.8, abs=1e-12)
    assert lr_factor(schedule(decay="cosine"), 1, 10) == pytest.approx((1 + math.cos(0.2 * math.pi)) / 2, abs=1e-12)


def test_decay_fraction_keeps_the_rate_constant_until_the_last_steps():
    values = factors(schedule(warmup=2, decay="linear", fraction=0.4), 10)
    assert values[:6] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert values[6:] == pytest.approx([0.75, 0.5, 0.25, 0.0], abs=1e-12)
    # the same fraction of a longer run: the decay scales with --max-steps
    longer = factors(schedule(warmup=2, decay="linear", fraction=0.4), 20)
    assert longer[:12] == [0.5] + [1.0] * 11 and longer[-1] == 0.0 and longer[12] < 1.0


def test_warmup_and_decay_over_the_rest():
    values = factors(schedule(warmup=2, decay="linear"), 6)  # decays over the 4 updates after the warm-up
    assert values == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-12)
    # a fraction that would reach into the warm-up starts the decay after it
    assert factors(schedule(warmup=2, decay="linear", fraction=0.9), 6) == pytest.approx(values, abs=1e-12)


@pytest.mark.parametrize("override, key", [("optim.decay=step", "optim.decay"),
                                           ("optim.warmup_steps=-1", "optim.warmup_steps"),
                                           ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
                                           ("optim.decay_fraction=1.5", "optim.decay_fraction")])
def test_bad_schedule_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("autoencoder", f"{TINY}/autoencoder.yaml", [override])


def test_the_optimizer_steps_with_the_scheduled_rate(tmp_path):
    """Through set_lr and TrainingRun.clip_and_step, as every training script steps: each update's rate is
    optim.lr * lr_factor(step), on every param group, and the rate follows run.step (what a resume restores)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    cfg = load_config("autoencoder", f"{TINY}/autoencoder.yaml",
                      [f"train.results_dir={tmp_path}", "train.max_steps=6", "optim.lr=0.01", "optim.warmup_steps=2",
                       "optim.decay=cosine", "optim.min_lr_ratio=0.2"])
    run = TrainingRun(cfg, stage="autoencoder")
    try:
        model = torch.nn.Linear(3, 2)
        second = torch.nn.Linear(3, 1)
        optimizer = torch.optim.AdamW([{"params": model.parameters()}, {"params": second.parameters(), "lr": 0.002}],
                                      lr=0.01)
        seen = []
        for step in (0, 1, 2, 5, 3):  # out of order: the rate depends on run.step alone
            run.step = step
            (model(torch.ones(1, 3)).sum() + second(torch.ones(1, 3)).sum()).backward()
            set_lr(optimizer, lr_factor(cfg.optim, run.step, cfg.train.max_steps))
            run.clip_and_step(torch.nn.ModuleList([model, second]), optimizer)
            seen.append([group["lr"] for group in optimizer.param_groups])
        for (step, (lr, lr_second)) in zip((0, 1, 2, 5, 3), seen):
            factor = lr_factor(cfg.optim, step, 6)
            assert lr == pytest.approx(0.01 * factor, rel=1e-12)
            assert lr_second == pytest.approx(0.002 * factor, rel=1e-12)
        assert seen[3][0] == pytest.approx(0.002, rel=1e-12)  # the last update: min_lr_ratio * lr
        assert seen[0][0] == pytest.approx(0.005, rel=1e-12)  # the first: half-way up the 2-step warm-up
    finally:
        run.finish()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
