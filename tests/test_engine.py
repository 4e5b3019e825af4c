"""The training engine: AMP on CPU, exact resume, pre-emption signals, DDP equivalence."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from capsnet.train.checkpoint import load_checkpoint
from helpers import FAST, ROOT, assert_same_weights, compose_cfg, run_train, train_in_process, weights


def fit(data_root, out_dir, *overrides):
    from capsnet.train.run import Run

    cfg = compose_cfg([f"dataset.root={data_root}", f"out_dir={out_dir}", *FAST, *overrides])
    return Run(cfg).fit()


def test_bf16_autocast_on_cpu_trains_like_fp32(tiny_data, tmp_path):
    common = ["trainer.epochs=3", "trainer.batch_size=16", "optim.lr=3e-3", "dataset.shift=0",
              "model.features.channels=[16]"]
    fp32 = fit(tiny_data, tmp_path / "fp32", *common)
    bf16 = fit(tiny_data, tmp_path / "bf16", *common, "trainer.amp=bf16")
    assert fp32["final"]["test/accuracy"] >= 90 and bf16["final"]["test/accuracy"] >= 90, (fp32, bf16)


def test_fp16_on_cpu_is_refused_in_one_line(tiny_data, tmp_path, capsys):
    proc = train_in_process([*FAST, f"dataset.root={tiny_data}", f"out_dir={tmp_path}", "trainer.device=cpu",
                             "trainer.amp=fp16"], capsys)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "capsnet: error: trainer.amp=fp16 needs a CUDA GPU: use trainer.amp=bf16 on CPU, or off"]


def test_resume_after_epoch_one_ends_like_an_uninterrupted_run(tiny_data, tmp_path):
    whole = fit(tiny_data, tmp_path / "whole", "trainer.epochs=2")
    fit(tiny_data, tmp_path / "split", "trainer.epochs=1")
    resumed = fit(tiny_data, tmp_path / "split", "trainer.epochs=2")  # trainer.resume=auto
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "split"), rtol=0, atol=0)
    assert resumed["final"] == whole["final"] and resumed["steps"] == whole["steps"]
    a = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if "second" not in k}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]


def test_resume_null_starts_afresh(tiny_data, tmp_path):
    fit(tiny_data, tmp_path, "trainer.epochs=1")
    again = fit(tiny_data, tmp_path, "trainer.epochs=1", "trainer.resume=null")
    assert again["epochs"] == 1 and again["steps"] == 8


def test_a_mid_epoch_resume_restores_the_running_sums_of_the_epoch(tiny_data, tmp_path):
    """Stopped by SIGTERM at step 5 of 8 and resumed: epoch 1's train loss and accuracy are the whole epoch's."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    whole = fit(tiny_data, tmp_path / "whole", "trainer.epochs=1")
    steps = []
    hook = register_optimizer_step_post_hook(
        lambda *_: steps.append(1) or (len(steps) == 5 and os.kill(os.getpid(), signal.SIGTERM)))
    try:
        fit(tiny_data, tmp_path / "split", "trainer.epochs=1")
    finally:
        hook.remove()
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["loop"]["step"] == 5
    assert not (tmp_path / "split" / "results.json").exists()
    fit(tiny_data, tmp_path / "split", "trainer.epochs=1")
    a = json.loads((tmp_path / "whole" / "metrics.jsonl").read_text())
    b = json.loads((tmp_path / "split" / "metrics.jsonl").read_text())
    for key in ("train/loss", "train/margin_loss", "train/recon_loss", "train/accuracy", "test/accuracy"):
        assert b[key] == pytest.approx(a[key], rel=1e-12), key
    assert whole["steps"] == 8


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_same_global_batches(tiny_data, tmp_path):
    args = [f"dataset.root={tiny_data}", *FAST, "trainer.epochs=1", "dataset.train_subset=128",
            "dataset.test_subset=63", "trainer.device=cpu"]
    single = run_train([*args, f"out_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone",
                          str(ROOT / "train.py"), *args, f"out_dir={tmp_path / 'two'}",
                          f"hydra.run.dir={tmp_path / 'two'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), rtol=1e-4, atol=1e-6)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    acc = two["final"]["test/accuracy"]
    assert acc == pytest.approx(one["final"]["test/accuracy"])
    # 63 test images: accuracy is a multiple of 1/63, so no image was dropped or counted twice
    assert round(acc * 63 / 100, 6) == round(acc * 63 / 100)


@pytest.mark.parametrize("launcher, target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher"),
                                              ("joblib", "JoblibLauncher")])
