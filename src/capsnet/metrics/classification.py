"""Single-label classification: the prediction is the argmax of the scores (the longest capsule)."""

from __future__ import annotations

from capsnet.metrics.percent import PercentOfImages


class TopKAccuracy(PercentOfImages):
    """Percent of images whose label is among the k highest scores; `error` is 100 - accuracy.

    k = 1 is the paper's test accuracy (Table 1 reports the error).
    """

    def __init__(self, k: int = 1, name: str = "accuracy", error_name: str | None = "error"):
        if k < 1:
            raise ValueError(f"metric k={k} must be >= 1")
        super().__init__(name, error_name)
        self.k = k

    def hits(self, out, batch):
        if self.k == 1:
            return out.scores.argmax(-1) == batch.labels
        return (out.scores.topk(self.k, -1).indices == batch.labels.unsqueeze(-1)).any(-1)
