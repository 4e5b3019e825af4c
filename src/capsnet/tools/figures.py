"""The paper's figures and the evaluation's plots, as PNG files.

- Figure 4 (Sabour et al. 2017, section 5.1): one class capsule's dimensions
  each moved by delta in {-0.25, -0.20, ..., 0.25} (others kept, other
  capsules masked, no re-squash), decoded: `perturbation_grid`, `plot_perturbation`.
- Figure 5 (section 6, MultiMNIST): the input above, the two reconstructions
  overlaid in green and red below, L:(l1, l2) the labels, R:(r1, r2) the
  classes reconstructed: `plot_multimnist`.
- Reconstructions beside their inputs, a confusion matrix, the worst-classified
  images with their top-2 scores, and routing diagnostics per iteration.

Tensor work (`perturbation_grid`, `confusion_counts`, `worst_indices`) is
separate from drawing, so tests check the numbers without a picture.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- numbers ---------------------------------------------------------------------------------------
def perturbation_deltas(max_delta: float = 0.25, step: float = 0.05) -> torch.Tensor:
    """{-max_delta, ..., 0, ..., max_delta} in steps of `step` (the paper: 11 values); the centre is exactly 0."""
    n = int(round(max_delta / step))
    return torch.arange(-n, n + 1, dtype=torch.float32) * step


@torch.no_grad()
def perturbation_grid(decoder, poses: torch.Tensor, klass: int, deltas: torch.Tensor) -> torch.Tensor:
    """Figure 4 for one image: poses [K, D] -> decoded images [D, len(deltas), *image shape].

    Row d: dimension d of capsule `klass` moved by each delta; the capsule is
    not squashed again, and the decoder masks every other capsule (it is fed
    `klass` as its selection, as at test time).
    """
    k, d = poses.shape
    n = len(deltas)
    moved = poses.unsqueeze(0).unsqueeze(0).repeat(d, n, 1, 1)  # [D, n, K, D]
    rows = torch.arange(d, device=poses.device)
    moved[rows, :, klass, rows] += deltas.to(poses.device, poses.dtype).unsqueeze(0)
    select = torch.full((d * n,), klass, dtype=torch.long, device=poses.device)
    images = decoder(moved.reshape(d * n, k, d), select)
    return images.reshape(d, n, *images.shape[1:])


def confusion_counts(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[K, K] counts: row = true class, column = predicted (argmax) class; single-label data."""
    k = scores.shape[-1]
    pred = scores.argmax(-1)
    return torch.bincount(labels.long() * k + pred, minlength=k * k).reshape(k, k)


def wrong_margin(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image: highest score of a class not present minus lowest score of a class present.

    Positive means misclassified (single label: the argmax is not the label;
    MultiMNIST: a wrong digit outranks a true one); larger is more confidently wrong.
    """
    present = torch.nn.functional.one_hot(labels.long(), scores.shape[-1]).bool() if labels.dim() == 1 \
        else labels > 0.5
    inf = torch.tensor(float("inf"), dtype=scores.dtype)
    top_wrong = torch.where(present, -inf, scores).max(-1).values
    low_true = torch.where(present, scores, inf).min(-1).values
    return top_wrong - low_true


def worst_indices(scores: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """The n images with the largest `wrong_margin` (misclassified ones first)."""
    margin = wrong_margin(scores.float(), labels)
    return margin.argsort(descending=True, stable=True)[:n]


def for_display(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H, W] (grey) or [N, H, W, 3] in [0, 1]; images outside [0, 1]
    (standardised CIFAR-10, smallNORB) are rescaled per image; 2-channel stereo shows its first camera."""
    x = images.detach().float().cpu()
    if x.shape[1] not in (1, 3):
        x = x[:, :1]
    lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    if lo.min() < 0 or hi.max() > 1:
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)


