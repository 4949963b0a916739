"""The shared runtime: configs, DDP equivalence, atomic checkpoints, exact resume, non-finite steps, SIGTERM."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import REPO, child_env, run_python, run_torchrun
from core import checkpoint as ckpt_io
from core.config import ConfigError, build_arg_parser, config_from_args, config_from_dict, config_to_dict, load_config

pytestmark = pytest.mark.slow  # trains or launches scripts for minutes: scheduled first (conftest.py)

TOY = ["-m", "tests.helpers.toy_train"]


def toy_args(results, steps, *extra):
    return [*TOY, "--config", "configs/tiny/autoencoder.yaml", "--results-dir", results, "--max-steps", steps,
            "--log-every", 1, "train.global_batch_size=8", "data.num_workers=0", "optim.lr=0.05", *extra]


def result(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / f"result-{step}.json").read_text())


# ---- config ---------------------------------------------------------------------------------------------------
def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match=r"train\.learning_rat"):
        load_config("autoencoder", overrides=["train.learning_rat=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        load_config("autoencoder", overrides=["train.global_batch_size=many"])


def test_mixed_precision_no_is_no_in_yaml_and_overrides(tmp_path):
    # YAML 1.1 reads a bare `no` as false; the documented value must still load (it failed on CUDA machines).
    assert load_config("autoencoder", overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
    config = tmp_path / "fp32.yaml"
    config.write_text("train:\n  mixed_precision: no\n")
    assert load_config("autoencoder", config_file=str(config)).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"train\.mixed_precision.*fp16"):
        load_config("autoencoder", overrides=["train.mixed_precision=fp16"])


def test_missing_data_path_names_key():
    with pytest.raises(ConfigError, match=r"data\.data_path"):
        load_config("autoencoder", overrides=["data.dataset_name=UCF101"])


def test_yaml_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.lrr.*bad\.yaml"):
        load_config("autoencoder", config_file=str(bad))


def test_seed_flags_and_dotlist_land_in_keys():
    parser = build_arg_parser("content", "t")
    args = parser.parse_args(["--dataset-name", "UCF101", "--data-path", "/data/UCF-101", "--global-batch-size", "24",
                              "--results-dir", "runs", "--mode", "pixel", "--ckpt-every", "20000", "--log-every", "7",
                              "--max-steps", "9", "--resume", "auto", "--ae-ckpt", "ae.pt",
                              "--motion-model-config", "MotionDiT-L/2", "optim.lr=2e-4", "train.global_seed=3"])
    cfg = config_from_args("content", args)
    assert cfg.data.dataset_name == "UCF101" and cfg.data.data_path == "/data/UCF-101"
    assert cfg.train.global_batch_size == 24 and cfg.train.results_dir == "runs"
    assert cfg.train.ckpt_every == 20000 and cfg.train.log_every == 7 and cfg.train.max_steps == 9
    assert cfg.train.resume == "auto" and cfg.ae_ckpt == "ae.pt"
    assert cfg.model.name == "ContentDiT-L/2"  # NVlabs/CMD's motion name read as the DiT size
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.train.global_seed == 3


def test_model_name_validated_against_registry():
    with pytest.raises(ConfigError, match=r"model\.name"):
        load_config("motion", overrides=["ae_ckpt=x.pt", "model.name=MotionDiT-Q/2"])
    with pytest.raises(ConfigError, match=r"model\.name"):
        load_config("motion", overrides=["ae_ckpt=x.pt", "model.name=ContentDiT-S/2"])


def test_diffusion_stage_requires_ae_ckpt():
    assert load_config("motion").ae_ckpt == "auto"
    with pytest.raises(ConfigError, match="ae_ckpt"):
        load_config("motion", overrides=["ae_ckpt="])


def test_seed_command_without_config_gets_paper_settings():
    args = build_arg_parser("motion", "t").parse_args(["--dataset-name", "UCF101", "--data-path", "/d",
                                                       "--mode", "pixel"])
    cfg = config_from_args("motion", args)
    assert cfg.model.name == "MotionDiT-L/2" and cfg.model.key_patch_size == 4 and cfg.ae_ckpt == "auto"


def test_config_round_trip():
    cfg = load_config("motion", overrides=["ae_ckpt=a.pt", "data.resolution=[32,48]", "train.ema_decay=0.999"])
    again = config_from_dict("motion", config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_yaml_configs_in_repo_load():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        stage = {"autoencoder": "autoencoder", "motion": "motion", "content": "content"}[path.stem.split("_")[0]]
        cfg = load_config(stage, str(path), ["data.data_path=/data/UCF-101"])
        assert cfg.stage == stage


def test_cli_bad_key_exits_nonzero_with_one_line(tmp_path):
    proc = run_python([*TOY, "--results-dir", tmp_path, "train.nope=1"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.nope" in proc.stderr


# ---- checkpoints ------------------------------------------------------------------------------------------------
def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.atomic_torch_save({"model": {"w": torch.ones(3)}, "config": {}, "step": 1}, path)

    def exploding_save(obj, handle):
        handle.write(b"partial garbage")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError):
        ckpt_io.atomic_torch_save({"model": {"w": torch.zeros(3)}, "config": {}, "step": 2}, path)
    monkeypatch.undo()
    loaded = ckpt_io.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_strip_prefixes():
    state = {"module._orig_mod.a": 1, "_orig_mod.module.b": 2, "c": 3}
    assert ckpt_io.strip_prefixes(state) == {"a": 1, "b": 2, "c": 3}


def test_wrong_stage_checkpoint_refused(tmp_path):
    path = tmp_path / "m.pt"
    ckpt_io.atomic_torch_save({"model": {}, "config": {"stage": "motion"}, "stage": "motion", "step": 0}, path)
    with pytest.raises(ckpt_io.CheckpointError, match="'motion' checkpoint, but a 'autoencoder'"):
        ckpt_io.load_stage_checkpoint(path, "autoencoder")


# ---- processes --------------------------------------------------------------------------------------------------
def test_ddp_two_processes_match_one(tmp_path):
    run_python(toy_args(tmp_path / "one", 5, "--exp-name", "run"))
    run_torchrun(2, toy_args(tmp_path / "two", 5, "--exp-name", "run"))
    one, two = result(tmp_path / "one" / "run", 5), result(tmp_path / "two" / "run", 5)
    assert torch.allclose(torch.tensor(one["params"]), torch.tensor(two["params"]), atol=1e-6)


def test_a_rank_ends_after_its_exit_handlers_with_the_status_given(tmp_path):
    """end_rank_process, the end of every rank of a distributed job: exit handlers, output and threads are done
    before the process ends with the status given, without the interpreter's teardown."""
    script = f"""
import atexit, threading, time
import core.distributed as d
atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").write("ran"))
threading.Thread(target=lambda: (time.sleep(0.2), open({str(tmp_path / "thread")!r}, "w").write("joined"))).start()
d.end_rank_process(0)  # not a rank: returns
print("unflushed", end="")
d._JOINED = True
d.end_rank_process(3)
print(" and not reached")
"""
    proc = run_python(["-c", script], check=False)
    assert (proc.returncode, proc.stdout) == (3, "unflushed"), proc.stderr
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"


