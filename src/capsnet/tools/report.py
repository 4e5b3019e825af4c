"""Turn sweeps into the table and plot of a paper: `python -m capsnet.tools.report <sweep dir> [...]`.

Reads every run below the given folders (a Hydra job folder holds
`.hydra/config.yaml`; finished runs also `results.json`), groups them by
their setting (model, dataset, routing iterations, reconstruction, and any
other swept key), averages over seeds, and writes into the first folder:
`summary.md`, `summary.csv` and `error_vs_iters.png`. Runs that failed or did
not finish are listed as such.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Paper, Table 1 (MNIST test error %, mean and std over 3 trials): (model, iters, reconstruction).
PAPER_MNIST = {("baseline_cnn", None, None): (0.39, None), ("capsnet", 1, "no"): (0.34, 0.032),
               ("capsnet", 1, "yes"): (0.29, 0.011), ("capsnet", 3, "no"): (0.35, 0.036),
               ("capsnet", 3, "yes"): (0.25, 0.005)}
# The paper's other figures (error %), by (dataset, reported value, model): SPEC section 4.
PAPER_OTHER = {("multimnist", "test/pair_error", "capsnet"): 5.2,
               ("multimnist", "test/pair_error", "baseline_cnn_multimnist"): 8.1,
               ("expanded_mnist", "affnist/error", "capsnet"): 21.0,
               ("expanded_mnist", "affnist/error", "baseline_cnn"): 34.0,
               ("smallnorb", "test/error", "capsnet"): 2.7, ("svhn", "test/error", "capsnet_svhn"): 4.3,
               ("cifar10", "test/error", "capsnet_cifar10"): 10.6}
DERIVED = ("model", "dataset", "routing_iters", "reconstruction")
# Override keys the derived columns already describe, or that only pick among named settings.
NOT_SETTINGS = {"seed", "model", "dataset", "variant", "experiment", "routing.iters", "loss.recon_weight",
                "model.decoder", "out_dir"}


@dataclass
class RunRecord:
    path: Path
    setting: dict
    results: dict | None
    status: str  # finished | unfinished (k epochs) | failed


@dataclass
class Group:
    setting: dict
    runs: list = field(default_factory=list)

    def stat(self, key: str):
        vals = [v for v in (value(r.results, key) for r in self.runs) if v is not None]
        if not vals:
            return None, None
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def value(results: dict, key: str):
    """A run's final evaluation value ("test/error", "affnist/error", ...) or a summary field."""
    return (results.get("final") or {}).get(key, results.get(key))


def error_keys(runs: list) -> list[str]:
    """Every final value named *error that some run reports, the test set's first."""
    keys = {k for r in runs if r.results for k in (r.results.get("final") or {}) if k.endswith("error")}
    return sorted(keys, key=lambda k: (not k.startswith("test/"), k))


def _derived(cfg: dict) -> dict:
    model = cfg.get("model_name") or "?"
    is_caps = "class_caps" in (cfg.get("model") or {})
    recon = None
    if is_caps:
        has_decoder = (cfg["model"].get("decoder") is not None)
        recon = "yes" if has_decoder and float((cfg.get("loss") or {}).get("recon_weight", 0)) > 0 else "no"
    return {"model": model, "dataset": (cfg.get("dataset") or {}).get("name", "?"),
            "routing_iters": (cfg.get("routing") or {}).get("iters") if is_caps else None,
            "reconstruction": recon}


def read_run(job: Path) -> RunRecord:
    cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) or {}
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) if (
        job / ".hydra" / "overrides.yaml").is_file() else []
    setting = _derived(cfg)
    for o in overrides or []:
        key, _, value = o.lstrip("+~").partition("=")
        if key not in NOT_SETTINGS and not key.startswith("hydra"):
            setting[key] = value
    results = None
    if (job / "results.json").is_file():
        results = json.loads((job / "results.json").read_text())
        status = "finished"
    else:
        epochs = len((job / "metrics.jsonl").read_text().splitlines()) if (job / "metrics.jsonl").is_file() else 0
        if (job / "checkpoints" / "last.pt").is_file():
            status = f"stopped, resumable ({epochs} epochs done: rerun its command to continue)"
        else:
            status = f"failed ({epochs} epochs, no checkpoint)"
    return RunRecord(job, setting, results, status)


def find_runs(folders) -> list[RunRecord]:
    jobs = sorted({p.parent.parent for f in folders for p in Path(f).rglob(".hydra/config.yaml")})
    return [read_run(j) for j in jobs]


def group_runs(runs: list[RunRecord], columns: list[str]) -> list[Group]:
    groups: dict = {}
    for r in runs:
        if r.results is not None:
            setting = {k: r.setting.get(k) for k in columns}
            key = json.dumps(setting, sort_keys=True, default=str)
            groups.setdefault(key, Group(setting)).runs.append(r)
    order = lambda g: tuple(str(g.setting.get(k)) for k in DERIVED) + (json.dumps(g.setting, default=str),)  # noqa: E731
    return sorted(groups.values(), key=order)


