"""`python -m capsnet.data`: sizes, shapes and class counts printed; grids and the samples file written."""

import subprocess
import sys

import numpy as np
import pytest

import dataset_fixtures as fx
from capsnet.data.inspect import inspect
from capsnet.errors import CapsnetError
from helpers import ROOT


def test_samples_are_the_images_as_decoded_from_the_files(tiny_data, tmp_path):
    text = inspect(["dataset=mnist", f"dataset.root={tiny_data}", "dataset.download=false", "split=train", "n=10",
                    f"out={tmp_path}"])
    assert "train 256, test 64 images" in text and "(1, 28, 28) torch.uint8" in text
    assert "class counts (train): [26, 26, 26, 26, 26, 26, 25, 25, 25, 25]" in text
    samples = np.load(tmp_path / "mnist_train_samples.npz")
    from torchvision.datasets import MNIST

    raw = MNIST(str(tiny_data), train=True, download=False)
    assert np.array_equal(samples["images"], raw.data[:10].unsqueeze(1).numpy())
    assert np.array_equal(samples["labels"], raw.targets[:10].numpy())
    for kind in ("raw", "model_input"):
        assert (tmp_path / f"mnist_train_{kind}.png").read_bytes()[:4] == b"\x89PNG"


def test_an_unknown_split_names_the_choices(tiny_data, tmp_path):
    with pytest.raises(CapsnetError, match="choose one of train, test"):
        inspect(["dataset=mnist", f"dataset.root={tiny_data}", "split=valid", f"out={tmp_path}"])


def test_the_command_line_fails_in_one_line_on_a_missing_dataset(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "capsnet.data", "dataset=mnist", f"dataset.root={tmp_path}",
                           "dataset.download=false", f"out={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not found in" in proc.stderr


@pytest.mark.parametrize("dataset, write", [
    ("svhn", lambda root: fx.write_svhn(root, n=12, split="test")),
    ("cifar10", lambda root: fx.write_cifar10(root, n_per_batch=5, split="test")),
    ("smallnorb", lambda root: fx.write_smallnorb(root, n=6, split="test", gz=True)),
    ("affnist", lambda root: fx.write_affnist(root, n=9, split="test", batches=2)),
])
def test_the_samples_file_equals_what_each_reader_was_given(dataset, write, tmp_path):
    written = write(tmp_path)
    images, labels = np.asarray(written[0]), np.asarray(written[1])
    inspect([f"dataset={dataset}", f"dataset.root={tmp_path}", "dataset.download=false", "n=64",
             f"out={tmp_path / 'out'}"])
    samples = np.load(tmp_path / "out" / f"{dataset}_test_samples.npz")
    assert np.array_equal(samples["images"], images.reshape(samples["images"].shape))
    assert samples["images"].shape[0] == len(labels) and np.array_equal(samples["labels"], labels)


def test_multimnist_samples_hold_the_parts_of_each_pair(tiny_data, tmp_path):
    inspect(["dataset=multimnist", f"dataset.root={tiny_data}", "dataset.download=false", "n=12",
             "dataset.pairs_per_digit=2", f"out={tmp_path}"])
    samples = np.load(tmp_path / "multimnist_test_samples.npz")
    assert samples["images"].shape == (12, 1, 36, 36) and samples["parts"].shape == (12, 2, 1, 36, 36)
    assert np.array_equal(samples["images"], np.minimum(samples["parts"].astype(int).sum(1), 255))
    assert samples["labels"].shape == (12, 2) and (samples["labels"][:, 0] != samples["labels"][:, 1]).all()
