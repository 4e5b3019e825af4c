"""SVHN (Netzer et al. 2011), cropped digits: 32x32 colour house numbers (SPEC 5.4).

`train_32x32.mat` / `test_32x32.mat` are MATLAB v5 files with `X` uint8
(32, 32, 3, N) indexed (row, col, channel, image) and `y` (N, 1) in 1..10,
where 10 is the digit 0. The checksum is verified after a download only:
torchvision's class hashes 180 MB on every construction and refuses files it
has not seen, which is why it is not used here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from capsnet.data.readers import RawSplit, check_split, malformed
from capsnet.data.readers.download import Resource, ensure

NAME = "SVHN"
FOLDER = "SVHN"
CLASSES = tuple(str(d) for d in range(10))

_BASE = "http://ufldl.stanford.edu/housenumbers/"
_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
# md5 as in torchvision.datasets.SVHN.split_list (torchvision 0.29).
RESOURCES = {
    "train": (Resource(_BASE + "train_32x32.mat", "md5:e26dedcc434d2e4c54c9b2d4a06d8373", None,
                       ("train_32x32.mat",)),),
    "test": (Resource(_BASE + "test_32x32.mat", "md5:eb5a983be6a315427106f1b164d9cef3", None,
                      ("test_32x32.mat",)),),
}


def expected_files(split: str) -> list[str]:
    check_split(NAME, split)
    return [_FILES[split]]


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # truncated or foreign files fail in many ways inside scipy
        raise malformed(NAME, path, f"is not a readable MATLAB v5 file ({type(e).__name__}: {e})") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        raise malformed(NAME, path, "lacks the variables X and y")
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise malformed(NAME, path, f"has X of {x.dtype} {x.shape}, expected uint8 (H, W, 3, N)")
    if y.size != x.shape[3]:
        raise malformed(NAME, path, f"has {x.shape[3]} images but {y.size} labels")
    return x, y.reshape(-1).astype(np.int64)


def read(root: str | Path, split: str, download: bool = False) -> RawSplit:
    """SVHN `split`: images uint8 [N, 3, 32, 32], labels int64 [N] with digit d as label d."""
    check_split(NAME, split)
    folder = Path(root) / FOLDER
    path = folder / _FILES[split]
    ensure(RESOURCES[split], folder, dataset=NAME, expected=expected_files(split),
           present=path.is_file, allow=download)
    x, y = _load(path)
    if len(y) and (y.min() < 1 or y.max() > 10):
        bad = int(y[(y < 1) | (y > 10)][0])
        raise malformed(NAME, path, f"holds label {bad}, outside 1..10 (10 stands for the digit 0)")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # (row, col, ch, n) -> (n, ch, row, col)
    return RawSplit(torch.from_numpy(images), torch.from_numpy(y % 10), {})
