"""python -m dgan.distill: a few-step DDIM student distilled from a checkpoint's own many-step DDIM.

    python -m dgan.distill --checkpoint runs/<run>/checkpoints/ckpt-best.pt [--steps 10 --teacher-steps 50]
    python -m dgan.sample --checkpoint runs/<run>/student-ddim10/student.pt --sampler ddim --steps 10

The teacher (the checkpoint's EMA G) runs DDIM on its --teacher-steps grid from --trajectories
noises of their own seeded stream (never a sample's noise), keeping x at every point of the --steps
grid, which lies inside it (the grids nest when --teacher-steps is a multiple of --steps). The
student starts as the teacher and learns, for each pair of neighbouring points (t, s) of the
--steps grid, the x0 whose single DDIM step t -> s lands where the teacher's steps between them
land: its 10 steps then retrace the teacher's 50. The loss weights the x0 error by 1 / (1 - alpha_bar_t),
v-prediction's own weighting (whatever the run's prediction), under the run's train.precision.

Why a separate student: every lever that taught G itself to take large DDIM steps (a stronger
adversarial push, a G told the step size, shortcut targets) made its many-step samplers worse
(benchmarks/RESULTS.md, issue 10). The student leaves the teacher, and so DDIM 50 and DPM-Solver++,
as they are. One round from the many-step teacher, in the spirit of progressive distillation
(Salimans and Ho 2022), which halves the steps per round instead.

The student is a checkpoint like any other (`dgan.sample`, `dgan.evaluate --fid`, `dgan.export`
read it), holding only EMA weights (it cannot resume training). Its metadata's `student` records
the grid it learnt, and those CLIs refuse any other sampler, step count, eta or --t-min for it.
Score its samples (`dgan.evaluate --fid --steps 10`): its PSNR/SSIM reconstructions measure a one-step
x0 that is no longer the posterior mean, so they say nothing about it.
It prints the student's and the teacher's distance from the teacher's many-step samples on
--held-out more trajectories, so a student that did not learn is visible at once. Single process:
on a GPU the default takes about a minute; on 2 CPU cores about 7 minutes. An existing --out is
never overwritten. Unconditional, noise-to-image checkpoints only.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from dgan import distributed as dist
from dgan.atomic import torch_save_atomic
from dgan.checkpoint import SCHEMA_VERSION, load_checkpoint
from dgan.config import positive_int_arg
from dgan.ema import EMA
from dgan.errors import DganError, UsageError, report
from dgan.generation import guided_model_fn, initial_noise, load_generator
from dgan.rundir import home_of, output_dir
from dgan.runinfo import file_sha256
from dgan.seeding import Stream, stream_generator
from dgan.step import autocast_for


def nested_grid(diffusion, teacher_steps: int, steps: int) -> tuple[list[int], list[int]]:
    """(the teacher's grid, the student's), checked to nest: every student timestep is a teacher's."""
    if not 1 <= steps < teacher_steps <= diffusion.num_steps:
        raise UsageError(f"--steps {steps} and --teacher-steps {teacher_steps}: need 1 <= --steps < --teacher-steps "
                         f"<= T = {diffusion.num_steps}")
    fine, coarse = diffusion.timesteps_for(teacher_steps).tolist(), diffusion.timesteps_for(steps).tolist()
    if not set(coarse) <= set(fine):
        fix = ("make --teacher-steps a multiple of --steps" if diffusion.spacing == "quadratic" else
               "on the uniform grid, make --teacher-steps - 1 a multiple of --steps - 1")
        raise UsageError(f"--steps {steps} and --teacher-steps {teacher_steps}: the {steps}-step "
                         f"{diffusion.spacing} grid is not inside the {teacher_steps}-step one; {fix}")
    return fine, coarse


