"""Tests for dgan.diffusion: schedules, forward process, conversions, posterior and samplers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dgan.config import load_config
from dgan.diffusion import Diffusion
from dgan.schedules import make_betas

T = 1000
PINNED_T = (0, 10, 100, 500, 999)


@pytest.fixture(scope="module")
def linear() -> Diffusion:
    return Diffusion(num_steps=T, schedule="linear")


@pytest.fixture(scope="module")
def cosine() -> Diffusion:
    return Diffusion(num_steps=T, schedule="cosine")


@pytest.fixture(scope="module")
def image_x0() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1


def _linear_alpha_bar_reference(t: int) -> float:
    """prod_{s<=t} (1 - beta_s) with beta_s on the 1e-4..0.02 line, in plain float64 Python."""
    prod = 1.0
    for s in range(t + 1):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * s / (T - 1))
    return prod


def _cosine_alpha_bar_reference(t: int) -> float:
    """Nichol & Dhariwal: abar(t) = f(t+1)/f(0); only the last beta (-> 1) is clipped to 0.999."""
    def f(u: float) -> float:
        return math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
    if t == T - 1:
        return f(T - 1) / f(0) * (1.0 - 0.999)
    return f(t + 1) / f(0)


def _gaussian_eps_fn(diff: Diffusion, mu: float, std: float):
    """Exact E[eps | x_t] when every pixel of x0 is N(mu, std^2): a linear, non-oracle model."""
    alpha_bar = diff.alpha_bar.double()

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x_t.double() - ab.sqrt() * mu) / (ab * std ** 2 + 1 - ab)
        return eps.to(x_t.dtype)
    return model_fn


# --------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("schedule,reference", [("linear", _linear_alpha_bar_reference),
                                                ("cosine", _cosine_alpha_bar_reference)])
def test_alpha_bar_matches_independent_formula(schedule, reference):
    diff = Diffusion(num_steps=T, schedule=schedule)
    for t in PINNED_T:
        assert diff.alpha_bar[t].item() == pytest.approx(reference(t), rel=1e-6), t


def test_alpha_bar_literals(linear, cosine):
    # computed once in float64; catches a change in both the code and the formula above
    linear_expected = {0: 9.9990000000e-01, 10: 9.9780657251e-01, 100: 8.9514159090e-01,
                       500: 7.7796658365e-02, 999: 4.0358297654e-05}
    cosine_expected = {0: 9.9995871578e-01, 10: 9.9927890377e-01, 100: 9.7157568181e-01,
                       500: 4.9228517245e-01, 999: 2.4287669070e-09}
    for t, value in linear_expected.items():
        assert linear.alpha_bar[t].item() == pytest.approx(value, rel=1e-6), t
    for t, value in cosine_expected.items():
        assert cosine.alpha_bar[t].item() == pytest.approx(value, rel=1e-6), t


def test_make_betas_shapes_and_bounds():
    lin = make_betas("linear", 10, 1e-3, 0.05)
    assert lin.dtype == torch.float64 and lin.shape == (10,)
    assert lin[0].item() == pytest.approx(1e-3) and lin[-1].item() == pytest.approx(0.05)
    cos = make_betas("cosine", T)
    assert cos.dtype == torch.float64 and cos.max().item() == pytest.approx(0.999)
    assert (cos > 0).all() and (cos[1:] >= cos[:-1]).all()


def test_unknown_schedule_names_valid_ones():
    with pytest.raises(ValueError, match="linear.*cosine"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="linear.*cosine"):
        Diffusion(schedule="sigmoid")


def test_tables_are_float32_and_consistent(linear):
    for name in ("betas", "alphas", "alpha_bar", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar",
                 "posterior_variance", "posterior_log_variance"):
        table = getattr(linear, name)
        assert table.dtype == torch.float32 and table.shape == (T,), name
    assert torch.allclose(linear.sqrt_alpha_bar ** 2 + linear.sqrt_one_minus_alpha_bar ** 2,
                          torch.ones(T), atol=1e-6)
    assert linear.num_steps == T


def test_to_moves_every_table_and_returns_self():
    diff = Diffusion(num_steps=20)
    moved = diff.to("meta")
    assert moved is diff and diff.device == torch.device("meta")
    for name in Diffusion._TENSORS:
        assert getattr(diff, name).device.type == "meta", name


# --------------------------------------------------------------------------- forward process

def test_q_sample_statistics_match_theory(linear):
    n_per_t = 20000
    ts = [0, 100, 500, 999]
    x0_pixel = torch.tensor([0.8, -0.5, 0.1]).view(1, 3, 1, 1)
    t = torch.tensor(ts).repeat_interleave(n_per_t)
    x0 = x0_pixel.expand(len(t), 3, 2, 2)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = linear.q_sample(x0, t, eps).view(len(ts), n_per_t, 3, 2, 2)
    for i, step in enumerate(ts):
        abar = _linear_alpha_bar_reference(step)
        mean = x_t[i].mean(dim=(0, 2, 3))
        var = x_t[i].var(dim=(0, 2, 3))
        # 4 samples per channel share x0: standard error of the mean ~ sqrt((1-abar)/80000)
        assert torch.allclose(mean, math.sqrt(abar) * x0_pixel.flatten(), atol=0.012), step
        assert torch.allclose(var, torch.full((3,), 1 - abar), rtol=0.03, atol=1e-6), step


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_predict_x0_and_eps_round_trip(schedule):
    diff = Diffusion(schedule=schedule)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 2, 4, 4, generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    # t = 999 is left out of x0 recovery: 1/sqrt(abar) ~ 2e4 (cosine) amplifies float32 rounding
    t = torch.tensor([0, 1, 10, 300, 700, 950])
    x_t = diff.q_sample(x0, t, eps)
    assert torch.allclose(diff.predict_x0(x_t, t, eps), x0, atol=2e-4)
    t_eps = torch.tensor([1, 10, 300, 700, 950, 999])  # t = 0: sqrt(1-abar) ~ 0.01 amplifies
    x_t = diff.q_sample(x0, t_eps, eps)
    assert torch.allclose(diff.predict_eps(x_t, t_eps, x0), eps, atol=1e-4)


def test_q_sample_broadcasts_per_sample_timestep(linear):
    x0 = torch.ones(3, 1, 2, 2)
    eps = torch.zeros_like(x0)
    t = torch.tensor([0, 500, 999])
    out = linear.q_sample(x0, t, eps)
    expected = linear.sqrt_alpha_bar[t].view(3, 1, 1, 1).expand_as(x0)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_posterior_matches_closed_form(schedule):
    diff = Diffusion(schedule=schedule)
    betas = make_betas(schedule, T).numpy()
    abar = np.cumprod(1 - betas)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 1, 3, 3, generator=gen) * 2 - 1
    x_t = torch.randn(x0.shape, generator=gen)
    steps = [1, 50, 400, 999]
    mean, var, log_var = diff.q_posterior(x0, x_t, torch.tensor(steps))
    for i, t in enumerate(steps):
        ab, ab_prev, beta = abar[t], abar[t - 1], betas[t]
        exp_mean = (math.sqrt(ab_prev) * beta / (1 - ab) * x0[i].double()
                    + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x_t[i].double())
        exp_var = (1 - ab_prev) / (1 - ab) * beta
        assert torch.allclose(mean[i].double(), exp_mean, rtol=1e-5, atol=1e-6), t
        assert var[i].item() == pytest.approx(exp_var, rel=1e-5), t
        assert log_var[i].item() == pytest.approx(math.log(exp_var), rel=1e-5, abs=1e-5), t


def test_q_posterior_at_t0_is_clean_and_log_variance_finite(linear):
    x0 = torch.full((1, 1, 2, 2), 0.3)
    x_t = torch.full((1, 1, 2, 2), -2.0)
    mean, var, log_var = linear.q_posterior(x0, x_t, torch.tensor([0]))
    assert torch.allclose(mean, x0, atol=1e-6)  # x_{-1} is the data itself
    assert var.item() == 0.0
    assert log_var.item() == pytest.approx(math.log(linear.posterior_variance[1].item()), rel=1e-6)


# --------------------------------------------------------------------------- timesteps / dispatch

def test_timesteps_for(linear):
    assert linear.timesteps_for(1).tolist() == [T - 1]
    assert linear.timesteps_for(T).tolist() == list(range(T - 1, -1, -1))
    ts = linear.timesteps_for(50)
    assert ts.dtype == torch.long and len(ts) == 50
    assert ts[0].item() == T - 1 and ts[-1].item() == 0
    assert (ts[:-1] > ts[1:]).all()
    assert ts[1].item() == 979  # nearest integer to 999 - 999/49 = 978.6, not truncated
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match="steps"):
            linear.timesteps_for(bad)


@pytest.mark.parametrize("steps", [1, 2, 10, 31, 32, 50, 999, 1000])
def test_quadratic_timesteps_are_distinct_start_at_T_and_are_dense_near_zero(steps):
    d = Diffusion(1000, spacing="quadratic")
    ts = d.timesteps_for(steps)
    assert len(ts) == steps and ts[0].item() == 999 and ts[-1].item() >= 0
    assert (ts[:-1] > ts[1:]).all()  # distinct even where the quadratic grid is finer than 1 step
    if steps == 10:
        # the DDIM paper's quadratic grid, trailing: no evaluation at t = 0 (x_t clean to 1e-4)
        assert ts.tolist() == [999, 809, 639, 489, 359, 249, 159, 89, 39, 9]
    if steps == T:
        assert ts.tolist() == list(range(T - 1, -1, -1))


def test_config_picks_quadratic_spacing_and_rejects_unknown():
    assert Diffusion.from_config(load_config(None, []).diffusion).timesteps_for(10)[-1].item() == 9
    assert Diffusion.from_config(load_config(None, ["diffusion.timestep_spacing=uniform"]).diffusion).timesteps_for(10)[-1] == 0
    with pytest.raises(ValueError, match="spacing"):
        Diffusion(10, spacing="cubic")


def test_sample_dispatch(linear):
    model_fn = _gaussian_eps_fn(linear, 0.0, 0.5)
    shape = (2, 1, 4, 4)
    via_dispatch = linear.sample(model_fn, "ddim", shape, steps=7, eta=0.5,
                                 generator=torch.Generator().manual_seed(9))
    direct = linear.ddim_sample(model_fn, shape, steps=7, eta=0.5,
                                generator=torch.Generator().manual_seed(9))
    assert torch.equal(via_dispatch, direct)
    with pytest.raises(ValueError, match="ddpm.*ddim.*dpmpp2m"):
        linear.sample(model_fn, "euler", shape)
    with pytest.raises(ValueError, match="eta"):
        linear.ddim_sample(model_fn, shape, eta=1.5)
    with pytest.raises(ValueError, match="shape"):
        linear.ddim_sample(model_fn)


# --------------------------------------------------------------------------- samplers: oracle

# With an oracle eps = predict_eps(x_t, t, x0) every x0_hat is x0 up to float32 rounding, and
# each sampler's last update returns x0_hat at t = 0 (DDPM: the t=0 posterior mean has zero
# weight on x_t). So the only error left is rounding: measured ~1e-9, asserted at 1e-5.
ORACLE_ATOL = 1e-5


def _oracle(diff: Diffusion, x0: torch.Tensor):
    return lambda x_t, t: diff.predict_eps(x_t, t, x0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_recovers_x0_with_oracle(schedule, image_x0):
    diff = Diffusion(schedule=schedule)
    out = diff.ddim_sample(_oracle(diff, image_x0), image_x0.shape, steps=50, eta=0.0,
                           generator=torch.Generator().manual_seed(0))
    assert (out - image_x0).abs().max().item() < ORACLE_ATOL


def test_ddpm_recovers_x0_with_oracle(linear, image_x0):
    out = linear.ddpm_sample(_oracle(linear, image_x0), image_x0.shape,
                             generator=torch.Generator().manual_seed(0))
    assert (out - image_x0).abs().max().item() < ORACLE_ATOL


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp2m_recovers_x0_with_oracle(linear, image_x0, steps):
    out = linear.dpmpp2m_sample(_oracle(linear, image_x0), image_x0.shape, steps=steps,
                                generator=torch.Generator().manual_seed(0))
    assert (out - image_x0).abs().max().item() < ORACLE_ATOL


# ------------------------------------------------------------------------- samplers: Gaussian data

def _exact_ode_endpoint(diff: Diffusion, x_T: torch.Tensor, mu: float, std: float) -> torch.Tensor:
    """Where the probability-flow ODE from x_T at t=T-1 lands for N(mu, std^2) data.

    For Gaussian data the flow is affine and keeps the standardised value
    z = (x_t - sqrt(abar) mu) / sqrt(abar std^2 + 1 - abar) fixed, so it lands on mu + std z.
    """
    abar = diff.alpha_bar.double()[-1].item()
    z = (x_T.double() - math.sqrt(abar) * mu) / math.sqrt(abar * std ** 2 + 1 - abar)
    return mu + std * z


@pytest.mark.parametrize("schedule,mu,std", [("linear", 0.3, 0.5), ("cosine", 0.0, 1.0)])
def test_ode_samplers_converge_to_exact_flow(schedule, mu, std):
    diff = Diffusion(schedule=schedule)
    model_fn = _gaussian_eps_fn(diff, mu, std)
    x_T = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = _exact_ode_endpoint(diff, x_T, mu, std)

    def error(sampler: str, steps: int) -> float:
        out = diff.sample(model_fn, sampler, x_T=x_T, steps=steps, clip_x0=False)
        return (out.double() - exact).abs().max().item()

    ddim = {s: error("ddim", s) for s in (20, 50, 200)}
    dpm = {s: error("dpmpp2m", s) for s in (20, 50, 200)}
    # DDIM is first order: 4x the steps gives ~4x less error (measured 3.9-4.0)
    assert 3.0 < ddim[50] / ddim[200] < 5.5
    # DPM-Solver++(2M) is second order and far ahead of DDIM at equal model evaluations
    # (measured ratios 3-15x at 20 steps, 20-60x at 50, 20-100x at 200)
    assert dpm[20] < ddim[20] / 2.5
    assert dpm[50] < ddim[50] / 10
    assert dpm[200] < ddim[200] / 10 and dpm[200] < 3e-3


def _moments(x: torch.Tensor) -> tuple[float, float]:
    return x.mean().item(), x.std().item()


def test_ddpm_and_stochastic_ddim_sample_the_data_distribution(linear):
    mu, std = 0.3, 0.5
    model_fn = _gaussian_eps_fn(linear, mu, std)
    shape = (256, 1, 8, 8)  # the model is per-pixel, so 16384 independent draws
    ddpm = linear.ddpm_sample(model_fn, shape, generator=torch.Generator().manual_seed(1),
                              clip_x0=False)
    ddim = linear.ddim_sample(model_fn, shape, steps=T, eta=1.0, clip_x0=False,
                              generator=torch.Generator().manual_seed(2))
    # standard error of the mean ~ 0.5/128 = 0.004; of the std ~ 0.003
    for out in (ddpm, ddim):
        mean, sd = _moments(out)
        assert mean == pytest.approx(mu, abs=0.02) and sd == pytest.approx(std, abs=0.02)
    assert _moments(ddpm)[0] == pytest.approx(_moments(ddim)[0], abs=0.02)
    assert _moments(ddpm)[1] == pytest.approx(_moments(ddim)[1], abs=0.02)


@pytest.mark.parametrize("std", [0.5, 2.0])  # 2.0: x0_hat often leaves [-1, 1] and is clipped
def test_ddim_eta1_full_steps_follows_the_ddpm_path(linear, std):
    # eta=1, steps=T has DDPM's mean and variance at every step, and both draw noise in the
    # same order, so with one seed the two paths agree up to float32 rounding (measured ~1e-6).
    # With clipping this needs DDIM to re-derive eps from the clipped x0, as DDPM's posterior
    # mean implicitly does.
    model_fn = _gaussian_eps_fn(linear, 0.3, std)
    shape = (4, 1, 8, 8)
    ddpm = linear.ddpm_sample(model_fn, shape, generator=torch.Generator().manual_seed(3))
    ddim = linear.ddim_sample(model_fn, shape, steps=T, eta=1.0,
                              generator=torch.Generator().manual_seed(3))
    assert (ddpm - ddim).abs().max().item() < 1e-5
    assert ddpm.std().item() > 0.1  # a collapsed sampler would pass the line above trivially


# --------------------------------------------------------------------------- determinism / hooks

@pytest.mark.parametrize("sampler,kwargs", [("ddpm", {}), ("ddim", {"steps": 20, "eta": 0.7}),
                                            ("dpmpp2m", {"steps": 10})])
def test_samplers_are_deterministic_given_seed(linear, sampler, kwargs):
    model_fn = _gaussian_eps_fn(linear, 0.0, 0.5)

    def run(seed: int) -> torch.Tensor:
        return linear.sample(model_fn, sampler, (2, 1, 8, 8),
                             generator=torch.Generator().manual_seed(seed), **kwargs)
    first, again, other = run(11), run(11), run(12)
    assert torch.equal(first, again)
    assert (first - other).abs().max().item() > 0.1


def test_x_T_fixes_shape_and_makes_ddim_eta0_seed_free(linear):
    model_fn = _gaussian_eps_fn(linear, 0.0, 0.5)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = linear.ddim_sample(model_fn, x_T=x_T, steps=10, generator=torch.Generator().manual_seed(1))
    b = linear.ddim_sample(model_fn, x_T=x_T, steps=10, generator=torch.Generator().manual_seed(2))
    assert a.shape == x_T.shape and torch.equal(a, b)


def test_callback_sees_every_step_and_final_state(linear):
    model_fn = _gaussian_eps_fn(linear, 0.0, 0.5)
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    out = linear.dpmpp2m_sample(model_fn, (2, 1, 4, 4), steps=6,
                                generator=torch.Generator().manual_seed(0),
                                callback=lambda i, x, x0: seen.append((i, x.clone(), x0.clone())))
    assert [i for i, _, _ in seen] == list(range(6))
    assert torch.equal(seen[-1][1], out)
    assert all(x0.abs().max().item() <= 1.0 for _, _, x0 in seen)  # clip_x0 defaults to True


@pytest.mark.parametrize("sampler,steps", [("ddim", 25), ("ddpm", T)])
def test_step_hook_gets_next_timesteps_and_can_paste_known_pixels(linear, sampler, steps):
    gen = torch.Generator().manual_seed(4)
    known = torch.rand(2, 1, 8, 8, generator=gen) * 2 - 1
    mask = torch.zeros_like(known, dtype=torch.bool)
    mask[..., :4] = True
    seen_t: list[int | None] = []

    def hook(x: torch.Tensor, t_next: torch.Tensor | None) -> torch.Tensor:
        seen_t.append(None if t_next is None else int(t_next[0]))
        if t_next is None:
            return torch.where(mask, known, x)
        assert t_next.shape == (x.shape[0],) and t_next.dtype == torch.long
        noisy = linear.q_sample(known, t_next, torch.randn(known.shape, generator=gen))
        return torch.where(mask, noisy, x)

    out = linear.sample(_gaussian_eps_fn(linear, 0.0, 0.5), sampler, known.shape, steps=steps,
                        generator=torch.Generator().manual_seed(5), step_hook=hook)
    assert seen_t == linear.timesteps_for(steps).tolist()[1:] + [None]
    assert torch.equal(out[mask], known[mask])
    assert not torch.equal(out[~mask], known[~mask])


# ------------------------------------------------------------------------- v-prediction

def _v_oracle(diff: Diffusion, x0: torch.Tensor):
    """The exact v for the current x_t: v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    return lambda x_t, t: diff.training_target(x0, t, diff.predict_eps(x_t, t, x0))


