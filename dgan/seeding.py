"""The one seed derivation of dgan, and its named random streams.

Every use of randomness that must not touch the global RNG (data order, augmentation, sample noise,
masks) seeds its own generator with derive_seed(seed, Stream.X, ...): the stream's tag comes right
after the run's seed, so two streams can never share a seed tuple, whatever follows.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    INITIAL_NOISE = 0   # x_T of sample i (generation)
    STEP_NOISE = 1      # per-batch DDPM / DDIM-eta noise (generation, superres)
    RECON_NOISE = 2     # q_sample noise of the PSNR/SSIM reconstructions (evaluate)
    DATA_ORDER = 3      # an epoch's order of the training data (data.loader)
    DATA_SLOT = 4       # which shard slots a rank's worker reads
    DATA_SHUFFLE = 5    # the within-worker shuffle buffer
    DATA_AUG = 6        # one sample's augmentation
    DATA_OFFSET = 7     # an epoch's rotation of the sample order
    DATA_TORCH = 8      # the torch generator of a rank's in-memory loader
    MASK = 11           # inpainting masks
    INPAINT_NOISE = 12  # RePaint's noise
    D_NOISE = 13        # a training micro-batch's draws for the adversarial side (step.adv_draws)
    DISTILL_NOISE = 14  # x_T of a distillation teacher's trajectory i: never a sample's (distill)
    DISTILL_BATCH = 15  # which trajectory steps a distillation batch learns (distill)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from ints (order matters); SeedSequence mixes them, so nearby tuples give
    unrelated streams. Negative parts are taken modulo 2**63."""
    state = np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def stream_generator(device: torch.device | str | None, *parts: int) -> torch.Generator:
    """A torch generator on `device` (None: the CPU) seeded with derive_seed(*parts)."""
    return torch.Generator(device=device if device is not None else "cpu").manual_seed(derive_seed(*parts))
