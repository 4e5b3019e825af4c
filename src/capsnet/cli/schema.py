"""The schema of the run-level settings people type most, and their range checks.

Registered with Hydra's ConfigStore as `schema` (first in configs/train.yaml's
defaults), so an unknown key (`routing.iter=3`) or a wrong type
(`trainer.batch_size=1.5`) fails when the config is composed. The trainer's
defaults live here and nowhere else. The modules' own arguments (model,
dataset, loss, ...) are checked by the modules when they are built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from capsnet.errors import CapsnetError


class Amp(str, Enum):
    auto = "auto"
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Allocator(str, Enum):
    keep = "keep"
    default = "default"


class OnNonFinite(str, Enum):
    error = "error"
    skip = "skip"


class KeepCheckpoints(str, Enum):
    all = "all"
    last = "last"
    none = "none"


class RoutingKernel(str, Enum):
    auto = "auto"
    cpp = "cpp"
    torch = "torch"


class MonitorMode(str, Enum):
    auto = "auto"
    max = "max"
    min = "min"


@dataclass
class TrainerSchema:
    epochs: int = 10
    batch_size: int = 128  # global: split evenly over the processes of a torchrun/Slurm job
    eval_batch_size: int = 256  # per process
    device: Device = Device.auto  # auto | cpu | cuda
    amp: Amp = Amp.auto  # auto: bf16 where native, else off (fp32) | off | bf16 | fp16 (CUDA; adds a grad scaler)
    num_workers: int = 0  # batches are built from in-memory tensors: workers rarely pay
    threads: Optional[int] = None  # torch.set_num_threads; null: PyTorch's default
    allocator: Allocator = Allocator.keep  # keep: glibc keeps freed memory for reuse (faster CPU steps)
    log_every: int = 50  # steps between reads of the running metrics (the only host syncs)
    ckpt_every_steps: Optional[int] = None  # also write last.pt every N steps (null: after every epoch only)
    resume: Optional[str] = "auto"  # auto: continue from <run dir>/checkpoints/last.pt | a path | null
    on_nonfinite: OnNonFinite = OnNonFinite.error  # error: stop at a NaN/inf loss | skip: skip and count
    progress: bool = True  # tqdm progress bar (rank 0)
    keep_checkpoints: KeepCheckpoints = KeepCheckpoints.all  # all: last.pt + best.pt | last | none (no resume)
    dist_timeout_s: float = 600.0  # collectives wait at most this long for a dead peer
    monitor: str = "test/accuracy"  # "<eval set>/<value>" that picks best.pt (e.g. val/accuracy with dataset.val_size)
    monitor_mode: MonitorMode = MonitorMode.auto  # auto: lower is better for *error and *loss, else higher
    stop_at: Optional[float] = None  # stop once the monitored value reaches this (e.g. affNIST's matched accuracy)
    steps: Optional[int] = None  # a step budget: train ceil(steps / batches per epoch) epochs, not `epochs`
    eval_recon_with_labels: bool = False  # evaluation decodes the true label's capsule (official), not the longest


@dataclass
class DynamicRoutingSchema:
    """configs/routing/dynamic.yaml's schema; another routing option may bring its own, or none."""

    _target_: str = "capsnet.routing.dynamic.DynamicRouting"
    iters: int = 3
    squash: str = "paper"
    detach_intermediate: bool = False
    leaky: bool = False
    kernel: RoutingKernel = RoutingKernel.auto  # auto: the fused C++ kernel on CPUs where it builds | cpp | torch


@dataclass
class AdamSchema:
    """configs/optim/adam.yaml's schema (each optim option brings its own, as routing options do)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    fused: bool = True
    decay_rate: float = 0.96
    decay_steps: int = 2000
    optimizer: Any = None
    scheduler: Any = None


@dataclass
class SGDMultiStepSchema:
    """configs/optim/sgd_multistep.yaml's schema."""

    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    fused: bool = True
    gamma: float = 0.1
    milestones: List[int] = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None


@dataclass
class TrainSchema:
    seed: int = 0
    out_dir: Optional[str] = None
    model_name: str = "capsnet"
    model: Any = None
    loss: Any = None
    metrics: Any = None
    dataset: Any = None
    routing: Any = None
    optim: Any = None
    trainer: TrainerSchema = field(default_factory=TrainerSchema)