@pytest.mark.parametrize("sampler,steps", [("ddim", 50), ("dpmpp2m", 20), ("ddpm", 0)])
def test_v_prediction_samplers_recover_x0_with_oracle(sampler, steps, image_x0):
    diff = Diffusion(prediction="v")
    out = diff.sample(_v_oracle(diff, image_x0), sampler, image_x0.shape, steps=steps,
                      generator=torch.Generator().manual_seed(0))
    assert (out - image_x0).abs().max().item() < ORACLE_ATOL


def test_v_target_and_model_x0_invert_each_other():
    diff = Diffusion(prediction="v")
    gen = torch.Generator().manual_seed(7)
    x0, eps = torch.rand(6, 1, 4, 4, generator=gen) * 2 - 1, torch.randn(6, 1, 4, 4, generator=gen)
    t = torch.tensor([0, 10, 300, 700, 990, 999])
    x_t = diff.q_sample(x0, t, eps)
    v = diff.training_target(x0, t, eps)
    torch.testing.assert_close(diff.model_x0(x_t, t, v), x0, atol=1e-5, rtol=0)
    # at t = T-1 the signal is almost gone, so v is almost -x0: the output's error reaches x0
    # unamplified (eps prediction would multiply it by 1/sqrt(abar) = 157)
    err = 0.03
    x0_err = (diff.model_x0(x_t, t, v + err) - x0).abs()[-1].max().item()
    assert x0_err <= err + 1e-5