def test_cluster_launchers_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    from helpers import CONFIGS

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "hydra.launcher.gpus_per_node=4"]
                      if launcher == "slurm" else [f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.tasks_per_node == 4 and cfg.hydra.launcher.max_num_timeout > 0


@pytest.mark.slow
def test_submitit_local_runs_a_training_job(tiny_data, tmp_path):
    proc = run_train(["-m", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                      f"dataset.root={tiny_data}", *FAST, "trainer.epochs=1", "dataset.train_subset=64"],
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())
    assert results["epochs"] == 1


class FixedScores(torch.nn.Module):
    """A stand-in model whose scores are given per image (by the image's first pixel value)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, images, recon_classes=None):
        from capsnet.types import ModelOutput

        return ModelOutput(scores=self.table[(images[:, 0, 0, 0] * 255).round().long()])


def test_evaluation_oracle_on_one_and_two_shards(monkeypatch):
    """Known scores on a fixed set: exact accuracy, error and mean loss, counted once over 1 or 2 shards."""
    import capsnet.train.engine as engine
    from contextlib import nullcontext

    from capsnet.data.loader import BatchLoader
    from capsnet.data.source import Split
    from capsnet.losses.cross_entropy import CrossEntropyLoss
    from capsnet.metrics import TopKAccuracy

    n, k = 11, 3
    table = torch.randn(n, k, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 2])
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    split = Split("test", images, labels)
    correct = (table.argmax(1) == labels).sum().item()
    ce = torch.nn.functional.cross_entropy(table, labels).item()
    model, metrics = FixedScores(table), {"acc": TopKAccuracy()}
    one = engine.evaluate(model, CrossEntropyLoss(), metrics, BatchLoader(split, 4, train=False), nullcontext,
                          torch.device("cpu"))
    assert one["test/accuracy"] == pytest.approx(100 * correct / n)
    assert one["test/error"] == pytest.approx(100 - 100 * correct / n)
    assert one["test/loss"] == pytest.approx(ce)
    shard_sums = []
    monkeypatch.setattr(engine, "all_reduce", lambda sums, device: shard_sums.append(
        {key: float(v) for key, v in sums.items()}) or shard_sums[-1])
    for rank in range(2):
        engine.evaluate(model, CrossEntropyLoss(), metrics, BatchLoader(split, 2, train=False, rank=rank,
                        world_size=2), nullcontext, torch.device("cpu"))
    totals = {key: shard_sums[0][key] + shard_sums[1][key] for key in shard_sums[0]}
    assert totals["count"] == n
    assert engine.summarize(totals, metrics) == pytest.approx({"loss": ce, "ce_loss": ce,
                                                               "accuracy": 100 * correct / n,
                                                               "error": 100 - 100 * correct / n})


@pytest.mark.parametrize("native, chosen", [(True, "bf16"), (False, "off")])
def test_amp_auto_picks_bf16_only_where_the_hardware_has_it(monkeypatch, tiny_data, tmp_path, native, chosen, capsys):
    import capsnet.train.runtime as runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    assert runtime.resolve_amp(torch.device("cpu"), "auto") == chosen
    assert runtime.resolve_amp(torch.device("cpu"), "off") == "off"
    fit(tiny_data, tmp_path, "trainer.epochs=1", "dataset.train_subset=32", "trainer.amp=auto")
    assert f"amp {chosen};" in capsys.readouterr().out  # the run header says which was chosen


def test_amp_defaults_to_auto():
    """bf16 where the hardware has it is the default (docs/performance.md: its accuracy check on real MNIST)."""
    assert compose_cfg([]).trainer.amp.value == "auto"


def _evaluate_shard(rank, world, init_file, n, out_dir):
    """One gloo process of `test_an_empty_evaluation_shard_joins_the_sum`: evaluate its shard, save the result."""
    import datetime
    from contextlib import nullcontext

    import torch.distributed as dist

    import capsnet.train.engine as engine
    from capsnet.data.loader import BatchLoader
    from capsnet.tools.evaluate import ScoreCollector, ensemble_metrics, gather_rows

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    model, split, criterion, metrics = _oracle_problem(n)
    collector = ScoreCollector()
    values = engine.evaluate(model, criterion, {**metrics, "_scores": collector}, BatchLoader(
        split, 4, train=False, rank=rank, world_size=world), nullcontext, torch.device("cpu"))
    scores, labels = collector.result()
    values.update(ensemble_metrics([{"e": (scores, labels)}] * 2, metrics, torch.device("cpu")))
    values["rows"] = gather_rows(scores, world).tolist()
    dist.barrier()
    dist.destroy_process_group()
    (out_dir / f"{rank}.json").write_text(json.dumps(values))


def _oracle_problem(n):
    from capsnet.data.source import Split
    from capsnet.losses.cross_entropy import CrossEntropyLoss
    from capsnet.metrics import TopKAccuracy

    table = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    split = Split("test", images, torch.arange(n) % 3)
    return FixedScores(table), split, CrossEntropyLoss(), {"acc": TopKAccuracy()}


def test_an_empty_evaluation_shard_joins_the_sum(tmp_path):
    """Fewer test images than processes: the process with no images still takes part in the sums (it used to
    sum an empty batch's NaN loss, or skip the collective and leave the others waiting), and every process
    reports the one-process result, an ensemble's metrics and the gathered scores included."""
    from contextlib import nullcontext

    import capsnet.train.engine as engine
    from capsnet.data.loader import BatchLoader

    n, world = 1, 2
    model, split, criterion, metrics = _oracle_problem(n)
    one = engine.evaluate(model, criterion, metrics, BatchLoader(split, 4, train=False), nullcontext,
                          torch.device("cpu"))
    one.update({"e/accuracy": one["test/accuracy"], "e/error": one["test/error"]})
    torch.multiprocessing.spawn(_evaluate_shard, args=(world, tmp_path / "init", n, tmp_path), nprocs=world)
    for rank in range(world):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        torch.testing.assert_close(torch.tensor(got.pop("rows")), model.table.float())  # the scores, gathered
        assert got == pytest.approx(one), rank
