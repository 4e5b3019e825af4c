"""Evaluate trained checkpoints: one model, or an ensemble; metrics, figures, routing diagnostics.

`python eval.py ckpt=<path>` (see docs/evaluation.md) ends here. A checkpoint
holds the resolved config of its run, so the model, loss, metrics and data
are rebuilt from it; the user's `dataset...` and `trainer.*` overrides are
applied on top of that stored config (`apply_run_overrides`):

- `dataset=NAME` replaces the stored dataset node by configs/dataset/NAME.yaml
  as `python train.py dataset=NAME` composes it, and the metrics too when that
  file picks its own (MultiMNIST does);
- `dataset.KEY=VALUE`, `+dataset.KEY=VALUE`, `~dataset.KEY` then edit the
  resulting node (the stored one, or the new one), as Hydra would;
- `trainer.KEY=VALUE` edits the stored trainer settings (amp, device,
  eval_batch_size, threads, num_workers), checked against the training schema.

Every evaluation set goes through `capsnet.train.engine.evaluate` with the
run's own loss, metrics, batch size, device and autocast, so on the same data
the numbers are the run's own (results.json "final" for last.pt). Extra
"metrics" ride along in that same pass: a score collector (for ensembles,
the confusion matrix and the worst images) and the routing recorder
(`capsnet.routing.diagnostics`). Under torchrun each process evaluates its
share of every set (the loaders' sharding) and sums are all-reduced once.

An ensemble (several checkpoints) sums the members' class scores (capsule
lengths) and takes the argmax, as the official code's `evaluate_ensemble`
does for CIFAR-10's 7 models (SPEC 5.5).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from capsnet.errors import CapsnetError, CheckpointError, DatasetError

RUN_GROUPS = ("dataset",)  # group overrides applied to the stored config
RUN_PREFIXES = ("dataset.", "trainer.")  # key overrides applied to the stored config
FIGURE_DEFAULTS = {"enabled": True, "per_class": 1, "max_delta": 0.25, "step": 0.05, "reconstructions": 8,
                   "worst": 16, "multimnist": 8}


# --- what to evaluate --------------------------------------------------------------------------------
def is_run_override(arg: str) -> bool:
    """Does this command-line override edit the checkpoint's stored config (not eval.yaml)?"""
    key = arg.split("=", 1)[0].lstrip("+~")
    return key in RUN_GROUPS or key.startswith(RUN_PREFIXES)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(overrides of the stored run config, everything else: eval.yaml's own keys and Hydra's flags)."""
    run = [a for a in argv if not a.startswith("-") and is_run_override(a)]
    return run, [a for a in argv if a not in run]


def _natural(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def checkpoint_paths(spec) -> list[Path]:
    """ckpt=<file> | <folder> (every best.pt below it: a run or a sweep) | [a.pt, b.pt, ...] -> files."""
    if spec is None or spec == "???" or (isinstance(spec, (list, tuple)) and not spec):
        raise CapsnetError("no checkpoint given: use ckpt=<run>/checkpoints/best.pt, ckpt=<sweep folder> "
                           "or ckpt=[a.pt,b.pt]")
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[Path] = []
    for item in items:
        p = Path(str(item)).expanduser()
        if p.is_dir():
            found = sorted(p.rglob("best.pt"), key=_natural)
            if not found:
                raise CapsnetError(f"ckpt={item}: no checkpoints/best.pt below this folder; "
                                   "name the checkpoint files themselves")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise CapsnetError(f"ckpt={item} does not exist: give a checkpoint file or a run/sweep folder")
    return paths


# --- the stored config and the user's overrides ------------------------------------------------------
def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise CapsnetError(f"cannot parse the overrides: {str(e).strip().splitlines()[0]}") from None
    for o in parsed:
        if o.is_sweep_override():
            raise CapsnetError(f"'{o.input_line}': eval.py evaluates one setting; give a single value")
    return parsed


_ABSENT = object()


def _edit(cfg: DictConfig, o) -> None:
    """One key override on a plain config, with Hydra's meaning of +, ++ and ~."""
    key = o.key_or_group
    exists = OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT
    if o.is_delete():
        if not exists:
            raise CapsnetError(f"'{o.input_line}': the run's config has no key {key}")
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        node.pop(leaf)
    elif exists or o.is_add() or o.is_force_add():
        if exists and o.is_add() and not o.is_force_add():
            raise CapsnetError(f"'{o.input_line}': {key} is already set in the run's config: drop the '+'")
        OmegaConf.update(cfg, key, o.value(), merge=False, force_add=True)
    else:
        raise CapsnetError(f"unknown key '{key}' (in '{o.input_line}') for this run's config: check the spelling, "
                           f"or add it with '+{o.input_line}'")


