"""Matrix capsule layers, the smallNORB EM-routing network and the spread loss (Hinton, Sabour, Frosst 2018)."""

import functools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnet.errors import CapsnetError
from capsnet.losses.spread import SpreadLoss, spread_loss
from capsnet.models.matrix_capsnet import MatrixCapsNet, build_smallnorb_model
from capsnet.nn.matrix_capsules import ClassMatrixCapsules, ConvMatrixCapsules, PrimaryMatrixCapsules
from capsnet.routing.em import EMRouting
from capsnet.types import Batch, ModelOutput

ROOT = Path(__file__).resolve().parents[1]


def _capsules(n=2, h=5, w=5, t=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, w, t, 16, generator=g, dtype=dtype), torch.rand(n, h, w, t, generator=g, dtype=dtype)


def _conv(in_types=2, out_types=3, k=3, stride=2, **routing_kw):
    torch.manual_seed(0)
    return ConvMatrixCapsules(in_types, out_types, k, stride,
                              routing=functools.partial(EMRouting, **routing_kw)).double()


def test_primary_capsules_shapes_and_activations():
    layer = PrimaryMatrixCapsules(in_channels=6, types=4)
    poses, acts = layer(torch.randn(2, 6, 5, 7))
    assert poses.shape == (2, 5, 7, 4, 16) and acts.shape == (2, 5, 7, 4)
    assert ((acts > 0) & (acts < 1)).all()


def test_conv_votes_match_an_explicit_loop():
    """votes[n, (y, x), (kh, kw, t), c] = M[n, y*s+kh, x*s+kw, t] @ W[kh, kw, t, c]."""
    layer, (poses, acts) = _conv(k=3, stride=2), _capsules()
    votes, a_in = layer.votes(poses, acts)
    child = layer.child_index(5, 5)
    ho = wo = 2
    for n in range(2):
        for y in range(ho):
            for x in range(wo):
                slot = 0
                for kh in range(3):
                    for kw in range(3):
                        for t in range(2):
                            yy, xx = y * 2 + kh, x * 2 + kw
                            assert child[y * wo + x, slot] == (yy * 5 + xx) * 2 + t
                            assert a_in[n, y * wo + x, slot] == acts[n, yy, xx, t]
                            for c in range(3):
                                want = poses[n, yy, xx, t].view(4, 4) @ layer.weight[kh, kw, t, c]
                                torch.testing.assert_close(votes[n, y * wo + x, slot, c], want.flatten())
                            slot += 1


def test_conv_responsibilities_sum_to_one_across_positions():
    layer, (poses, acts) = _conv(k=3, stride=1), _capsules()
    layer.routing.record = True
    layer(poses, acts)
    child = layer.child_index(5, 5).flatten()
    for r in layer.routing.recorded["responsibilities"]:
        per_child = torch.zeros(2, 5 * 5 * 2, dtype=r.dtype).index_add(1, child, r.sum(-1).flatten(1))
        torch.testing.assert_close(per_child, torch.ones_like(per_child))  # stride 1: every child has parents
    # a centre child shares its responsibilities among 9 positions: none of them alone sums to 1
    r = layer.routing.recorded["responsibilities"][-1].sum(-1)
    assert (r[:, child.view(9, 18) == (2 * 5 + 2) * 2] < 0.999).all()


def test_conv_layer_is_translation_equivariant():
    """Content surrounded by inactive children, moved by one stride, moves the output by one position."""
    layer = _conv(k=3, stride=2)
    poses, acts = _capsules(1, 9, 9)
    acts = torch.zeros_like(acts)
    g = torch.Generator().manual_seed(5)
    content_p, content_a = torch.randn(1, 3, 3, 2, 16, generator=g, dtype=torch.float64), torch.rand(1, 3, 3, 2, generator=g, dtype=torch.float64)
    p1, a1, p2, a2 = poses.clone(), acts.clone(), poses.clone(), acts.clone()
    p1[:, 2:5, 2:5], a1[:, 2:5, 2:5] = content_p, content_a
    p2[:, 4:7, 4:7], a2[:, 4:7, 4:7] = content_p, content_a
    out_p1, out_a1 = layer(p1, a1)
    out_p2, out_a2 = layer(p2, a2)
    torch.testing.assert_close(out_a2[:, 1:, 1:], out_a1[:, :-1, :-1])
    torch.testing.assert_close(out_p2[:, 1:, 1:], out_p1[:, :-1, :-1])