ConfigStore.instance().store(name="schema", node=TrainSchema)
# configs/train.yaml: Hydra's run folder is out_dir when one is given, so the run's .hydra/ record sits beside
# its results (where capsnet.tools.report looks for it), else outputs/runs/<date>/<time>.
OmegaConf.register_new_resolver("capsnet.or_else", lambda value, default: default if value in (None, "", "None")
                                else value, replace=True)
ConfigStore.instance().store(group="routing", name="dynamic_schema", node=DynamicRoutingSchema)
ConfigStore.instance().store(group="optim", name="adam_schema", node=AdamSchema)
ConfigStore.instance().store(group="optim", name="sgd_multistep_schema", node=SGDMultiStepSchema)

# (path, test, what is allowed): checked before any work starts.
RANGES = [
    ("seed", lambda v: 0 <= v < 10 ** 12, "a whole number in [0, 10^12) (it seeds generators as seed * 100003 + epoch)"),
    ("routing.iters", lambda v: 1 <= v <= 100, "a whole number from 1 to 100 (each iteration rereads every vote)"),
    ("trainer.epochs", lambda v: v >= 1, "a whole number >= 1"),
    ("trainer.batch_size", lambda v: v >= 1, "a whole number >= 1"),
    ("trainer.eval_batch_size", lambda v: v >= 1, "a whole number >= 1"),
    ("trainer.num_workers", lambda v: v >= 0, "a whole number >= 0"),
    ("trainer.threads", lambda v: v is None or v >= 1, "null or a whole number >= 1"),
    ("trainer.log_every", lambda v: v >= 1, "a whole number >= 1"),
    ("trainer.ckpt_every_steps", lambda v: v is None or v >= 1, "null or a whole number >= 1"),
    ("trainer.steps", lambda v: v is None or v >= 1, "null or a whole number >= 1"),
    ("trainer.dist_timeout_s", lambda v: v > 0, "a number of seconds > 0"),
    ("optim.lr", lambda v: v > 0, "a number > 0"),
    ("optim.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("optim.decay_rate", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("optim.decay_steps", lambda v: v >= 1, "a whole number >= 1"),
    ("optim.momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optim.gamma", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("dataset.train_subset", lambda v: v is None or v >= 1, "null or a whole number >= 1"),
    ("dataset.test_subset", lambda v: v is None or v >= 1, "null or a whole number >= 1"),
    ("dataset.val_size", lambda v: v >= 0, "a whole number >= 0"),
    ("dataset.shift", lambda v: v >= 0, "a whole number of pixels >= 0"),
    ("loss.recon_weight", lambda v: v >= 0, "a number >= 0"),
]


def _unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys that no schema declares (Hydra's `+key=value` adds them past the struct check)."""
    from dataclasses import fields

    top = {f.name for f in fields(TrainSchema)} | {"hydra"}
    trainer = {f.name for f in fields(TrainerSchema)}
    return [k for k in cfg if k not in top] + [f"trainer.{k}" for k in cfg.get("trainer") or {} if k not in trainer]


def validate(cfg: DictConfig) -> None:
    """Raise a one-line CapsnetError for the first unknown key or impossible run-level value."""
    try:
        for key in cfg:
            if key != "hydra" and OmegaConf.is_config(cfg[key]):
                OmegaConf.to_container(cfg[key], resolve=True)
    except InterpolationResolutionError as e:
        key = re.search(r"full_key: (\S+)", str(e))
        first = str(e).strip().splitlines()[0]
        raise CapsnetError(f"cannot resolve {key.group(1) if key else 'a value'}: {first}; set what it refers to "
                           "(e.g. the environment variable) or give the value directly") from None
    unknown = _unknown_keys(cfg)
    if unknown:
        raise CapsnetError(f"unknown config key '{unknown[0]}': check the spelling; "
                           "`python train.py --cfg job` prints every key")
    for path, ok, allowed in RANGES:
        if OmegaConf.select(cfg, path, default="<absent>") == "<absent>":
            continue
        value = OmegaConf.select(cfg, path)
        if isinstance(value, bool) or not ok(value):
            raise CapsnetError(f"{path}={value} is impossible: it must be {allowed}")
    if cfg.trainer.device == Device.cuda:
        from capsnet.train.runtime import resolve_device  # refuses cuda when no GPU is visible

        resolve_device("cuda")
