"""One benchmark case, timed in the process that runs it (`capsnet.tools.bench` starts a fresh one per case).

A case is a plain dict: {"case": name, "mode": "train" | "infer", "batch": B,
"iters": routing iterations or None (the config's own), "amp": "off" | "bf16" |
"fp16"}. Every network is composed from its YAML through
`capsnet.train.build.compose_config` + `build_model` + `build_loss`, the way
`train.py` builds it, so the benchmark never holds a second definition.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from capsnet.data.loader import to_unit_float
from capsnet.routing.naive import NaiveClassCapsules
from capsnet.train.build import ROOT, build_loss, build_model, build_optimizer, compose_config
from capsnet.train.perf import release_free_memory
from capsnet.train.runtime import autocast_factory
from capsnet.types import Batch


@dataclass(frozen=True, kw_only=True)
class CaseSpec:
    """How to build a case's network: config overrides, the data's shape and classes, an optional wrapper."""

    overrides: tuple
    in_shape: tuple = (1, 28, 28)
    num_classes: int = 10
    wrap: str | None = None  # "naive" | "conv-only"
    capsnet_family: bool = False  # same convolutions as the paper's CapsNet: the conv-only bound applies
    batch: int = 32  # the benchmark's batch for this network's own rows (--model-batch overrides)


CASES = {
    "conv-only": CaseSpec(overrides=("model=capsnet",), wrap="conv-only", capsnet_family=True),
    "capsnet": CaseSpec(overrides=("model=capsnet",), capsnet_family=True),
    "naive": CaseSpec(overrides=("model=capsnet",), wrap="naive", capsnet_family=True),
    # the same CapsNet with routing in PyTorch operations, beside the default fused C++ kernel
    "capsnet+torch_routing": CaseSpec(overrides=("model=capsnet", "routing.kernel=torch"), capsnet_family=True),
    "capsnet+self_attention": CaseSpec(overrides=("model=capsnet", "routing=self_attention"), capsnet_family=True),
    "efficient_capsnet": CaseSpec(overrides=("model=efficient_capsnet",)),
    # On a 2-core CPU at batch 32 these two take about 30 s a step, and EM routing 15 GB: smaller batches.
    "idpa_capsnet": CaseSpec(overrides=("model=idpa_capsnet",), in_shape=(3, 32, 32), batch=8),
    "matrix_capsnet": CaseSpec(overrides=("model=matrix_capsnet",), in_shape=(2, 32, 32), num_classes=5, batch=4),
}


class ConvBound(nn.Module):
    """The CapsNet's own convolutions alone (Conv1 and the PrimaryCaps convolution): the floor under any
    CapsNet step, since they hold about 95% of its FLOPs."""

    def __init__(self, capsnet):
        super().__init__()
        self.features, self.conv = capsnet.features, capsnet.primary.conv

    def forward(self, x, recon_classes=None):
        return self.conv(self.features(x))


def build_case(name: str, iters: int | None):
    """(model, loss, optimizer, routing iterations actually used) for a case name of `CASES`; the
    conv-only bound has no loss and no optimizer."""
    spec = CASES[name]
    probe = compose_config(list(spec.overrides))
    has_iters = "iters" in (probe.get("routing") or {})
    overrides = list(spec.overrides) + ([f"routing.iters={iters}"] if iters is not None and has_iters else [])
    cfg = compose_config(overrides) if len(overrides) > len(spec.overrides) else probe
    model = build_model(cfg, spec.in_shape, spec.num_classes)
    if spec.wrap == "naive":
        model.class_caps = NaiveClassCapsules(model.class_caps)
    if spec.wrap == "conv-only":
        return ConvBound(model), None, None, None
    optimizer, _ = build_optimizer(cfg, model)  # the config's optimizer, as train.py builds it
    return model, build_loss(cfg), optimizer, cfg.routing.get("iters") if has_iters else None


def data_root() -> Path | None:
    """$CAPSNET_DATA, else $CAPSNET_SHARED_DATA, else ../shared/data beside the project (where `make` looks)."""
    for root in (os.environ.get("CAPSNET_DATA"), os.environ.get("CAPSNET_SHARED_DATA"), ROOT.parent / "shared/data"):
        if root and (Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
            return Path(root)
    return None


def inputs(spec: CaseSpec, n: int, device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images, labels, source): real MNIST test images for the 1x28x28 nets when found, else uniform noise."""
    root = data_root()
    if root is not None and spec.in_shape == (1, 28, 28):
        from torchvision.datasets import MNIST

        ds = MNIST(str(root), train=False, download=False)
        idx = torch.arange(n) % len(ds.data)
        return to_unit_float(ds.data[idx].unsqueeze(1)).to(device), ds.targets[idx].to(device), "mnist"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *spec.in_shape, generator=g)
    return x.to(device), torch.randint(0, spec.num_classes, (n,), generator=g).to(device), "noise"


class Memory:
    """Peak memory of a case above what was resident when it started (MB): CUDA's allocator, or the
    resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.base = None

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        release_free_memory()
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        self.base = self._status("VmRSS")

    def peak_mb(self) -> float | None:
        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        peak = self._status("VmHWM")
        return None if peak is None or self.base is None else (peak - self.base) / 1024

    @staticmethod
    def _status(key: str):
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])  # kB
        return None


def time_steps(step, warmup: int, steps: int, device) -> tuple[float, float | None]:
    """Median seconds per call of `step` after `warmup` calls, and the case's peak memory (MB)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    memory = Memory(device)
    memory.start()
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), memory.peak_mb()


def make_step(model, crit, opt, train: bool, x, y, autocast, scaler=None):
    """A training step (forward, the config's loss, backward, the config's optimizer) or an inference pass.
    The conv-only bound (crit None) sums its output as its loss and takes no optimiser step."""
    if not train:
        model.eval()

        @torch.no_grad()
        def infer():
            with autocast():
                return model(x)

        return infer
    model.train()
    batch = Batch(x, y)

    def train_step():
        with autocast():
            out = model(x, y.unsqueeze(1))
            loss = out.float().sum() if crit is None else crit(out, batch)["loss"]
        model.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if opt is not None:
                opt.step()

    return train_step


def case_step(name: str, batch: int, amp: str, train: bool, device, iters: int | None = None,
              compile: bool = False, channels_last: bool = False):
    """(step, the routing iterations, the input source) of a case: its network, loss, optimiser and
    inputs built from a fixed seed, as the benchmark times it (`run_case`) and profiles it (--split)."""
    torch.manual_seed(0)
    model, crit, opt, iters = build_case(name, iters)
    model = model.to(device)
    x, y, source = inputs(CASES[name], batch, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if compile and crit is not None:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" and crit is not None else None
    return make_step(model, crit, opt, train, x, y, autocast_factory(device, amp), scaler), iters, source


def run_case(case: dict, *, device, warmup: int, steps: int, compile: bool = False,
             channels_last: bool = False) -> dict:
    """Time one case here and now; the row the parent process reads back (one JSON line)."""
    step, iters, source = case_step(case["case"], case["batch"], case["amp"], case["mode"] == "train", device,
                                    case.get("iters"), compile, channels_last)
    seconds, peak = time_steps(step, warmup, steps, device)
    return {**case, "iters": iters, "input": source, "pid": os.getpid(), "ms_per_step": 1000 * seconds,
            "images_per_second": case["batch"] / seconds, "peak_mb": peak}
