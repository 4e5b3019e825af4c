"""Learning-rate schedule of the official code: max(lr * decay_rate ** (step / decay_steps), min_lr)."""

from __future__ import annotations

import torch

from capsnet.errors import CapsnetError


class FlooredExponentialLR(torch.optim.lr_scheduler.ExponentialLR):
    """ExponentialLR that never goes below `min_lr`: the official code's tf.maximum(lr, 1e-6)
    (models/model.py lines 63-68, Sarasra/models research/capsules). The decay is monotone, so
    flooring each step equals flooring the closed form."""

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float, min_lr: float):
        self.min_lr = min_lr
        super().__init__(optimizer, gamma)

    def get_lr(self):
        return [max(lr, self.min_lr) for lr in super().get_lr()]


def exponential_decay(optimizer: torch.optim.Optimizer, decay_rate: float = 0.96, decay_steps: int = 2000,
                      min_lr: float = 0.0) -> torch.optim.lr_scheduler.ExponentialLR:
    """Smooth exponential decay, stepped once per optimiser step (paper: x0.96 every 2000 steps).

    min_lr 0 (the paper) keeps PyTorch's ExponentialLR as it is; the official code floors at 1e-6.
    """
    if not 0 < decay_rate <= 1 or decay_steps < 1:
        raise ValueError(f"optim.decay_rate must be in (0, 1] and optim.decay_steps >= 1, "
                         f"got {decay_rate} and {decay_steps}")
    gamma = decay_rate ** (1.0 / decay_steps)
    if min_lr == 0:
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    if min_lr < 0:
        raise CapsnetError(f"optim.scheduler.min_lr={min_lr} is impossible: it must be a number >= 0 "
                           "(0: no floor, 1e-6: the official code)")
    return FlooredExponentialLR(optimizer, gamma, float(min_lr))