def _dataset_option(name: str) -> tuple[DictConfig, DictConfig | None]:
    """(dataset node of configs/dataset/NAME.yaml, its own metrics or None) as train.py would compose them."""
    from hydra.errors import HydraException

    from capsnet.train.build import compose_config

    try:
        chosen, default = compose_config([f"dataset={name}"]), compose_config([])
    except HydraException as e:
        raise CapsnetError(f"dataset={name}: {str(e).strip().splitlines()[0]}") from None
    metrics = chosen.metrics if chosen.metrics != default.metrics else None
    return chosen.dataset, metrics


def apply_run_overrides(stored: dict | DictConfig, overrides: list[str]) -> DictConfig:
    """The stored run config with the user's dataset/trainer overrides applied (module docstring)."""
    from capsnet.cli.schema import TrainerSchema, validate
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(stored), resolve=True))
    parsed = _parse(overrides)
    for o in parsed:
        if not is_run_override(o.input_line):
            raise CapsnetError(f"'{o.input_line}' cannot change a trained run: only dataset... and trainer.* apply")
        if o.key_or_group in RUN_GROUPS and not o.is_delete():
            dataset, metrics = _dataset_option(str(o.value()))
            cfg.dataset = OmegaConf.create(OmegaConf.to_container(dataset, resolve=True))
            if metrics is not None:
                cfg.metrics = OmegaConf.create(OmegaConf.to_container(metrics, resolve=True))
    for o in parsed:
        if o.key_or_group not in RUN_GROUPS:
            _edit(cfg, o)
    try:
        trainer = OmegaConf.merge(OmegaConf.structured(TrainerSchema), cfg.trainer)
    except OmegaConfBaseException as e:
        raise CapsnetError(f"bad trainer setting: {str(e).strip().splitlines()[0]}") from None
    cfg.trainer = OmegaConf.create(OmegaConf.to_container(trainer, enum_to_str=True))
    validate(cfg)
    return cfg


# --- members -----------------------------------------------------------------------------------------
@dataclass
class Member:
    """One trained model, rebuilt from its checkpoint, with its run's loss and metrics."""

    path: Path
    cfg: DictConfig
    model: torch.nn.Module
    criterion: torch.nn.Module
    metrics: dict
    in_shape: tuple
    num_classes: int
    results: dict = field(default_factory=dict)


def restore_progress(criterion, ckpt: dict, cfg: DictConfig) -> None:
    """Put a progress-scheduled loss (spread loss's margin) where the run's own evaluation had it: the loop's
    last `set_progress(step / total_steps)` call was made before its last step, with total_steps = epochs x
    batches per epoch (epochs from trainer.steps when that budget is set, as the run computes them)."""
    loop = ckpt.get("loop") or {}
    if not hasattr(criterion, "set_progress") or not loop.get("epoch"):
        return
    per_epoch = round((loop["step"] + loop.get("skipped", 0)) / loop["epoch"])
    steps = OmegaConf.select(cfg, "trainer.steps", default=None)
    epochs = math.ceil(steps / per_epoch) if steps and per_epoch else cfg.trainer.epochs
    criterion.set_progress(max(loop["step"] - 1, 0) / max(epochs * per_epoch, 1))


def load_member(path: Path, overrides: list[str], device) -> Member:
    """Rebuild the run's model (strict weights), loss and metrics from a checkpoint; refuse anything else."""
    from capsnet.train.build import build_loss, build_metrics, build_model, count_parameters
    from capsnet.train.checkpoint import load_checkpoint, load_model_state

    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict) or "in_shape" not in (ckpt.get("data") or {}):
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (no stored config or input "
                              "shape): use a run's checkpoints/best.pt or last.pt")
    cfg = apply_run_overrides(ckpt["config"], overrides)
    in_shape, num_classes = tuple(ckpt["data"]["in_shape"]), int(ckpt["data"]["num_classes"])
    try:
        model = build_model(cfg, in_shape, num_classes)
    except CapsnetError:
        raise
    except Exception as e:  # a config this code can no longer build
        raise CheckpointError(f"{path}: its stored model config does not build ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); evaluate it with the code it was trained "
                              "with") from None
    load_model_state(model, ckpt["model"], str(path))
    criterion = build_loss(cfg)
    restore_progress(criterion, ckpt, cfg)
    member = Member(path, cfg, model.to(device).eval(), criterion.to(device), build_metrics(cfg), in_shape,
                    num_classes)
    member.results = {"checkpoint": str(path), "model": cfg.get("model_name"), "params": count_parameters(model),
                      "seed": cfg.get("seed"), "epoch": (ckpt.get("loop") or {}).get("epoch")}
    return member


