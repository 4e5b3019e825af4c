"""Evaluate trained capsule networks: `python eval.py ckpt=outputs/runs/<date>/<time>/checkpoints/best.pt`.

One checkpoint, or an ensemble (`ckpt=[a.pt,b.pt]`, or a sweep folder: every best.pt below it). Overrides of
the stored run config (`dataset...`, `trainer.*`) are taken from the command line before Hydra composes
configs/eval.yaml. A thin Hydra entry point; the work is in `capsnet.tools.evaluate`. See docs/evaluation.md.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from capsnet.cli.errors import debugging, fail
from capsnet.errors import CapsnetError
from capsnet.tools.evaluate import split_overrides

ROOT = Path(__file__).resolve().parent
RUN_OVERRIDES: list[str] = []  # dataset.../trainer.* overrides of the checkpoint's own config


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from capsnet.tools.evaluate import evaluate_checkpoints, format_table
    from capsnet.train import distributed as dist_utils

    try:
        ckpt = OmegaConf.to_container(cfg, resolve=True).get("ckpt") if not OmegaConf.is_missing(cfg, "ckpt") else None
        out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
        figures = OmegaConf.to_container(cfg.figures, resolve=True)
        result = evaluate_checkpoints(ckpt, out_dir, RUN_OVERRIDES, figures, cfg.split)
        if result.get("figures") is not None:  # rank 0
            print(format_table(result))
            for note in result.get("notes", []):
                print(f"note: {note}")
            print(f"wrote {out_dir / 'eval.json'} and {len(result['figures'])} figures", flush=True)
        dist_utils.barrier()  # every rank done before any tears the process group down
    except CapsnetError as e:
        if debugging():
            raise
        fail(str(e))
    finally:
        dist_utils.cleanup()


def preflight(argv: list[str]) -> None:
    """Refuse a bad eval.yaml override in one line before Hydra starts."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from capsnet.cli.preflight import HYDRA_ONLY_FLAGS, explain

    if debugging() or any(a.split("=")[0] in HYDRA_ONLY_FLAGS for a in argv):
        return
    overrides = [a for a in argv if not a.startswith("-")]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        try:
            compose("eval", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as e:
            fail(explain(e, None).replace("python train.py --cfg job", "python eval.py --cfg job"))


if __name__ == "__main__":
    RUN_OVERRIDES[:], rest = split_overrides(sys.argv[1:])
    preflight(rest)
    sys.argv = sys.argv[:1] + rest
    main()
