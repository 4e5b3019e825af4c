"""eval.py: reproduces a run's own numbers, ensembles sum the class scores, bad checkpoints fail in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import FAST, ROOT, compose_cfg, make_mnist

from capsnet.errors import CapsnetError
from capsnet.tools.evaluate import (apply_run_overrides, checkpoint_paths, ensemble_metrics, evaluate_checkpoints,
                                    split_overrides)

NO_FIGURES = {"enabled": False}


def _train(root: Path, data: Path, seed: int, epochs: int = 2, extra=(), name: str = "run") -> Path:
    from capsnet.train.run import Run

    out = root / f"{name}{seed}"
    cfg = compose_cfg([*FAST, *extra, f"dataset.root={data}", f"out_dir={out}", f"trainer.epochs={epochs}",
                       "trainer.resume=null", "trainer.eval_batch_size=16", "optim.lr=0.02", f"seed={seed}",
                       "dataset.shift=0",
                       "+metrics.top._target_=helpers.MeanTopScore"])  # a continuous value of the scores
    Run(cfg).fit()
    return out


def _perturbed_copy(run: Path, out: Path, scale: float = 1.0) -> Path:
    """A second member without a second training: the run's checkpoints with seeded noise on every weight."""
    from capsnet.train.checkpoint import load_checkpoint, save_checkpoint

    g = torch.Generator().manual_seed(1)
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / "checkpoints" / name)
        ckpt["model"] = {k: v + scale * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point()
                         and v.numel() > 1 else v for k, v in ckpt["model"].items()}
        save_checkpoint(ckpt, out / "checkpoints" / name)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short in-process run on synthetic MNIST, trained once for the whole file, and a noisy copy of it."""
    root = tmp_path_factory.mktemp("eval")
    data = make_mnist(root / "data", n_train=160, n_test=40)
    run = _train(root, data, 0)
    return root, data, [run, _perturbed_copy(run, root / "run1")]


def _hand_scores(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores and labels of the whole test set, one image at a time, straight from the checkpoint."""
    from capsnet.data.loader import make_batch
    from capsnet.train.build import build_data, model_from_checkpoint

    model, cfg = model_from_checkpoint(ckpt)
    test = build_data(cfg).evals()["test"]
    scores, labels = [], []
    with torch.no_grad():
        for i in range(len(test)):
            batch = make_batch(test, torch.tensor([i]), 0, None)
            scores.append(model(batch.images).scores[0])
            labels.append(batch.labels[0])
    return torch.stack(scores), torch.stack(labels)


def test_reproduces_the_runs_final_metrics_exactly(runs, tmp_path):
    _, _, (run, _) = runs
    final = json.loads((run / "results.json").read_text())["final"]
    result = evaluate_checkpoints(str(run / "checkpoints" / "last.pt"), tmp_path, figures=NO_FIGURES)
    assert result["metrics"] == final  # every value, bit for bit: same batches, device, autocast
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["members"][0]["metrics"] == final and saved["ensemble"] is None
    routing = saved["members"][0]["routing"]
    assert routing["iterations"] == 3 and len(routing["entropy"]) == 3 and len(routing["agreement"]) == 3
    assert routing["entropy"][0] == pytest.approx(routing["uniform_entropy"])  # iteration 1: uniform


def test_progress_scheduled_loss_is_where_the_run_left_it(runs, tmp_path):
    """Spread loss's margin grows with training progress: evaluation must use the run's last margin."""
    _, data, _ = runs
    run = _train(tmp_path, data, 0, epochs=1, extra=["loss=spread", "trainer.batch_size=64"], name="spread")
    final = json.loads((run / "results.json").read_text())["final"]
    assert "test/spread_loss" in final
    assert evaluate_checkpoints(str(run / "checkpoints" / "last.pt"), tmp_path, figures=NO_FIGURES)["metrics"] == final


def test_ensemble_is_the_argmax_of_summed_scores(runs, tmp_path):
    _, _, (a, b) = runs
    paths = [a / "checkpoints" / "last.pt", b / "checkpoints" / "last.pt"]
    result = evaluate_checkpoints([str(p) for p in paths], tmp_path, figures=NO_FIGURES)
    (sa, labels), (sb, _) = _hand_scores(paths[0]), _hand_scores(paths[1])
    hand = 100.0 * ((sa + sb).argmax(-1) == labels).double().mean().item()
    assert result["ensemble"]["metrics"]["test/accuracy"] == pytest.approx(hand, abs=1e-9)
    # the mean highest score tells a sum from a mean, a max or one member's scores
    top = (sa.double() + sb.double()).max(-1).values.mean().item()
    assert result["ensemble"]["metrics"]["test/top_score"] == pytest.approx(top, rel=1e-5)
    assert top != pytest.approx(result["members"][0]["metrics"]["test/top_score"], rel=1e-3)
    assert result["metrics"] == result["ensemble"]["metrics"]
    for path, member, s in zip(paths, result["members"], (sa, sb)):
        assert member["checkpoint"] == str(path)
        assert member["metrics"]["test/accuracy"] == pytest.approx(100.0 * (s.argmax(-1) == labels).double().mean())