def check_members(members: list[Member]) -> None:
    """An ensemble needs one dataset, one input shape and one set of classes; one line naming the first odd
    member. The data are built from the first member's config, so members trained on different datasets of
    the same shape (MNIST and Fashion-MNIST) would otherwise be scored on the first one's without a word."""
    first = members[0]
    for m in members[1:]:
        names = [OmegaConf.select(x.cfg, "dataset.name") for x in (first, m)]
        if names[0] != names[1]:
            raise CapsnetError(f"ensemble members disagree on the dataset: {first.path} was trained on {names[0]}, "
                               f"{m.path} on {names[1]}; ensemble models of one dataset, or pass dataset=NAME "
                               "to evaluate every member on that one")
        if m.num_classes != first.num_classes:
            raise CapsnetError(f"ensemble members disagree on classes: {first.path} has {first.num_classes}, "
                               f"{m.path} has {m.num_classes}; ensemble models of the same dataset")
        if tuple(m.in_shape) != tuple(first.in_shape):
            raise CapsnetError(f"ensemble members disagree on input shape: {first.path} takes {first.in_shape}, "
                               f"{m.path} takes {m.in_shape}; ensemble models of the same dataset")


def evaluation_sets(data) -> dict:
    """The data's evaluation sets by name ("val", "test", then extra ones such as affNIST), read without its
    training split: evaluating on affNIST needs only affNIST's test files."""
    if not hasattr(data, "own_evals"):
        return data.evals()
    sets = dict(data.own_evals())
    for name, other in (getattr(data, "extra_evals", None) or {}).items():
        sets[name] = other.own_evals()["test"]
        sets[name].name = name
    return sets


def check_data(member: Member, data_name: str, sets: dict) -> None:
    """Every evaluation set must give the model's input shape and labels among its classes."""
    for name, split in sets.items():
        shape, labels = tuple(split.in_shape), split.labels
        top = int(labels.max()) if labels.dim() == 1 and len(labels) else labels.shape[-1] - 1
        if shape != tuple(member.in_shape) or top >= member.num_classes:
            problem = f"inputs {shape}" if shape != tuple(member.in_shape) else f"label {top}"
            raise DatasetError(f"the evaluation set '{name}' of {data_name} gives {problem}, but {member.path} was "
                               f"trained on inputs {tuple(member.in_shape)} in {member.num_classes} classes: "
                               "evaluate it on data of its own shape and classes (dataset=...)")


# --- the evaluation pass -----------------------------------------------------------------------------
def _recon_with_labels(cfg: DictConfig) -> bool:
    """The run's test-time reconstruction rule (trainer.eval_recon_with_labels: the true label's capsule)."""
    return bool(OmegaConf.select(cfg, "trainer.eval_recon_with_labels", default=False))


class ScoreCollector:
    """A metric that keeps every batch's scores and labels (on the CPU) for ensembles and figures."""

    names = ()

    def __init__(self):
        self.scores, self.labels = [], []

    def sums(self, out, batch) -> dict:
        self.scores.append(out.scores.detach().float().cpu())
        self.labels.append(batch.labels.detach().cpu())
        return {}

    def compute(self, totals: dict) -> dict:
        return {}

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, labels) in this process's order; two empty tensors for a process that had no images."""
        if not self.scores:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.cat(self.scores), torch.cat(self.labels)


def gather_rows(local: torch.Tensor, world: int) -> torch.Tensor:
    """This process's rows (items rank, rank + world, ...: the evaluation loaders' sharding) -> all rows
    in index order, on every process."""
    if world == 1:
        return local
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, local.cpu())
    like = max(parts, key=len)  # a process without images sends an empty tensor of no particular shape
    out = like.new_empty((sum(len(p) for p in parts), *like.shape[1:]))
    for r, p in enumerate(parts):
        if len(p):
            out[r::world] = p
    return out


