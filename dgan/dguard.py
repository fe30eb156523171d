"""The D-health guard: detects a discriminator that ran away and rolls it back.

Why: with the logistic loss, a D that wins too fast drives its logits to the hundreds or
thousands; its gradient into G then drowns the diffusion loss, and the adaptive diffusion
length climbs to hide it (benchmarks/RESULTS.md, seed 1 at 400 kimg: L_D 3255, T_adapt 283,
FID 3-9x worse). A healthy logistic D sits near L_D = 2 ln 2 = 1.39 (chance) and below.

How: the trainer hands the guard the statistics it already reduces once per log interval (no
host sync in the step). If they are healthy, the guard snapshots D and its optimizer (a copy
in memory, D is small); if not, it restores that snapshot, multiplies lr_d by
`gan.guard_lr_factor`, and reports the event for MLflow and the status line. All ranks see
the same reduced numbers, so all take the same decision with no extra collective.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch

from dgan.config import GanConfig
from dgan.step import Trainables


def _cpu_copy(state):
    """A deep copy of a (nested) state dict with every tensor cloned to the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_copy(v) for v in state)
    return copy.deepcopy(state)


class DHealthGuard:
    def __init__(self, g: GanConfig, tr: Trainables, sched_d: Optional[torch.optim.lr_scheduler.LRScheduler] = None
                 ) -> None:
        self.max_loss, self.max_logit, self.lr_factor = g.guard_max_loss, g.guard_max_logit, g.guard_lr_factor
        self.enabled = g.guard and g.adv_weight > 0
        self.tr, self.sched_d = tr, sched_d
        self.events = 0
        self.lr_scale = 1.0
        self.healthy_step = 0
        self.snapshot = self._take()  # the initial D is healthy by definition

    def _take(self) -> dict:
        return {"D": _cpu_copy(self.tr.D_raw.state_dict()), "opt_d": _cpu_copy(self.tr.opt_d.state_dict())}

    def healthy(self, m: dict[str, float]) -> bool:
        values = [m.get("L_D", 0.0), m.get("D_real", 0.0), m.get("D_fake", 0.0)]
        if not all(math.isfinite(v) for v in values):
            return False
        return values[0] <= self.max_loss and max(abs(values[1]), abs(values[2])) <= self.max_logit

    def check(self, m: dict[str, float], step: int) -> Optional[str]:
        """Call with the reduced metrics of a log interval. Returns a one-line event, or None."""
        if not self.enabled:
            return None
        if self.healthy(m):
            self.snapshot, self.healthy_step = self._take(), step
            return None
        self.events += 1
        self.tr.D_raw.load_state_dict(self.snapshot["D"])
        self.tr.opt_d.load_state_dict(self.snapshot["opt_d"])
        self.lr_scale *= self.lr_factor
        self._apply_lr_scale()
        return (f"D guard: runaway at step {step} (L_D {m.get('L_D', float('nan')):.3g}, "
                f"D_real {m.get('D_real', float('nan')):.3g}, D_fake {m.get('D_fake', float('nan')):.3g}); "
                f"D restored from step {self.healthy_step}, lr_d x{self.lr_scale:.3g}")

    def _apply_lr_scale(self) -> None:
        # The LambdaLR recomputes lr from base_lrs every step, so scale those (the optimizer's
        # state dict, restored above, carries the snapshot's lr, not the scaled one).
        if self.sched_d is not None:
            self.sched_d.base_lrs = [lr * self.lr_factor for lr in self.sched_d.base_lrs]
        for group in self.tr.opt_d.param_groups:
            group["lr"] *= self.lr_factor

    def state_dict(self) -> dict:
        return {"events": self.events, "lr_scale": self.lr_scale, "healthy_step": self.healthy_step,
                "snapshot": self.snapshot}

    def load_state_dict(self, d: dict) -> None:
        self.events, self.lr_scale, self.healthy_step = int(d["events"]), float(d["lr_scale"]), int(d["healthy_step"])
        self.snapshot = d["snapshot"]
