"""Self-attention routing (SPEC 7.2) and inverted dot-product attention routing (SPEC 7.3):
values and gradients against explicit float64 loops, and the invariants SPEC lists."""

import math

import pytest
import torch

from capsnet.errors import CapsnetError
from capsnet.nn.idpa_capsules import IDPAClassCapsules, IDPAConvCapsules, route_capsule_layers
from capsnet.routing.inverted_dot_product import InvertedDotProductRouting
from capsnet.routing.self_attention import SelfAttentionRouting, self_attention_agreement


# ---------------------------------------------------------------- slow, obviously correct references

def _softmax(xs):
    m = max(float(x.detach()) for x in xs)
    e = [torch.exp(x - m) for x in xs]
    z = sum(e)
    return [x / z for x in e]


def ref_self_attention(u, prior):
    """Eq. 4-6 with the Gram form, one sample / capsule pair at a time (float64)."""
    bsz, n_in, n_out, dim = u.shape
    vs, cs = [], []
    for b in range(bsz):
        a = [[sum((u[b, i, j] * u[b, k, j]).sum() for k in range(n_in)) / math.sqrt(dim) for j in range(n_out)]
             for i in range(n_in)]
        c = [_softmax(a[i]) for i in range(n_in)]
        v = []
        for j in range(n_out):
            s = sum(u[b, i, j] * (c[i][j] + prior[j, i]) for i in range(n_in))
            n = torch.sqrt((s * s).sum())
            v.append((1 - torch.exp(-n)) * s / n)
        vs.append(torch.stack(v))
        cs.append(torch.stack([torch.stack(row) for row in c]))
    return torch.stack(vs), torch.stack(cs)


def _layer_norm(s, gain, bias, eps=1e-5):
    mean = s.mean()
    var = ((s - mean) ** 2).mean()
    return (s - mean) / torch.sqrt(var + eps) * gain + bias


def ref_idpa_step(u, parents, gain, bias):
    """One iteration of Procedure 1 for votes u [B, I, J, D] (float64 loops); parents None = zeros."""
    bsz, n_in, n_out, dim = u.shape
    ps, rs = [], []
    for b in range(bsz):
        r = []
        for i in range(n_in):
            if parents is None:
                a = [u.new_zeros(()) for _ in range(n_out)]
            else:
                a = [(parents[b, j] * u[b, i, j]).sum() / math.sqrt(dim) for j in range(n_out)]
            r.append(_softmax(a))
        p = [_layer_norm(sum(r[i][j] * u[b, i, j] for i in range(n_in)), gain, bias) for j in range(n_out)]
        ps.append(torch.stack(p))
        rs.append(torch.stack([torch.stack(row) for row in r]))
    return torch.stack(ps), torch.stack(rs)


def ref_idpa(u, iters, gain, bias):
    p = None
    for _ in range(iters):
        p, r = ref_idpa_step(u, p, gain, bias)
    return p, r


# ---------------------------------------------------------------- self-attention routing

def _sa(n_in=5, n_out=3, dim=4, prior_scale=0.1):
    routing = SelfAttentionRouting(in_capsules=n_in, out_capsules=n_out, out_dim=dim).double()
    with torch.no_grad():
        routing.prior.normal_(0, prior_scale)
    return routing


def test_self_attention_values_and_gradients_match_explicit_loops():
    routing = _sa()
    u = (torch.randn(2, 5, 3, 4, dtype=torch.float64) * 0.7).requires_grad_(True)
    out = routing(u)
    v_ref, c_ref = ref_self_attention(u, routing.prior)
    torch.testing.assert_close(out.poses, v_ref)
    torch.testing.assert_close(out.couplings, c_ref)
    torch.testing.assert_close(out.activations, v_ref.norm(dim=-1))
    w = torch.randn_like(v_ref)
    g_fast = torch.autograd.grad((out.poses * w).sum(), [u, routing.prior])
    g_ref = torch.autograd.grad((v_ref * w).sum(), [u, routing.prior])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)


def test_self_attention_linear_form_equals_gram_form():
    u = torch.randn(3, 7, 4, 6, dtype=torch.float64)
    gram = torch.einsum("bijd,bkjd->bij", u, u) / math.sqrt(6)
    torch.testing.assert_close(self_attention_agreement(u), gram)


def test_self_attention_couplings_sum_to_one_over_outputs_and_prior_starts_at_zero():
    routing = SelfAttentionRouting(in_capsules=16, out_capsules=10, out_dim=16)
    assert torch.equal(routing.prior, torch.zeros(10, 16))
    out = routing(torch.randn(4, 16, 10, 16))
    torch.testing.assert_close(out.couplings.sum(-1), torch.ones(4, 16))
    assert out.poses.shape == (4, 10, 16) and out.activations.shape == (4, 10)
    assert ((out.activations >= 0) & (out.activations < 1)).all()


