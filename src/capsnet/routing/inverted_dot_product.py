"""Inverted dot-product attention routing: Tsai, Srivastava, Goh, Salakhutdinov (ICLR 2020), Procedure 1.

The parents compete for the children (an attention inverted from the usual
direction). With votes v_ij = W_ij p_i (computed by the capsule layer) and
the parents' poses p_j from the previous iteration:

    a_ij = p_j . v_ij / sqrt(d)          (Eq. 2; 1/sqrt(d) as in the authors' code)
    r_ij = softmax_j(a_ij)               (over the PARENTS j: each child splits itself)
    p_j  = LayerNorm(sum_i r_ij v_ij)    (Eq. 3; LayerNorm over the d pose entries, learnable)

p_j = 0 before the first iteration, so the first iteration is uniform routing
(r_ij = 1/J), i.e. a plain feed-forward pass. A 4x4 matrix pose is read as a
16-vector here: agreement and LayerNorm act on its 16 entries.

`step` is one iteration; the capsule layers of `capsnet.nn.idpa_capsules`
call it directly because concurrent routing (section 2.2) interleaves the
iterations of several layers. `forward` runs `iters` iterations on fixed
votes: routing between one pair of layers (the sequential option). Softmax and
LayerNorm run in float32 with autocast off, as dynamic routing does.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from capsnet.errors import CapsnetError
from capsnet.nn.squash import at_least_float32
from capsnet.types import RoutingOutput


def inverted_agreement(votes: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """votes [B, I, J, D], parents [B, J, D] -> a [B, I, J] = p_j . v_ij / sqrt(D)."""
    a = torch.matmul(votes.transpose(1, 2), parents.unsqueeze(-1)).squeeze(-1)  # [B, J, I]
    return a.transpose(1, 2) / math.sqrt(votes.shape[-1])


class InvertedDotProductRouting(nn.Module):
    """Routing for one pair of capsule layers; owns that layer's LayerNorm (learnable gain and bias).

    Args:
        iters: routing iterations (the paper's CIFAR-10 setting: 2; 1 = feed-forward, uniform).
        out_dim: pose size D of the parents (16 for 4x4 matrix poses): the LayerNorm's width.
        eps: LayerNorm epsilon (PyTorch's default, as in the authors' code).
    Extra keyword arguments of the layer factory (`in_capsules`, `out_capsules`) are accepted and unused.
    """

    def __init__(self, iters: int = 2, out_dim: int = 16, eps: float = 1e-5, **kwargs):
        super().__init__()
        if int(iters) != iters or iters < 1:
            raise CapsnetError(f"inverted dot-product routing: iters must be a whole number >= 1, got {iters!r}")
        if int(out_dim) != out_dim or out_dim < 1:
            raise CapsnetError(f"inverted dot-product routing: out_dim must be a whole number >= 1, got {out_dim!r}")
        self.iters, self.out_dim = int(iters), int(out_dim)
        self.norm = nn.LayerNorm(self.out_dim, eps=eps)
        self.record = False
        self.recorded: dict = {}

    def step(self, votes: torch.Tensor, parents: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration: votes [B, I, J, D], previous parents [B, J, D] or None -> (poses [B, J, D], r [B, I, J])."""
        with torch.autocast(votes.device.type, enabled=False):
            u = at_least_float32(votes)
            bsz, n_in, n_out, _ = u.shape
            if parents is None:  # p_j = 0: every agreement is 0, the softmax is uniform
                r = u.new_full((bsz, n_in, n_out), 1.0 / n_out)
                s = u.sum(1) / n_out
            else:
                r = torch.softmax(inverted_agreement(u, parents.to(u.dtype)), dim=2)
                s = torch.matmul(r.transpose(1, 2).unsqueeze(2), u.transpose(1, 2)).squeeze(2)  # [B, J, D]
            if bias is not None:
                s = s + bias.to(u.dtype)
            poses = F.layer_norm(s, (self.out_dim,), self.norm.weight.to(u.dtype), self.norm.bias.to(u.dtype),
                                 self.norm.eps)
        return poses, r

    def forward(self, votes: torch.Tensor, activations: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> RoutingOutput:
        """votes [B, I, J, D] -> RoutingOutput(poses [B, J, D], activations [B, J], r [B, I, J]).

        The algorithm has no presence probabilities: `activations` (input) is
        unused, and the returned activations are the share of the children
        routed to each parent, mean_i r_ij (in [0, 1], summing to 1 over j).
        """
        if votes.dim() != 4 or votes.shape[-1] != self.out_dim:
            raise CapsnetError(f"inverted dot-product routing expects votes [B, I, J, {self.out_dim}], "
                               f"got {tuple(votes.shape)}: set the routing's out_dim to the pose size")
        parents, history = None, []
        for _ in range(self.iters):
            parents, r = self.step(votes, parents, bias)
            history.append(r)
        self.recorded = {"couplings": [x.detach() for x in history]} if self.record else {}
        return RoutingOutput(parents, r.mean(1), r)

    def extra_repr(self) -> str:
        return f"iters={self.iters}, out_dim={self.out_dim}"
