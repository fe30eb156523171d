"""python -m dgan.train [--config FILE] [--resume auto|PATH] [section.key=value ...]

Builds everything with build_* functions, then runs the loop as labelled phases. The same
code runs as one process or under torchrun (world size 1 is just a small world).
--resume PATH takes a run folder, its checkpoints/ folder or a checkpoint file (dgan/rundir.py).

Exit codes: 0 finished; 75 preempted (SIGTERM/SIGUSR1: a checkpoint was saved, requeue and
`--resume auto`); 130 interrupted with Ctrl-C (checkpoint saved); 2 a bad config or command
line, or a run that is in use or already has checkpoints (nothing was started); 1 an error.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar


import numpy as np  # noqa: E402
import torch  # noqa: E402

from dgan import __version__  # noqa: E402
from dgan import distributed as dist  # noqa: E402
from dgan.adaptive import AdaptiveT  # noqa: E402
from dgan.checkpoint import CheckpointError, Checkpointer, CheckpointSchemaError, load_checkpoint  # noqa: E402
from dgan.config import Config, ConfigError, load_config, save_config, to_dict, with_legacy_defaults  # noqa: E402
from dgan.data import build_train_data  # noqa: E402
from dgan.dguard import DHealthGuard  # noqa: E402
from dgan.diffusion import Diffusion  # noqa: E402
from dgan.ema import EMA  # noqa: E402
from dgan.errors import EXIT_ERROR, DganError, report  # noqa: E402
from dgan.evaluate import evaluate_generator  # noqa: E402
from dgan.generation import generate, save_grid  # noqa: E402
from dgan.lr_schedule import build_lr_schedule  # noqa: E402
from dgan.models import Generator, PatchDiscriminator  # noqa: E402
from dgan.resume_state import (capture_rng_state, check_compatible, load_state_dict_strict,  # noqa: E402
                               restore_rng_state)
from dgan.rundir import CHECKPOINTS, RunPlan, home_of, lock_run, plan_run  # noqa: E402
from dgan.runinfo import git_hash  # noqa: E402
from dgan.step import Trainables, train_step  # noqa: E402
from dgan.superres import periodic_sr_eval, training_preview  # noqa: E402
from dgan.tracking import Progress, Tracker, flatten  # noqa: E402

T = TypeVar("T")
EXIT_PREEMPTED = 75   # EX_TEMPFAIL: "try again" -- slurm/train.sh requeues on it
EXIT_INTERRUPTED = 130
# Architecture keys that must match for a checkpoint's weights to load.
ARCH_KEYS = ["model.encoder", "model.encoder_depth", "model.decoder_channels", "model.channels",
             "model.num_classes", "model.time_dim", "model.d_channels", "model.d_layers", "model.norm",
             "model.task", "model.norm_conditioning", "diffusion.num_steps", "diffusion.prediction"]
PROGRESS_KEYS = ["kimg", "img/s", "L_diff", "L_adv", "L_D", "r_d", "T_adapt", "d_guard/events"]


@dataclass
class TrainState:
    """The trainer's own state, checkpointed like any other component."""
    step: int = 0
    images_seen: int = 0
    mlflow_run_id: Optional[str] = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        self.step, self.images_seen = int(d["step"]), int(d["images_seen"])
        self.mlflow_run_id = d.get("mlflow_run_id")


