"""Batched, seeded image transforms: the preprocessing of the paper's datasets (SPEC section 5).

Each transform works on a whole batch of float images [B, C, H, W] in [0, 1]
(CPU or CUDA), never image by image, and splits its randomness from its
arithmetic:

- `draw(n, generator)` draws the random parameters of ALL n images of a split
  for one epoch (None for a deterministic transform), on the CPU, from the
  epoch's generator `epoch_generator(seed, epoch)`;
- `__call__(images, params)` applies them, where params are the drawn
  parameters indexed by the batch's image indices (`Transforms.index`).

So an image's augmentation depends only on (seed, epoch, image index): the same
on 1 or N processes, with or without loader workers, and after a resume.
`out_shape(in_shape)` gives the [C, H, W] shape a transform produces, so a
model can be built before any data is transformed.

Where the official code (`research/capsules/input_data/` of Sarasra/models)
and this module differ in scale: the official pipelines work on float pixels
in [0, 255]; ours are in [0, 1]. Brightness deltas therefore are 63/255, and
`Standardize(scale=255)` reproduces the official 1/sqrt(n) floor. Neither
official pipeline clamps anywhere: brightness and contrast run on unclamped
floats straight into per-image standardisation (smallNORB:
`norb_input_record.py`, CIFAR-10: `cifar10_input.py`), so nothing here clamps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from capsnet.errors import CapsnetError


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator every transform of one epoch draws from (the MNIST loader's seeding)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _pair(size, name: str) -> tuple[int, int]:
    """An int or an (h, w) pair as (h, w) of positive ints."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise CapsnetError(f"{name}={size} must be a positive int or a pair of positive ints (height, width)")
    return int(h), int(w)