def evaluate_member(member: Member, loaders: dict, rt, split: str) -> tuple[dict, dict, dict]:
    """({"<set>/<value>": ...} as the run reports them, {set: (local scores, local labels)}, routing diagnostics
    on `split`)."""
    from capsnet.routing.diagnostics import RoutingRecorder
    from capsnet.train.engine import evaluate

    values, collected, routing = {}, {}, {}
    for name, loader in loaders.items():
        collector = ScoreCollector()
        extra = {"_scores": collector}
        with RoutingRecorder(member.model) if name == split else contextlib.nullcontext() as recorder:
            if recorder is not None:
                extra["_routing"] = recorder
            values.update(evaluate(member.model, member.criterion, {**member.metrics, **extra}, loader,
                                   rt.autocast, rt.device, name, recon_with_labels=_recon_with_labels(member.cfg)))
            routing = recorder.result if recorder is not None else routing
        collected[name] = collector.result()
    return values, collected, routing


def ensemble_metrics(collected: list[dict], metrics: dict, device) -> dict:
    """The ensemble's metrics per set: summed member scores, argmax (or top-n), each image counted once."""
    from capsnet.train.engine import accumulate, all_reduce, summarize
    from capsnet.types import Batch, ModelOutput

    values = {}
    for name in collected[0]:
        scores = sum(c[name][0] for c in collected)
        labels = collected[0][name][1]
        sums: dict = {}
        if len(labels):  # this process's share; an empty one still joins the sum below
            out = ModelOutput(scores=scores.to(device))
            accumulate(sums, {}, metrics, out, Batch(torch.empty(len(labels), 0), labels.to(device)))
        totals = all_reduce(sums, device) or {"count": 0.0}
        values.update({f"{name}/{k}": v for k, v in summarize(totals, metrics).items()})
    return values


# --- the whole evaluation ----------------------------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    autocast: object
    amp: str
    rank: int
    world: int


def setup_runtime(cfg: DictConfig) -> Runtime:
    """Device, autocast and process group from the (first) run's trainer settings, as the run had them."""
    from capsnet.train import distributed as dist_utils
    from capsnet.train.runtime import autocast_factory, resolve_amp, resolve_device

    t = cfg.trainer
    device = resolve_device(t.device)
    amp = resolve_amp(device, t.amp)  # trainer.amp=auto: as train.py chose it on this machine
    autocast = autocast_factory(device, amp)
    if t.threads:
        torch.set_num_threads(int(t.threads))
    rank, world, local = dist_utils.init_distributed(device.type, t.dist_timeout_s)
    if device.type == "cuda":
        device = torch.device("cuda", local)
    return Runtime(device, autocast, amp, rank, world)


def build_loaders(cfg: DictConfig, rt: Runtime):
    """(data source, its evaluation sets, {set name: BatchLoader of this process's share}) from the
    (overridden) run config."""
    from capsnet.data.loader import BatchLoader
    from capsnet.train.build import build_data

    data = build_data(cfg)
    sets = evaluation_sets(data)
    t = cfg.trainer
    loaders = {name: BatchLoader(split, t.eval_batch_size, train=False, rank=rt.rank, world_size=rt.world,
                                 num_workers=t.num_workers, pin_memory=rt.device.type == "cuda")
               for name, split in sets.items()}
    return data, sets, loaders


def evaluate_checkpoints(ckpt, out_dir, run_overrides=(), figures: dict | None = None, split: str = "test") -> dict:
    """Evaluate one checkpoint or an ensemble; rank 0 writes eval.json and the figures into `out_dir`."""
    paths = checkpoint_paths(ckpt)
    first_cfg = apply_run_overrides(_stored_config(paths[0]), list(run_overrides))
    rt = setup_runtime(first_cfg)
    members = [load_member(p, list(run_overrides), rt.device) for p in paths]
    check_members(members)
    data, sets, loaders = build_loaders(members[0].cfg, rt)
    check_data(members[0], data.name, sets)
    if split not in loaders:
        raise CapsnetError(f"split={split} is not an evaluation set of this data: choose one of {', '.join(loaders)}")
    collected = []
    for m in members:
        values, scores, routing = evaluate_member(m, loaders, rt, split)
        m.results.update(metrics=values, routing=_routing_entry(routing, m.num_classes))
        collected.append(scores)
    result = _result(members, data.name, list(sets), rt, list(run_overrides), split)
    if len(members) > 1:
        result["ensemble"] = {"size": len(members), "rule": "sum of the members' class scores, then argmax",
                              "metrics": ensemble_metrics(collected, members[0].metrics, rt.device)}
        result["metrics"] = result["ensemble"]["metrics"]
    full = {name: (gather_rows(s, rt.world), gather_rows(y, rt.world))
            for name, (s, y) in _summed(collected, split).items()}
    if rt.rank == 0:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        classes = class_names(data, members[0].num_classes)
        result["figures"], result["notes"] = draw_figures(members, sets[split], full[split], classes,
                                                          out_dir, {**FIGURE_DEFAULTS, **(figures or {})}, rt)
        write_eval(out_dir, result)
    return result


