"""Batched transforms against explicit per-pixel loops in float64, seeding, shapes (SPEC 5.2, 5.3, 5.5, 7.3)."""

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnet.data import transforms as T
from capsnet.errors import CapsnetError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]


def rand_images(b=4, c=2, h=7, w=6, dtype=torch.float64, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def loop_crop(image, top, left, h, w, pad=0):
    """Crop one [C, H, W] image of the zero-padded canvas, pixel by pixel."""
    c, hh, ww = image.shape
    out = torch.zeros(c, h, w, dtype=image.dtype)
    for y in range(h):
        for x in range(w):
            sy, sx = top + y - pad, left + x - pad
            if 0 <= sy < hh and 0 <= sx < ww:
                out[:, y, x] = image[:, sy, sx]
    return out


def loop_shift(image, dy, dx):
    c, h, w = image.shape
    out = torch.zeros_like(image)
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[:, y, x] = image[:, y - dy, x - dx]
    return out


# ---- RandomShift: the MNIST loader's draw and arithmetic ----------------------------------------------

@pytest.mark.parametrize("seed,epoch,s", [(0, 0, 2), (3, 5, 2), (7, 1, 6)])
def test_random_shift_draws_exactly_the_old_loaders_offsets(seed, epoch, s):
    old = torch.randint(-s, s + 1, (50, 2), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    new = T.RandomShift(max_shift=s).draw(50, T.epoch_generator(seed, epoch))
    assert torch.equal(new, old)


def test_random_shift_equals_a_pixel_loop_in_float_and_uint8():
    images = rand_images(b=40, c=2, h=9, w=7)
    shift = T.RandomShift(max_shift=3)
    offsets = shift.draw(40, T.epoch_generator(1, 2))
    out = shift(images, offsets)
    for k in range(40):
        torch.testing.assert_close(out[k], loop_shift(images[k], *offsets[k].tolist()), rtol=0, atol=0)
    as_uint8 = (images * 255).to(torch.uint8)
    assert torch.equal(shift(as_uint8, offsets), (out * 255).to(torch.uint8))  # the pre-contracts loader shifted uint8


def test_zero_shift_draws_nothing_and_is_the_identity():
    g = T.epoch_generator(4, 1)
    assert T.RandomShift(max_shift=0).draw(10, g) is None
    after = torch.rand(3, generator=g)
    assert torch.equal(after, torch.rand(3, generator=T.epoch_generator(4, 1)))
    images = rand_images()
    assert torch.equal(T.RandomShift(max_shift=0)(images, None), images)


# ---- crops, pad, flip -------------------------------------------------------------------------------

def test_random_crop_offsets_are_floor_of_fraction_times_valid_positions():
    images = rand_images(b=3, c=1, h=5, w=6)
    u = torch.tensor([[0.0, 0.999], [0.5, 0.34], [0.99, 0.0]], dtype=torch.float64)
    out = T.RandomCrop(size=3)(images, u)
    # 5 - 3 + 1 = 3 valid rows, 6 - 3 + 1 = 4 valid columns
    for k, (top, left) in enumerate([(0, 3), (1, 1), (2, 0)]):
        assert torch.equal(out[k], images[k, :, top:top + 3, left:left + 3])


def test_random_crop_with_padding_equals_a_pixel_loop_and_reaches_every_position():
    images = rand_images(b=300, c=2, h=4, w=4)
    t = T.RandomCrop(size=(3, 2), padding=1)
    u = t.draw(300, T.epoch_generator(0, 0))
    out = t(images, u)
    tops, lefts = (u[:, 0] * 4).floor().long(), (u[:, 1] * 5).floor().long()  # 6-3+1, 6-2+1 positions
    for k in range(0, 300, 17):
        torch.testing.assert_close(out[k], loop_crop(images[k], tops[k].item(), lefts[k].item(), 3, 2, pad=1))
    assert set(tops.tolist()) == {0, 1, 2, 3} and set(lefts.tolist()) == {0, 1, 2, 3, 4}
    counts = torch.bincount(tops, minlength=4).double()
    assert (counts - 75).abs().max() < 30  # uniform: ~5 standard deviations of a binomial(300, 1/4)


def test_center_crop_takes_tensorflows_offset_for_odd_margins():
    images = rand_images(b=2, c=1, h=6, w=5)
    out = T.CenterCrop(size=3)(images)
    # margins 3 and 2: offsets 3 // 2 = 1 (extra row at the bottom) and 2 // 2 = 1
    assert torch.equal(out, images[:, :, 1:4, 1:4])
    out = T.CenterCrop(size=(2, 4))(images)
    assert torch.equal(out, images[:, :, 2:4, 0:4])


def test_pad_adds_zeros_around():
    images = rand_images(b=2, c=2, h=3, w=4)
    out = T.Pad(padding=2)(images)
    for k in range(2):
        torch.testing.assert_close(out[k], loop_crop(images[k], 0, 0, 7, 8, pad=2), rtol=0, atol=0)


def test_flip_mirrors_exactly_the_drawn_images():
    images = rand_images(b=5, c=2, h=3, w=4)
    flip = torch.tensor([True, False, False, True, True])
    out = T.RandomHorizontalFlip()(images, flip)
    for k in range(5):
        for x in range(4):
            expected = images[k, :, :, 3 - x] if flip[k] else images[k, :, :, x]
            assert torch.equal(out[k, :, :, x], expected)
    draws = T.RandomHorizontalFlip(p=0.25).draw(4000, T.epoch_generator(0, 0))
    assert draws.dtype == torch.bool and abs(draws.double().mean().item() - 0.25) < 0.03


# ---- photometric ------------------------------------------------------------------------------------

def test_brightness_adds_one_delta_per_image_without_clamping():
    images = rand_images(b=3, c=2, h=3, w=3)
    t = T.RandomBrightness(max_delta=63 / 255)
    delta = t.draw(3, T.epoch_generator(0, 0))
    out = t(images, delta)
    for k in range(3):
        for c in range(2):
            for y in range(3):
                for x in range(3):
                    assert math.isclose(out[k, c, y, x].item(), images[k, c, y, x].item() + delta[k].item())
    many = t.draw(4000, T.epoch_generator(0, 1))
    assert many.abs().max() <= 63 / 255 and many.min() < -0.2 and many.max() > 0.2
    assert T.RandomBrightness(max_delta=0.5)(torch.ones(1, 1, 1, 1), torch.tensor([0.5])).item() == 1.5


def test_contrast_scales_around_each_images_channel_mean():
    images = rand_images(b=3, c=2, h=3, w=4)
    t = T.RandomContrast(lower=0.2, upper=1.8)
    f = t.draw(3, T.epoch_generator(2, 0))
    assert ((f >= 0.2) & (f <= 1.8)).all()
    out = t(images, f)
    for k in range(3):
        for c in range(2):
            mean = sum(images[k, c, y, x].item() for y in range(3) for x in range(4)) / 12
            for y in range(3):
                for x in range(4):
                    expected = (images[k, c, y, x].item() - mean) * f[k].item() + mean
                    assert math.isclose(out[k, c, y, x].item(), expected, abs_tol=1e-12)


def loop_standardize(image, scale=1.0):
    values = image.flatten().tolist()
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return (image - mean) / max(std, 1 / (scale * math.sqrt(n)))


def test_standardize_is_tensorflows_per_image_standardization():
    images = rand_images(b=3, c=2, h=3, w=4)
    out = T.Standardize()(images)
    for k in range(3):
        torch.testing.assert_close(out[k], loop_standardize(images[k]))
        assert abs(out[k].mean().item()) < 1e-12 and math.isclose(out[k].std(correction=0).item(), 1.0)


def test_standardize_floor_on_constant_and_flat_images():
    constant = torch.full((1, 2, 3, 4), 0.7, dtype=torch.float64)
    out = T.Standardize()(constant)  # mean rounding leaves ~1e-16, multiplied by sqrt(24), not divided by 0
    assert out.isfinite().all() and out.abs().max() < 1e-13
    flat = 0.5 + 1e-3 * rand_images(b=1, c=2, h=3, w=4)  # std ~3e-4 < 1/sqrt(24): the floor divides
    out = T.Standardize()(flat)
    torch.testing.assert_close(out, (flat - flat.mean()) * math.sqrt(24))
    torch.testing.assert_close(T.Standardize(scale=255)(flat)[0], loop_standardize(flat[0], scale=255))


def test_normalize_per_channel():
    images = rand_images(b=2, c=3, h=2, w=2)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    out = T.Normalize(mean=mean, std=std)(images)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (images[:, c] - mean[c]) / std[c])


# ---- resize -----------------------------------------------------------------------------------------

def loop_bilinear(image, oh, ow, half_pixel):
    """TensorFlow's bilinear resize of one [C, H, W] image, written from its source-coordinate rule."""
    c, h, w = image.shape

    def source(o, size_in, size_out):
        s = (o + 0.5) * size_in / size_out - 0.5 if half_pixel else o * size_in / size_out
        lo = math.floor(s)
        return min(max(lo, 0), size_in - 1), min(max(lo + 1, 0), size_in - 1), s - lo

    out = torch.zeros(c, oh, ow, dtype=torch.float64)
    for y in range(oh):
        y0, y1, ty = source(y, h, oh)
        for x in range(ow):
            x0, x1, tx = source(x, w, ow)
            top = image[:, y0, x0] * (1 - tx) + image[:, y0, x1] * tx
            bottom = image[:, y1, x0] * (1 - tx) + image[:, y1, x1] * tx
            out[:, y, x] = top * (1 - ty) + bottom * ty
    return out


def test_resize_hand_cases():
    row = torch.tensor([[[[0.0, 4.0]]]], dtype=torch.float64)
    # half-pixel: sources -0.25 (clamped), 0.25, 0.75, 1.25 (clamped) -> 0, 1, 3, 4
    assert T.Resize(size=(1, 4))(row).flatten().tolist() == [0.0, 1.0, 3.0, 4.0]
    # legacy: sources 0, 0.5, 1, 1.5 -> 0, 2, 4, 4 (the last column repeats the edge)
    assert T.Resize(size=(1, 4), half_pixel_centers=False)(row).flatten().tolist() == [0.0, 2.0, 4.0, 4.0]
    line = torch.tensor([[[[1.0, 3.0, 5.0, 9.0]]]], dtype=torch.float64)
    assert T.Resize(size=(1, 2))(line).flatten().tolist() == [2.0, 7.0]  # halving averages pairs
    assert T.Resize(size=(1, 2), half_pixel_centers=False)(line).flatten().tolist() == [1.0, 5.0]  # subsamples


@pytest.mark.parametrize("half_pixel", [True, False])
@pytest.mark.parametrize("out_hw", [(3, 4), (8, 9), (5, 7), (2, 11)])
def test_resize_equals_tensorflows_rule(half_pixel, out_hw):
    images = rand_images(b=2, c=2, h=5, w=7)
    out = T.Resize(size=out_hw, half_pixel_centers=half_pixel)(images)
    for k in range(2):
        torch.testing.assert_close(out[k], loop_bilinear(images[k], *out_hw, half_pixel))


# ---- the list, seeding, shapes, dtypes, devices -------------------------------------------------------

def every_transform():
    return [T.Pad(padding=2), T.RandomShift(max_shift=2), T.RandomCrop(size=6, padding=1), T.CenterCrop(size=5),
            T.RandomHorizontalFlip(p=0.5), T.RandomBrightness(max_delta=0.2), T.RandomContrast(lower=0.2, upper=1.8),
            T.Resize(size=(7, 6)), T.Resize(size=4, half_pixel_centers=False),
            T.Normalize(mean=[0.5, 0.4], std=[0.2, 0.3]), T.Standardize()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_shape_dtype_and_device_agree_with_the_output_of_every_transform(dtype, device):
    images = rand_images(b=3, c=2, h=8, w=9, dtype=dtype).to(device)
    for t in every_transform():
        params = t.draw(3, T.epoch_generator(0, 0))
        out = t(images, params)
        assert tuple(out.shape[1:]) == t.out_shape((2, 8, 9)), t
        assert out.dtype == dtype and out.device == images.device and out.shape[0] == 3
    chain = T.Transforms(every_transform())
    out = chain(images, chain.draw(3, T.epoch_generator(0, 0)))
    assert tuple(out.shape[1:]) == chain.out_shape((2, 8, 9)) == (2, 4, 4)


def test_float32_agrees_with_float64():
    chain = T.Transforms(every_transform())
    params = chain.draw(4, T.epoch_generator(5, 2))
    images = rand_images(b=4, c=2, h=8, w=9)
    torch.testing.assert_close(chain(images.float(), params), chain(images, params).float(), rtol=1e-4, atol=1e-4)


def test_same_seed_and_epoch_same_params_and_a_batch_equals_its_images_alone():
    chain = T.Transforms(every_transform())
    p1, p2 = chain.draw(20, T.epoch_generator(3, 4)), chain.draw(20, T.epoch_generator(3, 4))
    for a, b in zip(p1, p2):
        assert (a is None and b is None) or torch.equal(a, b)
    other = chain.draw(20, T.epoch_generator(3, 5))
    assert not all(a is None or torch.equal(a, b) for a, b in zip(p1, other))
    images = rand_images(b=20, c=2, h=8, w=9)
    idx = torch.tensor([17, 2, 9, 4])
    batch = chain(images[idx], chain.index(p1, idx))
    for j, i in enumerate(idx.tolist()):
        alone = chain(images[i:i + 1], chain.index(p1, torch.tensor([i])))
        torch.testing.assert_close(batch[j:j + 1], alone, rtol=0, atol=1e-12)


def test_transforms_from_hydra_yaml():
    cfg = OmegaConf.create("""
train_transforms:
  - {_target_: capsnet.data.transforms.Pad, padding: 6}
  - {_target_: capsnet.data.transforms.RandomShift, max_shift: 6}
eval_transforms:
  - {_target_: capsnet.data.transforms.Pad, padding: 6}
  - {_target_: capsnet.data.transforms.Normalize, mean: [0.1307], std: [0.3081]}
""")
    train = T.Transforms(instantiate(cfg.train_transforms))
    evaluation = T.Transforms(instantiate(cfg.eval_transforms))
    assert train.out_shape((1, 28, 28)) == evaluation.out_shape((1, 28, 28)) == (1, 40, 40)
    images = rand_images(b=2, c=1, h=28, w=28)
    assert evaluation(images).shape == (2, 1, 40, 40)
    assert train.random and not evaluation.random and len(T.Transforms()) == 0


def test_bad_inputs_raise_one_line_capsnet_errors():
    images = rand_images(b=2, c=2, h=5, w=5)
    cases = [
        lambda: T.RandomCrop(size=6)(images, torch.zeros(2, 2, dtype=torch.float64)),
        lambda: T.RandomCrop(size=6).out_shape((2, 5, 5)),
        lambda: T.CenterCrop(size=(3, 6))(images),
        lambda: T.RandomHorizontalFlip()(images, None),
        lambda: T.RandomShift(max_shift=2)(images),
        lambda: T.Normalize(mean=[0.5], std=[0.2])(images),
        lambda: T.Normalize(mean=[0.5, 0.5], std=[0.2, 0.0]),
        lambda: T.RandomShift(max_shift=-1),
        lambda: T.RandomContrast(lower=1.5, upper=0.5),
        lambda: T.Resize(size=0),
        lambda: T.Transforms([{"padding": 6}]),
        lambda: T.Transforms([T.Pad(padding=1)])(images, [None, None]),
    ]
    for case in cases:
        with pytest.raises(CapsnetError) as err:
            case()
        assert "\n" not in str(err.value)
