"""Metrics chosen in config (`configs/metrics/`), computed from sums so DDP counts every image once.

A metric has two methods:

- `sums(out: ModelOutput, batch: Batch) -> dict[str, Tensor]`: per-batch sums
  (0-dim device tensors, no host sync), under keys unique to the metric;
- `compute(totals: dict[str, float]) -> dict[str, float]`: the metric's values
  from the sums over every batch and process (`totals["count"]` holds the
  number of images), named as they appear in metrics.jsonl, TensorBoard and
  results.json (e.g. "accuracy", "error"); a `names` attribute lists them,
  so `trainer.monitor` can be checked before any work starts.

The loop adds up the sums on the device, all-reduces them once, then calls
`compute`: the same numbers on 1 or N processes.
"""

from capsnet.metrics.classification import TopKAccuracy

__all__ = ["TopKAccuracy"]