def test_ensemble_metrics_against_hand_sum():
    """Random scores where the summed argmax differs from other plausible rules (mean of votes, max of max)."""
    from capsnet.metrics import TopKAccuracy

    g = torch.Generator().manual_seed(3)
    members = [torch.rand(50, 4, generator=g) ** (3 * m + 1) for m in range(3)]
    labels = torch.randint(0, 4, (50,), generator=g)
    collected = [{"test": (s, labels)} for s in members]
    got = ensemble_metrics(collected, {"accuracy": TopKAccuracy()}, torch.device("cpu"))["test/accuracy"]
    summed = torch.zeros(50, 4, dtype=torch.float64)
    for s in members:
        for i in range(50):
            for k in range(4):
                summed[i, k] += float(s[i, k])
    hand = 100.0 * sum(int(summed[i].argmax()) == int(labels[i]) for i in range(50)) / 50
    max_of_max = 100.0 * (torch.stack(members).max(0).values.argmax(-1) == labels).double().mean().item()
    assert got == pytest.approx(hand) and hand != pytest.approx(max_of_max)


def test_folder_takes_every_best_pt(runs):
    root, _, (a, b) = runs
    assert checkpoint_paths(str(root)) == [a / "checkpoints" / "best.pt", b / "checkpoints" / "best.pt"]
    assert checkpoint_paths(str(a)) == [a / "checkpoints" / "best.pt"]


def _one_line_error(fn, *words):
    with pytest.raises(CapsnetError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


def _save_variant(src: Path, dst: Path, changes: dict | None = None, num_classes=None, in_shape=None) -> Path:
    """A checkpoint like `src` but of another model: built from changed config values (untrained weights)."""
    from capsnet.train.build import build_model
    from capsnet.train.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(src)
    cfg = OmegaConf.create(ckpt["config"])
    for key, value in (changes or {}).items():
        OmegaConf.update(cfg, key, value)
    data = {"in_shape": list(in_shape or ckpt["data"]["in_shape"]),
            "num_classes": num_classes or ckpt["data"]["num_classes"]}
    model = build_model(cfg, data["in_shape"], data["num_classes"])
    save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_container(cfg), "data": data}, dst)
    return dst


def test_bad_checkpoints_are_refused_in_one_line(runs, tmp_path):
    _, _, (a, _) = runs
    good = a / "checkpoints" / "last.pt"
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    _one_line_error(lambda: evaluate_checkpoints(str(text), tmp_path, figures=NO_FIGURES), "not a readable")
    _one_line_error(lambda: evaluate_checkpoints(str(tmp_path / "nope.pt"), tmp_path), "does not exist")
    bare = tmp_path / "bare.pt"
    torch.save({"model": {}}, bare)
    _one_line_error(lambda: evaluate_checkpoints(str(bare), tmp_path), "not a checkpoint written by train.py")
    # the stored config says one model, the weights are another's
    other = _save_variant(good, tmp_path / "other.pt", {"model.features.channels": [6]})
    from capsnet.train.checkpoint import load_checkpoint, save_checkpoint

    mixed = load_checkpoint(other)
    mixed["config"] = load_checkpoint(good)["config"]
    save_checkpoint(mixed, tmp_path / "mixed.pt")
    _one_line_error(lambda: evaluate_checkpoints(str(tmp_path / "mixed.pt"), tmp_path), "another model")


def test_ensemble_members_must_agree(runs, tmp_path):
    _, data, (a, _) = runs
    good = a / "checkpoints" / "last.pt"
    five = _save_variant(good, tmp_path / "five.pt", num_classes=5)
    small = _save_variant(good, tmp_path / "small.pt", in_shape=(1, 24, 24))
    _one_line_error(lambda: evaluate_checkpoints([str(good), str(five)], tmp_path), "disagree on classes")
    _one_line_error(lambda: evaluate_checkpoints([str(good), str(small)], tmp_path), "disagree on input shape")
    fashion = _save_variant(good, tmp_path / "fashion.pt", {"dataset.name": "fashion_mnist"})
    _one_line_error(lambda: evaluate_checkpoints([str(good), str(fashion)], tmp_path), "disagree on the dataset",
                    "fashion_mnist", "dataset=NAME")
    both = evaluate_checkpoints([str(good), str(fashion)], tmp_path, ["dataset=mnist", f"dataset.root={data}"],
                                figures=NO_FIGURES)  # the fix the line names
    assert both["dataset"] == "mnist" and both["ensemble"]["size"] == 2


def test_data_of_another_shape_is_refused(runs, tmp_path):
    _, _, (a, _) = runs
    good = str(a / "checkpoints" / "last.pt")
    pad = "dataset.eval_transforms=[{_target_:capsnet.data.transforms.Pad,padding:2}]"
    _one_line_error(lambda: evaluate_checkpoints(good, tmp_path, [pad]), "'test'", "(1, 32, 32)", "(1, 28, 28)")
    _one_line_error(lambda: evaluate_checkpoints(good, tmp_path, split="affnist"), "split=affnist", "test")


