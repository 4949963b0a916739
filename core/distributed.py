"""Process-group setup from torchrun's environment, or a single plain process."""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from core.cli import RunError, nonnegative_int, port_int, positive_int


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# Whether this process joined a process group (setup_distributed): such a process ends through end_rank_process.
_JOINED = False


def setup_distributed() -> DistInfo:
    """NCCL on CUDA, gloo on CPU; plain `python script.py` runs as world size 1 without a process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = device if device.type == "cuda" else None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one store across --max-restarts; without a per-attempt prefix the restarted
            # ranks can read the dead ranks' addresses and hang or fail in the gloo/NCCL connect.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timedelta(minutes=30))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"/cmd/attempt_{attempt}", store),
                                    rank=rank, world_size=world_size, device_id=device_id)
        else:
            dist.init_process_group(backend=backend, device_id=device_id)
        global _JOINED
        _JOINED = True
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_rank_process(code: int) -> None:
    """Ends this process with exit status `code` if it joined a distributed job, after its exit handlers have run
    and its output is flushed; returns at once in any other process.

    A rank skips the interpreter's teardown: DDP keeps its process group, and the gloo/NCCL threads that serve it,
    alive until the process ends (destroy_process_group does not free it; checked with torch 2.14 and gloo), and such
    a thread that meets the teardown aborts a rank whose run succeeded ("terminate called without an active
    exception", SIGABRT: 3 of 5 runs of the test suite, which starts about 40 two-process jobs on 2 cores).
    """
    if not _JOINED:
        return
    cleanup_distributed()
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what a normal exit runs: log handlers, run-folder claims, loader workers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); identity in a single process."""
    tensor = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy, on the input's device); identity in a single process.

    NCCL reduces only CUDA tensors, so a CPU tensor makes the round trip through the current CUDA device there.
    """
    tensor = tensor.detach().clone()
    if is_distributed():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
        reduced = tensor.to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        tensor = reduced.to(tensor.device)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# Work one rank does for all, and user errors every rank raises together, so that none hangs waiting for the others.
USER_ERRORS = (ValueError, OSError, RunError)


def attempt(fn) -> tuple:
    """(fn(), None), or (None, the user error it raised): to be shared with the other ranks before raising."""
    try:
        return fn(), None
    except USER_ERRORS as exc:
        return None, exc


def raise_first(errors: list) -> None:
    error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error


def on_main(info: DistInfo, fn):
    """fn() on rank 0, its result on every rank; an error there is raised on every rank."""
    result, error = broadcast_object(attempt(fn) if info.is_main else (None, None))
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def errors_shared():
    """Every rank runs the body; a user error it raises on any rank is raised on every rank."""
    error = None
    try:
        yield
    except USER_ERRORS as exc:
        error = exc
    raise_first(all_gather_object(error))


@contextlib.contextmanager
def main_rank_first(info: DistInfo):
    """The body runs on rank 0 first, then on the other ranks, which read what rank 0 cached (a dataset's index)
    instead of probing the files again. A user error on any rank is raised on every rank."""
    if not info.is_main:
        raise_first([broadcast_object(None)])  # rank 0's error is raised here, and the body skipped
    error = None
    try:
        yield
    except USER_ERRORS as exc:
        error = exc
    if info.is_main:
        raise_first([broadcast_object(error)])
    raise_first(all_gather_object(error))


# torchrun's launcher flags that the entry scripts accept as well, because the original NVlabs/CMD commands pass them
# to the script itself: (attribute, the spellings torchrun knows, type). core.config.build_arg_parser adds them to the
# parser; the relaunch forwards each one given under its first (underscore) spelling, which older torchruns read as
# well.
LAUNCHER_FLAGS = (
    ("nnodes", ("--nnodes",), positive_int),
    ("nproc_per_node", ("--nproc_per_node", "--nproc-per-node"), positive_int),
    ("node_rank", ("--node_rank", "--node-rank"), nonnegative_int),
    ("master_addr", ("--master_addr", "--master-addr"), str),
    ("master_port", ("--master_port", "--master-port"), port_int),
    ("rdzv_backend", ("--rdzv_backend", "--rdzv-backend"), str),
    ("rdzv_endpoint", ("--rdzv_endpoint", "--rdzv-endpoint"), str),
    ("rdzv_id", ("--rdzv_id", "--rdzv-id"), str),
    ("rdzv_conf", ("--rdzv_conf", "--rdzv-conf"), str),
    ("max_restarts", ("--max_restarts", "--max-restarts"), nonnegative_int),
)


class LaunchError(ValueError):
    """A launcher flag combination that cannot start the run; the message is one line naming the flag."""


def _check_multi_node(given: dict) -> None:
    """Several nodes must find each other; torchrun's defaults (127.0.0.1, node rank 0) would have every node wait
    for the others on its own loopback until the rendezvous times out, so refuse before starting anything."""
    nnodes = given["nnodes"]
    backend = given["rdzv_backend"] or "static"
    if backend != "static":
        if not given["rdzv_endpoint"]:
            raise LaunchError(f"--nnodes={nnodes} with --rdzv_backend={backend} needs --rdzv_endpoint=HOST:PORT "
                              "(an address of the first node that every node can reach)")
        return
    if not given["master_addr"] and not given["rdzv_endpoint"]:
        raise LaunchError(f"--nnodes={nnodes} needs --master_addr=HOST (the first node, with --node_rank on each node) "
                          "or --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT")
    node_rank = given["node_rank"]
    if node_rank is None:
        others = "1" if nnodes == 2 else f"1..{nnodes - 1}"
        raise LaunchError(f"--nnodes={nnodes} with static rendezvous needs --node_rank (0 on the --master_addr node, "
                          f"{others} on the others), or use --rdzv_backend=c10d")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node_rank={node_rank} is outside 0..{nnodes - 1} for --nnodes={nnodes}")


def _without_launcher_flags(argv: list) -> list:
    """argv less the launcher flags (`--flag=value` or `--flag value`): they go to torchrun, not to the workers."""
    names = {spelling for _, spellings, _ in LAUNCHER_FLAGS for spelling in spellings}
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in names:
            skip = "=" not in item
            continue
        kept.append(item)
    return kept


def torchrun_command(args, argv: list, script: str) -> list:
    """The torchrun command line that runs `script` with the launcher flags found in `args` (a parsed namespace).

    Raises LaunchError for several nodes without a way to find the first one.
    """
    given = {name: getattr(args, name, None) for name, _, _ in LAUNCHER_FLAGS}
    given["nnodes"] = given["nnodes"] or 1
    given["nproc_per_node"] = given["nproc_per_node"] or 1
    if given["nnodes"] > 1:
        _check_multi_node(given)
    launcher = [f"{spellings[0]}={given[name]}" for name, spellings, _ in LAUNCHER_FLAGS if given[name] is not None]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, script, *_without_launcher_flags(list(argv))]


def check_node_rank(args) -> None:
    """A node rank is a node's place among --nnodes nodes: without --nnodes, or outside 0..nnodes-1, the command
    would start a run that is not the node it was meant to be (a lone single-process run, or a rendezvous that never
    completes)."""
    node_rank, nnodes = getattr(args, "node_rank", None), getattr(args, "nnodes", None)
    if node_rank is None:
        return
    if nnodes is None:
        raise LaunchError(f"--node_rank={node_rank} needs --nnodes (the number of nodes it is one of)")
    if node_rank >= nnodes:
        raise LaunchError(f"--node_rank={node_rank} is outside 0..{nnodes - 1} for --nnodes={nnodes}")


def relaunch_with_torchrun_if_asked(args, argv=None) -> None:
    """NVlabs/CMD's commands run `python train_x.py --nnodes=N --nproc_per_node=G ...`; hand that to torchrun.

    Under torchrun already (or with a single process asked for) this does nothing. A launcher flag combination that
    cannot work ends the process with one line on stderr and exit code 2, like any other command-line error.
    """
    nproc = getattr(args, "nproc_per_node", None)
    nnodes = getattr(args, "nnodes", None)
    if "LOCAL_RANK" in os.environ:
        return
    try:
        check_node_rank(args)
        if (nproc or 1) <= 1 and (nnodes or 1) <= 1:
            return
        command = torchrun_command(args, sys.argv[1:] if argv is None else argv, sys.argv[0])
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print("relaunching under torchrun: " + " ".join(command), file=sys.stderr)
    os.execv(sys.executable, command)