def _check_image_shape(in_shape, name: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise CapsnetError(f"{name} expects images [C, H, W], got shape {tuple(in_shape)}; "
                           "give in_shape without the batch dimension")
    return tuple(int(s) for s in in_shape)


def _need(params, name: str) -> torch.Tensor:
    if params is None:
        raise CapsnetError(f"{name} is random and got no parameters: pass the batch's slice of its draw(), "
                           "or move it from eval_transforms to train_transforms")
    return params


def _per_image(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image scalars [B] as [B, 1, 1, 1] in the images' dtype and device, to broadcast."""
    return values.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)


def crop(images: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop each image [B, C, H, W] at its own (top, left) to size (h, w), in one gather."""
    b, c = images.shape[:2]
    h, w = size
    dev = images.device
    rows = (tops.to(dev).view(b, 1) + torch.arange(h, device=dev)).view(b, 1, h, 1)
    cols = (lefts.to(dev).view(b, 1) + torch.arange(w, device=dev)).view(b, 1, 1, w)
    return images[torch.arange(b, device=dev).view(b, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1),
                  rows, cols]


class Transform:
    """Base: deterministic, shape-preserving. Subclasses override what differs."""

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        return None

    def out_shape(self, in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return _check_image_shape(in_shape, type(self).__name__)

    def __call__(self, images: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class RandomShift(Transform):
    """Shift each image by integer (dy, dx) uniform in [-max_shift, max_shift], zero fill (paper section 5).

    Content moves down by dy and right by dx; what leaves the canvas is dropped,
    never wrapped. The draw and the arithmetic are those of the MNIST loader
    (`capsnet.data.images.random_shift`), so MNIST runs keep their numbers:
    params are int64 offsets [n, 2] = (dy, dx), and max_shift = 0 draws nothing.
    """

    def __init__(self, max_shift: int):
        if int(max_shift) != max_shift or max_shift < 0:
            raise CapsnetError(f"RandomShift(max_shift={max_shift}) must be a non-negative int of pixels")
        self.max_shift = int(max_shift)

    def draw(self, n, generator):
        if self.max_shift == 0:
            return None
        s = self.max_shift
        return torch.randint(-s, s + 1, (n, 2), generator=generator)

    def __call__(self, images, params=None):
        if self.max_shift == 0:
            return images
        offsets = _need(params, "RandomShift")
        p = self.max_shift
        # A shift by (dy, dx) is the crop at (p - dy, p - dx) of the image padded by p.
        padded = F.pad(images, (p, p, p, p))
        offsets = offsets.to(images.device)
        return crop(padded, p - offsets[:, 0], p - offsets[:, 1], tuple(images.shape[-2:]))


class Pad(Transform):
    """Zero padding by `padding` pixels on all four sides (the expanded-MNIST 40x40 canvas, SPEC 5.2)."""

    def __init__(self, padding: int):
        if int(padding) != padding or padding < 0:
            raise CapsnetError(f"Pad(padding={padding}) must be a non-negative int of pixels")
        self.padding = int(padding)

    def out_shape(self, in_shape):
        c, h, w = _check_image_shape(in_shape, "Pad")
        return c, h + 2 * self.padding, w + 2 * self.padding

    def __call__(self, images, params=None):
        p = self.padding
        return F.pad(images, (p, p, p, p)) if p else images


class RandomCrop(Transform):
    """A crop of `size` at a position uniform over all valid ones, after optional zero padding.

    Like torchvision's RandomCrop and TensorFlow's `tf.random_crop` (smallNORB
    32 of 48, CIFAR-10 24 of 32; the inverted-attention recipe: 32 with
    padding 4). draw() cannot know the image size, so params are fractions
    u in [0, 1) [n, 2] and the offset on an axis with L valid positions is
    floor(u * L): uniform over 0..L-1 for any image size.
    """

    def __init__(self, size, padding: int = 0):
        self.size = _pair(size, "RandomCrop.size")
        if int(padding) != padding or padding < 0:
            raise CapsnetError(f"RandomCrop(padding={padding}) must be a non-negative int of pixels")
        self.padding = int(padding)

    def out_shape(self, in_shape):
        c, h, w = _check_image_shape(in_shape, "RandomCrop")
        p = self.padding
        if self.size[0] > h + 2 * p or self.size[1] > w + 2 * p:
            raise CapsnetError(f"RandomCrop(size={self.size}, padding={p}) is larger than the images "
                               f"{h}x{w}: use a smaller size or more padding")
        return (c, *self.size)

    def draw(self, n, generator):
        return torch.rand(n, 2, generator=generator, dtype=torch.float64)

    def __call__(self, images, params=None):
        u = _need(params, "RandomCrop")
        self.out_shape(images.shape[1:])
        p = self.padding
        padded = F.pad(images, (p, p, p, p)) if p else images
        valid = torch.tensor([padded.shape[-2] - self.size[0] + 1, padded.shape[-1] - self.size[1] + 1],
                             dtype=torch.float64)
        offsets = torch.minimum((u.cpu().to(torch.float64) * valid).floor(), valid - 1).long()
        return crop(padded, offsets[:, 0], offsets[:, 1], self.size)


class CenterCrop(Transform):
    """The central crop of `size`: the evaluation counterpart of RandomCrop.

    TensorFlow's rule (`resize_image_with_crop_or_pad`, used by the official
    smallNORB and CIFAR-10 test pipelines): offset = (H - size) // 2, so for
    an odd margin the extra row (column) is cut at the bottom (right).
    """

    def __init__(self, size):
        self.size = _pair(size, "CenterCrop.size")

    def out_shape(self, in_shape):
        c, h, w = _check_image_shape(in_shape, "CenterCrop")
        if self.size[0] > h or self.size[1] > w:
            raise CapsnetError(f"CenterCrop(size={self.size}) is larger than the images {h}x{w}: "
                               "use a smaller size (or Pad first)")
        return (c, *self.size)

    def __call__(self, images, params=None):
        _, h, w = self.out_shape(images.shape[1:])
        top, left = (images.shape[-2] - h) // 2, (images.shape[-1] - w) // 2
        return images[..., top:top + h, left:left + w]


class RandomHorizontalFlip(Transform):
    """Mirror left-right with probability p (CIFAR-10: `tf.image.random_flip_left_right`, p = 0.5).

    params: bool [n], True where the image is flipped.
    """

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise CapsnetError(f"RandomHorizontalFlip(p={p}) must be a probability in [0, 1]")
        self.p = float(p)

    def draw(self, n, generator):
        return torch.rand(n, generator=generator, dtype=torch.float64) < self.p

    def __call__(self, images, params=None):
        flip = _need(params, "RandomHorizontalFlip").to(images.device).view(-1, 1, 1, 1)
        return torch.where(flip, images.flip(-1), images)


class RandomBrightness(Transform):
    """Add one delta uniform in [-max_delta, max_delta] to every pixel of an image, unclamped.

    TensorFlow's `random_brightness`; the official smallNORB and CIFAR-10 code
    use max_delta = 63 on 0-255 pixels, i.e. 63/255 here. params: float64 [n].
    """

    def __init__(self, max_delta: float):
        if max_delta < 0:
            raise CapsnetError(f"RandomBrightness(max_delta={max_delta}) must be >= 0 (0-1 pixel scale)")
        self.max_delta = float(max_delta)

    def draw(self, n, generator):
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (2 * u - 1) * self.max_delta

    def __call__(self, images, params=None):
        return images + _per_image(_need(params, "RandomBrightness"), images)


class RandomContrast(Transform):
    """Scale each image's deviation from its per-channel mean by f uniform in [lower, upper], unclamped.

    TensorFlow's `adjust_contrast`: (x - mean_c) * f + mean_c with mean_c the
    mean over H and W of channel c of that image (official: [0.2, 1.8]).
    params: float64 factors [n].
    """

    def __init__(self, lower: float, upper: float):
        if not 0 <= lower <= upper:
            raise CapsnetError(f"RandomContrast(lower={lower}, upper={upper}) needs 0 <= lower <= upper")
        self.lower, self.upper = float(lower), float(upper)

    def draw(self, n, generator):
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return self.lower + (self.upper - self.lower) * u

    def __call__(self, images, params=None):
        f = _per_image(_need(params, "RandomContrast"), images)
        mean = images.mean(dim=(-2, -1), keepdim=True)
        return (images - mean) * f + mean


class Standardize(Transform):
    """Per-image standardisation: (x - mean) / max(std, 1 / (scale * sqrt(n))) over all C*H*W values.

    TensorFlow's `per_image_standardization` (population std; the floor keeps a
    constant image at 0 instead of dividing by 0). The result does not depend
    on the pixel scale except through the floor: the official code applies it
    to 0-255 pixels, so `scale=255` reproduces its floor on our 0-1 pixels,
    and `scale=1` is TensorFlow's formula applied to the values as given.
    """

    def __init__(self, scale: float = 1.0):
        if scale <= 0:
            raise CapsnetError(f"Standardize(scale={scale}) must be > 0 (255 for the official 0-255 pixels)")
        self.scale = float(scale)

    def __call__(self, images, params=None):
        n = images[0].numel()
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        std = images.std(dim=(1, 2, 3), keepdim=True, correction=0)
        return (images - mean) / std.clamp(min=1.0 / (self.scale * n ** 0.5))


class Normalize(Transform):
    """(x - mean_c) / std_c with fixed per-channel statistics (the inverted-attention CIFAR-10 recipe)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or min(self.std, default=1.0) <= 0:
            raise CapsnetError(f"Normalize(mean={list(self.mean)}, std={list(self.std)}) needs one mean and "
                               "one positive std per channel")

    def out_shape(self, in_shape):
        c, h, w = _check_image_shape(in_shape, "Normalize")
        if c != len(self.mean):
            raise CapsnetError(f"Normalize has {len(self.mean)} channel statistics for {c}-channel images: "
                               f"give {c} means and {c} stds")
        return c, h, w

    def __call__(self, images, params=None):
        self.out_shape(images.shape[1:])
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std


