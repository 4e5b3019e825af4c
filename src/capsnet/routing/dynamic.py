"""Dynamic routing by agreement: Procedure 1 of Sabour, Frosst, Hinton (2017).

Each lower capsule i splits its output among the upper capsules j with
coupling coefficients c[i, :] = softmax(b[i, :]) over j; the logits b grow by
the agreement u_hat[j|i] . v[j]. The loop runs in float32 with autocast off
(softmax and squash lose too much in half precision). One exception, in the
fused CPU kernel: inference under bfloat16 autocast makes the votes W u from
bfloat16-rounded u and W with float32 sums, as autocast runs a matrix product
(training keeps them float32; docs/performance.md measures the accuracy).

Speed: u_hat is by far the largest tensor of the network ([B, 1152, 10, 16],
94 MB at batch 128 in fp32), and each routing iteration reads it twice, so
the routing is memory traffic (docs/performance.md). It is read as
[batch, n_out, n_in, dim], where both contractions are batched matmuls over
contiguous memory. Two entry points:

- `DynamicRouting.route_transformed(u, W)`, the path `ClassCapsules` takes.
  On a CPU it runs the fused C++ kernel (`capsnet.routing.fused_cpu`,
  `routing.kernel`), which keeps the votes in cache for every iteration.
  Otherwise (`routing.kernel=torch`, a GPU) the votes W_ij u_i are made
  inside one autograd function, a cache-sized
  chunk of lower capsules at a time, straight into that layout. The backward
  keeps the gradient of u_hat factored (one outer product per use of u_hat)
  and expands it chunk by chunk into the gradients of u and W: no full-size
  gradient of u_hat is ever written.
- `DynamicRouting(votes)`: votes given; one layout copy outside autograd,
  and the gradient returned in the caller's own layout.

Both backward passes are written by hand: autograd would write a full-size
gradient of u_hat for every use in every iteration and add them up.
`tests/test_routing.py` checks values and gradients of both against an
explicit-loop reference and autograd, and by gradcheck.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from capsnet.nn.squash import at_least_float32, get_squash
from capsnet.routing import fused_cpu
from capsnet.types import RoutingOutput

KERNELS = ("auto", "cpp", "torch")


def coupling_softmax(b: torch.Tensor, dim: int, leaky: bool) -> torch.Tensor:
    """Softmax over the upper capsules; `leaky` adds a logit fixed at 0 (a sink)."""
    if not leaky:
        return torch.softmax(b, dim)
    sink = torch.zeros_like(b.narrow(dim, 0, 1))
    return torch.softmax(torch.cat([b, sink], dim), dim).narrow(dim, 0, b.shape[dim])


def _squash_vjp(squash, s: torch.Tensor, grad_v: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        s = s.detach().requires_grad_(True)
        (grad_s,) = torch.autograd.grad(squash(s), s, grad_v)
    return grad_s


def _agreement(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u [B, J, I, D] . v [B, J, D] -> [B, J, I], written as v @ u^T: a row times a transposed
    matrix runs ~3x faster in CPU BLAS than the equivalent matrix-vector product u @ v."""
    return torch.matmul(v.unsqueeze(2), u.transpose(-1, -2)).squeeze(2)


