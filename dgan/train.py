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
import sys
from typing import Optional

import torch

from dgan import distributed as dist
from dgan.config import Config, ConfigError, load_config
from dgan.errors import EXIT_ERROR, DganError, report
from dgan.monitor import check_eval_ready
from dgan.rundir import RunPlan, plan_run
from dgan.stopping import StopFlag
from dgan.trainer import Trainer


def train(cfg: Config, plan: RunPlan, device: torch.device) -> int:
    """Build the Trainer and run it. Returns the exit code (see the module docstring)."""
    # Handlers first: a preemption signal during the (possibly long) build must not kill the
    # process with the default action; it is acted on at the first step boundary instead.
    stop = StopFlag()
    check_eval_ready(cfg)  # a periodic evaluation that cannot run fails now, not hours in
    return Trainer.build(cfg, device).run(plan, stop)


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