@torch.no_grad()
def grid_states(G, diffusion, x_T: torch.Tensor, teacher_steps: int, steps: int, precision: str) -> torch.Tensor:
    """[B, steps + 1, C, H, W]: x at each point of the student's grid along the teacher's DDIM
    trajectory from x_T, then the teacher's clean sample."""
    fine, coarse = nested_grid(diffusion, teacher_steps, steps)
    keep = {fine.index(t) for t in coarse[1:]}  # the callback of fine step i sees x at fine[i + 1]
    states = [x_T.float()]

    def record(i, x, x0):
        if i + 1 in keep:
            states.append(x.float().clone())

    with autocast_for(precision, x_T.device):
        end = diffusion.ddim_sample(guided_model_fn(G, None, 1.0), x_T=x_T, steps=teacher_steps, callback=record)
    return torch.stack([*states, end.float()], 1)


def teacher_set(G, diffusion, indices: range, seed: int, teacher_steps: int, steps: int, precision: str,
                shape: tuple[int, ...], device: torch.device, batch: int = 250) -> torch.Tensor:
    """grid_states of trajectories `indices` (Stream.DISTILL_NOISE), on the CPU."""
    parts = []
    for start in range(0, len(indices), batch):
        x_T = initial_noise(indices[start:start + batch], seed, shape, Stream.DISTILL_NOISE).to(device)
        parts.append(grid_states(G, diffusion, x_T, teacher_steps, steps, precision).cpu())
    return torch.cat(parts)