def _outer_sum(a: torch.Tensor, g: torch.Tensor, shape, stride, chunks: int = 8) -> torch.Tensor:
    """grad[b, i, j, :] = sum_k a[b, j, i, k] g[b, j, k, :], written into a [B, I, J, D] tensor laid out
    like u_hat was (`stride`), a chunk of lower capsules at a time: no full-size temporary."""
    try:
        out = torch.empty_strided(shape, stride, dtype=g.dtype, device=g.device)
    except RuntimeError:
        out = g.new_empty(shape)
    n_in = shape[1]
    step = max(1, -(-n_in // chunks))
    for i0 in range(0, n_in, step):
        out[:, i0:i0 + step].copy_(torch.matmul(a[:, :, i0:i0 + step], g).transpose(1, 2))
    return out


def _route(u: torch.Tensor, bias, iters: int, squash, leaky: bool):
    """Procedure 1's loop on u_hat read as u [B, J, I, D]: (v, c of the last iteration, every c, every s)."""
    bsz, n_out, n_in, _ = u.shape
    b = u.new_zeros(bsz, n_out, n_in)
    cs, ss = [], []
    for r in range(iters):
        c = coupling_softmax(b, 1, leaky)  # over the upper capsules j
        s = torch.matmul(c.unsqueeze(2), u).squeeze(2)  # sum_i c_ij u_hat_j|i  [B, J, D]
        if bias is not None:
            s = s + bias
        v = squash(s)
        cs.append(c)
        ss.append(s)
        if r < iters - 1:
            b = b + _agreement(u, v)
    return v, c, cs, ss


def _route_backward(u, cs, ss, grad_v, grad_c, squash, detach: bool, has_bias: bool):
    """The routing loop run backwards. The gradient with respect to u_hat is a sum of outer products,
    grad[b, j, i, :] = sum_k left[b, j, i, k] right[b, j, k, :]; it is returned as those two factors
    (left [B, J, I, K], right [B, J, K, D]) for the caller to expand in the layout it needs, with the
    gradient of the bias on s (or None)."""
    iters = len(cs)
    left, right = [], []
    grad_bias = torch.zeros_like(ss[0][0]) if has_bias else None
    gb_next = None  # gradient w.r.t. b_{r+1}
    for r in reversed(range(iters)):
        if r == iters - 1:
            gv = grad_v if grad_v is not None else torch.zeros_like(ss[r])
        else:  # b_{r+1} = b_r + u . v_r
            gv = torch.matmul(gb_next.unsqueeze(2), u).squeeze(2)
            if not detach:
                left.append(gb_next)
                right.append(squash(ss[r]))
        gs = _squash_vjp(squash, ss[r], gv)
        if grad_bias is not None:
            grad_bias += gs.sum(0)
        if r == iters - 1 or not detach:
            left.append(cs[r])
            right.append(gs)
        if r == 0:  # b_0 = 0 is a constant: nothing flows through the first couplings
            break
        gc = _agreement(u, gs)
        if r == iters - 1 and grad_c is not None:
            gc = gc + grad_c
        c = cs[r]
        gb = c * (gc - (c * gc).sum(1, keepdim=True))  # softmax backward (leaky too: the sink has no grad)
        gb_next = gb if gb_next is None else gb + gb_next
    return torch.stack(left, -1), torch.stack(right, 2), grad_bias


def _route_and_save(ctx, u, inputs: tuple, bias, iters, squash, leaky, detach, record):
    """Both functions' forward once the votes u [B, J, I, D] are in place: the loop, the optional
    recording, and what the backward needs (u, the function's own `inputs`, every c and s)."""
    v, c, cs, ss = _route(u, bias, iters, squash, leaky)
    if record is not None:
        record.extend(x.detach().transpose(1, 2) for x in cs)
    ctx.save_for_backward(u, *inputs, *cs, *ss)
    ctx.n_inputs, ctx.iters, ctx.squash = len(inputs), iters, squash
    ctx.has_bias, ctx.detach = bias is not None, detach
    return v, c


def _backward_factors(ctx, grad_v, grad_c):
    """(the saved `inputs`, left, right, gradient of the bias): `_route_backward` on what was saved."""
    u, *saved = ctx.saved_tensors
    inputs, saved = saved[:ctx.n_inputs], saved[ctx.n_inputs:]
    cs, ss = saved[:ctx.iters], saved[ctx.iters:]
    return (inputs, *_route_backward(u, cs, ss, grad_v, grad_c, ctx.squash, ctx.detach, ctx.has_bias))


class _RoutingFunction(torch.autograd.Function):
    """Routing on given votes u_hat [B, I, J, D] with a hand-written backward.

    u_hat is read as [B, J, I, D]; the one copy that layout may need happens
    here, outside autograd. The gradient is returned in u_hat's own memory
    layout, filled chunk by chunk, so autograd needs no full-size copy of it on
    the way back.
    """

    @staticmethod
    def forward(ctx, u_hat, bias, iters, squash, leaky, detach_intermediate, record):
        u = u_hat.transpose(1, 2).contiguous()  # [B, J, I, D]: the one copy of u_hat
        ctx.in_shape, ctx.in_stride = u_hat.shape, u_hat.stride()
        return _route_and_save(ctx, u, (), bias, iters, squash, leaky, detach_intermediate, record)

    @staticmethod
    def backward(ctx, grad_v, grad_c):
        _, left, right, grad_bias = _backward_factors(ctx, grad_v, grad_c)
        grad_u = _outer_sum(left, right, ctx.in_shape, ctx.in_stride) if ctx.needs_input_grad[0] else None
        return grad_u, grad_bias, None, None, None, None, None


def _chunk_size(n_in: int, row_elements: int, target: int = 2 ** 19) -> int:
    """Lower capsules per chunk so that a chunk's votes ([chunk, B, J*D]) stay in a CPU's cache (~2 MB in
    float32). A GPU takes them all at once: there, each chunk would cost kernel launches, not cache."""
    return max(1, min(n_in, target // max(row_elements, 1)))


def _chunk(u: torch.Tensor, row_elements: int) -> int:
    n_in = u.shape[1]
    return _chunk_size(n_in, row_elements) if u.device.type == "cpu" else n_in


def _votes(u: torch.Tensor, weight: torch.Tensor, n_out: int) -> torch.Tensor:
    """u_hat = W_ij u_i for u [B, I, K] and weight [I, K, J*D], laid out as [B, J, I, D] for the routing.

    One batched matmul per chunk of lower capsules, each chunk moved into place while it is still in
    cache: cheaper than one matmul for all and a transposing copy of the 94 MB result (MNIST, batch 128).
    """
    bsz, n_in, _ = u.shape
    dim = weight.shape[-1] // n_out
    u_t = u.transpose(0, 1)  # [I, B, K]
    out = u.new_empty(bsz, n_out, n_in, dim)
    step = _chunk(u, bsz * n_out * dim)
    for i0 in range(0, n_in, step):
        part = torch.bmm(u_t[i0:i0 + step], weight[i0:i0 + step])  # [chunk, B, J*D]
        out[:, :, i0:i0 + step].copy_(part.view(-1, bsz, n_out, dim).permute(1, 2, 0, 3))
    return out


def _transform_backward(left, right, u, weight, need_u: bool, need_w: bool):
    """Gradients of u [B, I, K] and weight [I, K, J*D] from the routing's factors (`_route_backward`).

    The gradient of u_hat is never formed whole: a chunk of lower capsules at a time it is expanded
    from the factors, in cache, and at once multiplied into both gradients.
    """
    bsz, n_out, n_in, _ = left.shape
    dim = right.shape[-1]
    u_t = u.transpose(0, 1)  # [I, B, K]
    grad_u_t = u.new_empty(n_in, bsz, u.shape[-1]) if need_u else None
    grad_w = torch.empty_like(weight) if need_w else None
    step = _chunk(u, bsz * n_out * dim)
    for i0 in range(0, n_in, step):
        g = torch.matmul(left[:, :, i0:i0 + step], right)  # [B, J, chunk, D]
        g = g.permute(2, 0, 1, 3).reshape(-1, bsz, n_out * dim)  # [chunk, B, J*D]
        if need_w:
            torch.bmm(u_t[i0:i0 + step].transpose(1, 2), g, out=grad_w[i0:i0 + step])
        if need_u:
            torch.bmm(g, weight[i0:i0 + step].transpose(1, 2), out=grad_u_t[i0:i0 + step])
    return (grad_u_t.transpose(0, 1) if need_u else None), grad_w


class _TransformRoutingFunction(torch.autograd.Function):
    """u_hat = W u and the routing in one function: ClassCapsules' fast path.

    Forward: the votes are made chunk by chunk straight into the routing's
    layout. Backward: the routing's gradient stays factored (one outer product
    per use of u_hat) and is expanded a chunk at a time into the gradients of u
    and W, so no full-size gradient of u_hat is ever written or read.
    `tests/test_routing.py` checks values and gradients against autograd.
    """

    @staticmethod
    def forward(ctx, u_in, weight, bias, n_out, iters, squash, leaky, detach_intermediate, record):
        u = _votes(u_in, weight, n_out)
        return _route_and_save(ctx, u, (u_in, weight), bias, iters, squash, leaky, detach_intermediate, record)

    @staticmethod
    def backward(ctx, grad_v, grad_c):
        (u_in, weight), left, right, grad_bias = _backward_factors(ctx, grad_v, grad_c)
        grad_u, grad_w = _transform_backward(left, right, u_in, weight, *ctx.needs_input_grad[:2])
        return grad_u, grad_w, grad_bias, None, None, None, None, None, None


class DynamicRouting(nn.Module):
    """Routing between two capsule layers; no trainable parameters of its own.

    Args:
        iters: routing iterations r (paper: 3). 1 gives uniform couplings.
        squash: squash variant applied to s (see `capsnet.nn.squash`).
        detach_intermediate: stop gradients through u_hat in all but the last
            iteration, as many re-implementations do (off: the paper's maths).
        leaky: leaky routing, an extra "none of the above" logit fixed at 0
            (the paper uses it on CIFAR-10); couplings then sum to < 1.
        kernel: how `route_transformed` runs on a CPU: "cpp", the fused C++
            kernel (`capsnet.routing.fused_cpu`, compiled on first use);
            "torch", PyTorch operations (this file); "auto", the kernel where
            it builds, else PyTorch with a warning. Same maths; on a GPU,
            always PyTorch.

    Set `record = True` to keep the couplings of every iteration in
    `self.recorded["couplings"]` (detached, each [batch, n_in, n_out]) for
    logging; when nobody asks, nothing is kept.
    """

    def __init__(self, iters: int = 3, squash: str = "paper",
                 detach_intermediate: bool = False, leaky: bool = False, kernel: str = "auto", **sizes):
        super().__init__()  # `sizes` (in_capsules, out_capsules, out_dim): dynamic routing needs none
        if int(iters) != iters or iters < 1:
            raise ValueError(f"routing iters must be a whole number >= 1, got {iters!r}")
        kernel = getattr(kernel, "value", kernel)  # the schema's enum, or a plain string
        if kernel not in KERNELS:
            raise ValueError(f"routing kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.iters, self.squash_name = int(iters), squash
        self.squash = get_squash(squash)
        self.detach_intermediate, self.leaky = detach_intermediate, leaky
        self.record = False
        self.recorded: dict = {}

    def forward(self, votes: torch.Tensor, activations: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, transform: tuple | None = None) -> RoutingOutput:
        """votes u_hat [batch, n_in, n_out, dim] -> RoutingOutput(v [batch, n_out, dim], |v|, c [batch, n_in, n_out]).

        Input activations are not used: in Procedure 1 a lower capsule's length
        already scales its votes. `transform` = (u, weight), the votes' own
        inputs: given, the routing runs from them as `route_transformed` does
        (the votes then serve only hooks that read them, as the diagnostics do).
        """
        if transform is not None:
            return self.route_transformed(*transform, votes.shape[2], bias=bias)
        with torch.autocast(votes.device.type, enabled=False):
            u_hat = at_least_float32(votes)
            return self._run_function(_RoutingFunction.apply, u_hat, self._bias(bias, u_hat.dtype))

    def route_transformed(self, u: torch.Tensor, weight: torch.Tensor, n_out: int,
                          bias: torch.Tensor | None = None) -> RoutingOutput:
        """The same routing of the votes u_hat[j|i] = W_ij u_i, given u [batch, n_in, in_dim] and
        weight [n_in, in_dim, n_out * dim] instead of the votes (`ClassCapsules` calls this): the votes
        are made and their gradient taken inside one function, with no full-size intermediate."""
        bf16 = torch.is_autocast_enabled(u.device.type) and torch.get_autocast_dtype(u.device.type) == torch.bfloat16
        with torch.autocast(u.device.type, enabled=False):
            dtype = torch.promote_types(at_least_float32(u).dtype, at_least_float32(weight).dtype)
            inputs = (u.to(dtype), weight.to(dtype), self._bias(bias, dtype), n_out)
            if self._fused(u.device):
                fused = partial(fused_cpu.fused_routing, bf16=bf16)
                return self._run_function(fused, *inputs, squash=self.squash_name)
            return self._run_function(_TransformRoutingFunction.apply, *inputs)

    def _fused(self, device: torch.device) -> bool:
        """Whether `route_transformed` runs the fused C++ kernel (`kernel`, on a CPU)."""
        return fused_cpu.use_kernel(self.kernel, device)

    @staticmethod
    def _bias(bias, dtype):
        return None if bias is None else bias.to(dtype)

    def _run_function(self, apply, *inputs, squash=None) -> RoutingOutput:
        couplings: list | None = [] if self.record else None
        squash = self.squash if squash is None else squash
        v, c = apply(*inputs, self.iters, squash, self.leaky, self.detach_intermediate, couplings)
        self.recorded = {"couplings": couplings} if self.record else {}
        lengths = torch.sqrt(v.square().sum(-1) + 1e-12)
        return RoutingOutput(v, lengths, c.transpose(1, 2))

    def extra_repr(self) -> str:
        return (f"iters={self.iters}, squash={self.squash_name!r}, "
                f"detach_intermediate={self.detach_intermediate}, leaky={self.leaky}, kernel={self.kernel!r}")
