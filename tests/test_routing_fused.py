"""The fused C++ routing kernel (capsnet.routing.fused_cpu) against PyTorch references.

References: autograd through explicit products u_hat = W_ij u_i and Procedure 1 in plain torch ops
(float64), and the PyTorch path `_TransformRoutingFunction`, itself checked against the same
autograd reference in test_routing.py. The kernel is built on first use (about 30 s, once).
"""

import warnings

import pytest
import torch

from capsnet.errors import CapsnetError
from capsnet.nn.capsules import ClassCapsules
from capsnet.nn.squash import get_squash
from capsnet.routing import dynamic, fused_cpu
from capsnet.routing.dynamic import DynamicRouting, _TransformRoutingFunction
from capsnet.routing.fused_cpu import FusedRoutingFunction, fused_routing
from test_routing import autograd_routing


def explicit_votes(u, weight, n_out):
    """u_hat[b, i, j] = u[b, i] @ W[i, :, j] with a loop over i and j."""
    w = weight.view(weight.shape[0], weight.shape[1], n_out, -1)
    return torch.stack([torch.stack([u[:, i] @ w[i, :, j] for j in range(n_out)], 1)
                        for i in range(u.shape[1])], 1)


def inputs(bsz=5, n_in=37, in_dim=3, n_out=4, dim=6, with_bias=True, dtype=torch.float64, seed=0):
    """37 lower capsules: two whole tiles of 16 and a padded one; 5 images: uneven blocks per thread."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bsz, n_in, in_dim, generator=g, dtype=dtype)
    weight = torch.randn(n_in, in_dim, n_out * dim, generator=g, dtype=dtype) * 0.4
    bias = torch.randn(n_out, dim, generator=g, dtype=dtype) * 0.1 if with_bias else None
    grads = torch.randn(bsz, n_out, dim, generator=g, dtype=dtype), torch.randn(bsz, n_out, n_in, generator=g, dtype=dtype)
    return u, weight, bias, grads


def value_and_grads(fn, u, weight, bias, grads, with_grad_c=True):
    leaves = [x.detach().clone().requires_grad_(True) for x in (u, weight) + ((bias,) if bias is not None else ())]
    v, c = fn(*leaves) if bias is not None else fn(*leaves, None)
    loss = (v * grads[0]).sum() + ((c * grads[1]).sum() if with_grad_c else 0)
    return [v, c, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("squash", ["paper", "keras", "efficient"])
@pytest.mark.parametrize("leaky, with_bias, detach", [(False, False, False), (True, True, False),
                                                      (False, True, True), (True, False, True)])
def test_fused_matches_autograd_on_explicit_votes(iters, squash, leaky, with_bias, detach):
    """Values and gradients of u, W and the bias (c's gradient included) equal autograd's, float64."""
    u, weight, bias, grads = inputs(with_bias=with_bias)
    fused = value_and_grads(lambda u, w, b: fused_routing(u, w, b, 4, iters, squash, leaky, detach, None),
                            u, weight, bias, grads)
    def reference(u, w, b):
        v, c = autograd_routing(explicit_votes(u, w, 4), iters, leaky, b, detach, squash=get_squash(squash))
        return v, c.transpose(1, 2)

    ref = value_and_grads(reference, u, weight, bias, grads)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("iters, with_grad_c", [(3, False), (3, True), (4, True), (5, False), (7, True)])
def test_fused_equals_the_pytorch_path(iters, with_grad_c):
    """The two implementations `routing.kernel` chooses between agree to rounding, float64; 19 images
    (per thread: a gradient block of 8 and the rest), up to 7 iterations (the kernel's unrolled and general paths)."""
    u, weight, bias, grads = inputs(bsz=19, n_in=48, in_dim=8, n_out=10, dim=16)
    sq = get_squash("paper")
    fused = value_and_grads(lambda u, w, b: fused_routing(u, w, b, 10, iters, "paper", False, False,
                                                                       None), u, weight, bias, grads, with_grad_c)
    torch_path = value_and_grads(lambda u, w, b: _TransformRoutingFunction.apply(u, w, b, 10, iters, sq, False,
                                                                                 False, None),
                                 u, weight, bias, grads, with_grad_c)
    for a, b in zip(fused, torch_path):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_fused_float32_is_as_accurate_as_the_pytorch_path():
    """float32 on the paper's sizes (its own exp in the softmax): as close to float64 as PyTorch's float32."""
    u, weight, bias, grads = inputs(bsz=3, n_in=1152, in_dim=8, n_out=10, dim=16, with_bias=False)
    u = get_squash("paper")(u)  # PrimaryCaps outputs are squashed
    weight = weight * 0.25
    ref = value_and_grads(lambda u, w, b: fused_routing(u, w, b, 10, 3, "paper", False, False, None),
                          u, weight, None, grads)
    sq = get_squash("paper")
    f32 = [x.float() for x in (u, weight)]
    fused = value_and_grads(lambda u, w, b: fused_routing(u, w, b, 10, 3, "paper", False, False, None),
                            *f32, None, tuple(x.float() for x in grads))
    torch_path = value_and_grads(lambda u, w, b: _TransformRoutingFunction.apply(u, w, b, 10, 3, sq, False, False,
                                                                                 None), *f32, None,
                                 tuple(x.float() for x in grads))
    for a, b, r in zip(fused, torch_path, ref):
        err_fused = ((a.double() - r).abs().max() / r.abs().max()).item()
        err_torch = ((b.double() - r).abs().max() / r.abs().max()).item()
        assert err_fused < max(4 * err_torch, 1e-6), (err_fused, err_torch)


def test_fused_gradcheck_in_float64():
    u, weight, bias, _ = inputs(bsz=2, n_in=5, in_dim=3, n_out=3, dim=2)
    ins = tuple(x.requires_grad_(True) for x in (u, weight, bias))
    for leaky in (False, True):
        fn = lambda u, w, b: fused_routing(u, w, b, 3, 3, "paper", leaky, False, None)  # noqa: E731
        assert torch.autograd.gradcheck(fn, ins)


def test_fused_records_every_iteration_like_the_pytorch_path():
    u, weight, bias, _ = inputs()
    fused, torch_path = [], []
    fused_routing(u, weight, bias, 4, 3, "paper", False, False, fused)
    _TransformRoutingFunction.apply(u, weight, bias, 4, 3, get_squash("paper"), False, False, torch_path)
    assert len(fused) == len(torch_path) == 3
    for a, b in zip(fused, torch_path):
        assert a.shape == (5, 37, 4)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_inference_writes_the_last_couplings_only_and_gives_the_same_numbers(monkeypatch):
    """Under no_grad (inference, though W requires a gradient) the kernel keeps the last couplings alone."""
    kernel, kept = fused_cpu.load(), []

    class Spy:
        def forward(self, *args):
            kept.append(args[7])  # keep_all
            return kernel.forward(*args)

    monkeypatch.setattr(fused_cpu, "load", Spy)
    layer = ClassCapsules(37, 3, 4, 6, routing=DynamicRouting(3, kernel="cpp"), init_std=0.3)
    u = inputs(dtype=torch.float32)[0]
    v, _, c = layer(u)
    with torch.no_grad():
        v_inf, _, c_inf = layer(u)
    assert kept == [True, False]
    assert torch.equal(v_inf, v.detach()) and torch.equal(c_inf, c.detach())


def count_fused_calls(monkeypatch):
    calls = []
    apply = FusedRoutingFunction.apply
    monkeypatch.setattr(FusedRoutingFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("kernel, fused", [("auto", True), ("cpp", True), ("torch", False)])
def test_class_capsules_take_the_kernel_the_config_names(monkeypatch, kernel, fused):
    calls = count_fused_calls(monkeypatch)
    layer = ClassCapsules(20, 8, 10, 16, routing=DynamicRouting(3, kernel=kernel), init_std=0.1)
    reference = ClassCapsules(20, 8, 10, 16, routing=DynamicRouting(3, kernel="torch"), init_std=0.1)
    reference.load_state_dict(layer.state_dict())
    u = torch.randn(3, 20, 8)
    v, _, c = layer(u)
    v_ref, _, c_ref = reference(u)
    assert bool(calls) == fused
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-6)


@pytest.fixture
def kernel_unavailable(monkeypatch):
    """As on a machine without a C++ compiler."""
    def refuse():
        raise fused_cpu.KernelUnavailable("CalledProcessError: no compiler")
    monkeypatch.setattr(fused_cpu, "load", refuse)
    fused_cpu.available.cache_clear()
    yield
    fused_cpu.available.cache_clear()


def test_auto_falls_back_to_pytorch_with_one_warning(kernel_unavailable, monkeypatch):
    calls = count_fused_calls(monkeypatch)
    layer = ClassCapsules(20, 8, 10, 16, routing=DynamicRouting(3, kernel="auto"), init_std=0.1)
    unavailable = r"kernel \(routing, PrimaryCaps squash\) is unavailable .*no compiler.*routing.kernel=torch"
    with pytest.warns(UserWarning, match=unavailable):
        layer(torch.randn(2, 20, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 20, 8))  # once is enough
    assert not calls


def test_cpp_refuses_in_one_line_where_the_kernel_cannot_be_built(kernel_unavailable):
    layer = ClassCapsules(20, 8, 10, 16, routing=DynamicRouting(3, kernel="cpp"), init_std=0.1)
    with pytest.raises(CapsnetError, match="routing.kernel=cpp: .*no compiler.*routing.kernel=auto or torch"):
        layer(torch.randn(2, 20, 8))


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="routing kernel must be one of"):
        DynamicRouting(3, kernel="fast")


def test_kernel_is_built_for_this_cpu(monkeypatch):
    """-march=native code must not be loaded on another CPU: the CPU is part of the build's name."""
    assert "-mprefer-vector-width=512" in fused_cpu.compiler_flags("flags : fpu avx512f avx2")
    assert "-mprefer-vector-width=512" not in fused_cpu.compiler_flags("flags : fpu avx2")
    here, _ = fused_cpu.kernel_name()
    assert fused_cpu.load().__name__ == here
    monkeypatch.setattr(fused_cpu, "_cpu_signature", lambda: "model name : another CPU")
    assert fused_cpu.kernel_name()[0] != here


@pytest.mark.parametrize("kernel", ["torch", "cpp"])
def test_recording_changes_no_number(kernel):
    """Diagnostics turn `record` on; the layer then also hands the votes to the routing module (for the
    recorder's hook) but routes from (u, W) as without recording: the same outputs, bit for bit."""
    layer = ClassCapsules(37, 8, 10, 16, routing=DynamicRouting(3, kernel=kernel), init_std=0.1)
    u = torch.randn(3, 37, 8)
    v, _, c = layer(u)
    seen = []
    layer.routing.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    layer.routing.record = True
    v_rec, _, c_rec = layer(u)
    assert torch.equal(v, v_rec) and torch.equal(c, c_rec)
    assert seen == [(3, 37, 10, 16)] and len(layer.routing.recorded["couplings"]) == 3


def bf16_reference(u, weight, n_out, iters, squash):
    """Procedure 1 in float64 on votes made from u and W rounded to bfloat16 (as autocast rounds a matrix
    product's inputs) with exact products and sums: what the kernel's bfloat16 votes approximate to float32."""
    u64, w64 = u.to(torch.bfloat16).double(), weight.to(torch.bfloat16).double()
    return autograd_routing(explicit_votes(u64, w64, n_out), iters, squash=get_squash(squash))


@pytest.mark.parametrize("in_dim", [3, 8])  # an odd K (its last pair padded) and the paper's K = 8
def test_bf16_votes_are_float32_sums_of_bfloat16_products(in_dim):
    """Inference under bf16 autocast: v within float32 rounding of the float64 routing of bfloat16-rounded
    u and W, including values on a rounding tie (1 + 2^-8 rounds to 1, 1 + 3 * 2^-8 up: ties to even)."""
    if not fused_cpu.load().has_bf16_votes():
        pytest.skip("this CPU has no AVX512-BF16: bfloat16 autocast keeps float32 votes")
    u, weight, _, _ = inputs(in_dim=in_dim, dtype=torch.float32)
    u[0, 0, 0], u[1, 2, 0] = 1 + 2 ** -8, 1 + 3 * 2 ** -8
    assert u[0, 0, 0].to(torch.bfloat16) == 1 and u[1, 2, 0].to(torch.bfloat16) == 1 + 2 ** -6
    with torch.no_grad():
        v, c = fused_routing(u, weight, None, 4, 3, "paper", False, False, None, bf16=True)
        v32, _ = fused_routing(u, weight, None, 4, 3, "paper", False, False, None)
    v_ref, c_ref = bf16_reference(u, weight, 4, 3, "paper")
    torch.testing.assert_close(v.double(), v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.double(), c_ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
    assert (v - v32).abs().max() > 1e-6  # the votes were rounded: not the float32 path's numbers


def test_class_capsules_use_bf16_votes_only_for_inference_under_bf16_autocast(monkeypatch):
    """Training keeps float32 votes (its backward takes them again in float32); inference under bfloat16
    autocast asks for bfloat16 votes where the CPU has AVX512-BF16; without autocast, float32."""
    kernel, asked = fused_cpu.load(), []

    class Spy:
        has_bf16_votes = kernel.has_bf16_votes

        def forward(self, *args):
            asked.append(args[8])
            return kernel.forward(*args)

        def backward(self, *args):
            return kernel.backward(*args)

    monkeypatch.setattr(fused_cpu, "load", Spy)
    layer = ClassCapsules(37, 8, 4, 6, routing=DynamicRouting(3, kernel="cpp"), init_std=0.3)
    u = torch.randn(2, 37, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(u)[0].sum().backward()
        with torch.no_grad():
            layer(u)
    with torch.no_grad():
        layer(u)
    assert asked == [False, kernel.has_bf16_votes(), False]
