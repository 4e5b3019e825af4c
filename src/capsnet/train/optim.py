"""Learning-rate schedule of the official code: lr * decay_rate ** (step / decay_steps)."""

from __future__ import annotations

import torch


def exponential_decay(optimizer: torch.optim.Optimizer, decay_rate: float = 0.96,
                      decay_steps: int = 2000) -> torch.optim.lr_scheduler.ExponentialLR:
    """Smooth exponential decay, stepped once per optimiser step (paper: x0.96 every 2000 steps)."""
    if not 0 < decay_rate <= 1 or decay_steps < 1:
        raise ValueError(f"optim.decay_rate must be in (0, 1] and optim.decay_steps >= 1, "
                         f"got {decay_rate} and {decay_steps}")
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay_rate ** (1.0 / decay_steps))