def test_v_loss_sees_high_t_errors_that_the_eps_loss_hides():
    """The same x0 error costs 1/abar more under v at high t than under eps (up to ~25000x)."""
    v, e = Diffusion(prediction="v"), Diffusion(prediction="eps")
    t = torch.tensor([999])
    abar = float(e.alpha_bar[999])
    x0, eps, dx0 = torch.zeros(1, 1, 2, 2), torch.randn(1, 1, 2, 2), 0.1
    x_t = e.q_sample(x0, t, eps)
    # outputs whose implied x0 is off by dx0, for each parametrisation
    v_out = v.training_target(x0 + dx0, t, v.predict_eps(x_t, t, x0 + dx0))
    eps_out = e.predict_eps(x_t, t, x0 + dx0)
    loss_v = (v_out - v.training_target(x0, t, eps)).pow(2).mean().item()
    loss_eps = (eps_out - eps).pow(2).mean().item()
    assert loss_v / loss_eps == pytest.approx(1.0 / abar, rel=1e-2)


def test_min_snr_weights():
    v, e = Diffusion(prediction="v"), Diffusion(prediction="eps")
    t = torch.tensor([0, 500, 999])
    snr = (e.alpha_bar / (1 - e.alpha_bar))[t]
    assert v.loss_weight(t, 0.0) is None
    torch.testing.assert_close(v.loss_weight(t, 5.0), snr.clamp(max=5.0) / (snr + 1))
    torch.testing.assert_close(e.loss_weight(t, 5.0), snr.clamp(max=5.0) / snr)
    assert v.loss_weight(t, 5.0)[0] < 0.01 and e.loss_weight(t, 5.0)[-1] == pytest.approx(1.0)


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction"):
        Diffusion(prediction="x0")
