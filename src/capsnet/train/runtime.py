"""Process-level settings of a run: device, autocast, pre-emption signals, random-number state."""

from __future__ import annotations

import contextlib
import random
import signal
from functools import partial

import torch

from capsnet.errors import CapsnetError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CapsnetError("trainer.device=cuda but no CUDA GPU is visible: use trainer.device=cpu or auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Does this device compute bf16 natively (a GPU that supports it, a CPU with AVX512-BF16 or AMX)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_amp(device: torch.device, amp: str) -> str:
    """trainer.amp=auto: bf16 where the hardware has it natively, else off (fp32)."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "off"


def autocast_factory(device: torch.device, amp: str):
    """() -> a fresh autocast context (a no-op when amp is off); `amp` already resolved (no "auto")."""
    if amp == "off":
        return contextlib.nullcontext
    if amp == "fp16" and device.type != "cuda":
        raise CapsnetError("trainer.amp=fp16 needs a CUDA GPU: use trainer.amp=bf16 on CPU, or off")
    return partial(torch.autocast, device_type=device.type, dtype=AMP_DTYPES[amp])


class SignalFlag:
    """SIGTERM/SIGUSR1 (Slurm pre-emption) and SIGINT (Ctrl-C) ask for a stop at the next step boundary,
    where last.pt is saved; a second Ctrl-C stops at once."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self):
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __call__(self) -> bool:
        return self.received is not None

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        previous = self.previous.get(self.received)
        if self.received is not None and callable(previous) and previous is not signal.default_int_handler:
            previous(self.received, None)  # e.g. submitit's requeue


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
