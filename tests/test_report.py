"""A tiny real sweep on synthetic data, then `python -m capsnet.tools.report` on it."""

import csv
import json
import statistics
import subprocess
import sys

import pytest

from helpers import TINY_CAPSNET, run_train


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from helpers import make_mnist

    tmp = tmp_path_factory.mktemp("sweep")
    data = make_mnist(tmp / "data", n_train=64, n_test=32)
    out = tmp / "multirun"
    proc = run_train(["-m", "routing.iters=1,2", "seed=0,1", f"hydra.sweep.dir={out}", f"dataset.root={data}",
                      "dataset.download=false", "trainer.epochs=2", "trainer.batch_size=16", "optim.lr=0.01",
                      "trainer.progress=false", *TINY_CAPSNET])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def run_report(*folders):
    return subprocess.run([sys.executable, "-m", "capsnet.tools.report", *map(str, folders)],
                          capture_output=True, text=True, timeout=120)


def test_report_groups_seeds_and_computes_mean_and_std_from_the_runs(sweep):
    proc = run_report(sweep)
    assert proc.returncode == 0, proc.stderr
    errors = {1: [], 2: []}
    for job in sweep.iterdir():
        if (job / "results.json").is_file():
            r = json.loads((job / "results.json").read_text())
            errors[r["routing_iters"]].append(r["final"]["test/error"])
    assert [len(v) for v in errors.values()] == [2, 2]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [int(r["routing_iters"]) for r in rows] == [1, 2]
    for r in rows:
        errs = errors[int(r["routing_iters"])]
        assert int(r["n"]) == 2
        assert float(r["test/error mean"]) == pytest.approx(statistics.fmean(errs))
        assert float(r["test/error std"]) == pytest.approx(statistics.stdev(errs))
    table = (sweep / "summary.md").read_text()
    assert proc.stdout == table
    body = [line for line in table.splitlines() if line.startswith("| capsnet")]
    assert len(body) == 2
    for line, r in zip(body, rows):
        assert f"{float(r['test/error mean']):.2f}" in line and "| 2 |" in line  # the CSV agrees with the table


def test_report_plot_is_an_image(sweep):
    from PIL import Image

    assert run_report(sweep).returncode == 0
    with Image.open(sweep / "error_vs_iters.png") as im:
        im.verify()
        assert im.format == "PNG"


def test_unfinished_and_failed_runs_are_listed_not_dropped(sweep, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    (copy / "0" / "results.json").unlink()
    shutil.rmtree(copy / "1" / "checkpoints")
    (copy / "1" / "results.json").unlink()
    (copy / "1" / "metrics.jsonl").unlink()
    proc = run_report(copy)
    assert proc.returncode == 0, proc.stderr
    assert "did not finish" in proc.stdout
    assert f"`{copy / '0'}`: stopped, resumable (2 epochs done" in proc.stdout
    assert f"`{copy / '1'}`: failed (0 epochs, no checkpoint)" in proc.stdout


def test_a_run_made_with_out_dir_is_found_and_the_report_may_go_to_a_new_folder(tmp_path, tiny_data):
    from helpers import TINY_CAPSNET

    proc = run_train([f"out_dir={tmp_path / 'mine'}", f"dataset.root={tiny_data}", "dataset.download=false",
                      "trainer.epochs=1", "trainer.progress=false", "dataset.train_subset=32", *TINY_CAPSNET])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = subprocess.run([sys.executable, "-m", "capsnet.tools.report", str(tmp_path), "--out",
                             str(tmp_path / "new" / "folder")], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "did not finish" not in report.stdout and "| 1 |" in report.stdout
    assert (tmp_path / "new" / "folder" / "summary.md").is_file()


def test_each_run_logs_hparams_for_tensorboard(sweep):
    (run_tb,) = (sweep / "0" / "tb").iterdir()
    assert run_tb.name == "routing.iters=1,seed=0"  # the run's name in TensorBoard says its setting
    events = list(run_tb.rglob("events.out.tfevents.*"))
    data = b"".join(e.read_bytes() for e in events)
    assert b"_hparams_/session_start_info" in data and b"routing.iters" in data


def test_report_on_a_folder_without_runs_says_so(tmp_path):
    proc = run_report(tmp_path)
    assert proc.returncode != 0 and "no runs" in proc.stderr
