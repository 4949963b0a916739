"""NVlabs/CMD's launch form `python train_x.py --nnodes=N --nproc_per_node=G ...` on one node and on several:
every torchrun rendezvous flag is accepted in both of torchrun's spellings and forwarded, and a multi-node command that
names no first node ends in one line instead of a rendezvous that waits for a quarter of an hour."""
import pytest
import torch.distributed.run as torchrun

from tests.conftest import free_port, run_python
from core import distributed
from core.config import build_arg_parser, parse_config

# torchrun's flags beyond --nnodes that the scripts accept: (underscore spelling, hyphen spelling, a value).
NEW_FLAGS = [
    ("--nproc_per_node", "--nproc-per-node", "4"),
    ("--node_rank", "--node-rank", "1"),
    ("--master_addr", "--master-addr", "10.1.2.3"),
    ("--master_port", "--master-port", "29511"),
    ("--rdzv_backend", "--rdzv-backend", "c10d"),
    ("--rdzv_endpoint", "--rdzv-endpoint", "node001:29400"),
    ("--rdzv_id", "--rdzv-id", "job42"),
    ("--rdzv_conf", "--rdzv-conf", "join_timeout=900"),
    ("--max_restarts", "--max-restarts", "3"),
]
SCRIPT_ARGS = ["--dataset-name", "UCF101", "--max-steps", "3", "optim.lr=1e-4"]


def command_for(argv, stage="motion"):
    args = build_arg_parser(stage, "t").parse_intermixed_args(argv)
    command = distributed.torchrun_command(args, argv, "train_motion_diffusion.py")
    split = command.index("train_motion_diffusion.py")
    return command[:split], command[split + 1:]


@pytest.mark.parametrize("form", ["joined", "separate"])
@pytest.mark.parametrize("spelling", [0, 1], ids=["underscore", "hyphen"])
@pytest.mark.parametrize("flag", NEW_FLAGS, ids=[f[0] for f in NEW_FLAGS])
def test_each_launcher_flag_reaches_torchrun_in_both_spellings(flag, spelling, form):
    name, value = flag[spelling], flag[2]
    given = [f"{name}={value}"] if form == "joined" else [name, value]
    launcher, script_args = command_for(["--nnodes=1", *SCRIPT_ARGS[:2], *given, *SCRIPT_ARGS[2:]])
    assert launcher[1:3] == ["-m", "torch.distributed.run"]
    assert f"{flag[0]}={value}" in launcher
    # The workers get the script's own arguments only, in their order.
    assert script_args == SCRIPT_ARGS
    # And torchrun itself reads the forwarded value.
    parsed = torchrun.get_args_parser().parse_args([*launcher[3:], "train_motion_diffusion.py"])
    assert str(getattr(parsed, flag[0].lstrip("-"))) == value


def test_seed_multi_node_commands_are_forwarded_whole():
    launcher, _ = command_for(["--nnodes=2", "--nproc_per_node=8", "--node_rank=1", "--master_addr=10.1.2.3",
                               "--master_port=29500", *SCRIPT_ARGS])
    assert launcher[3:] == ["--nnodes=2", "--nproc_per_node=8", "--node_rank=1", "--master_addr=10.1.2.3",
                            "--master_port=29500"]
    launcher, _ = command_for(["--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", "node001:29400", "--rdzv-id", "77", *SCRIPT_ARGS])
    assert launcher[3:] == ["--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
                            "--rdzv_endpoint=node001:29400", "--rdzv_id=77"]


@pytest.mark.parametrize("argv, missing", [
    (["--nnodes=2", "--nproc_per_node=8"], "--master_addr"),
    (["--nnodes=2", "--nproc_per_node=8", "--node_rank=1"], "--master_addr"),
    (["--nnodes=2", "--rdzv_backend=c10d", "--master_addr=10.1.2.3"], "--rdzv_endpoint"),
    (["--nnodes=3", "--master_addr=10.1.2.3"], "--node_rank"),
])
def test_several_nodes_without_a_first_node_name_the_missing_flag(argv, missing):
    with pytest.raises(distributed.LaunchError, match=missing) as info:
        command_for(argv)
    assert "\n" not in str(info.value)


def test_several_nodes_without_an_address_end_in_one_line(monkeypatch, capsys):
    # In-process (the scripts' own parse_config) to spare a subprocess; a relaunch would replace pytest itself.
    monkeypatch.setattr(distributed.os, "execv", lambda *a: pytest.fail("relaunched without a first node"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as info:
        parse_config("autoencoder", "t", ["--config", "configs/tiny/autoencoder.yaml", "--nnodes=2",
                                          "--nproc_per_node=1", "--node_rank=1"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--master_addr" in lines[0], lines


def test_seed_style_launch_with_rendezvous_flags_runs_two_processes(tmp_path):
    proc = run_python(["train_ae.py", "--config", "configs/tiny/autoencoder.yaml", "--results-dir", tmp_path,
                       "--exp-name", "ae", "--max-steps", 2, "--log-every", 1, "--nnodes=1", "--node_rank=0",
                       "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--nproc_per_node=2",
                       "train.global_batch_size=4", "data.resolution=[16,16]", "data.n_frames=4", "data.num_workers=0",
                       "model.depth=1", "model.hidden_size=32", "train.eval_every=100", "train.num_eval_videos=2"],
                      timeout=300)
    assert "relaunching under torchrun" in proc.stderr
    log = (tmp_path / "ae" / "log.txt").read_text()
    assert "world size 2" in log
    assert (tmp_path / "ae" / "checkpoints" / "last.pt").is_file()
