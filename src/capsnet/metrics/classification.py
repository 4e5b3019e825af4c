"""Single-label classification: the prediction is the argmax of the scores (the longest capsule)."""

from __future__ import annotations


from capsnet.types import Batch, ModelOutput


class TopKAccuracy:
    """Percent of images whose label is among the k highest scores; `error` is 100 - accuracy.

    k = 1 is the paper's test accuracy (Table 1 reports the error).
    """

    def __init__(self, k: int = 1, name: str = "accuracy", error_name: str | None = "error"):
        if k < 1:
            raise ValueError(f"metric k={k} must be >= 1")
        self.k, self.name, self.error_name = k, name, error_name
        self.names = (name, error_name) if error_name else (name,)

    def sums(self, out: ModelOutput, batch: Batch) -> dict:
        if self.k == 1:
            hit = out.scores.argmax(-1) == batch.labels
        else:
            hit = (out.scores.topk(self.k, -1).indices == batch.labels.unsqueeze(-1)).any(-1)
        return {f"{self.name}/correct": hit.sum().double()}

    def compute(self, totals: dict) -> dict:
        acc = 100.0 * totals[f"{self.name}/correct"] / max(totals["count"], 1.0)
        values = {self.name: acc}
        if self.error_name:
            values[self.error_name] = 100.0 - acc
        return values
