"""Shared test helpers: IDX files in torchvision's layout, config composition, event-file reading."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from hydra import compose, initialize_config_dir

import capsnet.cli.schema  # noqa: F401  (registers the schema)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
os.environ.setdefault("CAPSNET_EXPERIMENTS", str(ROOT / "conf_experiments"))
SHARED_DATA = Path(os.environ.get("CAPSNET_SHARED_DATA", ROOT.parent / "shared" / "data"))

# A CapsNet small enough to train a few steps in a second on a CPU.
TINY_CAPSNET = ["model.features.channels=[8]", "model.primary.capsules=2", "model.primary.capsule_dim=4",
                "model.class_caps.out_dim=4", "model.decoder.hidden=[16]"]


# Settings that make a run quiet and offline; tests add their own sizes.
# fp32 (trainer.amp=off): the tests compare numbers; the auto default is tested by itself (test_engine.py).
FAST = ["trainer.progress=false", "dataset.download=false", "trainer.batch_size=32", "trainer.amp=off", *TINY_CAPSNET]


def weights(out_dir: Path) -> dict:
    """The model state of a run's last checkpoint."""
    from capsnet.train.checkpoint import load_checkpoint

    return load_checkpoint(out_dir / "checkpoints" / "last.pt")["model"]


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    """Equal state dicts (bit for bit unless a tolerance is given), naming the first differing tensor."""
    tol = tol or {"rtol": 0, "atol": 0}
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"{k}: {m}")


def write_idx_images(path: Path, images: torch.Tensor) -> None:
    """uint8 [N, H, W] -> an IDX3 file (magic 0x00000803, big-endian sizes)."""
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x803, n, h, w) + images.to(torch.uint8).numpy().tobytes())


def write_idx_labels(path: Path, labels: torch.Tensor) -> None:
    path.write_bytes(struct.pack(">II", 0x801, len(labels)) + labels.to(torch.uint8).numpy().tobytes())


def make_mnist(root: Path, n_train: int = 256, n_test: int = 64, folder: str = "MNIST", seed: int = 0) -> Path:
    """Synthetic, learnable MNIST-format data: class k is a bright bar at row 2k+4, plus noise."""
    g = torch.Generator().manual_seed(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for k in range(10):
            images[labels == k, 2 * k + 4: 2 * k + 6, 4:24] = 255
        write_idx_images(raw / f"{split}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


def compose_cfg(overrides=(), config_name: str = "train"):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def run_train(args, env_extra=None, timeout=600, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run `python train.py ARGS` as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    args = list(args)
    if "-m" not in args and not any(a.startswith(("hydra.run.dir=", "out_dir=")) for a in args):
        # keep Hydra's run folder (out_dir when given) out of the repository
        args.insert(0, f"hydra.run.dir={tempfile.mkdtemp(prefix='capsnet-test-')}")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


class CliResult(NamedTuple):
    returncode: int
    stderr: str


def train_in_process(args, capsys) -> CliResult:
    """What `python train.py ARGS` does, without a new interpreter: the preflight check of the overrides,
    then the guarded run (errors: one stderr line, exit status 2). Needs `out_dir=` (no Hydra job runs)."""
    from capsnet.cli.errors import guarded, preflight
    from capsnet.train.run import train

    capsys.readouterr()
    code = 0
    try:
        preflight(list(args), CONFIGS)
        guarded(train)(compose_cfg([a for a in args if not a.startswith("hydra.")]))
    except SystemExit as e:
        code = e.code
    return CliResult(code, capsys.readouterr().err)


# Runs train.py and sends itself `signal` right after its `step`-th optimiser step: a fault that lands
# at the same point of the run on a fast or a slow machine (no sleeps, no races with the run's end).
_SIGNAL_AT_STEP = """
import os, runpy, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
step, sig, train_py = int(sys.argv[1]), getattr(signal, sys.argv[2].removesuffix("@group")), sys.argv[3]
to_group = sys.argv[2].endswith("@group")  # as a cluster or Ctrl-C does: every process of the group
done = 0
def hook(optimizer, args, kwargs):
    global done
    done += 1
    if done == step:
        os.killpg(os.getpgrp(), sig) if to_group else os.kill(os.getpid(), sig)
register_optimizer_step_post_hook(hook)
sys.argv = sys.argv[3:]
runpy.run_path(train_py, run_name="__main__")
"""


def run_train_signalled(args, step: int, signame: str, timeout=600, to_group: bool = False):
    """`python train.py ARGS`, which receives `signame` (e.g. SIGKILL, SIGTERM) after its step-th step; with
    `to_group` the whole process group gets it (the run is started in a session of its own)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-c", _SIGNAL_AT_STEP, str(step), signame + "@group" * to_group,
                           str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=to_group)


def event_tags(tb_dir: Path) -> dict:
    """{'scalars': [...], 'images': [...], 'histograms': [...]} found in a TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    return {"scalars": tags["scalars"], "images": tags["images"], "histograms": tags["histograms"]}


class MeanRouting(torch.nn.Module):
    """A stand-in for a new routing algorithm (uniform couplings, a parameter of its own)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    def forward(self, votes, activations=None, bias=None):
        from capsnet.types import RoutingOutput

        c = torch.full(votes.shape[:3], 1.0 / votes.shape[2])
        s = self.scale * (c.unsqueeze(-1) * votes).sum(1)
        v = s / (1 + s.norm(dim=-1, keepdim=True))
        return RoutingOutput(v, v.norm(dim=-1), c)


class StripesDataset:
    """A stand-in for a new dataset (see tests/test_extension.py): 3-channel 10x10 stripes, 4 classes."""

    def __new__(cls, *args, **kwargs):
        from capsnet.data.source import ImageDataset, RawSplit

        class _Stripes(ImageDataset):
            classes = ("row0", "row1", "row2", "row3")

            def read(self, split):
                n = 32 if split == "train" else 12
                labels = torch.arange(n) % 4
                images = torch.zeros(n, 3, 10, 10, dtype=torch.uint8)
                images[torch.arange(n), :, 2 * labels + 1] = 255
                return RawSplit(images, labels, {})

        return _Stripes(*args, **kwargs)


class MeanTopScore:
    """A stand-in for a new metric: the mean of the highest score."""

    names = ("top_score",)

    def sums(self, out, batch):
        return {"top_score/sum": out.scores.max(-1).values.double().sum()}

    def compute(self, totals):
        return {"top_score": totals["top_score/sum"] / totals["count"]}
