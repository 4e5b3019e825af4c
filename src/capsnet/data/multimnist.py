"""MultiMNIST (Sabour et al. 2017, section 6): two shifted MNIST digits of different classes, overlaid.

The protocol is the official generator's (`research/capsules/input_data/mnist/
mnist_shift.py`, run with `--shift=6 --pad=4 --num_pairs=1000`; SPEC 5.1):
each 28x28 digit is zero-padded by 4 to 36x36 and translated by an integer
offset uniform in [-shift, shift] on each axis (zero-filled, never wrapped);
each base digit gets `pairs_per_digit` partners from the same split, of a
different class, drawn without replacement; one shift per base digit is reused
for all its pairs, each partner has its own; the pixels are `min(a + b, 255)`.

That is 60M training and 10M test pairs, so nothing is stored: every pair is
a pure function of (seed, epoch, index), computed from a counter-based hash.
A batch, a DDP shard or a resumed run asks for any indices in any order and
gets the same pixels, with O(1) state per epoch.

How an epoch's pairs are chosen (`MultiMNISTSplit.locate`). With N digits and
P = pairs_per_digit, the logical set is N * P pairs, pair k = (base k // P,
its slot k % P). Index i of an epoch is slot `i // N` of base `rho(i % N)`,
rho a pseudorandom permutation of the N digits: the first N indices use every
digit once as a base (with its slot-0 partner), the next N every digit again
(slot 1), and so on, so the first 10,000 pairs of the test set cover all
10,000 test digits and `num_pairs = N * P` is the whole set exactly once.
The partner in slot j of base b is `pool_c[pi_b(j)]`, pool_c the digits of
another class than b's class c and pi_b a pseudorandom permutation of that
pool keyed by b: slots 0..P-1 are an ordered sample without replacement, the
distribution of the official `np.random.choice(N, 2P, replace=False)`
filtered to other classes. Shifts are hashed from (b, 0) for the base and
(b, j + 1) for slot j's partner, the official `random_shifts[i, 0]` and
`random_shifts[i, j + 1]`. A training split (`regenerate=True`) keys all of
this with the epoch, so partners, shifts and which bases a partial epoch uses
are redrawn every epoch; a test split keys it with epoch 0 whatever the epoch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from capsnet.data.source import Split
from capsnet.data.torchvision_images import TorchvisionImages
from capsnet.errors import DatasetError

_U32 = 0xFFFFFFFF
_GOLDEN = np.uint32(0x9E3779B9)
_FEISTEL_ROUNDS = 6
# Stream ids keep the three uses of the hash independent of each other.
_ORDER, _PARTNER, _SHIFT = 1, 2, 3


# --- pure image operations ---------------------------------------------------------------

def pad_digits(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Zero-pad [N, C, H, W] by `pad` on every side: 28x28 -> 36x36 with the paper's pad of 4."""
    if pad < 0:
        raise DatasetError(f"multimnist pad={pad} must be >= 0")
    return F.pad(images, (pad, pad, pad, pad)) if pad else images


