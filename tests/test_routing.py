import math

import pytest
import torch

from capsnet.nn.capsules import ClassCapsules
from capsnet.routing.dynamic import DynamicRouting


def reference_routing(u_hat, iters, leaky=False, bias=None):
    """Procedure 1 with explicit loops over the batch, lower and upper capsules (float64)."""
    u_hat = u_hat.double()
    bsz, n_in, n_out, dim = u_hat.shape
    v_all = torch.zeros(bsz, n_out, dim, dtype=torch.float64)
    c_all = torch.zeros(bsz, n_in, n_out, dtype=torch.float64)
    for n in range(bsz):
        b = [[0.0] * n_out for _ in range(n_in)]
        for _ in range(iters):
            c = []
            for i in range(n_in):
                e = [math.exp(b[i][j]) for j in range(n_out)]
                z = sum(e) + (1.0 if leaky else 0.0)
                c.append([e[j] / z for j in range(n_out)])
            v = []
            for j in range(n_out):
                s = sum(c[i][j] * u_hat[n, i, j] for i in range(n_in))
                if bias is not None:
                    s = s + bias[j].double()
                sq = float((s * s).sum())
                v.append(s * (sq / (1 + sq)) / math.sqrt(sq) if sq > 0 else s * 0)
            for i in range(n_in):
                for j in range(n_out):
                    b[i][j] += float((u_hat[n, i, j] * v[j]).sum())
        v_all[n] = torch.stack(v)
        c_all[n] = torch.tensor(c, dtype=torch.float64)
    return v_all, c_all


@pytest.mark.parametrize("iters", [1, 2, 3, 4, 5])
def test_matches_explicit_loop_reference(iters):
    u_hat = torch.randn(3, 7, 4, 5) * 0.5
    v, _, c = DynamicRouting(iters)(u_hat)
    v_ref, c_ref = reference_routing(u_hat, iters)
    torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.double(), c_ref, rtol=1e-5, atol=1e-6)


def test_leaky_and_bias_match_reference():
    u_hat, bias = torch.randn(2, 6, 3, 4), torch.randn(3, 4) * 0.1
    v, _, c = DynamicRouting(3, leaky=True)(u_hat, bias=bias)
    v_ref, c_ref = reference_routing(u_hat, 3, leaky=True, bias=bias)
    torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.double(), c_ref, rtol=1e-5, atol=1e-6)
    assert (c.sum(-1) < 1).all()


@pytest.mark.parametrize("iters", [1, 3, 5])
def test_couplings_sum_to_one_over_upper_capsules(iters):
    _, _, c = DynamicRouting(iters)(torch.randn(4, 50, 10, 16))
    torch.testing.assert_close(c.sum(-1), torch.ones(4, 50))


def test_one_iteration_gives_uniform_couplings():
    _, _, c = DynamicRouting(1)(torch.randn(2, 30, 10, 8))
    torch.testing.assert_close(c, torch.full_like(c, 0.1))


def test_later_iterations_move_couplings_away_from_uniform():
    _, _, c = DynamicRouting(3)(torch.randn(2, 30, 10, 8))
    assert (c - 0.1).abs().max() > 1e-3


def test_record_keeps_every_iteration_and_the_last_is_returned():
    routing = DynamicRouting(4)
    routing.record = True
    _, lengths, c = routing(torch.randn(2, 9, 5, 3))
    assert len(routing.recorded["couplings"]) == 4
    torch.testing.assert_close(routing.recorded["couplings"][-1], c.detach())
    routing.record = False
    routing(torch.randn(2, 9, 5, 3))
    assert routing.recorded == {}


def test_detach_intermediate_changes_gradients_not_values():
    u = torch.randn(2, 9, 5, 3, requires_grad=True)
    v_full = DynamicRouting(3)(u).poses
    g_full, = torch.autograd.grad(v_full.square().sum(), u)
    v_det = DynamicRouting(3, detach_intermediate=True)(u).poses
    g_det, = torch.autograd.grad(v_det.square().sum(), u)
    torch.testing.assert_close(v_full, v_det)
    assert not torch.allclose(g_full, g_det)


