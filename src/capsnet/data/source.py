"""Data sources: named splits held in memory, each with its own transforms.

A data source (`ImageDataset`) reads its files once and offers `train()`, the
training split, and `evals()`, the named evaluation sets ({"test": ...}, plus
"val" when `val_size` holds out training images, plus any `extra_evals` such
as affNIST for a model trained on expanded MNIST). A split (`Split`) yields
raw uint8 items for a batch of indices and epoch; its `transforms` (batched,
seeded from (seed, epoch, index): `capsnet.data.transforms`) turn them into
model inputs in the loader. A new dataset is one subclass that implements
`read(split)`, plus one YAML file in configs/dataset/.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from capsnet.data.transforms import RandomShift, Transforms
from capsnet.errors import DatasetError


class RawSplit(NamedTuple):
    """A split as read from its files: images uint8 [N, C, H, W], labels [N] (or [N, K]), per-image info."""

    images: torch.Tensor
    labels: torch.Tensor
    info: dict = {}


class Split:
    """Images and labels in memory; `get` indexes them (generated datasets override it)."""

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor, targets: dict | None = None,
                 transforms=()):
        self.name, self.images, self.labels = name, images, labels
        self.targets = dict(targets or {})
        self.transforms = transforms if isinstance(transforms, Transforms) else Transforms(transforms)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, idx: torch.Tensor, epoch: int = 0):
        """(images uint8 [b, C, H, W], labels, targets {name: [b, ...]}) of the items `idx`."""
        return self.images[idx], self.labels[idx], {k: v[idx] for k, v in self.targets.items()}

    @property
    def raw_shape(self) -> tuple:
        return tuple(self.get(torch.arange(1))[0].shape[1:])

    @property
    def in_shape(self) -> tuple:
        """The shape of a model input: the raw shape through the split's transforms."""
        return self.transforms.out_shape(self.raw_shape)


def _to_uint8_nchw(images) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dim() == 3:  # [N, H, W] (MNIST): one channel
        x = x.unsqueeze(1)
    return x.contiguous()


