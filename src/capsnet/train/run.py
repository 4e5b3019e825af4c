"""One training run from a composed config: build, resume, loop over epochs, write the results.

What a run leaves in its directory: metrics.jsonl (one line per epoch),
results.json (the summary), checkpoints/last.pt and best.pt, tb/ (TensorBoard).
Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from capsnet.data.loader import BatchLoader, make_batch
from capsnet.errors import CapsnetError
from capsnet.train import distributed as dist_utils
from capsnet.train.build import (build_data, build_loss, build_metrics, build_model, build_optimizer,
                                 count_parameters, metric_names)
from capsnet.train.checkpoint import load_checkpoint, load_model_state, remove_stale_temporaries, save_checkpoint
from capsnet.train.engine import LoopHooks, LoopState, StopRequested, evaluate, train_one_epoch
from capsnet.train.outputs import eval_values, write_metrics, write_results
from capsnet.train.perf import configure_allocator
from capsnet.train.resume import RunLock, check_same_run
from capsnet.train.runtime import (SignalFlag, autocast_factory, resolve_amp, resolve_device, rng_state,
                                   set_rng_state)
from capsnet.train.tb import TensorBoard


def plain(node: DictConfig) -> DictConfig:
    """A config node with the schema's enums as plain strings."""
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True, enum_to_str=True))


def monitor_is_better(mode: str, name: str, new: float, best: float | None) -> bool:
    """Is `new` better than `best` for the monitored value? mode auto: lower is better for errors and losses."""
    if best is None:
        return True
    if mode == "auto":
        mode = "min" if name.endswith(("error", "loss")) else "max"
    return new < best if mode == "min" else new > best