def _legacy_bilinear_axis(images: torch.Tensor, out: int, dim: int) -> torch.Tensor:
    """TF1's legacy bilinear along one axis: source = dst * in / out, no half-pixel offset."""
    size = images.shape[dim]
    src = torch.arange(out, dtype=torch.float64) * (size / out)
    lo = src.floor().long().clamp(max=size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    shape = [1] * images.dim()
    shape[dim] = out
    t = (src - lo).to(device=images.device, dtype=images.dtype).view(shape)
    a = images.index_select(dim, lo.to(images.device))
    b = images.index_select(dim, hi.to(images.device))
    return a + (b - a) * t


class Resize(Transform):
    """Bilinear resize to `size` (smallNORB 96 -> 48, SPEC 5.3), no antialiasing.

    half_pixel_centers=True (default) is TensorFlow 2's `tf.image.resize`
    bilinear default (half-pixel centres, antialias=False), which is
    `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`.
    half_pixel_centers=False is TensorFlow 1's legacy `tf.image.resize_images`
    (source = dst * in / out), what the 2017 official smallNORB code ran: at
    96 -> 48 it samples every other pixel rather than averaging pairs.
    """

    def __init__(self, size, half_pixel_centers: bool = True):
        self.size = _pair(size, "Resize.size")
        self.half_pixel_centers = bool(half_pixel_centers)

    def out_shape(self, in_shape):
        c, _, _ = _check_image_shape(in_shape, "Resize")
        return (c, *self.size)

    def __call__(self, images, params=None):
        if self.half_pixel_centers:
            return F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=False)
        return _legacy_bilinear_axis(_legacy_bilinear_axis(images, self.size[0], -2), self.size[1], -1)