def test_class_votes_share_w_and_add_coordinates():
    torch.manual_seed(0)
    layer = ClassMatrixCapsules(in_types=2, num_classes=3).double()
    poses, _ = _capsules(1, 3, 4, 2)
    votes = layer.votes(poses)
    assert votes.shape == (1, 3 * 4 * 2, 3, 16)
    for y in range(3):
        for x in range(4):
            for t in range(2):
                for k in range(3):
                    want = poses[0, y, x, t].view(4, 4) @ layer.weight[t, k]
                    want[0, 3] += (y + 0.5) / 3
                    want[1, 3] += (x + 0.5) / 4
                    torch.testing.assert_close(votes[0, (y * 4 + x) * 2 + t, k], want.flatten())
    layer.coord_add = False
    torch.testing.assert_close(layer.votes(poses)[0, 5, 1], (poses[0, 0, 2, 1].view(4, 4) @ layer.weight[1, 1]).flatten())


def test_model_forward_backward():
    model = MatrixCapsNet((1, 28, 28), 10, A=8, B=4, C=4, D=4)
    model.routing.record = True
    out = model(torch.randn(3, 1, 28, 28))
    assert isinstance(out, ModelOutput)
    assert out.scores.shape == (3, 10) and out.poses.shape == (3, 10, 16)
    assert ((out.scores > 0) & (out.scores < 1)).all()
    assert len(out.extras["couplings"]) == 3 and out.extras["couplings"][0].shape == (3, 3 * 3 * 4, 10)
    loss = SpreadLoss()(out, Batch(torch.zeros(3, 1, 28, 28), torch.tensor([0, 3, 9])))["loss"]
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.routing.record = False
    assert model(torch.randn(1, 1, 28, 28)).extras == {}
    model.double()  # every layer's routing (and its betas) is a registered submodule
    assert model.conv_caps1.routing.beta_a.dtype == torch.float64
    assert {"conv_caps1.routing.beta_u", "conv_caps2.routing.beta_a", "class_caps.routing.beta_a"} <= set(model.state_dict())


def _paper_count(channels, A, B, C, D, classes=5, k=3):
    """The paper's architecture counted by hand: conv1 5x5 (+bias), primary 1x1 to 16+1 per type (+bias),
    one 4x4 W per (kernel position, input type, output type), class W shared over positions, 2 betas per type."""
    conv1 = 5 * 5 * channels * A + A
    primary = A * B * 17 + B * 17
    conv_caps = k * k * B * C * 16 + k * k * C * D * 16
    class_caps = D * classes * 16
    betas = 2 * (C + D + classes)
    return conv1 + primary + conv_caps + class_caps + betas


@pytest.mark.parametrize("small,paper", [(False, 310_000), (True, 68_000)])
def test_parameter_counts_match_the_paper(small, paper):
    sizes = dict(A=64, B=8, C=16, D=16) if small else dict(A=32, B=32, C=32, D=32)
    for channels in (1, 2):
        model = build_smallnorb_model(small, in_shape=(channels, 32, 32))
        count = sum(p.numel() for p in model.parameters())
        assert count == _paper_count(channels, **sizes)
        assert abs(count - paper) / paper < 0.03  # the paper rounds: "310K", "68K"


