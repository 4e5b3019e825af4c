"""Every paper preset runs end to end on small files in the real formats (the quick mixin, a tiny network).

The datasets are written by tests/dataset_fixtures.py (affNIST and SVHN with scipy's savemat, smallNORB's
binary matrices, CIFAR-10's 3,073-byte records) and by helpers.make_mnist (IDX files), so the readers, the
transforms, the models at each dataset's shape, the losses and the metrics meet as they do in a real run.
"""

import json

import pytest

import dataset_fixtures as fx
from helpers import make_mnist

TINY = ["trainer.progress=false", "trainer.epochs=1", "trainer.batch_size=8", "trainer.eval_batch_size=16",
        "dataset.download=false", "quick=on", "dataset.train_subset=null", "dataset.test_subset=null"]
TINY_CAPS = ["model.features.channels=[8]", "model.primary.capsules=2", "model.primary.capsule_dim=4",
             "model.class_caps.out_dim=4"]


def run(tmp_path, overrides):
    from capsnet.train.build import compose_config
    from capsnet.train.run import Run

    cfg = compose_config([f"out_dir={tmp_path / 'run'}", *TINY, *overrides])
    results = Run(cfg).fit()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == 1
    return results


def test_paper_svhn(tmp_path):
    fx.write_svhn(tmp_path, n=24, split="train")
    fx.write_svhn(tmp_path, n=10, split="test")
    results = run(tmp_path, ["experiment=paper_svhn", f"dataset.root={tmp_path}", *TINY_CAPS,
                             "model.decoder.hidden=[8]"])
    assert set(results["final"]) >= {"test/accuracy", "test/error", "test/loss"} and results["steps"] == 3


def test_paper_cifar10(tmp_path):
    fx.write_cifar10(tmp_path, n_per_batch=4, split="train")
    fx.write_cifar10(tmp_path, n_per_batch=6, split="test")
    results = run(tmp_path, ["experiment=paper_cifar10", f"dataset.root={tmp_path}", *TINY_CAPS])
    assert results["steps"] == 3 and "test/accuracy" in results["final"]


def test_paper_smallnorb(tmp_path):
    fx.write_smallnorb(tmp_path, n=16, split="train")
    fx.write_smallnorb(tmp_path, n=6, split="test", gz=True)
    results = run(tmp_path, ["experiment=paper_smallnorb", f"dataset.root={tmp_path}", *TINY_CAPS,
                             "model.decoder.hidden=[8]"])
    assert results["steps"] == 2 and 0 <= results["final"]["test/error"] <= 100


def test_paper_affnist_evaluates_expanded_mnist_and_affnist_and_stops_at_the_threshold(tmp_path):
    make_mnist(tmp_path, n_train=32, n_test=16)
    fx.write_affnist(tmp_path, n=12, split="test", batches=2)
    results = run(tmp_path, ["experiment=paper_affnist", f"dataset.root={tmp_path}", *TINY_CAPS,
                             "model.decoder.hidden=[8]", "trainer.epochs=3", "trainer.stop_at=0.0"])
    assert {"test/accuracy", "affnist/accuracy", "affnist/error"} <= set(results["final"])
    assert results["epochs"] == 1 and results["stopped_at_threshold"]  # any accuracy reaches 0%


def test_paper_multimnist_reports_the_pair_metrics(tmp_path):
    make_mnist(tmp_path, n_train=40, n_test=20)
    results = run(tmp_path, ["experiment=paper_multimnist", f"dataset.root={tmp_path}", *TINY_CAPS,
                             "model.decoder.hidden=[8]", "dataset.pairs_per_digit=3", "dataset.test_pairs=30"])
    assert {"test/pair_accuracy", "test/pair_error", "test/almost_accuracy",
            "test/label_accuracy"} <= set(results["final"])
    assert results["best"]["name"] == "test/pair_accuracy" and results["steps"] == 5


@pytest.mark.parametrize("preset", ["multimnist_baseline", "affnist_baseline"])
def test_baselines_of_the_comparisons(tmp_path, preset):
    make_mnist(tmp_path, n_train=16, n_test=8)
    fx.write_affnist(tmp_path, n=6, split="test", batches=None)
    extra = (["model.channels=[4,4]", "model.hidden=[8]", "dataset.pairs_per_digit=2", "dataset.test_pairs=8"]
             if preset == "multimnist_baseline" else ["model.features.channels=[4,4,4]", "model.hidden=[8,8]"])
    results = run(tmp_path, [f"experiment={preset}", f"dataset.root={tmp_path}", *extra])
    assert results["steps"] == 2 and results["final"]


def test_multimnist_runs_show_figure_5_in_tensorboard(tmp_path):
    from helpers import event_tags

    make_mnist(tmp_path, n_train=40, n_test=20)
    run(tmp_path, ["experiment=paper_multimnist", f"dataset.root={tmp_path}", *TINY_CAPS, "model.decoder.hidden=[8]",
                   "dataset.pairs_per_digit=2", "dataset.test_pairs=16"])
    (run_tb,) = (tmp_path / "run" / "tb").iterdir()
    assert "multimnist_reconstructions" in event_tags(run_tb)["images"]


def test_the_quick_mixin_works_for_multimnist_with_few_test_digits(tmp_path):
    """1,000 test digits cannot each have 1,000 partners: a subset takes as many as it has."""
    from capsnet.train.build import build_data, compose_config

    make_mnist(tmp_path, n_train=1600, n_test=1000)
    data = build_data(compose_config(["experiment=paper_multimnist", "quick=on", f"dataset.root={tmp_path}"]))
    test = data.evals()["test"]
    assert len(data.train()) == 1500 and len(test) == 10_000 and test.pairs_per_digit == 900
