"""Efficient-CapsNet (Mazzia, Salvetti, Chiaberge 2021, section 3 and Figure 1): MNIST with 161,824 parameters.

Four valid-padded convolutions (32@5x5, 64@3x3, 64@3x3, 128@3x3 stride 2),
each followed by ReLU then BatchNorm (the order of the authors' Keras graph);
a depthwise 9x9 convolution whose 128 outputs are read as 16 primary capsules
of 8D and squashed with the efficient squash (section 3.1); 10 class capsules
of 16D by self-attention routing (section 3.2); the masked decoder
160-512-1024-784 of Sabour et al. (2017) as the regulariser.

The paper's 161,824 counts the network without the decoder: the convolutions
with their biases, BatchNorm's gain and offset (its running statistics are
buffers), the depthwise convolution with its bias, W (10 x 16 x 8 x 16) and
the routing prior b (10 x 16). `tests/test_attention_models.py` checks it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from capsnet.errors import CapsnetError
from capsnet.nn.squash import squash_efficient
from capsnet.types import ModelOutput


class EfficientFeatures(nn.Sequential):
    """Conv -> ReLU -> BatchNorm per layer, valid padding; BatchNorm as Keras' defaults (eps 1e-3, running
    averages kept with weight 0.99: PyTorch momentum 0.01; short runs want more, e.g. 0.1)."""

    def __init__(self, in_channels: int, channels=(32, 64, 64, 128), kernel_sizes=(5, 3, 3, 3), strides=(1, 1, 1, 2),
                 bn_momentum: float = 0.01):
        if not len(channels) == len(kernel_sizes) == len(strides):
            raise CapsnetError("efficient_capsnet: channels, kernel_sizes and strides need one entry per conv layer")
        layers, c_in = [], in_channels
        for c_out, k, s in zip(channels, kernel_sizes, strides):
            conv = nn.Conv2d(c_in, c_out, k, s)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # the authors' he_normal
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(c_out, eps=1e-3, momentum=bn_momentum)]
            c_in = c_out
        super().__init__(*layers)
        self.out_channels = c_in


class DepthwisePrimaryCapsules(nn.Module):
    """Depthwise conv (one k x k filter per channel, section 3.1) -> capsules of `capsule_dim`, squashed.

    The outputs are read channels-last, as the Keras `Reshape` does; on MNIST
    the map is 1 x 1 x 128, i.e. 16 capsules of 8D.
    """

    def __init__(self, in_channels: int, capsule_dim: int = 8, kernel_size: int = 9):
        super().__init__()
        self.capsule_dim = capsule_dim
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size, groups=in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1).flatten(1)
        if y.shape[1] % self.capsule_dim:
            raise CapsnetError(f"efficient_capsnet: {y.shape[1]} primary features do not split into "
                               f"capsules of {self.capsule_dim}D; change primary_dim or the input size")
        return squash_efficient(y.view(y.shape[0], -1, self.capsule_dim))


class EfficientCapsNet(nn.Module):
    """Efficient-CapsNet: `routing` is a factory called with the class layer's sizes (or a built module)."""

    def __init__(self, in_shape, num_classes: int, routing, decoder=None, channels=(32, 64, 64, 128),
                 kernel_sizes=(5, 3, 3, 3), strides=(1, 1, 1, 2), primary_kernel: int = 9,
                 primary_dim: int = 8, capsule_dim: int = 16, bn_momentum: float = 0.01):
        super().__init__()
        self.in_shape, self.num_classes = tuple(in_shape), num_classes
        self.features = EfficientFeatures(self.in_shape[0], tuple(channels), tuple(kernel_sizes), tuple(strides),
                                          bn_momentum)
        self.primary = DepthwisePrimaryCapsules(self.features.out_channels, primary_dim, primary_kernel)
        with torch.no_grad():
            n_caps = self.primary(self.features.eval()(torch.zeros(1, *self.in_shape))).shape[1]
        self.features.train()
        self.capsule_dim = capsule_dim
        fan_in = primary_dim * n_caps * num_classes  # Keras he_normal's fan-in for the 4-D kernel W[n, i, :, :]
        self.weight = nn.Parameter(torch.randn(n_caps, primary_dim, num_classes * capsule_dim) * math.sqrt(2 / fan_in))
        self.routing = routing if isinstance(routing, nn.Module) else routing(
            in_capsules=n_caps, out_capsules=num_classes, out_dim=capsule_dim)
        self.decoder = None if decoder is None else decoder(
            num_classes=num_classes, capsule_dim=capsule_dim, out_shape=self.in_shape)

    def votes(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, I, 8] -> u_hat [B, I, J, 16]: one batched matmul over the primary capsules."""
        bsz, n_in, _ = u.shape
        u_hat = torch.bmm(u.transpose(0, 1), self.weight.to(u.dtype))
        return u_hat.view(n_in, bsz, self.num_classes, self.capsule_dim).transpose(0, 1)

    def decode(self, poses: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """poses [B, K, D], classes [B, R] -> [B, R, C, H, W]: each column masked and decoded in one batch."""
        bsz, n_rec = classes.shape
        flat = poses.unsqueeze(1).expand(bsz, n_rec, *poses.shape[1:]).reshape(bsz * n_rec, *poses.shape[1:])
        return self.decoder(flat, classes.reshape(-1)).view(bsz, n_rec, *self.in_shape)

    def forward(self, images: torch.Tensor, recon_classes: torch.Tensor | None = None) -> ModelOutput:
        """Training decodes the capsules named by `recon_classes` [B, R]; evaluation the longest one."""
        out = self.routing(self.votes(self.primary(self.features(images))))
        recon = None
        if self.decoder is not None:
            if not self.training or recon_classes is None:
                recon_classes = out.activations.argmax(-1, keepdim=True)
            recon = self.decode(out.poses, recon_classes)
        extras = {"couplings": self.routing.recorded["couplings"]} if getattr(self.routing, "record", False) else {}
        return ModelOutput(scores=out.activations, poses=out.poses, reconstructions=recon, extras=extras)