class PhaseInterrupted(BaseException):
    """Raised by the signal handler inside an interruptible phase. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` in the sampling or metric code swallows it."""


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (preemption) or SIGINT (Ctrl-C); acted on at a step boundary.

    A step takes well under a second, but a sample grid or a periodic evaluation can take minutes on
    a CPU, longer than SLURM's notice before SIGKILL. Those phases run through `run_phase`: a signal
    during one aborts it at once (the handler raises), and the loop goes straight to the save.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._armed = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            then = "stopping the current phase to save" if self._armed else "saving at the next step boundary"
            print(f"[rank {dist.get_rank()}] received {signal.Signals(signum).name}; {then} a checkpoint",
                  file=sys.stderr, flush=True)
        if self._armed:
            self._armed = False  # disarm first: a second signal must not raise again
            raise PhaseInterrupted(signal.Signals(signum).name)

    def run_phase(self, phase: Callable[[], T], interruptible: bool = True) -> Optional[T]:
        """phase(), or None when a stop signal came before or during it.

        Only for work whose abortion loses nothing the checkpoint needs: sampling and metrics, on
        their own RNG, outside the training state. And only rank-local work: a rank interrupted
        outside a collective would leave its peers waiting inside one, so a multi-rank evaluation
        passes interruptible=False and is acted on after it ends, as before.
        """
        if self.signum is not None:
            return None  # a stop is pending: save first, skip the phase
        try:
            self._armed = interruptible
            try:
                return phase()
            finally:
                self._armed = False
        except PhaseInterrupted:  # also when the signal lands in the `finally` above
            return None


# ----------------------------------------------------------------------------------------
# Building


def build_data(cfg: Config):
    """This rank's training stream (dgan.data.TrainData), sized and seeded from the config."""
    return build_train_data(cfg.data, image_size=cfg.model.image_size, channels=cfg.model.channels,
                            batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                            rank=dist.get_rank(), world_size=dist.get_world_size())


def build_models(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    m = cfg.model
    G = Generator.from_config(m)
    # task=sr: D also sees the upsampled LR (see step.with_cond for why)
    D = PatchDiscriminator(channels=m.channels, base_channels=m.d_channels, num_layers=m.d_layers,
                           time_dim=m.time_dim, num_classes=m.num_classes,
                           num_steps=cfg.diffusion.num_steps, in_channels=m.channels + m.cond_channels)
    G, D = G.to(device), D.to(device)
    if m.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    return G, D


def build_optimizer(params, lr: float, betas: list[float]) -> torch.optim.Adam:
    # fused: one kernel per step, and it honours an on-device found_inf (see step.apply_step)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)


def global_batch_size(cfg: Config) -> int:
    """Images per optimizer step: per-rank batch x ranks x accumulation (logged as global_batch)."""
    return cfg.train.batch_size * dist.get_world_size() * cfg.train.grad_accum


def build_trainables(cfg: Config, device: torch.device) -> tuple[Trainables, EMA, list]:
    G, D = build_models(cfg, device)
    # Built before DDP's rank-0 broadcast, so ranks start with different EMA weights; its
    # first update copies G (identical after the broadcast), so the EMAs agree from step 1.
    ema = EMA(G, halflife_kimg=cfg.train.ema_halflife_kimg, rampup=cfg.train.ema_rampup)
    G_run, D_run = dist.wrap_ddp(G, device), dist.wrap_ddp(D, device)
    if cfg.model.compile:
        # After DDP, as PyTorch recommends: dynamo's DDPOptimizer then splits the graph at
        # bucket boundaries so gradient all-reduces overlap the backward. Only G: the G step
        # calls the raw D, which a compiled DDP wrapper would not cover anyway.
        G_run = torch.compile(G_run)
    # frozen parameters (unused encoder stages) stay out of the optimizer
    opt_g = build_optimizer([p for p in G.parameters() if p.requires_grad], cfg.train.lr_g, cfg.train.betas_g)
    opt_d = build_optimizer(D.parameters(), cfg.train.lr_d, cfg.train.betas_d)
    fp16 = cfg.train.precision == "fp16"
    tr = Trainables(G=G_run, D=D_run, opt_g=opt_g, opt_d=opt_d,
                    scaler_g=torch.amp.GradScaler(device.type, enabled=fp16),
                    scaler_d=torch.amp.GradScaler(device.type, enabled=fp16),
                    diffusion=Diffusion.from_config(cfg.diffusion, device=device),
                    ada=AdaptiveT(target=cfg.gan.ada_target, interval=cfg.gan.ada_interval,
                                  ada_kimg=cfg.gan.ada_kimg, t_min=cfg.gan.t_min, t_max=cfg.gan.t_max,
                                  device=device),
                    skip_streak=torch.zeros((), device=device))
    scheds = [build_lr_schedule(opt, cfg, global_batch_size(cfg)) for opt in (opt_g, opt_d)]
    return tr, ema, scheds


def build_components(tr: Trainables, ema: EMA, scheds: list, state: TrainState,
                     guard: Optional[DHealthGuard] = None) -> dict:
    """Everything with a state_dict that a checkpoint must hold (DESIGN.md state contract)."""
    comps = {"G": tr.G_raw, "D": tr.D_raw, "ema": ema, "opt_g": tr.opt_g, "opt_d": tr.opt_d,
             "scaler_g": tr.scaler_g, "scaler_d": tr.scaler_d, "ada": tr.ada,
             "sched_g": scheds[0], "sched_d": scheds[1], "trainer": state}
    if guard is not None:
        comps["guard"] = guard
    return comps


# ----------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(ckpt: Checkpointer, comps: dict, cfg: Config, run_dir: Path, device,
                    metric: Optional[float] = None) -> None:
    """Collective: every rank contributes its RNG state; rank 0 writes the file.
    `metric` (eval.best_metric's value) lets the Checkpointer keep the best checkpoint."""
    per_rank = dist.all_gather_object({"rng": capture_rng_state(device),
                                       "ada_window": comps["ada"].window_state()})
    if dist.is_main():
        state = {name: c.state_dict() for name, c in comps.items()}
        state["per_rank"] = per_rank
        meta = {"config": to_dict(cfg), "dgan_version": __version__, "git": git_hash(),
                "world_size": dist.get_world_size(), "run_dir": str(run_dir)}
        path = ckpt.save(state, step=comps["trainer"].step, metadata=meta, metric=metric)
        dist.print0(f"saved {path}")
    dist.barrier()


