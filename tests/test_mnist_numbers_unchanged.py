"""The contracts refactor changed no number: short MNIST-format runs equal those recorded before it.

tests/fixtures/mnist_short_run.json was written by tests/fixtures/make_mnist_short_run.py with the code
as it stood before the contracts (commit 2c7d257): per-epoch losses, accuracies and learning rates, and the
sum of every weight tensor after training, for the CapsNet and the baseline CNN.
"""

import json
from pathlib import Path

import pytest
import torch

from helpers import compose_cfg, make_mnist

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "mnist_short_run.json").read_text())


@pytest.mark.parametrize("model", sorted(FIXTURE))
def test_a_short_run_reproduces_the_recorded_numbers(model, tmp_path):
    from capsnet.train.run import Run

    recorded = FIXTURE[model]
    data = make_mnist(tmp_path / "data", n_train=128, n_test=64)
    threads = torch.get_num_threads()
    try:
        Run(compose_cfg([f"dataset.root={data}", f"out_dir={tmp_path / 'run'}", "trainer.amp=off", *recorded["args"]])).fit()
    finally:
        torch.set_num_threads(threads)
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == len(recorded["epochs"])
    for now, then in zip(history, recorded["epochs"]):
        for key, value in then.items():  # the old names: train_loss is now train/loss
            new = key.replace("train_", "train/", 1).replace("test_", "test/", 1)
            assert now[new] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, total in recorded["weight_sums"].items():
        assert float(state[name].double().sum()) == pytest.approx(total, rel=1e-5, abs=1e-6), name
