"""Readers of datasets in their authors' own on-disk formats (SPEC section 5).

Each reader module (`affnist`, `smallnorb`, `svhn`, `cifar10`) exposes the same
small surface, so the code that holds data in memory needs no per-dataset branch:

- `read(root, split, download=False) -> RawSplit`, split "train" or "test";
- `FOLDER`: the sub-folder of `root` that holds the files;
- `CLASSES`: the class names, in label order;
- `expected_files(split)`: the files read, for messages;
- `RESOURCES`: split -> the official downloads (`download.Resource`).

The readers parse the bytes themselves with numpy (no torchvision class): they
need no checksum before reading (torchvision's SVHN insists on one), never
unpickle (CIFAR-10's python version executes code when loaded), and whole
splits come back in one vectorised reshape, without a loop over images.
"""

from __future__ import annotations

from pathlib import Path

from capsnet.data.source import RawSplit  # noqa: F401  (the readers' return type)
from capsnet.errors import DatasetError

SPLITS = ("train", "test")


def check_split(name: str, split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"{name}: unknown split {split!r}: use 'train' or 'test'")
    return split


def not_found(name: str, folder: Path, files: list[str]) -> DatasetError:
    """The one-line error for a dataset absent from disk, with both ways to fix it."""
    return DatasetError(f"{name} not found in {folder} (expected {', '.join(files)}): set dataset.root "
                        "(or CAPSNET_DATA) to a folder that holds it, or allow dataset.download=true")


def malformed(name: str, path: Path, problem: str) -> DatasetError:
    """The one-line error for a file that is there but cannot be what it claims to be."""
    problem = " ".join(str(problem).split())  # library messages may span lines
    return DatasetError(f"{name}: {path} {problem}; delete it and download it again "
                        "(dataset.download=true) or copy a good copy there")


def check_labels(name: str, path: Path, labels, num_classes: int) -> None:
    """Labels outside 0..num_classes-1 mean a corrupted or foreign label file."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise malformed(name, path, f"holds label {int(bad)}, outside the {num_classes} classes "
                                    f"0..{num_classes - 1}")


def _readers() -> dict:
    from capsnet.data.readers import affnist, cifar10, smallnorb, svhn

    return {"affnist": affnist, "smallnorb": smallnorb, "svhn": svhn, "cifar10": cifar10}


def __getattr__(attr: str):
    # READERS is built on first use: the reader modules import this module for RawSplit.
    if attr == "READERS":
        return _readers()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
