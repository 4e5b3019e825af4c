"""Dataset readers: bytes in the authors' formats come back exactly, bad files fail in one line,
downloads are verified and leave nothing half-written (served from 127.0.0.1 only)."""

import gzip
import hashlib
import io
import struct
import tarfile
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat

from capsnet.data.readers import READERS, affnist, cifar10, smallnorb, svhn
from capsnet.data.readers.download import MIRROR_ENV, Resource, download, mirrored
from capsnet.errors import DatasetError
from dataset_fixtures import (MARKS, affnist_struct, matrix_bytes, serve, smallnorb_name,
                              write_affnist, write_cifar10, write_smallnorb, write_svhn)


def one_line_error(excinfo, *names) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


def assert_marks(images: np.ndarray):
    """Image 0's markers sit where they were written: not transposed, flipped or channel-swapped."""
    img = images[0]
    for c, r, col, value in MARKS:
        assert img[c, r, col] == value
        assert img[c, col, r] == 0  # a transposed reader would put the mark here
    assert int((img > 0).sum()) == len({(c % img.shape[0], r, col) for c, r, col, _ in MARKS})


def assert_same(raw, images, labels):
    assert raw.images.dtype == torch.uint8 and raw.labels.dtype == torch.int64 and raw.images.is_contiguous()
    np.testing.assert_array_equal(raw.images.numpy(), images)
    np.testing.assert_array_equal(raw.labels.numpy(), labels)
    assert_marks(raw.images.numpy())


# --- every reader exposes the same surface

@pytest.mark.parametrize("name", ["affnist", "smallnorb", "svhn", "cifar10"])
def test_reader_surface_and_official_resources(name):
    mod = READERS[name]
    assert mod.FOLDER and len(mod.CLASSES) in (5, 10)
    for split in ("train", "test"):
        assert mod.expected_files(split)
        for res in mod.RESOURCES[split]:
            algo, hexdigest = res.checksum.split(":")
            assert len(hexdigest) == {"md5": 32, "sha256": 64}[algo] and int(hexdigest, 16) >= 0
            assert urllib.parse.urlsplit(res.url).scheme in ("http", "https") and res.provides
    with pytest.raises(DatasetError, match="unknown split"):
        mod.read("/nonexistent", "validation")


# --- affNIST

def test_affnist_numbered_batches_in_numeric_order(tmp_path):
    images, labels = write_affnist(tmp_path, n=23, batches=11)  # 1, 2, ..., 10, 11 (not 1, 10, 11, 2)
    assert_same(affnist.read(tmp_path, "test"), images, labels)


def test_affnist_single_test_file_and_train_layouts(tmp_path):
    images, labels = write_affnist(tmp_path, n=7, batches=None)
    raw = affnist.read(tmp_path, "test")
    assert raw.images.shape == (7, 1, 40, 40) and raw.info == {}
    assert_same(raw, images, labels)
    tr_images, tr_labels = write_affnist(tmp_path, n=5, split="train", batches=None, seed=1)
    assert_same(affnist.read(tmp_path, "train"), tr_images, tr_labels)


def test_affnist_training_then_validation_batches(tmp_path):
    folder = tmp_path / "affNIST"
    first, l1 = write_affnist(tmp_path, n=6, split="train", batches=2, seed=1)
    (folder / "training_and_validation_batches").rename(folder / "training_batches")
    second, l2 = write_affnist(tmp_path, n=4, split="train", batches=1, seed=2)
    (folder / "training_and_validation_batches").rename(folder / "validation_batches")
    raw = affnist.read(tmp_path, "train")
    np.testing.assert_array_equal(raw.images.numpy(), np.concatenate([first, second]))
    np.testing.assert_array_equal(raw.labels.numpy(), np.concatenate([l1, l2]))


def test_affnist_column_is_a_row_major_image(tmp_path):
    """Independent of the fixture writer: pixel k of a column is (row k // 40, col k % 40)."""
    column = np.zeros((1600, 1), np.uint8)
    column[2 * 40 + 30] = 255
    (tmp_path / "affNIST").mkdir()
    savemat(tmp_path / "affNIST" / "test.mat", {"affNISTdata": {"image": column, "label_int": np.array([[7]])}})
    raw = affnist.read(tmp_path, "test")
    assert raw.images[0, 0, 2, 30] == 255 and int(raw.images.sum()) == 255 and raw.labels.tolist() == [7]


