"""`python train.py --help`: the config groups and their options, the presets, and the keys used most.

Hydra's own help lists the schema nodes (`dynamic_schema`, ...) as if they were
options and does not see the presets in conf_experiments/; this one is read
from the folders, so it cannot drift from them (Hydra's is still there:
`--hydra-help`).
"""

from __future__ import annotations

from pathlib import Path

GROUPS = ("model", "dataset", "routing", "loss", "metrics", "optim", "protocol")
PRESET_GROUPS = ("experiment", "quick", "variant")
COMMON = ("routing.iters", "seed", "trainer.epochs", "trainer.batch_size", "trainer.amp", "trainer.device",
          "trainer.monitor", "dataset.root", "dataset.train_subset", "dataset.val_size", "out_dir")


def options(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def help_text(configs: Path, experiments: Path) -> str:
    lines = ["usage: python train.py [group=option ...] [key=value ...]      (-m: a sweep, e.g. routing.iters=1,2,3)",
             "", "Config groups (group=option; defaults: model=capsnet dataset=mnist routing=dynamic optim=adam):"]
    lines += [f"  {g}: {', '.join(options(configs / g))}" for g in GROUPS if (configs / g).is_dir()]
    lines += ["", "Presets (conf_experiments/):"]
    lines += [f"  {g}: {', '.join(options(experiments / g))}" for g in PRESET_GROUPS if (experiments / g).is_dir()]
    launchers = options(configs / "hydra" / "launcher") + ["joblib"]  # joblib: the hydra-joblib-launcher plugin's
    lines += ["", "Launchers (with -m): hydra/launcher=" + ", ".join(launchers),
              "", "Keys used most: " + ", ".join(COMMON),
              "Every key and its value: python train.py [overrides] --cfg job      Hydra's own help: --hydra-help",
              "Examples:",
              "  python train.py model=capsnet dataset=mnist routing.iters=3",
              "  python train.py experiment=table1 quick=on",
              "  python train.py -m routing.iters=1,2,3,4,5 seed=0,1,2"]
    return "\n".join(lines)
