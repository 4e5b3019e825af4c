"""What a run writes into its directory: metrics.jsonl (one line per epoch) and results.json (the summary).

Written atomically (a temporary file renamed over the target), by rank 0 only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(out_dir: Path, history: list[dict]) -> None:
    write_atomically(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def write_results(out_dir: Path, results: dict) -> None:
    write_atomically(out_dir / "results.json", json.dumps(results, indent=2) + "\n")


def eval_values(record: dict) -> dict:
    """The evaluation values of one epoch's record: every "<set>/<name>" that is not a train value."""
    return {k: v for k, v in record.items() if "/" in k and not k.startswith("train/")}