def restore_checkpoint(path: Path, comps: dict, cfg: Config, device) -> None:
    try:
        payload = load_checkpoint(path, map_location=device)
    except CheckpointSchemaError:
        raise  # from a newer dgan: falling back to an older checkpoint would lose work
    except CheckpointError as e:
        raise CheckpointError(f"{e}, or --resume auto to fall back to the newest valid one") from None
    # A different SR scale is a different task even though the weights would load.
    keys = ARCH_KEYS + (["model.sr_scale"] if cfg.model.task == "sr" else [])
    run_config = home_of(path) / "config.yaml"  # still the run's own: nothing is written before this check
    check_compatible(with_legacy_defaults(payload["metadata"]["config"]), to_dict(cfg), keys,
                     str(run_config) if run_config.is_file() else "runs/<run>/config.yaml")
    state = payload["state"]
    for name, comp in comps.items():
        if name == "guard" and name not in state:
            continue  # written before the guard existed: it starts afresh (it holds no model state)
        if isinstance(comp, torch.nn.Module):
            load_state_dict_strict(comp, state[name], name, path)
        else:
            comp.load_state_dict(state[name])
    saved_world = payload["metadata"]["world_size"]
    if saved_world == dist.get_world_size():
        mine = state["per_rank"][dist.get_rank()]
        restore_rng_state(mine["rng"], device)
        comps["ada"].load_window_state(mine["ada_window"])
    else:
        # Per-rank RNG streams cannot be mapped onto a different world size; reseed
        # deterministically instead. Weights, optimizers, EMA and p/T_adapt are exact; the
        # data position is re-derived from images seen (see data_position); the r_d window
        # since the last adaptive-T update starts afresh.
        dist.print0(f"warning: checkpoint was written with world size {saved_world}, now "
                    f"{dist.get_world_size()}; RNG streams are re-seeded, the data position re-derived")
        seed_everything(cfg.train.seed + 7919 * comps["trainer"].step)
        rederive_lr_schedules([comps["sched_g"], comps["sched_d"]], comps["trainer"].images_seen, cfg)
    dist.print0(f"resumed from {path} at step {comps['trainer'].step} "
                f"({comps['trainer'].images_seen} images seen)")


