"""Fetching a dataset's official files: verified, extracted, and never left half-written.

Each file is streamed into a hidden temporary file inside the target folder
(the same file system, so the final `os.replace` is atomic) while its checksum
is computed; a mismatch or any failure deletes everything this call wrote.
Archives are unpacked into a hidden temporary folder first and their entries
moved into place only once the whole archive is out.

What is kept: the extracted files only. A `.zip` or `.tar.gz` is deleted once
unpacked; a single-file `.gz` is decompressed next to where it would lie and
the `.gz` is deleted (smallNORB then reads the plain file, several times faster
than decompressing 450 MB on every run; its reader still accepts `.gz` files
copied there by hand).

Tests (and offline mirrors) redirect every URL with the environment variable
`CAPSNET_MIRROR`, e.g. `http://127.0.0.1:8000`: it replaces the scheme and
host, the path is kept (`https://www.cs.toronto.edu/~kriz/x.tar.gz` ->
`http://127.0.0.1:8000/~kriz/x.tar.gz`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from capsnet.errors import DatasetError

MIRROR_ENV = "CAPSNET_MIRROR"
_CHUNK = 1 << 20


class Resource(NamedTuple):
    """One official download.

    url: where the authors publish it.
    checksum: "md5:<hex>" or "sha256:<hex>" of the downloaded bytes; None when no
        trustworthy published value is known (accepted with a warning).
    extract: "zip", "tar.gz", "gz" or None (the file is used as downloaded).
    provides: the paths, relative to the dataset folder, that this resource
        puts in place; when they all exist it is skipped, so a split that lacks
        one file does not fetch the others again.
    """

    url: str
    checksum: str | None
    extract: str | None
    provides: tuple[str, ...]


def mirrored(url: str, mirror: str | None = None) -> str:
    """`url` with its scheme and host replaced by the mirror's (CAPSNET_MIRROR), if one is set."""
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV, "")
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def download(resources, folder: str | Path, *, dataset: str, expected: list[str],
             mirror: str | None = None) -> None:
    """Download, verify and extract every resource not yet in `folder`.

    Any failure raises a one-line `DatasetError` naming the URL, the folder,
    the files expected and the fix; nothing half-written stays behind.
    """
    folder = Path(folder)
    for res in resources:
        if all((folder / p).exists() for p in res.provides):
            continue
        url = mirrored(res.url, mirror)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _fetch(res, url, folder, dataset)
        except DatasetError:
            raise
        except Exception as e:
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise DatasetError(f"{dataset}: downloading {url} into {folder} failed ({reason}); expected "
                               f"{', '.join(expected)}: copy the files there by hand if this machine is "
                               "offline") from None


def _fetch(res: Resource, url: str, folder: Path, dataset: str) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(url, out, res.checksum, Path(urllib.parse.urlsplit(url).path).name)
        _verify(res, url, digest, folder, dataset)
        _place(res, tmp, folder, Path(urllib.parse.urlsplit(res.url).path).name)
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out, checksum: str | None, label: str):
    """Copy the URL's bytes into `out`, hashing them on the way; returns the hash object (or None)."""
    digest = hashlib.new(checksum.split(":", 1)[0]) if checksum else None
    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=None, leave=False) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                if digest is not None:
                    digest.update(chunk)
                bar.update(len(chunk))
    return digest


def _verify(res: Resource, url: str, digest, folder: Path, dataset: str) -> None:
    if res.checksum is None:
        warnings.warn(f"{dataset}: no published checksum for {url}; accepted unverified", stacklevel=4)
        return
    algo, want = res.checksum.split(":", 1)
    got = digest.hexdigest()
    if got != want.lower():
        raise DatasetError(f"{dataset}: {url} has {algo} {got}, expected {want} (a corrupted or changed "
                           f"download; nothing was kept in {folder}): try again, or copy the files there "
                           "by hand if this machine is offline")


def _place(res: Resource, tmp: Path, folder: Path, filename: str) -> None:
    """Move the verified download (or what it unpacks to) into `folder`."""
    if res.extract is None:
        os.replace(tmp, folder / filename)
    elif res.extract == "gz":
        _gunzip(tmp, folder / filename.removesuffix(".gz"))
    elif res.extract in ("zip", "tar.gz"):
        _unpack(tmp, folder, res.extract)
    else:
        raise ValueError(f"unknown extract kind {res.extract!r}")


def _gunzip(src: Path, dest: Path) -> None:
    fd, part_name = tempfile.mkstemp(dir=dest.parent, prefix=".gunzip-", suffix=".part")
    part = Path(part_name)
    try:
        with gzip.open(src, "rb") as f, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(f, out, _CHUNK)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def _unpack(archive: Path, folder: Path, kind: str) -> None:
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".extract-"))
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    _check_member(name)
                z.extractall(staging)
        else:
            with tarfile.open(archive, "r:gz") as t:
                t.extractall(staging, filter="data")  # refuses links out, absolute paths, devices
        for entry in staging.iterdir():
            if entry.name.startswith("__MACOSX"):
                continue
            dest = folder / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)  # an incomplete earlier copy (some of `provides` was absent)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_member(name: str) -> None:
    path = Path(name)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"archive member {name!r} points outside the dataset folder")


def ensure(resources, folder: Path, *, dataset: str, expected: list[str], present, allow: bool) -> None:
    """Make `present()` true: download when allowed, else the one-line "not found" error."""
    from capsnet.data.readers import not_found

    if present():
        return
    if not allow:
        raise not_found(dataset, folder, expected)
    download(resources, folder, dataset=dataset, expected=expected)
    if not present():
        raise DatasetError(f"{dataset}: the download into {folder} did not produce {', '.join(expected)}; "
                           "copy the files there by hand")