def test_main_rank_first_orders_the_ranks_and_shares_a_user_error(tmp_path):
    """Rank 0's body runs before the others' (they see what it wrote); a user error in one rank's body is raised on
    every rank, so none is left waiting."""
    script = f"""
import pathlib
import core.distributed as d
info = d.setup_distributed()
folder = pathlib.Path({str(tmp_path)!r})
seen = []  # each rank writes its own file: the ranks share one stdout, where their lines interleave
with d.main_rank_first(info):
    if info.is_main:
        (folder / "mark").write_text("rank 0 was first")
    else:
        seen.append("sees: " + (folder / "mark").read_text())
for failing in (0, 1):
    try:
        with d.main_rank_first(info):
            if info.rank == failing:
                raise ValueError("no videos in /data/x (rank " + str(failing) + ")")
    except ValueError as exc:
        seen.append("raised: " + str(exc))
(folder / ("rank" + str(info.rank))).write_text("\\n".join(seen))
d.cleanup_distributed()
d.end_rank_process(0)  # as every rank of our entry points ends
"""
    (tmp_path / "ranks.py").write_text(script)
    run_torchrun(2, [tmp_path / "ranks.py"])
    raised = [f"raised: no videos in /data/x (rank {failing})" for failing in (0, 1)]
    assert (tmp_path / "rank0").read_text().splitlines() == raised
    assert (tmp_path / "rank1").read_text().splitlines() == ["sees: rank 0 was first", *raised]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    env = {"TOY_DROPOUT": "0.2"}  # RNG state must be restored for the losses to match
    run_python(toy_args(tmp_path / "full", 8, "--exp-name", "run", "--ckpt-every", 4), env=env)
    run_python(toy_args(tmp_path / "split", 4, "--exp-name", "run", "--ckpt-every", 4), env=env)
    run_python(toy_args(tmp_path / "split", 8, "--resume", "auto", "--ckpt-every", 4), env=env)
    full, first, second = (result(tmp_path / "full" / "run", 8), result(tmp_path / "split" / "run", 4),
                           result(tmp_path / "split" / "run", 8))
    assert torch.allclose(torch.tensor(first["losses"] + second["losses"]), torch.tensor(full["losses"]), atol=1e-6)
    assert torch.allclose(torch.tensor(second["params"]), torch.tensor(full["params"]), atol=1e-6)
    assert ckpt_io.load_checkpoint(tmp_path / "split" / "run" / "checkpoints" / "last.pt")["step"] == 8