@pytest.mark.parametrize("name,small", [("matrix_capsnet", False), ("matrix_capsnet_small", True)])
def test_yaml_builds_the_model(name, small):
    cfg = OmegaConf.load(ROOT / f"configs/model/{name}.yaml")
    assert {"override /loss": "spread"} in cfg.defaults and {"override /routing": "em"} in cfg.defaults
    cfg = OmegaConf.merge(cfg, {"routing": OmegaConf.load(ROOT / "configs/routing/em.yaml")})
    model = instantiate(cfg.model, in_shape=(2, 32, 32), num_classes=5)
    reference = build_smallnorb_model(small, in_shape=(2, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    assert model.conv_caps1.routing.iters == 3 and model.grid_sizes == [(14, 14), (6, 6), (4, 4)]


def test_bad_inputs_raise_capsnet_error():
    with pytest.raises(CapsnetError):
        MatrixCapsNet((1, 16, 16), 5)  # 16 -> 6 -> 2: too small for ConvCaps2's K=3
    with pytest.raises(CapsnetError):
        ConvMatrixCapsules(2, 3, routing=EMRouting(out_capsules=3))  # a module, not a factory


def _spread_by_hand(a, target, m):
    total = 0.0
    for n in range(len(a)):
        t = int(target[n])
        total += sum(max(0.0, m - (a[n][t] - a[n][i])) ** 2 for i in range(len(a[n])) if i != t)
    return total / len(a)


def test_spread_loss_against_a_hand_computation():
    a = torch.tensor([[0.9, 0.5, 0.8], [0.1, 0.7, 0.65]])
    target = torch.tensor([0, 1])
    # sample 0: (0.2 - 0.4)+ = 0, (0.2 - 0.1)^2 = 0.01; sample 1: (0.2 - 0.6)+ = 0, (0.2 - 0.05)^2 = 0.0225
    assert spread_loss(a, target, 0.2).item() == pytest.approx((0.01 + 0.0225) / 2)
    g = torch.Generator().manual_seed(0)
    a, target = torch.rand(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    for m in (0.2, 0.55, 0.9):
        assert spread_loss(a, target, m).item() == pytest.approx(_spread_by_hand(a.tolist(), target, m), rel=1e-6)
    loss = SpreadLoss()
    loss.margin = 0.9
    terms = loss(ModelOutput(scores=a), Batch(torch.zeros(6, 1, 2, 2), target))
    assert set(terms) == {"loss", "spread_loss"} and terms["loss"].dim() == 0
    assert terms["loss"].item() == pytest.approx(_spread_by_hand(a.tolist(), target, 0.9), rel=1e-6)


def test_spread_margin_schedule():
    loss = SpreadLoss()
    for fraction, margin in [(0.0, 0.2), (0.5, 0.55), (1.0, 0.9), (1.5, 0.9), (-1.0, 0.2)]:
        loss.set_progress(fraction)
        assert loss.margin == pytest.approx(margin)
    early = SpreadLoss(ramp=0.5)
    early.set_progress(0.25)
    assert early.margin == pytest.approx(0.55)
    early.set_progress(0.75)
    assert early.margin == pytest.approx(0.9)
    with pytest.raises(CapsnetError):
        SpreadLoss(ramp=0)
    built = instantiate(OmegaConf.load(ROOT / "configs/loss/spread.yaml"))
    assert isinstance(built, SpreadLoss) and built.margin == pytest.approx(0.2)


def test_whole_network_gradient_matches_finite_differences():
    """Conv1 -> primary -> two conv capsule layers -> class capsules -> spread loss, in float64: the analytic
    gradient of every parameter along a random direction equals a central difference (2 EM iterations, so
    the E-step's cross-position normalisation is on the path). A float32 cast anywhere would fail this."""
    torch.manual_seed(0)
    model = MatrixCapsNet((1, 16, 16), 3, A=3, B=2, C=2, D=2, conv1_stride=1,
                          routing=functools.partial(EMRouting, iters=2, final_lambda=0.05)).double()
    images, labels = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 2])

    def loss():
        return spread_loss(model(images).scores, labels, 0.5)

    grads = torch.autograd.grad(loss(), list(model.parameters()))
    for (name, p), g in zip(model.named_parameters(), grads):
        d, eps = torch.randn_like(p), 1e-6
        with torch.no_grad():
            p.add_(eps * d)
            up = loss()
            p.sub_(2 * eps * d)
            down = loss()
            p.add_(eps * d)
        assert ((up - down) / (2 * eps)).item() == pytest.approx((g * d).sum().item(), rel=1e-4, abs=1e-8), name
