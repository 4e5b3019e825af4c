"""One training run from a composed config: build, resume, loop over epochs, write the results.

What a run leaves in its directory: metrics.jsonl (one line per epoch),
results.json (the summary), checkpoints/last.pt and best.pt, tb/ (TensorBoard).
Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from functools import partial
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from capsnet.train import distributed as dist_utils
from capsnet.train.checkpoint import load_checkpoint, load_model_state, remove_stale_temporaries, save_checkpoint
from capsnet.data.images import BatchLoader
from capsnet.train.perf import configure_allocator
from capsnet.train.engine import LoopHooks, LoopState, StopRequested, evaluate, train_one_epoch
from capsnet.errors import CapsnetError
from capsnet.train.tb import TensorBoard

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CapsnetError("trainer.device=cuda but no CUDA GPU is visible: use trainer.device=cpu or auto")
    return torch.device(name)


def autocast_factory(device: torch.device, amp: str):
    """() -> a fresh autocast context (a no-op when amp is off)."""
    if amp == "off":
        return contextlib.nullcontext
    if amp == "fp16" and device.type != "cuda":
        raise CapsnetError("trainer.amp=fp16 needs a CUDA GPU: use trainer.amp=bf16 on CPU, or off")
    return partial(torch.autocast, device_type=device.type, dtype=AMP_DTYPES[amp])


class SignalFlag:
    """SIGTERM/SIGUSR1 (Slurm pre-emption) ask for a stop at the next step boundary."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

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
        self.received = signum

    def __call__(self) -> bool:
        return self.received is not None

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.received is not None and callable(self.previous.get(self.received)):
            self.previous[self.received](self.received, None)  # e.g. submitit's requeue


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


