"""Building a run's parts from its config: pure functions shared by training, evaluation and the benchmark.

Values only the data knows (input shape, number of classes) are passed where
`instantiate` is called, never written back into the config.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from capsnet.errors import CapsnetError
from capsnet.train.checkpoint import load_checkpoint, load_model_state

ROOT = Path(__file__).resolve().parents[3]  # the repository: configs/ and conf_experiments/ beside src/
CONFIGS, EXPERIMENTS = ROOT / "configs", ROOT / "conf_experiments"


def compose_config(overrides=(), config_name: str = "train") -> DictConfig:
    """The config `train.py` would run with these overrides, composed in-process (no Hydra run)."""
    import os

    from hydra import compose, initialize_config_dir

    import capsnet.cli.schema  # noqa: F401  (registers the schema)

    os.environ.setdefault("CAPSNET_EXPERIMENTS", str(EXPERIMENTS))
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def build(node: DictConfig, what: str, **runtime):
    """`instantiate`, with a module's refusal of its arguments turned into one line naming the config node."""
    try:
        return instantiate(node, **runtime)
    except InstantiationException as e:
        cause = e.__cause__ or e
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, CapsnetError):
            raise cause from None
        where = re.search(r"full_key: (\S+)", str(e))
        key = where.group(1) if where else what
        key = key if key.split(".")[0] == what else f"{what}.{key}"
        detail = " ".join(str(cause).split())
        raise CapsnetError(f"cannot build {key}: {type(cause).__name__}: {detail}; check the {what} "
                           "settings (`python train.py --cfg job` prints them)") from None


def build_data(cfg: DictConfig):
    """The data source (`capsnet.data.source.ImageDataset`), its validation hold-out chosen by the run's seed."""
    return build(cfg.dataset, "dataset", seed=cfg.seed)


def build_model(cfg: DictConfig, in_shape, num_classes: int) -> torch.nn.Module:
    return build(cfg.model, "model", in_shape=tuple(in_shape), num_classes=int(num_classes))


def build_loss(cfg: DictConfig) -> torch.nn.Module:
    return build(cfg.loss, "loss")


def build_metrics(cfg: DictConfig) -> dict:
    """{name: metric object} from the `metrics` group, in config order."""
    return {name: build(node, "metrics") for name, node in (cfg.metrics or {}).items()}


def metric_names(metrics: dict) -> list[str]:
    """The values the metrics produce (each metric lists them in `names`)."""
    return [n for m in metrics.values() for n in getattr(m, "names", ())]


def build_optimizer(cfg: DictConfig, model: torch.nn.Module):
    """(optimizer, per-step scheduler) from the `optim` group."""
    optimizer = build(cfg.optim.optimizer, "optim")(model.parameters())
    return optimizer, build(cfg.optim.scheduler, "optim")(optimizer)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model with the checkpoint's weights, in eval mode, and the run's config), built from the config
    stored in the checkpoint: no dataset is read."""
    ckpt = load_checkpoint(path)
    cfg = OmegaConf.create(ckpt["config"])
    shape = ckpt.get("data", {})
    if "in_shape" not in shape:
        from capsnet.errors import CheckpointError

        raise CheckpointError(f"{path} does not record its input shape (written by an older capsnet): "
                              "retrain, or build the model with build_model(cfg, in_shape, num_classes)")
    model = build_model(cfg, shape["in_shape"], shape["num_classes"])
    load_model_state(model, ckpt["model"], str(path))
    return model.to(device).eval(), cfg
