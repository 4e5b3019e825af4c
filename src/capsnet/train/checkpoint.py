"""Checkpoints: state dicts and plain containers only, written atomically, loaded safely.

Saving writes a temporary file in the same folder, flushes it to disk, then
renames it over the target: a crash at any moment leaves either the old or the
new checkpoint, never a torn one. Loading uses `weights_only=True`, so a
crafted pickle cannot run code, and a strict state-dict load whose failure
names the first mismatching parameter.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from capsnet.errors import CheckpointError


def save_checkpoint(state: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete temporary files left by a save that was killed (the checkpoints themselves are intact)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict; a one-line CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check trainer.resume")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a bare pickle
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (unknown file format): "
                              "use a checkpoints/last.pt or best.pt written by train.py")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it names {found.group(1)}" if found else "unsafe content"
        raise CheckpointError(f"{path} holds objects other than tensors and plain containers, refused "
                              f"unread ({what}); load only checkpoints written by capsnet") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}); "
                              "it may be truncated: use another file or trainer.resume=null") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a capsnet checkpoint (no 'model' state dict): "
                              "use a checkpoints/last.pt or best.pt written by train.py")
    return state


def load_model_state(model: nn.Module, state_dict: dict, source: str) -> None:
    """Strict load; a mismatch names the first offending parameter and the fix."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state_dict:
            raise CheckpointError(f"{source} is from another model: it lacks parameter '{name}'; "
                                  "resume with the model config it was trained with")
        if tuple(state_dict[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{source} is from another model: '{name}' has shape "
                                  f"{tuple(state_dict[name].shape)}, this model {tuple(tensor.shape)}; "
                                  "resume with the model config it was trained with")
    extra = [k for k in state_dict if k not in own]
    if extra:
        raise CheckpointError(f"{source} is from another model: unexpected parameter '{extra[0]}'; "
                              "resume with the model config it was trained with")
    model.load_state_dict(state_dict, strict=True)
