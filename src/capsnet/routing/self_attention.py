"""Self-attention routing: Efficient-CapsNet (Mazzia, Salvetti, Chiaberge 2021, section 3.2, Eq. 3-6).

One non-iterative pass. Every vote u_hat[n|i] is scored by how much it agrees
with all the votes for the same output capsule n,

    a[n, i] = sum_k <u_hat[n|i], u_hat[n|k]> / sqrt(D)          (Eq. 4, the Gram form)
            = <u_hat[n|i], sum_k u_hat[n|k]> / sqrt(D)          (the O(n*D) form used here),

the scores become coupling coefficients by a softmax over the output capsules n
(Eq. 5), a learned prior b[n, i] (zeros at init) is added AFTER the softmax
(the authors' code: `c = softmax(c) + b`), and s[n] = sum_i u_hat[n|i] (c[n, i] + b[n, i])
(Eq. 6) is squashed with the efficient squash. The Gram form costs
O(I^2 D) per output capsule; summing the votes first costs O(I D) and gives the
same numbers (`tests/test_attention_routing.py` checks both agree).

Like dynamic routing, the softmax and squash run in float32 with autocast off.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from capsnet.errors import CapsnetError
from capsnet.nn.squash import at_least_float32, squash_efficient
from capsnet.types import RoutingOutput


def self_attention_agreement(votes: torch.Tensor) -> torch.Tensor:
    """votes [B, I, J, D] -> a [B, I, J] = <u_hat[j|i], sum_k u_hat[j|k]> / sqrt(D) (Eq. 4, O(I*D) form)."""
    total = votes.sum(1, keepdim=True)  # [B, 1, J, D]
    return (votes * total).sum(-1) / math.sqrt(votes.shape[-1])


class SelfAttentionRouting(nn.Module):
    """Efficient-CapsNet's routing between I input and J output capsules.

    Built by the capsule layer (a `_partial_` factory) with `in_capsules=I,
    out_capsules=J, out_dim=D`, because its prior b [J, I] is a parameter of
    the layer pair. `record = True` keeps the couplings as
    `self.recorded = {"couplings": [c]}` (one pass, so one entry).
    """

    def __init__(self, in_capsules: int, out_capsules: int, out_dim: int | None = None, **kwargs):
        super().__init__()
        if kwargs.get("iters", 1) != 1:
            raise CapsnetError(f"self-attention routing is a single pass: routing.iters={kwargs['iters']} does not "
                               "apply to it; leave routing.iters out (or 1)")
        for name, n in (("in_capsules", in_capsules), ("out_capsules", out_capsules)):
            if int(n) != n or n < 1:
                raise CapsnetError(f"self-attention routing: {name} must be a whole number >= 1, got {n!r}")
        self.in_capsules, self.out_capsules, self.out_dim = int(in_capsules), int(out_capsules), out_dim
        self.prior = nn.Parameter(torch.zeros(self.out_capsules, self.in_capsules))  # b[n, i], Eq. 6
        self.record = False
        self.recorded: dict = {}

    def forward(self, votes: torch.Tensor, activations: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> RoutingOutput:
        """votes [B, I, J, D] -> RoutingOutput(v [B, J, D], |v| [B, J], c [B, I, J]).

        `activations` is accepted for the common contract and unused (the
        algorithm has none); `bias` [J, D], if given, is added to s before the squash.
        """
        if votes.dim() != 4 or votes.shape[1:3] != (self.in_capsules, self.out_capsules):
            raise CapsnetError(f"self-attention routing expects votes [B, {self.in_capsules}, {self.out_capsules}, D], "
                               f"got {tuple(votes.shape)}: build it with the layer's in_capsules/out_capsules")
        with torch.autocast(votes.device.type, enabled=False):
            u = at_least_float32(votes)
            c = torch.softmax(self_attention_agreement(u), dim=2)  # over the output capsules n (Eq. 5)
            weights = c + self.prior.to(u.dtype).t()  # prior added after the softmax
            s = torch.einsum("bij,bijd->bjd", weights, u)
            if bias is not None:
                s = s + bias.to(u.dtype)
            v = squash_efficient(s)
            lengths = torch.sqrt(v.square().sum(-1) + 1e-12)
        self.recorded = {"couplings": [c.detach()]} if self.record else {}
        return RoutingOutput(v, lengths, c)

    def extra_repr(self) -> str:
        return f"in_capsules={self.in_capsules}, out_capsules={self.out_capsules}"
