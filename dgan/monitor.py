"""What a training run reports while it runs: metric windows reduced once per log interval, the
MLflow run and status line, sample grids, and the periodic evaluation (eval.every_kimg).

Nothing here changes the training state: sampling and scoring draw from their own seeded
generators, so exact resume holds whether or not they ran.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from dgan import __version__
from dgan import distributed as dist
from dgan.adv_schedule import global_batch_size
from dgan.config import Config, ConfigError, to_dict
from dgan.dguard import DHealthGuard
from dgan.ema import EMA
from dgan.errors import EXIT_ERROR
from dgan.generation import generate, save_grid
from dgan.runinfo import git_hash
from dgan.scoring import evaluate_generator
from dgan.step import Trainables, TrainState
from dgan.superres import periodic_sr_eval, training_preview
from dgan.progress import Progress
from dgan.tracking import Tracker, flatten


D_METRICS = ("L_adv", "L_D", "L_r1", "D_real", "D_fake", "grad_norm_d")  # zero on a step without D


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
        # D's metrics are means over the steps that ran D (gan.self_fake_every: one in N), not over all
        share = out.pop("d_steps", 1.0)
        for k in D_METRICS if 0 < share < 1 else ():
            out[k] = out.get(k, 0.0) / share
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
