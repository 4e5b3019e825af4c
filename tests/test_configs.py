"""Every config composes and instantiates; a wrong key fails; `_target_`s stay inside trusted packages."""

from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate

from helpers import CONFIGS, ROOT, TINY_CAPSNET, compose_cfg

EXPERIMENTS = ROOT / "conf_experiments"
# Configs can instantiate any importable callable, so they must come from trusted sources; ours
# only ever name these packages (and Hydra's own launchers).
TRUSTED_TARGET_PREFIXES = ("capsnet.", "torch.", "torchvision.", "hydra_plugins.")


def group_options(root: Path, group: str):
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def instantiate_all(cfg, tiny: bool, in_shape=(1, 28, 28)):
    from capsnet.train.build import build_data, build_loss, build_metrics, build_model, build_optimizer

    data = build_data(cfg)
    model = build_model(cfg, in_shape, 10)
    build_loss(cfg)
    assert build_metrics(cfg)
    build_optimizer(cfg, model)
    instantiate(cfg.routing)
    return data, model


@pytest.mark.parametrize("group", ["model", "dataset", "routing", "optim", "loss", "metrics"])
def test_every_option_of_every_group_composes_and_instantiates(group):
    for option in group_options(CONFIGS, group):
        extra = TINY_CAPSNET if (group != "model" or option == "capsnet") else []
        cfg = compose_cfg([f"{group}={option}", *extra])
        instantiate_all(cfg, tiny=True)


@pytest.mark.parametrize("name", group_options(EXPERIMENTS, "experiment"))
def test_every_experiment_preset_composes_and_instantiates(name):
    cfg = compose_cfg([f"experiment={name}"])
    instantiate_all(cfg, tiny=False)


@pytest.mark.parametrize("name", group_options(EXPERIMENTS, "experiment"))
def test_the_quick_mixin_shrinks_every_preset(name):
    full, quick = compose_cfg([f"experiment={name}"]), compose_cfg([f"experiment={name}", "quick=on"])
    assert quick.trainer.epochs == 1 and quick.dataset.train_subset == 1500
    assert full.model == quick.model and full.routing == quick.routing  # the same runs, only smaller


@pytest.mark.parametrize("name", group_options(EXPERIMENTS, "variant"))
def test_every_variant_composes_and_instantiates(name):
    cfg = compose_cfg(["experiment=table1", f"variant={name}"])
    _, model = instantiate_all(cfg, tiny=False)
    if name.endswith("norecon"):
        assert model.decoder is None
    assert cfg.model_name == ("baseline_cnn" if name == "baseline_cnn" else "capsnet")


def test_table1_sweeps_the_papers_rows_over_three_seeds():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=table1"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert len(params.variant.split(",")) == 5 and params.seed == "0,1,2"


def test_a_wrong_key_in_a_preset_fails(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\nrouting:\n  iter: 3\n")
    with pytest.raises(Exception, match="iter"):
        compose_cfg([f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo"])


def _targets(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                yield v
            else:
                yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


def test_every_target_names_a_trusted_package():
    files = list(CONFIGS.rglob("*.yaml")) + list(EXPERIMENTS.rglob("*.yaml"))
    targets = [(f, t) for f in files for t in _targets(yaml.safe_load(f.read_text()) or {})]
    assert len(targets) > 10
    for f, t in targets:
        assert t.startswith(TRUSTED_TARGET_PREFIXES), f"{f}: _target_ {t}"
    nodes = [yaml.safe_load(f.read_text()) for f in (CONFIGS / "dataset").glob("*.yaml")]
    nodes = [n["dataset"] if isinstance(n.get("dataset"), dict) else n for n in nodes]  # @package _global_ files
    dataset_classes = [n["dataset"] for n in nodes if "dataset" in n]
    assert dataset_classes and all(c.startswith("torchvision.datasets.") for c in dataset_classes)


def test_help_lists_every_option_and_preset_and_no_schema_node():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "_schema" not in proc.stdout
    for group in ("model", "dataset", "routing", "loss", "metrics", "optim"):
        assert all(o in proc.stdout for o in group_options(CONFIGS, group)), group
    assert all(o in proc.stdout for o in group_options(EXPERIMENTS, "experiment"))