def test_run_overrides_apply_to_the_stored_config(runs):
    from capsnet.train.checkpoint import load_checkpoint

    _, _, (a, _) = runs
    stored = load_checkpoint(a / "checkpoints" / "last.pt")["config"]
    assert split_overrides(["ckpt=x", "dataset=affnist", "dataset.test_subset=5", "trainer.amp=bf16", "-m"]) == \
        (["dataset=affnist", "dataset.test_subset=5", "trainer.amp=bf16"], ["ckpt=x", "-m"])
    cfg = apply_run_overrides(stored, ["dataset.test_subset=7", "trainer.amp=bf16"])
    assert cfg.dataset.test_subset == 7 and cfg.dataset.root == stored["dataset"]["root"]
    assert cfg.trainer.amp == "bf16" and cfg.model == OmegaConf.create(stored["model"])
    swapped = apply_run_overrides(stored, ["dataset=affnist", "dataset.test_subset=9"])
    assert swapped.dataset.reader == "affnist" and swapped.dataset.test_subset == 9
    multi = apply_run_overrides(stored, ["dataset=multimnist"])
    assert "pair" in multi.metrics  # the dataset brings its own metrics
    assert apply_run_overrides(stored, ["+dataset.val_size_extra=1"]).dataset.val_size_extra == 1
    _one_line_error(lambda: apply_run_overrides(stored, ["dataset.test_subsett=3"]), "unknown key")
    _one_line_error(lambda: apply_run_overrides(stored, ["trainer.amp=fp8"]), "trainer")
    _one_line_error(lambda: apply_run_overrides(stored, ["dataset.test_subset=0"]), "dataset.test_subset")
    _one_line_error(lambda: apply_run_overrides(stored, ["dataset.test_subset=1,2"]), "single value")


def test_subset_and_bf16_overrides_evaluate(runs, tmp_path):
    _, _, (a, _) = runs
    result = evaluate_checkpoints(str(a / "checkpoints" / "last.pt"), tmp_path,
                                  ["dataset.test_subset=20", "trainer.amp=bf16"], NO_FIGURES)
    assert result["amp"] == "bf16" and 0 <= result["metrics"]["test/accuracy"] <= 100
    correct = result["metrics"]["test/accuracy"] * 20 / 100  # a whole number of the 20 images
    assert correct == pytest.approx(round(correct))


def test_amp_auto_is_resolved_as_train_py_resolves_it(runs, tmp_path):
    from capsnet.train.runtime import resolve_amp

    _, _, (a, _) = runs
    result = evaluate_checkpoints(str(a / "checkpoints" / "last.pt"), tmp_path,
                                  ["dataset.test_subset=20", "trainer.amp=auto"], NO_FIGURES)
    assert result["amp"] == resolve_amp(torch.device("cpu"), "auto")


def test_eval_py_command_line(runs, tmp_path):
    """The one true subprocess: `python eval.py ckpt=... dataset.test_subset=...` writes eval.json and figures."""
    _, _, (a, _) = runs
    out = tmp_path / "ev"
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"ckpt={a / 'checkpoints' / 'last.pt'}",
                           f"hydra.run.dir={out}", "dataset.test_subset=20", "figures.worst=4",
                           "figures.reconstructions=4"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})  # the runs' helpers.MeanTopScore
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((out / "eval.json").read_text())
    assert saved["run_overrides"] == ["dataset.test_subset=20"] and "test/accuracy" in proc.stdout
    for name in ("perturbation", "reconstructions", "confusion", "worst", "routing"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
        assert saved["figures"][name] == f"{name}.png"


@pytest.mark.slow
def test_eval_py_user_errors_exit_2(tmp_path):
    for args, words in ((["ckpt=/nonexistent/x.pt"], "does not exist"), (["ckpt=a.pt", "figures.nope=1"], "nope")):
        proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *args, f"hydra.run.dir={tmp_path}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr


@pytest.mark.slow
def test_torchrun_counts_each_image_once(tmp_path):
    """Two gloo processes evaluate an odd-sized test set: the same metrics as one process."""
    data = make_mnist(tmp_path / "data", n_train=64, n_test=37)
    run = _train(tmp_path, data, 0)
    ckpt = run / "checkpoints" / "last.pt"
    one = evaluate_checkpoints(str(ckpt), tmp_path / "one", figures=NO_FIGURES)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(ROOT / "eval.py"),
                           f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'two'}", "figures.enabled=false",
                           "trainer.device=cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert proc.returncode == 0, proc.stderr
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert two["world_size"] == 2
    assert two["metrics"]["test/accuracy"] == pytest.approx(one["metrics"]["test/accuracy"], abs=1e-9)
    assert two["metrics"]["test/loss"] == pytest.approx(one["metrics"]["test/loss"], rel=1e-6)
