"""The lr schedule (issue 10): linear warm-up, then a cosine decay to lr_min_ratio at its horizon."""
import math

import pytest
import torch

from dgan.config import load_config
from dgan.lr_schedule import build_lr_schedule, lr_factor


def test_lr_factor_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup_steps=10, total_steps=110, kind="cosine", min_ratio=0.1) for s in range(130)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)  # half way: the mean of 1 and 0.1
    assert f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)  # the floor, then held
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone after warm-up
    assert lr_factor(500, 10, 110, "constant", 0.1) == 1.0


def test_schedule_horizon_is_total_kimg_unless_pinned():
    def lrs(*overrides):
        cfg = load_config(None, ["train.warmup_kimg=0.032", "train.total_kimg=0.32", "train.lr_g=1.0", *overrides])
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.train.lr_g)
        sched = build_lr_schedule(opt, cfg, global_batch=32)  # 1 warm-up step, 10 steps in all
        out = []
        for _ in range(12):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out
    plain = lrs()
    assert plain[10] == pytest.approx(0.1) and plain[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9)))
    pinned = lrs("train.lr_decay_kimg=0.64")  # twice the horizon: half way at the end of the run
    assert pinned[10] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 19)))
    assert lrs("train.lr_schedule=constant")[1:] == [1.0] * 11
