"""The Trainer: data, trainables (G, D, optimizers, scalers, diffusion, adaptive T), EMA, lr
schedules, the trainer's state, the D-health guard and the checkpointer, in one object.

    trainer = Trainer.build(cfg, device)        # seeded; data first, so a bad path fails early
    trainer.restore(path)                       # weights, optimizers, RNG streams, data position
    trainer.step(trainer.next_micro_batches(stream))  # one hybrid step on every rank
    trainer.save(metric=None)                   # collective; rank 0 writes the file
    trainer.run(plan, stop)                     # the loop of dgan.train, as labelled phases

Benchmarks and test workers drive `step` themselves; `run` adds logging, samples, the periodic
evaluation and the save schedule (checkpoint.SavePolicy). The same code runs as one process or
under torchrun (world size 1 is just a small world).
"""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dgan import __version__
from dgan import distributed as dist
from dgan.adaptive import AdaptiveT
from dgan.adv_schedule import global_batch_size
from dgan.checkpoint import CheckpointError, Checkpointer, CheckpointSchemaError, SavePolicy, load_checkpoint
from dgan.config import Config, to_dict, with_legacy_defaults
from dgan.data import build_train_data
from dgan.dguard import DHealthGuard
from dgan.diffusion import Diffusion
from dgan.ema import EMA
from dgan.lr_schedule import build_lr_schedule
from dgan.models import Generator, PatchDiscriminator
from dgan.monitor import (MetricWindow, build_tracker, crossed, log_interval, periodic_eval,
                          write_samples)
from dgan.resume_state import (capture_rng_state, check_compatible, load_state_dict_strict, recipe_changes,
                               restore_rng_state)
from dgan.rundir import CHECKPOINTS, RunPlan, claim_run_dir, home_of
from dgan.runinfo import git_hash
from dgan.step import Trainables, TrainState, train_step
from dgan.stopping import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopFlag
from dgan.progress import Progress

# Architecture keys that must match for a checkpoint's weights to load.
ARCH_KEYS = ["model.encoder", "model.encoder_depth", "model.decoder_channels", "model.channels",
             "model.num_classes", "model.time_dim", "model.d_channels", "model.d_layers", "model.norm",
             "model.task", "model.norm_conditioning", "diffusion.num_steps", "diffusion.prediction",
             "gan.d_sees_xt"]
PROGRESS_KEYS = ["kimg", "img/s", "L_diff", "L_adv", "L_D", "r_d", "T_adapt", "d_guard/events"]


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
    # task=sr: D also sees the upsampled LR; gan.d_sees_xt: the noisy x_t (see step.d_context for why)
    pair = cfg.gan.d_sees_xt
    D = PatchDiscriminator(channels=m.channels, base_channels=m.d_channels, num_layers=m.d_layers,
                           time_dim=m.time_dim, num_classes=m.num_classes, num_steps=cfg.diffusion.num_steps,
                           in_channels=m.channels * (2 if pair else 1) + m.cond_channels, condition_on_t=pair)
    G, D = G.to(device), D.to(device)
    if m.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    return G, D


def build_optimizer(params, lr: float, betas: list[float]) -> torch.optim.Adam:
    # fused: one kernel per step, and it honours an on-device found_inf (see update.apply_step)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)


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


def seed_everything(seed: int) -> None:
    rank_seed = seed * 1000 + dist.get_rank()  # each rank its own stream
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)


def rederive_lr_schedules(scheds: list, images_seen: int, cfg: Config) -> None:
    """Move the (step-counted) schedules to the step that images_seen is in the new world.

    The warm-up is fixed in images (warmup_kimg); its length in steps depends on the global
    batch. Without this a 2 -> 1 rank resume would halve the learning rate mid-warm-up.
    """
    steps = images_seen // global_batch_size(cfg)
    for sched in scheds:
        sched.last_epoch = steps - 1
        sched.step()  # recomputes the optimizer's lr for step `steps`


def data_position(data, state: TrainState, cfg: Config) -> tuple[int, int]:
    """(epoch, batch within it) of this rank's next micro-batch, from images seen.

    Every rank has consumed images_seen / (batch x world size) micro-batches; with the same
    world size that is exactly where the stream stopped. After a world-size change it is
    the same fraction of the data, in the new world's batch order.
    """
    per_rank_batches = state.images_seen // (cfg.train.batch_size * dist.get_world_size())
    return divmod(per_rank_batches, data.batches_per_epoch)