def test_self_attention_is_invariant_to_permuting_inputs_with_their_prior():
    routing = _sa(n_in=6)
    u = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    perm = torch.randperm(6)
    v = routing(u).poses
    permuted = SelfAttentionRouting(in_capsules=6, out_capsules=3, out_dim=4).double()
    with torch.no_grad():
        permuted.prior.copy_(routing.prior[:, perm])
    torch.testing.assert_close(permuted(u[:, perm]).poses, v)


def test_self_attention_identical_transforms_over_outputs_give_uniform_couplings():
    votes = torch.randn(3, 5, 1, 4).expand(3, 5, 7, 4)  # W_{n,i} the same for every output n
    c = SelfAttentionRouting(in_capsules=5, out_capsules=7)(votes).couplings
    torch.testing.assert_close(c, torch.full_like(c, 1 / 7))


def test_self_attention_runs_in_float32_under_autocast_and_records():
    routing = SelfAttentionRouting(in_capsules=5, out_capsules=3)
    assert routing(torch.randn(2, 5, 3, 4)).poses.dtype == torch.float32 and routing.recorded == {}
    routing.record = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = routing(torch.randn(2, 5, 3, 4).bfloat16())
    assert out.poses.dtype == torch.float32 and torch.isfinite(out.poses).all()
    (c,) = routing.recorded["couplings"]
    assert c.shape == (2, 5, 3) and not c.requires_grad


def test_self_attention_bad_input_raises_one_line_error():
    with pytest.raises(CapsnetError, match="votes"):
        SelfAttentionRouting(in_capsules=5, out_capsules=3)(torch.randn(2, 4, 3, 4))
    with pytest.raises(CapsnetError, match="in_capsules"):
        SelfAttentionRouting(in_capsules=0, out_capsules=3)


# ---------------------------------------------------------------- inverted dot-product routing

def _idpa(iters, dim=4, random_affine=True):
    routing = InvertedDotProductRouting(iters=iters, out_dim=dim).double()
    if random_affine:
        with torch.no_grad():
            routing.norm.weight.normal_(1, 0.2)
            routing.norm.bias.normal_(0, 0.2)
    return routing


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_idpa_values_and_gradients_match_explicit_loops(iters):
    routing = _idpa(iters)
    u = torch.randn(2, 5, 3, 4, dtype=torch.float64).requires_grad_(True)
    out = routing(u)
    p_ref, r_ref = ref_idpa(u, iters, routing.norm.weight, routing.norm.bias)
    torch.testing.assert_close(out.poses, p_ref)
    torch.testing.assert_close(out.couplings, r_ref)
    w = torch.randn_like(p_ref)
    params = [u, routing.norm.weight, routing.norm.bias]
    for a, b in zip(torch.autograd.grad((out.poses * w).sum(), params), torch.autograd.grad((p_ref * w).sum(), params)):
        torch.testing.assert_close(a, b)


def test_idpa_first_iteration_is_uniform_and_couplings_sum_to_one():
    routing = InvertedDotProductRouting(iters=3, out_dim=8)
    routing.record = True
    out = routing(torch.randn(4, 20, 6, 8))
    first = routing.recorded["couplings"][0]
    torch.testing.assert_close(first, torch.full_like(first, 1 / 6))
    assert len(routing.recorded["couplings"]) == 3
    torch.testing.assert_close(out.couplings.sum(-1), torch.ones(4, 20))
    torch.testing.assert_close(out.activations.sum(-1), torch.ones(4))
    assert not torch.allclose(out.couplings, torch.full_like(out.couplings, 1 / 6))


