"""Process-group setup from torchrun's environment, or a single plain process."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def relaunch_with_torchrun_if_asked(args, argv=None) -> None:
    """The seed README runs `python train_x.py --nnodes=N --nproc_per_node=G ...`; hand that to torchrun.

    Under torchrun already (or with a single process asked for) this does nothing.
    """
    nproc = getattr(args, "nproc_per_node", None)
    nnodes = getattr(args, "nnodes", None)
    if "LOCAL_RANK" in os.environ or ((nproc or 1) <= 1 and (nnodes or 1) <= 1):
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in ("--nnodes", "--nproc_per_node", "--nproc-per-node"):
            skip = "=" not in item
            continue
        kept.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes or 1}",
               f"--nproc_per_node={nproc or 1}", sys.argv[0], *kept]
    print("relaunching under torchrun: " + " ".join(command), file=sys.stderr)
    os.execv(sys.executable, command)
