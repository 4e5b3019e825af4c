"""Image classification data held in memory, batched and augmented as tensors.

The files are read by torchvision's datasets (their own layout and download
logic); training batches are built here, because the paper's augmentation, a
random shift of up to 2 pixels with zero padding (section 5), is much cheaper
on a whole batch of tensors than per image through PIL. The shift of every
image is drawn from (seed, epoch, image index), so an epoch is the same on 1
or N processes, with or without workers, and after a resume.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import torch
from hydra.utils import get_class
from torch.utils.data import DataLoader, DistributedSampler

from capsnet.errors import DatasetError


def _as_uint8_nchw(data) -> torch.Tensor:
    x = torch.as_tensor(data)
    if x.dim() == 3:  # MNIST-like [N, H, W]
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # CIFAR's [N, H, W, C]
        x = x.permute(0, 3, 1, 2)
    return x.contiguous()


class TorchvisionImages:
    """A torchvision image dataset (e.g. `torchvision.datasets.MNIST`) loaded whole into memory.

    Args:
        dataset: import path of the torchvision dataset class.
        root: data folder (torchvision's layout below it).
        download: fetch the files when absent.
        train_subset / test_subset: use only the first N images (None: all).
        shift: maximum random shift in pixels for training images (0: none).
    """

    def __init__(self, dataset: str, root: str, download: bool = True, train_subset: int | None = None,
                 test_subset: int | None = None, shift: int = 2, name: str | None = None):
        self.dataset_path, self.cls = dataset, get_class(dataset)
        self.root, self.download, self.shift = str(root), download, shift
        self.name = name or self.cls.__name__
        self.subsets = {True: train_subset, False: test_subset}
        for key, n in (("train_subset", train_subset), ("test_subset", test_subset)):
            if n is not None and n < 1:
                raise DatasetError(f"dataset.{key}={n} must be a positive number of images or null (all)")
        self._cache: dict = {}

    def split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8 [N, C, H, W], labels int64 [N]) of the training or test split."""
        if train not in self._cache:
            images, labels = self._read(train)
            self._cache[train] = self._check(images, labels, train)
        return self._cache[train]

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.split(False)[0].shape[1:])

    @property
    def num_classes(self) -> int:
        classes = getattr(self.cls, "classes", None)
        return len(classes) if classes else int(self.split(True)[1].max()) + 1

    def _expected_files(self) -> str:
        resources = getattr(self.cls, "resources", [])
        names = [Path(url).name.removesuffix(".gz") for url, _ in resources]
        return ", ".join(names) if names else "its files"

    def _read(self, train: bool):
        folder = Path(self.root) / self.cls.__name__ / "raw"
        try:
            ds = self.cls(self.root, train=train, download=False)
        except RuntimeError as e:
            if "not found" not in str(e).lower():
                raise DatasetError(f"{self.name}: cannot read the files in {folder}: {e}; "
                                   "delete them and download again") from None
            ds = self._download(train, folder)
        except Exception as e:  # truncated or corrupted files fail in many ways inside torchvision
            raise DatasetError(f"{self.name}: malformed data file in {folder} ({type(e).__name__}: {e}); "
                               "delete the folder and download again") from None
        labels = getattr(ds, "targets", getattr(ds, "labels", None))
        return _as_uint8_nchw(ds.data), torch.as_tensor(labels, dtype=torch.long)

    def _download(self, train: bool, folder: Path):
        hint = (f"{self.name} not found in {folder} (expected {self._expected_files()}): "
                "set dataset.root (or CAPSNET_DATA) to a folder that holds it")
        if not self.download:
            raise DatasetError(hint + ", or allow dataset.download=true")
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return self.cls(self.root, train=train, download=True)
        except Exception as e:
            raise DatasetError(f"{hint}; the download failed ({type(e).__name__}), "
                               "so copy the files there by hand if this machine is offline") from None

    def _check(self, images, labels, train: bool):
        split = "train" if train else "test"
        if len(images) != len(labels):
            raise DatasetError(f"{self.name} {split}: {len(images)} images but {len(labels)} labels; "
                               "the files are inconsistent, download them again")
        k = len(getattr(self.cls, "classes", []) or []) or None
        if k is not None and len(labels) and (labels.min() < 0 or labels.max() >= k):
            bad = labels[(labels < 0) | (labels >= k)][0].item()
            raise DatasetError(f"{self.name} {split}: label {bad} outside the {k} classes 0..{k - 1}; "
                               "the label file is corrupted, download it again")
        n = self.subsets[train]
        if n is not None:
            if n > len(images):
                raise DatasetError(f"dataset.{split}_subset={n} is larger than the {len(images)} "
                                   f"{split} images of {self.name}: use at most {len(images)} or null")
            images, labels = images[:n], labels[:n]
        return images, labels


def random_shift(images: torch.Tensor, offsets: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image [B, C, H, W] by its own (dy, dx) in offsets [B, 2], filling with zeros."""
    if max_shift == 0:
        return images
    b, c, h, w = images.shape
    p = max_shift
    padded = torch.nn.functional.pad(images, (p, p, p, p))
    rows = (torch.arange(h) + p - offsets[:, :1]).view(b, 1, h, 1)
    cols = (torch.arange(w) + p - offsets[:, 1:]).view(b, 1, 1, w)
    return padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]


class _EpochBatches(torch.utils.data.Dataset):
    """Batch k of one epoch: a map-style dataset, so DataLoader workers can build batches."""

    def __init__(self, images, labels, batches, offsets, shift):
        self.images, self.labels, self.batches, self.offsets, self.shift = images, labels, batches, offsets, shift

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        idx = self.batches[k]
        x = self.images[idx]
        if self.offsets is not None:
            x = random_shift(x, self.offsets[idx], self.shift)
        return x.float().div_(255), self.labels[idx]


class BatchLoader:
    """Yields (images float [B, C, H, W] in [0, 1], labels [B]) for this process's share of an epoch.

    Training: a `DistributedSampler` permutation (seed + epoch, the same on any
    number of processes), global batches split evenly across processes.
    Evaluation: each process takes every world_size-th image, no padding, so
    summed counts cover each test image exactly once.
    """

    def __init__(self, images, labels, batch_size: int, train: bool, seed: int = 0, shift: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
        self.images, self.labels, self.train, self.seed, self.shift = images, labels, train, seed, shift
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self.skip = 0, 0
        self.sampler = DistributedSampler(range(len(images)), num_replicas=world_size, rank=rank,
                                          shuffle=train, seed=seed) if train else None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch's permutation; skip its first batches when resuming mid-epoch."""
        self.epoch, self.skip = epoch, skip_batches
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _batches(self) -> list[torch.Tensor]:
        if self.sampler is None:
            idx = torch.arange(self.rank, len(self.images), self.world_size)
        else:
            idx = torch.tensor(list(self.sampler))
        return list(idx.split(self.batch_size))

    def __len__(self) -> int:
        if self.sampler is None:
            return math.ceil(len(range(self.rank, len(self.images), self.world_size)) / self.batch_size)
        return math.ceil(self.sampler.num_samples / self.batch_size)

    def __iter__(self):
        offsets = None
        if self.train and self.shift:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            offsets = torch.randint(-self.shift, self.shift + 1, (len(self.images), 2), generator=g)
        ds = _EpochBatches(self.images, self.labels, self._batches()[self.skip:], offsets, self.shift)
        if self.num_workers == 0:
            for k in range(len(ds)):
                yield ds[k]
            return
        yield from DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers,
                              pin_memory=self.pin_memory)