def plain_trainer_settings(trainer: DictConfig) -> DictConfig:
    """The trainer node with the schema's enums as plain strings."""
    return OmegaConf.create(OmegaConf.to_container(trainer, resolve=True, enum_to_str=True))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Run:
    """Everything one run holds; `fit()` trains it to the end (or to a pre-emption)."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.t = cfg, plain_trainer_settings(cfg.trainer)
        t = self.t
        self.out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
        self.overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        self.device = resolve_device(t.device)
        self.autocast = autocast_factory(self.device, t.amp)
        configure_allocator(t.allocator)
        if t.threads:
            torch.set_num_threads(int(t.threads))
        self.rank, self.world, local = dist_utils.init_distributed(self.device.type, t.dist_timeout_s)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local)
        self.main = self.rank == 0
        if self.main:
            self._check_writable()
        if t.batch_size % self.world:
            raise CapsnetError(f"trainer.batch_size={t.batch_size} (global) does not divide among "
                               f"{self.world} processes: use a multiple of {self.world}")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.data = instantiate(cfg.dataset)
        self.model = instantiate(cfg.model, in_shape=self.data.in_shape,
                                 num_classes=self.data.num_classes).to(self.device)
        torch.manual_seed(cfg.seed + self.rank)  # dropout and the like differ per process
        self.criterion = instantiate(cfg.loss)
        self.optimizer = instantiate(cfg.optim.optimizer)(self.model.parameters())
        self.scheduler = instantiate(cfg.optim.scheduler)(self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.state, self.history, self.best = LoopState(), [], -1.0
        self._build_loaders()

    def _build_loaders(self) -> None:
        t, pin = self.t, self.device.type == "cuda"
        common = dict(rank=self.rank, world_size=self.world, num_workers=t.num_workers, pin_memory=pin)
        self.train_loader = BatchLoader(*self.data.split(True), t.batch_size // self.world, train=True,
                                        seed=self.cfg.seed, shift=self.data.shift, **common)
        self.test_loader = BatchLoader(*self.data.split(False), t.eval_batch_size, train=False, **common)

    def _check_writable(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CapsnetError(f"cannot write the run directory {self.out_dir} ({e.strerror or type(e).__name__}): "
                               "choose a writable folder with out_dir=... or hydra.run.dir=...") from None
        remove_stale_temporaries(self.out_dir / "checkpoints")

    # --- checkpoints -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "loop": vars(self.state).copy(), "history": self.history, "best": self.best,
                "rng": rng_state(), "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)}

    def save(self, name: str = "last.pt") -> None:
        if self.main:
            save_checkpoint(self.checkpoint_state(), self.out_dir / "checkpoints" / name)

    def resume_path(self) -> Path | None:
        resume = self.t.resume
        if resume in (None, "null", "none"):
            return None
        if resume == "auto":
            path = self.out_dir / "checkpoints" / "last.pt"
            return path if path.is_file() else None
        return Path(resume)

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        load_model_state(self.model, ckpt["model"], str(path))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.state = LoopState(**ckpt["loop"])
            self.history, self.best = list(ckpt["history"]), float(ckpt["best"])
            set_rng_state(ckpt["rng"])
        except (KeyError, ValueError, TypeError) as e:
            raise CapsnetError(f"{path} lacks training state ({type(e).__name__}: {e}); "
                               "use trainer.resume=null to start afresh") from None

    # --- outputs -----------------------------------------------------------------------------
    def _write_json(self, name: str, text: str) -> None:
        tmp = self.out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.out_dir / name)

    def write_metrics(self) -> None:
        if self.main:
            self._write_json("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    def summary(self, seconds: float) -> dict:
        last = self.history[-1] if self.history else {}
        return {"params": count_parameters(self.model), "test_accuracy": last.get("test_accuracy"),
                "test_error": last.get("test_error"), "best_test_accuracy": self.best,
                "epochs": len(self.history), "steps": self.state.step, "seconds": seconds,
                "train_images_per_second": last.get("train_images_per_second"),
                "skipped_steps": self.state.skipped, "world_size": self.world,
                "model": self.cfg.get("model_name"), "dataset": self.data.name,
                "routing_iters": OmegaConf.select(self.cfg, "routing.iters"), "seed": self.cfg.seed,
                "overrides": self.overrides}

    def hparams(self) -> dict:
        """What defines the run, for TensorBoard's HParams view (scalars only)."""
        c = self.cfg
        return {"model": str(c.model_name), "dataset": self.data.name,
                "routing_iters": int(OmegaConf.select(c, "routing.iters") or 0),
                "recon_weight": float(OmegaConf.select(c, "loss.recon_weight") or 0.0),
                "decoder": OmegaConf.select(c, "model.decoder") is not None, "seed": int(c.seed),
                "lr": float(c.optim.lr), "batch_size": int(self.t.batch_size), "epochs": int(self.t.epochs),
                "amp": str(self.t.amp), "overrides": " ".join(self.overrides)}

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        t = self.t
        path = self.resume_path()
        if path is not None:
            self.restore(path)
        wrapped = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(self.model, device_ids=ids)
        tb = TensorBoard(str(self.out_dir / "tb") if self.main else None,
                         purge_step=self.state.step if path is not None else None)
        fixed = self.data.split(False)[0][:16].float().div(255).to(self.device)
        if self.main:
            n_train, n_test = len(self.data.split(True)[0]), len(self.data.split(False)[0])
            print(f"capsnet: {self.cfg.model_name} ({count_parameters(self.model):,} parameters) on {self.data.name} "
                  f"({n_train:,} train / {n_test:,} test images), {self.device}"
                  f"{f' x {self.world} processes' if self.world > 1 else ''}, amp {self.t.amp}; "
                  f"run directory {self.out_dir}"
                  f"{f'; resumed at epoch {self.state.epoch + 1}, step {self.state.step}' if path else ''}",
                  flush=True)
        started = time.perf_counter() - sum(r["seconds"] for r in self.history)
        with SignalFlag() as stop:
            hooks = LoopHooks(self.autocast, self.save, stop, tb, t.log_every, t.ckpt_every_steps,
                              t.on_nonfinite, t.progress and self.main)
            try:
                while self.state.epoch < t.epochs:
                    self._one_epoch(wrapped, hooks, tb, fixed, started)
            except StopRequested:
                signame = signal.Signals(stop.received).name
                print(f"capsnet: stopped by {signame} at step {self.state.step}; checkpoints/last.pt "
                      "saved; run the same command (trainer.resume=auto) to continue", flush=True)
            finally:
                results = self.summary(time.perf_counter() - started)
                if not stop() and self.history:
                    tb.hparams(self.hparams(), {"hparam/test_error": results["test_error"],
                                                "hparam/test_accuracy": results["test_accuracy"]})
                tb.close()
        if self.main and not stop():
            self._write_json("results.json", json.dumps(results, indent=2) + "\n")
        return results

    def _one_epoch(self, wrapped, hooks: LoopHooks, tb: TensorBoard, fixed, started: float) -> None:
        t0 = time.perf_counter()
        self.train_loader.set_epoch(self.state.epoch, skip_batches=self.state.batch)
        train = train_one_epoch(wrapped, self.criterion, self.train_loader, self.optimizer, self.scheduler,
                                self.scaler, self.state, hooks, self.device)
        test = evaluate(self.model, self.criterion, self.test_loader, self.autocast, self.device)
        self.state.epoch, self.state.batch = self.state.epoch + 1, 0
        record = {"epoch": self.state.epoch, "step": self.state.step, **train, **test,
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
                  "skipped_steps": self.state.skipped}
        self.history.append(record)
        tb.scalars({k.removeprefix("test_"): v for k, v in test.items()}, self.state.step, "test/")
        tb.scalars({"throughput": train["train_images_per_second"]}, self.state.step)
        tb.inspect(self.model, fixed, self.state.step, self.autocast())
        improved = test["test_accuracy"] > self.best
        self.best = max(self.best, test["test_accuracy"])
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        self.write_metrics()
        if self.main:
            print(f"epoch {self.state.epoch}/{self.t.epochs}: "
                  f"train loss {train.get('train_loss', float('nan')):.4f}, "
                  f"test accuracy {test['test_accuracy']:.2f}% ({record['seconds']:.0f} s)", flush=True)


def train(cfg: DictConfig) -> float:
    """Train one run; returns the final test error in % (what a sweeper minimises)."""
    try:
        results = Run(cfg).fit()
    finally:
        dist_utils.cleanup()
    return results["test_error"] if results["test_error"] is not None else float("nan")
