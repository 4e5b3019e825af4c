"""Capsule layers of Tsai et al. (ICLR 2020), "Capsules with inverted dot-product attention routing".

Poses travel between layers as grids [B, N, H, W, D] (convolutional layers)
or lists [B, N, D] (class capsules); a 4x4 matrix pose is stored flat as D = 16.

- `IDPAPrimaryCapsules`: a convolution whose channels are grouped into
  capsules, then LayerNorm over each capsule's D entries (section 3, "primary
  capsules"), no squash.
- `IDPAConvCapsules`: a convolutional capsule layer (kernel K, stride S, valid
  padding). Semantics of the authors' code (`CapsuleCONV`): the parents at
  output position (y, x) see the K x K x N children of their receptive field;
  each child at kernel offset (k, l) votes through its own W[k, l, n, m]
  (shared over positions); a child inside several receptive fields (stride <
  K) routes to the parents of each of them, with the coefficients normalised
  over the M parent types of each receptive field SEPARATELY (softmax over m
  per (child, receptive field)), not jointly over every parent that sees it
  (EM routing's convention). Folding the output positions into the batch
  therefore makes a convolutional layer exactly the plain routing on votes
  [B * H' * W', K * K * N, M, D].
- `IDPAClassCapsules`: fully connected, one W per (child, class) pair (no
  sharing over positions, as in the authors' `CapsuleFC`).
- `route_capsule_layers`: concurrent routing (section 2.2: iteration 1 is a
  feed-forward pass with uniform routing through every layer; each later
  iteration updates every layer from the previous iteration's states) or
  sequential routing (all iterations of one layer before the next).

Votes are W_ij p_i: 4x4 matmuls for matrix poses, a D_in -> D_out map for
vector poses. (The authors' code multiplies p_i W_ij; with every layer using
the same convention the two are the same model up to transposing W.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from capsnet.errors import CapsnetError


def capsule_votes(x: torch.Tensor, weight: torch.Tensor, matrix_pose: bool) -> torch.Tensor:
    """x [B, I, D_in], weight (matrix [I, J, 4, 4] | vector [I, D_in, J, D_out]) -> votes [B, I, J, D_out]."""
    bsz, n_in, d_in = x.shape
    if matrix_pose:
        side = math.isqrt(d_in)
        pose = x.view(bsz, n_in, side, side)
        return torch.einsum("ijrk,bikc->bijrc", weight.to(x.dtype), pose).flatten(3)
    n_out, d_out = weight.shape[2:]
    votes = torch.bmm(x.transpose(0, 1), weight.flatten(2).to(x.dtype))  # one matmul per child: [I, B, J*D]
    return votes.view(n_in, bsz, n_out, d_out).transpose(0, 1)


def _transform_weight(n_in: int, in_dim: int, n_out: int, out_dim: int, matrix_pose: bool, fan: int) -> nn.Parameter:
    """W for every (child, parent) pair; scale sqrt(n_out / fan) as in the authors' code."""
    if matrix_pose:
        if in_dim != out_dim or math.isqrt(in_dim) ** 2 != in_dim:
            raise CapsnetError(f"matrix poses need equal square capsule sizes (e.g. 16 = 4x4), "
                               f"got {in_dim} -> {out_dim}: "
                               f"set matrix_pose: false or capsule_dim: 16")
        side = math.isqrt(in_dim)
        return nn.Parameter(torch.randn(n_in, n_out, side, side) * math.sqrt(n_out / (side * fan)))
    return nn.Parameter(torch.randn(n_in, in_dim, n_out, out_dim) * math.sqrt(n_out / (in_dim * fan)))


