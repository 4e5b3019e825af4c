"""Where a CapsNet step's time goes beyond its convolutions: `python -m capsnet.tools.bench --split`.

The benchmark's ratios say how far a step is from the conv-only bound; this says why. The bound's step and
the CapsNet's alternate in one process (the same heap, the same machine state) under `torch.profiler`, and
each operator's own time per step is set beside the other's: the convolutions' rows show what the bound
shares, the rest is what the capsule layers, the decoder, the losses and the optimiser add.
"""

from __future__ import annotations

import collections

import torch
from torch.profiler import ProfilerActivity, profile

from capsnet.tools.bench_cases import case_step

SHAPED = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::convolution", "aten::copy_")


def _key(event) -> str:
    """The operator's name; the convolutions' and copies' with their first input's shape (which one)."""
    shapes = getattr(event, "input_shapes", None)
    return f"{event.key} {list(shapes[0])}" if event.key in SHAPED and shapes and shapes[0] else event.key


def op_times(batch: int, amp: str, train: bool = True, rounds: int = 3, steps: int = 3,
             device: torch.device = torch.device("cpu")) -> dict[str, collections.Counter]:
    """{"conv-only" | "capsnet": {operator: self time in ms per step}}, the two steps profiled in turn,
    `rounds` times `steps` steps each after two warm-up steps."""
    step_of = {name: case_step(name, batch, amp, train, device)[0] for name in ("conv-only", "capsnet")}
    for step in step_of.values():
        step(), step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    times = {name: collections.Counter() for name in step_of}
    for _ in range(rounds):
        for name, step in step_of.items():
            with profile(activities=activities, record_shapes=True) as prof:
                for _ in range(steps):
                    step()
            for event in prof.key_averages(group_by_input_shape=True):
                us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
                times[name][_key(event)] += us / 1000 / (rounds * steps)
    return times


def format_split(times: dict[str, collections.Counter], title: str, top: int = 16) -> str:
    """A markdown table: the `top` operators by time, the rest summed, the CapsNet's own operators (none
    in the bound's step) summed, and the totals. The shared operators (the convolutions) drift between
    the two profiles by a few percent on a busy machine; the ratio with them at the bound's time,
    bound / (bound + the CapsNet's own), is what the capsule layers alone cost."""
    bound, caps = times["conv-only"], times["capsnet"]
    names = sorted(set(bound) | set(caps), key=lambda k: -max(bound[k], caps[k]))
    lines = [title, "", "| operator (self time per step) | bound ms | CapsNet ms | CapsNet - bound |",
             "| --- | --- | --- | --- |"]
    row = lambda name, a, b: f"| {name} | {a:.1f} | {b:.1f} | {b - a:+.1f} |"  # noqa: E731
    for name in names[:top]:
        lines.append(row(f"`{name}`", bound[name], caps[name]))
    rest = names[top:]
    lines.append(row(f"{len(rest)} other operators", sum(bound[k] for k in rest), sum(caps[k] for k in rest)))
    own = sum(caps[k] for k in caps if not bound[k])
    lines.append(row("of all these, the CapsNet's own operators (none in the bound's step)", 0.0, own))
    a, b = sum(bound.values()), sum(caps.values())
    lines.append(row("**total**", a, b))
    if a and b:
        lines += ["", f"Ratio bound / CapsNet: {a / b:.3f} as profiled; {a / (a + own):.3f} with the shared "
                      "operators at the bound's time (what the CapsNet's own operators alone cost)."]
    return "\n".join(lines)