def class_names(data, num_classes: int) -> list[str]:
    """Short class names for figure labels ("7 - seven" -> "7"); class indices when the data names none."""
    names = [str(c).split(" - ")[0] for c in getattr(data, "classes", ())]
    return names if len(names) == num_classes else [str(k) for k in range(num_classes)]


def _stored_config(path: Path) -> dict:
    from capsnet.train.checkpoint import load_checkpoint

    cfg = load_checkpoint(path).get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (no stored config): "
                              "use a run's checkpoints/best.pt or last.pt")
    return cfg


def _summed(collected: list[dict], split: str) -> dict:
    return {split: (sum(c[split][0] for c in collected), collected[0][split][1])}


def _routing_entry(routing: dict, num_classes: int) -> dict | None:
    if not routing:
        return None
    return {**routing, "uniform_entropy": math.log(num_classes)}


def _result(members: list[Member], data_name: str, sets: list, rt: Runtime, overrides: list[str], split: str) -> dict:
    t = members[0].cfg.trainer
    return {"checkpoints": [str(m.path) for m in members], "dataset": data_name, "sets": sets,
            "run_overrides": overrides, "device": str(rt.device), "amp": rt.amp, "world_size": rt.world,
            "eval_batch_size": t.eval_batch_size, "figures_split": split,
            "members": [m.results for m in members], "metrics": members[0].results["metrics"], "ensemble": None}


def write_eval(out_dir: Path, result: dict) -> Path:
    from capsnet.train.outputs import write_atomically

    path = Path(out_dir) / "eval.json"
    write_atomically(path, json.dumps(result, indent=2) + "\n")
    return path


def format_table(result: dict) -> str:
    """Evaluation values (rows) by member and ensemble (columns), as plain text."""
    cols = [(Path(m["checkpoint"]).as_posix()[-28:], m["metrics"]) for m in result["members"]]
    if result.get("ensemble"):
        cols.append(("ensemble", result["ensemble"]["metrics"]))
    keys = list(dict.fromkeys(k for _, v in cols for k in v))
    width = max(len(k) for k in keys) + 2
    lines = [" " * width + "".join(f"{name:>30}" for name, _ in cols)]
    for k in keys:
        cells = "".join(f"{v[k]:>30.4f}" if k in v else f"{'-':>30}" for _, v in cols)
        lines.append(f"{k:<{width}}{cells}")
    return "\n".join(lines)


# --- figures (rank 0) --------------------------------------------------------------------------------
def _inputs(split, idx: torch.Tensor, device):
    from capsnet.data.loader import make_batch

    return make_batch(split, idx, 0, None).to(device)


def _label_text(label: torch.Tensor, classes: list) -> str:
    if label.dim() == 0:
        return classes[int(label)]
    return "(" + ",".join(classes[int(k)] for k in (label > 0.5).nonzero().flatten()) + ")"


