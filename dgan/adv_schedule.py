"""When the adversarial part of the hybrid step runs, and how hard it pushes: host numbers from the
config, the world size and the step count alone (no tensor, no sync), so every rank agrees and a
resumed run continues where it stopped."""
from __future__ import annotations

from dgan import distributed as dist
from dgan.config import Config


def global_batch_size(cfg: Config) -> int:
    """Images per optimizer step: per-rank batch x ranks x accumulation (logged as global_batch)."""
    return cfg.train.batch_size * dist.get_world_size() * cfg.train.grad_accum


def adv_gain(cfg: Config, step: int) -> float:
    """The share of gan.adv_weight that G gets at this step (a host number, from the step count):
    0 for the first adv_warmup_kimg, then a linear ramp to 1 over as many kimg again."""
    warmup = cfg.gan.adv_warmup_kimg * 1000
    if warmup <= 0:
        return 1.0
    images = step * global_batch_size(cfg)
    return min(1.0, max(0.0, images / warmup - 1.0))


def adversarial_period(cfg: Config) -> int:
    """N: the adversarial part of the step runs on one step in N. gan.fakes=samples: self_fake_every
    (their chain costs forwards); recon fakes cost none, so every step."""
    return cfg.gan.self_fake_every if cfg.gan.fakes == "samples" else 1
