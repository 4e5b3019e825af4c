"""TensorBoard: scalars, reconstructions beside their inputs, routing histograms.

Only rank 0 writes; on other ranks every method is a no-op. Tags:
`train/*` and `test/*` scalars, `lr`, `throughput`, `reconstructions`,
`routing/<name>_iter{r}` for each routing iteration r (1-based) of every
per-iteration diagnostic a model returns in `ModelOutput.extras` (dynamic
routing: `couplings`, when its `record` is on) and
`capsules/lengths`.
"""

from __future__ import annotations

import functools
import math
import sys

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter


def never_fatal(method):
    """Logging must never end a run: a failure is said once per kind on stderr, and training goes on."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001  (anything TensorBoard, matplotlib or a model's diagnostics raise)
            if method.__name__ not in self.failed:
                self.failed.add(method.__name__)
                print(f"capsnet: warning: TensorBoard could not log {method.__name__} ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:160]}); training goes on without it", file=sys.stderr, flush=True)

    return wrapper


class TensorBoard:
    def __init__(self, log_dir: str | None, purge_step: int | None = None):
        self.writer = SummaryWriter(log_dir, purge_step=purge_step) if log_dir else None
        self.failed: set = set()

    @never_fatal
    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if math.isfinite(float(v)):  # a NaN would only hide the curve
                self.writer.add_scalar(prefix + k, float(v), step)

    @never_fatal
    @torch.no_grad()
    def inspect(self, model: nn.Module, images: torch.Tensor, step: int, autocast,
                labels: torch.Tensor | None = None) -> None:
        """Run `images` through the model in eval mode, logging routing and reconstructions.

        Routing diagnostics of each iteration r (`capsnet.routing.diagnostics`: coupling entropy, mean
        maximum coupling, mean agreement) go in as scalars `routing/<name>_iter{r}`.
        """
        if self.writer is None:
            return
        from capsnet.routing.diagnostics import RoutingRecorder, summarize_iterations

        routing = getattr(model, "routing", None)
        with RoutingRecorder(model) as recorder:  # records only routings that can (a `record` attribute)
            with autocast:
                out = model(images)
            sums = recorder.sums(out)
        for name, per_iter in out.extras.items():  # e.g. couplings: one tensor per routing iteration
            if isinstance(per_iter, (list, tuple)):
                for r, c in enumerate(per_iter, start=1):
                    if torch.isfinite(c).all():
                        self.writer.add_histogram(f"routing/{name}_iter{r}", c.float().cpu(), step)
        if sums:
            diagnostics = summarize_iterations(sums)
            for name in ("entropy", "max_coupling", "agreement"):
                for r, value in enumerate(diagnostics[name] or [], start=1):
                    self.writer.add_scalar(f"routing/{name}_iter{r}", value, step)
        if routing is not None and torch.isfinite(out.scores).all():
            self.writer.add_histogram("capsules/lengths", out.scores.float().cpu(), step)
        if out.reconstructions is not None and labels is not None and labels.dim() == 2:
            self.writer.add_figure("multimnist_reconstructions", figure5(model, images, labels, out, autocast), step)
        elif out.reconstructions is not None:
            figure = reconstruction_figure(images, out.reconstructions[:, 0], labels, out.scores.argmax(-1))
            self.writer.add_figure("reconstructions", figure, step)

    @never_fatal
    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.writer is not None:
            self.writer.add_hparams(hparams, {k: v for k, v in metrics.items() if math.isfinite(v)}, run_name=".")

    @never_fatal
    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def figure5(model, images, labels, out, autocast):
    """The paper's Figure 5 for multi-label inputs: the two longest capsules decoded, overlaid green and red."""
    from capsnet.tools.figures import multimnist_figure

    top2 = out.scores.topk(2, -1).indices
    with autocast:
        recon = model(images, top2).reconstructions.float().cpu()
    listed = [tuple(int(k) for k in row.nonzero().flatten()[:2]) for row in labels.cpu()]
    return multimnist_figure(images.float().cpu()[:8], recon[:8, 0], recon[:8, 1], listed[:8],
                             [tuple(r) for r in top2.tolist()[:8]])


def reconstruction_figure(images: torch.Tensor, recon: torch.Tensor, labels, predicted):
    """Inputs beside their reconstructions, in labelled pairs: 'input, label L' over 'reconstruction, predicted P'
    (the decoder is masked by the longest capsule here, the paper's test-time rule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(8, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(1.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = 2 * (i // cols), i % cols
        for ax, img, title in ((axes[r, c], images[i], "input" + ("" if labels is None else f", {_label(labels[i])}")),
                               (axes[r + 1, c], recon[i], f"recon., pred. {int(predicted[i])}")):
            x = img.detach().float().cpu()
            ax.imshow(x.permute(1, 2, 0).clamp(0, 1) if x.shape[0] == 3 else x[0], cmap="gray")
            ax.set_title(title, fontsize=6)
    fig.tight_layout()
    return fig


def _label(label: torch.Tensor) -> str:
    if label.dim() == 0:
        return f"label {int(label)}"
    return "labels " + ",".join(str(int(k)) for k in label.nonzero().flatten())