def test_affnist_bad_files_fail_in_one_line(tmp_path):
    folder = tmp_path / "affNIST"
    folder.mkdir()
    (folder / "test.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 40)
    with pytest.raises(DatasetError) as e:
        affnist.read(tmp_path, "test")
    one_line_error(e, folder / "test.mat", "download it again")
    savemat(folder / "test.mat", {"something_else": np.zeros(3)})
    with pytest.raises(DatasetError) as e:
        affnist.read(tmp_path, "test")
    one_line_error(e, folder / "test.mat", "affNISTdata")
    savemat(folder / "test.mat", affnist_struct(np.zeros((2, 40, 40), np.uint8), np.array([3, 12])))
    with pytest.raises(DatasetError) as e:
        affnist.read(tmp_path, "test")
    one_line_error(e, folder / "test.mat", "label 12")


# --- smallNORB

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_smallnorb_plain_and_gzip(tmp_path, gz, split):
    images, labels, info = write_smallnorb(tmp_path, n=5, split=split, gz=gz)
    raw = smallnorb.read(tmp_path, split)
    assert raw.images.shape == (5, 2, 96, 96)
    assert_same(raw, images, labels)
    assert list(raw.info) == ["instance", "elevation", "azimuth", "lighting"]
    for j, name in enumerate(raw.info):
        assert raw.info[name].dtype == torch.int64
        np.testing.assert_array_equal(raw.info[name].numpy(), info[:, j])


def test_smallnorb_header_written_by_hand(tmp_path):
    """Independent of the fixture writer: an int32 matrix of 3 with its dims padded to 3."""
    path = tmp_path / "m.mat"
    path.write_bytes(struct.pack("<5i", 0x1E3D4C54, 1, 3, 1, 1) + struct.pack("<3i", 4, 0, 2))
    assert smallnorb.read_matrix(path).tolist() == [4, 0, 2]
    path.write_bytes(struct.pack("<6i", 0x1E3D4C55, 4, 1, 2, 1, 3) + bytes([1, 2, 3, 4, 5, 6]))
    assert smallnorb.read_matrix(path).tolist() == [[[[1, 2, 3]], [[4, 5, 6]]]]


def _norb_path(root, kind, gz=False):
    return Path(root) / "smallNORB" / (smallnorb_name("test", kind) + (".gz" if gz else ""))


@pytest.mark.parametrize("gz", [False, True])
def test_smallnorb_truncated_or_padded_files(tmp_path, gz):
    write_smallnorb(tmp_path, n=3, gz=gz)
    path = _norb_path(tmp_path, "dat", gz)
    data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    for bad, word in ((data[:-100], "bytes"), (data + b"\0", "bytes")):
        path.write_bytes(gzip.compress(bad) if gz else bad)
        with pytest.raises(DatasetError) as e:
            smallnorb.read(tmp_path, "test")
        one_line_error(e, path, word, "download it again")
    if gz:  # a gzip stream cut short
        path.write_bytes(gzip.compress(data)[:-50])
        with pytest.raises(DatasetError) as e:
            smallnorb.read(tmp_path, "test")
        one_line_error(e, path)


def test_smallnorb_wrong_magic_type_or_dims(tmp_path):
    write_smallnorb(tmp_path, n=3)
    cat = _norb_path(tmp_path, "cat")
    cat.write_bytes(b"\x11\x22\x33\x44" + cat.read_bytes()[4:])
    with pytest.raises(DatasetError) as e:
        smallnorb.read(tmp_path, "test")
    one_line_error(e, cat, "magic")
    cat.write_bytes(matrix_bytes(np.array([0, 1, 2], np.uint8)))  # uint8 labels: not a cat file
    with pytest.raises(DatasetError) as e:
        smallnorb.read(tmp_path, "test")
    one_line_error(e, cat, "int32")
    cat.write_bytes(matrix_bytes(np.array([0, 1, 2, 3], np.int32)))  # 4 labels, 3 images
    with pytest.raises(DatasetError) as e:
        smallnorb.read(tmp_path, "test")
    one_line_error(e, _norb_path(tmp_path, "info"), "N = 4")
    cat.write_bytes(matrix_bytes(np.array([0, 1, 7], np.int32)))
    with pytest.raises(DatasetError) as e:
        smallnorb.read(tmp_path, "test")
    one_line_error(e, cat, "label 7")


# --- SVHN

def test_svhn_round_trip_and_label_10_is_digit_0(tmp_path):
    images, labels = write_svhn(tmp_path, n=12)
    stored = loadmat(tmp_path / "SVHN" / "test_32x32.mat")["y"].reshape(-1)
    assert 10 in stored and 0 not in stored  # the file really uses the 10-for-0 convention
    raw = svhn.read(tmp_path, "test")
    assert raw.images.shape == (12, 3, 32, 32)
    assert_same(raw, images, labels)
    np.testing.assert_array_equal(raw.labels.numpy(), np.where(stored == 10, 0, stored))


def test_svhn_bad_files_fail_in_one_line(tmp_path):
    write_svhn(tmp_path, n=4)
    path = tmp_path / "SVHN" / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetError) as e:
        svhn.read(tmp_path, "test")
    one_line_error(e, path, "download it again")
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]])})
    with pytest.raises(DatasetError) as e:
        svhn.read(tmp_path, "test")
    one_line_error(e, path, "label 0")


