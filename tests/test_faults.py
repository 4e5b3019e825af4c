"""Faults are survived: killed saves, killed runs, pre-emption, non-finite losses, a dead DDP peer."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from capsnet.train.checkpoint import load_checkpoint
from helpers import FAST, ROOT, assert_same_weights, compose_cfg, run_train_signalled, train_in_process, weights


def fit(args):
    """A run in this process (the faults themselves need a process of their own)."""
    from capsnet.train.run import Run

    return Run(compose_cfg(args)).fit()


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "last.pt"
    writer = textwrap.dedent(f"""
        import torch
        from capsnet.train.checkpoint import save_checkpoint
        i = 0
        while True:  # large saves back to back, so the kill lands mid-write most of the time
            save_checkpoint({{"model": {{"w": torch.full((4_000_000,), float(i))}}, "i": i}}, {str(path)!r})
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        proc.stdout.readline()  # two saves done, the third under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    state = load_checkpoint(path)
    assert state["i"] >= 1 and torch.all(state["model"]["w"] == state["i"])


def test_a_run_killed_with_sigkill_resumes_from_last_pt_and_ends_identically(tiny_data, tmp_path):
    args = [f"dataset.root={tiny_data}", *FAST, "trainer.epochs=2", "trainer.batch_size=8",
            "trainer.ckpt_every_steps=3", "dataset.train_subset=80"]
    fit([*args, f"out_dir={tmp_path / 'whole'}"])
    out = tmp_path / "killed"
    # killed at step 14 of 20 (epoch 2), two steps after the last save at step 12
    killed = run_train_signalled([*args, f"out_dir={out}"], step=14, signame="SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "results.json").exists()
    assert load_checkpoint(out / "checkpoints" / "last.pt")["loop"]["step"] == 12
    fit([*args, f"out_dir={out}"])  # trainer.resume=auto
    assert_same_weights(weights(tmp_path / "whole"), weights(out))
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_sigterm_saves_at_a_step_boundary_and_the_rerun_finishes_identically(tiny_data, tmp_path):
    args = [f"dataset.root={tiny_data}", *FAST, "trainer.epochs=3", "trainer.batch_size=8", "dataset.train_subset=80"]
    fit([*args, f"out_dir={tmp_path / 'whole'}"])
    out = tmp_path / "stopped"
    stopped = run_train_signalled([*args, f"out_dir={out}"], step=15, signame="SIGTERM")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "stopped by SIGTERM at step 15" in stopped.stdout
    assert load_checkpoint(out / "checkpoints" / "last.pt")["loop"]["step"] == 15  # mid epoch 2
    assert not (out / "results.json").exists()
    fit([*args, f"out_dir={out}"])
    assert_same_weights(weights(tmp_path / "whole"), weights(out))


def test_a_non_finite_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, capsys):
    base = [f"dataset.root={tiny_data}", *FAST, f"out_dir={tmp_path}"]
    assert train_in_process([*base, "trainer.epochs=1"], capsys).returncode == 0
    good = weights(tmp_path)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def poison(optimizer, args, kwargs):  # the weights turn NaN after the first step of epoch 2 (step 9)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.data.fill_(float("nan"))

    hook = register_optimizer_step_post_hook(poison)
    try:
        proc = train_in_process([*base, "trainer.epochs=2", "trainer.log_every=1"], capsys)
    finally:
        hook.remove()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "NaN or infinite at step 10" in lines[0] and "trainer.on_nonfinite=skip" in lines[0]
    assert_same_weights(good, weights(tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["loop"]["epoch"] == 1


def test_on_nonfinite_skip_skips_and_counts_the_steps(tiny_data, tmp_path, capsys):
    proc = train_in_process([f"dataset.root={tiny_data}", *FAST, f"out_dir={tmp_path}", "trainer.epochs=1",
                             "loss.recon_weight=1e39", "trainer.on_nonfinite=skip"], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["skipped_steps"] == 256 // 32 and record["step"] == 0
    assert json.loads((tmp_path / "results.json").read_text())["skipped_steps"] == 8


def test_a_dead_ddp_peer_makes_the_others_exit_with_an_error_in_bounded_time(tiny_data, tmp_path):
    """Rank 1 is SIGKILLed after its third step; rank 0 must fail within trainer.dist_timeout_s, not hang."""
    peer = tmp_path / "peer.py"
    peer.write_text(textwrap.dedent(f"""
        import os, runpy, signal, sys
        from torch.optim.optimizer import register_optimizer_step_post_hook
        if os.environ.get("RANK") == "1":
            steps = []
            register_optimizer_step_post_hook(
                lambda *a: steps.append(1) or (len(steps) == 3 and os.kill(os.getpid(), signal.SIGKILL)))
        sys.argv = [{str(ROOT / "train.py")!r}, *sys.argv[1:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    args = [f"dataset.root={tiny_data}", *FAST, "trainer.epochs=1000", "trainer.device=cpu",
            "trainer.dist_timeout_s=30", f"out_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(peer), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert time.time() - start < 180  # start-up, 3 steps, then at most the 30 s timeout (and torchrun's teardown)


@pytest.mark.parametrize("signame, workers", [("SIGINT", 0), ("SIGTERM", 2)])
def test_ctrl_c_and_a_signal_to_the_whole_group_with_workers_save_and_stop(tiny_data, tmp_path, signame, workers):
    """Ctrl-C saves like SIGTERM; a signal to the process group (a cluster's, or Ctrl-C in a terminal) does not
    kill the DataLoader workers under the run, which then saves as well."""
    out = tmp_path / "run"
    args = [f"dataset.root={tiny_data}", *FAST, "trainer.epochs=2", "trainer.batch_size=8", f"out_dir={out}",
            f"trainer.num_workers={workers}"]
    proc = run_train_signalled(args, step=5, signame=signame, to_group=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"stopped by {signame} at step 5" in proc.stdout and "Traceback" not in proc.stderr
    assert load_checkpoint(out / "checkpoints" / "last.pt")["loop"]["step"] == 5


def test_a_logging_failure_never_ends_the_run(tiny_data, tmp_path, capsys, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def broken(*args, **kwargs):
        raise ValueError("histogram of NaN")

    monkeypatch.setattr(SummaryWriter, "add_histogram", broken)
    proc = train_in_process([f"dataset.root={tiny_data}", *FAST, f"out_dir={tmp_path}", "trainer.epochs=2",
                             "dataset.train_subset=32"], capsys)
    assert proc.returncode == 0 and (tmp_path / "results.json").is_file()
    warnings = [line for line in proc.stderr.splitlines() if "TensorBoard could not log inspect" in line]
    assert len(warnings) == 1 and "training goes on" in warnings[0]  # said once, not every epoch


def test_best_pt_holds_weights_only_and_checkpoints_can_be_switched_off(tiny_data, tmp_path, capsys):
    base = [f"dataset.root={tiny_data}", *FAST, "trainer.epochs=1", "dataset.train_subset=32"]
    assert train_in_process([*base, f"out_dir={tmp_path / 'all'}"], capsys).returncode == 0
    best = load_checkpoint(tmp_path / "all" / "checkpoints" / "best.pt")
    assert "optimizer" not in best and {"model", "config", "data"} <= set(best)
    assert "optimizer" in load_checkpoint(tmp_path / "all" / "checkpoints" / "last.pt")
    assert train_in_process([*base, f"out_dir={tmp_path / 'none'}", "trainer.keep_checkpoints=none"],
                            capsys).returncode == 0
    assert (tmp_path / "none" / "results.json").is_file() and not (tmp_path / "none" / "checkpoints").exists()
