"""EM routing (Hinton, Sabour, Frosst 2018, Procedure 1) against an explicit-loop float64 reference and SPEC 7.1's invariants."""

import functools
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnet.errors import CapsnetError
from capsnet.routing.em import EMRouting, lambda_schedule

ROOT = Path(__file__).resolve().parents[1]


def reference_em(votes, child_acts, child_index, beta_u, beta_a, iters, final_lambda=0.01, decay=0.95,
                 var_floor=1e-4, cost_norm=100.0):
    """Procedure 1 with explicit loops over samples, parents and children (float64, autograd-able).

    votes [N, P, S, J, H]: slot s of parent position p is child child_index[p][s];
    child_acts [N, n_children]. Returns mu [N,P,J,H], a [N,P,J], last M-step's R [N,P,S,J].
    """
    n_b, n_p, n_s, n_j, _ = votes.shape
    children = sorted({c for row in child_index for c in row})
    slots_of = {c: [(p, s) for p in range(n_p) for s in range(n_s) if child_index[p][s] == c] for c in children}
    factor = 1.0 if cost_norm is None else cost_norm * n_j / n_s
    mus, acts, rs = [], [], []
    for n in range(n_b):
        r = {(p, s, j): 1.0 / (len(slots_of[child_index[p][s]]) * n_j)
             for p in range(n_p) for s in range(n_s) for j in range(n_j)}
        for t in range(iters):
            lam = final_lambda * (1 - decay ** (t + 1))
            mu, var, logit = {}, {}, {}
            for p in range(n_p):  # M-step, one parent (p, j) at a time
                for j in range(n_j):
                    w = [r[p, s, j] * child_acts[n, child_index[p][s]] for s in range(n_s)]
                    wsum = sum(w)
                    den = torch.clamp(torch.as_tensor(wsum, dtype=torch.float64), min=1e-6)
                    mu[p, j] = sum(w[s] * votes[n, p, s, j] for s in range(n_s)) / den
                    var[p, j] = sum(w[s] * (votes[n, p, s, j] - mu[p, j]) ** 2 for s in range(n_s)) / den + var_floor
                    cost = (beta_u[j] + 0.5 * torch.log(var[p, j])) * wsum * factor
                    logit[p, j] = lam * (beta_a[j] - cost.sum())
            if t == iters - 1:
                break
            for c, slots in slots_of.items():  # E-step, one child at a time, over all its parents
                z = {}
                for p, s in slots:
                    for j in range(n_j):
                        d = votes[n, p, s, j] - mu[p, j]
                        log_p = (-0.5 * d ** 2 / var[p, j] - 0.5 * torch.log(2 * math.pi * var[p, j])).sum()
                        z[p, s, j] = torch.log(torch.sigmoid(logit[p, j])) + log_p
                total = torch.logsumexp(torch.stack(list(z.values())), 0)
                for key, val in z.items():
                    r[key] = torch.exp(val - total)
        mus.append(torch.stack([torch.stack([mu[p, j] for j in range(n_j)]) for p in range(n_p)]))
        acts.append(torch.stack([torch.stack([torch.sigmoid(logit[p, j]) for j in range(n_j)]) for p in range(n_p)]))
        rs.append(torch.tensor([[[float(torch.as_tensor(r[p, s, j]).detach()) for j in range(n_j)] for s in range(n_s)] for p in range(n_p)],
                               dtype=torch.float64))
    return torch.stack(mus), torch.stack(acts), torch.stack(rs)


def make_routing(out_capsules, seed=0, **kw):
    torch.manual_seed(seed)
    routing = EMRouting(out_capsules=out_capsules, **kw).double()
    with torch.no_grad():
        routing.beta_u.normal_(0, 0.5)
        routing.beta_a.normal_(0, 0.5)
    return routing