class Transforms:
    """A list of transforms applied in order; draws and params are lists, one entry per transform.

    Use: `params = t.draw(n, epoch_generator(seed, epoch))` once per epoch,
    then per batch `t(images, t.index(params, idx))`. Deterministic lists
    (evaluation) may be called with params=None.
    """

    def __init__(self, transforms: Iterable = ()):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not all(callable(getattr(t, m, None)) for m in ("draw", "out_shape", "__call__")):
                raise CapsnetError(f"{t!r} is not a transform (draw, __call__, out_shape): give each list "
                                   "entry a _target_ such as capsnet.data.transforms.Pad")

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"Transforms({self.transforms!r})"

    @property
    def random(self) -> bool:
        """Whether any transform may draw parameters (False: a loader can skip draw() and pass None)."""
        return any(not isinstance(t, Transform) or type(t).draw is not Transform.draw for t in self.transforms)

    def draw(self, n: int, generator: torch.Generator) -> list[torch.Tensor | None]:
        """Each transform's parameters for n images, drawn in list order from one generator."""
        return [t.draw(n, generator) for t in self.transforms]

    @staticmethod
    def index(params: list[torch.Tensor | None], idx: torch.Tensor) -> list[torch.Tensor | None]:
        """The parameters of the images idx (a batch) out of a whole split's draw."""
        return [None if p is None else p[idx] for p in params]

    def out_shape(self, in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        shape = _check_image_shape(in_shape, "Transforms")
        for t in self.transforms:
            shape = t.out_shape(shape)
        return tuple(shape)

    def __call__(self, images: torch.Tensor, params: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        if params is None:
            params = [None] * len(self.transforms)
        if len(params) != len(self.transforms):
            raise CapsnetError(f"{len(params)} parameter entries for {len(self.transforms)} transforms: "
                               "pass the indexed result of this list's own draw()")
        for t, p in zip(self.transforms, params):
            images = t(images, p)
        return images
