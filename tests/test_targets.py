"""The shortcut targets (diffusion.shortcut_fraction): the steps they draw, and that one DDIM step
to their target lands where the samplers' own two half steps land."""
import pytest
import torch

from dgan.diffusion import Diffusion
from dgan.schedules import timestep_grid
from dgan.targets import draw_jumps, grid_range, shortcut_targets


def _grid_steps(T: int) -> set[tuple[int, int, int]]:
    """Every (t, midpoint, s) of the quadratic grids draw_jumps draws from: a step of the N-step grid
    (s = -1: clean data) and the point of the 2N-step grid between its ends."""
    lo, hi = grid_range(T)
    steps = set()
    for n in range(lo, hi + 1):
        fine = timestep_grid(T, 2 * n, "quadratic").tolist() + [-1]
        steps |= {(fine[i], fine[i + 1], fine[i + 2]) for i in range(0, 2 * n, 2)}
    return steps


@pytest.mark.parametrize("T, expected", [(1000, (4, 20)), (100, (4, 6)), (40, (4, 4))])
def test_draws_are_steps_of_the_samplers_grids_split_at_their_midpoints(T, expected):
    assert grid_range(T) == expected
    torch.manual_seed(0)
    t, m, s = draw_jumps(4000, T, torch.device("cpu"))
    assert torch.all((t > m) & (m > s) & (s >= -1)) and int(t.max()) == T - 1
    drawn = set(zip(t.tolist(), m.tolist(), s.tolist()))
    assert drawn <= _grid_steps(T)
    assert len(drawn) > 0.9 * len(_grid_steps(T))  # all grids and all their steps get drawn
    assert (s == -1).any()  # the jump to clean data too


def _stand_in(x, t, size):
    """A deterministic function of x, t and the step size, in place of G (its v output)."""
    return 0.4 * x + 0.1 * torch.tanh(x.roll(1, -1)) + 0.05 * size.view(-1, 1, 1, 1) - 1e-4 * t.view(-1, 1, 1, 1)


def test_one_step_to_the_target_lands_on_the_samplers_two_half_steps():
    """Checked against Diffusion's own DDIM (denoise with the step's size, clipping, ddim_step), row by row."""
    diffusion = Diffusion(1000, prediction="v", spacing="quadratic")
    torch.manual_seed(1)
    t, m, s = draw_jumps(24, 1000, torch.device("cpu"))
    x_t = 0.5 * torch.randn(24, 1, 8, 8)
    target, size = shortcut_targets(_stand_in, diffusion, x_t, t, m, s)
    checked = 0
    for i in range(24):
        ti, mi, si = int(t[i]), int(m[i]), (None if int(s[i]) < 0 else int(s[i]))
        x = x_t[i:i + 1]
        for a, b in ((ti, mi), (mi, si)):
            x0, eps = diffusion.denoise(_stand_in, x, a, True, diffusion.step_size(a, b))
            x = diffusion.ddim_step(x0, eps, a, b)
        if target[i].abs().max() >= 1:
            continue  # clipped to the data range: one step cannot land exactly there
        eps_i = (x_t[i] - diffusion.abar_at(ti) ** 0.5 * target[i]) / (1 - diffusion.abar_at(ti)) ** 0.5
        one = diffusion.ddim_step(target[i:i + 1], eps_i[None], ti, si)
        torch.testing.assert_close(one, x, rtol=1e-4, atol=1e-4)
        assert float(size[i]) == pytest.approx(diffusion.step_size(ti, si), abs=1e-5)
        checked += 1
    assert checked >= 12


def test_a_perfect_denoiser_of_one_image_targets_that_image():
    """If every x_t came from one x0, the posterior mean is x0 at every step, and so is the shortcut."""
    diffusion = Diffusion(1000, prediction="v", spacing="quadratic")
    x0 = torch.rand(1, 1, 8, 8) * 1.6 - 0.8

    def oracle(x, t, size):
        return diffusion.training_target(x0, t, diffusion.predict_eps(x, t, x0.expand_as(x)))

    torch.manual_seed(2)
    t, m, s = draw_jumps(16, 1000, torch.device("cpu"))
    x_t = diffusion.q_sample(x0.expand(16, -1, -1, -1), t, torch.randn(16, 1, 8, 8))
    target, _ = shortcut_targets(oracle, diffusion, x_t, t, m, s)
    torch.testing.assert_close(target, x0.expand_as(target), rtol=1e-3, atol=1e-3)