def test_existing_run_folder_is_not_overwritten(tmp_path):
    run_python(toy_args(tmp_path, 2, "--exp-name", "run"))
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    proc = run_python(toy_args(tmp_path, 2, "--exp-name", "run"), check=False)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr + proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


def test_auto_index_run_folders(tmp_path):
    run_python(toy_args(tmp_path, 1))
    run_python(toy_args(tmp_path, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000-autoencoder", "001-autoencoder"]


def test_nonfinite_step_skipped_then_stop(tmp_path):
    run_python(toy_args(tmp_path / "a", 4, "--exp-name", "run"), env={"TOY_NAN_STEPS": "2"})
    run_python(toy_args(tmp_path / "b", 4, "--exp-name", "run"))
    skipped, clean = result(tmp_path / "a" / "run", 4), result(tmp_path / "b" / "run", 4)
    assert skipped["params"] != clean["params"]  # one update fewer
    proc = run_python(toy_args(tmp_path / "c", 20, "--exp-name", "run", "--ckpt-every", 2,
                               "train.max_nonfinite_steps=3"),
                      env={"TOY_NAN_STEPS": "5,6,7"}, check=False)
    assert proc.returncode != 0 and "3 non-finite losses in a row" in proc.stderr
    kept = ckpt_io.load_checkpoint(tmp_path / "c" / "run" / "checkpoints" / "last.pt")
    assert kept["step"] == 6  # saved after two skipped (not applied) updates: its weights are still good
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, *map(str, toy_args(tmp_path, 100000, "--exp-name", "run", "--ckpt-every", 100000))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env({"TOY_STEP_SECONDS": "0.02"}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "run" / "log.txt"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and "step 0000003" in log.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out
    step = ckpt_io.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"]
    assert 3 <= step < 100000


def test_seed_style_launch_flags_relaunch_under_torchrun(tmp_path):
    # NVlabs/CMD's commands pass torchrun's flags to the script itself; that must still give a 2-process run.
    proc = run_python(toy_args(tmp_path, 2, "--exp-name", "run", "--nnodes=1", "--nproc_per_node=2"))
    assert "relaunching under torchrun" in proc.stderr
    assert "world size 2" in (tmp_path / "run" / "log.txt").read_text()
