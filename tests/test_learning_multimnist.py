"""MultiMNIST (paper section 6) learns on real MNIST: a short in-process run of `experiment=paper_multimnist`
with a reduced CapsNet gets the pair accuracy (both labels of a pair are the two highest scores) far above
chance.

Chance: a pair of two different classes out of 10 is one of 45 unordered pairs, so guessing the top 2
gets about 1/45 = 2.2% of pairs right. The threshold below is about 10x chance; the run it guards
(calibrated on the 2-core CPU: see the numbers in the test's docstring) sits well above it.
"""

import time

import pytest

from capsnet.train.build import compose_config
from capsnet.train.run import Run

CHANCE_PAIR_ACCURACY = 100 / 45  # % : the top 2 of 10 scores guessed, one pair of classes in 45

# The paper's CapsNet, narrowed so that 500 steps fit in a few minutes on a CPU (1,024,656 parameters):
# Conv1 64 channels, 8 primary types of 8D with stride 3 (a 7x7 grid: 392 children), 16D class capsules,
# 3 routing iterations, a small decoder for the two reconstructions.
SMALL_CAPSNET = ["model.features.channels=[64]", "model.primary.capsules=8", "model.primary.capsule_dim=8",
                 "model.primary.stride=3", "model.class_caps.out_dim=16", "model.decoder.hidden=[64,128]"]


def multimnist_run(real_data, out_dir, *extra):
    overrides = ["experiment=paper_multimnist", f"dataset.root={real_data}", "dataset.download=false",
                 "trainer.progress=false", f"out_dir={out_dir}", *SMALL_CAPSNET, *extra]
    return Run(compose_config(overrides)).fit()


@pytest.mark.slow
def test_multimnist_capsnet_learns_pairs_far_above_chance(real_data, tmp_path):
    """16,000 training pairs once (500 steps of batch 32, the preset's Adam 1e-3), 1,000 fixed test pairs.

    Calibration (2026-11-24, 2-core AMD EPYC, seed 0): pair accuracy 36.3% (error 63.7%), almost 91.9%,
    per-label 64.1%. Wall time under pytest: 306 s with the 2 cores shared (load average 3 to 4; the run got
    about one core), so about 2.5 minutes on 2 quiet cores (not measured quiet). Shorter runs
    of similar models (primary stride 2) reached 30.3% in 313 steps and 17.4% in 188 (Conv1 32 channels):
    the 25% threshold needs most of the 500 steps, sits about 11 points below what they give and is 11x
    chance.
    """
    started = time.perf_counter()
    results = multimnist_run(real_data, tmp_path / "run", "dataset.train_subset=16000", "dataset.test_pairs=1000",
                             "trainer.epochs=1", "trainer.batch_size=32")
    final = results["final"]
    assert final["test/pair_error"] == pytest.approx(100 - final["test/pair_accuracy"])
    # both labels right implies at least one right; per-label accuracy lies between pair and almost
    assert final["test/pair_accuracy"] <= final["test/label_accuracy"] <= final["test/almost_accuracy"]
    assert final["test/pair_accuracy"] >= 25.0, (final, f"chance is {CHANCE_PAIR_ACCURACY:.1f}%",
                                                 f"{time.perf_counter() - started:.0f} s")
