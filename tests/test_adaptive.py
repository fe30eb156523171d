"""Tests for dgan.adaptive: tau sampling, instance noise and the adaptive-T controller."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dgan.adaptive import AdaptiveT, check_alpha_bar_covers, diffuse, sample_tau

# Chi-square 0.999 quantile for 14 degrees of freedom (15 bins), from standard tables;
# used only when scipy is not installed.
CHI2_CRIT_DF14_P999 = 36.123
N_TAU = 200_000


class _NoHostSync(TorchFunctionMode):
    """Fails on any tensor -> python conversion, i.e. anything that would sync a GPU."""

    FORBIDDEN = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = getattr(func, "__name__", "")
        if name in self.FORBIDDEN:
            raise AssertionError(f"host sync via Tensor.{name} in the hot path")
        return func(*args, **(kwargs or {}))


def _chi2_crit(df: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:
        assert df == 14, "the fallback table only holds df=14"
        return CHI2_CRIT_DF14_P999
    return float(chi2.ppf(0.999, df))


def _binned_chi2(samples: torch.Tensor, probs: torch.Tensor, bin_width: int) -> tuple[float, int]:
    """Chi-square of samples (values 1..K) against probs[k-1], in consecutive bins."""
    counts = torch.bincount(samples - 1, minlength=probs.numel()).double()
    observed = counts.reshape(-1, bin_width).sum(1)
    expected = probs.reshape(-1, bin_width).sum(1) * samples.numel()
    assert expected.min() >= 5, "bins too narrow for a chi-square test"
    stat = ((observed - expected) ** 2 / expected).sum()
    return float(stat), observed.numel() - 1


def _draw(t_adapt: int, dist: str, n: int = N_TAU, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return sample_tau(n, torch.tensor(t_adapt), t_max=1000, dist=dist, generator=gen, device="cpu")


def test_priority_tau_is_proportional_to_k() -> None:
    tau = _draw(300, "priority")
    nonzero = tau[tau > 0]
    k = torch.arange(1, 301, dtype=torch.float64)
    stat, df = _binned_chi2(nonzero, k / k.sum(), bin_width=20)
    assert stat < _chi2_crit(df)
    # A uniform law must fail the same test, or the test has no power.
    uniform_stat, _ = _binned_chi2(nonzero, torch.full((300,), 1 / 300, dtype=torch.float64), 20)
    assert uniform_stat > _chi2_crit(df)


def test_uniform_tau_is_uniform_over_1_to_t_adapt() -> None:
    tau = _draw(300, "uniform")
    nonzero = tau[tau > 0]
    stat, df = _binned_chi2(nonzero, torch.full((300,), 1 / 300, dtype=torch.float64), 20)
    assert stat < _chi2_crit(df)


def test_zero_fraction_is_half_within_4_sigma() -> None:
    tau = _draw(300, "priority")
    frac = (tau == 0).double().mean().item()
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / N_TAU)
    # 'uniform' may also draw 0 itself: 0.5 + 0.5 / (T_adapt + 1) zeros.
    frac_u = (_draw(300, "uniform") == 0).double().mean().item()
    p_u = 0.5 + 0.5 / 301
    assert abs(frac_u - p_u) < 4 * math.sqrt(p_u * (1 - p_u) / N_TAU)


@pytest.mark.parametrize("dist", ["priority", "uniform"])
@pytest.mark.parametrize("t_adapt", [0, 1, 37, 1000])
def test_tau_stays_within_0_and_t_adapt(dist: str, t_adapt: int) -> None:
    tau = _draw(t_adapt, dist, n=20_000)
    assert tau.dtype == torch.long and tau.shape == (20_000,)
    assert tau.min() >= 0 and tau.max() <= t_adapt
    if t_adapt == 0:
        assert torch.all(tau == 0)
    else:
        assert tau.max() > 0


def test_zero_fraction_extremes_and_reproducibility() -> None:
    gen = torch.Generator().manual_seed(1)
    all_clean = sample_tau(1000, torch.tensor(50), t_max=100, zero_fraction=1.0, generator=gen)
    assert torch.all(all_clean == 0)
    none_clean = sample_tau(1000, torch.tensor(50), t_max=100, zero_fraction=0.0, generator=gen)
    assert torch.all(none_clean > 0)  # priority never draws 0 by itself
    assert torch.equal(_draw(40, "priority", n=64, seed=3), _draw(40, "priority", n=64, seed=3))
    with pytest.raises(ValueError, match="priority"):
        sample_tau(4, torch.tensor(5), t_max=10, dist="gaussian")  # type: ignore[arg-type]


def test_hot_path_makes_no_host_sync() -> None:
    ctrl = AdaptiveT(interval=1, ada_kimg=0.01)
    alpha_bar = torch.linspace(0.999, 0.01, 1001)
    x = torch.randn(8, 1, 4, 4, requires_grad=True)
    with _NoHostSync():
        tau = sample_tau(8, ctrl.t_adapt, t_max=1000)
        y = diffuse(x, tau, alpha_bar, 0.05)
        ctrl.accumulate(torch.randn(8, 1, 2, 2), 8)
        ctrl.update(reduce_fn=lambda t: t * 2)
    assert y.shape == x.shape
    # The guard itself must bite, or the check above proves nothing.
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        ctrl.p.item()


def _alpha_bar_ending_near_zero() -> torch.Tensor:
    return torch.cat([torch.linspace(0.9999, 0.5, 10), torch.tensor([1e-10])])


def test_diffuse_at_full_noise_has_std_sigma() -> None:
    sigma = 0.05
    x = torch.zeros(50, 1, 40, 40)
    tau = torch.full((50,), 10)
    y = diffuse(x, tau, _alpha_bar_ending_near_zero(), sigma, torch.Generator().manual_seed(0))
    assert y.std().item() == pytest.approx(sigma, rel=0.02)
    assert abs(y.mean().item()) < 0.01 * sigma


def test_diffuse_gradient_is_sqrt_alpha_bar_and_tau0_is_nearly_clean() -> None:
    alpha_bar = _alpha_bar_ending_near_zero()
    tau = torch.tensor([0, 3, 9, 10])
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    y = diffuse(x, tau, alpha_bar, 0.05)
    y.sum().backward()
    expected = alpha_bar[tau].sqrt().view(4, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(x.grad, expected)
    # tau=0 uses alpha_bar[0] = 0.9999: noise std 0.01 * sigma.
    assert (y[0] - x[0]).abs().max().item() < 6 * 0.01 * 0.05
    assert (y[0] - x[0]).abs().max().item() > 0


def test_check_alpha_bar_covers_catches_off_by_one() -> None:
    check_alpha_bar_covers(torch.ones(1001), t_max=1000)
    with pytest.raises(ValueError, match="t_max"):
        check_alpha_bar_covers(torch.ones(1000), t_max=1000)


def _feed(ctrl: AdaptiveT, sign: float, n_imgs: int, patches: int = 4) -> None:
    ctrl.accumulate(torch.full((n_imgs, 1, patches, 1), sign), n_imgs)


def test_p_moves_by_exactly_imgs_over_ada_kimg() -> None:
    ctrl = AdaptiveT(target=0.6, ada_kimg=100.0)
    _feed(ctrl, +1.0, 64)  # r_d = 1 > 0.6: D overfits, more noise
    ctrl.update()
    assert ctrl.p.item() == 64 / (100.0 * 1000)
    assert ctrl.r_d.item() == 1.0
    _feed(ctrl, +1.0, 32)
    _feed(ctrl, +1.0, 32)  # two batches before one update add up
    ctrl.update()
    assert ctrl.p.item() == 64 / (100.0 * 1000) + 64 / (100.0 * 1000)
    _feed(ctrl, -1.0, 100)  # r_d = -1 < 0.6: less noise
    ctrl.update()
    assert ctrl.p.item() == pytest.approx(28 / 100_000, abs=1e-15)


def test_r_d_is_mean_sign_over_all_patches() -> None:
    ctrl = AdaptiveT(target=0.5)
    logits = torch.tensor([3.0, 0.2, 1.0, -4.0]).view(1, 1, 2, 2).repeat(5, 1, 1, 1)
    ctrl.accumulate(logits, 5)
    ctrl.update()
    assert ctrl.r_d.item() == 0.5
    assert ctrl.p.item() == 0.0  # r_d == target exactly: no move


def test_p_clamps_and_t_adapt_stays_in_range() -> None:
    ctrl = AdaptiveT(ada_kimg=0.1, t_min=10, t_max=1000)
    for _ in range(50):
        _feed(ctrl, +1.0, 7)
        ctrl.update()
        assert 0.0 <= ctrl.p.item() <= 1.0 and 10 <= ctrl.t_adapt.item() <= 1000
    assert ctrl.p.item() == 1.0 and ctrl.t_adapt.item() == 1000
    for _ in range(50):
        _feed(ctrl, -1.0, 7)
        ctrl.update()
        assert 0.0 <= ctrl.p.item() <= 1.0 and 10 <= ctrl.t_adapt.item() <= 1000
    assert ctrl.p.item() == 0.0 and ctrl.t_adapt.item() == 10


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.1234, 1.0])
def test_t_adapt_formula(p: float) -> None:
    ctrl = AdaptiveT(t_min=10, t_max=1000)
    ctrl.load_state_dict({"p": p, "t_adapt": 0, "r_d": 0.0})
    assert ctrl.t_adapt.item() == 10 + round(p * 990)
    assert ctrl.t_adapt.dtype == torch.long and ctrl.t_adapt.dim() == 0


def test_update_without_images_and_accumulator_reset() -> None:
    ctrl = AdaptiveT()
    ctrl.update()  # nothing accumulated: no division by zero, no move
    assert ctrl.p.item() == 0.0 and ctrl.t_adapt.item() == 10
    _feed(ctrl, +1.0, 10)
    ctrl.update()
    p_after = ctrl.p.item()
    assert ctrl.imgs_since_last.item() == 0
    r_d_after = ctrl.r_d.item()
    ctrl.update()  # accumulators were reset, so a second update moves nothing, r_d included
    assert ctrl.p.item() == p_after and ctrl.r_d.item() == r_d_after == 1.0


def test_should_update_every_interval_steps() -> None:
    ctrl = AdaptiveT(interval=4)
    assert [s for s in range(12) if ctrl.should_update(s)] == [3, 7, 11]


def test_reduce_fn_doubling_keeps_r_d_but_doubles_images() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0, -1.0]).view(1, 1, 4, 1).repeat(16, 1, 1, 1)
    single, doubled = AdaptiveT(target=0.0), AdaptiveT(target=0.0)
    seen: list[torch.Tensor] = []

    def fake_all_reduce(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return t * 2  # two ranks holding identical statistics

    for ctrl in (single, doubled):
        ctrl.accumulate(logits, 16)
    single.update()
    doubled.update(reduce_fn=fake_all_reduce)
    assert seen[0].tolist() == [32, 64, 16]  # [sign sum, patch count, images] of this rank
    assert doubled.r_d.item() == single.r_d.item() == 0.5
    assert doubled.p.item() == 2 * single.p.item() == 32 / 100_000


def test_state_dict_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    ctrl = AdaptiveT(ada_kimg=1.0)
    for _ in range(3):
        _feed(ctrl, +1.0, 123)
        ctrl.update()
    _feed(ctrl, +1.0, 5)  # a partial window: rank-local, so not checkpointed
    state = ctrl.state_dict()
    assert all(type(v) in (int, float) for v in state.values())
    path = tmp_path / "ada.pt"
    torch.save(state, path)
    restored = AdaptiveT(ada_kimg=1.0)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.p.item() == ctrl.p.item() == 369 / 1000
    assert restored.t_adapt.item() == ctrl.t_adapt.item() == 10 + round(0.369 * 990)
    assert restored.r_d.item() == ctrl.r_d.item()
    assert restored.imgs_since_last.item() == 0
    assert restored.as_metrics() == {"ada/p": 0.369, "ada/t_adapt": 375.0, "ada/r_d": 1.0}


def test_load_state_dict_rejects_missing_keys_and_bad_p() -> None:
    ctrl = AdaptiveT()
    with pytest.raises(KeyError, match=r"missing \['p'\]"):
        ctrl.load_state_dict({"t_adapt": 10, "r_d": 0.0})
    with pytest.raises(ValueError, match="outside"):
        ctrl.load_state_dict({"p": 1.5, "t_adapt": 10, "r_d": 0.0})


def test_to_moves_all_state_and_keeps_working() -> None:
    ctrl = AdaptiveT().to(torch.device("cpu"))
    tensors: list[Callable[[], torch.Tensor]] = [
        lambda: ctrl.p, lambda: ctrl.t_adapt, lambda: ctrl.r_d, lambda: ctrl.imgs_since_last
    ]
    assert all(get().device == torch.device("cpu") for get in tensors)
    if torch.cuda.is_available():  # real move when an accelerator is present
        ctrl.to("cuda")
        assert all(get().is_cuda for get in tensors)
        ctrl.accumulate(torch.ones(4, 1, 4, 1, device="cuda"), 4)
        ctrl.update()
        assert ctrl.p.item() > 0


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="t_min"):
        AdaptiveT(t_min=20, t_max=10)
    with pytest.raises(ValueError, match="ada_kimg"):
        AdaptiveT(ada_kimg=0.0)
