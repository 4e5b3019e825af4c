"""MultiMNIST generation (SPEC 5.1), its metrics, the sigmoid cross-entropy and the baseline CNN.

The generated pairs are checked against the pixels alone: each part of a pair
must be found, among every (digit, translation) of the source digits computed
by an obviously correct reference, exactly once.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnet.data.multimnist import (MultiMNISTSplit, draw_partners, merge, pad_digits, permute,
                                     shift_zero_fill)
from capsnet.errors import DatasetError
from capsnet.losses.sigmoid_ce import SigmoidCrossEntropyLoss
from capsnet.metrics import TopKAccuracy
from capsnet.metrics.multilabel import AlmostAccuracy, PairAccuracy, PerLabelAccuracy
from capsnet.types import Batch, ModelOutput

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIFT, PAD, N, P = 6, 4, 12, 3


def fake_digits(n: int, seed: int = 0, classes: int = 4):
    """Random uint8 "digits" whose ink lies in the central 20x20 box, as MNIST's does."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    ink = torch.randint(1, 256, (n, 1, 20, 20), generator=g, dtype=torch.uint8)
    images[:, :, 4:24, 4:24] = ink * (torch.rand(n, 1, 20, 20, generator=g) < 0.5)
    labels = torch.arange(n) % classes
    return images, labels


