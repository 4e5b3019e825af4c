"""The contracts between data, models, routing, losses and metrics.

Every dataset yields `Batch`es, every model returns a `ModelOutput`, every
routing algorithm returns a `RoutingOutput`; losses read `(ModelOutput,
Batch)`, metrics too. The loop, the evaluation CLI and the benchmark know
only these three types, so a new dataset, model, routing, loss or metric is a
new module that keeps to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass
class Batch:
    """What a loader yields: model inputs, class targets and any further targets.

    images: float [B, C, H, W], already transformed (what the model sees).
    labels: class ids long [B] (one class per image) or multi-hot float [B, K]
        (several, e.g. MultiMNIST's two digits).
    targets: further targets by name. Known names:
        "reconstruction": [B, R, C', H', W'], the R images the decoder must
            reproduce (default: the input itself, R = 1);
        "recon_classes": long [B, R], the class capsule that decodes each of
            them (default: the label, for single-label data).
    """

    images: torch.Tensor
    labels: torch.Tensor
    targets: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device, non_blocking: bool = True) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.images), move(self.labels), {k: move(v) for k, v in self.targets.items()})

    def pin_memory(self) -> "Batch":
        """Page-locked copies, for DataLoader workers feeding a GPU."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(),
                     {k: v.pin_memory() for k, v in self.targets.items()})

    @property
    def recon_classes(self) -> torch.Tensor | None:
        """[B, R] class ids whose capsules the decoder reconstructs in training (None: not known)."""
        if "recon_classes" in self.targets:
            return self.targets["recon_classes"]
        return self.labels.unsqueeze(1) if self.labels.dim() == 1 else None

    @property
    def recon_targets(self) -> torch.Tensor:
        """[B, R, C, H, W] images to reconstruct: by default the input (Sabour et al. 2017, section 4.1)."""
        return self.targets.get("reconstruction", self.images.unsqueeze(1))


@dataclass(kw_only=True)
class ModelOutput:
    """What every model's forward returns.

    scores: [B, K]; the argmax (or top-k) is the prediction: capsule lengths
        for CapsNet, logits for a CNN, activations for matrix capsules.
    poses: the class capsules, [B, K, D] (matrix capsules: D = 16).
    reconstructions: [B, R, C, H, W], the R images the decoder produced.
    extras: diagnostics by name, e.g. "couplings": a list with one
        [B, I, K] tensor per routing iteration, present only when recording.
    """

    scores: torch.Tensor
    poses: torch.Tensor | None = None
    reconstructions: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


class RoutingOutput(NamedTuple):
    """What a routing algorithm returns for the upper capsules.

    poses: [B, J, D] (vector capsules) or [B, J, 4, 4]-as-[B, J, 16] (matrix capsules).
    activations: [B, J] presence in [0, 1): the lengths for dynamic routing,
        the logistic activations for EM routing.
    couplings: [B, I, J] the last iteration's couplings (responsibilities), or None.
    """

    poses: torch.Tensor
    activations: torch.Tensor
    couplings: torch.Tensor | None = None
