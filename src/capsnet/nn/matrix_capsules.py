"""Matrix capsule layers of Hinton, Sabour, Frosst (ICLR 2018), section 3 and Figure 1.

A capsule layer's output is a pair: poses [N, H, W, T, 16] (4x4 matrices
flattened row-major) and activations [N, H, W, T], for T capsule types on an
H x W grid (channels last, so a kernel patch is a strided view).

Votes V_ij = M_i W_ij with one 4x4 W per (kernel position, input type, output
type), shared over positions. Routing is EM (`capsnet.routing.em`), built per
layer from a factory called with in_capsules=, out_capsules= (output types),
out_dim=16.
"""

from __future__ import annotations

import torch
from torch import nn

from capsnet.errors import CapsnetError


def build_routing(routing, **sizes) -> nn.Module:
    """Complete a routing factory (a Hydra `_partial_`) for one layer; None gives EM routing's defaults."""
    if routing is None:
        from capsnet.routing.em import EMRouting
        routing = EMRouting
    if isinstance(routing, nn.Module):
        raise CapsnetError("matrix capsule layers need a routing factory, one per layer: set _partial_: true "
                           "in the routing config")
    return routing(**sizes)


def _transform_weight(*shape: int, std: float) -> nn.Parameter:
    """4x4 transforms, normal with `std` (default 1, as IBM's re-implementation).

    A parent's pose is a weighted mean of many votes that disagree at
    initialisation, so it is much smaller than they are; a variance-keeping
    std (0.5) lets the poses shrink layer after layer until the variances sit
    on the floor. std 1 keeps them clear of it.
    """
    return nn.Parameter(torch.randn(*shape, 4, 4) * std)


class PrimaryMatrixCapsules(nn.Module):
    """A 1x1 convolution to `types` capsules: 16 pose entries and one sigmoid activation each (paper Fig. 1)."""

    def __init__(self, in_channels: int, types: int = 32):
        super().__init__()
        self.types = types
        self.conv = nn.Conv2d(in_channels, types * 17, kernel_size=1)

    def forward(self, x: torch.Tensor):
        """x [N, C, H, W] -> poses [N, H, W, T, 16], activations [N, H, W, T]."""
        y = self.conv(x).permute(0, 2, 3, 1)  # [N, H, W, T*17]
        poses, logits = y.split([self.types * 16, self.types], dim=-1)
        return poses.unflatten(-1, (self.types, 16)), torch.sigmoid(logits)


