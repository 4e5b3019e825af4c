"""Process-group helpers for DistributedDataParallel, after facebookresearch/mae's util/misc.py.

Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) or,
under Slurm/submitit, from submitit's description of the job; NCCL on CUDA,
gloo on CPU. A single process needs no process group at all.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def _export_slurm_env() -> None:
    """Under submitit with several tasks, turn Slurm's variables into torchrun's."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    try:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except (ImportError, RuntimeError):
        return


def init_distributed(device_type: str, timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Join the process group when launched with several processes; returns (rank, world, local_rank).

    `timeout_s` bounds collective waits, so a dead peer makes the others fail
    instead of hanging forever.
    """
    _export_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        _import_group_defaults()
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, local


def _import_group_defaults() -> None:
    """Import torch.distributed.nn before the process group exists. Its functions take `group=group.WORLD` as a
    default argument, evaluated at import: imported after init_process_group (torchvision imports it through
    torch._dynamo when a data source first loads it) they hold the group past destroy_process_group, so its
    gloo threads outlive it, and a process exiting beside them was seen to abort ("terminate called without an
    active exception") while its peer closed its sockets."""
    import torch.distributed.nn  # noqa: F401


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (identity for one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def union_of_keys(keys) -> list:
    """The sorted union of every process's keys (every process must call this). A process whose shard of an
    evaluation set is empty (fewer images than processes) has summed nothing; it learns the others' keys
    here, so it joins their sum with zeros instead of leaving them waiting for it."""
    keys = sorted(keys)
    if not is_distributed():
        return keys
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    return sorted(set().union(*gathered))


def any_process(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on at least one process (every process must call this)."""
    if not is_distributed():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait for every process (no-op for one). Before a clean exit, so that no rank tears the group down while
    another is still in a collective with it. (The abort at exit once blamed on that race had another cause:
    see `_import_group_defaults`.)"""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