# ----------------------------------------------------------------------------------------
# The Trainer


class Trainer:
    """Everything a training run updates or checkpoints; see the module docstring for its use."""

    def __init__(self, cfg: Config, device: torch.device, tr: Trainables, ema: EMA, scheds: list, data=None) -> None:
        self.cfg, self.device, self.data = cfg, device, data
        self.tr, self.ema, self.scheds = tr, ema, scheds
        self.state = TrainState()
        self.guard = DHealthGuard(cfg.gan, tr, scheds[1])
        self.run_dir: Optional[Path] = None
        self.ckpt: Optional[Checkpointer] = None

    @classmethod
    def build(cls, cfg: Config, device: torch.device, *, data: bool = True) -> Trainer:
        """Seeded as dgan.train seeds it. data=False: the caller feeds its own micro-batches (benchmarks)."""
        seed_everything(cfg.train.seed)
        built = build_data(cfg) if data else None  # first, so a bad data path fails before any model is built
        tr, ema, scheds = build_trainables(cfg, device)
        return cls(cfg, device, tr, ema, scheds, built)

    @property
    def global_batch(self) -> int:
        return global_batch_size(self.cfg)

    def components(self) -> dict:
        """Everything with a state_dict that a checkpoint must hold (DESIGN.md state contract)."""
        tr = self.tr
        return {"G": tr.G_raw, "D": tr.D_raw, "ema": self.ema, "opt_g": tr.opt_g, "opt_d": tr.opt_d,
                "scaler_g": tr.scaler_g, "scaler_d": tr.scaler_d, "ada": tr.ada, "sched_g": self.scheds[0],
                "sched_d": self.scheds[1], "trainer": self.state, "guard": self.guard}

    # -- data --------------------------------------------------------------------------------

    def batches(self):
        """Endless micro-batches starting at the exact data position implied by images_seen."""
        epoch, start = data_position(self.data, self.state, self.cfg)
        while True:
            yield from self.data.epoch(epoch, start)
            epoch, start = epoch + 1, 0

    def next_micro_batches(self, stream) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The step's grad_accum micro-batches, on the device in the model's memory format."""
        fmt = torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format
        # channels_last weights with NCHW inputs would make every conv convert its input
        return [(x.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                 y.to(self.device, non_blocking=True))
                for x, y in (next(stream) for _ in range(self.cfg.train.grad_accum))]

    # -- one step ----------------------------------------------------------------------------

    def live_scheds(self) -> list:
        """The lr schedules whose optimizers step. Pure diffusion never steps D's optimizer, and
        stepping its schedule anyway made torch warn; D's schedule stays at its start, as D does, so
        a pure-diffusion run resumed with the term on the same world size warms D up from scratch."""
        return self.scheds if self.cfg.gan.adv_weight > 0 else self.scheds[:1]

    def step(self, micro: list) -> dict[str, torch.Tensor]:
        """On every rank: the hybrid G/D step, the lr schedules, EMA of G, the adaptive diffusion length.
        Returns detached metric tensors (no host sync)."""
        tr, state = self.tr, self.state
        metrics = train_step(tr, self.cfg, micro, state.step)
        for sched in self.live_scheds():
            sched.step()
        state.step, state.images_seen = state.step + 1, state.images_seen + self.global_batch
        dist.broadcast_buffers(tr.G_raw, tr.D_raw)  # BatchNorm statistics, if any: one EMA on all ranks
        self.ema.update(tr.G_raw, images_seen=state.images_seen, batch_images=self.global_batch)
        if tr.ada.should_update(state.step - 1):  # it takes the 0-based index of the step done
            tr.ada.update(reduce_fn=dist.all_reduce_sum)  # r_d summed over ranks: one p everywhere
        return metrics

    # -- checkpoints -------------------------------------------------------------------------

    def use_run_dir(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        ev = self.cfg.eval
        self.ckpt = Checkpointer(self.run_dir / CHECKPOINTS, keep_last=self.cfg.train.keep_last,
                                 best_metric=ev.best_metric, best_mode=ev.best_mode)

    def save(self, metric: Optional[float] = None) -> None:
        """Collective: every rank contributes its RNG state; rank 0 writes the file. `metric`
        (eval.best_metric's value) lets the Checkpointer keep the best checkpoint."""
        per_rank = dist.all_gather_object({"rng": capture_rng_state(self.device),
                                           "ada_window": self.tr.ada.window_state()})
        if dist.is_main():
            state = {name: c.state_dict() for name, c in self.components().items()}
            state["per_rank"] = per_rank
            meta = {"config": to_dict(self.cfg), "dgan_version": __version__, "git": git_hash(),
                    "world_size": dist.get_world_size(), "run_dir": str(self.run_dir)}
            path = self.ckpt.save(state, step=self.state.step, metadata=meta, metric=metric)
            dist.print0(f"saved {path}")
        dist.barrier()

    def restore(self, path: Path) -> None:
        """Load a checkpoint into every component, after checking it against the config."""
        cfg = self.cfg
        try:
            payload = load_checkpoint(path, map_location=self.device)
        except CheckpointSchemaError:
            raise  # from a newer dgan: falling back to an older checkpoint would lose work
        except CheckpointError as e:
            raise CheckpointError(f"{e}, or --resume auto to fall back to the newest valid one") from None
        if "student" in payload["metadata"]:
            raise CheckpointError(f"{path} is a dgan.distill student (weights only): it cannot resume training; "
                                  f"resume its teacher's run, {payload['metadata']['student'].get('teacher')}")
        # A different SR scale is a different task even though the weights would load.
        keys = ARCH_KEYS + (["model.sr_scale"] if cfg.model.task == "sr" else [])
        run_config = home_of(path) / "config.yaml"  # still the run's own: nothing is written before this check
        saved, current = with_legacy_defaults(payload["metadata"]["config"]), to_dict(cfg)
        check_compatible(saved, current, keys, str(run_config) if run_config.is_file() else "runs/<run>/config.yaml")
        changes = recipe_changes(saved, current)
        if changes:
            dist.print0(f"warning: this resume changes the checkpoint's recipe; the checkpoint had {', '.join(changes)}"
                        " -- pass those overrides to keep its recipe")
        state = payload["state"]
        for name, comp in self.components().items():
            if name == "guard" and name not in state:
                continue  # written before the guard existed: it starts afresh (it holds no model state)
            if isinstance(comp, torch.nn.Module):
                load_state_dict_strict(comp, state[name], name, path)
            else:
                comp.load_state_dict(state[name])
        self._restore_streams(state["per_rank"], payload["metadata"]["world_size"])
        dist.print0(f"resumed from {path} at step {self.state.step} ({self.state.images_seen} images seen)")

    def _restore_streams(self, per_rank: list, saved_world: int) -> None:
        if saved_world == dist.get_world_size():
            mine = per_rank[dist.get_rank()]
            restore_rng_state(mine["rng"], self.device)
            self.tr.ada.load_window_state(mine["ada_window"])
            return
        # Per-rank RNG streams cannot be mapped onto a different world size; reseed
        # deterministically instead. Weights, optimizers, EMA and p/T_adapt are exact; the
        # data position is re-derived from images seen (see data_position); the r_d window
        # since the last adaptive-T update starts afresh.
        dist.print0(f"warning: checkpoint was written with world size {saved_world}, now "
                    f"{dist.get_world_size()}; RNG streams are re-seeded, the data position re-derived")
        seed_everything(self.cfg.train.seed + 7919 * self.state.step)
        rederive_lr_schedules(self.live_scheds(), self.state.images_seen, self.cfg)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, plan: RunPlan, stop: StopFlag) -> int:
        """dgan.train's loop: resume, claim the run dir, train to total_kimg. Returns the exit code."""
        cfg, state = self.cfg, self.state
        if plan.resume is not None:
            self.restore(plan.resume)
            epoch, batch = data_position(self.data, state, cfg)
            dist.print0(f"data position: epoch {epoch}, batch {batch} of {self.data.batches_per_epoch} per rank")
        # Only now, with the data built and the checkpoint loaded and checked against the config, is
        # anything written: a failed start leaves no half-made run and keeps the run's config.yaml.
        lock = claim_run_dir(cfg, plan.run_dir)
        try:
            self.use_run_dir(plan.run_dir)
            tracker = build_tracker(cfg, plan.run_dir, state, self.data)
            # Counted in images, not steps: after a world-size change a step holds another number.
            images_left = max(0, round(cfg.train.total_kimg * 1000) - state.images_seen)
            total_steps = state.step + math.ceil(images_left / self.global_batch)
            dist.print0(f"run {plan.run_dir}: {total_steps} steps of {self.global_batch} images "
                        f"({dist.get_world_size()} ranks x {cfg.train.batch_size} x {cfg.train.grad_accum} accum)")
            progress = Progress(total_steps=total_steps, start_step=state.step,
                                enabled=dist.is_main() and cfg.log.progress, keys=PROGRESS_KEYS)
            with progress:
                exit_code = self._loop(stop, tracker, progress, total_steps)
            tracker.close("FINISHED" if exit_code == 0 else "KILLED")
            return exit_code
        finally:
            if lock is not None:
                os.close(lock)

    def _loop(self, stop: StopFlag, tracker, progress: Progress, total_steps: int) -> int:
        cfg, state = self.cfg, self.state
        stream, window = self.batches(), MetricWindow()
        clock = {"time": time.perf_counter(), "images": state.images_seen}
        saves = SavePolicy(cfg.train.ckpt_every_kimg, cfg.train.ckpt_every_min)
        while state.step < total_steps:
            # -- Phase 1: data -----------------------------------------------------------------
            micro = self.next_micro_batches(stream)
            # -- Phases 2-3: the hybrid G/D step, EMA of G, the adaptive diffusion length ------
            before = state.images_seen
            window.add(self.step(micro))
            last = state.step == total_steps
            # -- Phase 4: log once per interval (the only host sync) --------------------------
            if state.step % cfg.log.every_steps == 0 or last:
                m = log_interval(window, self.tr, self.data, state, clock, tracker, progress, self.device,
                                 self.guard)
                self._stop_if_stuck(m)
            # -- Phase 5: samples and the periodic evaluation (a signal aborts them) ----------
            metric = self._periodic(stop, tracker, before, last)
            # -- Phase 6: checkpoint; one agreement per step, so a signal seen by ANY rank (or
            # its clock) stops and saves ALL ranks ---------------------------------------------
            stop_now, ctrl_c, time_due = dist.any_rank_flags([stop.signum is not None, stop.ctrl_c,
                                                              saves.time_due()])
            if saves.due(before, state.images_seen, last=last, stop=stop_now, evaluated=metric is not None,
                         time_due=time_due):
                self.save(metric=metric)
                saves.saved()
            if stop_now and not last:  # a signal at the very end: the run is complete, exit 0
                exit_code = EXIT_INTERRUPTED if ctrl_c else EXIT_PREEMPTED
                report_stop(state, self.run_dir, exit_code)
                return exit_code
        return 0

    def _stop_if_stuck(self, m: dict[str, float]) -> None:
        if m["skip_streak"] >= self.cfg.train.max_skipped_steps:  # reduced: the same on all ranks
            self.save()
            raise FloatingPointError(
                f"{int(m['skip_streak'])} consecutive steps had non-finite losses or gradients; "
                f"stopped with the last good weights in {self.ckpt.ckpt_dir}. Lower train.lr_g/lr_d, "
                "use train.precision=bf16 instead of fp16, or tighten train.grad_clip_*")

    def _periodic(self, stop: StopFlag, tracker, before: int, last: bool) -> Optional[float]:
        """Sample grid and periodic evaluation when due; returns the best-metric value, if any."""
        cfg, state = self.cfg, self.state
        if crossed(before, state.images_seen, cfg.log.sample_every_kimg) or last:  # rank 0 only
            stop.run_phase(lambda: write_samples(self.ema, self.tr, cfg, self.run_dir, state, tracker))
        if cfg.eval.every_kimg > 0 and (crossed(before, state.images_seen, cfg.eval.every_kimg) or last):
            return stop.run_phase(lambda: periodic_eval(cfg, self.ema, self.tr, state, tracker, self.device),
                                  interruptible=dist.get_world_size() == 1)
        return None


def report_stop(state: TrainState, run_dir: Path, exit_code: int) -> None:
    # Every rank says how it ends: under torchrun this is the only record of the workers'
    # exit codes, since the agent reports its own (1) after handling a signal.
    dist.print_rank(f"stopped at step {state.step} with a checkpoint; exit code {exit_code}")
    dist.print0(f"stopped at step {state.step}; resume with --resume auto log.run_name={run_dir.name}")
