"""Naive CapsNet parts, as most public re-implementations write them: the benchmark's reference.

`u_hat` comes from a per-sample copy of W (W expanded over the batch), the
weighted sum and the agreement are broadcast multiply-and-sum, and autograd
does the backward. Correct (tests check it against an explicit loop) and slow:
`python -m capsnet.tools.bench` shows by how much.
"""

from __future__ import annotations

import torch
from torch import nn

from capsnet.nn.squash import get_squash
from capsnet.types import RoutingOutput


def naive_routing(u_hat: torch.Tensor, iters: int, squash=get_squash("paper"), leaky: bool = False):
    """u_hat [B, I, J, D] -> (v [B, J, D], c [B, I, J]); softmax over j."""
    b = torch.zeros(u_hat.shape[:3], device=u_hat.device, dtype=u_hat.dtype)
    for r in range(iters):
        logits = torch.cat([b, torch.zeros_like(b[..., :1])], -1) if leaky else b
        c = torch.softmax(logits, -1)[..., : b.shape[-1]]
        v = squash((c.unsqueeze(-1) * u_hat).sum(1))
        if r < iters - 1:
            b = b + (u_hat * v.unsqueeze(1)).sum(-1)
    return v, c


class NaiveClassCapsules(nn.Module):
    """Drop-in for `ClassCapsules` (same parameters), computed the naive way."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    @property
    def out_dim(self):
        return self.layer.out_dim

    @property
    def routing(self):
        return self.layer.routing

    def forward(self, u: torch.Tensor):
        L = self.layer
        bsz, n_in, _ = u.shape
        w = L.weight.view(-1, L.in_dim, L.out_capsules, L.out_dim).expand(n_in, -1, -1, -1)
        w = w.permute(0, 2, 3, 1).unsqueeze(0).expand(bsz, -1, -1, -1, -1)  # [B, I, J, D, in_dim]
        u_hat = (w @ u.view(bsz, n_in, 1, L.in_dim, 1)).squeeze(-1)  # [B, I, J, D]
        v, c = naive_routing(u_hat, L.routing.iters, L.routing.squash, L.routing.leaky)
        return RoutingOutput(v, v.norm(dim=-1), c)
