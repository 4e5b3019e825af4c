"""The fused CPU kernel of dynamic routing: votes and every iteration in cache (csrc/dynamic_routing.cpp);
and, in the same compiled module, PrimaryCaps' reshape and squash in one pass (csrc/capsule_squash.cpp).

On a CPU the routing is memory traffic: written as whole-tensor operations it
reads the 94 MB of votes about nine times a step (docs/performance.md). The
kernel makes each image's votes W_ij u_i in cache and runs Procedure 1 of
Sabour et al. (2017) on them there, one pass per iteration; the backward makes
them again and never stores them. Same maths as `capsnet.routing.dynamic`
(every squash, leaky routing, the bias, detached intermediate iterations),
float32 and float64.

It is compiled on first use with PyTorch's C++ extension tools (a C++
compiler and ninja; about 30 s, once per machine and source version) into
$CAPSNET_KERNEL_DIR, else ~/.cache/capsnet/kernels, for the CPU it runs on.
`routing.kernel=auto` falls back to the PyTorch implementation, with one
warning, where it cannot be built; `routing.kernel=cpp` makes that an error.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from capsnet.errors import CapsnetError

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "dynamic_routing.cpp", CSRC / "capsule_squash.cpp"]  # built as one module
SQUASH_KINDS = {"paper": 0, "keras": 1, "efficient": 2}  # the kernel's numbering of capsnet.nn.squash


class KernelUnavailable(RuntimeError):
    """The fused kernel could not be built or loaded here."""


def _cpu_signature() -> str:
    """The CPU's model and flags: a kernel built with -march=native must not be loaded on another CPU
    (a home directory shared across a cluster's nodes)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def compiler_flags(cpu: str) -> list[str]:
    """-march=native: the kernel is built on the machine that runs it. Full AVX-512 vectors where the CPU
    has them (a capsule's 16 dimensions are one register); gcc's tuning otherwise stops at 256 bits.
    -fopenmp: ATen's parallel_for is inline OpenMP code, serial without it (torch's own libgomp serves)."""
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    return flags + (["-mprefer-vector-width=512"] if " avx512f" in cpu else [])


def kernel_dir() -> Path:
    """Where builds are kept: $CAPSNET_KERNEL_DIR, else ~/.cache/capsnet/kernels."""
    return Path(os.environ.get("CAPSNET_KERNEL_DIR") or Path.home() / ".cache" / "capsnet" / "kernels")


def _put_ninja_on_path() -> None:
    """PyTorch's builder runs `ninja` from PATH; the pip package (a dependency) puts it beside the venv's
    python, which is not on PATH when the venv is not activated (`.venv/bin/python train.py`)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def kernel_name() -> tuple[str, list[str]]:
    """(the build's name, its compiler flags): the name changes with the source, torch, Python, the
    flags and the CPU, so a stale or foreign build is never loaded."""
    cpu = _cpu_signature()
    flags = compiler_flags(cpu)
    code = [f.read_text() for f in sorted(CSRC.glob("*.[ch]*"))]  # the sources and their headers
    key = "\n".join([*code, torch.__version__, sys.version, " ".join(flags), cpu])
    return "capsnet_routing_" + hashlib.sha256(key.encode()).hexdigest()[:16], flags


@functools.lru_cache(maxsize=None)
def load():
    """The compiled module (built here on first use); KernelUnavailable with the reason otherwise."""
    name, flags = kernel_name()
    build_dir = kernel_dir() / name
    try:
        _put_ninja_on_path()
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its "No CUDA runtime is found" note, logged on import
        try:
            from torch.utils.cpp_extension import load as build
        finally:
            quiet.setLevel(level)
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob(f"{name}*.so")):
            print(f"capsnet: compiling the fused routing kernel into {build_dir} (once, about 30 s)",
                  file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the build tools' notes (compiler version and ABI checks)
            return build(name, [str(f) for f in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                         build_directory=str(build_dir), verbose=False)
    except Exception as err:  # a missing compiler or ninja, a failed build: name it in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KernelUnavailable(f"{type(err).__name__}: {first}") from err


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernel loads here; warns once, with the reason, when it does not."""
    try:
        load()
        return True
    except KernelUnavailable as err:
        warnings.warn(f"routing.kernel=auto: the fused CPU kernel (routing, PrimaryCaps squash) is unavailable "
                      f"({err}); using PyTorch operations (slower). Set routing.kernel=torch to silence this.",
                      stacklevel=2)
        return False


TILE = 16  # lower capsules side by side in the kernel's vectors (kTile in the C++ source)


def _tiles(n_in: int) -> tuple[int, int]:
    """(number of tiles, padding): lower capsules are padded with zeros to whole tiles. A zero vote adds
    nothing to any s and gets a gradient nobody reads, so the padding does not change the routing."""
    n = -(-n_in // TILE)
    return n, n * TILE - n_in


def _tile_inputs(u: torch.Tensor, weight: torch.Tensor):
    """u [B, I, K] -> [B, n, K, TILE]; weight [I, K, JD] -> [n, K, JD, TILE] (the kernel's layouts)."""
    (bsz, n_in, k), jd = u.shape, weight.shape[-1]
    n, pad = _tiles(n_in)
    if pad:
        u, weight = F.pad(u, (0, 0, 0, pad)), F.pad(weight, (0, 0, 0, 0, 0, pad))
    return (u.reshape(bsz, n, TILE, k).transpose(2, 3).contiguous(),
            weight.reshape(n, TILE, k, jd).permute(0, 2, 3, 1).contiguous())


class FusedRoutingFunction(torch.autograd.Function):
    """u [B, I, K], W [I, K, J*D], bias [J, D] or None -> (v [B, J, D], c of the last iteration [B, J, I]);
    the same contract as `dynamic._TransformRoutingFunction`, plus `gradient`: whether a backward can follow
    (`fused_routing` decides); without one the kernel keeps only the last iteration's couplings, and with
    `bf16_votes` makes the votes from bfloat16 u and W (float32 sums; the routing stays float32)."""

    @staticmethod
    def forward(ctx, u, weight, bias, n_out, iters, squash, leaky, detach_intermediate, record, gradient,
                bf16_votes=False):
        kind = SQUASH_KINDS[squash]
        n_in = u.shape[1]
        u_t, w_t = _tile_inputs(u, weight)
        # every iteration's couplings for the backward and the recorder; else (inference) the last one's
        keep_all = record is not None or gradient
        v, cs, ss = load().forward(u_t, w_t, bias, n_out, iters, kind, leaky, keep_all, bf16_votes)
        cs = cs[..., :n_in]
        if record is not None:
            record.extend(c.transpose(1, 2) for c in cs)
        if keep_all:
            ctx.save_for_backward(u_t, w_t, cs, ss)
        ctx.n_in, ctx.n_out, ctx.kind = n_in, n_out, kind
        ctx.detach, ctx.has_bias = detach_intermediate, bias is not None
        return v, cs[-1]

    @staticmethod
    def backward(ctx, grad_v, grad_c):
        u_t, w_t, cs, ss = ctx.saved_tensors
        need_u, need_w, need_bias = ctx.needs_input_grad[:3]
        _, pad = _tiles(ctx.n_in)
        if pad:
            cs = F.pad(cs, (0, pad))  # padded capsules' couplings: read, never used (their votes are 0)
            grad_c = None if grad_c is None else F.pad(grad_c, (0, pad))
        grad_u, grad_w, grad_bias = load().backward(u_t, w_t, cs, ss, grad_v, grad_c, ctx.n_out, ctx.kind,
                                                    ctx.detach, need_u, need_w, need_bias and ctx.has_bias)
        if pad:  # the kernel returns them in u's and W's layouts, padded capsules included
            grad_u = None if grad_u is None else grad_u[:, :ctx.n_in]
            grad_w = None if grad_w is None else grad_w[:ctx.n_in]
        return grad_u, grad_w, grad_bias, None, None, None, None, None, None, None, None


def fused_routing(u, weight, bias, n_out, iters, squash, leaky, detach_intermediate, record, bf16=False):
    """`FusedRoutingFunction`, told whether a gradient can be taken: under `torch.no_grad` (inference)
    none can, though the parameters require one, and the kernel then keeps the last couplings only.
    `bf16` (the caller ran under bfloat16 autocast): inference makes the votes W u from bfloat16 inputs
    where the CPU has AVX512-BF16, as autocast would run that matrix product; training keeps them float32."""
    gradient = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, weight, bias))
    bf16_votes = bf16 and not gradient and u.dtype == torch.float32 and load().has_bf16_votes()
    return FusedRoutingFunction.apply(u, weight, bias, n_out, iters, squash, leaky, detach_intermediate, record,
                                      gradient, bf16_votes)


class ChannelSquashFunction(torch.autograd.Function):
    """y [B, types * dim, H, W] -> u [B, types * H * W, dim], squashed: PrimaryCaps' reshape and squash
    (`capsnet.nn.capsules.PrimaryCapsules`) in one pass each way (csrc/capsule_squash.cpp). Half-precision
    y gives float32 capsules, as `capsnet.nn.squash` does."""

    @staticmethod
    def forward(ctx, y, capsule_dim, squash):
        ctx.capsule_dim, ctx.kind = capsule_dim, SQUASH_KINDS[squash]
        ctx.save_for_backward(y)
        return load().channel_squash_forward(y, capsule_dim, ctx.kind)

    @staticmethod
    def backward(ctx, grad_u):
        (y,) = ctx.saved_tensors
        return load().channel_squash_backward(y, grad_u, ctx.capsule_dim, ctx.kind), None, None


def use_kernel(kernel: str, device: torch.device) -> bool:
    """Whether to run this module's kernels for a `routing.kernel` setting ("auto" | "cpp" | "torch") on
    `device`: "cpp" where they cannot be built is a one-line CapsnetError; a GPU runs PyTorch."""
    if kernel == "torch" or device.type != "cpu":
        return False
    if kernel == "auto":
        return available()
    try:
        load()
    except KernelUnavailable as err:
        raise CapsnetError(f"routing.kernel=cpp: the fused CPU kernels cannot be built here ({err}); "
                           "install a C++ compiler and ninja, or set routing.kernel=auto or torch") from None
    return True
