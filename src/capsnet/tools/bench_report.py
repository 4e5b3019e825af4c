"""Benchmark results: rounds folded into rows, ratios, the table, the docs block and `--compare`.

Each case is timed once per round (a fresh process each time), so every row
holds one figure per round. Rows report the median over rounds and the spread
(min-max); a ratio between two cases is taken round by round (both measured
minutes apart under the same load) and its median reported, which cancels
most of a shared machine's drift.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from capsnet.errors import CapsnetError
from capsnet.tools.bench_cases import CASES
from capsnet.tools.bench_machine import describe

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
AMP_ORDER = {"off": 0, "bf16": 1, "fp16": 2}


def key(row: dict) -> tuple:
    return row["case"], row["mode"], row["batch"], row.get("iters"), row.get("amp", "off")


def fold(cases: list[dict], rounds: list[list[dict | None]]) -> list[dict]:
    """One row per planned case from its per-round results (None: that round's process failed)."""
    rows = []
    for i, case in enumerate(cases):
        got = [r[i] for r in rounds]
        ok = [g for g in got if g is not None]
        row = {**case, **(ok[-1] if ok else {}), "rounds": len(got), "failed": len(got) - len(ok),
               "per_round_images_per_second": [None if g is None else g["images_per_second"] for g in got]}
        peaks = [g["peak_mb"] for g in ok if g.get("peak_mb") is not None]
        for name, values in (("images_per_second", [g["images_per_second"] for g in ok]),
                             ("ms_per_step", [g["ms_per_step"] for g in ok]), ("peak_mb", peaks)):
            row[name] = statistics.median(values) if values else None
        ips = [g["images_per_second"] for g in ok]
        row["images_per_second_min"], row["images_per_second_max"] = (min(ips), max(ips)) if ips else (None, None)
        rows.append(row)
    add_ratios(rows)
    return rows


def round_ratio(a: dict | None, b: dict | None) -> tuple | None:
    """(median, min, max) over rounds of a's images/s over b's, rounds where both ran; None if none."""
    if a is None or b is None:
        return None
    pairs = zip(a.get("per_round_images_per_second", []), b.get("per_round_images_per_second", []))
    ratios = [x / y for x, y in pairs if x is not None and y]
    return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None


def add_ratios(rows: list[dict]) -> None:
    """x conv bound (CapsNet-family cases over the conv-only case of the same mode, batch and amp), x naive
    (our CapsNet over the naive one, same iterations) and x fp32 (an amp row over its fp32 twin)."""
    index = {key(r): r for r in rows}
    for r in rows:
        case, mode, batch, iters, amp = key(r)
        bound = index.get(("conv-only", mode, batch, None, amp)) if CASES[case].capsnet_family else None
        naive = index.get(("naive", mode, batch, iters, amp)) if case in ("capsnet", "naive") else None
        fp32 = index.get((case, mode, batch, iters, "off")) if amp != "off" else None
        for name, other in (("vs_conv_bound", bound), ("vs_naive", naive), ("vs_fp32", fp32)):
            ratio = round_ratio(r, other)
            r[name] = None if ratio is None else ratio[0]


def display_order(rows: list[dict]) -> list[dict]:
    """Training before inference; per case, batch and iterations, the amp rows beside the fp32 one."""
    names = list(CASES)
    return sorted(rows, key=lambda r: (r["mode"] != "train", names.index(r["case"]) if r["case"] in names
                                       else len(names), r["batch"], r.get("iters") or 0,
                                       AMP_ORDER.get(r.get("amp", "off"), 9)))


def _f(v, d=1) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def format_table(rows: list[dict]) -> str:
    """The table as docs/performance.md shows it (GitHub markdown; the console prints the same)."""
    head = ["case", "amp", "mode", "batch", "iters", "ms/step", "images/s", "min-max", "peak MB",
            "x conv bound", "x naive", "x fp32"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in display_order(rows):
        spread = "-" if r.get("images_per_second_min") is None else \
            f"{r['images_per_second_min']:.1f}-{r['images_per_second_max']:.1f}"
        fails = f" ({r['failed']} of {r['rounds']} rounds failed)" if r.get("failed") else ""
        cells = [r["case"] + fails, r.get("amp", "off"), r["mode"], str(r["batch"]),
                 "-" if r.get("iters") is None else str(r["iters"]), _f(r.get("ms_per_step"), 0),
                 _f(r.get("images_per_second")), spread, _f(r.get("peak_mb"), 0), _f(r.get("vs_conv_bound"), 2),
                 _f(r.get("vs_naive"), 2), _f(r.get("vs_fp32"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


GOAL = 0.95  # of the conv-only bound of the same precision (issue 16)
MEMORY_GOAL_MB = 500  # peak above model and data, batch-128 training step


def targets(rows: list[dict]) -> str:
    """The performance goals, read from the rows of our CapsNet (3 iterations): a markdown table with
    each measured value and whether it meets its goal, empty if no row applies."""
    index = {key(r): r for r in rows}
    lines = []
    for amp in ("off", "bf16", "fp16"):
        name = "fp32" if amp == "off" else amp
        for mode in ("train", "infer"):
            for b in sorted(b for (c, m, b, i, a) in index if (c, m, i, a) == ("capsnet", mode, 3, amp)):
                v = index[("capsnet", mode, b, 3, amp)].get("vs_conv_bound")
                what = "training step" if mode == "train" else "inference"
                lines.append(f"| {name} {what} at batch {b} >= {GOAL:.0%} of the {name} conv-only bound | "
                             f"{_pct(v)} | {_met(v is not None and v >= GOAL)} |")
    train = sorted(b for (c, m, b, i, a) in index if (c, m, i, a) == ("capsnet", "train", 3, "off"))
    if train:
        b = train[-1]
        one, five = index.get(("capsnet", "train", b, 1, "off")), index.get(("capsnet", "train", b, 5, "off"))
        ratio = round_ratio(one, five)  # images/s at 1 over at 5 = time at 5 over at 1
        if ratio:
            lines.append(f"| 5 routing iterations at most 10% slower than 1 (fp32, batch {b}) | "
                         f"{100 * (ratio[0] - 1):+.1f}% (rounds {100 * (ratio[1] - 1):+.1f}% to "
                         f"{100 * (ratio[2] - 1):+.1f}%) | {_met(ratio[0] <= 1.10)} |")
        peak = index[("capsnet", "train", b, 3, "off")].get("peak_mb")
        if b == 128 and peak is not None:
            lines.append(f"| peak memory above model and data <= {MEMORY_GOAL_MB} MB (fp32, batch-128 training) | "
                         f"{peak:.0f} MB | {_met(peak <= MEMORY_GOAL_MB)} |")
    head = ["| goal | measured (median over rounds) | met |", "| --- | --- | --- |"]
    return "\n".join(head + lines) if lines else ""


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def loaded(meta: dict) -> bool:
    """Other work on the machine: a quarter of the CPUs busy in the second before the run (older files:
    the 1-minute load average at least half a CPU)."""
    busy = meta.get("busy_before")
    if busy is not None:
        return busy >= 0.25
    load = meta.get("load_before")
    return bool(load) and load[0] >= 0.5


def machine_state(meta: dict) -> str:
    """One sentence on how busy the machine was before the run ("" when the file does not say)."""
    busy = meta.get("busy_before")
    busy = f"{busy:.0%} of the CPUs busy in the second before the run" if busy is not None else None
    if loaded(meta):
        load = f"load average {meta['load_before'][0]:.1f} before the run, {meta['load_after'][0]:.1f} after"
        return (f" Measured while other work ran on the machine ({', '.join(filter(None, [busy, load]))}, "
                f"on {meta.get('cpus')} CPUs).")
    return f" The machine was quiet before the run ({busy})." if busy else ""


def markdown(result: dict) -> str:
    """The docs block: the command, date and machine, the table, the targets."""
    meta = result["meta"]
    note = machine_state(meta)
    head = (f"`{meta.get('command', 'python -m capsnet.tools.bench')}`, on {meta.get('date', '?')[:10]}: "
            f"{machine_line(meta)}. {meta.get('rounds', '?')} rounds, each case in a fresh process "
            f"({meta.get('warmup', '?')} warm-up, median of {meta.get('steps', '?')} steps); images/s is the "
            f"median over rounds, min-max its spread, ratios the median of per-round ratios.{note}")
    after = meta.get("after_each_round") or []
    if after:
        gemm = ", ".join(_f(a.get("gemm_gflops_fp32"), 0) for a in after)
        loads = ", ".join(_f(a.get("load")) for a in after)
        head += (f" After each round: load average {loads}; fp32 GEMM probe {gemm} GFLOP/s "
                 "(how fast the machine ran that round).")
    parts = [head, format_table(result["rows"]), targets(result["rows"])]
    return "\n\n".join(p for p in parts if p)


def machine_line(meta: dict) -> str:
    return describe(meta) if "cpu" in meta else str(meta.get("device", "unknown machine"))


def write_docs(path: Path, block: str) -> None:
    """Replace what lies between the bench marker lines of `path` (each alone on its line) with `block`."""
    text = path.read_text()
    found = re.search(f"^{re.escape(BEGIN)}$.*?^{re.escape(END)}$", text, flags=re.M | re.S)
    if found is None:
        raise CapsnetError(f"{path} has no '{BEGIN}' ... '{END}' lines; add them where the table belongs")
    path.write_text(f"{text[:found.start()]}{BEGIN}\n{block}\n{END}{text[found.end():]}")


def load(path: Path) -> dict:
    """A bench.json; rows of the older format (no per-row amp) take the file's amp."""
    try:
        result = json.loads(Path(path).read_text())
        amp = result["meta"].get("amp", "off")
        for r in result["rows"]:
            r.setdefault("amp", amp)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CapsnetError(f"cannot read {path} as a bench.json ({type(e).__name__}: {e}); "
                           "give a file `python -m capsnet.tools.bench` wrote") from None
    return result


def compare(a: dict, b: dict) -> str:
    """The cases both files hold, with images/s of each and B/A (above 1: B is faster)."""
    rows_a, rows_b = {key(r): r for r in a["rows"]}, {key(r): r for r in b["rows"]}
    common = [r for r in display_order(list(rows_b.values())) if key(r) in rows_a]
    lines = [f"A: {machine_line(a['meta'])} ({a['meta'].get('date', '?')})",
             f"B: {machine_line(b['meta'])} ({b['meta'].get('date', '?')})", "",
             "| case | amp | mode | batch | iters | A images/s | B images/s | B/A |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rb in common:
        ra = rows_a[key(rb)]
        ia, ib = ra.get("images_per_second"), rb.get("images_per_second")
        ratio = ib / ia if ia and ib else None
        lines.append(f"| {rb['case']} | {rb['amp']} | {rb['mode']} | {rb['batch']} | "
                     f"{'-' if rb.get('iters') is None else rb['iters']} | {_f(ia)} | {_f(ib)} | {_f(ratio, 2)} |")
    if not common:
        lines.append("| (no case in common) | | | | | | | |")
    only = len(rows_a) + len(rows_b) - 2 * len(common)
    return "\n".join(lines + ([f"\n{only} case(s) in only one of the files."] if only else []))