def conv_structure(height=4, width=4, types=2, k=2, stride=1):
    """child_index [P, S] of a K x K stride-s convolution over a height x width grid of `types` types."""
    idx = torch.arange(height * width * types).view(1, height, width, types)
    idx = idx.unfold(1, k, stride).unfold(2, k, stride)[0]  # [Ho, Wo, T, K, K]
    return idx.permute(0, 1, 3, 4, 2).flatten(0, 1).flatten(1), height * width * types


def _compare(fast, ref, routing, inputs):
    """Values and gradients of a random scalar function of (mu, a) agree."""
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, rtol=1e-7, atol=1e-9)
    torch.manual_seed(123)
    g_mu, g_a = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    params = list(inputs) + [routing.beta_u, routing.beta_a]
    grads_fast = torch.autograd.grad((fast[0] * g_mu).sum() + (fast[1] * g_a).sum(), params)
    grads_ref = torch.autograd.grad((ref[0] * g_mu).sum() + (ref[1] * g_a).sum(), params)
    for f, r in zip(grads_fast, grads_ref):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("cost_norm", [100.0, None])
def test_fully_connected_matches_reference(iters, cost_norm):
    routing = make_routing(3, iters=iters, cost_norm=cost_norm)
    votes = torch.randn(2, 5, 3, 16, dtype=torch.float64, requires_grad=True)
    acts = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    out = routing(votes, acts)
    ref = reference_em(votes.unsqueeze(1), acts, [list(range(5))], routing.beta_u, routing.beta_a, iters,
                       cost_norm=cost_norm)
    torch.testing.assert_close(out.couplings, ref[2][:, 0], rtol=1e-7, atol=1e-9)
    _compare((out.poses, out.activations), (ref[0][:, 0], ref[1][:, 0]), routing, (votes, acts))


@pytest.mark.parametrize("k,stride", [(2, 1), (3, 2)])
def test_convolutional_matches_reference(k, stride):
    """Children shared by several positions: R normalises over every position and type holding them."""
    child_index, n_children = conv_structure(5, 5, 2, k, stride)
    routing = make_routing(2, iters=3)
    n_p, n_s = child_index.shape
    votes = torch.randn(2, n_p, n_s, 2, 16, dtype=torch.float64, requires_grad=True)
    child_acts = torch.rand(2, n_children, dtype=torch.float64, requires_grad=True)
    mu, a, r = routing.route(votes, child_acts[:, child_index], child_index, n_children)
    ref = reference_em(votes, child_acts, child_index.tolist(), routing.beta_u, routing.beta_a, 3)
    torch.testing.assert_close(r, ref[2], rtol=1e-7, atol=1e-9)
    _compare((mu, a), ref[:2], routing, (votes, child_acts))


def test_responsibilities_sum_to_one_over_each_childs_parents():
    child_index, n_children = conv_structure(5, 5, 3, 3, 2)
    routing = make_routing(4)
    routing.record = True
    votes = torch.randn(3, *child_index.shape, 4, 16, dtype=torch.float64)
    routing.route(votes, torch.rand(3, *child_index.shape, dtype=torch.float64), child_index, n_children)
    assert len(routing.recorded["responsibilities"]) == routing.iters
    has_parent = torch.bincount(child_index.flatten(), minlength=n_children) > 0
    for r in routing.recorded["responsibilities"]:
        per_child = torch.zeros(3, n_children, dtype=torch.float64).index_add(1, child_index.flatten(),
                                                                              r.sum(-1).flatten(1))
        torch.testing.assert_close(per_child[:, has_parent], torch.ones_like(per_child[:, has_parent]))
    fc = make_routing(4)(torch.randn(2, 7, 4, 16, dtype=torch.float64), torch.rand(2, 7, dtype=torch.float64))
    torch.testing.assert_close(fc.couplings.sum(-1), torch.ones(2, 7, dtype=torch.float64))


