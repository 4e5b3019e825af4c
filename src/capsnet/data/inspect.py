"""Look at a dataset before training on it: `python -m capsnet.data dataset=<name> split=test n=64 out=DIR`.

Prints every split's size, the image shape and dtype as stored and as the
model sees it, and the class counts of the chosen split; writes into DIR
`<dataset>_<split>_raw.png` (a labelled grid of the first n images as
stored), `<dataset>_<split>_model_input.png` (the same images after the
split's transforms; training transforms as drawn for epoch 0) and
`<dataset>_<split>_samples.npz` (`images`: uint8 [n, C, H, W] exactly as
decoded from the files, `labels`; datasets with per-image reconstruction
targets add them, e.g. MultiMNIST's `parts` [n, 2, 1, 36, 36] with `labels`
[n, 2] in the same order).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from capsnet.errors import CapsnetError

USAGE = ("usage: python -m capsnet.data dataset=<name> [dataset.<key>=<value> ...] [split=test] [n=64] "
         "[out=outputs/data]")


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """(the command's own options, the config overrides) from `key=value` arguments."""
    opts, overrides = {"split": "test", "n": "64", "out": "outputs/data"}, []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.strip() + "\n\n" + USAGE)
            raise SystemExit(0)
        key, sep, value = arg.partition("=")
        if not sep:
            raise CapsnetError(f"'{arg}' is not key=value: {USAGE}")
        if key in opts:
            opts[key] = value
        else:
            overrides.append(arg)
    if not opts["n"].isdigit() or int(opts["n"]) < 1:
        raise CapsnetError(f"n={opts['n']} must be a whole number >= 1 (images to show)")
    return opts, overrides


def split_readers(data) -> dict:
    """{split name: () -> Split}: each read only when asked, so a test split can be inspected without the
    training files (affNIST is mostly an evaluation set)."""
    readers = {"train": data.train}
    names = ["val", "test"] if data.val_size else ["test"]
    readers.update({n: (lambda n=n: data.own_evals()[n]) for n in names})
    readers.update({n: (lambda d=d: d.own_evals()["test"]) for n, d in data.extra_evals.items()})
    return readers


def select_split(data, name: str):
    """(the chosen split, {name: size or "not readable"} of every split)."""
    readers = split_readers(data)
    if name not in readers:
        raise CapsnetError(f"split={name} is not a split of {data.name}: choose one of {', '.join(readers)}")
    chosen, sizes = readers[name](), {}
    for other, read in readers.items():
        try:
            sizes[other] = f"{len(read()):,}"
        except CapsnetError:
            sizes[other] = "not readable"
    return chosen, sizes


def class_counts(labels: torch.Tensor, k: int) -> list[int]:
    if labels.dim() == 2:  # multi-hot: how often each class is present
        return labels.sum(0).long().tolist()
    return torch.bincount(labels.long(), minlength=k).tolist()


def label_text(label: torch.Tensor) -> str:
    if label.dim() == 0:
        return str(int(label))
    return ",".join(str(i) for i in label.nonzero().flatten().tolist())


def grid(path: Path, images: torch.Tensor, labels: list[str], title: str) -> None:
    """A labelled grid: grey for 1 channel, RGB for 3, the first channel otherwise (e.g. smallNORB's left camera)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = images.float()
    x = (x - x.amin((1, 2, 3), keepdim=True)) / (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True)
                                                 ).clamp_min(1e-8)
    cols = min(8, len(x))
    rows = -(-len(x) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:len(x)]):
        img = x[i].permute(1, 2, 0).numpy() if x.shape[1] == 3 else x[i, 0].numpy()
        ax.imshow(img, cmap=None if x.shape[1] == 3 else "gray", vmin=0, vmax=1)
        ax.set_title(labels[i], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def inspect(argv: list[str]) -> str:
    from capsnet.data.loader import make_batch
    from capsnet.data.transforms import epoch_generator
    from capsnet.train.build import build_data, compose_config

    opts, overrides = parse(argv)
    cfg = compose_config(overrides)
    data = build_data(cfg)
    split, sizes = select_split(data, opts["split"])
    n = min(int(opts["n"]), len(split))
    idx = torch.arange(n)
    raw, labels, targets = split.get(idx, 0)
    params = split.transforms.draw(len(split), epoch_generator(cfg.seed, 0)) if opts["split"] == "train" else None
    model_input = make_batch(split, idx, 0, params).images
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{data.name}_{opts['split']}"
    texts = [label_text(lab) for lab in labels]
    grid(out / f"{stem}_raw.png", raw, texts, f"{data.name} {opts['split']}: as stored {tuple(raw.shape[1:])}")
    grid(out / f"{stem}_model_input.png", model_input, texts,
         f"{data.name} {opts['split']}: model input {tuple(model_input.shape[1:])}")
    arrays = {"images": raw.numpy(), "labels": labels.numpy()}
    if "reconstruction" in targets:
        arrays["parts"] = targets["reconstruction"].numpy()
        if "recon_classes" in targets:
            arrays["labels"] = targets["recon_classes"].numpy()
    np.savez_compressed(out / f"{stem}_samples.npz", **arrays)
    sizes = ", ".join(f"{name} {size}" for name, size in sizes.items())
    counts = class_counts(split.labels, data.num_classes)
    return (f"{data.name}: {sizes} images; stored {tuple(raw.shape[1:])} {raw.dtype}, model input "
            f"{tuple(model_input.shape[1:])} {model_input.dtype}; {data.num_classes} classes\n"
            f"class counts ({opts['split']}): {counts}\n"
            f"wrote {out / (stem + '_raw.png')}, {out / (stem + '_model_input.png')}, "
            f"{out / (stem + '_samples.npz')}")


def main(argv=None) -> None:
    from capsnet.cli.errors import fail

    try:
        print(inspect(sys.argv[1:] if argv is None else argv))
    except CapsnetError as e:
        fail(str(e))
