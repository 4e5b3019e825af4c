"""PrimaryCaps' reshape and squash as one compiled pass (capsnet.routing.fused_cpu.ChannelSquashFunction)
against the PyTorch operations it replaces: values and gradients in float64 for every squash, autocast's
half-precision input, the zero capsule, the layer's choice of implementation and the config's."""

import pytest
import torch

from capsnet.errors import CapsnetError
from capsnet.nn.capsules import PrimaryCapsules
from capsnet.nn.squash import get_squash
from capsnet.routing.fused_cpu import ChannelSquashFunction
from capsnet.train.build import compose_config


def reshape_and_squash(y, dim, squash):
    """The PyTorch path of PrimaryCapsules: [B, C*K, H, W] -> [B, C*H*W, K] (capsule i = (c, h, w)), squashed."""
    bsz, ck, h, w = y.shape
    u = y.view(bsz, ck // dim, dim, h, w).permute(0, 1, 3, 4, 2).reshape(bsz, ck // dim * h * w, dim)
    return get_squash(squash)(u)


def values_and_grad(fn, y, grad):
    y = y.detach().clone().requires_grad_(True)
    out = fn(y)
    (gy,) = torch.autograd.grad(out, y, grad)
    return out, gy


@pytest.mark.parametrize("squash", ["paper", "keras", "efficient"])
def test_matches_reshape_and_squash_in_float64(squash):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 4 * 5, 3, 2, generator=g, dtype=torch.float64) * 0.7  # 4 types of 5D, 3x2 positions
    grad = torch.randn(3, 4 * 3 * 2, 5, generator=g, dtype=torch.float64)
    out, gy = values_and_grad(lambda t: ChannelSquashFunction.apply(t, 5, squash), y, grad)
    ref, gy_ref = values_and_grad(lambda t: reshape_and_squash(t, 5, squash), y, grad)
    assert out.shape == ref.shape == (3, 24, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gy, gy_ref, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: ChannelSquashFunction.apply(t, 5, squash),
                                    (y[:2, :10].detach().clone().requires_grad_(True),))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_precision_is_squashed_in_float32_as_capsnet_nn_squash_does(dtype):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 16, 6, 6, generator=g).to(dtype)
    grad = torch.randn(2, 2 * 36, 8, generator=g)
    out, gy = values_and_grad(lambda t: ChannelSquashFunction.apply(t, 8, "paper"), y, grad)
    ref, gy_ref = values_and_grad(lambda t: reshape_and_squash(t, 8, "paper"), y, grad)
    assert out.dtype == ref.dtype == torch.float32 and gy.dtype == gy_ref.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gy.float(), gy_ref.float(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-6)


def test_a_zero_capsule_gives_zero_and_a_finite_gradient():
    y = torch.zeros(1, 8, 2, 2, dtype=torch.float64)
    grad = torch.ones(1, 4, 8, dtype=torch.float64)
    out, gy = values_and_grad(lambda t: ChannelSquashFunction.apply(t, 8, "paper"), y, grad)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(gy).all()


@pytest.mark.parametrize("kernel, fused", [("auto", True), ("cpp", True), ("torch", False)])
def test_primary_capsules_take_the_kernel_they_are_given(monkeypatch, kernel, fused):
    calls = []
    apply = ChannelSquashFunction.apply
    monkeypatch.setattr(ChannelSquashFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(0)
    layer = PrimaryCapsules(3, capsules=4, capsule_dim=8, kernel_size=3, kernel=kernel)
    reference = PrimaryCapsules(3, capsules=4, capsule_dim=8, kernel_size=3, kernel="torch")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 11, 11)
    out, ref = layer(x), reference(x)
    assert bool(calls) == fused and out.shape == ref.shape == (2, 4 * 5 * 5, 8)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    (out * ref.detach()).sum().backward()
    (ref * ref.detach()).sum().backward()
    torch.testing.assert_close(layer.conv.weight.grad, reference.conv.weight.grad, rtol=1e-5, atol=1e-6)


def test_an_unknown_kernel_is_refused_in_one_line():
    with pytest.raises(CapsnetError, match="model.primary.kernel=fast is unknown: choose one of auto, cpp, torch"):
        PrimaryCapsules(3, kernel="fast")


@pytest.mark.parametrize("overrides, expected", [([], "auto"), (["routing.kernel=torch"], "torch"),
                                                 (["routing=self_attention"], "auto")])
def test_the_configs_primary_capsules_follow_routing_kernel(overrides, expected):
    cfg = compose_config(["model=capsnet", *overrides])
    assert cfg.model.primary.kernel == expected