def test_first_iteration_uniform_and_recording_off_by_default():
    child_index, n_children = conv_structure(4, 4, 1, 3, 1)  # corner children have 1 parent position, centre 4
    routing = make_routing(2)
    votes = torch.randn(1, *child_index.shape, 2, 16, dtype=torch.float64)
    routing.route(votes, torch.rand(1, *child_index.shape, dtype=torch.float64), child_index, n_children)
    assert routing.recorded == {}
    routing.record = True
    routing.route(votes, torch.rand(1, *child_index.shape, dtype=torch.float64), child_index, n_children)
    r0 = routing.recorded["responsibilities"][0]
    counts = torch.bincount(child_index.flatten())[child_index]
    torch.testing.assert_close(r0, (1.0 / (2 * counts.double())).view(1, *child_index.shape, 1).expand_as(r0))


def test_mu_is_a_convex_combination_of_the_votes():
    routing = make_routing(3)
    votes, acts = torch.randn(4, 9, 3, 16, dtype=torch.float64), torch.rand(4, 9, dtype=torch.float64)
    out = routing(votes, acts)
    w = out.couplings * acts.unsqueeze(-1)  # the last M-step's R'
    coef = w / w.sum(1, keepdim=True)
    assert (coef >= 0).all()
    torch.testing.assert_close(out.poses, torch.einsum("nij,nijh->njh", coef, votes))
    assert (out.poses <= votes.amax(1) + 1e-12).all() and (out.poses >= votes.amin(1) - 1e-12).all()


def test_identical_votes_give_the_vote_and_the_floor_variance():
    routing = make_routing(2, var_floor=1e-3)
    vote = torch.randn(1, 1, 2, 16, dtype=torch.float64)
    votes, acts = vote.expand(1, 6, 2, 16), torch.rand(1, 6, dtype=torch.float64)
    out = routing(votes, acts)
    torch.testing.assert_close(out.poses, vote[:, 0])
    # sigma^2 = floor for all 16 entries: a = logistic(lambda (beta_a - 16 (beta_u + 0.5 log floor) sum R' * c J/S))
    lam = lambda_schedule(routing.iters, routing.final_lambda)[-1]
    share = (out.couplings * acts.unsqueeze(-1)).sum(1) * routing.cost_norm * 2 / 6
    cost = 16 * (routing.beta_u + 0.5 * math.log(1e-3)) * share
    torch.testing.assert_close(out.activations, torch.sigmoid(lam * (routing.beta_a - cost)))


@pytest.mark.parametrize("cost_norm", [None, 100.0])
def test_a_child_with_activation_zero_has_no_influence(cost_norm):
    """Its votes change nothing and get no gradient. With the paper's cost (cost_norm None) removing it
    changes nothing either; cost_norm scales by the number of slots S, a constant of the layer."""
    routing = make_routing(3, cost_norm=cost_norm)
    votes = torch.randn(2, 6, 3, 16, dtype=torch.float64, requires_grad=True)
    acts = torch.rand(2, 6, dtype=torch.float64)
    acts[:, 2] = 0
    out = routing(votes, acts)
    if cost_norm is None:
        keep = [0, 1, 3, 4, 5]
        without = routing(votes[:, keep], acts[:, keep])
        torch.testing.assert_close(out.poses, without.poses)
        torch.testing.assert_close(out.activations, without.activations)
    (grad,) = torch.autograd.grad(out.poses.sum() + out.activations.sum(), votes)
    assert (grad[:, 2] == 0).all()
    moved = votes.detach().clone()
    moved[:, 2] *= 1e3
    moved_out = routing(moved, acts)
    torch.testing.assert_close(moved_out.poses, out.poses)
    torch.testing.assert_close(moved_out.activations, out.activations)


def test_permuting_the_children_permutes_nothing_else():
    routing = make_routing(3)
    votes, acts = torch.randn(2, 8, 3, 16, dtype=torch.float64), torch.rand(2, 8, dtype=torch.float64)
    perm = torch.randperm(8)
    out, permuted = routing(votes, acts), routing(votes[:, perm], acts[:, perm])
    torch.testing.assert_close(permuted.poses, out.poses)
    torch.testing.assert_close(permuted.activations, out.activations)
    torch.testing.assert_close(permuted.couplings, out.couplings[:, perm])


