"""Squash non-linearities: map a vector's length into [0, 1), keep its direction.

`paper` is Eq. 1 of Sabour et al. (2017); `keras` is the widely copied Keras
variant (0.5 in place of 1); `efficient` is Efficient-CapsNet's exponential
form. All are computed in float32, also under autocast: the squared norm plus
epsilon underflows in float16. The epsilon sits inside the square root, so a
zero vector gives a zero output and a finite gradient. (float64 stays float64.)
"""

from __future__ import annotations

import torch

EPS = 1e-8


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors become float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _norm2(s: torch.Tensor, dim: int) -> torch.Tensor:
    return s.square().sum(dim, keepdim=True)


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Paper Eq. 1: |s|^2 / (1 + |s|^2) * s / |s|."""
    s = at_least_float32(s)
    n2 = _norm2(s, dim)
    return s * (n2 / ((1.0 + n2) * torch.sqrt(n2 + EPS)))


def squash_keras(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Keras variant: |s| / (0.5 + |s|^2) * s, length |s|^2 / (0.5 + |s|^2)."""
    s = at_least_float32(s)
    n2 = _norm2(s, dim)
    return s * (torch.sqrt(n2 + EPS) / (0.5 + n2))


def squash_efficient(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Efficient-CapsNet: (1 - exp(-|s|)) * s / |s|."""
    s = at_least_float32(s)
    n = torch.sqrt(_norm2(s, dim) + EPS)
    return s * (-torch.expm1(-n) / n)


SQUASHES = {"paper": squash, "keras": squash_keras, "efficient": squash_efficient}


def get_squash(name: str):
    """The squash function called `name` (one of SQUASHES), as selected in a config."""
    try:
        return SQUASHES[name]
    except KeyError:
        raise ValueError(f"unknown squash {name!r}: choose one of {sorted(SQUASHES)}") from None
