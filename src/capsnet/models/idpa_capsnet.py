"""The CIFAR-10 capsule network of Tsai et al. (ICLR 2020), section 4 and Figure 1.

ResNet-style backbone (conv 64 + 3 basic blocks of 64 + 4 basic blocks of 128,
the first of those with stride 2) to 16 x 16 x 128; primary capsules (1x1
conv, 32 capsules x 16, LayerNorm); convolutional capsules 32 x 16 k3 s2
(-> 7 x 7) and k3 s1 (-> 5 x 5); 10 class capsules of 16 (4x4 matrix poses
throughout); one linear map shared by all class capsules gives the logits.
Inverted dot-product attention routing, concurrent across the capsule layers
by default (`concurrent: false`: sequential). Trained with cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from capsnet.errors import CapsnetError
from capsnet.nn.idpa_capsules import IDPAClassCapsules, IDPAConvCapsules, IDPAPrimaryCapsules, route_capsule_layers
from capsnet.types import ModelOutput


class BasicBlock(nn.Module):
    """He et al. (2016) basic residual block: conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class ResNetBackbone(nn.Sequential):
    """Stem conv 3x3 (stem_channels) + BN + ReLU, then stages of basic blocks; each stage's first block strides."""

    def __init__(self, in_channels: int, stem_channels: int = 64, channels=(64, 128), blocks=(3, 4), strides=(1, 2)):
        layers = [nn.Conv2d(in_channels, stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU()]
        c_in = stem_channels
        for c_out, n, s in zip(channels, blocks, strides):
            for k in range(n):
                layers.append(BasicBlock(c_in, c_out, s if k == 0 else 1))
                c_in = c_out
        super().__init__(*layers)
        self.out_channels = c_in


class IDPACapsNet(nn.Module):
    """Backbone -> primary capsules -> conv capsule layers -> class capsules -> shared linear head (logits).

    Args:
        routing: factory (`_partial_` config) of `InvertedDotProductRouting`; each capsule layer builds
            its own (its own LayerNorm). All layers use the same `iters`.
        conv_caps: one dict per convolutional capsule layer: capsules, kernel_size, stride.
        concurrent: concurrent routing across layers (the paper's default) or sequential.
    """

    def __init__(self, in_shape, num_classes: int, routing, backbone=None, primary_capsules: int = 32,
                 capsule_dim: int = 16, conv_caps=({"capsules": 32, "kernel_size": 3, "stride": 2},
                                                   {"capsules": 32, "kernel_size": 3, "stride": 1}),
                 matrix_pose: bool = True, concurrent: bool = True):
        super().__init__()
        self.in_shape, self.num_classes, self.concurrent = tuple(in_shape), num_classes, bool(concurrent)
        backbone = backbone if backbone is not None else ResNetBackbone
        self.backbone = backbone(in_channels=self.in_shape[0])
        self.primary = IDPAPrimaryCapsules(self.backbone.out_channels, primary_capsules, capsule_dim)
        with torch.no_grad():
            grid = self.primary(self.backbone.eval()(torch.zeros(1, *self.in_shape))).shape
        self.backbone.train()
        layers, n_in, (h, w) = [], primary_capsules, grid[2:4]
        for spec in conv_caps:
            k, s = spec.get("kernel_size", 3), spec.get("stride", 1)
            layers.append(IDPAConvCapsules(n_in, capsule_dim, spec["capsules"], capsule_dim, k, s,
                                           matrix_pose, routing))
            n_in, h, w = spec["capsules"], (h - k) // s + 1, (w - k) // s + 1
            if min(h, w) < 1:
                raise CapsnetError(f"idpa_capsnet: the input {self.in_shape} is too small for the conv capsule layers; "
                                   f"use fewer or smaller conv_caps")
        layers.append(IDPAClassCapsules(n_in * h * w, capsule_dim, num_classes, capsule_dim, matrix_pose, routing))
        self.capsule_layers = nn.ModuleList(layers)
        iters = {layer.routing.iters for layer in layers}
        if len(iters) != 1:
            raise CapsnetError(f"idpa_capsnet: every capsule layer must route for the same iters, got {sorted(iters)}")
        self.iters = iters.pop()
        self.head = nn.Linear(capsule_dim, 1)  # shared by every class capsule

    @property
    def routing(self):
        """The class layer's routing (what TensorBoard records)."""
        return self.capsule_layers[-1].routing

    def forward(self, images: torch.Tensor, recon_classes: torch.Tensor | None = None) -> ModelOutput:
        """images [B, C, H, W] -> ModelOutput(scores=logits [B, K], poses [B, K, D]); no decoder."""
        x = self.primary(self.backbone(images))
        poses, couplings = route_capsule_layers(self.capsule_layers, x, self.iters, self.concurrent)
        logits = self.head(poses).squeeze(-1)
        extras = {"couplings": [r.detach() for r in couplings]} if self.routing.record else {}
        return ModelOutput(scores=logits, poses=poses, extras=extras)
