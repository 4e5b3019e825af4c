"""Datasets read from their authors' own files by `capsnet.data.readers`: affNIST, smallNORB, SVHN, CIFAR-10.

One class serves them all: the reader module named in the YAML file knows the
on-disk format, the folder below `root`, the classes and the official
downloads (SPEC section 5).
"""

from __future__ import annotations

import importlib

from capsnet.data.source import ImageDataset, RawSplit
from capsnet.errors import DatasetError

READERS = ("affnist", "smallnorb", "svhn", "cifar10")


class FileDataset(ImageDataset):
    """Args: reader: one of READERS; the rest: see `ImageDataset`."""

    def __init__(self, reader: str, name: str | None = None, **kwargs):
        if reader not in READERS:
            raise DatasetError(f"dataset.reader={reader} is unknown: choose one of {', '.join(READERS)}")
        self.reader = importlib.import_module(f"capsnet.data.readers.{reader}")
        super().__init__(name=name or reader, **kwargs)
        self.classes = tuple(self.reader.CLASSES)

    def read(self, split: str) -> RawSplit:
        return self.reader.read(self.root, split, download=self.download)
