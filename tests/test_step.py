"""The hybrid step's contract (DESIGN.md "One training step"), on the real G and D."""
import copy

import pytest
import torch

import dgan.step as step_mod
from dgan.adv_schedule import adv_gain
from dgan.config import load_config
from dgan.losses import diffusion_loss
from dgan.monitor import MetricWindow
from dgan.step import draw_timesteps, micro_step, train_step
from dgan.trainer import build_trainables


def make(tiny_overrides, *extra):
    cfg = load_config(None, tiny_overrides + list(extra))
    torch.manual_seed(0)
    tr, ema, _ = build_trainables(cfg, torch.device("cpu"))
    return cfg, tr


def batch(n=4, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1, torch.zeros(n, dtype=torch.long)


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_adv_weight_zero_gives_pure_diffusion_gradients(tiny_overrides):
    cfg, tr = make(tiny_overrides, "gan.adv_weight=0.0")
    x0, y = batch()
    torch.manual_seed(5)
    micro_step(tr, cfg, x0, y, do_r1=False, sync=True, loss_scale=1.0)
    hybrid = grads(tr.G_raw)
    assert not grads(tr.D_raw), "with adv_weight 0, D must not be trained (G never sees it)"
    tr.G_raw.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same t and eps as the hybrid step drew first
    t, _ = draw_timesteps(4, tr.diffusion.num_steps, cfg.gan.adv_t_max, torch.device("cpu"))
    eps = torch.randn_like(x0)
    target = tr.diffusion.training_target(x0, t, eps)  # v by default
    diffusion_loss(tr.G(tr.diffusion.q_sample(x0, t, eps), t), target).backward()
    pure = grads(tr.G_raw)
    assert hybrid.keys() == pure.keys() and len(pure) > 10
    for k in pure:
        torch.testing.assert_close(hybrid[k], pure[k], rtol=1e-5, atol=1e-7)


def test_adversarial_term_changes_g_but_g_step_gives_d_no_gradient(tiny_overrides):
    out = {}
    for w in (0.5, 1.0):
        cfg, tr = make(tiny_overrides, f"gan.adv_weight={w}", "gan.adv_t_max=999")
        torch.manual_seed(5)
        micro_step(tr, cfg, *batch(), do_r1=False, sync=True, loss_scale=1.0)
        out[w] = (grads(tr.G_raw), grads(tr.D_raw))
        assert all(p.requires_grad for p in tr.D_raw.parameters())  # unfrozen again afterwards
    g0, d0 = out[0.5]
    g1, d1 = out[1.0]
    assert len(d0) > 5
    # D's gradients come from L_D alone: identical whatever the adversarial weight on G
    for k in d0:
        torch.testing.assert_close(d0[k], d1[k], rtol=0, atol=0)
    # ... while G really does feel D
    assert any((g0[k] - g1[k]).abs().max() > 1e-6 for k in g0)


def test_one_generator_forward_per_micro_batch(tiny_overrides):
    cfg, tr = make(tiny_overrides, "train.grad_accum=2", "gan.fakes=recon")  # samples add their chain's
    calls = []
    tr.G_raw.register_forward_hook(lambda *a: calls.append(1))
    train_step(tr, cfg, [batch(), batch()], step=1)
    assert len(calls) == 2


def test_fakes_only_where_t_at_most_adv_t_max(tiny_overrides):
    # adv_t_max=0 keeps (almost) no fakes: L_adv must then be exactly zero and carry no G gradient
    cfg, tr = make(tiny_overrides, "gan.adv_t_max=0", "gan.adv_weight=1.0", "gan.fakes=recon")
    torch.manual_seed(3)
    m = micro_step(tr, cfg, *batch(), do_r1=False, sync=True, loss_scale=1.0)
    assert float(m["L_adv"]) == 0.0


def test_timesteps_are_uniform_with_the_fakes_first():
    """draw_timesteps: k ~ Binomial first, then k timesteps <= adv_t_max and the rest above, which on a
    shuffled batch is exactly the law of uniform draws (the D step then runs on k fakes, not B)."""
    torch.manual_seed(0)
    ts, ks = [], []
    for _ in range(2000):
        t, k = draw_timesteps(64, 1000, 100, torch.device("cpu"))
        assert bool((t[:k] <= 100).all()) and bool((t[k:] > 100).all())
        ts.append(t)
        ks.append(k)
    t = torch.cat(ts).float()
    assert abs(float((t <= 100).float().mean()) - 0.101) < 0.005  # P(t <= 100) = 101/1000
    assert abs(float(t.mean()) - 499.5) < 3.0 and abs(float(t.std()) - 288.7) < 3.0  # uniform on 0..999
    histogram = torch.histc(t, bins=10, min=0, max=1000) / t.numel()
    assert float((histogram - 0.1).abs().max()) < 0.005
    assert draw_timesteps(8, 1000, 999, torch.device("cpu"))[1] == 8  # every t yields a fake


def test_r1_runs_only_every_r1_every_steps(tiny_overrides, monkeypatch):
    cfg, tr = make(tiny_overrides, "gan.r1_every=4", "gan.r1_gamma=1.0")
    seen = []
    real_r1 = step_mod.r1_penalty
    monkeypatch.setattr(step_mod, "r1_penalty", lambda *a: seen.append(1) or real_r1(*a))
    l_r1 = [float(train_step(tr, cfg, [batch()], step=s)["L_r1"]) for s in range(8)]
    assert len(seen) == 2
    assert [v > 0 for v in l_r1] == [True, False, False, False, True, False, False, False]


def test_non_finite_step_is_skipped_on_device(tiny_overrides):
    cfg, tr = make(tiny_overrides)
    train_step(tr, cfg, [batch()], step=1)  # one good step so Adam has state
    before_g = copy.deepcopy(tr.G_raw.state_dict())
    before_d = copy.deepcopy(tr.D_raw.state_dict())
    steps_before = [float(s["step"]) for s in tr.opt_g.state.values()]
    x0, y = batch()
    x0[0, 0, 0, 0] = float("nan")
    m = train_step(tr, cfg, [(x0, y)], step=2)
    assert float(m["skipped"]) == 1.0 and float(tr.skip_streak) == 1.0
    for k, v in tr.G_raw.state_dict().items():
        assert torch.equal(v, before_g[k]), k
    for k, v in tr.D_raw.state_dict().items():
        assert torch.equal(v, before_d[k]), k
    assert [float(s["step"]) for s in tr.opt_g.state.values()] == steps_before
    m = train_step(tr, cfg, [batch()], step=3)
    assert float(m["skipped"]) == 0.0 and float(tr.skip_streak) == 0.0  # the streak resets


@pytest.mark.parametrize("precision, extra", [("bf16", []), ("fp16", []), ("fp16", ["gan.adv_weight=0"])])
def test_mixed_precision_paths_run_and_update(tiny_overrides, precision, extra):
    cfg, tr = make(tiny_overrides, f"train.precision={precision}", "train.device=cpu", *extra)
    before = [p.detach().clone() for p in tr.G_raw.parameters()]
    m = train_step(tr, cfg, [batch()], step=1)
    assert torch.isfinite(m["L_diff"])
    assert tr.scaler_g.is_enabled() == (precision == "fp16")
    # fp16's first steps may be skipped by the scaler's overflow check, not every step; bf16 must update.
    # Stepped only until one is taken: an fp16 step of the tiny model costs ~10 s on a CPU.
    if precision == "fp16":
        skipped = [float(m["skipped"])]
        while skipped[-1] and len(skipped) < 4:
            skipped.append(float(train_step(tr, cfg, [batch()], step=len(skipped) + 1)["skipped"]))
        assert skipped[-1] == 0.0, f"fp16: every step skipped {skipped} (a NaN the scaler cannot back off from)"
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.G_raw.parameters()))