class IDPAPrimaryCapsules(nn.Module):
    """Conv (no bias) -> N capsules of D channels at every position -> LayerNorm over D. Output [B, N, H, W, D]."""

    def __init__(self, in_channels: int, capsules: int = 32, capsule_dim: int = 16, kernel_size: int = 1,
                 stride: int = 1, padding: int = 0):
        super().__init__()
        self.capsules, self.capsule_dim = capsules, capsule_dim
        self.conv = nn.Conv2d(in_channels, capsules * capsule_dim, kernel_size, stride, padding, bias=False)
        self.norm = nn.LayerNorm(capsule_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        bsz, _, h, w = y.shape
        y = y.view(bsz, self.capsules, self.capsule_dim, h, w).permute(0, 1, 3, 4, 2)
        return self.norm(y)


class IDPAConvCapsules(nn.Module):
    """Convolutional capsule layer [B, N, H, W, D] -> [B, M, H', W', D'] (module docstring: the semantics).

    `routing` is a routing factory (`_partial_` config) or a built
    `InvertedDotProductRouting`; it owns this layer's LayerNorm.
    """

    def __init__(self, in_capsules: int, in_dim: int, out_capsules: int, out_dim: int = 16, kernel_size: int = 3,
                 stride: int = 1, matrix_pose: bool = True, routing=None):
        super().__init__()
        self.in_capsules, self.out_capsules, self.out_dim = in_capsules, out_capsules, out_dim
        self.kernel_size, self.stride, self.matrix_pose = kernel_size, stride, matrix_pose
        children = kernel_size * kernel_size * in_capsules  # order (k, l, n)
        self.weight = _transform_weight(children, in_dim, out_capsules, out_dim, matrix_pose, children)
        self.routing = build_routing(routing, in_capsules=children, out_capsules=out_capsules, out_dim=out_dim)

    def votes(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, H, W, D] -> votes [B * H' * W', K * K * N, M, D'] (output positions folded into the batch)."""
        if x.dim() != 5 or x.shape[1] != self.in_capsules:
            raise CapsnetError(f"conv capsules expect poses [B, {self.in_capsules}, H, W, D], got {tuple(x.shape)}")
        k, s = self.kernel_size, self.stride
        if min(x.shape[2:4]) < k:
            raise CapsnetError(f"conv capsules: a {x.shape[2]}x{x.shape[3]} grid is smaller than the kernel {k}; "
                               f"use a smaller kernel_size or fewer strided layers")
        patches = x.unfold(2, k, s).unfold(3, k, s)  # [B, N, H', W', D, K, K]
        bsz, n, h, w, d = patches.shape[:5]
        patches = patches.permute(0, 2, 3, 5, 6, 1, 4).reshape(bsz * h * w, k * k * n, d)
        return capsule_votes(patches, self.weight, self.matrix_pose)

    def route(self, votes: torch.Tensor, parents: torch.Tensor | None, in_shape):
        """One routing step for children of shape `in_shape`; parents [B, M, H', W', D'] or None
        -> (poses [B, M, H', W', D'], r [B*H'*W', I, M])."""
        batch = in_shape[0]
        h, w = ((n - self.kernel_size) // self.stride + 1 for n in in_shape[2:4])
        flat = None if parents is None else parents.permute(0, 2, 3, 1, 4).reshape(batch * h * w, self.out_capsules, -1)
        poses, r = self.routing.step(votes, flat)
        return poses.view(batch, h, w, self.out_capsules, -1).permute(0, 3, 1, 2, 4), r


class IDPAClassCapsules(nn.Module):
    """Fully connected capsule layer: every child pose ([B, N, H, W, D] flattened, or [B, N, D]) -> [B, J, D']."""

    def __init__(self, in_capsules: int, in_dim: int, out_capsules: int, out_dim: int = 16,
                 matrix_pose: bool = True, routing=None):
        super().__init__()
        self.in_capsules, self.out_capsules, self.out_dim = in_capsules, out_capsules, out_dim
        self.matrix_pose = matrix_pose
        self.weight = _transform_weight(in_capsules, in_dim, out_capsules, out_dim, matrix_pose, in_capsules)
        self.routing = build_routing(routing, in_capsules=in_capsules, out_capsules=out_capsules, out_dim=out_dim)

    def votes(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1, -2)  # [B, N*H*W, D], children in (n, y, x) order
        if x.shape[1] != self.in_capsules:
            raise CapsnetError(f"class capsules were built for {self.in_capsules} children, got {x.shape[1]}: "
                               f"check the capsule layers' kernel sizes and strides")
        return capsule_votes(x, self.weight, self.matrix_pose)

    def route(self, votes: torch.Tensor, parents: torch.Tensor | None, in_shape=None):
        """One routing step: votes [B, I, J, D'], parents [B, J, D'] or None -> (poses [B, J, D'], r [B, I, J])."""
        return self.routing.step(votes, parents)


def build_routing(routing, **sizes):
    """A routing factory (`_partial_` config) is called with the layer's sizes; a built module is used as is."""
    if routing is None:
        from capsnet.routing.inverted_dot_product import InvertedDotProductRouting
        return InvertedDotProductRouting(**sizes)
    return routing if isinstance(routing, nn.Module) else routing(**sizes)


def _layer_step(layer, x: torch.Tensor, parents: torch.Tensor | None):
    return layer.route(layer.votes(x), parents, x.shape)


def route_capsule_layers(layers, x: torch.Tensor, iters: int, concurrent: bool = True):
    """Route poses x through `layers` for `iters` iterations -> (top poses, [r of the top layer per iteration]).

    Concurrent (section 2.2, Figure 3): iteration 1 runs every layer once with
    uniform routing; iteration t > 1 updates every layer l from iteration t-1's
    poses of layer l-1 (its children) and of layer l (its previous parents).
    Sequential: all iterations of layer l, then layer l+1; a layer's votes are
    computed once, since its children no longer change.
    """
    couplings = []
    if concurrent:
        states = [x]
        for layer in layers:
            poses, r = _layer_step(layer, states[-1], None)
            states.append(poses)
        couplings.append(r)
        for _ in range(iters - 1):
            new = [x]
            for l, layer in enumerate(layers):
                poses, r = _layer_step(layer, states[l], states[l + 1])
                new.append(poses)
            states = new
            couplings.append(r)
        return states[-1], couplings
    for layer in layers:
        votes, poses = layer.votes(x), None
        for _ in range(iters):
            poses, r = layer.route(votes, poses, x.shape)
            if layer is layers[-1]:
                couplings.append(r)
        x = poses
    return x, couplings
