"""Speed and memory of capsule networks: `python -m capsnet.tools.bench` (or `make bench`).

Cases: our CapsNet's training step (forward, the config's loss, backward,
Adam) and inference; the same model with the naive parts most public
re-implementations use (`capsnet.routing.naive`); the conv-only bound (Conv1
and the PrimaryCaps convolution alone, which no routing trick can beat); a
sweep of routing iterations; bf16 rows beside the fp32 ones; the other
routings' networks (self-attention routing in the CapsNet, Efficient-CapsNet,
inverted dot-product attention, EM). Every case runs in a fresh Python process
(a clean heap, no warm caches from the case before), the whole list in R
rounds with the order rotated each round; rows give the median over rounds
and the spread. Writes bench.json (rows + machine record); `--compare A B`
compares two such files; `--docs docs/performance.md` rewrites the table there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from capsnet.routing import fused_cpu
from capsnet.tools.bench_cases import CASES, run_case
from capsnet.tools.bench_machine import cpu_busy, cpu_info, describe, gemm_gflops, machine_record
from capsnet.tools.bench_split import format_split, op_times
from capsnet.tools.bench_report import compare, fold, format_table, load, markdown, targets, write_docs
from capsnet.train.perf import configure_allocator

OTHER_MODELS = ["capsnet+self_attention", "efficient_capsnet", "idpa_capsnet", "matrix_capsnet"]


def parse_args(argv=None):
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    names = lambda s: [] if s in ("", "none") else s.split(",")  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m capsnet.tools.bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", type=names, default=["off", "bf16"],
                   help="comma list of off|bf16|fp16: all cases in the first, conv-only + CapsNet rows in the rest")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (not the bound)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--batch-sizes", type=ints, default=[32, 128], help="training batches of the CapsNet rows")
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--iters", type=ints, default=[1, 2, 3, 4, 5], help="routing iterations to sweep")
    p.add_argument("--models", type=names, default=OTHER_MODELS, help="other networks to time ('none': skip)")
    p.add_argument("--model-batch", type=int, default=None,
                   help="batch of the other networks' rows (default: each network's own, bench_cases.CASES)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive reference model")
    p.add_argument("--rounds", type=int, default=3, help="runs of the whole list, order rotated each time")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case and round (their median)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--allocator", choices=["keep", "default"], default="keep",
                   help="keep: glibc keeps freed memory for reuse, as train.py does by default")
    p.add_argument("--gemm-seconds", type=float, default=0.5, help="length of each GEMM-peak loop (0: skip)")
    p.add_argument("--case-timeout", type=float, default=1800, help="seconds before a case's process is killed")
    p.add_argument("--quick", action="store_true", help="a smoke run: batch 2, one round, CapsNet cases only")
    p.add_argument("--split", action="store_true",
                   help="instead of timing: per operator, where the CapsNet step's time goes beyond the bound's "
                        "(both in one process under torch.profiler), for each --amp, --batch-sizes and --infer-batch")
    p.add_argument("--json", type=Path, default=Path("bench.json"))
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two bench.json files")
    p.add_argument("--markdown", type=Path, metavar="BENCH_JSON", help="print the docs block of a bench.json")
    p.add_argument("--docs", type=Path, help="write the table between the bench markers of this file")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: time one case, print its row
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.infer_batch, args.iters, args.models, args.model_batch = [2], 2, [1, 3], [], 2
        args.amp, args.rounds, args.warmup, args.steps, args.gemm_seconds = ["off"], 1, 0, 1, 0.05
    bad = [a for a in args.amp if a not in ("off", "bf16", "fp16")] + [m for m in args.models if m not in OTHER_MODELS]
    if bad or not args.amp:
        p.error(f"unknown --amp or --models value {bad[0] if bad else '(empty)'}; --amp takes off,bf16,fp16 and "
                f"--models {','.join(OTHER_MODELS)}")
    if "fp16" in args.amp and args.device != "cuda":
        p.error("--amp fp16 needs --device cuda (use bf16 on a CPU)")
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    if min(args.batch_sizes + [args.infer_batch] + args.iters) < 1:
        p.error("--batch-sizes, --infer-batch and --iters must be at least 1")
    return args


def case(name: str, mode: str, batch: int, iters: int | None, amp: str) -> dict:
    return {"case": name, "mode": mode, "batch": batch, "iters": iters, "amp": amp}


def plan(args) -> list[dict]:
    """The list of cases (one round). The bound and our CapsNet at every batch in every amp; the
    iteration sweep, the naive model and the other networks in the first amp only."""
    first, biggest = args.amp[0], max(args.batch_sizes)

    def core(amp):
        rows = [case(n, "train", b, None if n == "conv-only" else 3, amp)
                for b in args.batch_sizes for n in ("conv-only", "capsnet")]
        return rows + [case("conv-only", "infer", args.infer_batch, None, amp),
                       case("capsnet", "infer", args.infer_batch, 3, amp)]

    cases = core(first) + [case("capsnet", "train", biggest, r, first) for r in args.iters if r != 3]
    for amp in args.amp[1:]:
        cases += core(amp)
    cases += [case("capsnet+torch_routing", "train", b, 3, first) for b in args.batch_sizes]
    cases += [case("capsnet+torch_routing", "infer", args.infer_batch, 3, first)]
    if not args.no_naive:
        cases += [case("naive", "train", b, 3, first) for b in args.batch_sizes]
        cases += [case("naive", "infer", args.infer_batch, 3, first)]
    for m in args.models:
        b = args.model_batch or CASES[m].batch
        cases += [case(m, "train", b, None, first), case(m, "infer", b, None, first)]
    return cases


def rotated(cases: list, r: int) -> list[int]:
    """Indices of round r: the list started r places further on, so no case always follows the same one."""
    n = len(cases)
    return [(i + r) % n for i in range(n)]


def run_fresh(case: dict, args) -> dict | None:
    """Time one case in a new Python process; its row, or None (the process's last lines go to stderr)."""
    cmd = [sys.executable, "-m", "capsnet.tools.bench", "--device", args.device, "--allocator", args.allocator,
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--case", json.dumps(case)]
    cmd += ["--compile"] * args.compile + ["--channels-last"] * args.channels_last
    cmd += ["--threads", str(args.threads)] if args.threads else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        print(f"  {case}: no result within {args.case_timeout:.0f} s", file=sys.stderr)
        return None
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        print(f"  {case}: failed (exit {proc.returncode}):\n    {tail}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def run_rounds(cases: list[dict], args, runner=run_fresh, on_round=None) -> list[list[dict | None]]:
    """R rounds over the cases, each in rotated order; result[r][i] is case i's row in round r.
    `on_round(rounds so far)` after each round (main saves them: a stopped run keeps finished rounds)."""
    rounds = []
    for r in range(args.rounds):
        got = [None] * len(cases)
        for i in rotated(cases, r):
            got[i] = runner(cases[i], args)
            row = got[i]
            c = cases[i] if row is None else row  # the row names the iterations a config chose itself
            result = "failed" if row is None else \
                f"{row['ms_per_step']:8.0f} ms/step, {row['images_per_second']:7.1f} images/s"
            print(f"  round {r + 1}/{args.rounds} {c['case']:22s} {c['amp']:4s} {c['mode']:5s} batch {c['batch']:3d} "
                  f"iters {'-' if c['iters'] is None else c['iters']}: {result}", flush=True)
        rounds.append(got)
        if on_round is not None:
            on_round(rounds)
    return rounds


def run_one(args) -> dict:
    """The internal --case mode: time the case in this process and print its row as one JSON line."""
    configure_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    row = run_case(json.loads(args.case), device=torch.device(args.device), warmup=args.warmup, steps=args.steps,
                   compile=args.compile, channels_last=args.channels_last)
    print(json.dumps(row), flush=True)
    return row


def run_split(args) -> dict:
    """The --split mode: one table per amp and batch (training), and for inference, printed as markdown."""
    configure_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, tables = torch.device(args.device), {}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info()["cpu"]
    runs = [(amp, b, True) for amp in args.amp for b in args.batch_sizes] + [(amp, args.infer_batch, False)
                                                                            for amp in args.amp]
    for amp, batch, train in runs:
        title = f"{'training' if train else 'inference'}, batch {batch}, amp {amp}, {where}"
        times = op_times(batch, amp, train, rounds=args.rounds, steps=args.steps, device=device)
        tables[title] = format_split(times, f"**{title}**")
        print(tables[title] + "\n", flush=True)
    return tables


def main(argv=None, runner=run_fresh) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.case:
        return run_one(args)
    if args.compare:
        print(compare(load(args.compare[0]), load(args.compare[1])))
        return {}
    if args.split:
        return run_split(args)
    if args.markdown:
        block = markdown(load(args.markdown))
        if args.docs:
            write_docs(args.docs, block)
        else:
            print(block)
        return {}
    load_before, busy_before = os.getloadavg(), cpu_busy()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join(["python", "-m", "capsnet.tools.bench", *argv]),
            **machine_record(device, args.allocator, args.gemm_seconds), "device": str(device),
            "load_before": load_before, "busy_before": busy_before, "rounds": args.rounds, "warmup": args.warmup,
            "steps": args.steps, "compile": args.compile, "channels_last": args.channels_last,
            "routing_kernel": "cpp" if device.type == "cpu" and fused_cpu.available() else "torch"}  # built here, once
    cases = plan(args)
    print(f"capsnet.tools.bench: {describe(meta)}\n  {len(cases)} cases x {args.rounds} rounds, each in a fresh "
          f"process, {args.warmup} warm-up + median of {args.steps} steps", flush=True)
    result = {}

    def save(rounds):
        """After each round: the machine's state (load, an fp32 GEMM probe: how fast it ran that round),
        and bench.json with the rounds so far."""
        probe = gemm_gflops(torch.float32, device, meta["gemm_n"], args.gemm_seconds) if args.gemm_seconds else None
        meta.update(load_after=os.getloadavg(), rounds=len(rounds))
        meta.setdefault("after_each_round", []).append({"load": os.getloadavg()[0], "gemm_gflops_fp32": probe})
        result.update(meta=meta, rows=fold(cases, rounds))
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    run_rounds(cases, args, runner, on_round=save)
    rows = result["rows"]
    print(format_table(rows) + "\n\n" + targets(rows) + f"\n\nwritten to {args.json}")
    if args.docs:
        write_docs(args.docs, markdown(result))
        print(f"table written to {args.docs}")
    return result


if __name__ == "__main__":
    main()