def test_activations_lie_strictly_between_zero_and_one():
    routing = EMRouting(out_capsules=5)
    torch.manual_seed(0)
    out = routing(torch.randn(16, 20, 5, 16), torch.rand(16, 20))
    assert ((out.activations > 0) & (out.activations < 1)).all()


def _adversarial_cases():
    torch.manual_seed(1)
    same = torch.randn(1, 1, 3, 16).expand(2, 6, 3, 16).clone()
    yield "identical votes", same, torch.rand(2, 6)
    yield "one child per parent", torch.randn(2, 1, 3, 16), torch.rand(2, 1)
    yield "huge poses", torch.randn(2, 6, 3, 16) * 1e6, torch.rand(2, 6)
    yield "tiny poses", torch.randn(2, 6, 3, 16) * 1e-12, torch.rand(2, 6)
    yield "all children inactive", torch.randn(2, 6, 3, 16), torch.zeros(2, 6)
    yield "saturated activations", torch.randn(2, 6, 3, 16), torch.ones(2, 6)


@pytest.mark.parametrize("case", list(range(6)))
def test_no_nan_or_inf_on_adversarial_inputs(case):
    name, votes, acts = list(_adversarial_cases())[case]
    routing = EMRouting(out_capsules=3)
    votes, acts = votes.requires_grad_(True), acts.requires_grad_(True)
    out = routing(votes, acts)
    assert torch.isfinite(out.poses).all() and torch.isfinite(out.activations).all(), name
    grads = torch.autograd.grad(out.poses.sum() + out.activations.sum(),
                                [votes, acts, routing.beta_u, routing.beta_a])
    assert all(torch.isfinite(g).all() for g in grads), name


def test_one_child_per_parent_in_a_convolution_is_finite():
    """A 1x1 kernel: every child has exactly one parent position; R still sums to 1 over its types."""
    child_index, n_children = conv_structure(3, 3, 2, 1, 1)
    routing = EMRouting(out_capsules=2)
    votes = (torch.randn(2, *child_index.shape, 2, 16) * 1e4).requires_grad_(True)
    mu, a, r = routing.route(votes, torch.rand(2, *child_index.shape), child_index, n_children)
    torch.testing.assert_close(r.sum(-1), torch.ones_like(r.sum(-1)), rtol=0, atol=1e-4)  # float32, |z| ~ 1e12
    (grad,) = torch.autograd.grad(mu.sum() + a.sum(), votes)
    assert torch.isfinite(grad).all() and torch.isfinite(mu).all()


def test_lambda_schedule_is_the_authors():
    assert lambda_schedule(3, 0.01) == pytest.approx([0.01 * (1 - 0.95), 0.01 * (1 - 0.95 ** 2), 0.01 * (1 - 0.95 ** 3)])


def test_runs_in_float32_under_bf16_autocast():
    routing = EMRouting(out_capsules=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = routing(torch.randn(2, 6, 3, 16).bfloat16(), torch.rand(2, 6).bfloat16())
    assert out.poses.dtype == torch.float32 and torch.isfinite(out.poses).all()


def test_bad_arguments_raise_capsnet_error():
    with pytest.raises(CapsnetError):
        EMRouting()  # no out_capsules: not completed by a layer
    with pytest.raises(CapsnetError):
        EMRouting(iters=0, out_capsules=2)
    with pytest.raises(CapsnetError):
        EMRouting(out_capsules=2)(torch.randn(1, 3, 2, 16), torch.rand(1, 3), bias=torch.zeros(2, 16))


def test_yaml_builds_a_factory_with_per_type_betas():
    factory = instantiate(OmegaConf.load(ROOT / "configs/routing/em.yaml"))
    assert isinstance(factory, functools.partial)
    routing = factory(in_capsules=12, out_capsules=5, out_dim=16)
    assert routing.iters == 3 and routing.final_lambda == 0.01
    assert routing.beta_u.shape == (5,) and routing.beta_a.shape == (5,)
