"""Train a capsule network: `python train.py model=capsnet dataset=mnist routing.iters=3`.

A thin Hydra entry point; the work is in `capsnet.train.run`. See README.md.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import capsnet.cli.schema  # noqa: F401  (registers the config schema)
from capsnet.cli.errors import guarded, preflight

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"
# configs/train.yaml finds the experiment presets through this, from any working directory
os.environ.setdefault("CAPSNET_EXPERIMENTS", str(ROOT / "conf_experiments"))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@guarded
def main(cfg: DictConfig) -> float:
    from capsnet.train.run import train

    return train(cfg)


if __name__ == "__main__":
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        from capsnet.cli.help import help_text

        print(help_text(CONFIGS, ROOT / "conf_experiments"))
        sys.exit(0)
    preflight(sys.argv[1:], CONFIGS)
    main()