class ImageDataset:
    """Base of the file-backed datasets: subsets, a seeded validation hold-out, per-split transforms.

    Args:
        name: the dataset's name in outputs and reports.
        root: data folder; download: fetch the files when absent.
        train_subset / test_subset: use only the first N images (None: all).
        val_size: hold out N training images (chosen by `seed`) as the evaluation set "val".
        train_transforms / eval_transforms: lists of `capsnet.data.transforms` objects.
        shift: a random shift of up to `shift` pixels after the train_transforms (the paper's
            only MNIST augmentation, section 5); 0: none.
        image_shape: the [C, H, W] the files must hold (null: any); a file header that describes
            other images is refused rather than trained on.
        extra_evals: {name: another data source}: its test split is evaluated too (e.g. affNIST).
        seed: the run's seed (passed when the run builds its data).
    """

    classes: tuple = ()

    def __init__(self, name: str, root: str = "data", download: bool = True, train_subset: int | None = None,
                 test_subset: int | None = None, val_size: int = 0, train_transforms=(), eval_transforms=(),
                 shift: int = 0, extra_evals: dict | None = None, seed: int = 0, image_shape=None):
        self.name, self.root, self.download, self.seed = name, str(root), download, seed
        self.subsets = {"train": train_subset, "test": test_subset}
        for key, n in (("train_subset", train_subset), ("test_subset", test_subset)):
            if n is not None and n < 1:
                raise DatasetError(f"dataset.{key}={n} must be a positive number of images or null (all)")
        if val_size < 0:
            raise DatasetError(f"dataset.val_size={val_size} must be >= 0 (0: no validation set)")
        self.val_size = val_size
        if int(shift) != shift or shift < 0:
            raise DatasetError(f"dataset.shift={shift} must be a whole number of pixels >= 0")
        self.train_transforms = list(train_transforms) + ([RandomShift(shift)] if shift else [])
        self.eval_transforms = list(eval_transforms)
        self.extra_evals = dict(extra_evals or {})
        self.image_shape = tuple(image_shape) if image_shape else None
        self._cache: dict = {}

    # --- what a subclass provides ----------------------------------------------------------------
    def read(self, split: str) -> RawSplit:
        """Read "train" or "test" from the files (uint8 images [N, C, H, W], int64 labels [N])."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self._raw("train").labels.max()) + 1

    # --- splits ----------------------------------------------------------------------------------
    def _raw(self, split: str) -> RawSplit:
        if split not in self._cache:
            images, labels, info = self.read(split)
            images, labels = _to_uint8_nchw(images), torch.as_tensor(labels)
            self._cache[split] = self._checked(RawSplit(images, labels, info), split)
        return self._cache[split]

    def _checked(self, raw: RawSplit, split: str) -> RawSplit:
        images, labels, info = raw
        if len(images) != len(labels):
            raise DatasetError(f"{self.name} {split}: {len(images)} images but {len(labels)} labels; "
                               "the files are inconsistent, download them again")
        if self.image_shape and tuple(images.shape[1:]) != self.image_shape:
            raise DatasetError(f"{self.name} {split}: the files hold images of shape {tuple(images.shape[1:])}, not "
                               f"{self.image_shape}: their header does not describe {self.name}; download them again")
        k = len(self.classes) or None
        if k is not None and labels.dim() == 1 and len(labels) and (labels.min() < 0 or labels.max() >= k):
            bad = labels[(labels < 0) | (labels >= k)][0].item()
            raise DatasetError(f"{self.name} {split}: label {bad} outside the {k} classes 0..{k - 1}; "
                               "the label file is corrupted, download it again")
        n = self.subsets[split]
        if n is not None:
            if n > len(images):
                raise DatasetError(f"dataset.{split}_subset={n} is larger than the {len(images)} "
                                   f"{split} images of {self.name}: use at most {len(images)} or null")
            images, labels, info = images[:n], labels[:n], {key: v[:n] for key, v in info.items()}
        return RawSplit(images, labels, info)

    def _train_and_val(self):
        """(indices kept for training, indices held out) of the training split; (None, None) without val_size."""
        if not self.val_size:
            return None, None
        images, labels, _ = self._raw("train")
        if self.val_size >= len(labels):
            raise DatasetError(f"dataset.val_size={self.val_size} leaves no training image of the "
                               f"{len(labels)}: use fewer")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        return order[self.val_size:].sort().values, order[:self.val_size].sort().values

    def train(self) -> Split:
        if "split:train" in self._cache:
            return self._cache["split:train"]
        images, labels, _ = self._raw("train")
        keep, _ = self._train_and_val()
        if self.val_size:
            images, labels = images[keep], labels[keep]
        self._cache["split:train"] = Split("train", images, labels, transforms=self.train_transforms)
        return self._cache["split:train"]

    def evals(self) -> dict:
        """The evaluation sets by name: "val" (if held out), "test", then the extra ones; checked to agree
        with the training split in input shape and classes."""
        if "splits:evals" not in self._cache:
            sets = self.own_evals()
            for name, other in self.extra_evals.items():
                sets[name] = other.own_evals()["test"]
                sets[name].name = name
            self._check_agree(sets)
            self._cache["splits:evals"] = sets
        return self._cache["splits:evals"]

    def own_evals(self) -> dict:
        """"val" (if held out) and "test" of this dataset's own files."""
        sets = {}
        _, val = self._train_and_val()
        if val is not None:
            images, labels, _ = self._raw("train")
            sets["val"] = Split("val", images[val], labels[val], transforms=self.eval_transforms)
        test = self._raw("test")
        sets["test"] = Split("test", test.images, test.labels, transforms=self.eval_transforms)
        return sets

    def _check_agree(self, sets: dict) -> None:
        shape, k = self.in_shape, self.num_classes
        for name, split in sets.items():
            if split.in_shape != shape:
                raise DatasetError(f"the evaluation set '{name}' gives inputs of shape {split.in_shape}, training "
                                   f"gives {shape}: make dataset.eval_transforms produce {shape}")
            labels = split.labels
            top = int(labels.max()) if labels.dim() == 1 and len(labels) else k - 1
            if top >= k:
                raise DatasetError(f"the evaluation set '{name}' has label {top}, outside the {k} training "
                                   "classes: evaluate it with a model of its own classes")

    @property
    def in_shape(self) -> tuple:
        return self.train().in_shape