def rederive_lr_schedules(scheds: list, images_seen: int, cfg: Config) -> None:
    """Move the (step-counted) schedules to the step that images_seen is in the new world.

    The warm-up is fixed in images (warmup_kimg); its length in steps depends on the global
    batch. Without this a 2 -> 1 rank resume would halve the learning rate mid-warm-up.
    """
    steps = images_seen // global_batch_size(cfg)
    for sched in scheds:
        sched.last_epoch = steps - 1
        sched.step()  # recomputes the optimizer's lr for step `steps`


def seed_everything(seed: int) -> None:
    rank_seed = seed * 1000 + dist.get_rank()  # each rank its own stream
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)


# ----------------------------------------------------------------------------------------
# The loop


def data_position(data, state: TrainState, cfg: Config) -> tuple[int, int]:
    """(epoch, batch within it) of this rank's next micro-batch, from images seen.

    Every rank has consumed images_seen / (batch x world size) micro-batches; with the same
    world size that is exactly where the stream stopped. After a world-size change it is
    the same fraction of the data, in the new world's batch order.
    """
    per_rank_batches = state.images_seen // (cfg.train.batch_size * dist.get_world_size())
    return divmod(per_rank_batches, data.batches_per_epoch)


def batches_for(data, state: TrainState, cfg: Config):
    """Endless micro-batches starting at the exact data position implied by images_seen."""
    epoch, start = data_position(data, state, cfg)
    while True:
        yield from data.epoch(epoch, start)
        epoch, start = epoch + 1, 0


