"""affNIST (Tieleman): MNIST digits under random affine maps on a 40x40 canvas (paper section 5.2).

The paper trains on expanded MNIST and tests on affNIST's transformed test set
(32 batches of 10,000). The files are MATLAB v5: one variable `affNISTdata`,
a 1x1 struct whose fields are read by name (SPEC 5.2): `image` is uint8
1600 x N, one column per image, each column a row-major 40x40 image, so
`image.T.reshape(-1, 40, 40)` is the digit upright (tensorflow-datasets reads
it the same way); `label_int` is 1 x N.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from capsnet.data.readers import RawSplit, check_labels, check_split, malformed
from capsnet.data.readers.download import Resource, ensure

NAME = "affNIST"
FOLDER = "affNIST"
CLASSES = tuple(str(d) for d in range(10))
SIZE = 40

_BASE = "https://www.cs.toronto.edu/~tijmen/affNIST/32x/transformed/"
# sha256 from tensorflow-datasets' url_checksums/affnist.txt. The page's
# training_and_validation_batches.zip has no published checksum, so the train
# split downloads its two verified halves instead (together the same images).
RESOURCES = {
    "test": (Resource(_BASE + "test_batches.zip",
                      "sha256:83f829c01c021fa731e062e7671b0075a3e8de0a511fb6b5d403458528d0e0d1",
                      "zip", tuple(f"test_batches/{i}.mat" for i in range(1, 33))),),
    "train": (Resource(_BASE + "training_batches.zip",
                       "sha256:b6aa79e6d659111ff4c704c241cc86b828e468a5d6f7a1c5b888e6a3af3b3963",
                       "zip", ("training_batches/1.mat",)),
              Resource(_BASE + "validation_batches.zip",
                       "sha256:c613d7718fd93f1fb2f6a90cc18b97f6ec2b76929559374f79aa7081bdfd358c",
                       "zip", ("validation_batches/1.mat",))),
}

# The layouts the Toronto page offers for each split, in order of preference:
# a folder of numbered batches, or one big .mat. Every member of a layout must be there.
LAYOUTS = {
    "test": (("test_batches/",), ("test.mat",)),
    "train": (("training_and_validation_batches/",), ("training_batches/", "validation_batches/"),
              ("training_and_validation.mat",), ("training.mat",)),
}


def expected_files(split: str) -> list[str]:
    check_split(NAME, split)
    first, *others = [" + ".join(m + "*.mat" if m.endswith("/") else m for m in lay) for lay in LAYOUTS[split]]
    return [f"{first} (or {' or '.join(others)})"]


def _numbered(folder: Path) -> list[Path]:
    """The batch files 1.mat, 2.mat, ... in numeric order (a plain sort puts 10 before 2)."""
    def key(p: Path):
        digits = re.findall(r"\d+", p.stem)
        return (int(digits[-1]) if digits else -1, p.name)
    return sorted(folder.glob("*.mat"), key=key)


def source_files(folder: Path, split: str) -> list[Path]:
    """The .mat files of the first complete layout found, in reading order ([] if none)."""
    for layout in LAYOUTS[split]:
        files = []
        for member in layout:
            found = _numbered(folder / member) if member.endswith("/") else (
                [folder / member] if (folder / member).is_file() else [])
            if not found:
                break
            files += found
        else:
            return files
    return []


def _read_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        struct = loadmat(path, variable_names=["affNISTdata"]).get("affNISTdata")
    except Exception as e:  # truncated or foreign files fail in many ways inside scipy
        raise malformed(NAME, path, f"is not a readable MATLAB v5 file ({type(e).__name__}: {e})") from None
    names = getattr(getattr(struct, "dtype", None), "names", None) or ()
    if struct is None or struct.size != 1 or not {"image", "label_int"} <= set(names):
        raise malformed(NAME, path, "holds no 1x1 struct affNISTdata with fields image and label_int")
    image, labels = struct["image"].flat[0], np.asarray(struct["label_int"].flat[0]).reshape(-1)
    if image.ndim != 2 or image.shape[0] != SIZE * SIZE or image.dtype != np.uint8:
        raise malformed(NAME, path, f"has an image field of {image.dtype} {image.shape}, expected "
                                    f"uint8 {SIZE * SIZE} x N")
    if labels.size != image.shape[1]:
        raise malformed(NAME, path, f"has {image.shape[1]} images but {labels.size} labels")
    labels = labels.astype(np.int64)
    check_labels(NAME, path, labels, len(CLASSES))
    return image.T.reshape(-1, SIZE, SIZE), labels


def read(root: str | Path, split: str, download: bool = False) -> RawSplit:
    """affNIST's transformed `split`: images uint8 [N, 1, 40, 40], labels int64 [N]."""
    check_split(NAME, split)
    folder = Path(root) / FOLDER
    ensure(RESOURCES[split], folder, dataset=NAME, expected=expected_files(split),
           present=lambda: bool(source_files(folder, split)), allow=download)
    parts = [_read_file(p) for p in source_files(folder, split)]
    images = np.concatenate([im for im, _ in parts]) if len(parts) > 1 else np.ascontiguousarray(parts[0][0])
    labels = np.concatenate([lb for _, lb in parts])
    return RawSplit(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), {})