def reference_shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a 2-D image by (dy, dx) onto a zero canvas of the same size, by plain slicing."""
    h, w = image.shape
    out = np.zeros_like(image)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def all_translations(images: torch.Tensor, pad: int, shift: int):
    """[N, S, H, W] every digit padded and translated by every offset; the S offsets."""
    offsets = list(itertools.product(range(-shift, shift + 1), repeat=2))
    padded = np.pad(images[:, 0].numpy(), ((0, 0), (pad, pad), (pad, pad)))
    cands = np.stack([[reference_shift(d, dy, dx) for dy, dx in offsets] for d in padded])
    return torch.from_numpy(cands), offsets


def find(part: torch.Tensor, cands: torch.Tensor, offsets) -> tuple[int, tuple[int, int]]:
    """The one (digit, offset) whose translation equals part [1, H, W]."""
    hits = (cands == part[0]).flatten(2).all(-1).nonzero().tolist()
    assert len(hits) == 1, f"part matches {len(hits)} (digit, translation) candidates"
    digit, k = hits[0]
    return digit, offsets[k]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batches of a few tiny images: intra-op threads only add waits on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return fake_digits(N)


@pytest.fixture(scope="module")
def decoded(digits):
    """The whole test set (N * P pairs), each part identified from its pixels."""
    images, labels = digits
    split = MultiMNISTSplit(images, labels, pairs_per_digit=P, shift=SHIFT, pad=PAD, seed=3,
                            regenerate=False, name="test")
    merged, two_hot, targets = split.get(torch.arange(len(split)))
    cands, offsets = all_translations(images, PAD, SHIFT)
    found = [[find(targets["reconstruction"][i, r], cands, offsets) for r in range(2)] for i in range(len(split))]
    return split, merged, two_hot, targets, found


# --- the generated pairs ---------------------------------------------------------------

def test_pairs_are_clipped_sums_of_two_translated_digits_of_different_classes(digits, decoded):
    images, labels = digits
    split, merged, two_hot, targets, found = decoded
    assert len(split) == N * P and split.in_shape == (1, 36, 36)
    assert merged.shape == (N * P, 1, 36, 36) and merged.dtype == torch.uint8
    parts = targets["reconstruction"].numpy().astype(np.int64)
    assert np.array_equal(merged.numpy(), np.minimum(parts[:, 0] + parts[:, 1], 255))
    for i, ((base, base_off), (partner, partner_off)) in enumerate(found):
        assert max(map(abs, base_off + partner_off)) <= SHIFT
        classes = [int(labels[base]), int(labels[partner])]
        assert classes[0] != classes[1]
        assert targets["recon_classes"][i].tolist() == classes
        assert two_hot[i].nonzero().flatten().tolist() == sorted(classes)
        assert two_hot[i].sum() == 2 and two_hot.dtype == torch.float32


def test_each_base_has_one_shift_and_distinct_partners(decoded):
    split, _, _, _, found = decoded
    by_base: dict = {}
    for (base, base_off), (partner, partner_off) in found:
        by_base.setdefault(base, []).append((base_off, partner))
    assert sorted(by_base) == list(range(N))
    for pairs in by_base.values():
        assert len(pairs) == P
        assert len({off for off, _ in pairs}) == 1
        assert len({partner for _, partner in pairs}) == P
    where = split.locate(torch.arange(len(split)))
    assert [(int(b), int(p)) for b, p in zip(where["base"], where["partner"])] == \
        [(b, p) for (b, _), (p, _) in found]


def test_shifts_cover_the_range_and_vary():
    images, labels = fake_digits(400, classes=10)
    split = MultiMNISTSplit(images, labels, pairs_per_digit=5, shift=SHIFT, regenerate=True, name="train")
    where = split.locate(torch.arange(len(split)), epoch=0)
    # the first 400 pairs are slot 0 of every base: each base shift once (it repeats over slots)
    offsets = torch.cat([where["base_offset"][:400], where["partner_offset"]])
    assert offsets.min() == -SHIFT and offsets.max() == SHIFT
    counts = torch.bincount((offsets + SHIFT).flatten(), minlength=2 * SHIFT + 1).double()
    expected = counts.sum() / (2 * SHIFT + 1)
    assert ((counts - expected).square() / expected).sum() < 45  # chi-square, 12 dof: p < 1e-5


def test_an_epoch_uses_every_base_once_per_round_and_redraws_per_epoch():
    images, labels = fake_digits(50, classes=5)
    split = MultiMNISTSplit(images, labels, pairs_per_digit=4, num_pairs=75, regenerate=True, name="train")
    epochs = [split.locate(torch.arange(75), epoch=e) for e in range(2)]
    for w in epochs:
        assert sorted(w["base"][:50].tolist()) == list(range(50))
        assert len(set(w["base"][50:].tolist())) == 25
        assert w["slot"].tolist() == [0] * 50 + [1] * 25
        for b in range(50):  # the base shift is shared within an epoch
            assert len({tuple(o) for o in w["base_offset"][w["base"] == b].tolist()}) == 1
    assert set(epochs[0]["base"][50:].tolist()) != set(epochs[1]["base"][50:].tolist())
    for key in ("partner", "base_offset", "partner_offset"):
        a = dict(zip(epochs[0]["base"][:50].tolist(), epochs[0][key][:50].tolist()))
        b = dict(zip(epochs[1]["base"][:50].tolist(), epochs[1][key][:50].tolist()))
        assert sum(a[k] != b[k] for k in a) > 25


# --- determinism -----------------------------------------------------------------------

def _get_in(split, idx, epoch, chunks):
    outs = [split.get(part, epoch) for part in idx.tensor_split(chunks)]
    return (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]),
            {k: torch.cat([o[2][k] for o in outs]) for k in outs[0][2]})


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


@pytest.mark.parametrize("regenerate", [False, True])
def test_get_depends_on_index_alone_whatever_the_batching(digits, regenerate):
    images, labels = digits
    make = lambda: MultiMNISTSplit(images, labels, pairs_per_digit=P, seed=1,  # noqa: E731
                                   regenerate=regenerate, name="s")
    split, idx = make(), torch.randperm(N * P)
    whole = split.get(idx, epoch=2)
    assert _same(whole, _get_in(split, idx, 2, 5))
    assert _same(whole, _get_in(make(), idx, 2, 1))  # a fresh object: a resumed run
    in_order = _get_in(split, torch.arange(N * P), 2, 4)  # another order, other batches
    assert torch.equal(in_order[0][idx], whole[0]) and torch.equal(in_order[1][idx], whole[1])
    ranks = [split.get(idx[r::2], epoch=2) for r in range(2)]  # two DDP processes, interleaved
    merged = torch.empty_like(whole[0])
    merged[0::2], merged[1::2] = ranks[0][0], ranks[1][0]
    assert torch.equal(merged, whole[0])
    other_epoch = split.get(idx, epoch=3)
    assert _same(whole, other_epoch) != regenerate
    if regenerate:
        changed = (other_epoch[0] != whole[0]).flatten(1).any(1).float().mean()
        assert changed > 0.8
    reseeded = MultiMNISTSplit(images, labels, pairs_per_digit=P, seed=2, regenerate=regenerate, name="s")
    assert not torch.equal(reseeded.get(idx, epoch=2)[0], whole[0])


def test_get_rejects_indices_out_of_range(digits):
    split = MultiMNISTSplit(*digits, pairs_per_digit=P, num_pairs=10, regenerate=False, name="s")
    with pytest.raises(IndexError):
        split.get(torch.tensor([10]))
    with pytest.raises(IndexError):
        split.get(torch.tensor([-1]))


# --- partners and the permutation ------------------------------------------------------

def test_draw_partners_are_distinct_other_class_digits():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 9)
    pool = {c: int((labels != c).sum()) for c in range(3)}
    partners = draw_partners(labels, 12, torch.Generator().manual_seed(0))
    assert partners.shape == (21, 12)
    for b, row in enumerate(partners.tolist()):
        assert len(set(row)) == 12
        assert all(labels[p] != labels[b] for p in row)
    full = draw_partners(labels[:12], 5, torch.Generator().manual_seed(1))  # classes 0 and 1: pools of 5 and 7
    for b in range(7):
        assert sorted(full[b].tolist()) == list(range(7, 12))
    assert len({tuple(r) for r in full[:7].tolist()}) > 1
    assert pool[2] >= 12


@pytest.mark.parametrize("bound", [1, 2, 7, 64, 1000, 5421])
def test_permute_is_a_bijection(bound):
    from capsnet.data.multimnist import _key
    for stream in range(3):
        y = permute(np.arange(bound), bound, _key(5, stream, 0))
        assert np.array_equal(np.sort(y), np.arange(bound))


def test_permute_spreads_uniformly_over_keys():
    from capsnet.data.multimnist import _hash, _key
    keys = _hash(_key(0, 0, 0), np.arange(4000))
    first = permute(np.zeros(4000, np.int64), 1000, keys)
    counts = np.bincount(first // 100, minlength=10)
    assert ((counts - 400.0) ** 2 / 400.0).sum() < 40  # chi-square, 9 dof: p < 1e-5


# --- pure image functions --------------------------------------------------------------

def test_shift_zero_fill_matches_the_reference_and_never_wraps():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (9, 2, 7, 6), generator=g, dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [1, -2], [-3, 4], [6, 0], [0, -5], [7, 6], [-9, 1], [2, 2], [-1, -1]])
    out = shift_zero_fill(images, offsets)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for n, (dy, dx) in enumerate(offsets.tolist()):
        for c in range(2):
            assert np.array_equal(out[n, c].numpy(), reference_shift(images[n, c].numpy(), dy, dx))


def test_pad_and_merge():
    images = torch.full((2, 1, 28, 28), 7, dtype=torch.uint8)
    padded = pad_digits(images, 4)
    assert padded.shape == (2, 1, 36, 36) and padded[:, :, 4:32, 4:32].eq(7).all() and padded.sum() == 2 * 28 * 28 * 7
    a = torch.arange(256, dtype=torch.uint8).view(16, 16)
    b = a.t().contiguous()
    expected = [[min(int(x) + int(y), 255) for x, y in zip(ra, rb)] for ra, rb in zip(a.tolist(), b.tolist())]
    assert merge(a, b).tolist() == expected and merge(a, b).dtype == torch.uint8


@pytest.mark.parametrize("kwargs, problem", [
    (dict(pairs_per_digit=20), "pairs_per_digit"), (dict(num_pairs=0), "num_pairs"),
    (dict(num_pairs=N * P + 1), "num_pairs"), (dict(shift=-1), "shift")])
def test_bad_settings_name_the_problem(digits, kwargs, problem):
    args = dict(pairs_per_digit=P, regenerate=True, name="s") | kwargs
    with pytest.raises(DatasetError, match=problem):
        MultiMNISTSplit(*digits, **args)


def test_one_class_is_refused():
    images, _ = fake_digits(4)
    with pytest.raises(DatasetError, match="2 classes"):
        MultiMNISTSplit(images, torch.zeros(4, dtype=torch.long), pairs_per_digit=1, regenerate=False)


# --- metrics ---------------------------------------------------------------------------

def _totals(metric, scores, labels):
    sums = metric.sums(ModelOutput(scores=scores), Batch(torch.zeros(len(scores), 1, 1, 1), labels))
    return metric.compute({k: float(v) for k, v in sums.items()} | {"count": float(len(scores))})


def test_metrics_on_hand_cases():
    labels = torch.zeros(3, 10)
    labels[:, [1, 3]] = 1.0
    scores = torch.full((3, 10), -1.0)
    scores[0, 3], scores[0, 1] = 2.0, 1.0   # both right
    scores[1, 1], scores[1, 5] = 2.0, 1.0   # one right
    scores[2, 0], scores[2, 2] = 2.0, 1.0   # none right
    pair = _totals(PairAccuracy(), scores, labels)
    assert pair["pair_accuracy"] == pytest.approx(100 / 3) and pair["pair_error"] == pytest.approx(200 / 3)
    assert _totals(AlmostAccuracy(), scores, labels) == {"almost_accuracy": pytest.approx(200 / 3)}
    assert _totals(PerLabelAccuracy(), scores, labels) == {"label_accuracy": pytest.approx(50.0)}


def test_metrics_match_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 10, generator=g)
    labels = torch.zeros(200, 10)
    for i in range(200):
        labels[i, torch.randperm(10, generator=g)[:2]] = 1.0
    pair = almost = per_label = 0.0
    for s, t in zip(scores.tolist(), labels.tolist()):
        top2 = set(sorted(range(10), key=lambda k: -s[k])[:2])
        hits = len(top2 & {k for k in range(10) if t[k] == 1.0})
        pair, almost, per_label = pair + (hits == 2), almost + (hits >= 1), per_label + hits / 2
    assert _totals(PairAccuracy(), scores, labels)["pair_accuracy"] == pytest.approx(pair / 2)
    assert _totals(AlmostAccuracy(), scores, labels)["almost_accuracy"] == pytest.approx(almost / 2)
    assert _totals(PerLabelAccuracy(), scores, labels)["label_accuracy"] == pytest.approx(per_label / 2)
    ids = labels.argmax(1)  # one label per image: all three reduce to top-1 accuracy
    top1 = _totals(TopKAccuracy(), scores, ids)["accuracy"]
    for metric in (PairAccuracy(), AlmostAccuracy(), PerLabelAccuracy()):
        assert list(_totals(metric, scores, ids).values())[0] == pytest.approx(top1)


def test_metrics_config_builds_the_three_metrics():
    metrics = instantiate(OmegaConf.load(CONFIGS / "metrics" / "multimnist.yaml"))
    assert [type(m) for m in metrics.values()] == [PairAccuracy, AlmostAccuracy, PerLabelAccuracy]


# --- loss and baseline -----------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_sigmoid_cross_entropy_matches_a_hand_computation(scale):
    g = torch.Generator().manual_seed(0)
    scores = (3 * torch.randn(4, 10, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.zeros(4, 10)
    labels[torch.arange(4), torch.tensor([0, 3, 5, 9])] = 1.0
    labels[torch.arange(4), torch.tensor([1, 2, 6, 8])] = 1.0
    loss = SigmoidCrossEntropyLoss(target_scale=scale)(ModelOutput(scores=scores), Batch(None, labels))
    expected = 0.0
    for s, t in zip(scores.tolist(), labels.tolist()):
        for x, y in zip(s, t):
            p, y = 1 / (1 + math.exp(-x)), y * scale
            expected -= (y * math.log(p) + (1 - y) * math.log(1 - p)) / 40
    assert loss["loss"].item() == pytest.approx(expected, rel=1e-5) and loss["bce_loss"] is loss["loss"]
    loss["loss"].backward()
    reference = (torch.sigmoid(scores.detach()) - labels.double() * scale) / 40
    assert torch.allclose(scores.grad.double(), reference, atol=1e-6)
    one_hot = SigmoidCrossEntropyLoss()(ModelOutput(scores=scores.detach()), Batch(None, labels.argmax(1)))
    first = torch.zeros(4, 10)
    first[torch.arange(4), labels.argmax(1)] = 1.0
    direct = SigmoidCrossEntropyLoss()(ModelOutput(scores=scores.detach()), Batch(None, first))
    assert torch.allclose(one_hot["loss"], direct["loss"])


def test_baseline_cnn_has_the_papers_parameter_count():
    cfg = OmegaConf.load(CONFIGS / "model" / "baseline_cnn_multimnist.yaml")
    model = instantiate(cfg.model, in_shape=(1, 36, 36), num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 24_563_978  # SPEC 5.1, the paper's 24.56M
    out = model(torch.rand(2, 1, 36, 36))
    assert out.scores.shape == (2, 10)
    loss = instantiate(OmegaConf.load(CONFIGS / "loss" / "sigmoid_ce.yaml"))
    assert isinstance(loss, SigmoidCrossEntropyLoss) and loss.target_scale == 1.0


def test_the_loader_turns_a_split_into_batches(digits):
    from capsnet.data.loader import BatchLoader
    split = MultiMNISTSplit(*digits, pairs_per_digit=P, num_pairs=20, regenerate=True, name="train")
    loader = BatchLoader(split, batch_size=8, train=True, seed=0)
    loader.set_epoch(1)
    batches = list(loader)
    assert [len(b) for b in batches] == [8, 8, 4]
    b = batches[0]
    assert b.images.shape == (8, 1, 36, 36) and b.images.dtype == torch.float32 and b.images.max() <= 1
    assert b.recon_targets.shape == (8, 2, 1, 36, 36) and b.recon_classes.shape == (8, 2)
    assert torch.equal(b.labels.sum(1), torch.full((8,), 2.0))


def test_the_data_source_pairs_mnist_splits(tmp_path):
    from helpers import make_mnist

    from capsnet.data.multimnist import MultiMNIST
    root = make_mnist(tmp_path / "data", n_train=40, n_test=20)
    source = MultiMNIST(root=str(root), download=False, pairs_per_digit=5, test_pairs=30, val_size=10, seed=4)
    train, evals = source.train(), source.evals()
    assert isinstance(train, MultiMNISTSplit) and train.regenerate and len(train) == 30
    assert sorted(evals) == ["test", "val"] and [len(s) for s in evals.values()] == [30, 30]
    assert not evals["test"].regenerate and source.in_shape == (1, 36, 36) and source.num_classes == 10
    images, labels, targets = evals["test"].get(torch.arange(4))
    assert images.shape == (4, 1, 36, 36) and targets["recon_classes"].shape == (4, 2)
    with pytest.raises(DatasetError, match="pair_shift"):
        MultiMNIST(root=str(root), shift=2)