# --- CIFAR-10

def test_cifar10_records_round_trip(tmp_path):
    images, labels = write_cifar10(tmp_path, n_per_batch=3, split="train")
    raw = cifar10.read(tmp_path, "train")
    assert raw.images.shape == (15, 3, 32, 32)
    assert_same(raw, images, labels)
    # Independent of the fixture writer: record k = label byte, then R, G, B planes row by row.
    data = (tmp_path / "CIFAR10" / "cifar-10-batches-bin" / "data_batch_2.bin").read_bytes()
    rec = data[3073:2 * 3073]  # image 1 of batch 2 = image 4 overall
    assert raw.labels[4] == rec[0]
    assert raw.images[4, 1, 3, 7] == rec[1 + 1024 + 3 * 32 + 7]


def test_cifar10_bad_files_fail_in_one_line(tmp_path):
    write_cifar10(tmp_path, n_per_batch=2)
    path = tmp_path / "CIFAR10" / "cifar-10-batches-bin" / "test_batch.bin"
    good = path.read_bytes()
    path.write_bytes(good[:-1])
    with pytest.raises(DatasetError) as e:
        cifar10.read(tmp_path, "test")
    one_line_error(e, path, "3073-byte records")
    path.write_bytes(bytes([10]) + good[1:])
    with pytest.raises(DatasetError) as e:
        cifar10.read(tmp_path, "test")
    one_line_error(e, path, "label 10")


# --- missing data

@pytest.mark.parametrize("name", ["affnist", "smallnorb", "svhn", "cifar10"])
def test_missing_folder_says_where_and_how_to_fix(tmp_path, name):
    mod = READERS[name]
    with pytest.raises(DatasetError) as e:
        mod.read(tmp_path / "nowhere", "test")
    msg = one_line_error(e, tmp_path / "nowhere" / mod.FOLDER, mod.expected_files("test")[0],
                         "dataset.root", "dataset.download=true")
    assert msg.startswith(f"{mod.NAME} not found in ")
    assert not (tmp_path / "nowhere").exists()


# --- downloads from a local mirror

def _host(served: Path, url: str, data: bytes) -> None:
    """Put `data` where the mirror serves `url`'s path."""
    path = served / urllib.parse.urlsplit(url).path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _with_checksums(resources: dict, served: Path, algo: str = "sha256") -> dict:
    """The module's resources with checksums of the fixture files being served."""
    def fixed(res):
        data = (served / urllib.parse.urlsplit(res.url).path.lstrip("/")).read_bytes()
        return res._replace(checksum=f"{algo}:{hashlib.new(algo, data).hexdigest()}")
    return {split: tuple(fixed(r) for r in rs) for split, rs in resources.items()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix in (".part", ".gz"))


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    with serve(served) as url:
        monkeypatch.setenv(MIRROR_ENV, url)
        yield served


def test_mirror_replaces_scheme_and_host_only():
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert mirrored(url, "http://127.0.0.1:9/") == "http://127.0.0.1:9/~kriz/cifar-10-binary.tar.gz"
    assert mirrored(url, "") == url


