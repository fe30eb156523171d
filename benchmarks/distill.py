"""dgan.distill on the trained arms of a benchmarks/quality.py --out folder (issue 10).

    python benchmarks/distill.py runs/a3 --seed 3 --arms h80b --student h80b-s10
    python benchmarks/step_count.py runs/a3 --seed 3 --arms h80b-s10 --cells ddim10

The same teacher trajectories, targets and training as `python -m dgan.distill` (its docstring says
how and why), on an arm's ARM.pt instead of a run's checkpoint; the student is saved as STUDENT.pt
in the folder with the teacher's overrides, so the folder's scripts sample it like any arm (only DDIM
on the --steps grid is what it learnt). The teacher's trajectories are kept in the folder
(traj-ARM-....pt) for a second student.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from dgan.distill import fit_student, teacher_set

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/ is not a package)
import quality_folder  # noqa: E402


def main(argv=None) -> None:
    p = quality_folder.folder_parser(__doc__)
    p.add_argument("--student", required=True, help="the student's arm name (saved as STUDENT.pt in the folder)")
    p.add_argument("--steps", type=int, default=10, help="the student's DDIM steps")
    p.add_argument("--teacher-steps", type=int, default=50, help="the teacher's DDIM steps (a multiple of --steps)")
    p.add_argument("--trajectories", type=int, default=2048, help="teacher trajectories to learn from")
    p.add_argument("--held-out", type=int, default=250, help="more trajectories, only to measure the gap")
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    a = p.parse_args(argv)
    if a.student == a.arms or (a.out / f"{a.student}.pt").exists():
        raise SystemExit(f"--student {a.student}: {a.out / (a.student + '.pt')} exists or is the teacher; pick a new name")
    args = quality_folder.folder_args(a)
    G, diffusion, _ = quality.load_arm(args, a.out, a.arms)
    n = a.trajectories + a.held_out
    cache = a.out / f"traj-{a.arms}-ddim{a.teacher_steps}-{a.steps}-{n}-{a.precision}.pt"
    if cache.is_file():
        states = torch.load(cache, weights_only=True)
    else:
        clock = time.perf_counter()
        states = teacher_set(G, diffusion, range(n), a.seed, a.teacher_steps, a.steps, a.precision, (1, 32, 32),
                             torch.device(a.device))
        print(f"teacher: {n} trajectories of DDIM {a.teacher_steps} in {time.perf_counter() - clock:.0f} s", flush=True)
        torch.save(states, cache)
    clock = time.perf_counter()
    student, before, after = fit_student(G, diffusion, states, a.trajectories, a.steps, a.teacher_steps,
                                         iters=a.iters, batch=a.batch, lr=a.lr, ema_decay=a.ema, seed=a.seed,
                                         precision=a.precision, log=lambda line: print(line, flush=True))
    train_s = time.perf_counter() - clock
    record = torch.load(a.out / f"{a.arms}.pt", weights_only=True)
    torch.save({"ema": student.state_dict(), "overrides": record["overrides"], "steps": a.iters,
                "teacher": a.arms, "train_s": train_s, "gap_before": before, "gap_after": after,
                "distill": {k: getattr(a, k) for k in ("steps", "teacher_steps", "trajectories", "iters",
                                                       "batch", "lr", "ema", "precision")}},
               a.out / f"{a.student}.pt")


if __name__ == "__main__":
    main()
