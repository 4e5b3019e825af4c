"""Speed and memory of a CapsNet step: `python -m capsnet.tools.bench` (or `make bench`).

Runs, in one process and one after another: (a) our CapsNet's training step
(forward, margin + reconstruction loss, backward, Adam) and inference; (b) the
same model with the naive parts most public re-implementations use
(`capsnet.routing.naive`); (c) the conv-only bound: just Conv1 and the
PrimaryCaps convolution of the same shapes, forward and backward, which no
routing trick can beat; then a sweep of routing iterations. Prints one table
(median ms per step, images/s, peak memory, ratios to the bound and to the
naive model) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from capsnet.train.build import build_loss, build_model, compose_config
from capsnet.types import Batch
from capsnet.train.perf import configure_allocator, release_free_memory
from capsnet.routing.naive import NaiveClassCapsules


def build_capsnet(iters: int = 3, naive: bool = False):
    """(the paper's CapsNet from configs/model/capsnet.yaml, its loss): the network `train.py` trains."""
    cfg = compose_config(["model=capsnet", f"routing.iters={iters}"])
    model = build_model(cfg, (1, 28, 28), 10)
    if naive:
        model.class_caps = NaiveClassCapsules(model.class_caps)
    return model, build_loss(cfg)


class ConvBound(nn.Module):
    """The model's own convolutions alone (Conv1 and the PrimaryCaps convolution): the floor under any
    CapsNet step."""

    def __init__(self, capsnet):
        super().__init__()
        self.features, self.conv = capsnet.features, capsnet.primary.conv

    def forward(self, x, recon_classes=None):
        return self.conv(self.features(x))


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def mnist_batch(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Real MNIST test images when $CAPSNET_DATA holds them, else uniform noise of the same shape."""
    root = os.environ.get("CAPSNET_DATA")
    if root and (Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        from torchvision.datasets import MNIST

        ds = MNIST(root, train=False, download=False)
        idx = torch.arange(n) % len(ds.data)
        return ds.data[idx].unsqueeze(1).float().div(255).to(device), ds.targets[idx].to(device)
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


class Memory:
    """Peak memory of a case above what was resident when it started (MB)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        release_free_memory()
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
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


def time_case(step, warmup: int, steps: int, device, memory: Memory) -> tuple[float, float | None]:
    """Median seconds per call of `step` after `warmup` calls, and the peak memory of the case."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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


def make_steps(model, crit, train: bool, x, y, autocast, scaler=None):
    if not train:
        model.eval()

        @torch.no_grad()
        def infer():
            with autocast():
                return model(x)

        return infer
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = Batch(x, y)

    def train_step():
        with autocast():
            out = model(x, y.unsqueeze(1))
            loss = crit(out, batch)["loss"] if not isinstance(model, ConvBound) else out.float().sum()
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if not isinstance(model, ConvBound):
                opt.step()

    return train_step


def run_case(kind: str, train: bool, batch: int, iters: int, args, device, memory) -> dict:
    torch.manual_seed(0)
    model, crit = build_capsnet(iters, naive=kind == "naive")
    if kind == "conv-only":
        model = ConvBound(model)
    model = model.to(device)
    x, y = mnist_batch(batch, device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if args.compile and kind == "capsnet":
        model = torch.compile(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = (partial(torch.autocast, device.type, dtype=dtype) if dtype else contextlib.nullcontext)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" and kind != "conv-only" else None
    step = make_steps(model, crit, train, x, y, autocast, scaler)
    seconds, peak = time_case(step, args.warmup, args.steps, device, memory)
    del model, step
    return {"case": kind, "mode": "train" if train else "infer", "batch": batch,
            "iters": None if kind == "conv-only" else iters, "ms_per_step": 1000 * seconds,
            "images_per_second": batch / seconds, "peak_mb": peak}


def plan(args) -> list[tuple]:
    """Our model and the bound first, the naive model last: its gigabytes of temporaries leave the
    heap fragmented, which would inflate the peak memory of whatever is measured after it."""
    cases = []
    for b in args.batch_sizes:
        cases += [("conv-only", True, b, 3), ("capsnet", True, b, 3)]
    sweep_batch = max(args.batch_sizes)
    cases += [("capsnet", True, sweep_batch, r) for r in args.iters if r != 3]
    cases += [("conv-only", False, args.infer_batch, 3), ("capsnet", False, args.infer_batch, 3)]
    if not args.no_naive:
        cases += [("naive", True, b, 3) for b in args.batch_sizes] + [("naive", False, args.infer_batch, 3)]
    return cases


def add_ratios(rows: list[dict]) -> None:
    def find(case, mode, batch, iters=3):
        for r in rows:
            if r["case"] == case and r["mode"] == mode and r["batch"] == batch and r["iters"] in (iters, None):
                return r
        return None

    for r in rows:
        bound = find("conv-only", r["mode"], r["batch"])
        naive = find("naive", r["mode"], r["batch"])
        r["vs_conv_bound"] = r["images_per_second"] / bound["images_per_second"] if bound else None
        r["vs_naive"] = r["images_per_second"] / naive["images_per_second"] if naive else None


def format_table(rows: list[dict]) -> str:
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    head = ["case", "mode", "batch", "iters", "ms/step", "images/s", "peak MB", "x conv bound", "x naive"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["case"], r["mode"], str(r["batch"]), f(r["iters"], 0) if r["iters"]
                                        else "-", f(r["ms_per_step"], 0), f(r["images_per_second"]),
                                        f(r["peak_mb"], 0), f(r["vs_conv_bound"], 2), f(r["vs_naive"], 2)]) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m capsnet.tools.bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--batch-sizes", type=ints, default=[32, 128])
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--iters", type=ints, default=[1, 2, 3, 4, 5], help="routing iterations to sweep")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--allocator", choices=["keep", "default"], default="keep",
                   help="keep: glibc keeps freed memory for reuse, as train.py does by default")
    p.add_argument("--no-naive", action="store_true", help="skip the naive reference model")
    p.add_argument("--json", type=Path, default=Path("bench.json"))
    p.add_argument("--memory", choices=["fresh", "inline"], default="fresh",
                   help="fresh: measure each case's peak memory in a new process (a clean heap); "
                        "inline: in this process, after the cases before it")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # internal: one case, print its peak
    return p.parse_args(argv)


def fresh_peak_mb(case: tuple, args) -> float | None:
    """Peak memory of one case, measured by a new Python process (1 warm-up, 1 step)."""
    kind, train, batch, iters = case
    cmd = [sys.executable, "-m", "capsnet.tools.bench", "--device", args.device, "--amp", args.amp,
           "--allocator", args.allocator, "--warmup", "1", "--steps", "1",
           "--memory-case", f"{kind},{int(train)},{batch},{iters}"]
    cmd += ["--compile"] * args.compile + ["--channels-last"] * args.channels_last
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    return json.loads(lines[-1])["peak_mb"] if proc.returncode == 0 and lines else None


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.amp == "fp16" and args.device != "cuda":
        raise SystemExit("capsnet.tools.bench: error: --amp fp16 needs --device cuda")
    configure_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory = Memory(device)
    if args.memory_case:
        kind, train, batch, iters = args.memory_case.split(",")
        row = run_case(kind, bool(int(train)), int(batch), int(iters), args, device, memory)
        print(json.dumps(row))
        return [row]
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(), "amp": args.amp, "compile": args.compile,
            "channels_last": args.channels_last, "allocator": args.allocator,
            "steps": args.steps, "warmup": args.warmup, "memory": args.memory}
    print(f"capsnet.tools.bench: {meta['device']}, torch {meta['torch']}, {meta['threads']} threads, amp {args.amp}, "
          f"allocator {args.allocator}, median of {args.steps} steps after {args.warmup} warm-up, "
          f"memory {args.memory}", flush=True)
    rows = []
    for kind, train, batch, iters in plan(args):
        rows.append(run_case(kind, train, batch, iters, args, device, memory))
        r = rows[-1]
        if args.memory == "fresh" and device.type == "cpu":
            r["peak_mb"] = fresh_peak_mb((kind, train, batch, iters), args)
        print(f"  {kind:9s} {r['mode']:5s} batch {batch:3d} iters {iters}: {r['ms_per_step']:8.0f} ms/step, "
              f"{r['images_per_second']:7.1f} images/s", flush=True)
    add_ratios(rows)
    table = format_table(rows)
    print(table)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"written to {args.json}")
    return rows


if __name__ == "__main__":
    main()
