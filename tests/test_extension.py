"""The README's promise: a new routing, dataset or metric is one module plus one YAML file.

Each test writes only a YAML file (the module is in tests/helpers.py, as a
user's own package would be), composes the config in-process, trains one
epoch through the real run and reads what it reported.
"""

import contextlib
import json

import torch

from helpers import TINY_CAPSNET, compose_cfg

FAST = ["trainer.progress=false", "trainer.epochs=1", "trainer.batch_size=16", *TINY_CAPSNET]


def run(tmp_path, overrides):
    from capsnet.train.run import Run

    cfg = compose_cfg([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"out_dir={tmp_path / 'run'}",
                       *FAST, *overrides])
    results = Run(cfg).fit()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["final"] == results["final"]
    return cfg, results


def yaml_file(tmp_path, group, name, text):
    folder = tmp_path / "conf" / group
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)


def test_a_new_routing_trains_and_reports(tmp_path, tiny_data):
    yaml_file(tmp_path, "routing", "mean", "_target_: helpers.MeanRouting\nscale: 2.0\n")
    cfg, results = run(tmp_path, ["routing=mean", f"dataset.root={tiny_data}", "dataset.download=false"])
    assert 0 <= results["final"]["test/accuracy"] <= 100 and results["steps"] == 16
    from capsnet.train.build import model_from_checkpoint

    model, _ = model_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert type(model.routing).__name__ == "MeanRouting" and model.routing.scale.item() != 2.0  # it trained
    from capsnet.train.tb import TensorBoard

    tb = TensorBoard(str(tmp_path / "tb"))
    tb.inspect(model, torch.rand(2, 1, 28, 28), step=1, autocast=contextlib.nullcontext())  # no couplings: no crash
    tb.close()


def test_a_new_dataset_trains_and_reports(tmp_path):
    yaml_file(tmp_path, "dataset", "stripes", "_target_: helpers.StripesDataset\nname: stripes\n")
    cfg, results = run(tmp_path, ["dataset=stripes", "model.features.kernel_size=3", "model.primary.kernel_size=3"])
    assert results["dataset"] == "stripes" and results["steps"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["data"] == {"in_shape": [3, 10, 10], "num_classes": 4}


def test_a_new_metric_is_reported_and_can_be_monitored(tmp_path, tiny_data):
    yaml_file(tmp_path, "metrics", "with_top", "accuracy:\n  _target_: capsnet.metrics.TopKAccuracy\n"
              "top:\n  _target_: helpers.MeanTopScore\n")
    cfg, results = run(tmp_path, ["metrics=with_top", "trainer.monitor=test/top_score", f"dataset.root={tiny_data}",
                                  "dataset.download=false"])
    assert 0 < results["final"]["test/top_score"] < 1 and "test/accuracy" in results["final"]
    assert results["best"]["name"] == "test/top_score"
