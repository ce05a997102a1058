"""Process-group set-up for every way a run is started, and the few collectives the training loop needs.

The launchers (`deepspeed`, `torchrun`, `srun`) set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT,
or SLURM's variables. A plain `python launch/train.py` sets none: it is then a single-process run, and the
variables are filled in here (DeepSpeed would otherwise try MPI discovery and fail).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    head = re.match(r"[^,\[]+(\[[^\]]*\])?", nodelist.strip()).group(0)
    if "[" not in head:
        return head
    prefix, ranges = head[:-1].split("[", 1)
    return prefix + ranges.split(",")[0].split("-")[0]


def launcher_environment(env: dict[str, str]) -> dict[str, str]:
    """The distributed variables to add to `env` (launcher's, else SLURM's, else a single local process)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        extra = {}
        if "LOCAL_RANK" not in env:
            extra["LOCAL_RANK"] = env["RANK"]
        return extra
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return {
            "RANK": env["SLURM_PROCID"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost")),
            "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000),
        }
    return {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT") or str(_free_port()),
    }


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of this rank among the `visible` ones.

    One task per GPU under srun sees either all the node's GPUs (index = local rank) or, where the site binds GPUs
    to tasks (`--gpu-bind`, `--gpus-per-task=1`), only its own (index 0).
    """
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise RuntimeError(
        f"LOCAL_RANK {local_rank} but {visible} GPUs are visible to this process: start one "
        "process per GPU (srun --ntasks-per-node equal to --gpus-per-node)"
    )


def init_distributed() -> Topology:
    """Fill in missing launcher variables, start the process group through DeepSpeed, pin this rank's GPU."""
    import deepspeed
    import torch

    os.environ.update(launcher_environment(dict(os.environ)))
    topology = Topology(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(cuda_index(topology.local_rank, torch.cuda.device_count()))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return topology


def device_for(topology: Topology):
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", cuda_index(topology.local_rank, torch.cuda.device_count()))


def _default_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(values: list[float], device=None) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, one collective)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device or _default_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value, source: int = 0):
    """Rank `source`'s `value` on every rank (a decision one rank makes for all, e.g. which checkpoint to resume)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def gather_objects(value, destination: int = 0) -> list | None:
    """Every rank's `value` in rank order on rank `destination` (None elsewhere); [value] in a single process."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    holder = [None] * dist.get_world_size() if dist.get_rank() == destination else None
    dist.gather_object(value, holder, dst=destination)
    return holder


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank if `error` is set on any rank.

    Work that only some ranks do (rank 0 writing files) must not fail silently while the others wait at the next
    barrier until the collective timeout: every rank learns of the failure and stops.
    """
    failed = all_reduce_sum([1.0 if error is not None else 0.0])[0]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"another rank failed while {what}; see its error above")
