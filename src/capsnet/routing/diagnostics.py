"""Routing diagnostics per routing iteration: how peaked the couplings are and how well the votes agree.

For every routing iteration r (1-based), over a set of images:

- entropy: the mean over images b and lower capsules i of H(c[b, i, :]) =
  -sum_j c[b, i, j] log c[b, i, j], in nats. Uniform couplings over J upper
  capsules give log J (dynamic routing's first iteration, Procedure 1 of
  Sabour et al. 2017); routing that has decided gives values near 0.
- max_coupling: the mean over b, i of max_j c[b, i, j] (1/J when uniform, 1
  when each lower capsule sends everything to one parent).
- agreement: the mean over b, i, j of the routing's own agreement between a
  vote and the parent it produced in iteration r, where a routing defines one:
    * dynamic routing: u_hat[j|i] . v_r[j], with v_r = squash(sum_i c_r[i, j]
      u_hat[j|i] + bias) recomputed from the recorded couplings c_r: the
      quantity added to the logits b after iteration r (Procedure 1, line 7);
    * self-attention routing (Efficient-CapsNet, Eq. 4): the score
      <u_hat[n|i], sum_k u_hat[n|k]> / sqrt(D) of its single pass;
    * other routings (EM's responsibilities, inverted dot-product attention,
      whose class layer is stepped from outside `forward`): none (null).

The couplings come from `ModelOutput.extras["couplings"]` (one [B, I, J]
tensor per iteration, present while the routing's `record` is on); the votes
from a forward hook on the routing module. For leaky routing the sink's share
is left out, so a row sums to less than 1 and its entropy is that of the J
real parents' shares. EM routing reports its responsibilities as couplings.

`RoutingRecorder` turns recording on around a model and is itself a metric
(`capsnet.metrics` protocol: sums per batch, values from the totals), so
`capsnet.train.engine.evaluate` accumulates it with every image counted once
on any number of processes.
"""

from __future__ import annotations

import math

import torch

from capsnet.routing.dynamic import DynamicRouting
from capsnet.routing.self_attention import SelfAttentionRouting, self_attention_agreement

NAMES = ("entropy", "max_coupling", "agreement")


def coupling_entropy(c: torch.Tensor) -> torch.Tensor:
    """c [..., J] -> H [...] = -sum_j c log c in nats (0 log 0 = 0)."""
    c = c.double()
    return -torch.where(c > 0, c * torch.log(c.clamp_min(1e-300)), torch.zeros_like(c)).sum(-1)


def max_coupling(c: torch.Tensor) -> torch.Tensor:
    """c [..., J] -> max_j c [...]."""
    return c.double().max(-1).values


def dynamic_agreement(votes: torch.Tensor, c: torch.Tensor, squash, bias: torch.Tensor | None = None) -> torch.Tensor:
    """u_hat . v_r [B, I, J] for dynamic routing: votes [B, I, J, D], iteration r's couplings c [B, I, J]."""
    u = votes.float()
    s = torch.einsum("bij,bijd->bjd", c.float(), u)
    if bias is not None:
        s = s + bias.float()
    v = squash(s)
    return torch.einsum("bijd,bjd->bij", u, v)


def agreements(routing, votes: torch.Tensor | None, couplings: list, bias=None) -> list | None:
    """Per iteration, the routing's agreement [B, I, J] (module docstring), or None where it defines none."""
    if votes is None or votes.dim() != 4:
        return None
    if isinstance(routing, DynamicRouting):
        return [dynamic_agreement(votes, c, routing.squash, bias) for c in couplings]
    if isinstance(routing, SelfAttentionRouting):
        return [self_attention_agreement(votes.float())]
    return None


def iteration_sums(couplings: list, agree: list | None = None) -> dict:
    """Per-batch sums, one 0-dim float64 tensor per key: "<name>_iter<r>/sum" and the counts they divide by."""
    sums = {}
    for r, c in enumerate(couplings, start=1):
        sums[f"entropy_iter{r}/sum"] = coupling_entropy(c).sum()
        sums[f"max_coupling_iter{r}/sum"] = max_coupling(c).sum()
        sums[f"rows_iter{r}/count"] = torch.tensor(float(c[..., 0].numel()), dtype=torch.float64, device=c.device)
        if agree is not None:
            sums[f"agreement_iter{r}/sum"] = agree[r - 1].double().sum()
            sums[f"pairs_iter{r}/count"] = torch.tensor(float(agree[r - 1].numel()), dtype=torch.float64,
                                                        device=c.device)
    return sums


def summarize_iterations(totals: dict) -> dict:
    """{"entropy": [per iteration], "max_coupling": [...], "agreement": [...] or None, "iterations": R}
    from summed `iteration_sums` (keys may carry a prefix)."""
    totals = {k.rsplit("routing/", 1)[-1]: v for k, v in totals.items()}
    iters = sorted(int(k[len("rows_iter"):-len("/count")]) for k in totals if k.startswith("rows_iter"))
    out: dict = {"iterations": len(iters)}
    for name, count in (("entropy", "rows"), ("max_coupling", "rows"), ("agreement", "pairs")):
        values = [float(totals[f"{name}_iter{r}/sum"]) / max(float(totals[f"{count}_iter{r}/count"]), 1.0)
                  for r in iters if f"{name}_iter{r}/sum" in totals]
        out[name] = values if values else None
    return out


def uniform_entropy(num_parents: int) -> float:
    """log J: the entropy of uniform couplings, the reference line of the entropy plot."""
    return math.log(num_parents)


class RoutingRecorder:
    """Records a model's class-layer routing while in use; a metric that sums the diagnostics.

    with RoutingRecorder(model) as rec:
        out = model(images)          # or engine.evaluate(..., metrics={**metrics, "routing": rec}, ...)
        sums = rec.sums(out, batch)

    `model.routing` is the routing module (the models' convention); a model
    without one records nothing and `result` stays empty.
    """

    names = ()  # no value for metrics.jsonl: `compute` keeps its result in `self.result`

    def __init__(self, model):
        self.routing = getattr(model, "routing", None)
        self.votes, self.bias, self.result, self._hook, self._was = None, None, {}, None, False

    def __enter__(self) -> "RoutingRecorder":
        if hasattr(self.routing, "record"):
            self._was, self.routing.record = self.routing.record, True
            self._hook = self.routing.register_forward_hook(self._capture, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
            self.routing.record, self._hook = self._was, None
        self.votes = self.bias = None

    def _capture(self, module, args, kwargs, output) -> None:
        self.votes = args[0].detach() if args else kwargs.get("votes")
        self.bias = kwargs.get("bias", args[2] if len(args) > 2 else None)

    def couplings(self, out) -> list:
        found = out.extras.get("couplings") if out is not None else None
        if found is None and self.routing is not None:
            found = getattr(self.routing, "recorded", {}).get("couplings")
        return list(found or [])

    def sums(self, out, batch=None) -> dict:
        """This batch's diagnostic sums under "routing/..." keys (empty when nothing was recorded)."""
        couplings = self.couplings(out)
        if not couplings:
            return {}
        votes = self.votes
        if votes is not None and votes.shape[:3] != couplings[0].shape:
            votes = None  # a hook from another call (e.g. a convolutional EM layer): no agreement
        agree = agreements(self.routing, votes, couplings, self.bias)
        self.votes = None
        return {f"routing/{k}": v for k, v in iteration_sums(couplings, agree).items()}

    def compute(self, totals: dict) -> dict:
        mine = {k: v for k, v in totals.items() if k.startswith("routing/")}
        self.result = summarize_iterations(mine) if mine else {}
        return {}
