"""The shape every accuracy shares: a per-image hit summed over the batch, reported in percent of the images."""

from __future__ import annotations


class PercentOfImages:
    """`name` = 100 * sum of the hits / images; `error_name` (if any) = 100 - that. Subclasses give `hits`."""

    name: str = "accuracy"
    error_name: str | None = None

    def __init__(self, name: str | None = None, error_name: str | None = None):
        self.name = name or self.name
        self.error_name = error_name or self.error_name
        self.names = (self.name, self.error_name) if self.error_name else (self.name,)

    def hits(self, out, batch):
        """Per-image values in [0, 1] (1: correct)."""
        raise NotImplementedError

    def sums(self, out, batch) -> dict:
        return {f"{self.name}/correct": self.hits(out, batch).double().sum()}

    def compute(self, totals: dict) -> dict:
        acc = 100.0 * totals[f"{self.name}/correct"] / max(totals["count"], 1.0)
        values = {self.name: acc}
        if self.error_name:
            values[self.error_name] = 100.0 - acc
        return values