def next_micro_batches(stream, cfg: Config, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's grad_accum micro-batches, on the device in the model's memory format."""
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    # channels_last weights with NCHW inputs would make every conv convert its input
    return [(x.to(device, non_blocking=True).contiguous(memory_format=fmt), y.to(device, non_blocking=True))
            for x, y in (next(stream) for _ in range(cfg.train.grad_accum))]


def take_step(tr: Trainables, ema: EMA, scheds: list, state: TrainState, cfg: Config,
              micro: list) -> dict[str, torch.Tensor]:
    """Phases 2-3 of a step, on every rank: the hybrid G/D step, LR schedule, EMA, adaptive T."""
    metrics = train_step(tr, cfg, micro, state.step)
    for sched in scheds:
        sched.step()
    state.step, state.images_seen = state.step + 1, state.images_seen + global_batch_size(cfg)
    dist.broadcast_buffers(tr.G_raw, tr.D_raw)  # BatchNorm statistics, if any: one EMA on all ranks
    ema.update(tr.G_raw, images_seen=state.images_seen, batch_images=global_batch_size(cfg))
    if tr.ada.should_update(state.step - 1):  # it takes the 0-based index of the step done
        tr.ada.update(reduce_fn=dist.all_reduce_sum)  # r_d summed over ranks: one p everywhere
    return metrics


class MetricWindow:
    """Sums metric tensors on device; reduced across ranks and read once per log interval."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.n += 1

    def reduce(self) -> dict[str, float]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        packed = torch.stack([self.sums[k] for k in keys]) / max(self.n, 1)
        packed = dist.all_reduce_sum(packed) / dist.get_world_size()
        out = dict(zip(keys, packed.tolist()))  # the one host sync per interval
        out["skipped"] = out["skipped"] * self.n  # a count, not a mean
        self.sums, self.n = {}, 0
        return out


def build_tracker(cfg: Config, run_dir: Path, state: TrainState, data) -> Tracker:
    tracker = Tracker(enabled=dist.is_main(), root=cfg.log.root, experiment=cfg.log.experiment,
                      run_name=run_dir.name, tracking_uri=cfg.log.tracking_uri, run_id=state.mlflow_run_id)
    state.mlflow_run_id = tracker.run_id
    params = flatten(to_dict(cfg))
    params.update({"data.manifest_hash": data.manifest.get("hash", ""), "run_dir": str(run_dir),
                   "world_size": dist.get_world_size(), "git": git_hash(), "dgan_version": __version__,
                   "global_batch": global_batch_size(cfg)})
    tracker.log_params(params)
    tracker.log_artifact(run_dir / "config.yaml")
    return tracker


def crossed(images_before: int, images_after: int, every_kimg: float) -> bool:
    """True when images seen crossed a multiple of every_kimg in this step."""
    every = max(1, round(every_kimg * 1000))
    return images_before // every != images_after // every


def log_interval(window: MetricWindow, tr: Trainables, data, state: TrainState, clock: dict,
                 tracker: Tracker, progress: Progress, device: torch.device, guard: DHealthGuard) -> dict[str, float]:
    m = window.reduce()
    event = guard.check(m, state.step)  # acts on this interval's reduced numbers: the same on all ranks
    if event and dist.is_main():
        progress.note(event)
    now = time.perf_counter()
    imgs = state.images_seen - clock["images"]
    m.update({"kimg": state.images_seen / 1000, "img/s": imgs / max(now - clock["time"], 1e-9),
              "sec/kimg": (now - clock["time"]) / max(imgs / 1000, 1e-9),
              "r_d": float(tr.ada.r_d), "T_adapt": float(tr.ada.t_adapt), "ada_p": float(tr.ada.p),
              "lr_g": tr.opt_g.param_groups[0]["lr"], "lr_d": tr.opt_d.param_groups[0]["lr"],
              "skip_streak": float(tr.skip_streak), "d_guard/events": float(guard.events)})
    skipped = torch.tensor(float(sum(data.skipped().values())))
    m["data/skipped"] = float(dist.all_reduce_sum(skipped.to(device)))
    if device.type == "cuda":
        m["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    clock.update(time=now, images=state.images_seen)
    tracker.log_metrics(m, step=state.step)
    progress.advance(state.step, m)
    return m


def write_samples(ema, tr: Trainables, cfg: Config, run_dir: Path, state: TrainState, tracker: Tracker) -> None:
    if not dist.is_main():
        return
    nrow = None
    if cfg.model.task == "sr":  # unconditional samples mean nothing here: show LR | bicubic | SR | HR
        x, nrow = training_preview(ema.module, tr.diffusion, cfg)
    else:
        x = generate(ema.module, tr.diffusion, n=cfg.log.num_samples, sampler="ddim", steps=cfg.log.sample_steps,
                     seed=cfg.train.seed, channels=cfg.model.channels, image_size=cfg.model.image_size,
                     num_classes=cfg.model.num_classes)
    path = save_grid(x, run_dir / "samples" / f"samples-{state.images_seen // 1000:06d}kimg.png", nrow=nrow)
    save_grid(x, run_dir / "samples.png", nrow=nrow)  # the latest grid, at a fixed name
    tracker.log_artifact(path, "samples")


class EvalNotReady(ConfigError):
    """eval.* asks for what this machine lacks (a weights file, an extra). A ConfigError, since it
    names eval keys, but exit code 1: the config itself may be right for another machine."""
    exit_code = EXIT_ERROR


def check_eval_ready(cfg: Config) -> None:
    """Periodic FID/KID with Inception needs its weights file, FRD its extra: fail now, not hours into the run."""
    ev = cfg.eval
    if ev.every_kimg > 0 and ev.feature_extractor is None and {"fid", "kid"} & set(ev.metrics):
        from dgan.metrics import MetricError, resolve_inception_weights  # torch-fidelity: only when used
        try:
            resolve_inception_weights(ev.fid_weights)
        except MetricError as e:
            raise EvalNotReady(f"eval.every_kimg > 0 needs FID weights: {e}") from None
    if ev.every_kimg > 0 and "frd" in ev.metrics:
        from dgan.metrics import MetricError, require_frd  # torch-fidelity: slow to import
        try:
            require_frd()
        except MetricError as e:
            raise EvalNotReady(f"eval.metrics has frd: {e}") from None


def periodic_eval(cfg: Config, ema: EMA, tr: Trainables, state: TrainState, tracker: Tracker,
                  device: torch.device) -> Optional[float]:
    """eval.every_kimg: every rank generates its share of a small sample set; all get the same
    numbers. Logged as eval/* over time; returns the best-metric value for the Checkpointer."""
    from dgan.metrics import MetricError  # torch-fidelity: slow to import
    ev = cfg.eval
    dist.print0(f"evaluating at step {state.step}: {ev.num_samples} samples, {ev.sampler} {ev.steps}")
    try:
        if cfg.model.task == "sr":  # SR vs bicubic PSNR/SSIM on held-out images (dgan.superres)
            m = periodic_sr_eval(ema.module, tr.diffusion, cfg)
        else:
            m = evaluate_generator(ema.module, tr.diffusion, cfg, num_samples=ev.num_samples, sampler=ev.sampler,
                                   steps=ev.steps, seed=cfg.train.seed, metrics=list(ev.metrics),
                                   extractor_path=ev.feature_extractor, fid_weights=ev.fid_weights,
                                   reference=ev.reference, device=device)
    except MetricError as e:  # an evaluation problem must not end a run that costs GPU-days
        dist.print0(f"warning: periodic evaluation failed at step {state.step}: {e}")
        return None
    tracker.log_metrics({f"eval/{k}": v for k, v in m.items()}, step=state.step)
    dist.print0("eval at step {}: {}".format(state.step, " ".join(f"{k} {v:.4g}" for k, v in sorted(m.items()))))
    return m.get(ev.best_metric) if ev.best_metric else None


def train(cfg: Config, plan: RunPlan, device: torch.device) -> int:
    # Handlers first: a preemption signal during the (possibly long) build must not kill the
    # process with the default action; it is acted on at the first step boundary instead.
    stop = StopFlag()
    # -- Build: data first, so a bad path fails before any model is built -----------------
    check_eval_ready(cfg)
    seed_everything(cfg.train.seed)
    data = build_data(cfg)
    tr, ema, scheds = build_trainables(cfg, device)
    state = TrainState()
    guard = DHealthGuard(cfg.gan, tr, scheds[1])
    comps = build_components(tr, ema, scheds, state, guard)
    run_dir = plan.run_dir
    ckpt = Checkpointer(run_dir / CHECKPOINTS, keep_last=cfg.train.keep_last,
                        best_metric=cfg.eval.best_metric, best_mode=cfg.eval.best_mode)
    if plan.resume is not None:
        restore_checkpoint(plan.resume, comps, cfg, device)
        epoch, batch = data_position(data, state, cfg)
        dist.print0(f"data position: epoch {epoch}, batch {batch} of {data.batches_per_epoch} per rank")
    # Only now, with the data built and the checkpoint loaded and checked against the config, is
    # anything written: a failed start leaves no half-made run and keeps the run's config.yaml.
    lock = claim_run_dir(cfg, run_dir)
    tracker = build_tracker(cfg, run_dir, state, data)
    global_batch = global_batch_size(cfg)
    # Counted in images, not steps: after a world-size change a step holds another number.
    images_left = max(0, round(cfg.train.total_kimg * 1000) - state.images_seen)
    total_steps = state.step + math.ceil(images_left / global_batch)
    stream, window = batches_for(data, state, cfg), MetricWindow()
    dist.print0(f"run {run_dir}: {total_steps} steps of {global_batch} images "
                f"({dist.get_world_size()} ranks x {cfg.train.batch_size} x {cfg.train.grad_accum} accum)")
    clock = {"time": time.perf_counter(), "images": state.images_seen, "ckpt": time.monotonic()}
    exit_code, status = 0, "FINISHED"
    progress = Progress(total_steps=total_steps, start_step=state.step, enabled=dist.is_main() and cfg.log.progress,
                        keys=PROGRESS_KEYS)
    with progress:
        while state.step < total_steps:
            # -- Phase 1: data -------------------------------------------------------------
            micro = next_micro_batches(stream, cfg, device)
            # -- Phases 2-3: the hybrid G/D step, EMA of G, the adaptive diffusion length --
            before = state.images_seen
            window.add(take_step(tr, ema, scheds, state, cfg, micro))
            last = state.step == total_steps
            # -- Phase 4: log once per interval (the only host sync) ----------------------
            if state.step % cfg.log.every_steps == 0 or last:
                m = log_interval(window, tr, data, state, clock, tracker, progress, device, guard)
                if m["skip_streak"] >= cfg.train.max_skipped_steps:  # reduced: the same on all ranks
                    save_checkpoint(ckpt, comps, cfg, run_dir, device)
                    raise FloatingPointError(
                        f"{int(m['skip_streak'])} consecutive steps had non-finite losses or gradients; "
                        f"stopped with the last good weights in {ckpt.ckpt_dir}. Lower train.lr_g/lr_d, "
                        "use train.precision=bf16 instead of fp16, or tighten train.grad_clip_*")
            # -- Phase 5: samples and checkpoints -----------------------------------------
            # Both are interruptible (StopFlag.run_phase): a signal during either saves within seconds.
            if crossed(before, state.images_seen, cfg.log.sample_every_kimg) or last:  # rank 0 only
                stop.run_phase(lambda: write_samples(ema, tr, cfg, run_dir, state, tracker))
            metric = None
            if cfg.eval.every_kimg > 0 and (crossed(before, state.images_seen, cfg.eval.every_kimg) or last):
                metric = stop.run_phase(lambda: periodic_eval(cfg, ema, tr, state, tracker, device),
                                        interruptible=dist.get_world_size() == 1)
            due_time = (time.monotonic() - clock["ckpt"]) / 60 >= cfg.train.ckpt_every_min
            # One agreement per step: a signal seen by ANY rank (or its clock) stops/saves ALL ranks.
            stop_now, ctrl_c, due_time = dist.any_rank_flags(
                [stop.signum is not None, stop.signum == signal.SIGINT, due_time])
            if (stop_now or due_time or last or metric is not None
                    or crossed(before, state.images_seen, cfg.train.ckpt_every_kimg)):
                save_checkpoint(ckpt, comps, cfg, run_dir, device, metric=metric)
                clock["ckpt"] = time.monotonic()
            if stop_now and not last:  # a signal at the very end: the run is complete, exit 0
                exit_code, status = (EXIT_INTERRUPTED if ctrl_c else EXIT_PREEMPTED), "KILLED"
                report_stop(state, run_dir, exit_code)
                break
    tracker.close(status)
    if lock is not None:
        os.close(lock)
    return exit_code


def claim_run_dir(cfg: Config, run_dir: Path) -> Optional[int]:
    """Rank 0 creates the run dir, locks it (rundir.lock_run) and writes config.yaml; a refusal
    there stops every rank (dist.on_main). Returns the lock's fd on rank 0, None elsewhere."""
    def claim() -> Optional[int]:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run(run_dir)
        save_config(cfg, run_dir / "config.yaml")  # after the lock: never over a running run's
        return lock
    lock = dist.on_main(claim)
    return lock if dist.is_main() else None


def report_stop(state: TrainState, run_dir: Path, exit_code: int) -> None:
    # Every rank says how it ends: under torchrun this is the only record of the workers'
    # exit codes, since the agent reports its own (1) after handling a signal.
    print(f"[rank {dist.get_rank()}] stopped at step {state.step} with a checkpoint; exit code {exit_code}",
          file=sys.stderr, flush=True)
    dist.print0(f"stopped at step {state.step}; resume with --resume auto log.run_name={run_dir.name}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dgan.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/); defaults give the CPU quick start")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint of the run), or a run folder, its "
                   "checkpoints/ folder or a checkpoint file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr_g=1e-4 model.encoder=resnet34")
    # intermixed: `a=b --resume auto c=d` works as well as options first
    return p.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        return report(e)
    device = dist.init(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    try:
        return train(cfg, plan_run(cfg, args.config), device)
    except DganError as e:
        return report(e)
    except (FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
