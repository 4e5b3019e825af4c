"""The paper's CapsNet learns real MNIST: one pass over 10,000 images, batch 32, >= 95% on 1,000 test images."""

import json

import pytest

from helpers import run_train


@pytest.mark.slow
def test_capsnet_reaches_95_percent_on_a_slice_of_real_mnist(real_data, tmp_path):
    out = tmp_path / "run"
    proc = run_train(["model=capsnet", "dataset=mnist", "routing.iters=3", f"dataset.root={real_data}",
                      "dataset.download=false", "dataset.train_subset=10000", "dataset.test_subset=1000",
                      "trainer.epochs=1", "trainer.batch_size=32", "trainer.progress=false", f"out_dir={out}"],
                     timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["test/accuracy"] >= 95.0, results