def test_routing_runs_in_float32_under_bf16_autocast():
    u = torch.randn(2, 9, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, _, c = DynamicRouting(3)(u.bfloat16())
    assert v.dtype == c.dtype == torch.float32
    torch.testing.assert_close(c.sum(-1), torch.ones(2, 9))


def test_iters_must_be_positive():
    with pytest.raises(ValueError, match="iters"):
        DynamicRouting(0)


def test_class_capsule_predictions_match_explicit_products():
    layer = ClassCapsules(in_capsules=6, in_dim=4, out_capsules=3, out_dim=5, init_std=1.0)
    u = torch.randn(2, 6, 4)
    u_hat = layer.predictions(u)
    w = layer.weight.view(6, 4, 3, 5)
    for n in range(2):
        for i in range(6):
            for j in range(3):
                torch.testing.assert_close(u_hat[n, i, j], u[n, i] @ w[i, :, j, :])


def test_shared_transform_uses_one_matrix_for_all_inputs():
    layer = ClassCapsules(in_capsules=6, in_dim=4, out_capsules=3, out_dim=5, shared_transform=True)
    assert layer.weight.shape == (1, 4, 15)
    u = torch.randn(2, 6, 4)
    u_hat = layer.predictions(u)
    torch.testing.assert_close(u_hat[1, 2], (u[1, 2] @ layer.weight[0]).view(3, 5))


def autograd_routing(u_hat, iters, leaky=False, bias=None, detach_intermediate=False, squash=None):
    """Procedure 1 in plain differentiable torch ops on u_hat [B, I, J, D]: the gradient reference for the
    hand-written backward (and the fused kernel's); (v, c [B, I, J]). `squash`: the paper's by default."""
    if squash is None:
        from capsnet.nn.squash import squash

    u_mid = u_hat.detach() if detach_intermediate else u_hat
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype)
    for r in range(iters):
        uu = u_hat if r == iters - 1 else u_mid
        logits = torch.cat([b, torch.zeros_like(b[..., :1])], -1) if leaky else b
        c = torch.softmax(logits, -1)[..., : b.shape[-1]]
        s = (c.unsqueeze(-1) * uu).sum(1)
        v = squash(s + bias if bias is not None else s)
        if r < iters - 1:
            b = b + (uu * v.unsqueeze(1)).sum(-1)
    return v, c


@pytest.mark.parametrize("iters", [1, 2, 3, 5])
@pytest.mark.parametrize("leaky, with_bias, detach", [(False, False, False), (True, False, False),
                                                      (False, True, False), (False, False, True),
                                                      (True, True, True)])
def test_hand_written_backward_matches_autograd(iters, leaky, with_bias, detach):
    u = (torch.randn(3, 11, 4, 5, dtype=torch.float64) * 0.7).requires_grad_(True)
    bias = (torch.randn(4, 5, dtype=torch.float64) * 0.1).requires_grad_(True) if with_bias else None
    gv, gc = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 11, 4, dtype=torch.float64)
    v, _, c = DynamicRouting(iters, leaky=leaky, detach_intermediate=detach)(u, bias=bias)
    ins = [u] + ([bias] if with_bias else [])
    fast = torch.autograd.grad((v.double() * gv).sum() + (c.double() * gc).sum(), ins)
    v_ref, c_ref = autograd_routing(u, iters, leaky, bias, detach)
    torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-6)
    slow = torch.autograd.grad((v_ref * gv).sum() + (c_ref * gc).sum(), ins)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_the_autograd_reference_matches_the_explicit_loop():
    u, bias = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64) * 0.1
    for leaky in (False, True):
        v, c = autograd_routing(u, 3, leaky, bias)
        v_ref, c_ref = reference_routing(u, 3, leaky, bias)
        torch.testing.assert_close(v, v_ref)
        torch.testing.assert_close(c, c_ref)