def test_adversarial_warmup_holds_g_off_then_ramps(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["gan.adv_warmup_kimg=1", "train.batch_size=100"])
    gains = [adv_gain(cfg, step) for step in (0, 10, 15, 20, 50)]  # 0, 1, 1.5, 2, 5 kimg seen
    assert gains == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert adv_gain(load_config(None, tiny_overrides), 0) == 1.0  # no warm-up: the full term at once


def test_self_sampled_fakes_come_from_gs_own_chain_and_train_g_through_their_last_step(tiny_overrides):
    cfg, tr = make(tiny_overrides, "gan.fakes=samples", "gan.self_fakes=3", "gan.self_fake_steps=4",
                   "gan.adv_t_max=100", "gan.adv_balance=true", "gan.adv_weight=0.2", "gan.d_sees_xt=true")
    x0, y = batch()
    B, calls, outs = x0.shape[0], [], []
    real_forward = tr.G_raw.forward

    def spy(x, t, *a):
        out = real_forward(x, t, *a)
        calls.append((x.shape[0], t.tolist(), torch.is_grad_enabled()))
        if out.requires_grad:  # the last gradient to reach it is the step's backward's
            out.register_hook(lambda g: outs.append(g.clone()))
        return out

    tr.G_raw.forward = spy
    torch.manual_seed(7)
    m = micro_step(tr, cfg, x0, y, do_r1=False, sync=True, loss_scale=1.0)
    chain, last = calls[:-1], calls[-1]
    t_fake = last[1][-1]
    # the chain: 3 samples, no grad, down the grid points above the drawn t <= 100
    assert chain and all(n == 3 and not grad for n, _, grad in chain)
    assert [ts[0] for _, ts, _ in chain] == [t for t in [999, 562, 249, 62] if t > t_fake]
    # the training forward: the batch, then the 3 samples at one t <= 100, with grad
    assert last[0] == B + 3 and last[2] and set(last[1][B:]) == {t_fake} and 0 <= t_fake <= 100
    # D's gradient reaches G through the sample rows, at 0.2x the batch's mean diffusion-gradient norm
    row_norms = outs[-1].flatten(1).norm(dim=1)
    assert torch.allclose(row_norms[B:], 0.2 * row_norms[:B].mean().expand(3), rtol=1e-3)
    assert float(m["L_adv"]) > 0 and torch.isfinite(m["L_D"])
    assert any(v.abs().max() > 0 for v in grads(tr.D_raw).values())


