"""Datasets read from their authors' own files by `capsnet.data.readers`: affNIST, smallNORB, SVHN, CIFAR-10.

One class serves them all: the reader module named in the YAML file knows the
on-disk format, the folder below `root`, the classes and the official
downloads (SPEC section 5).
"""

from __future__ import annotations

from capsnet.data import readers
from capsnet.data.source import ImageDataset, RawSplit
from capsnet.errors import DatasetError


class FileDataset(ImageDataset):
    """Args: reader: a name of `capsnet.data.readers.READERS`; the rest: see `ImageDataset`."""

    def __init__(self, reader: str, name: str | None = None, **kwargs):
        known = readers.READERS
        if reader not in known:
            raise DatasetError(f"dataset.reader={reader} is unknown: choose one of {', '.join(known)}")
        self.reader = known[reader]
        super().__init__(name=name or reader, **kwargs)
        self.classes = tuple(self.reader.CLASSES)

    def read(self, split: str) -> RawSplit:
        return self.reader.read(self.root, split, download=self.download)