def test_download_cifar10_tar_gz(tmp_path, mirror, monkeypatch):
    src = tmp_path / "src"
    images, labels = write_cifar10(src, n_per_batch=2, split="train")
    test_images, test_labels = write_cifar10(src, n_per_batch=3, split="test", seed=5)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(src / "CIFAR10" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    _host(mirror, cifar10.RESOURCES["test"][0].url, buf.getvalue())
    monkeypatch.setattr(cifar10, "RESOURCES", _with_checksums(cifar10.RESOURCES, mirror))
    root = tmp_path / "data"
    assert_same(cifar10.read(root, "test", download=True), test_images, test_labels)
    assert_same(cifar10.read(root, "train"), images, labels)  # one archive holds both splits
    assert _leftovers(root) == [] and sorted(p.name for p in (root / "CIFAR10").iterdir()) == [
        "cifar-10-batches-bin"]


def test_download_affnist_zip(tmp_path, mirror, monkeypatch):
    src = tmp_path / "src"
    images, labels = write_affnist(src, n=32, batches=32)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted((src / "affNIST" / "test_batches").iterdir()):
            z.write(p, f"test_batches/{p.name}")
    _host(mirror, affnist.RESOURCES["test"][0].url, buf.getvalue())
    monkeypatch.setattr(affnist, "RESOURCES", _with_checksums(affnist.RESOURCES | {"train": ()}, mirror))
    root = tmp_path / "data"
    assert_same(affnist.read(root, "test", download=True), images, labels)
    assert _leftovers(root) == []


def test_download_smallnorb_gz_files_kept_decompressed(tmp_path, mirror, monkeypatch):
    src = tmp_path / "src"
    images, labels, info = write_smallnorb(src, n=3, gz=True)
    for res in smallnorb.RESOURCES["test"]:
        _host(mirror, res.url, (src / "smallNORB" / (res.provides[0] + ".gz")).read_bytes())
    monkeypatch.setattr(smallnorb, "RESOURCES", _with_checksums(smallnorb.RESOURCES | {"train": ()}, mirror))
    root = tmp_path / "data"
    raw = smallnorb.read(root, "test", download=True)
    assert_same(raw, images, labels)
    np.testing.assert_array_equal(raw.info["azimuth"].numpy(), info[:, 2])
    assert sorted(p.name for p in (root / "smallNORB").iterdir()) == sorted(
        smallnorb_name("test", k) for k in ("cat", "dat", "info"))


def test_download_svhn_mat_with_md5_fetches_only_what_is_missing(tmp_path, mirror, monkeypatch):
    src = tmp_path / "src"
    images, labels = write_svhn(src, n=5)
    _host(mirror, svhn.RESOURCES["test"][0].url, (src / "SVHN" / "test_32x32.mat").read_bytes())
    monkeypatch.setattr(svhn, "RESOURCES", _with_checksums(svhn.RESOURCES | {"train": ()}, mirror, "md5"))
    root = tmp_path / "data"
    assert_same(svhn.read(root, "test", download=True), images, labels)
    (mirror / "housenumbers" / "test_32x32.mat").unlink()  # a second call must not fetch again
    assert_same(svhn.read(root, "test", download=True), images, labels)


def test_checksum_mismatch_is_refused_and_nothing_is_kept(tmp_path, mirror):
    src = tmp_path / "src"
    write_cifar10(src, n_per_batch=1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(src / "CIFAR10" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    _host(mirror, cifar10.RESOURCES["test"][0].url, buf.getvalue())  # the real checksum cannot match
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as e:
        cifar10.read(root, "test", download=True)
    one_line_error(e, "cifar-10-binary.tar.gz", "sha256", cifar10.RESOURCES["test"][0].checksum[7:],
                   root / "CIFAR10")
    assert list((root / "CIFAR10").iterdir()) == []


def test_unreachable_file_and_unsafe_archive_fail_in_one_line(tmp_path, mirror):
    folder = tmp_path / "data" / "X"
    missing = Resource("https://example.org/nothing/here.zip", None, "zip", ("here",))
    with pytest.raises(DatasetError) as e:
        download([missing], folder, dataset="X", expected=["here/1.mat"])
    one_line_error(e, "/nothing/here.zip", folder, "here/1.mat", "by hand")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../escape.txt", b"x")
    _host(mirror, "https://example.org/evil.zip", buf.getvalue())
    evil = Resource("https://example.org/evil.zip", None, "zip", ("escape.txt",))
    with pytest.warns(UserWarning, match="no published checksum"), pytest.raises(DatasetError) as e:
        download([evil], folder, dataset="X", expected=["escape.txt"])
    one_line_error(e, "outside")
    assert list(folder.iterdir()) == [] and not (tmp_path / "data" / "escape.txt").exists()


def test_resource_without_checksum_is_accepted_with_a_warning(tmp_path, mirror):
    _host(mirror, "https://example.org/a/b.bin", b"hello")
    folder = tmp_path / "data"
    with pytest.warns(UserWarning, match="no published checksum"):
        download([Resource("https://example.org/a/b.bin", None, None, ("b.bin",))], folder,
                 dataset="X", expected=["b.bin"])
    assert (folder / "b.bin").read_bytes() == b"hello" and _leftovers(folder) == []
