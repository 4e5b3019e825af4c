"""`python train.py` end to end, as a user runs it."""

import json

import pytest

from helpers import event_tags, run_train

EPOCH_KEYS = {"epoch", "step", "train/margin_loss", "train/recon_loss", "train/loss", "train/accuracy",
              "test/accuracy", "test/error", "test/loss", "lr", "seconds", "train/images_per_second"}
RESULT_KEYS = {"params", "monitor", "best", "final", "epochs", "seconds", "overrides", "routing_iters"}


def test_train_py_leaves_metrics_results_checkpoint_and_tensorboard(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = ["model=capsnet", "dataset=mnist", "routing.iters=3", f"dataset.root={tiny_data}",
            "dataset.train_subset=192", "trainer.epochs=2", "trainer.batch_size=32", f"out_dir={out}",
            "trainer.log_every=2", "trainer.progress=false", "dataset.download=false", "model.features.channels=[32]"]
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert EPOCH_KEYS <= set(lines[0])
    assert lines[1]["step"] == 2 * 192 // 32
    results = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    final = results["final"]
    assert results["epochs"] == 2 and final["test/error"] == pytest.approx(100 - final["test/accuracy"])
    assert results["best"]["name"] == "test/accuracy" and results["routing_iters"] == 3
    assert "routing.iters=3" in results["overrides"]
    assert (out / "checkpoints" / "last.pt").is_file()
    (run_tb,) = (out / "tb").iterdir()  # tb/<the run's settings>: TensorBoard's run name says what it is
    assert "routing.iters=3" in run_tb.name and "dataset.root" not in run_tb.name
    tags = event_tags(run_tb)
    assert {"train/margin_loss", "train/recon_loss", "train/loss", "train/accuracy", "test/accuracy",
            "lr", "throughput"} <= set(tags["scalars"])
    assert tags["images"] == ["reconstructions"]
    assert {f"routing/couplings_iter{r}" for r in (1, 2, 3)} | {"capsules/lengths"} == set(tags["histograms"])


def test_train_py_finds_its_configs_and_presets_from_any_folder(tmp_path):
    proc = run_train(["experiment=paper_mnist", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epochs: 50" in proc.stdout