def paper_figure(setting: dict, key: str) -> str:
    if setting.get("dataset") == "mnist" and key == "test/error":
        fig = PAPER_MNIST.get((setting["model"], setting["routing_iters"], setting["reconstruction"]))
    else:
        fig = PAPER_OTHER.get((setting.get("dataset"), key, setting.get("model")))
        fig = None if fig is None else (fig, None)
    if fig is None:
        return "-"
    return f"{fig[0]:.2f}" + (f" ± {fig[1]:.3f}" if fig[1] is not None else "")


def _fmt(x, digits=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table_rows(groups: list[Group], columns: list[str], errors: list[str]) -> list[dict]:
    rows = []
    for g in groups:
        ips, _ = g.stat("train_images_per_second")
        params, _ = g.stat("params")
        row = {**{c: g.setting.get(c) for c in columns}, "n": len(g.runs)}
        for key in errors:
            row[f"{key} mean"], row[f"{key} std"] = g.stat(key)
            row[f"{key} paper"] = paper_figure(g.setting, key)
        row.update({"params": int(params) if params is not None else None, "images_per_second": ips})
        rows.append(row)
    return rows


def setting_columns(runs: list[RunRecord]) -> list[str]:
    """The derived columns, then every other key whose value differs between runs (the swept ones)."""
    keys = list(DERIVED)
    for r in runs:
        for k in r.setting:
            if k not in keys and len({str(x.setting.get(k)) for x in runs}) > 1:
                keys.append(k)
    return keys


def markdown(rows: list[dict], columns: list[str], errors: list[str], runs: list[RunRecord]) -> str:
    head = [*columns, "n"]
    for key in errors:
        head += [f"{key} % (mean ± std)", "paper %"]
    head += ["params", "train images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [("-" if r[c] is None else str(r[c])) for c in columns] + [str(r["n"])]
        for key in errors:
            std = r[f"{key} std"]
            cells += [_fmt(r[f"{key} mean"]) + (f" ± {_fmt(std)}" if std is not None else ""), r[f"{key} paper"]]
        cells += [f"{r['params']:,}" if r["params"] else "-", _fmt(r["images_per_second"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    bad = [r for r in runs if r.status != "finished"]
    if bad:
        lines += ["", "Runs that did not finish (not in the table):", ""]
        lines += [f"- `{r.path}`: {r.status}" for r in bad]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["n"])
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict], columns: list[str], metric: str) -> None:
    """The first reported error against routing iterations, one line per setting of the other columns."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    others = [c for c in columns if c != "routing_iters"]
    lines: dict = {}
    for r in rows:
        lines.setdefault(tuple(r[c] for c in others), []).append(r)
    for n, (key, rs) in enumerate(lines.items()):
        label = ", ".join(f"{c}={v}" for c, v in zip(others, key) if v is not None)
        pts = sorted((r for r in rs if r["routing_iters"] is not None), key=lambda r: r["routing_iters"])
        if pts:
            shift = 0.04 * (n - (len(lines) - 1) / 2)  # lines side by side, so error bars stay readable
            ax.errorbar([r["routing_iters"] + shift for r in pts], [r[f"{metric} mean"] for r in pts],
                        yerr=[r[f"{metric} std"] or 0.0 for r in pts], marker="o", capsize=3, label=label)
        for r in rs:
            if r["routing_iters"] is None and r[f"{metric} mean"] is not None:  # no routing: a horizontal reference
                ax.axhline(r[f"{metric} mean"], linestyle="--", color="gray", label=label)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("routing iterations")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(folders, out_dir: Path | None = None) -> str:
    runs = find_runs(folders)
    if not runs:
        raise SystemExit(f"capsnet.tools.report: no runs (no .hydra/config.yaml) under {', '.join(map(str, folders))}")
    out_dir = Path(out_dir or folders[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    columns, errors = setting_columns(runs), error_keys(runs)
    rows = table_rows(group_runs(runs, columns), columns, errors)
    text = markdown(rows, columns, errors, runs)
    (out_dir / "summary.md").write_text(text)
    write_csv(out_dir / "summary.csv", rows)
    if errors:
        plot(out_dir / "error_vs_iters.png", rows, columns, errors[0])
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capsnet.tools.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="sweep folders (outputs/multirun/<date>/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first folder)")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not f.is_dir()]
    if missing:
        sys.exit(f"capsnet.tools.report: error: {missing[0]} is not a folder: give a sweep's output folder")
    print(report(args.folders, args.out), end="")


if __name__ == "__main__":
    main()