def test_idpa_layernorm_output_has_mean_0_variance_1_at_init():
    p = InvertedDotProductRouting(iters=2, out_dim=16)(torch.randn(3, 10, 5, 16) * 3 + 1).poses
    torch.testing.assert_close(p.mean(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3, rtol=0)


def test_idpa_scaling_the_first_iterations_votes_leaves_the_output_unchanged():
    routing = InvertedDotProductRouting(iters=1, out_dim=8, eps=1e-12).double()  # exact up to LayerNorm's eps
    u = torch.randn(2, 9, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(routing(u * 7.5).poses, routing(u).poses)


def test_idpa_bad_config_raises_one_line_error():
    with pytest.raises(CapsnetError, match="iters"):
        InvertedDotProductRouting(iters=0)
    with pytest.raises(CapsnetError, match="out_dim"):
        InvertedDotProductRouting(iters=2, out_dim=4)(torch.randn(1, 3, 2, 5))


# ---------------------------------------------------------------- convolutional capsules

def ref_conv_votes(x, weight, k, s, matrix_pose):
    """Explicit loops: votes [B, H', W', K*K*N, M, D] of the children in each receptive field."""
    bsz, n, h, w, d = x.shape
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    out = []
    for b in range(bsz):
        rows = []
        for y in range(ho):
            cols = []
            for xx in range(wo):
                children = []
                for kk in range(k):
                    for ll in range(k):
                        for c in range(n):
                            idx = (kk * k + ll) * n + c
                            pose = x[b, c, y * s + kk, xx * s + ll]
                            if matrix_pose:
                                votes = [(weight[idx, m] @ pose.view(4, 4)).flatten() for m in range(weight.shape[1])]
                            else:
                                votes = [pose @ weight[idx, :, m] for m in range(weight.shape[2])]
                            children.append(torch.stack(votes))
                cols.append(torch.stack(children))
            rows.append(torch.stack(cols))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("matrix_pose,stride", [(True, 2), (True, 1), (False, 2)])
def test_conv_capsules_match_per_receptive_field_loops(matrix_pose, stride):
    """Each child routes, within every receptive field that holds it, over that field's parent types."""
    d_in = 16 if matrix_pose else 3
    layer = IDPAConvCapsules(2, d_in, 3, 16 if matrix_pose else 4, kernel_size=3, stride=stride,
                             matrix_pose=matrix_pose, routing=_idpa(2, dim=16 if matrix_pose else 4)).double()
    x = torch.randn(2, 2, 5, 6, d_in, dtype=torch.float64).requires_grad_(True)
    poses, _ = route_capsule_layers([layer], x, iters=2, concurrent=False)
    votes = ref_conv_votes(x, layer.weight, 3, stride, matrix_pose)  # [B, H', W', I, M, D]
    bsz, ho, wo = votes.shape[:3]
    p_ref = ref_idpa(votes.flatten(0, 2), 2, layer.routing.norm.weight, layer.routing.norm.bias)[0]
    p_ref = p_ref.view(bsz, ho, wo, 3, -1).permute(0, 3, 1, 2, 4)
    torch.testing.assert_close(poses, p_ref)
    w = torch.randn_like(p_ref)
    params = [x, layer.weight]
    for a, b in zip(torch.autograd.grad((poses * w).sum(), params), torch.autograd.grad((p_ref * w).sum(), params)):
        torch.testing.assert_close(a, b)


def test_conv_capsules_are_translation_equivariant():
    layer = IDPAConvCapsules(2, 16, 3, 16, kernel_size=3, stride=1, routing=InvertedDotProductRouting(iters=2))
    x = torch.randn(1, 2, 7, 7, 16)
    full, _ = route_capsule_layers([layer], x, iters=2)
    shifted, _ = route_capsule_layers([layer], x[:, :, 1:, 2:], iters=2)
    torch.testing.assert_close(shifted, full[:, :, 1:, 2:])


# ---------------------------------------------------------------- concurrent vs sequential

def _two_fc_layers():
    torch.manual_seed(1)
    l1 = IDPAClassCapsules(6, 3, 4, 5, matrix_pose=False, routing=_idpa(1, dim=5)).double()
    l2 = IDPAClassCapsules(4, 5, 3, 4, matrix_pose=False, routing=_idpa(1, dim=4)).double()
    return [l1, l2]


def _ref_fc(layer, x, parents):
    votes = torch.einsum("bia,iajd->bijd", x, layer.weight)
    return ref_idpa_step(votes, parents, layer.routing.norm.weight, layer.routing.norm.bias)[0]


def ref_concurrent(layers, x, iters):
    """Section 2.2 written out for two layers: each iteration updates both from the previous iteration's states."""
    p1 = _ref_fc(layers[0], x, None)
    p2 = _ref_fc(layers[1], p1, None)
    for _ in range(iters - 1):
        p1, p2 = _ref_fc(layers[0], x, p1), _ref_fc(layers[1], p1, p2)
    return p2


def ref_sequential(layers, x, iters):
    for layer in layers:
        p = None
        for _ in range(iters):
            p = _ref_fc(layer, x, p)
        x = p
    return x


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_concurrent_and_sequential_routing_match_hand_written_references(iters):
    layers = _two_fc_layers()
    x = torch.randn(3, 6, 3, dtype=torch.float64).requires_grad_(True)
    conc, _ = route_capsule_layers(layers, x, iters, concurrent=True)
    seq, _ = route_capsule_layers(layers, x, iters, concurrent=False)
    ref_c, ref_s = ref_concurrent(layers, x, iters), ref_sequential(layers, x, iters)
    torch.testing.assert_close(conc, ref_c)
    torch.testing.assert_close(seq, ref_s)
    w = torch.randn_like(conc)
    params = [x, layers[0].weight, layers[1].weight]
    for a, b in zip(torch.autograd.grad((conc * w).sum(), params), torch.autograd.grad((ref_c * w).sum(), params)):
        torch.testing.assert_close(a, b)
    if iters == 1:  # both are the feed-forward pass with uniform routing
        ff = _ref_fc(layers[1], _ref_fc(layers[0], x, None), None)
        torch.testing.assert_close(conc, ff)
        torch.testing.assert_close(seq, ff)
    else:
        assert not torch.allclose(conc, seq, atol=1e-4)


def test_route_capsule_layers_returns_the_top_layers_couplings_per_iteration():
    layers = _two_fc_layers()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    for concurrent in (True, False):
        _, couplings = route_capsule_layers(layers, x, 3, concurrent=concurrent)
        assert len(couplings) == 3 and couplings[0].shape == (2, 4, 3)
        torch.testing.assert_close(couplings[0], torch.full_like(couplings[0], 1 / 3))