def test_self_fakes_zero_makes_one_fake_per_eight_images(tiny_overrides):
    # The default (0): the seed setup's batch of 8 gets 1 fake, not 8 that would double G's rows
    for n, k in ((4, 1), (16, 2)):
        cfg, tr = make(tiny_overrides, "gan.fakes=samples", "gan.self_fakes=0")
        rows, real_forward = [], tr.G_raw.forward
        tr.G_raw.forward = lambda x, t, *a: rows.append(x.shape[0]) or real_forward(x, t, *a)
        micro_step(tr, cfg, *batch(n), do_r1=False, sync=True, loss_scale=1.0)
        assert rows[0] == k and rows[-1] == n + k, (n, rows)  # the chain's forwards, then the training one


def test_d_sees_xt_judges_each_image_beside_its_x_t_and_t(tiny_overrides):
    cfg, tr = make(tiny_overrides, "gan.d_sees_xt=true", "gan.adv_t_max=999", "gan.adv_weight=1.0")
    assert tr.D_raw.convs[0].in_channels == 2  # the image and its x_t, channel-wise
    torch.manual_seed(5)
    m = micro_step(tr, cfg, *batch(), do_r1=True, sync=True, loss_scale=1.0)
    assert float(m["L_adv"]) > 0 and torch.isfinite(m["L_D"])
    d_grads = grads(tr.D_raw)
    assert any(k.startswith("t_embed") for k in d_grads) and any(v.abs().max() > 0 for v in d_grads.values())
    with pytest.raises(ValueError, match="condition_on_t"):
        tr.D_raw(torch.zeros(2, 2, 32, 32), torch.zeros(2, dtype=torch.long))  # t is required


@pytest.mark.parametrize("extra", [["gan.fakes=recon"], ["gan.fakes=recon", "gan.d_sees_xt=true"],
                                   ["gan.fakes=samples", "gan.self_fakes=2", "gan.self_fake_every=1"]])
def test_d_draws_leave_gs_random_stream_alone(tiny_overrides, extra):
    """A hybrid and a pure-diffusion run of one seed are paired: over several steps, G draws the same
    t and eps in both (the global stream, G's only source, ends in the same state), and a hybrid run
    repeats exactly (D's own stream is seeded, not drawn from anything that varies)."""
    after, d_loss_by_run = {}, {}
    for w in (0.0, 0.3, 0.3):
        cfg, tr = make(tiny_overrides, f"gan.adv_weight={w}", "gan.adv_t_max=999", *extra)
        torch.manual_seed(7)
        metrics = [train_step(tr, cfg, [batch(), batch()], step=s) for s in range(3)]
        after.setdefault(w, []).append(torch.get_rng_state())
        d_loss_by_run.setdefault(w, []).append(torch.stack([m["L_D"] for m in metrics]))
    assert torch.equal(after[0.0][0], after[0.3][0]), "D's draws moved the global stream G draws from"
    torch.testing.assert_close(d_loss_by_run[0.3][0], d_loss_by_run[0.3][1], rtol=0, atol=0)
    assert float(d_loss_by_run[0.3][0].min()) > 0  # D did run in the hybrid


def test_lazy_self_sampled_fakes_run_d_on_one_step_in_n_with_n_times_the_push(tiny_overrides, monkeypatch):
    """gan.self_fake_every=3: steps 0 and 3 are hybrid steps, with the balanced ratio x3 (lazy, like R1);
    steps 1 and 2 are pure-diffusion steps that leave D untouched; the log window's D metrics are
    means over the steps that ran D, not diluted by the others' zeros."""
    cfg, tr = make(tiny_overrides, "gan.fakes=samples", "gan.self_fakes=2", "gan.self_fake_every=3",
                   "gan.adv_weight=0.3")
    ratios, real = [], step_mod.balanced_adv_surrogate
    monkeypatch.setattr(step_mod, "balanced_adv_surrogate",
                        lambda *a, **kw: ratios.append(a[4]) or real(*a, **kw))
    window, metrics = MetricWindow(), []
    for s in range(4):
        before = copy.deepcopy(tr.D_raw.state_dict())
        metrics.append(train_step(tr, cfg, [batch()], step=s))
        window.add(metrics[-1])
        moved = any(not torch.equal(before[k], v) for k, v in tr.D_raw.state_dict().items())
        assert moved == (s % 3 == 0), f"step {s}: D {'moved' if moved else 'stood still'}"
    assert ratios == pytest.approx([0.9, 0.9])
    assert [float(m["L_D"]) > 0 for m in metrics] == [True, False, False, True]
    out = window.reduce()
    assert out["L_D"] == pytest.approx((float(metrics[0]["L_D"]) + float(metrics[3]["L_D"])) / 2, rel=1e-5)
    assert "d_steps" not in out
