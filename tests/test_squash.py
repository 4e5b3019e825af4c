import math

import pytest
import torch

from capsnet.nn.squash import get_squash, squash, squash_efficient, squash_keras


def reference_scale(length: float, variant: str) -> float:
    """The factor that multiplies s, written from the formulas in SPEC section 1."""
    if variant == "paper":
        return (length ** 2 / (1 + length ** 2)) / length
    if variant == "keras":
        return length / (0.5 + length ** 2)
    return (1 - math.exp(-length)) / length


@pytest.mark.parametrize("variant", ["paper", "keras", "efficient"])
def test_squash_matches_formula_keeps_direction_and_stays_below_one(variant):
    # lengths up to ~10: beyond ~17, 1 - exp(-|s|) is exactly 1 in float32 (a limit of the format)
    s = torch.randn(64, 7, dtype=torch.float64) * torch.logspace(-2, 0.5, 64, dtype=torch.float64)[:, None]
    v = get_squash(variant)(s)
    for row_s, row_v in zip(s, v):
        n = row_s.norm().item()
        expected = row_s * reference_scale(n, variant)
        torch.testing.assert_close(row_v.double(), expected, rtol=1e-5, atol=1e-7)
    cos = torch.nn.functional.cosine_similarity(v.double(), s, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-6)
    assert (v.norm(dim=-1) < 1).all()


@pytest.mark.parametrize("fn", [squash, squash_keras, squash_efficient])
def test_zero_vector_gives_zero_and_finite_gradient(fn):
    s = torch.zeros(3, 8, requires_grad=True)
    v = fn(s)
    v.sum().backward()
    assert torch.equal(v, torch.zeros_like(v))
    assert torch.isfinite(s.grad).all()


def test_squash_runs_in_float32_under_autocast():
    s = torch.randn(4, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = squash(s)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, squash(s.float()))


def test_squash_acts_along_the_given_dim():
    s = torch.randn(5, 3, 4)
    torch.testing.assert_close(squash(s, dim=1), squash(s.transpose(1, 2)).transpose(1, 2))


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="paper"):
        get_squash("papr")
