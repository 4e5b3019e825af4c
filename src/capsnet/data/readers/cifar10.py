"""CIFAR-10 (Krizhevsky 2009), binary version: 32x32 colour images in 10 classes (SPEC 5.5).

Only the binary version is read: the python version is a pickle, and loading
a pickle runs code from the file. The official capsule code reads the binary
version too. Each file is a run of 3,073-byte records: one label byte, then
the 1,024 red, 1,024 green and 1,024 blue bytes of a row-major 32x32 image,
so a whole file is one reshape to (N, 3073) and a slice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from capsnet.data.readers import RawSplit, check_labels, check_split, malformed
from capsnet.data.readers.download import Resource, ensure

NAME = "CIFAR-10"
FOLDER = "CIFAR10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SUBFOLDER = "cifar-10-batches-bin"
SIZE = 32
RECORD = 1 + 3 * SIZE * SIZE

_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
# The Toronto page publishes md5 c32a1d4ab5d03f1284b67883e8d87530 for this archive;
# tensorflow-datasets' url_checksums/cifar10.txt the sha256 below (170,052,171 bytes).
_ARCHIVE = Resource("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                    "sha256:c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", "tar.gz",
                    tuple(f"{SUBFOLDER}/{f}" for f in (*_FILES["train"], *_FILES["test"])))
RESOURCES = {"train": (_ARCHIVE,), "test": (_ARCHIVE,)}


def expected_files(split: str) -> list[str]:
    check_split(NAME, split)
    return [f"{SUBFOLDER}/{f}" for f in _FILES[split]]


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch file: (images uint8 [N, 3, 32, 32], labels int64 [N])."""
    size = path.stat().st_size
    if size == 0 or size % RECORD:
        raise malformed(NAME, path, f"has {size} bytes, not a whole number of {RECORD}-byte records "
                                    "(1 label + 3,072 pixels)")
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    check_labels(NAME, path, labels, len(CLASSES))
    return records[:, 1:].reshape(-1, 3, SIZE, SIZE), labels


def read(root: str | Path, split: str, download: bool = False) -> RawSplit:
    """CIFAR-10 `split`: images uint8 [N, 3, 32, 32], labels int64 [N]."""
    check_split(NAME, split)
    folder = Path(root) / FOLDER
    paths = [folder / SUBFOLDER / f for f in _FILES[split]]
    ensure(RESOURCES[split], folder, dataset=NAME, expected=expected_files(split),
           present=lambda: all(p.is_file() for p in paths), allow=download)
    parts = [read_batch(p) for p in paths]
    images = np.concatenate([im for im, _ in parts])  # also makes the strided slices contiguous
    labels = np.concatenate([lb for _, lb in parts])
    return RawSplit(torch.from_numpy(images), torch.from_numpy(labels), {})
