"""CapsNet (Sabour, Frosst, Hinton 2017, Figures 1 and 2), composed from its parts.

The parts arrive as factories (Hydra `_partial_` configs) and are completed
here with what only the data knows: input channels, number of capsules after
the convolutions (found by one dummy forward), number of classes.
"""

from __future__ import annotations

import torch
from torch import nn

from capsnet.types import ModelOutput


class CapsNet(nn.Module):
    def __init__(self, in_shape, num_classes: int, features, primary, class_caps, decoder=None):
        super().__init__()
        self.in_shape, self.num_classes = tuple(in_shape), num_classes
        self.features = features(in_channels=self.in_shape[0])
        with torch.no_grad():
            fmap = self.features(torch.zeros(1, *self.in_shape))
            self.primary = primary(in_channels=fmap.shape[1])
            n_caps, cap_dim = self.primary(fmap).shape[1:]
        self.class_caps = class_caps(in_capsules=n_caps, in_dim=cap_dim, out_capsules=num_classes)
        self.decoder = None
        if decoder is not None:
            self.decoder = decoder(num_classes=num_classes, capsule_dim=self.class_caps.out_dim,
                                   out_shape=self.in_shape)

    @property
    def routing(self):
        return self.class_caps.routing

    def forward(self, images: torch.Tensor, recon_classes: torch.Tensor | None = None) -> ModelOutput:
        """`recon_classes` [B, R]: the class capsules to decode (training: the true labels, section 4.1);
        None decodes the longest capsule."""
        routed = self.class_caps(self.primary(self.features(images)))
        out = ModelOutput(scores=routed.activations, poses=routed.poses, extras=dict(getattr(self.routing, "recorded", {})))
        if self.decoder is not None:
            select = routed.activations.argmax(-1, keepdim=True) if recon_classes is None else recon_classes
            out.reconstructions = torch.stack([self.decoder(routed.poses, select[:, r])
                                               for r in range(select.shape[1])], 1)
        return out
