"""Capsule layers of Sabour et al. (2017), Figure 1: PrimaryCaps and DigitCaps."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from capsnet.errors import CapsnetError
from capsnet.routing import fused_cpu
from capsnet.routing.dynamic import KERNELS, DynamicRouting
from capsnet.nn.features import check_init, init_layer, truncated_normal_
from capsnet.nn.squash import get_squash
from capsnet.types import RoutingOutput


class PrimaryCapsules(nn.Module):
    """A convolution whose channels are read as `capsules` types of `capsule_dim`-D vectors.

    MNIST: 256 -> 32 x 8 channels, 9x9 stride 2, giving 32 x 6 x 6 = 1152
    capsules of 8D, each squashed (paper section 4). `padding="same"` is
    TensorFlow's SAME (ceil(H / stride) outputs, the odd pixel of padding at
    the bottom and right), as the official code uses on CIFAR-10.

    The official code builds this layer as a convolutional capsule layer with
    one routing iteration over the `capsules` types (capsule_model.py lines
    54-65): uniform couplings 1/capsules, so its pre-activation is the
    convolution divided by the number of types, plus a bias added after the
    division (layers.py lines 110-113). `divide_by_types=True` does the same
    (the bias is the convolution's own, so the parameters keep their names);
    `init="truncated_normal"` is that layer's initialisation (std 0.1, bias
    0.1: layers.py lines 316-319).

    `kernel` ("auto" | "cpp" | "torch", the configs pass `routing.kernel`):
    on a CPU the reshape and squash run as one compiled pass each way
    (`capsnet.routing.fused_cpu.ChannelSquashFunction`), the same maths as
    the PyTorch operations below, which run otherwise.
    """

    def __init__(self, in_channels: int, capsules: int = 32, capsule_dim: int = 8,
                 kernel_size: int = 9, stride: int = 2, squash: str | None = "paper", padding: int | str = 0,
                 divide_by_types: bool = False, init: str = "default", init_std: float = 0.1,
                 bias_init: float = 0.1, kernel: str = "auto"):
        super().__init__()
        kernel = getattr(kernel, "value", kernel)
        if kernel not in KERNELS:
            raise CapsnetError(f"model.primary.kernel={kernel} is unknown: choose one of {', '.join(KERNELS)}")
        self.kernel, self.squash_name = kernel, squash
        check_init(init, "model.primary")
        self.capsules, self.capsule_dim = capsules, capsule_dim
        self.same = padding == "same"
        self.divide_by_types = divide_by_types
        self.conv = nn.Conv2d(in_channels, capsules * capsule_dim, kernel_size, stride,
                              padding=0 if self.same else padding)
        init_layer(self.conv, init, init_std, bias_init)
        self.squash = get_squash(squash) if squash else None

    def _pad_same(self, x: torch.Tensor) -> torch.Tensor:
        (k, _), (s, _) = self.conv.kernel_size, self.conv.stride
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return torch.nn.functional.pad(x, pads)

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution [B, capsules * capsule_dim, H', W'] before the reshape and squash."""
        x = self._pad_same(x) if self.same else x
        if not self.divide_by_types:
            return self.conv(x)
        c = self.conv
        y = F.conv2d(x, c.weight, None, c.stride, c.padding, c.dilation, c.groups) / self.capsules
        return y + c.bias.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.preactivation(x)
        if self.squash is not None and fused_cpu.use_kernel(self.kernel, y.device):
            return fused_cpu.ChannelSquashFunction.apply(y, self.capsule_dim, self.squash_name)
        bsz, _, h, w = y.shape
        u = y.view(bsz, self.capsules, self.capsule_dim, h, w).permute(0, 1, 3, 4, 2)
        u = u.reshape(bsz, self.capsules * h * w, self.capsule_dim)
        return self.squash(u) if self.squash else u


class FeatureCapsules(nn.Module):
    """Reads a feature map [B, C, H, W] as H*W capsules of C dims (the Keras variant's input)."""

    def __init__(self, in_channels: int, squash: str | None = None):
        super().__init__()
        self.squash = get_squash(squash) if squash else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.flatten(2).transpose(1, 2)
        return self.squash(u) if self.squash else u


class ClassCapsules(nn.Module):
    """DigitCaps: u_hat[j|i] = W_ij u_i for every pair, then routing to `out_capsules`.

    One batched matmul over i (never a per-sample copy of W); with dynamic
    routing the votes are made inside the routing's own autograd function
    (`DynamicRouting.route_transformed`), which saves memory traffic. With
    `shared_transform` one W serves every lower capsule (Keras variant);
    `bias` adds the official code's learned bias to s before the squash,
    starting at `bias_init` (official: 0.1, layers.py line 177). `init`:
    "normal" draws W from N(0, init_std) (std 0.01, as most re-implementations);
    "truncated_normal" is the official code's (std 0.1, layers.py line 175).
    `routing` is a routing module, or a factory (a Hydra `_partial_`) that is
    called with the layer's sizes, for routings with parameters of their own.
    """

    def __init__(self, in_capsules: int, in_dim: int, out_capsules: int, out_dim: int = 16,
                 routing=None, shared_transform: bool = False,
                 bias: bool = False, init: str = "normal", init_std: float = 0.01, bias_init: float = 0.0):
        super().__init__()
        if init not in ("normal", "truncated_normal"):
            raise CapsnetError(f"model.class_caps.init={init} is unknown: choose normal or truncated_normal")
        self.in_capsules, self.in_dim = in_capsules, in_dim
        self.out_capsules, self.out_dim = out_capsules, out_dim
        self.shared_transform = shared_transform
        n_w = 1 if shared_transform else in_capsules
        if init == "normal":  # the paper protocol's draws, unchanged
            self.weight = nn.Parameter(torch.randn(n_w, in_dim, out_capsules * out_dim) * init_std)
        else:
            self.weight = nn.Parameter(truncated_normal_(torch.empty(n_w, in_dim, out_capsules * out_dim), init_std))
        self.bias = nn.Parameter(torch.full((out_capsules, out_dim), float(bias_init))) if bias else None
        if routing is None:
            routing = DynamicRouting()
        elif not isinstance(routing, nn.Module):
            routing = routing(in_capsules=in_capsules, out_capsules=out_capsules, out_dim=out_dim)
        self.routing = routing

    def predictions(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, I, in_dim] -> u_hat [B, I, J, D] (a view of [I, B, J, D] storage)."""
        bsz, n_in, _ = u.shape
        j, d = self.out_capsules, self.out_dim
        if self.shared_transform:
            return torch.matmul(u, self.weight[0]).view(bsz, n_in, j, d)
        u_hat = torch.bmm(u.transpose(0, 1), self.weight)  # [I, B, J*D]: one matmul per lower capsule
        return u_hat.view(n_in, bsz, j, d).transpose(0, 1)  # a view; the routing picks its own layout

    def forward(self, u: torch.Tensor) -> RoutingOutput:
        """u [B, I, in_dim] -> RoutingOutput(v [B, J, D], activations [B, J], couplings [B, I, J])."""
        # The fast path makes the votes inside the routing. A recording routing (diagnostics) is also
        # called with the votes, where `capsnet.routing.diagnostics` reads them, but routes from (u, W)
        # all the same: recording changes no number.
        if not self.shared_transform and hasattr(self.routing, "route_transformed"):
            if not self.routing.record:
                return self.routing.route_transformed(u, self.weight, self.out_capsules, bias=self.bias)
            with torch.no_grad():
                votes = self.predictions(u)
            return self.routing(votes, bias=self.bias, transform=(u, self.weight))
        return self.routing(self.predictions(u), bias=self.bias)
