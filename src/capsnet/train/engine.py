"""The training loop: `train_one_epoch` and `evaluate`, explicit AMP and DDP, no callbacks.

Step metrics are summed on the device and read only every `log_every` steps,
so the loop does not wait on the accelerator each step (except with
`trainer.on_nonfinite=skip`, which must look at every step's loss).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from capsnet.train.distributed import all_reduce_sum, any_process, is_distributed
from capsnet.errors import NonFiniteLossError


@dataclass
class LoopState:
    """Where training stands; saved in checkpoints so a run resumes mid-epoch exactly."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches of the current epoch already done
    step: int = 0  # optimiser steps over the whole run
    sums: dict = field(default_factory=dict)  # the current epoch's summed train metrics
    skipped: int = 0  # non-finite steps skipped (trainer.on_nonfinite=skip)


class StopRequested(Exception):
    """A pre-emption signal arrived; last.pt has been saved."""


@dataclass
class LoopHooks:
    autocast: Callable  # () -> autocast context manager
    save_last: Callable[[], None]  # write checkpoints/last.pt from the current state
    should_stop: Callable[[], bool]  # a signal asked the run to stop
    tb: object  # capsnet.train.tb.TensorBoard
    log_every: int = 50
    ckpt_every_steps: int | None = None
    on_nonfinite: str = "error"
    progress: bool = True


def _add(sums: dict, key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


def _check_finite(first_bad: torch.Tensor) -> None:
    bad = int(first_bad)
    if bad >= 0:
        raise NonFiniteLossError(
            f"the loss became NaN or infinite at step {bad}: lower optim.lr, use trainer.amp=bf16 "
            "instead of fp16, or trainer.on_nonfinite=skip; checkpoints/last.pt holds the last good state")


def _all_reduce(sums: dict, device: torch.device) -> dict:
    """Sum every entry (device tensors or host numbers) over all processes in one collective."""
    keys = sorted(sums)  # the same order on every rank
    if not keys:
        return {}
    totals = all_reduce_sum(torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device)
                                         for k in keys]))
    return dict(zip(keys, totals.tolist()))


def _means(sums: dict) -> dict:
    n = float(sums["count"])
    means = {k: float(v) / n for k, v in sums.items() if k not in ("count", "correct")}
    means["accuracy"] = 100.0 * float(sums["correct"]) / n
    return means


def train_one_epoch(model, criterion, loader, optimizer, scheduler, scaler, state: LoopState,
                    hooks: LoopHooks, device: torch.device) -> dict:
    """One pass over this process's batches; returns the epoch's mean train metrics over all processes."""
    model.train()
    # Losses and correct counts stay on the device; the image count is known on the host.
    sums = {k: v if k == "count" else torch.tensor(v, device=device, dtype=torch.float64)
            for k, v in state.sums.items()}
    first_bad = torch.tensor(-1, device=device)
    images_seen, t0 = 0, time.perf_counter()  # timed work of this process (count also holds resumed work)
    bar = tqdm(loader, total=len(loader), initial=state.batch, disable=not hooks.progress,
               desc=f"epoch {state.epoch + 1}", dynamic_ncols=True, leave=False)
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with hooks.autocast():
            out = model(images, labels)
            terms = criterion(out, images, labels)
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
        n = labels.shape[0]
        images_seen += n
        first_bad = torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, state.step)
        for k, v in terms.items():
            _add(sums, k, v.detach().double() * n)
        _add(sums, "correct", (out.scores.argmax(-1) == labels).sum().double())
        _add(sums, "count", float(n))
        if state.step % hooks.log_every == 0:
            _check_finite(first_bad)
            means = _means(sums)
            bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['accuracy']:.2f}")
            hooks.tb.scalars({f"train/{k}": v for k, v in means.items()}, state.step)
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
    totals = _all_reduce({**sums, "images_seen": float(images_seen)}, device)
    seen = totals.pop("images_seen")
    metrics = {f"train_{k}": v for k, v in _means(totals).items()} if totals else {}
    metrics["train_images_per_second"] = seen / max(seconds, 1e-9)
    metrics["train_seconds"] = seconds
    state.sums = {}
    return metrics


@torch.no_grad()
def evaluate(model, criterion, loader, autocast, device: torch.device) -> dict:
    """Accuracy and losses over the whole test set, each image counted once across processes."""
    model.eval()
    sums: dict = {}
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            out = model(images)
            terms = criterion(out, images, labels)
        n = labels.shape[0]
        for k, v in terms.items():
            _add(sums, k, v.double() * n)
        _add(sums, "correct", (out.scores.argmax(-1) == labels).sum().double())
        _add(sums, "count", float(n))
    means = _means(_all_reduce(sums, device))
    metrics = {f"test_{k}": v for k, v in means.items()}
    metrics["test_error"] = 100.0 - metrics["test_accuracy"]
    return metrics
