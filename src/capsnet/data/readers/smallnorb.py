"""smallNORB (LeCun, Huang, Bottou 2004): 5 toy categories as 96x96 stereo pairs (SPEC 5.3).

The `.mat` files are not MATLAB but LeCun's binary matrix format, little
endian: int32 magic (0x1E3D4C55 uint8, 0x1E3D4C54 int32), int32 ndim, then
max(3, ndim) int32 dims (the padding dims are 1), then the data in C order.
Per split: `dat` uint8 (N, 2, 96, 96), `cat` int32 (N,), `info` int32 (N, 4).
Each may be plain or gzip'ed (as published); the header is checked against
the file's length before the data is trusted.

Both cameras become the 2 channels of one image, as in the official capsule
code; `info` keeps instance, elevation (index 0..8), azimuth (as stored: 0, 2,
..., 34, i.e. tens of degrees) and lighting (0..5) per image.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from capsnet.data.readers import RawSplit, check_labels, check_split, malformed
from capsnet.data.readers.download import Resource, ensure

NAME = "smallNORB"
FOLDER = "smallNORB"
CLASSES = ("animal", "human", "airplane", "truck", "car")
INFO_FIELDS = ("instance", "elevation", "azimuth", "lighting")
MAGIC = {0x1E3D4C55: np.dtype(np.uint8), 0x1E3D4C54: np.dtype("<i4")}

_PREFIX = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training",
           "test": "smallnorb-5x01235x9x18x6x2x96x96-testing"}
_BASE = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
# sha256 of the .gz files, from tensorflow-datasets' datasets/smallnorb/checksums.tsv.
_SHA256 = {
    "training-dat": "5ffd6272a07d32695ee1082a26a41a93a37aab8c28da047f8c34ed348d214873",
    "training-cat": "2784e542c1922060691090952b6cd6278879a216c90f81476f0f00256d42cdaa",
    "training-info": "de7eb932ebe7a4ee16217fead60660d0eb3d23632c2f4d1c51f88c501c17bf32",
    "testing-dat": "cf7104eed3e51174d2f65b66d1e5878b9da233b886f161b0d88f4510ba2c7474",
    "testing-cat": "ecaf6d5bb8c3bc5eab9cf0258f6d2198dd474e016e374836fc097f2e5ff509ff",
    "testing-info": "16adf314226327ee006d1a44db8cfef52773c06c829951d5653a9f6f310248a2",
}
KINDS = ("dat", "cat", "info")
NDIM = {"dat": 4, "cat": 1, "info": 2}
DTYPE = {"dat": np.dtype(np.uint8), "cat": np.dtype("<i4"), "info": np.dtype("<i4")}


def file_name(split: str, kind: str) -> str:
    return f"{_PREFIX[split]}-{kind}.mat"


def expected_files(split: str) -> list[str]:
    check_split(NAME, split)
    return [file_name(split, k) + "[.gz]" for k in KINDS]


RESOURCES = {
    split: tuple(Resource(_BASE + file_name(split, k) + ".gz",
                          "sha256:" + _SHA256[f"{_PREFIX[split].rsplit('-', 1)[1]}-{k}"], "gz",
                          (file_name(split, k),)) for k in KINDS)
    for split in ("train", "test")
}


def find(folder: Path, split: str, kind: str) -> Path | None:
    """The plain file if there, else its .gz, else None."""
    for path in (folder / file_name(split, kind), folder / (file_name(split, kind) + ".gz")):
        if path.is_file():
            return path
    return None


def _header(f, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, dims, header bytes) of a binary matrix, from its first bytes."""
    head = f.read(8)
    if len(head) < 8:
        raise malformed(NAME, path, f"is truncated: {len(head)} bytes, shorter than a matrix header")
    magic, ndim = (int(v) for v in np.frombuffer(head, "<i4"))
    if magic not in MAGIC:
        raise malformed(NAME, path, f"is not a smallNORB binary matrix (magic {magic & 0xFFFFFFFF:#x}, "
                                    "expected 0x1e3d4c55 uint8 or 0x1e3d4c54 int32)")
    if not 1 <= ndim <= 8:
        raise malformed(NAME, path, f"declares {ndim} dimensions")
    raw = f.read(4 * max(3, ndim))
    if len(raw) < 4 * max(3, ndim):
        raise malformed(NAME, path, "is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, "<i4")[:ndim])
    if min(dims) < 0:
        raise malformed(NAME, path, f"declares negative dimensions {dims}")
    return MAGIC[magic], dims, 8 + len(raw)


def _fill(f, array: np.ndarray) -> int:
    """Read into the array's memory without an extra copy; returns the bytes read."""
    view, pos = memoryview(array).cast("B"), 0
    while pos < len(view):
        k = f.readinto(view[pos:])
        if not k:
            break
        pos += k
    return pos


def read_matrix(path: Path, check=None) -> np.ndarray:
    """One binary matrix (plain or .gz), shaped by its header; `check(dims)` vets the header first."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            dtype, dims, offset = _header(f, path)
            if check is not None:
                check(dtype, dims)
            want = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            if path.suffix != ".gz" and path.stat().st_size != offset + want:
                raise malformed(NAME, path, f"has {path.stat().st_size} bytes, its header says "
                                            f"{offset} + {want} for {dtype} {dims}")
            array = np.empty(dims, dtype)
            got = _fill(f, array)
            if got != want or f.read(1):
                raise malformed(NAME, path, f"holds {'fewer' if got != want else 'more'} data bytes than "
                                            f"the {want} its header declares for {dtype} {dims}")
    except (OSError, EOFError, zlib.error, MemoryError, ValueError) as e:  # BadGzipFile is an OSError
        raise malformed(NAME, path, f"cannot be read ({type(e).__name__}: {e})") from None
    return array


def _checker(path: Path, kind: str, n: int | None):
    def check(dtype, dims):
        if dtype != DTYPE[kind]:
            raise malformed(NAME, path, f"holds {dtype} data, expected {DTYPE[kind]} for a {kind} file")
        ok = len(dims) == NDIM[kind] and (n is None or dims[0] == n)
        ok = ok and {"dat": dims[1:2] == (2,), "info": dims[1:] == (len(INFO_FIELDS),)}.get(kind, True)
        if not ok:
            shape = {"dat": "(N, 2, H, W)", "cat": "(N,)", "info": f"(N, {len(INFO_FIELDS)})"}[kind]
            raise malformed(NAME, path, f"has dims {dims}, expected {shape}"
                            + (f" with N = {n} as in the cat file" if n is not None else ""))
    return check


def read(root: str | Path, split: str, download: bool = False) -> RawSplit:
    """smallNORB `split`: images uint8 [N, 2, 96, 96] (both cameras), labels int64 [N], info by name."""
    check_split(NAME, split)
    folder = Path(root) / FOLDER
    ensure(RESOURCES[split], folder, dataset=NAME, expected=expected_files(split),
           present=lambda: all(find(folder, split, k) for k in KINDS), allow=download)
    paths = {k: find(folder, split, k) for k in KINDS}
    cat = read_matrix(paths["cat"], _checker(paths["cat"], "cat", None)).astype(np.int64)
    check_labels(NAME, paths["cat"], cat, len(CLASSES))
    info = read_matrix(paths["info"], _checker(paths["info"], "info", len(cat))).astype(np.int64)
    dat = read_matrix(paths["dat"], _checker(paths["dat"], "dat", len(cat)))
    extra = {name: torch.from_numpy(np.ascontiguousarray(info[:, j])) for j, name in enumerate(INFO_FIELDS)}
    return RawSplit(torch.from_numpy(dat), torch.from_numpy(cat), extra)
