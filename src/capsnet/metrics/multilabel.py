"""Multi-label accuracies for MultiMNIST (Sabour et al. 2017, section 6): n labels per image, top-n predictions.

Every metric here compares an image's n labelled classes (n = 2 on
MultiMNIST; labels two-hot [B, K], or class ids [B] for n = 1) with its n
highest scores (the n longest capsules, the n largest logits):

- `PairAccuracy`: all n labels are the n highest scores. The paper's metric
  ("we consider a classification correct if the two most active digit
  capsules are the two digits present"; 5.2% error, baseline 8.1%), the
  official `layers.evaluate`'s `correct` (no target missing from the top n).
- `AlmostAccuracy`: at least one label among the n highest, the official
  `almost_correct` (fewer than n targets missed).
- `PerLabelAccuracy`: the fraction of the labels among the n highest, 0, 0.5
  or 1 per MultiMNIST image: Efficient-CapsNet's `multiAccuracy` (Mazzia et
  al. 2021, `utils/tools.py`), a more lenient number than the paper's.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from capsnet.metrics.percent import PercentOfImages
from capsnet.types import Batch, ModelOutput


def labels_in_top(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits, n) per image [B]: how many of its n labels rank among its n highest scores, and n.

    A class's rank is its position in the descending sort of the scores
    (ties broken by the sort), so the n highest are exactly n classes.
    """
    target = F.one_hot(labels, scores.shape[-1]).bool() if labels.dim() == 1 else labels > 0.5
    order = scores.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device)
                                            .expand_as(order))
    n = target.sum(-1)
    hits = (target & (rank < n.unsqueeze(-1))).sum(-1)
    return hits, n


class _TopNMetric(PercentOfImages):
    """A per-image value from (hits, n) of `labels_in_top`; its percent over the images."""

    def value(self, hits: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hits(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        return self.value(*labels_in_top(out.scores.detach(), batch.labels))


class PairAccuracy(_TopNMetric):
    """The paper's MultiMNIST accuracy: the two labels are exactly the two longest capsules."""

    name, error_name = "pair_accuracy", "pair_error"

    def value(self, hits, n):
        return (hits == n) & (n > 0)


class AlmostAccuracy(_TopNMetric):
    """The official code's "almost correct": at least one label among the two longest capsules."""

    name = "almost_accuracy"

    def value(self, hits, n):
        return hits > 0


class PerLabelAccuracy(_TopNMetric):
    """Efficient-CapsNet's multiAccuracy: 1 point per label among the two longest capsules, halved."""

    name = "label_accuracy"

    def value(self, hits, n):
        return hits.double() / n.clamp(min=1)
