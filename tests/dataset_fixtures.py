"""Small datasets written in their real on-disk formats, for the readers' and end-to-end tests.

Each `write_*` function writes one split under `root/<FOLDER>` exactly as the
authors publish it and returns the arrays it wrote, so a test can compare what
a reader gives back. Images are random, and image 0 is blank except for a
marker, (row 2, col 30) = 255 in the first channel and (row 5, col 20) = 200 in
the last, so a transposed, flipped or channel-swapped reader fails loudly.

`serve(directory)` runs a local HTTP server on 127.0.0.1 for download tests.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import threading
from pathlib import Path

import numpy as np
from scipy.io import savemat

MARKS = ((0, 2, 30, 255), (-1, 5, 20, 200))  # (channel, row, col, value) in image 0


def marked_images(rng: np.random.Generator, n: int, channels: int, size: int) -> np.ndarray:
    """uint8 [n, channels, size, size]: random, with image 0 blank but for the MARKS."""
    images = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    images[0] = 0
    for c, r, col, value in MARKS:
        images[0, c, r, col] = value
    return images


def _labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    labels = rng.integers(0, k, n).astype(np.int64)
    labels[: min(n, k)] = np.arange(min(n, k))  # every class (and label 0) appears
    return labels


# --- affNIST: MATLAB v5, struct affNISTdata, image 1600 x N (columns are row-major images)

def affnist_struct(images: np.ndarray, labels: np.ndarray) -> dict:
    n = len(images)
    one_hot = np.zeros((10, n), np.uint8)
    one_hot[labels % 10, np.arange(n)] = 1  # (labels >= 10 only in tests of bad files)
    return {"affNISTdata": {"image": images.reshape(n, -1).T.copy(), "label_int": labels[None].astype(np.uint8),
                            "label_one_of_n": one_hot}}


def write_affnist(root, n: int = 20, split: str = "test", seed: int = 0, batches: int | None = 3):
    """affNIST `split` as `batches` numbered files (test_batches/1.mat, ...) or, with batches=None,
    one file (test.mat, training_and_validation.mat). Returns (images [n,1,40,40], labels [n])."""
    rng = np.random.default_rng(seed)
    images, labels = marked_images(rng, n, 1, 40), _labels(rng, n, 10)
    folder = Path(root) / "affNIST"
    stem = {"test": "test", "train": "training_and_validation"}[split]
    if batches is None:
        folder.mkdir(parents=True, exist_ok=True)
        savemat(folder / f"{stem}.mat", affnist_struct(images[:, 0], labels))
    else:
        (folder / f"{stem}_batches").mkdir(parents=True, exist_ok=True)
        for k, idx in enumerate(np.array_split(np.arange(n), batches), start=1):
            savemat(folder / f"{stem}_batches" / f"{k}.mat", affnist_struct(images[idx, 0], labels[idx]))
    return images, labels


# --- smallNORB: LeCun's binary matrix format

SMALLNORB_MAGIC = {np.dtype(np.uint8): 0x1E3D4C55, np.dtype(np.int32): 0x1E3D4C54}


def matrix_bytes(array: np.ndarray) -> bytes:
    """A binary matrix: int32 magic, int32 ndim, max(3, ndim) int32 dims (padded with 1), C-order data."""
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    header = np.array([SMALLNORB_MAGIC[array.dtype], array.ndim, *dims], "<i4").tobytes()
    return header + np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


def smallnorb_name(split: str, kind: str) -> str:
    prefix = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training",
              "test": "smallnorb-5x01235x9x18x6x2x96x96-testing"}[split]
    return f"{prefix}-{kind}.mat"


def write_smallnorb(root, n: int = 6, split: str = "test", gz: bool = False, seed: int = 0, size: int = 96):
    """smallNORB `split` (dat, cat, info; each .mat or .mat.gz). Returns (images [n,2,size,size],
    labels [n], info int64 [n, 4] = instance, elevation, azimuth, lighting)."""
    rng = np.random.default_rng(seed)
    images, labels = marked_images(rng, n, 2, size), _labels(rng, n, 5)
    info = np.stack([rng.integers(0, 10, n), rng.integers(0, 9, n), 2 * rng.integers(0, 18, n),
                     rng.integers(0, 6, n)], axis=1).astype(np.int64)
    folder = Path(root) / "smallNORB"
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("dat", images), ("cat", labels.astype(np.int32)), ("info", info.astype(np.int32))):
        data = matrix_bytes(array)
        name = smallnorb_name(split, kind)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return images, labels, info


# --- SVHN: MATLAB v5, X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0

def write_svhn(root, n: int = 12, split: str = "test", seed: int = 0):
    """SVHN `split` as {split}_32x32.mat. Returns (images [n,3,32,32], labels [n] with digit 0 as 0)."""
    rng = np.random.default_rng(seed)
    images, labels = marked_images(rng, n, 3, 32), _labels(rng, n, 10)
    folder = Path(root) / "SVHN"
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
    savemat(folder / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0).copy(), "y": stored})
    return images, labels


# --- CIFAR-10: binary version, 3,073-byte records

def cifar10_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    return records.tobytes()


def write_cifar10(root, n_per_batch: int = 4, split: str = "test", seed: int = 0):
    """CIFAR-10 `split` under cifar-10-batches-bin/ (train: data_batch_1..5.bin, test: test_batch.bin).
    Returns (images [N,3,32,32], labels [N]) in file order."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    n = n_per_batch * len(names)
    images, labels = marked_images(rng, n, 3, 32), _labels(rng, n, 10)
    folder = Path(root) / "CIFAR10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        part = slice(k * n_per_batch, (k + 1) * n_per_batch)
        (folder / name).write_bytes(cifar10_bytes(images[part], labels[part]))
    return images, labels


# --- a local HTTP server for download tests (127.0.0.1 only)

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory):
    """Serve `directory` on http://127.0.0.1:<free port>; yields the base URL; shuts down on exit."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