def per_class_indices(labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """The first `per_class` images of every class, class by class (single-label data)."""
    picks = [(labels == k).nonzero().flatten()[:per_class] for k in range(num_classes)]
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def figure_perturbation(member: Member, split, labels, classes, opts, rt, path: Path) -> Path:
    """Figure 4: the predicted class capsule of a few images per class, each dimension perturbed, decoded."""
    from capsnet.tools.figures import perturbation_deltas, perturbation_grid, plot_perturbation

    idx = per_class_indices(labels, int(opts["per_class"]), member.num_classes)
    batch = _inputs(split, idx, rt.device)
    with rt.autocast():
        out = member.model(batch.images)
        pred = out.scores.argmax(-1)
        deltas = perturbation_deltas(float(opts["max_delta"]), float(opts["step"]))
        grids = [perturbation_grid(member.model.decoder, out.poses[b], int(pred[b]), deltas).float().cpu()
                 for b in range(len(idx))]
    titles = [f"label {classes[int(labels[i])]}, capsule {classes[int(p)]}" for i, p in zip(idx, pred)]
    return plot_perturbation(grids, titles, deltas, path)


@torch.no_grad()
def figure_reconstructions(member: Member, split, labels, classes, n: int, rt, path: Path) -> Path:
    from capsnet.tools.figures import plot_reconstructions

    idx = torch.arange(min(n, len(labels)))
    batch = _inputs(split, idx, rt.device)
    with rt.autocast():
        out = member.model(batch.images)
    preds = out.scores.float().argmax(-1).cpu()
    return plot_reconstructions(batch.images.cpu(), out.reconstructions[:, 0].float().cpu(),
                                [_label_text(labels[i], classes) for i in idx],
                                [classes[int(p)] for p in preds], path)


@torch.no_grad()
def figure_multimnist(member: Member, split, labels, classes, n: int, rt, path: Path) -> Path:
    """Figure 5: each image's two longest capsules decoded (R), beside its two labels (L)."""
    from capsnet.tools.figures import plot_multimnist

    idx = torch.arange(min(n, len(labels)))
    batch = _inputs(split, idx, rt.device)
    with rt.autocast():
        top2 = member.model(batch.images).scores.float().topk(2, -1).indices
        recon = member.model(batch.images, top2).reconstructions.float().cpu()
    two = [[classes[int(k)] for k in (labels[i] > 0.5).nonzero().flatten()][:2] for i in idx]
    two = [t + ["-"] * (2 - len(t)) for t in two]
    picked = [[classes[int(k)] for k in row] for row in top2.cpu()]
    return plot_multimnist(batch.images.cpu(), recon[:, 0], recon[:, 1], two, picked, path)


def figure_worst(split, scores, labels, classes, n: int, rt, path: Path) -> Path:
    from capsnet.tools.figures import plot_worst, worst_indices

    idx = worst_indices(scores, labels, n)
    images = _inputs(split, idx, torch.device("cpu")).images
    titles = []
    for i in idx:
        top = scores[i].topk(min(2, scores.shape[-1]))
        best = ", ".join(f"{classes[int(k)]}: {float(v):.2f}" for v, k in zip(top.values, top.indices))
        titles.append(f"label {_label_text(labels[i], classes)}\n{best}")
    return plot_worst(images, titles, path)


def _decodes(member: Member) -> bool:
    return getattr(member.model, "decoder", None) is not None


def draw_figures(members: list[Member], split, scores_labels, classes: list, out_dir: Path, opts: dict,
                 rt) -> tuple[dict, list]:
    """Write the PNG files that fit these models and data; ({figure: file name}, [notes on what was skipped])."""
    from capsnet.tools.figures import confusion_counts, plot_confusion, plot_routing

    if not opts["enabled"]:
        return {}, ["figures.enabled=false: no figures"]
    scores, labels = scores_labels
    files, notes, single, one = {}, [], labels.dim() == 1, members[0]
    draw = {}
    if single:
        draw["confusion"] = lambda p: plot_confusion(confusion_counts(scores, labels), classes, p)
    else:
        notes.append("confusion.png: single-label data only")
    if opts["worst"]:
        draw["worst"] = lambda p: figure_worst(split, scores, labels, classes, int(opts["worst"]), rt, p)
    if len(members) > 1:
        notes.append("perturbation/reconstructions: drawn for single models, not ensembles")
    elif not _decodes(one):
        notes.append("perturbation.png, reconstructions.png: this model has no decoder (nothing to reconstruct)")
    else:
        if single and opts["per_class"]:
            draw["perturbation"] = lambda p: figure_perturbation(one, split, labels, classes, opts, rt, p)
        elif not single:
            notes.append("perturbation.png: single-label data only (Figure 4)")
        if opts["reconstructions"]:
            draw["reconstructions"] = lambda p: figure_reconstructions(one, split, labels, classes,
                                                                       int(opts["reconstructions"]), rt, p)
        if not single and opts["multimnist"]:
            draw["multimnist_reconstructions"] = lambda p: figure_multimnist(one, split, labels, classes,
                                                                             int(opts["multimnist"]), rt, p)
    series = {Path(m.path).as_posix()[-40:]: m.results["routing"] for m in members if m.results.get("routing")}
    if series:
        draw["routing"] = lambda p: plot_routing(series, p)
    else:
        notes.append("routing.png: this model records no routing couplings")
    for name, fn in draw.items():
        files[name] = fn(out_dir / f"{name}.png").name
    return files, notes
