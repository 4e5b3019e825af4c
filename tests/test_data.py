"""Data: the IDX files read through torchvision, batches, the paper's shift augmentation."""

import pytest
import torch

from capsnet.data.images import BatchLoader, TorchvisionImages, random_shift
from capsnet.errors import DatasetError


def explicit_shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift one [C, H, W] image by (dy, dx) pixel by pixel, zeros where nothing moves in."""
    out = torch.zeros_like(image)
    _, h, w = image.shape
    for y in range(h):
        for x in range(w):
            sy, sx = y - dy, x - dx
            if 0 <= sy < h and 0 <= sx < w:
                out[:, y, x] = image[:, sy, sx]
    return out


def test_random_shift_equals_shifting_each_image_by_hand():
    images = torch.randint(0, 256, (6, 2, 9, 7), dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [2, -2], [-1, 1], [-2, -2], [2, 2], [1, 0]])
    shifted = random_shift(images, offsets, 2)
    for k in range(6):
        torch.testing.assert_close(shifted[k], explicit_shift(images[k], *offsets[k].tolist()))


def test_mnist_loads_through_torchvision_with_subsets(tiny_data):
    data = TorchvisionImages("torchvision.datasets.MNIST", str(tiny_data), download=False,
                             train_subset=100, test_subset=None)
    images, labels = data.split(True)
    assert images.shape == (100, 1, 28, 28) and images.dtype == torch.uint8 and labels.shape == (100,)
    assert data.in_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.split(False)[0]) == 64


def test_subset_must_be_positive():
    with pytest.raises(DatasetError, match="train_subset"):
        TorchvisionImages("torchvision.datasets.MNIST", "nowhere", train_subset=0)


def batches(loader, epoch=0, skip=0):
    loader.set_epoch(epoch, skip)
    return [(x.clone(), y.clone()) for x, y in loader]


def make_loader(n=100, **kw):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 10
    return BatchLoader(images, labels, **{"batch_size": 16, "train": True, "seed": 3, "shift": 2, **kw})


def test_an_epoch_is_a_permutation_in_float_images_and_changes_with_the_epoch():
    loader = make_loader()
    e0, e1 = batches(loader, 0), batches(loader, 1)
    assert sum(len(y) for _, y in e0) == 100 and len(loader) == 7
    assert sorted(torch.cat([y for _, y in e0]).tolist()) == sorted((torch.arange(100) % 10).tolist())
    assert e0[0][0].dtype == torch.float32 and 0 <= e0[0][0].min() and e0[0][0].max() <= 1
    assert not torch.equal(e0[0][0], e1[0][0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e0, batches(make_loader(), 0)))  # same seed, same epoch


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
    images, labels = torch.zeros(23, 1, 4, 4, dtype=torch.uint8), torch.arange(23)
    seen = []
    for rank in range(3):
        loader = BatchLoader(images, labels, batch_size=4, train=False, rank=rank, world_size=3)
        seen += [int(v) for _, y in loader for v in y]
    assert sorted(seen) == list(range(23))
