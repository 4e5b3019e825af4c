"""The process group's life: joined by `init_distributed`, gone after `cleanup`, threads and all."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch


def _thread_names() -> list[str]:
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))


def _join_load_and_leave(rank: int, world: int, port: int, out_dir: Path) -> None:
    """One process: join, import torchvision as a data source does once the group exists, sum, leave."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    from capsnet.train import distributed

    distributed.init_distributed("cpu", timeout_s=60)
    during = _thread_names()
    import torchvision  # noqa: F401  (imports torch.distributed.nn through torch._dynamo)

    total = distributed.all_reduce_sum(torch.ones(1)).item()
    distributed.barrier()
    distributed.cleanup()
    (out_dir / f"{rank}.json").write_text(json.dumps({"sum": total, "during": during, "after": _thread_names()}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
def test_cleanup_leaves_no_gloo_thread_behind(tmp_path):
    """destroy_process_group must really free the group: a module imported after init_process_group that keeps it
    in a default argument (torch.distributed.nn, through torchvision) left its gloo threads running into the
    interpreter's exit, where one eval.py process under torchrun aborted now and then."""
    world = 2
    torch.multiprocessing.spawn(_join_load_and_leave, args=(world, _free_port(), tmp_path), nprocs=world)
    for rank in range(world):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["sum"] == world
        assert any("gloo" in name for name in got["during"]), got  # what the test looks for is there to see
        assert not [name for name in got["after"] if "gloo" in name], (rank, got["after"])
