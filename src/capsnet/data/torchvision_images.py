"""Datasets read by torchvision's classes (their own layout and download logic): MNIST, Fashion-MNIST, ...

One adapter serves the classes that take `train=` (MNIST) and those that take
`split=` (SVHN-style); the arrays they load become uint8 [N, C, H, W].
"""

from __future__ import annotations

import contextlib
import inspect
import io
from pathlib import Path

import torch
from hydra.utils import get_class

from capsnet.data.source import ImageDataset, RawSplit
from capsnet.errors import DatasetError

# What a torchvision class raises on files it cannot parse (truncated, wrong header, wrong size).
_MALFORMED = (RuntimeError, ValueError, OSError, EOFError, AssertionError, IndexError)


class TorchvisionImages(ImageDataset):
    """A torchvision image dataset (e.g. `torchvision.datasets.MNIST`) loaded whole into memory.

    Args:
        dataset: import path of the torchvision dataset class.
        (the rest: see `ImageDataset`)
    """

    def __init__(self, dataset: str, name: str | None = None, **kwargs):
        self.cls = get_class(dataset)
        super().__init__(name=name or self.cls.__name__, **kwargs)
        self.classes = tuple(getattr(self.cls, "classes", ()) or ())

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.cls.__name__ / "raw"

    def _expected_files(self) -> str:
        resources = getattr(self.cls, "resources", [])
        names = [Path(url).name.removesuffix(".gz") for url, _ in resources]
        return ", ".join(names) if names else "its files"

    def _open(self, split: str, download: bool):
        params = inspect.signature(self.cls.__init__).parameters
        which = {"train": split == "train"} if "train" in params else {"split": split}
        return self.cls(self.root, download=download, **which)

    def read(self, split: str) -> RawSplit:
        try:
            ds = self._open(split, download=False)
        except RuntimeError as e:
            if "not found" not in str(e).lower():
                raise DatasetError(f"{self.name}: cannot read the files in {self.folder}: {e}; "
                                   "delete them and download again") from None
            ds = self._download(split)
        except _MALFORMED as e:
            raise DatasetError(f"{self.name}: a data file in {self.folder} is malformed "
                               f"({type(e).__name__}: {e}); delete the folder and download again") from None
        labels = getattr(ds, "targets", getattr(ds, "labels", None))
        return RawSplit(torch.as_tensor(ds.data), torch.as_tensor(labels, dtype=torch.long), {})

    def _download(self, split: str):
        hint = (f"{self.name} not found in {self.folder} (expected {self._expected_files()}): "
                "set dataset.root (or CAPSNET_DATA) to a folder that holds it")
        if not self.download:
            raise DatasetError(hint + ", or allow dataset.download=true")
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return self._open(split, download=True)
        except Exception as e:
            raise DatasetError(f"{hint}; the download failed ({type(e).__name__}), "
                               "so copy the files there by hand if this machine is offline") from None