def grid_tables(diffusion, grid: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar at each grid point and 1.0 for clean data, in float64; the grid's timesteps), on
    `device`: built once, so a training step makes no host-to-device copy."""
    abar = torch.tensor([diffusion.abar_at(t) for t in grid] + [1.0], dtype=torch.float64, device=device)
    return abar, torch.tensor(grid, device=device)


def step_targets(tables: tuple[torch.Tensor, torch.Tensor], states: torch.Tensor, rows: torch.Tensor,
                 k: torch.Tensor):
    """(x_t, t, x0 target, loss weight) of trajectory steps (rows, k), `tables` from grid_tables: the x0
    whose DDIM step grid[k] -> grid[k + 1] (clean data after the last) from states[rows, k] lands on
    states[rows, k + 1]."""
    abar, timesteps = tables
    a, a_next = abar[k], abar[k + 1]
    # DDIM (eta 0): x_s = sqrt(a_s) x0 + c (x_t - sqrt(a_t) x0), c = sqrt((1 - a_s) / (1 - a_t)); solved for x0
    c = ((1 - a_next) / (1 - a)).sqrt()
    den = a_next.sqrt() - c * a.sqrt()  # > 0: alpha_bar grows along the grid
    view = (-1,) + (1,) * (states.dim() - 2)
    x, x_next = states[rows, k], states[rows, k + 1]
    target = (x_next - c.float().view(view) * x) / den.float().view(view)
    return x, timesteps[k], target, (1.0 / (1 - a)).float().view(view)


def distill_loss(student, diffusion, batch, precision: str) -> torch.Tensor:
    x, t, target, weight = batch
    with autocast_for(precision, x.device):
        out = student(x, t)
    return (weight * (diffusion.model_x0(x, t, out.float()) - target) ** 2).mean()


def train_student(G, diffusion, states: torch.Tensor, grid: list[int], *, iters: int, batch: int, lr: float,
                  ema_decay: float, seed: int, precision: str, log=print) -> torch.nn.Module:
    """The teacher's weights fine-tuned on step_targets of `states`; returns their EMA, in eval mode.
    The loss is summed on the device and read once per 100 steps (no host sync in the step)."""
    device = next(G.parameters()).device
    student = copy.deepcopy(G).train().requires_grad_(True)
    # dgan's EMA (no host sync per update), its half-life in images set to give `ema_decay` per step
    halflife_kimg = 0.0 if ema_decay == 0 else batch * math.log(0.5) / math.log(ema_decay) / 1000
    ema = EMA(student, halflife_kimg=halflife_kimg, rampup=None)
    opt = torch.optim.Adam(student.parameters(), lr=lr, betas=(0.9, 0.99))
    # a short warm-up, then cosine to zero, so the student ends where its last steps settled (not
    # lr_schedule.lr_factor: here the cosine runs from step 0 under the warm-up, as the students in
    # RESULTS.md were trained)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * i / iters)))
    # the trajectories and the draws live on the device: no host-to-device copy in the step
    states, tables = states.to(device), grid_tables(diffusion, grid, device)
    gen, clock = stream_generator(device, seed, Stream.DISTILL_BATCH), time.perf_counter()
    total = torch.zeros((), device=device)
    for i in range(iters):
        rows = torch.randint(states.shape[0], (batch,), generator=gen, device=device)
        k = torch.randint(len(grid), (batch,), generator=gen, device=device)
        loss = distill_loss(student, diffusion, step_targets(tables, states, rows, k), precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(student, images_seen=(i + 1) * batch, batch_images=batch)
        total += loss.detach()
        if (i + 1) % 100 == 0 or i + 1 == iters:
            done = (i % 100) + 1
            log(f"dgan.distill: step {i + 1}/{iters} loss {float(total) / done:.5f} "
                f"{(i + 1) * batch / (time.perf_counter() - clock):.0f} img/s")
            total.zero_()
    return ema.module.eval()


@torch.no_grad()
def endpoint_gap(model, diffusion, states: torch.Tensor, steps: int, precision: str) -> float:
    """RMS distance, in grey levels of 0..255, of `model`'s DDIM `steps` samples from the teacher's
    clean ends, from the same noises (states[:, 0])."""
    x_T = states[:, 0].to(next(model.parameters()).device)
    with autocast_for(precision, x_T.device):
        x = diffusion.ddim_sample(guided_model_fn(model, None, 1.0), x_T=x_T, steps=steps)
    return float((x.float().cpu().clamp(-1, 1) - states[:, -1].clamp(-1, 1)).pow(2).mean().sqrt() * 127.5)


def fit_student(G, diffusion, states: torch.Tensor, trajectories: int, steps: int, teacher_steps: int, *,
                iters: int, batch: int, lr: float, ema_decay: float, seed: int, precision: str, log=print):
    """(the student, the teacher's and the student's endpoint_gap): trained on the first `trajectories`
    of `states` (teacher_set's), measured on the rest, which it never saw."""
    _, grid = nested_grid(diffusion, teacher_steps, steps)
    train, held = states[:trajectories], states[trajectories:]
    before = endpoint_gap(G, diffusion, held, steps, precision)
    student = train_student(G, diffusion, train, grid, iters=iters, batch=batch, lr=lr, ema_decay=ema_decay,
                            seed=seed, precision=precision, log=log)
    after = endpoint_gap(student, diffusion, held, steps, precision)
    log(f"dgan.distill: DDIM {steps} against the teacher's DDIM {teacher_steps} on {len(held)} held-out noises, "
        f"RMS grey levels: teacher {before:.2f}, student {after:.2f}")
    return student, before, after


def save_student(path: Path, student, teacher_meta: dict, student_meta: dict) -> Path:
    """A checkpoint of the student's weights alone (as EMA weights, where load_generator reads them),
    with the teacher's metadata and `student`; written atomically, then read back."""
    state = {"ema": {f"module.{k}": v for k, v in student.state_dict().items()}}
    payload = {"schema_version": SCHEMA_VERSION, "metadata": {**teacher_meta, "student": student_meta}, "state": state}
    return torch_save_atomic(payload, path, lambda tmp: load_checkpoint(tmp))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dgan.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the teacher: a checkpoint written by dgan.train")
    p.add_argument("--out", default=None, help="the student's file, in a folder of its own (default: "
                   "<run>/student-ddim<steps>/student.pt): its samples and evaluations go beside it")
    p.add_argument("--steps", type=positive_int_arg, default=10, help="the student's DDIM steps")
    p.add_argument("--teacher-steps", type=positive_int_arg, default=50,
                   help="the teacher's DDIM steps, a multiple of --steps")
    p.add_argument("--trajectories", type=positive_int_arg, default=2048, help="teacher trajectories to learn from")
    p.add_argument("--held-out", type=positive_int_arg, default=250,
                   help="more trajectories, only to measure the student against the teacher")
    p.add_argument("--iters", type=positive_int_arg, default=1500, help="student optimiser steps")
    p.add_argument("--batch-size", type=positive_int_arg, default=64)
    p.add_argument("--lr", type=float, default=5e-5, help="Adam's peak lr (cosine to zero)")
    p.add_argument("--ema", type=float, default=0.995, help="the student's EMA decay per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not args.lr > 0 or not 0.0 <= args.ema < 1.0:
        p.error(f"--lr {args.lr} must be > 0 and --ema {args.ema} in [0, 1)")
    return args


def distill(args: argparse.Namespace, device: torch.device, log=print) -> Path:
    teacher_sha256 = file_sha256(args.checkpoint)  # before loading: ckpt-best.pt may be replaced meanwhile
    G, cfg, diffusion, meta = load_generator(args.checkpoint, device)  # a student refuses (check_student)
    if cfg.model.num_classes > 0 or cfg.model.task != "generate":
        raise UsageError(f"--checkpoint {args.checkpoint}: only unconditional noise-to-image models can be distilled "
                         f"(this one has num_classes={cfg.model.num_classes}, task={cfg.model.task})")
    out = Path(args.out or output_dir(args.checkpoint, f"student-ddim{args.steps}") / "student.pt")
    if out.exists():
        raise UsageError(f"--out {out} exists; choose another path (nothing is overwritten)")
    if home_of(out) == home_of(args.checkpoint):  # the student's samples and evaluations would overwrite the teacher's
        raise UsageError(f"--out {out}: a student in its teacher's folder would write its samples and evaluations "
                         f"over the teacher's; put it in a folder of its own, e.g. {home_of(out) / 'student' / out.name}")
    nested_grid(diffusion, args.teacher_steps, args.steps)  # a bad pair fails before minutes of sampling
    precision = "bf16" if cfg.train.precision == "bf16" else "fp32"  # fp16 would need a grad scaler here
    shape = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    clock = time.perf_counter()
    states = teacher_set(G, diffusion, range(args.trajectories + args.held_out), args.seed, args.teacher_steps,
                         args.steps, precision, shape, device)
    log(f"dgan.distill: {len(states)} teacher trajectories of DDIM {args.teacher_steps} in "
        f"{time.perf_counter() - clock:.0f} s")
    student, before, after = fit_student(G, diffusion, states, args.trajectories, args.steps, args.teacher_steps,
                                         iters=args.iters, batch=args.batch_size, lr=args.lr, ema_decay=args.ema,
                                         seed=args.seed, precision=precision, log=log)
    record = {"sampler": "ddim", "steps": args.steps, "t_min": diffusion.t_min, "spacing": diffusion.spacing,
              "teacher": str(Path(args.checkpoint).resolve()), "teacher_sha256": teacher_sha256,
              "teacher_steps": args.teacher_steps, "trajectories": args.trajectories, "iters": args.iters,
              "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema, "seed": args.seed,
              "precision": precision, "gap_teacher_grey": before, "gap_student_grey": after,
              "seconds": time.perf_counter() - clock}
    save_student(out, student, meta, record)
    log(f"dgan.distill: wrote {out}; sample it with: python -m dgan.sample --checkpoint {out} "
        f"--sampler ddim --steps {args.steps}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = dist.resolve_device(args.device)
    try:
        distill(args, device)
    except DganError as e:
        return report(e, "dgan.distill")
    return 0


if __name__ == "__main__":
    sys.exit(main())