def shift_zero_fill(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Translate each image [N, C, H, W] by its own (dy, dx) in offsets [N, 2]; same shape.

    out[n, :, y, x] = images[n, :, y - dy, x - dx] where that lies inside the
    image, else 0: positive offsets move the content down and right (numpy's
    `roll` convention, as the official `shift_2d`), content pushed past the
    border is dropped, never wrapped.
    """
    n, c, h, w = images.shape
    offsets = offsets.to(device=images.device, dtype=torch.long)
    rows = torch.arange(h, device=images.device) - offsets[:, :1]  # [N, H]
    cols = torch.arange(w, device=images.device) - offsets[:, 1:]  # [N, W]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    picked = images[torch.arange(n, device=images.device).view(n, 1, 1, 1),
                    torch.arange(c, device=images.device).view(1, c, 1, 1),
                    rows.clamp(0, h - 1).view(n, 1, h, 1), cols.clamp(0, w - 1).view(n, 1, 1, w)]
    return torch.where(inside[:, None], picked, torch.zeros((), dtype=images.dtype, device=images.device))


def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The overlay of two uint8 images: min(a + b, 255) (official code; Figure 5's "clipped at 1")."""
    return (a.to(torch.int16) + b.to(torch.int16)).clamp_(max=255).to(torch.uint8)


# --- counter-based randomness ----------------------------------------------------------

def _mix32(x: np.ndarray) -> np.ndarray:
    """A bijective uint32 avalanche mixer (C. Wellons' "lowbias32"); numpy uint32 wraps mod 2^32."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _words(value) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.dtype == np.uint32:
        return value
    return np.atleast_1d(np.asarray(value, dtype=np.int64) & _U32).astype(np.uint32)


def _hash(state: np.ndarray, *words) -> np.ndarray:
    """Fold integer words (scalars or broadcastable arrays, each < 2^32) into uint32 hashes."""
    for w in words:
        state = _mix32(state + _mix32(_words(w) ^ _GOLDEN))
    return state


def _key(seed: int, epoch: int, stream: int) -> np.ndarray:
    """The hash state that every draw of one (seed, epoch, stream) starts from."""
    return _hash(np.zeros(1, np.uint32), seed & _U32, (seed >> 32) & _U32, epoch & _U32, stream)


def _feistel(x: np.ndarray, half: int, state: np.ndarray) -> np.ndarray:
    """A balanced Feistel network: a keyed bijection of [0, 2^(2 half))."""
    mask = np.uint32((1 << half) - 1)
    left, right = x >> np.uint32(half), x & mask
    for r in range(_FEISTEL_ROUNDS):
        left, right = right, left ^ (_hash(state, r, right) & mask)
    return (left << np.uint32(half)) | right


def permute(x: np.ndarray, bound: np.ndarray, state: np.ndarray) -> np.ndarray:
    """A pseudorandom permutation of [0, bound) applied to x (< bound), keyed by `state`.

    Elements may carry their own key (state broadcast with x) and bound (the
    same bound for the same key); the Feistel network runs on the smallest
    power-of-4 domain covering max(bound) and cycle-walks back into [0, bound).
    """
    x, bound = np.broadcast_arrays(np.asarray(x, np.int64), np.asarray(bound, np.int64))
    x, bound = x.ravel().astype(np.uint32), bound.ravel()
    state = np.broadcast_to(state, x.shape).ravel()
    half = max(1, (int(bound.max(initial=1) - 1).bit_length() + 1) // 2)
    y = _feistel(x, half, state)
    todo = np.nonzero(y >= bound)[0]
    while todo.size:
        y[todo] = _feistel(y[todo], half, state[todo])
        todo = todo[y[todo] >= bound[todo]]
    return y.astype(np.int64)


def _uniform_offsets(state: np.ndarray, base: np.ndarray, slot, shift: int) -> np.ndarray:
    """Integer (dy, dx) uniform in [-shift, shift] for each (base, slot): [len(base), 2]."""
    h = _hash(state, base[:, None], np.broadcast_to(slot, base.shape)[:, None], np.arange(2)[None, :])
    return (h % np.uint32(2 * shift + 1)).astype(np.int64) - shift


# --- partners ------------------------------------------------------------------------

class OtherClassPools:
    """For each class c, the digits of every other class, as one sorted index (O(N) memory).

    Position t of pool c is `order[t]` below class c's block of the class-sorted
    order and `order[t + count_c]` from it on.
    """

    def __init__(self, labels: np.ndarray, num_classes: int):
        self.labels = labels
        self.order = np.argsort(labels, kind="stable")
        self.count = np.bincount(labels, minlength=num_classes)
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])
        self.size = len(labels) - self.count

    def partners(self, base: np.ndarray, slot: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Digit index of slot j's partner of each base b: pool_c[pi_b(j)], distinct over j < pool size."""
        c = self.labels[base]
        t = permute(slot, self.size[c], _hash(state, base))
        return self.order[t + np.where(t >= self.start[c], self.count[c], 0)]


def draw_partners(labels: torch.Tensor, pairs_per_digit: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Partner indices [N, pairs_per_digit]: row b holds distinct digits of another class than b's.

    The same scheme `MultiMNISTSplit` uses, keyed by a number drawn from `generator`.
    """
    y = labels.cpu().numpy().astype(np.int64)
    pools = OtherClassPools(y, int(y.max(initial=0)) + 1)
    _check_pairs(pools, pairs_per_digit)
    key = int(torch.randint(0, 2**62, (1,), generator=generator))
    n = len(y)
    base = np.repeat(np.arange(n), pairs_per_digit)
    slot = np.tile(np.arange(pairs_per_digit), n)
    partners = pools.partners(base, slot, _key(key, 0, _PARTNER))
    return torch.from_numpy(partners.reshape(n, pairs_per_digit))


def _check_pairs(pools: OtherClassPools, pairs_per_digit: int) -> None:
    present = pools.count > 0
    if present.sum() < 2:
        raise DatasetError("multimnist needs digits of at least 2 classes: pass a split with several classes")
    most = int(pools.size[present].min())
    if not 1 <= pairs_per_digit <= most:
        raise DatasetError(f"multimnist pairs_per_digit={pairs_per_digit} must be in [1, {most}] "
                           f"(the digits of other classes than the largest class): lower it")


# --- the split -----------------------------------------------------------------------

class MultiMNISTSplit(Split):
    """One MultiMNIST split computed on the fly: `get(idx, epoch)` -> (images, two-hot labels, targets).

    A `capsnet.data.source.Split` whose items are generated: `images` and
    `labels` hold the N source digits, `len()` is the number of pairs.

    Args:
        images: uint8 [N, 1, 28, 28] source digits (one MNIST split).
        labels: int64 [N] their classes.
        pairs_per_digit: P, partners per base digit (paper: 1000); the logical set has N * P pairs.
        num_pairs: pairs per epoch, the split's length (None: all N * P).
        shift: maximum translation on each axis (official 6; the paper's text says 4).
        pad: zero padding of each digit (4: 28x28 -> 36x36).
        seed: keys every draw; give the training and test splits their own.
        regenerate: True for training (partners, shifts and the epoch's bases
            redrawn every epoch); False for evaluation (epoch ignored: a fixed set).
        name: shown in logs.
        num_classes: width of the two-hot labels.
        transforms: applied by the loader to the merged image only (default none:
            the paper's shifts are part of the generation).

    See the module docstring for exactly which pair index i of an epoch is.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, pairs_per_digit: int = 1000,
                 num_pairs: int | None = None, shift: int = 6, pad: int = 4, seed: int = 0,
                 regenerate: bool, name: str = "multimnist", num_classes: int = 10, transforms=()):
        images, labels = _check_digits(images, labels, num_classes)
        if shift < 0 or pad < 0:
            raise DatasetError(f"multimnist shift={shift} and pad={pad} must be >= 0")
        super().__init__(name, images, labels, transforms=transforms)
        self.pools = OtherClassPools(labels.numpy(), num_classes)
        _check_pairs(self.pools, pairs_per_digit)
        total = len(labels) * pairs_per_digit
        if num_pairs is not None and not 1 <= num_pairs <= total:
            raise DatasetError(f"multimnist num_pairs={num_pairs} must be in [1, {total}] "
                               f"(digits x pairs_per_digit) or null (all)")
        self.pairs_per_digit, self.num_pairs = pairs_per_digit, total if num_pairs is None else num_pairs
        self.shift, self.pad, self.seed, self.regenerate = shift, pad, seed, regenerate
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.num_pairs

    @property
    def raw_shape(self) -> tuple[int, int, int]:
        """The merged canvas: (C, H + 2 pad, W + 2 pad), 1x36x36 for MNIST."""
        c, h, w = self.images.shape[1:]
        return (c, h + 2 * self.pad, w + 2 * self.pad)

    def locate(self, idx: torch.Tensor, epoch: int = 0) -> dict:
        """Which digits and shifts index idx [b] of an epoch is: base, partner, slot [b]; base/partner_offset [b, 2]."""
        i = torch.as_tensor(idx).cpu().numpy().astype(np.int64).reshape(-1)
        if i.size and (i.min() < 0 or i.max() >= self.num_pairs):
            raise IndexError(f"{self.name}: pair index out of range [0, {self.num_pairs})")
        e = epoch if self.regenerate else 0
        n = len(self.labels)
        slot = i // n
        base = permute(i % n, n, _key(self.seed, e, _ORDER))
        partner = self.pools.partners(base, slot, _key(self.seed, e, _PARTNER))
        shifts = _key(self.seed, e, _SHIFT)
        found = {"base": base, "partner": partner, "slot": slot,
                 "base_offset": _uniform_offsets(shifts, base, 0, self.shift),
                 "partner_offset": _uniform_offsets(shifts, base, slot + 1, self.shift)}
        return {k: torch.from_numpy(v) for k, v in found.items()}

    def get(self, idx: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(merged uint8 [b, 1, H, W], two-hot float [b, K], {"reconstruction": uint8 [b, 2, 1, H, W],
        "recon_classes": int64 [b, 2]}), base digit first; a pure function of (seed, epoch, idx)."""
        where = self.locate(idx, epoch)
        parts = [shift_zero_fill(pad_digits(self.images[where[k]], self.pad), where[f"{k}_offset"])
                 for k in ("base", "partner")]
        classes = torch.stack([self.labels[where["base"]], self.labels[where["partner"]]], 1)
        two_hot = F.one_hot(classes, self.num_classes).sum(1).float()
        targets = {"reconstruction": torch.stack(parts, 1), "recon_classes": classes}
        return merge(*parts), two_hot, targets


def _check_digits(images, labels, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DatasetError(f"multimnist digits must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise DatasetError(f"multimnist has {len(images)} digits but labels of shape {tuple(labels.shape)}: "
                           "pass one label per digit")
    labels = labels.long()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"multimnist labels must be in [0, {num_classes}): pass num_classes")
    return images.cpu().contiguous(), labels.cpu().contiguous()


# --- the data source -----------------------------------------------------------------

class MultiMNIST(TorchvisionImages):
    """MNIST whose splits are MultiMNIST pairs: a data source (`train()`, `evals()`) for configs/dataset/.

    Args (beyond `TorchvisionImages`'; `shift` there, the single-digit random
    shift, must stay 0: the pairs carry their own):
        pairs_per_digit: partners per base digit (paper: 1000).
        train_pairs: pairs per training epoch (default: N, each digit once as a
            base with a fresh partner; null: all N * pairs_per_digit).
        test_pairs: pairs of each evaluation set (default 10,000 for per-epoch
            evaluation; null: the full N * pairs_per_digit, the paper's 10M).
        pair_shift, pad: SPEC 5.1 (official 6 and 4).
        test_seed: keys the evaluation sets, fixed across runs so that every run
            is scored on the same pairs; training uses the run's `seed`.
    """

    def __init__(self, dataset: str = "torchvision.datasets.MNIST", *, pairs_per_digit: int = 1000,
                 train_pairs: int | None | str = "digits", test_pairs: int | None = 10_000,
                 pair_shift: int = 6, pad: int = 4, test_seed: int = 0, **kwargs):
        if kwargs.get("shift"):
            raise DatasetError("multimnist takes dataset.pair_shift, not dataset.shift: set dataset.shift=0")
        super().__init__(dataset, **kwargs)
        self.pairs_per_digit, self.train_pairs, self.test_pairs = pairs_per_digit, train_pairs, test_pairs
        self.pair_shift, self.pad, self.test_seed = pair_shift, pad, test_seed

    def _pairs(self, split: Split, *, regenerate: bool, num_pairs, seed: int) -> MultiMNISTSplit:
        pairs_per_digit = self.pairs_per_digit
        if self.subsets.get(split.name) is not None:  # a few digits (quick=on): as many partners as they have
            counts = torch.bincount(split.labels, minlength=self.num_classes)
            pairs_per_digit = max(1, min(pairs_per_digit, int(len(split.labels) - counts.max())))
        if num_pairs == "digits":
            num_pairs = len(split.labels)
        elif num_pairs is not None:
            num_pairs = min(num_pairs, len(split.labels) * pairs_per_digit)
        return MultiMNISTSplit(split.images, split.labels, pairs_per_digit=pairs_per_digit,
                               num_pairs=num_pairs, shift=self.pair_shift, pad=self.pad, seed=seed,
                               regenerate=regenerate, name=split.name, transforms=split.transforms,
                               num_classes=self.num_classes)

    def train(self) -> MultiMNISTSplit:
        if "pairs:train" not in self._cache:
            self._cache["pairs:train"] = self._pairs(super().train(), regenerate=True,
                                                     num_pairs=self.train_pairs, seed=self.seed)
        return self._cache["pairs:train"]

    def own_evals(self) -> dict:
        """The evaluation sets as pairs, each a fixed function of test_seed (+ its position)."""
        if "pairs:evals" not in self._cache:
            self._cache["pairs:evals"] = {
                name: self._pairs(split, regenerate=False, num_pairs=self.test_pairs, seed=self.test_seed + k)
                for k, (name, split) in enumerate(super().own_evals().items())}
        return self._cache["pairs:evals"]