def tile(images: torch.Tensor, rows: int, cols: int, pad: int = 1) -> torch.Tensor:
    """[rows * cols, H, W(, 3)] display images -> one [rows*(H+pad), cols*(W+pad)(, 3)] mosaic."""
    h, w = images.shape[1:3]
    canvas = torch.ones(rows * (h + pad), cols * (w + pad), *images.shape[3:]) * 0.5
    for n, img in enumerate(images):
        r, c = divmod(n, cols)
        canvas[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = img
    return canvas


def overlay_two(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two grey images [N, H, W] -> RGB [N, H, W, 3]: the first in green, the second in red (Figure 5)."""
    zero = torch.zeros_like(a)
    return torch.stack([b, a, zero], -1).clamp(0, 1)


# --- drawing ---------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _show(ax, img, title=None, fontsize=7):
    ax.imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def plot_perturbation(grids: list, titles: list, deltas: torch.Tensor, path: Path) -> Path:
    """Figure 4: one [D, n, C, H, W] grid per image, rows = capsule dimensions, columns = deltas."""
    plt = _pyplot()
    cols = min(len(grids), 5)
    rows = -(-len(grids) // cols)
    d, n = grids[0].shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * d / n + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, grid, title in zip(axes.flat, grids, titles):
        _show(ax, tile(for_display(grid.flatten(0, 1)), d, n), title)
        ax.axis("on")
        ax.set_xticks([0.5 * (grid.shape[-1] + 1) * (2 * i + 1) for i in range(n)][::5])
        ax.set_xticklabels([f"{float(x):+.2f}" for x in deltas][::5], fontsize=6)
    fig.suptitle("Figure 4: each capsule dimension (rows) moved by "
                 f"{float(deltas[0]):+.2f} .. {float(deltas[-1]):+.2f} (columns), decoded", fontsize=9)
    return _save(fig, path)


def plot_reconstructions(images, recons, labels: list, preds: list, path: Path) -> Path:
    """Inputs (top row of each pair) beside their reconstructions, with label and prediction."""
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.9), squeeze=False)
    for i, (img, rec) in enumerate(zip(for_display(images), for_display(recons))):
        _show(axes[0, i], img, f"label {labels[i]}\npred {preds[i]}")
        _show(axes[1, i], rec)
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("reconstruction", fontsize=8)
    return _save(fig, path)


def plot_multimnist(images, recon_a, recon_b, labels: list, recon_classes: list, path: Path) -> Path:
    """Figure 5 as a PNG file."""
    return _save(multimnist_figure(images, recon_a, recon_b, labels, recon_classes), path)


def multimnist_figure(images, recon_a, recon_b, labels: list, recon_classes: list):
    """Figure 5: the input above, the two reconstructions (green: first, red: second) below."""
    plt = _pyplot()
    n = len(images)
    over = overlay_two(for_display(recon_a), for_display(recon_b))
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.0), squeeze=False)
    for i, img in enumerate(for_display(images)):
        (l1, l2), (r1, r2) = labels[i], recon_classes[i]
        _show(axes[0, i], img, f"L:({l1},{l2})")
        _show(axes[1, i], over[i], f"R:({r1},{r2})")
    fig.suptitle("Figure 5: input (top); reconstructions of R's first (green) and second (red) class", fontsize=9)
    return fig


def plot_confusion(counts: torch.Tensor, classes: list, path: Path) -> Path:
    plt = _pyplot()
    k = counts.shape[0]
    fig, ax = plt.subplots(figsize=(0.45 * k + 2.5, 0.45 * k + 2))
    ax.imshow(counts.numpy(), cmap="Blues")
    if k <= 20:
        top = counts.max().item()
        for (t, p), v in zip(torch.cartesian_prod(torch.arange(k), torch.arange(k)).tolist(), counts.flatten()):
            ax.text(p, t, str(int(v)), ha="center", va="center", fontsize=7,
                    color="white" if v > top / 2 else "black")
    ax.set_xticks(range(k), classes, rotation=90 if k > 10 else 0, fontsize=7)
    ax.set_yticks(range(k), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _save(fig, path)


def plot_worst(images, titles: list, path: Path, cols: int = 8) -> Path:
    plt = _pyplot()
    n = len(images)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, for_display(images), titles):
        _show(ax, img, title, fontsize=6)
    return _save(fig, path)


def plot_routing(series: dict, path: Path) -> Path:
    """series: {label: {"entropy": [...], "max_coupling": [...], "agreement": [...] or None,
    "uniform_entropy": log J}}, one line per member."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for label, d in series.items():
        for ax, name in zip(axes, ("entropy", "max_coupling", "agreement")):
            if d.get(name):
                ax.plot(range(1, len(d[name]) + 1), d[name], marker="o", label=label)
        if d.get("uniform_entropy") is not None:
            axes[0].axhline(d["uniform_entropy"], color="grey", ls=":", lw=1)
    titles = ("coupling entropy (nats; dotted: log J)", "mean max coupling", "mean agreement")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("routing iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
    if len(series) > 1:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