class ConvMatrixCapsules(nn.Module):
    """Convolutional capsules: K x K kernel, stride s, no padding (paper: ConvCaps1 K=3 s=2, ConvCaps2 K=3 s=1).

    Each child votes for every parent position whose receptive field holds it,
    and its responsibilities normalise over all those positions and all types.
    """

    def __init__(self, in_types: int, out_types: int, kernel_size: int = 3, stride: int = 1,
                 routing=None, w_std: float = 1.0):
        super().__init__()
        self.in_types, self.out_types, self.kernel_size, self.stride = in_types, out_types, kernel_size, stride
        self.weight = _transform_weight(kernel_size, kernel_size, in_types, out_types, std=w_std)
        self.routing = build_routing(routing, in_capsules=kernel_size * kernel_size * in_types,
                                     out_capsules=out_types, out_dim=16)

    def output_size(self, size: int) -> int:
        if size < self.kernel_size:
            raise CapsnetError(f"a {size}x{size} capsule grid is smaller than the {self.kernel_size}x"
                               f"{self.kernel_size} kernel: use larger images or fewer/smaller capsule layers")
        return (size - self.kernel_size) // self.stride + 1

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H, W, ...] -> [N, Ho, Wo, ..., K, K] (a strided view, no copy)."""
        k, s = self.kernel_size, self.stride
        return x.unfold(1, k, s).unfold(2, k, s)

    def child_index(self, height: int, width: int, device=None) -> torch.Tensor:
        """child_index [Ho*Wo, K*K*T]: which child (y*W*T + x*T + t) sits in each kernel slot of each position."""
        self.output_size(height), self.output_size(width)
        grid = torch.arange(height * width * self.in_types, device=device).view(1, height, width, self.in_types)
        idx = self._patches(grid)[0]  # [Ho, Wo, T, K, K]
        return idx.permute(0, 1, 3, 4, 2).flatten(0, 1).flatten(1)

    def votes(self, poses: torch.Tensor, activations: torch.Tensor):
        """poses [N,H,W,T,16], activations [N,H,W,T] -> votes [N, Ho*Wo, K*K*T, C, 16], a_in [N, Ho*Wo, K*K*T]."""
        n, h, w, t, _ = poses.shape
        if t != self.in_types:
            raise CapsnetError(f"ConvMatrixCapsules expects {self.in_types} input types, got {t}")
        m = self._patches(poses.unflatten(-1, (4, 4)))  # [N, Ho, Wo, T, 4, 4, K, K]
        v = torch.einsum("nyxtabkl,kltcbd->nyxkltcad", m, self.weight.to(poses.dtype))
        a = self._patches(activations).permute(0, 1, 2, 4, 5, 3)  # [N, Ho, Wo, K, K, T]
        return v.flatten(1, 2).flatten(2, 4).flatten(-2), a.flatten(1, 2).flatten(2)

    def forward(self, poses: torch.Tensor, activations: torch.Tensor):
        """-> poses [N, Ho, Wo, C, 16], activations [N, Ho, Wo, C]."""
        n, h, w, t, _ = poses.shape
        ho, wo = self.output_size(h), self.output_size(w)
        votes, a_in = self.votes(poses, activations)
        mu, a, _ = self.routing.route(votes, a_in, self.child_index(h, w, poses.device), h * w * t)
        return mu.view(n, ho, wo, self.out_types, 16), a.view(n, ho, wo, self.out_types)


def coordinate_offsets(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """[H, W, 16] offsets for coordinate addition: (row + 0.5)/H at V[0, 3], (col + 0.5)/W at V[1, 3].

    The paper adds "the scaled coordinate (row, column) of the centre of the
    receptive field" to the first two entries of the vote's right-hand
    column. Here the centre is the grid cell's centre scaled to [0, 1) (as
    in IBM's re-implementation); a valid-convolution stack's true receptive
    field centres are an affine map of it. IBM puts the column at V[0, 3]
    and the row at V[1, 3]; we follow the paper's (row, column) order.
    """
    rows = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    cols = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    off = torch.zeros(height, width, 16, device=device, dtype=dtype)
    off[:, :, 3] = rows.view(-1, 1)
    off[:, :, 7] = cols.view(1, -1)
    return off


class ClassMatrixCapsules(nn.Module):
    """Class capsules: every capsule of the last grid votes for every class; W shared over positions.

    With `coord_add` the votes carry their position (coordinate addition), so
    the shared W still knows where each vote comes from.
    """

    def __init__(self, in_types: int, num_classes: int, routing=None, coord_add: bool = True,
                 w_std: float = 1.0):
        super().__init__()
        self.in_types, self.num_classes, self.coord_add = in_types, num_classes, coord_add
        self.weight = _transform_weight(in_types, num_classes, std=w_std)
        self.routing = build_routing(routing, in_capsules=None, out_capsules=num_classes, out_dim=16)

    def votes(self, poses: torch.Tensor) -> torch.Tensor:
        """poses [N, H, W, T, 16] -> votes [N, H*W*T, K, 16]."""
        n, h, w, t, _ = poses.shape
        if t != self.in_types:
            raise CapsnetError(f"ClassMatrixCapsules expects {self.in_types} input types, got {t}")
        v = torch.einsum("nyxtab,tkbd->nyxtkad", poses.unflatten(-1, (4, 4)), self.weight.to(poses.dtype))
        v = v.flatten(-2)
        if self.coord_add:
            v = v + coordinate_offsets(h, w, poses.device, v.dtype).view(1, h, w, 1, 1, 16)
        return v.flatten(1, 3)

    def forward(self, poses: torch.Tensor, activations: torch.Tensor):
        """-> RoutingOutput(poses [N, K, 16], activations [N, K], couplings [N, H*W*T, K])."""
        return self.routing(self.votes(poses), activations.flatten(1))