def test_gradcheck_in_float64():
    from capsnet.routing.dynamic import _RoutingFunction
    from capsnet.nn.squash import squash

    u = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)  # [B, I, J, D]
    bias = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda u, b: _RoutingFunction.apply(u, b, 3, squash, False, False, None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (u, bias))


def test_naive_reference_matches_the_explicit_loop():
    from capsnet.routing.naive import naive_routing

    u_hat = torch.randn(2, 7, 4, 5)
    v, c = naive_routing(u_hat, 3)
    v_ref, c_ref = reference_routing(u_hat, 3)
    torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.double(), c_ref, rtol=1e-5, atol=1e-6)


def test_naive_class_capsules_equal_the_fast_ones():
    from capsnet.routing.naive import NaiveClassCapsules

    layer = ClassCapsules(in_capsules=20, in_dim=8, out_capsules=10, out_dim=16, init_std=0.1)
    u = torch.randn(3, 20, 8)
    v_fast, _, c_fast = layer(u)
    v_naive, _, c_naive = NaiveClassCapsules(layer)(u)
    torch.testing.assert_close(v_fast, v_naive, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c_fast, c_naive, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("leaky, with_bias, detach", [(False, False, False), (True, False, False),
                                                      (False, True, False), (False, False, True),
                                                      (True, True, True)])
def test_class_capsules_fast_path_matches_autograd_on_explicit_votes(monkeypatch, iters, leaky, with_bias, detach):
    """ClassCapsules makes the votes inside the routing function (chunked forward, factored backward):
    values and gradients of u, W and the bias equal autograd through explicit products W_ij u_i."""
    from capsnet.routing import dynamic

    monkeypatch.setattr(dynamic, "_chunk_size", lambda n_in, row: 3)  # 11 lower capsules: chunks 3, 3, 3, 2
    routing = DynamicRouting(iters, leaky=leaky, detach_intermediate=detach, kernel="torch")  # the PyTorch path
    layer = ClassCapsules(in_capsules=11, in_dim=3, out_capsules=4, out_dim=5, routing=routing,
                          bias=with_bias, init_std=0.5, bias_init=0.1).double()
    u = torch.randn(3, 11, 3, dtype=torch.float64, requires_grad=True)
    gv, gc = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 11, 4, dtype=torch.float64)
    params = [u, layer.weight] + ([layer.bias] if with_bias else [])

    v, _, c = layer(u)
    fast = torch.autograd.grad((v * gv).sum() + (c * gc).sum(), params)

    w = layer.weight.view(11, 3, 4, 5)
    u_hat = torch.stack([torch.stack([u[:, i] @ w[i, :, j] for j in range(4)], 1) for i in range(11)], 1)
    v_ref, c_ref = autograd_routing(u_hat, iters, leaky, layer.bias, detach)
    slow = torch.autograd.grad((v_ref * gv).sum() + (c_ref * gc).sum(), params)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_class_capsules_fast_path_gradcheck_in_float64(monkeypatch):
    from capsnet.routing import dynamic
    from capsnet.nn.squash import squash

    monkeypatch.setattr(dynamic, "_chunk_size", lambda n_in, row: 2)
    u = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(5, 3, 4 * 2, dtype=torch.float64) * 0.5).requires_grad_(True)
    bias = (torch.randn(4, 2, dtype=torch.float64) * 0.1).requires_grad_(True)
    fn = lambda u, w, b: dynamic._TransformRoutingFunction.apply(u, w, b, 4, 3, squash, False, False, None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (u, w, bias))


@pytest.mark.parametrize("kernel", ["torch", "cpp"])  # the PyTorch path and the fused C++ kernel
def test_class_capsules_fast_path_runs_in_float32_under_bf16_autocast(kernel):
    layer = ClassCapsules(in_capsules=20, in_dim=8, out_capsules=10, out_dim=16, init_std=0.1,
                          routing=DynamicRouting(kernel=kernel))
    u = torch.randn(2, 20, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, _, c = layer(u.bfloat16())
    v_ref, _, c_ref = layer(u.bfloat16().float())
    assert v.dtype == c.dtype == torch.float32
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(c, c_ref)
