"""The training loop: `train_one_epoch` and `evaluate`, explicit AMP and DDP.

Losses and metric sums stay on the device and are read only every
`log_every` steps, so the loop does not wait on the accelerator each step
(except with `trainer.on_nonfinite=skip`, which must look at every step's
loss). Metrics are sums (`capsnet.metrics`), all-reduced once per epoch, so
every image counts once on any number of processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from capsnet.errors import NonFiniteLossError
from capsnet.train.distributed import all_reduce_sum, any_process, is_distributed, union_of_keys


@dataclass
class LoopState:
    """Where training stands; saved in checkpoints so a run resumes mid-epoch exactly."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches of the current epoch already done
    step: int = 0  # optimiser steps over the whole run
    sums: dict = field(default_factory=dict)  # the current epoch's summed train losses and metrics
    skipped: int = 0  # non-finite steps skipped (trainer.on_nonfinite=skip)


class StopRequested(Exception):
    """A pre-emption signal arrived; last.pt has been saved."""


@dataclass
class LoopHooks:
    """What the loop needs from the run around it (the values come from the trainer config)."""

    autocast: Callable  # () -> autocast context manager
    save_last: Callable[[], None]  # write checkpoints/last.pt from the current state
    should_stop: Callable[[], bool]  # a signal asked the run to stop
    tb: object  # capsnet.train.tb.TensorBoard
    log_every: int
    ckpt_every_steps: int | None
    on_nonfinite: str
    progress: bool
    total_steps: int  # optimiser steps of the whole run (for losses scheduled on progress)


def accumulate(sums: dict, terms: dict, metrics: dict, out, batch) -> None:
    """Add one batch's loss terms (times its size), metric sums and image count to `sums`, on the device."""
    n = len(batch)
    for k, v in terms.items():
        _add(sums, k, v.detach().double() * n)
    for metric in metrics.values():
        for k, v in metric.sums(out, batch).items():
            _add(sums, k, v)
    _add(sums, "count", float(n))


def summarize(totals: dict, metrics: dict) -> dict:
    """Mean loss terms and each metric's values from the summed totals."""
    n = max(float(totals.get("count", 0.0)), 1.0)
    values = {k: float(v) / n for k, v in totals.items() if k != "count" and "/" not in k}
    for metric in metrics.values():
        values.update(metric.compute(totals))
    return values


def _add(sums: dict, key: str, value) -> None:
    sums[key] = sums[key] + value if key in sums else value


def _check_finite(first_bad: torch.Tensor) -> None:
    bad = int(first_bad)
    if bad >= 0:
        raise NonFiniteLossError(
            f"the loss became NaN or infinite at step {bad}: lower optim.lr, use trainer.amp=bf16 "
            "instead of fp16, or trainer.on_nonfinite=skip; checkpoints/last.pt holds the last good state")


def all_reduce(sums: dict, device: torch.device) -> dict:
    """Sum every entry (device tensors or host numbers) over all processes in one collective; an entry a
    process lacks counts as zero there."""
    keys = union_of_keys(sums)  # the same keys, in the same order, on every rank
    if not keys:
        return {}
    totals = all_reduce_sum(torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64, device=device)
                                         for k in keys]))
    return dict(zip(keys, totals.tolist()))


def train_one_epoch(model, criterion, metrics: dict, loader, optimizer, scheduler, scaler, state: LoopState,
                    hooks: LoopHooks, device: torch.device) -> dict:
    """One pass over this process's batches; returns the epoch's mean train values over all processes."""
    model.train()
    sums = {k: v if k == "count" else torch.tensor(v, device=device, dtype=torch.float64)
            for k, v in state.sums.items()}
    first_bad = torch.tensor(-1, device=device)
    images_seen, t0 = 0, time.perf_counter()  # timed work of this process (count also holds resumed work)
    set_progress = getattr(criterion, "set_progress", None)
    bar = tqdm(loader, total=len(loader), initial=state.batch, disable=not hooks.progress,
               desc=f"epoch {state.epoch + 1}", dynamic_ncols=True, leave=False)
    for batch in bar:
        batch = batch.to(device)
        if set_progress is not None:
            set_progress(state.step / max(hooks.total_steps, 1))
        with hooks.autocast():
            out = model(batch.images, batch.recon_classes)
            terms = criterion(out, batch)
        loss = terms["loss"]
        state.batch += 1
        if hooks.on_nonfinite == "skip" and any_process(not torch.isfinite(loss), device):  # syncs: this mode only
            state.skipped += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.step += 1
        images_seen += len(batch)
        first_bad = torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, state.step)
        accumulate(sums, terms, metrics, out, batch)
        if state.step % hooks.log_every == 0:
            _check_finite(first_bad)
            values = summarize(sums, metrics)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            hooks.tb.scalars(values, state.step, "train/")
            hooks.tb.scalars({"lr": optimizer.param_groups[0]["lr"]}, state.step)
        # Several processes must stop at the same step: they agree at log boundaries only.
        stop = (not is_distributed() or state.step % hooks.log_every == 0) and \
            any_process(hooks.should_stop(), device)
        if stop or (hooks.ckpt_every_steps and state.step % hooks.ckpt_every_steps == 0):
            _check_finite(first_bad)
            state.sums = {k: float(v) for k, v in sums.items()}
            hooks.save_last()
            if stop:
                raise StopRequested
    bar.close()
    _check_finite(first_bad)
    seconds = time.perf_counter() - t0
    totals = all_reduce({**sums, "images_seen": float(images_seen)}, device)
    seen = totals.pop("images_seen")
    values = {f"train/{k}": v for k, v in summarize(totals, metrics).items()} if totals else {}
    values["train/images_per_second"] = seen / max(seconds, 1e-9)
    values["train/seconds"] = seconds
    state.sums = {}
    return values


@torch.no_grad()
def evaluate(model, criterion, metrics: dict, loader, autocast, device: torch.device, prefix: str = "test",
             recon_with_labels: bool = False) -> dict:
    """Losses and metrics over one whole evaluation set, each image counted once across processes.

    The decoder reconstructs the longest capsule (the paper's test-time rule), or with
    `recon_with_labels` the true label's (the official code's: its test features carry
    recons_label, input_data/mnist/mnist_input_record.py line 90).
    """
    model.eval()
    sums: dict = {}
    for batch in loader:
        batch = batch.to(device)
        with autocast():
            out = model(batch.images, batch.recon_classes if recon_with_labels else None)
            terms = criterion(out, batch)
        accumulate(sums, terms, metrics, out, batch)
    return {f"{prefix}/{k}": v for k, v in summarize(all_reduce(sums, device), metrics).items()}
