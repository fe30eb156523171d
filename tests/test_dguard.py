"""The D-health guard (issue 10): a runaway D is detected from the reduced interval statistics,
rolled back to its last healthy state with a lower lr_d, and the run recovers."""
import math
import warnings

import pytest
import torch

from dgan.config import load_config
from dgan.dguard import DHealthGuard
from dgan.monitor import MetricWindow
from dgan.trainer import Trainer, build_trainables

HEALTHY = {"L_D": 1.3, "D_real": 0.4, "D_fake": -0.3}


def build(tiny_overrides, *extra):
    cfg = load_config(None, tiny_overrides + list(extra))
    torch.manual_seed(0)
    tr, ema, scheds = build_trainables(cfg, torch.device("cpu"))
    return cfg, tr, ema, scheds


def d_weights(tr) -> dict:
    return {k: v.clone() for k, v in tr.D_raw.state_dict().items()}


def test_runaway_restores_the_last_healthy_d_and_lowers_lr_d(tiny_overrides):
    cfg, tr, _, scheds = build(tiny_overrides)
    guard = DHealthGuard(cfg.gan, tr, scheds[1])
    assert guard.check(HEALTHY, step=50) is None
    healthy = d_weights(tr)
    with torch.no_grad():  # what a runaway leaves behind: weights far from the healthy ones
        for p in tr.D_raw.parameters():
            p.add_(3.0)
    lr_before = tr.opt_d.param_groups[0]["lr"]
    event = guard.check({"L_D": 3255.0, "D_real": 900.0, "D_fake": -2000.0}, step=100)
    assert event is not None and "step 100" in event and "restored from step 50" in event
    for k, v in d_weights(tr).items():
        torch.testing.assert_close(v, healthy[k], rtol=0, atol=0)
    assert tr.opt_d.param_groups[0]["lr"] == pytest.approx(lr_before * cfg.gan.guard_lr_factor)
    assert scheds[1].base_lrs[0] == pytest.approx(cfg.train.lr_d * cfg.gan.guard_lr_factor)
    assert guard.events == 1
    # a NaN interval is a runaway too, and the lr keeps falling per event
    assert guard.check({"L_D": math.nan, "D_real": 0.0, "D_fake": 0.0}, step=150) is not None
    assert guard.events == 2 and guard.lr_scale == pytest.approx(cfg.gan.guard_lr_factor ** 2)
    # the guard's state resumes exactly
    other = DHealthGuard(cfg.gan, tr, scheds[1])
    other.load_state_dict(guard.state_dict())
    assert (other.events, other.lr_scale, other.healthy_step) == (2, guard.lr_scale, 50)


def test_guard_is_off_for_pure_diffusion(tiny_overrides):
    cfg, tr, _, scheds = build(tiny_overrides, "gan.adv_weight=0")
    assert DHealthGuard(cfg.gan, tr, scheds[1]).check({"L_D": 1e6}, step=5) is None


def test_pure_diffusion_steps_without_lr_scheduler_warnings(tmp_path, tiny_overrides):
    # D's optimizer never steps without the term; stepping its schedule made torch warn on every run
    cfg = load_config(None, tiny_overrides + ["gan.adv_weight=0", "train.batch_size=4", "data.num_images=8",
                                              f"data.cache_dir={tmp_path / 'cache'}", "train.device=cpu"])
    trainer = Trainer.build(cfg, torch.device("cpu"))
    x, y = next(iter(trainer.data.epoch(0)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            trainer.step([(x, y)])
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], [str(w.message) for w in caught]
    assert trainer.scheds[0].last_epoch == 2 and trainer.state.step == 2


def run(tmp_path, tiny_overrides, guard_on: bool, steps: int = 60, blow_up_at: int = 30, every: int = 10):
    """Train the hybrid, make D run away at step `blow_up_at` (its head's weights x1000: logits in the
    thousands, what a runaway leaves behind), and keep training; return the per-interval L_D and the guard.
    Recon fakes: D then steps on every step (the lazy samples fakes: one in 4), ten D steps per interval."""
    cfg = load_config(None, tiny_overrides + ["train.batch_size=8", f"gan.guard={str(guard_on).lower()}",
                      "gan.fakes=recon",
                      "data.num_images=64", f"data.cache_dir={tmp_path / 'cache'}", "train.device=cpu",
                      f"log.every_steps={every}"])
    trainer = Trainer.build(cfg, torch.device("cpu"))
    tr, data, guard, state = trainer.tr, trainer.data, trainer.guard, trainer.state
    window, history = MetricWindow(), []
    while state.step < steps:
        for x, y in data.epoch(state.step // data.batches_per_epoch):
            if state.step == blow_up_at:
                with torch.no_grad():
                    tr.D_raw.head.weight.mul_(1000.0)
            window.add(trainer.step([(x, y)]))
            if state.step % every == 0:
                m = window.reduce()
                guard.check(m, state.step)
                history.append(m["L_D"])
            if state.step == steps:
                break
    return history, guard


@pytest.mark.slow  # 90 s of training on 2 cores
def test_provoked_runaway_is_caught_and_recovers(tmp_path, tiny_overrides):
    unguarded, _ = run(tmp_path, tiny_overrides, guard_on=False)
    guarded, guard = run(tmp_path, tiny_overrides, guard_on=True)
    print(f"L_D per interval, unguarded: {[round(v, 1) for v in unguarded]}")
    print(f"L_D per interval, guarded:   {[round(v, 1) for v in guarded]} ({guard.events} events)")
    limit = load_config(None, []).gan.guard_max_loss
    assert max(unguarded[:3]) <= limit  # healthy before the provocation
    assert min(unguarded[3:]) > limit  # without the guard D stays broken to the end
    assert guard.events == 1  # caught at the first interval after the blow-up (step 40), rolled back to step 30
    assert guarded[3] > limit and max(guarded[4:]) <= limit  # healthy again from the next interval on
