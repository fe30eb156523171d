"""The model learns (issue 2, part 9): real G and D, the real hybrid step, tiny phantom data.

Runs the training step exactly as dgan.train does (Trainer.build + Trainer.step: the hybrid step,
lr schedule, EMA and adaptive T), but in-process, so the loss can be read every step without the
trainer's once-per-interval sync.
"""
import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from dgan.config import load_config
from dgan.distill import endpoint_gap, nested_grid, teacher_set, train_student
from dgan.generation import generate
from dgan.trainer import Trainer

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane

STEPS = 120


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config(None, ["model.encoder=resnet18", "model.decoder_channels=[64,32,16,16]",
                             "model.time_dim=64", "model.d_channels=32", "train.batch_size=16",
                             "data.num_images=256", f"data.cache_dir={cache}", "train.lr_g=1e-3",
                             "train.lr_d=2e-4", "train.warmup_kimg=0.1", "train.ema_halflife_kimg=0.3",
                             "train.device=cpu"])
    trainer = Trainer.build(cfg, torch.device("cpu"))  # seeded as dgan.train seeds it (train.seed=0)
    data, tr, ema = trainer.data, trainer.tr, trainer.ema
    untrained = generate(ema.module, tr.diffusion, n=64, steps=20, seed=1, channels=1, image_size=32)
    losses, state = [], trainer.state
    while state.step < STEPS:
        for x, y in data.epoch(state.step // data.batches_per_epoch):
            m = trainer.step([(x, y)])
            losses.append(float(m["L_diff"]))  # test-only host read
            if state.step == STEPS:
                break
    real = torch.cat([x for x, _ in data.epoch(0)])[:256]
    trained_samples = generate(ema.module, tr.diffusion, n=64, steps=20, seed=1, channels=1, image_size=32)
    return losses, real, untrained, trained_samples, ema.module.eval(), tr.diffusion


def test_diffusion_loss_falls(trained):
    losses = trained[0]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"L_diff first-20 mean {first:.4f}, last-20 mean {last:.4f}, ratio {last / first:.3f}")
    assert last <= 0.6 * first


def test_samples_move_towards_the_data(trained):
    """Statistic: 1-D Wasserstein distance between pixel-intensity distributions (samples vs data)."""
    _, real, untrained, samples, _, _ = trained
    d_untrained = wasserstein_distance(untrained.flatten().numpy(), real.flatten().numpy())
    d_trained = wasserstein_distance(samples.flatten().numpy(), real.flatten().numpy())
    print(f"W1(untrained, data) {d_untrained:.4f}, W1(trained, data) {d_trained:.4f}")
    assert d_trained < 0.5 * d_untrained


def test_distilled_student_retraces_its_teacher(trained):
    """dgan.distill: a DDIM-4 student of the trained G, after 150 steps on 192 of G's own DDIM-20
    trajectories, ends at least 1.6x closer to G's DDIM-20 samples than G's own DDIM 4 does, on 64
    trajectories it never saw (2.5x when written)."""
    G, diffusion = trained[4], trained[5]
    states = teacher_set(G, diffusion, range(256), 0, 20, 4, "fp32", (1, 32, 32), torch.device("cpu"), batch=64)
    _, grid = nested_grid(diffusion, 20, 4)
    teacher_gap = endpoint_gap(G, diffusion, states[192:], 4, "fp32")
    student = train_student(G, diffusion, states[:192], grid, iters=150, batch=16, lr=2e-4, ema_decay=0.95,
                            seed=0, precision="fp32", log=lambda line: None)
    student_gap = endpoint_gap(student, diffusion, states[192:], 4, "fp32")
    print(f"RMS grey levels from DDIM 20: teacher's DDIM 4 {teacher_gap:.2f}, student's {student_gap:.2f}")
    assert student_gap * 1.6 <= teacher_gap
