"""Checkpoints: state dicts and plain containers only, written atomically, loaded safely.

Saving writes a temporary file in the same folder, flushes it to disk, then
renames it over the target: a crash at any moment leaves either the old or the
new checkpoint, never a torn one. Loading uses `weights_only=True`, so a
crafted pickle cannot run code, and a strict state-dict load whose failure
names the first mismatching parameter.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from capsnet.errors import CheckpointError


TMP_SUFFIX = ".tmp"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically; a full disk leaves the previous file intact and says so in one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(e):
            raise CheckpointError(f"no space left on {mount_point(path.parent)} while writing {path} (the previous "
                                  f"{path.name}, if any, is intact): free some space and rerun the same command "
                                  "to resume") from None
        raise


def _is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "file write failed" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def mount_point(folder: Path) -> Path:
    folder = Path(folder).absolute()
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete the temporary files of saves that were killed (`.<name>.pt.<random>.tmp`, written by
    `save_checkpoint` only; the checkpoints themselves are intact). Other files are left alone."""
    for tmp in Path(folder).glob(f".*.pt.*{TMP_SUFFIX}"):
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
        if not found:
            why = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(e))
            raise CheckpointError(f"{path} uses pickle features that safe loading does not read "
                                  f"({why.group(1) if why else 'unpickling failed'}: e.g. a pickle protocol "
                                  "other than torch.save's default); save it with torch.save's defaults, "
                                  "or use checkpoints/last.pt or best.pt") from None
        raise CheckpointError(f"{path} holds objects other than tensors and plain containers, refused "
                              f"unread (it names {found.group(1)}); load only checkpoints written by capsnet") from None
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
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: its 'model' entry is a {type(state_dict).__name__}, not a state dict; "
                              "use a checkpoint written by train.py")
    for name, tensor in own.items():
        if name in state_dict and not isinstance(state_dict[name], torch.Tensor):
            raise CheckpointError(f"{source}: parameter '{name}' is a {type(state_dict[name]).__name__}, not a "
                                  "tensor; the file is damaged or not a capsnet checkpoint")
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
