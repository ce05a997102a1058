"""The hardware a run plans for: GPUs per node, nodes, memory per GPU, as given (`plan.*`, `--gpus`, `--gpu-mem`)
or detected (launcher and SLURM variables, torch.cuda).

`detect_hardware` is the planner's one impure step (it reads the environment and, unless told, asks torch.cuda,
imported lazily); everything else here is pure. See docs/planning.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from higgs_lora.config import RunConfig
from higgs_lora.plan.errors import PlanError
from higgs_lora.plan.memory import GIB


@dataclass(frozen=True)
class Hardware:
    """What the run has, per GPU and in all."""

    gpus_per_node: int
    nodes: int
    gpu_memory_bytes: int | None
    """None: no GPU (a CPU run); memory is not planned."""
    name: str = ""
    source: str = ""
    """How it was found ('given', 'torch.cuda + launcher', ...), for the printout."""

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


def parse_memory(text: str) -> int:
    """Bytes from '24GiB', '80GB', '16g', '40' (GiB when no unit)."""
    units = {"gib": GIB, "gb": 10**9, "g": GIB, "mib": 1024**2, "mb": 10**6, "tib": 1024**4}
    value = text.strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if value.endswith(unit):
            number, scale = value[: -len(unit)], units[unit]
            break
    else:
        number, scale = value, GIB
    try:
        amount = float(number)
    except ValueError:
        raise PlanError(f"cannot read GPU memory {text!r}; write e.g. 24GiB, 80GB or 40") from None
    if amount <= 0:
        raise PlanError(f"GPU memory {text!r} must be positive")
    return int(amount * scale)


def detect_hardware(
    cfg: RunConfig,
    env: dict[str, str] | None = None,
    cuda: tuple[int, int, str] | None = None,
    world_size: int | None = None,
) -> Hardware:
    """The hardware: what `plan.*` gives, else what the launcher / SLURM variables and torch.cuda say.

    `cuda` is (devices on this node, bytes per device, name), None to ask torch; `world_size` is the process
    group's (training), None for a dry run, which then plans what `plan.*`, SLURM or the visible GPUs describe.
    """
    env = dict(os.environ if env is None else env)
    if cuda is None:
        cuda = _cuda_info()
    count, memory, name = cuda
    sources = []
    # Ranks per node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, SLURM's; nodes: SLURM's,
    # the deepspeed launcher's CROSS_SIZE. Without them a CPU run (no GPU to count) would read 2 ranks as 2 nodes.
    per_node = (
        cfg.plan.gpus_per_node
        or _int(env.get("LOCAL_WORLD_SIZE"))
        or _int(env.get("LOCAL_SIZE"))
        or _slurm_tasks_per_node(env)
        or count
        or 1
    )
    nodes = (
        cfg.plan.nodes or _int(env.get("SLURM_NNODES")) or _int(env.get("NNODES")) or _int(env.get("CROSS_SIZE")) or 1
    )
    if world_size is not None and world_size != per_node * nodes:
        # The process group is the truth in a running job; derive nodes from it.
        nodes = max(1, world_size // per_node) if world_size % per_node == 0 else 1
        per_node = world_size // nodes
    sources.append("given" if cfg.plan.gpus_per_node or cfg.plan.nodes else "launcher/SLURM/torch.cuda")
    if cfg.plan.gpu_memory_gib:
        memory_bytes: int | None = int(cfg.plan.gpu_memory_gib * GIB)
        name = name or "GPU"
        sources.append("memory given")
    elif count:
        memory_bytes = memory
        sources.append("memory from torch.cuda")
    else:
        memory_bytes = None
        name = "CPU"
    return Hardware(
        gpus_per_node=per_node, nodes=nodes, gpu_memory_bytes=memory_bytes, name=name, source=", ".join(sources)
    )


def describe_hardware(hardware: Hardware) -> str:
    if hardware.gpu_memory_bytes is None:
        return f"{hardware.world_size} CPU process{'es' if hardware.world_size > 1 else ''} (memory not planned)"
    return (
        f"{hardware.nodes} node(s) x {hardware.gpus_per_node} x {hardware.name or 'GPU'} "
        f"{hardware.gpu_memory_bytes / GIB:.1f} GiB ({hardware.source})"
    )


def _cuda_info() -> tuple[int, int, str]:
    try:
        import torch
    except ImportError:
        return 0, 0, ""
    if not torch.cuda.is_available():
        return 0, 0, ""
    props = torch.cuda.get_device_properties(0)
    return torch.cuda.device_count(), int(props.total_memory), props.name


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _slurm_tasks_per_node(env: dict[str, str]) -> int:
    """Tasks per node from SLURM ('8' or '8(x2)'), else its GPUs on this node."""
    tasks = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    head = tasks.split("(")[0].split(",")[0]
    return _int(head) or _int(env.get("SLURM_GPUS_ON_NODE")) or _int(env.get("SLURM_GPUS_PER_NODE", "").split(":")[-1])