class Run:
    """Everything one run holds; `fit()` trains it to the end (or to a pre-emption)."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.t = cfg, plain(cfg.trainer)
        t = self.t
        self.out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir)
        self.overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        self.device = resolve_device(t.device)
        self.t.amp = resolve_amp(self.device, t.amp)  # auto: bf16 where native; the header says which
        self.autocast = autocast_factory(self.device, self.t.amp)
        configure_allocator(t.allocator)
        if t.threads:
            torch.set_num_threads(int(t.threads))
        self.rank, self.world, local = dist_utils.init_distributed(self.device.type, t.dist_timeout_s)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local)
        self.main = self.rank == 0
        self.lock = None
        if self.main:
            self._check_writable()
            self.lock = RunLock(self.out_dir)
        try:
            self._build()
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _build(self) -> None:
        cfg, t = self.cfg, self.t
        self.resume_from = self.resume_path()
        self.resumed = load_checkpoint(self.resume_from) if self.resume_from else None  # checked before any data
        if self.resumed is not None:
            check_same_run(self.resumed, cfg, self.resume_from)
        if t.batch_size % self.world:
            raise CapsnetError(f"trainer.batch_size={t.batch_size} (global) does not divide among "
                               f"{self.world} processes: use a multiple of {self.world}")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.data = build_data(cfg)
        self.train_split, self.eval_splits = self.data.train(), self.data.evals()
        self.in_shape, self.num_classes = self.train_split.in_shape, self.data.num_classes
        self.model = build_model(cfg, self.in_shape, self.num_classes).to(self.device)
        torch.manual_seed(cfg.seed + self.rank)  # dropout and the like differ per process
        self.criterion, self.metrics = build_loss(cfg), build_metrics(cfg)
        self._check_monitor()
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.state, self.history, self.best = LoopState(), [], None
        self._build_loaders()
        if t.steps is not None:  # a step budget, as the official code counts: the whole epochs that cover it
            self.t.epochs = math.ceil(t.steps / len(self.train_loader))

    def _check_monitor(self) -> None:
        allowed = [f"{s}/{n}" for s in self.eval_splits for n in ("loss", *metric_names(self.metrics))]
        if self.t.monitor not in allowed:
            raise CapsnetError(f"trainer.monitor={self.t.monitor} is not a value this run evaluates: "
                               f"choose one of {', '.join(allowed)}")

    def _build_loaders(self) -> None:
        t, pin = self.t, self.device.type == "cuda"
        common = dict(rank=self.rank, world_size=self.world, num_workers=t.num_workers, pin_memory=pin)
        self.train_loader = BatchLoader(self.train_split, t.batch_size // self.world, train=True,
                                        seed=self.cfg.seed, **common)
        self.eval_loaders = {name: BatchLoader(split, t.eval_batch_size, train=False, **common)
                             for name, split in self.eval_splits.items()}

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
                "rng": rng_state(), "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
                "data": {"in_shape": list(self.in_shape), "num_classes": self.num_classes}}

    def save(self, name: str = "last.pt") -> None:
        """last.pt holds everything a resume needs; best.pt only the weights and what rebuilds the model
        (a third of last.pt's size: Adam keeps two moments per weight). trainer.keep_checkpoints limits both."""
        keep = self.t.keep_checkpoints
        if not self.main or keep == "none" or (name == "best.pt" and keep != "all"):
            return
        state = self.checkpoint_state()
        if name == "best.pt":
            state = {k: state[k] for k in ("model", "config", "data", "best", "loop")}
        save_checkpoint(state, self.out_dir / "checkpoints" / name)

    def resume_path(self) -> Path | None:
        resume = self.t.resume
        if resume in (None, "null", "none"):
            return None
        if resume == "auto":
            path = self.out_dir / "checkpoints" / "last.pt"
            return path if path.is_file() else None
        return Path(resume)

    def restore(self, path: Path) -> None:
        ckpt = self.resumed
        load_model_state(self.model, ckpt["model"], str(path))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.state = LoopState(**ckpt["loop"])
            self.history, self.best = list(ckpt["history"]), ckpt["best"]
            set_rng_state(ckpt["rng"])
        except (KeyError, ValueError, TypeError) as e:
            raise CapsnetError(f"{path} lacks training state ({type(e).__name__}: {e}); "
                               "use trainer.resume=null to start afresh") from None

    # --- outputs -----------------------------------------------------------------------------
    def summary(self, seconds: float) -> dict:
        last = self.history[-1] if self.history else {}
        routing = OmegaConf.select(self.cfg, "model.class_caps.routing")
        return {"params": count_parameters(self.model), "monitor": self.t.monitor, "best": self.best,
                "final": eval_values(last), "epochs": len(self.history), "steps": self.state.step,
                "seconds": seconds, "train_images_per_second": last.get("train/images_per_second"),
                "skipped_steps": self.state.skipped, "world_size": self.world,
                "model": self.cfg.get("model_name"), "dataset": self.data.name,
                "routing": OmegaConf.select(self.cfg, "routing._target_", default=None) if routing else None,
                "routing_iters": OmegaConf.select(self.cfg, "routing.iters", default=None) if routing else None,
                "seed": self.cfg.seed, "stopped_at_threshold": self.reached_stop_at(), "overrides": self.overrides}

    def hparams(self) -> dict:
        """What defines the run, for TensorBoard's HParams view: the model, dataset, routing iterations and
        seed, plus every override of the command line or sweep under its own name (the swept keys show)."""
        c = self.cfg
        values = {"model": str(c.model_name), "dataset": self.data.name,
                  "routing_iters": int(OmegaConf.select(c, "routing.iters", default=0) or 0), "seed": int(c.seed)}
        for key, value in self.setting().items():
            values[key] = value if isinstance(value, (int, float, bool)) else str(value)
        return values

    def setting(self) -> dict:
        """The overrides that define this run (not where it reads or writes), e.g. {"routing.iters": 3, "seed": 1};
        in a sweep only the swept keys, which tell its runs apart."""
        skip = ("out_dir", "dataset.root", "hydra.", "trainer.progress", "trainer.device")
        pairs = [o.lstrip("+~").split("=", 1) for o in self.overrides if "=" in o]
        setting = {k: _scalar(v) for k, v in pairs if not k.startswith(skip)}
        swept = swept_keys()
        return {k: v for k, v in setting.items() if k in swept} if swept & set(setting) else setting

    def tb_dir(self) -> Path:
        """tb/<setting> (e.g. tb/routing.iters=3,seed=1), so TensorBoard's run names say what each run is."""
        name = ",".join(f"{k}={v}" for k, v in self.setting().items()) or "run"
        return self.out_dir / "tb" / "".join(ch if ch.isalnum() or ch in "=,._-" else "_" for ch in name)[:120]

    def _header(self, resumed: bool) -> str:
        sizes = " / ".join(f"{len(s):,} {n}" for n, s in {"train": self.train_split, **self.eval_splits}.items())
        return (f"capsnet: {self.cfg.model_name} ({count_parameters(self.model):,} parameters) on {self.data.name} "
                f"({sizes}), {self.device}{f' x {self.world} processes' if self.world > 1 else ''}, "
                f"amp {self.t.amp}; run directory {self.out_dir}"
                f"{f'; resumed at epoch {self.state.epoch + 1}, step {self.state.step}' if resumed else ''}")

    def reached_stop_at(self) -> bool:
        """trainer.stop_at: the last epoch's monitored value is at least as good as the threshold."""
        if self.t.stop_at is None or not self.history:
            return False
        value = self.history[-1][self.t.monitor]
        return value == self.t.stop_at or monitor_is_better(self.t.monitor_mode, self.t.monitor, value,
                                                             self.t.stop_at)

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _already_complete(self) -> dict | None:
        """A finished run rerun as it was: its results, left untouched."""
        done = self.out_dir / "results.json"
        if self.state.epoch < self.t.epochs or not done.is_file():
            return None
        if self.main:
            print(f"capsnet: the run in {self.out_dir} is already complete ({self.state.epoch} epochs); results.json "
                  "is left as it is (raise trainer.epochs to train further)", flush=True)
        return json.loads(done.read_text())

    def _fit(self) -> dict:
        t = self.t
        path = self.resume_from
        if path is not None:
            self.restore(path)
            complete = self._already_complete()
            if complete is not None:
                return complete
        wrapped = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(self.model, device_ids=ids)
        tb = TensorBoard(str(self.tb_dir()) if self.main else None,
                         purge_step=self.state.step if path is not None else None)
        test = self.eval_splits["test"]
        fixed = make_batch(test, torch.arange(min(16, len(test))), 0, None).to(self.device)  # the inspection batch
        if self.main:
            print(self._header(path is not None), flush=True)
        started = time.perf_counter() - sum(r["seconds"] for r in self.history)
        total_steps = t.epochs * len(self.train_loader)
        with SignalFlag() as stop:
            hooks = LoopHooks(self.autocast, self.save, stop, tb, t.log_every, t.ckpt_every_steps,
                              t.on_nonfinite, t.progress and self.main, total_steps)
            try:
                while self.state.epoch < t.epochs and not self.reached_stop_at():
                    self._one_epoch(wrapped, hooks, tb, fixed)
            except StopRequested:
                signame = signal.Signals(stop.received).name
                print(f"capsnet: stopped by {signame} at step {self.state.step}; checkpoints/last.pt "
                      "saved; run the same command (trainer.resume=auto) to continue", flush=True)
            finally:
                results = self.summary(time.perf_counter() - started)
                if not stop() and self.history:
                    tb.hparams(self.hparams(), {f"hparam/{k}": v for k, v in results["final"].items()})
                tb.close()
        if self.main and not stop():
            write_results(self.out_dir, results)
        return results

    def _one_epoch(self, wrapped, hooks: LoopHooks, tb: TensorBoard, fixed) -> None:
        t0 = time.perf_counter()
        self.train_loader.set_epoch(self.state.epoch, skip_batches=self.state.batch)
        train = train_one_epoch(wrapped, self.criterion, self.metrics, self.train_loader, self.optimizer,
                                self.scheduler, self.scaler, self.state, hooks, self.device)
        evals = {}
        for name, loader in self.eval_loaders.items():
            evals.update(evaluate(self.model, self.criterion, self.metrics, loader, self.autocast, self.device, name,
                                  recon_with_labels=self.t.eval_recon_with_labels))
        self.state.epoch, self.state.batch = self.state.epoch + 1, 0
        record = {"epoch": self.state.epoch, "step": self.state.step, **train, **evals,
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
                  "skipped_steps": self.state.skipped}
        self.history.append(record)
        tb.scalars(train, self.state.step)  # once an epoch at least, however short the run
        tb.scalars(evals, self.state.step)
        tb.scalars({"throughput": train["train/images_per_second"]}, self.state.step)
        tb.inspect(self.model, fixed.images, self.state.step, self.autocast(), labels=fixed.labels)
        value = evals[self.t.monitor]
        improved = math.isfinite(value) and monitor_is_better(self.t.monitor_mode, self.t.monitor, value,
                                                              None if self.best is None else self.best["value"])
        if improved:
            self.best = {"name": self.t.monitor, "value": value, "epoch": self.state.epoch}
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        if self.main:
            write_metrics(self.out_dir, self.history)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in evals.items() if not k.endswith("_loss"))
            print(f"epoch {self.state.epoch}/{self.t.epochs}: train loss {train.get('train/loss', float('nan')):.4f}, "
                  f"{shown} ({record['seconds']:.0f} s)", flush=True)


def swept_keys() -> set:
    """The keys a Hydra multirun sweeps: a preset's sweeper params and the command line's sweep overrides."""
    if not HydraConfig.initialized() or "MULTIRUN" not in str(HydraConfig.get().mode):
        return set()
    import sys

    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set((OmegaConf.select(HydraConfig.get(), "sweeper.params") or {}).keys())
    args = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    try:
        keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()}
    except Exception:  # noqa: BLE001  (argv of another launcher: no sweep syntax to read)
        pass
    return keys


def _scalar(text: str):
    """An override's value as a number where it is one (so HParams can sort and plot it)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def train(cfg: DictConfig) -> float:
    """Train one run; returns the monitored value of the last epoch (what a sweeper optimises)."""
    try:
        results = Run(cfg).fit()
        dist_utils.barrier()  # every rank done before any tears the process group down
    finally:
        dist_utils.cleanup()
    return results["final"].get(cfg.trainer.monitor, float("nan"))
