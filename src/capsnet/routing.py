"""Dynamic routing by agreement: Procedure 1 of Sabour, Frosst, Hinton (2017).

Each lower capsule i splits its output among the upper capsules j with
coupling coefficients c[i, :] = softmax(b[i, :]) over j; the logits b grow by
the agreement u_hat[j|i] . v[j]. The loop runs in float32 with autocast off
(softmax and squash lose too much in half precision).

Internally u_hat is read as [batch, n_out, n_in, dim], so both contractions
(the weighted sum s and the agreement) are batched matmuls over contiguous
memory. `ClassCapsules` produces u_hat in that storage order and passes a
transposed view, which costs nothing here.
"""

from __future__ import annotations

import torch
from torch import nn

from capsnet.squash import get_squash


def coupling_softmax(b: torch.Tensor, dim: int, leaky: bool) -> torch.Tensor:
    """Softmax over the upper capsules; `leaky` adds a logit fixed at 0 (a sink)."""
    if not leaky:
        return torch.softmax(b, dim)
    sink = torch.zeros_like(b.narrow(dim, 0, 1))
    return torch.softmax(torch.cat([b, sink], dim), dim).narrow(dim, 0, b.shape[dim])


class DynamicRouting(nn.Module):
    """Routing between two capsule layers; no trainable parameters of its own.

    Args:
        iters: routing iterations r (paper: 3). 1 gives uniform couplings.
        squash: squash variant applied to s (see `capsnet.squash`).
        detach_intermediate: stop gradients through u_hat in all but the last
            iteration, as many re-implementations do (off: the paper's maths).
        leaky: leaky routing, an extra "none of the above" logit fixed at 0
            (the paper uses it on CIFAR-10); couplings then sum to < 1.

    Set `record = True` to keep the couplings of every iteration in
    `self.couplings` (detached, each [batch, n_in, n_out]) for logging.
    """

    def __init__(self, iters: int = 3, squash: str = "paper",
                 detach_intermediate: bool = False, leaky: bool = False):
        super().__init__()
        if int(iters) != iters or iters < 1:
            raise ValueError(f"routing iters must be a whole number >= 1, got {iters!r}")
        self.iters, self.squash_name = int(iters), squash
        self.squash = get_squash(squash)
        self.detach_intermediate, self.leaky = detach_intermediate, leaky
        self.record = False
        self.couplings: list[torch.Tensor] = []

    def forward(self, u_hat: torch.Tensor, bias: torch.Tensor | None = None):
        """u_hat [batch, n_in, n_out, dim] -> (v [batch, n_out, dim], c [batch, n_in, n_out])."""
        with torch.autocast(u_hat.device.type, enabled=False):
            u = u_hat.float().transpose(1, 2)  # [B, J, I, D], contiguous when built by ClassCapsules
            u_mid = u.detach() if self.detach_intermediate else u
            bsz, n_out, n_in, _ = u.shape
            b = u.new_zeros(bsz, n_out, n_in)
            self.couplings = []
            for r in range(self.iters):
                last = r == self.iters - 1
                uu = u if last else u_mid
                c = coupling_softmax(b, 1, self.leaky)  # over the upper capsules j
                s = torch.matmul(c.unsqueeze(2), uu).squeeze(2)  # sum_i c_ij u_hat_j|i
                if bias is not None:
                    s = s + bias.float()
                v = self.squash(s)
                if self.record:
                    self.couplings.append(c.detach().transpose(1, 2))
                if not last:
                    b = b + torch.matmul(uu, v.unsqueeze(-1)).squeeze(-1)  # agreement
        return v, c.transpose(1, 2)

    def extra_repr(self) -> str:
        return (f"iters={self.iters}, squash={self.squash_name!r}, "
                f"detach_intermediate={self.detach_intermediate}, leaky={self.leaky}")
