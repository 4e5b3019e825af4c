"""Data: files read through torchvision, splits with transforms, batches, the paper's shift augmentation."""

import pytest
import torch

from capsnet.data.loader import BatchLoader
from capsnet.data.source import Split
from capsnet.data.torchvision_images import TorchvisionImages
from capsnet.data.transforms import Pad, RandomShift
from capsnet.errors import DatasetError
from capsnet.types import Batch


def mnist(root, **kw):
    return TorchvisionImages("torchvision.datasets.MNIST", root=str(root), download=False, **kw)


def test_mnist_loads_through_torchvision_with_subsets(tiny_data):
    data = mnist(tiny_data, train_subset=100)
    train, test = data.train(), data.evals()["test"]
    assert train.images.shape == (100, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.shape == (100,) and len(test) == 64
    assert data.in_shape == (1, 28, 28) and data.num_classes == 10


def test_subset_must_be_positive():
    with pytest.raises(DatasetError, match="train_subset"):
        mnist("nowhere", train_subset=0)


def test_val_size_holds_out_training_images_chosen_by_the_seed(tiny_data):
    data = mnist(tiny_data, val_size=56, seed=5)
    train, val = data.train(), data.evals()["val"]
    assert len(train) == 256 - 56 and len(val) == 56 and list(data.evals()) == ["val", "test"]
    every = mnist(tiny_data).train().images.flatten(1)
    rows = lambda x: {bytes(r.numpy()) for r in x.flatten(1)}  # noqa: E731
    assert rows(train.images) | rows(val.images) == rows(every) and not rows(train.images) & rows(val.images)
    assert torch.equal(mnist(tiny_data, val_size=56, seed=5).evals()["val"].images, val.images)
    assert not torch.equal(mnist(tiny_data, val_size=56, seed=6).evals()["val"].images, val.images)


def test_a_torchvision_class_that_takes_split_works_through_the_same_adapter(tmp_path, monkeypatch):
    class SplitStyle:  # SVHN-like: split= instead of train=
        classes = list("0123456789")

        def __init__(self, root, split="train", download=False):
            n = 12 if split == "train" else 5
            self.data = torch.full((n, 3, 8, 8), 7, dtype=torch.uint8).numpy()
            self.labels = (torch.arange(n) % 10).numpy()

    import capsnet.data.torchvision_images as tvi

    monkeypatch.setattr(tvi, "get_class", lambda path: SplitStyle)
    data = tvi.TorchvisionImages("whatever.SplitStyle", root=str(tmp_path))
    assert len(data.train()) == 12 and len(data.evals()["test"]) == 5 and data.in_shape == (3, 8, 8)


def test_an_evaluation_set_of_another_shape_is_refused_in_one_line(tiny_data):
    data = mnist(tiny_data, train_transforms=[Pad(2)])  # train 32x32, test 28x28
    with pytest.raises(DatasetError, match="eval_transforms") as err:
        data.evals()
    assert "\n" not in str(err.value)


def batches(loader, epoch=0, skip=0):
    loader.set_epoch(epoch, skip)
    return [(b.images.clone(), b.labels.clone()) for b in loader]


def make_loader(n=100, shift=2, **kw):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=g)
    split = Split("train", images, torch.arange(n) % 10, transforms=[RandomShift(shift)] if shift else [])
    return BatchLoader(split, **{"batch_size": 16, "train": True, "seed": 3, **kw})


def test_an_epoch_is_a_permutation_in_float_images_and_changes_with_the_epoch():
    loader = make_loader()
    e0, e1 = batches(loader, 0), batches(loader, 1)
    assert sum(len(y) for _, y in e0) == 100 and len(loader) == 7
    assert sorted(torch.cat([y for _, y in e0]).tolist()) == sorted((torch.arange(100) % 10).tolist())
    assert e0[0][0].dtype == torch.float32 and 0 <= e0[0][0].min() and e0[0][0].max() <= 1
    assert not torch.equal(e0[0][0], e1[0][0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e0, batches(make_loader(), 0)))  # same seed, same epoch


def test_batches_are_batch_objects_whose_default_targets_are_the_input_and_the_label():
    batch = next(iter(make_loader()))
    assert isinstance(batch, Batch)
    assert torch.equal(batch.recon_targets[:, 0], batch.images)
    assert torch.equal(batch.recon_classes[:, 0], batch.labels)


def test_skipping_batches_resumes_inside_the_epoch():
    loader = make_loader()
    whole, rest = batches(loader, 2), batches(loader, 2, skip=3)
    assert len(rest) == len(whole) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[3:], rest))


def test_workers_build_the_same_batches_as_the_main_process():
    a, b = batches(make_loader()), batches(make_loader(num_workers=1))
    assert len(a) == len(b)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_two_processes_split_each_global_batch_between_them():
    one = batches(make_loader(n=96, batch_size=16))
    r0 = batches(make_loader(n=96, batch_size=8, rank=0, world_size=2))
    r1 = batches(make_loader(n=96, batch_size=8, rank=1, world_size=2))
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1):
        together = torch.cat([x0, x1])
        assert sorted(y.tolist()) == sorted(torch.cat([y0, y1]).tolist())
        assert sorted(map(bytes, (x * 255).byte().flatten(1).numpy())) == \
            sorted(map(bytes, (together * 255).byte().flatten(1).numpy()))


def test_test_shards_cover_every_image_once():
    split = Split("test", torch.zeros(23, 1, 4, 4, dtype=torch.uint8), torch.arange(23))
    seen = []
    for rank in range(3):
        loader = BatchLoader(split, batch_size=4, train=False, rank=rank, world_size=3)
        seen += [int(v) for b in loader for v in b.labels]
    assert sorted(seen) == list(range(23))


def test_the_shift_draws_what_the_pre_contracts_loader_drew():
    """MNIST results must not change: the offsets come from torch.randint(-s, s+1, (N, 2)) seeded seed*100003+epoch."""
    loader = make_loader(n=40, batch_size=40)
    loader.set_epoch(4)
    batch = next(iter(loader))
    idx = torch.tensor(list(loader.sampler))
    offsets = torch.randint(-2, 3, (40, 2), generator=torch.Generator().manual_seed(3 * 100_003 + 4))
    expected = RandomShift(2)(loader.split.images[idx].float() / 255, offsets[idx])
    assert torch.equal(batch.images, expected)
