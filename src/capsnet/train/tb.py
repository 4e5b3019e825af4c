"""TensorBoard: scalars, reconstructions beside their inputs, routing histograms.

Only rank 0 writes; on other ranks every method is a no-op. Tags:
`train/*` and `test/*` scalars, `lr`, `throughput`, `reconstructions`,
`routing/<name>_iter{r}` for each routing iteration r (1-based) of every
per-iteration diagnostic a model returns in `ModelOutput.extras` (dynamic
routing: `couplings`, when its `record` is on) and
`capsules/lengths`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid


class TensorBoard:
    def __init__(self, log_dir: str | None, purge_step: int | None = None):
        self.writer = SummaryWriter(log_dir, purge_step=purge_step) if log_dir else None

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(prefix + k, float(v), step)

    @torch.no_grad()
    def inspect(self, model: nn.Module, images: torch.Tensor, step: int, autocast) -> None:
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
                    self.writer.add_histogram(f"routing/{name}_iter{r}", c.float().cpu(), step)
        if sums:
            diagnostics = summarize_iterations(sums)
            for name in ("entropy", "max_coupling", "agreement"):
                for r, value in enumerate(diagnostics[name] or [], start=1):
                    self.writer.add_scalar(f"routing/{name}_iter{r}", value, step)
        if routing is not None:
            self.writer.add_histogram("capsules/lengths", out.scores.float().cpu(), step)
        if out.reconstructions is not None:
            recon = out.reconstructions[:, 0].float()
            pairs = torch.stack([images.float(), recon], 1).flatten(0, 1)
            self.writer.add_image("reconstructions", make_grid(pairs.cpu(), nrow=8, pad_value=0.5), step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.writer is not None:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
