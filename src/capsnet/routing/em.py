"""EM routing between matrix capsules: Procedure 1 of Hinton, Sabour, Frosst (ICLR 2018).

Each parent j is a Gaussian over the 16 entries of the 4x4 poses; EM fits the
parents to the children's votes V_ij, weighted by the children's activations.

M-step (for every parent j):
    R'_ij = R_ij a_i;  mu_j = sum_i R'_ij V_ij / sum_i R'_ij;
    sigma^2_j = sum_i R'_ij (V_ij - mu_j)^2 / sum_i R'_ij + var_floor;
    cost^h_j = (beta_u + log sigma^h_j) * sum_i R'_ij * cost_factor;
    a_j = logistic(lambda_t (beta_a - sum_h cost^h_j)).
E-step (for every child i, all but the last iteration):
    R_ij = a_j p_ij / sum_k a_k p_ik,  p_ij = prod_h N(V^h_ij; mu^h_j, sigma^h_j^2).

Choices the paper leaves open, and why:

- Log space. The E-step works with log a_j = logsigmoid(logit_j) and log p_ij,
  and normalises with a stabilised logsumexp: p_ij underflows in float32 as
  soon as a parent is tight (one child, identical votes).
- Variance floor. sigma^2 = weighted variance + `var_floor` (default 1e-4, a
  standard deviation of 0.01): a parent fed by a single child (or identical
  votes) has variance 0, so log sigma and 1/sigma^2 would be infinite.
  Adding (rather than clamping) keeps the gradient smooth; identical votes
  then give sigma^2 = var_floor exactly.
- Weights' denominator sum_i R'_ij is clamped at 1e-6 (not offset), so mu is
  an exact convex combination whenever the parent has any input, and a parent
  whose children are all inactive gets mu = 0, sigma^2 = floor, cost 0.
- Cost normalisation (`cost_norm`, default 100). In the paper the cost is
  proportional to sum_i R'_ij, which is ~9 for a K=3 convolutional parent
  and ~80 for a class capsule fed by 4x4x32 children, so no single lambda and
  beta scale fits both. With `cost_norm = c`, sum_i R'_ij is multiplied by
  c * J / S (S children slots per parent, J parent types): the mean share a
  parent receives, times c. c = 100 with final_lambda = 0.01 is the setting
  of Gritzman's IBM re-implementation (its `layer_norm_factor`), where it
  trains; `cost_norm: null` gives the paper's literal cost.
- Inverse temperature lambda_t = final_lambda * (1 - lambda_decay^(t+1)),
  t = 0..iters-1: the authors' schedule (OpenReview answer), not in the paper.
- No stop-gradient: gradients flow through every iteration.

Convolutional layers: a child lies in the receptive field of several parent
positions, and its responsibilities normalise over all of them (every
position and type). `em_route` takes votes laid out per parent position and
kernel slot, [N, P, S, J, H], plus `child_index` [P, S] saying which child
each slot is; the E-step's normaliser is a logsumexp gathered per child
(scatter-max for stability, index_add for the sum). The class layer is the
case P = 1 with every slot its own child.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from capsnet.errors import CapsnetError
from capsnet.types import RoutingOutput

_WEIGHT_EPS = 1e-6  # floor of sum_i R'_ij in the M-step's division


def lambda_schedule(iters: int, final_lambda: float, decay: float = 0.95) -> list[float]:
    """lambda_t = final_lambda * (1 - decay^(t+1)) for t = 0..iters-1 (the authors' schedule)."""
    return [final_lambda * (1.0 - decay ** (t + 1)) for t in range(iters)]


def _m_step(votes, weights, beta_u, beta_a, lam, var_floor, cost_factor):
    """votes [N,P,S,J,H], weights R' [N,P,S,J] -> mu, var [N,P,J,H], sq. deviations [N,P,S,J,H], logit [N,P,J]."""
    wsum = weights.sum(2)  # [N, P, J]
    coef = weights / wsum.clamp_min(_WEIGHT_EPS).unsqueeze(2)
    mu = torch.einsum("npsj,npsjh->npjh", coef, votes)
    dev2 = (votes - mu.unsqueeze(2)).square()
    var = torch.einsum("npsj,npsjh->npjh", coef, dev2) + var_floor
    cost = (beta_u.unsqueeze(-1) + 0.5 * torch.log(var)) * (wsum * cost_factor).unsqueeze(-1)
    logit = lam * (beta_a - cost.sum(-1))
    return mu, var, dev2, logit


def _log_joint(dev2, var, logit):
    """log a_j + log p_ij [N,P,S,J]: diagonal Gaussian log density of each vote under its parent."""
    log_p = -0.5 * (dev2 / var.unsqueeze(2) + torch.log(2 * math.pi * var).unsqueeze(2)).sum(-1)
    return F.logsigmoid(logit).unsqueeze(2) + log_p


def _child_logsumexp(z, child_index, n_children):
    """logsumexp of z [N,P,S,J] over every (position, type) entry of the same child -> [N,P,S].

    The stabiliser (per-child max) is detached: the result does not depend on it.
    """
    n = z.shape[0]
    flat_idx = child_index.reshape(-1)
    local_max = z.detach().amax(-1).reshape(n, -1)  # [N, P*S]
    child_max = local_max.new_full((n, n_children), -math.inf)
    child_max = child_max.scatter_reduce(1, flat_idx.expand(n, -1), local_max, "amax")
    m = child_max[:, flat_idx].view(z.shape[:-1])
    local_sum = torch.exp(z - m.unsqueeze(-1)).sum(-1).reshape(n, -1)
    child_sum = local_sum.new_zeros(n, n_children).index_add(1, flat_idx, local_sum)
    return m + torch.log(child_sum[:, flat_idx].view(z.shape[:-1]))  # gather first: every sum is >= 1


def _e_step(dev2, var, logit, child_index, n_children):
    """New responsibilities R [N,P,S,J]: each child's a_j p_ij normalised over all its parents."""
    z = _log_joint(dev2, var, logit)
    if child_index is None:
        return torch.softmax(z, -1)
    return torch.exp(z - _child_logsumexp(z, child_index, n_children).unsqueeze(-1))


def initial_responsibilities(votes, child_index=None, n_children=None):
    """R_ij = 1 / |parents(i)| [1, P, S, J]: parents counted over every position and type holding the child."""
    _, p, s, j, _ = votes.shape
    if child_index is None:
        return votes.new_full((1, p, s, j), 1.0 / j)
    counts = torch.bincount(child_index.reshape(-1), minlength=n_children).to(votes.dtype)
    return (1.0 / (counts[child_index] * j)).view(1, p, s, 1).expand(1, p, s, j)


def em_route(votes, activations, beta_u, beta_a, *, iters: int = 3, final_lambda: float = 0.01,
             lambda_decay: float = 0.95, var_floor: float = 1e-4, cost_norm: float | None = 100.0,
             child_index=None, n_children: int | None = None, record: list | None = None):
    """Procedure 1 on votes [N,P,S,J,H] and child activations [N,P,S].

    P parent positions, S children slots per position (a kernel's K*K*types,
    or every child for a fully connected layer), J parent types, H pose
    entries. `child_index` [P, S] (long, < n_children) names the child of
    each slot, so a child shared by several positions normalises over all of
    them; None means every slot is a distinct child (P = 1, fully connected).
    Returns mu [N,P,J,H], a [N,P,J] and the last M-step's R [N,P,S,J].
    `record`, a list, receives the R of every M-step (detached).
    """
    s, j = votes.shape[2], votes.shape[3]
    cost_factor = 1.0 if cost_norm is None else cost_norm * j / s
    r = initial_responsibilities(votes, child_index, n_children)
    a_in = activations.unsqueeze(-1)
    for t, lam in enumerate(lambda_schedule(iters, final_lambda, lambda_decay)):
        if record is not None:
            record.append(r.detach().expand(votes.shape[:-1]))
        mu, var, dev2, logit = _m_step(votes, r * a_in, beta_u, beta_a, lam, var_floor, cost_factor)
        if t < iters - 1:  # the last E-step is skipped
            r = _e_step(dev2, var, logit, child_index, n_children)
    return mu, torch.sigmoid(logit), r.expand(votes.shape[:-1])


class EMRouting(nn.Module):
    """EM routing for one capsule layer, with its learned beta_u, beta_a (one per output type).

    Built by the layer as a factory call with `in_capsules`, `out_capsules`
    (the number of output types J), `out_dim`. `forward` is the routing
    contract for a fully connected layer; `route` is the general entry point
    that convolutional layers call with their child->parent structure.

    Args:
        iters: EM iterations (paper: 3; the last E-step is skipped).
        final_lambda, lambda_decay: inverse temperature schedule (module docstring).
        var_floor: added to every parent variance.
        cost_norm: cost normalisation c (module docstring); None = the paper's cost.

    Set `record = True` to keep `self.recorded = {"responsibilities": [R per
    M-step]}` (detached; R [B, I, J] from `forward`, [N, P, S, J] from `route`,
    where forward also stores the list under "couplings").
    """

    def __init__(self, iters: int = 3, final_lambda: float = 0.01, lambda_decay: float = 0.95,
                 var_floor: float = 1e-4, cost_norm: float | None = 100.0, *,
                 out_capsules: int | None = None, in_capsules: int | None = None, out_dim: int = 16, **_):
        super().__init__()
        if int(iters) != iters or iters < 1:
            raise CapsnetError(f"routing.iters must be a whole number >= 1, got {iters!r}")
        if out_capsules is None or out_capsules < 1:
            raise CapsnetError("EMRouting needs out_capsules (the number of output types): "
                               "build it as a factory (_partial_: true) that the capsule layer completes")
        if var_floor <= 0 or final_lambda <= 0:
            raise CapsnetError(f"routing.var_floor and routing.final_lambda must be > 0, got {var_floor}, {final_lambda}")
        self.iters, self.final_lambda, self.lambda_decay = int(iters), float(final_lambda), float(lambda_decay)
        self.var_floor, self.cost_norm = float(var_floor), None if cost_norm is None else float(cost_norm)
        self.in_capsules, self.out_capsules, self.out_dim = in_capsules, out_capsules, out_dim
        self.beta_u = nn.Parameter(torch.zeros(out_capsules))
        self.beta_a = nn.Parameter(torch.zeros(out_capsules))
        self.record = False
        self.recorded: dict = {}

    def route(self, votes, activations, child_index=None, n_children=None):
        """votes [N,P,S,J,H], activations [N,P,S] -> (mu [N,P,J,H], a [N,P,J], R [N,P,S,J]); see `em_route`."""
        with torch.autocast(votes.device.type, enabled=False):
            dtype = torch.promote_types(votes.dtype, torch.float32)
            trace = [] if self.record else None
            out = em_route(votes.to(dtype), activations.to(dtype), self.beta_u.to(dtype), self.beta_a.to(dtype),
                           iters=self.iters, final_lambda=self.final_lambda, lambda_decay=self.lambda_decay,
                           var_floor=self.var_floor, cost_norm=self.cost_norm,
                           child_index=child_index, n_children=n_children, record=trace)
        self.recorded = {"responsibilities": trace} if self.record else {}
        return out

    def forward(self, votes: torch.Tensor, activations: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> RoutingOutput:
        """votes [B, I, J, H], activations [B, I] (None: all 1) -> RoutingOutput(mu, a, R [B, I, J]).

        `bias` is accepted for the routing contract and must be None (EM
        routing has beta_u, beta_a instead of a bias on the poses).
        """
        if bias is not None:
            raise CapsnetError("EM routing takes no pose bias: set the capsule layer's bias to false")
        if activations is None:
            activations = votes.new_ones(votes.shape[:2])
        mu, a, r = self.route(votes.unsqueeze(1), activations.unsqueeze(1))
        if self.record:
            self.recorded["responsibilities"] = [x.squeeze(1) for x in self.recorded["responsibilities"]]
            self.recorded["couplings"] = self.recorded["responsibilities"]
        return RoutingOutput(mu.squeeze(1), a.squeeze(1), r.squeeze(1))

    def extra_repr(self) -> str:
        return (f"out_capsules={self.out_capsules}, iters={self.iters}, final_lambda={self.final_lambda}, "
                f"lambda_decay={self.lambda_decay}, var_floor={self.var_floor}, cost_norm={self.cost_norm}")
