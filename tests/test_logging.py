"""The training log line's speed and ETA, and the optional Weights & Biases mirror (with a recording stand-in)."""
import importlib.util
import json
import re

import pytest

from tests.helpers.processes import run_python

AE = ["train_ae.py", "--config", "configs/tiny/autoencoder.yaml", "train.global_batch_size=4",
      "data.resolution=[16,16]", "data.n_frames=4", "data.num_workers=0", "model.depth=1", "model.hidden_size=32",
      "train.num_eval_videos=2", "train.eval_every=1000"]

# Records what the trainer asks of wandb; the real package is optional and needs a network.
WANDB_STAND_IN = '''
import json, os, uuid

_LOG = os.environ["WANDB_CALLS"]


def _record(call, **kwargs):
    with open(_LOG, "a") as handle:
        handle.write(json.dumps({"call": call, **kwargs}, default=str) + "\\n")


class util:
    @staticmethod
    def generate_id():
        return uuid.uuid4().hex[:8]


class _Run:
    def finish(self):
        _record("finish")


def init(**kwargs):
    _record("init", **kwargs)
    return _Run()
'''


def test_log_line_reports_speed_and_eta(tmp_path):
    run_python([*AE, "--results-dir", tmp_path, "--exp-name", "run", "--max-steps", 6, "train.log_every=2"])
    log = (tmp_path / "run" / "log.txt").read_text()
    speed = r"(\d[\d.e+]*) steps/s (\d[\d.e+]*) clips/s ETA (\d+):(\d\d):(\d\d)"
    lines = re.findall(rf"step (\d{{7}}) \| [^|]*loss=[^|]* \| {speed}", log)
    assert [int(line[0]) for line in lines] == [2, 4, 6], log[-2000:]  # the clock starts at step 1
    for _, steps, clips, *eta in lines:
        assert float(clips) == pytest.approx(4 * float(steps), rel=0.01)  # global batch 4
    assert [int(part) for part in lines[-1][3:]] == [0, 0, 0]  # nothing left at max_steps


def test_wandb_mirrors_the_run_and_a_resumed_run_continues_it(tmp_path):
    stand_in = tmp_path / "site" / "wandb"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text(WANDB_STAND_IN)
    calls = tmp_path / "calls.jsonl"
    env = {"PYTHONPATH": str(tmp_path / "site"), "WANDB_CALLS": str(calls)}
    args = [*AE, "--results-dir", tmp_path / "results", "--exp-name", "run", "train.wandb_project=cmd-tests"]
    run_python([*args, "--max-steps", 2], env=env)
    run_python([*args, "--max-steps", 3, "--resume", tmp_path / "results" / "run"], env=env)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [r["call"] for r in recorded] == ["init", "finish", "init", "finish"]
    first, second = recorded[0], recorded[2]
    assert first["project"] == "cmd-tests" and first["sync_tensorboard"] is True and first["resume"] == "allow"
    assert second["id"] == first["id"] == (tmp_path / "results" / "run" / "wandb_id.txt").read_text()
    assert first["config"]["stage"] == "autoencoder"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_project_without_wandb_is_one_line(tmp_path):
    proc = run_python([*AE, "--results-dir", tmp_path, "--max-steps", 1, "train.wandb_project=x"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config key 'train.wandb_project'")
    assert not any(tmp_path.iterdir())
