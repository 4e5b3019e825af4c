"""Guards around a run directory: a resume continues the same run, and one process owns the directory.

A checkpoint records the resolved config it was trained with. `trainer.resume`
may only continue a run whose defining settings are the same: a sweep with a
fixed out_dir must not let job 1 "resume" job 0's finished checkpoint and
report job 0's numbers as its own. Settings that do not change what is
trained (the epoch budget, logging, the data folder, workers) may differ.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from capsnet.errors import CapsnetError

# Keys a resumed run may change: how long, where from, how it reports; not what it trains.
MAY_DIFFER = ("out_dir", "trainer.epochs", "trainer.steps", "trainer.resume", "trainer.progress", "trainer.log_every",
              "trainer.ckpt_every_steps", "trainer.num_workers", "trainer.threads", "trainer.dist_timeout_s",
              "trainer.stop_at", "trainer.eval_batch_size", "trainer.allocator", "trainer.device",
              "trainer.keep_checkpoints", "dataset.root", "dataset.download", "optim.fused",
              "optim.optimizer.fused", "routing.kernel", "model.primary.kernel")


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def first_difference(stored: dict, current: dict) -> tuple[str, object, object] | None:
    """(key, stored value, current value) of the first defining setting that differs, or None."""
    a, b = _flat(stored), _flat(current)
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in MAY_DIFFER):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return key, a.get(key, "<absent>"), b.get(key, "<absent>")
    return None


def check_same_run(ckpt: dict, cfg: DictConfig, path: Path) -> None:
    """Refuse, in one line, to resume from a checkpoint of a run with other settings."""
    if "config" not in ckpt:  # not written by a run; the model and training-state checks judge it
        return
    current = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    diff = first_difference(ckpt["config"], current)
    if diff is not None:
        key, old, new = diff
        raise CapsnetError(f"{path} belongs to another run ({key}={old} there, {key}={new} here): resume with the "
                           "same settings (trainer.epochs may change), or start afresh with trainer.resume=null "
                           "or another out_dir")


class RunLock:
    """An exclusive lock on a run directory (`.lock`), held while the run lives; freed by the OS if it dies."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise CapsnetError(f"the run directory {folder} is in use by {holder}: wait for that run to end, "
                               "or give this one another out_dir") from None
        os.ftruncate(self.fd, 0)
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.pwrite(self.fd, f"process {os.getpid()} on {socket.gethostname()} (since {since})".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()
