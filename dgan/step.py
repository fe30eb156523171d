"""One Diffusion-GAN hybrid training step (DESIGN.md, "One training step").

Per micro-batch: ONE generator forward gives G's output (the diffusion loss) and, through
x0_hat, the fake images. With gan.fakes=recon only samples with t <= adv_t_max make one, and the
timesteps are drawn with those k samples first (draw_timesteps), so D runs on the k fakes rather
than on all B under a mask; with gan.fakes=samples the fakes are G's own samples, whose x_t (from a
no-grad DDIM chain) ride along in the same forward. D learns on diffused real vs diffused
(detached) fake; G learns from L_diff + adv_weight * L_adv with D frozen (or, with
gan.adv_balance, an adversarial gradient bounded per fake). Then both optimizers step.

Both players see the same D weights within a step (simultaneous updates). We do this on
purpose: with gradient accumulation, an alternating D-then-G update would have to keep every
micro-batch's G graph alive until D has stepped (memory x accum) or run G a second time.

Nothing here reads a tensor on the host: losses are returned as tensors and reduced once per
log interval by the caller, and a non-finite step is skipped on device (see `apply_step`).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from dgan import distributed as dist
from dgan.adaptive import AdaptiveT, diffuse, sample_tau
from dgan.adv_schedule import adv_gain, adversarial_period
from dgan.config import Config
from dgan.diffusion import Diffusion
from dgan.generation import sr_condition
from dgan.losses import balanced_adv_surrogate, d_loss, diffusion_loss, g_adv_loss, r1_penalty
from dgan.seeding import Stream, stream_generator
from dgan.update import apply_step, unscale_and_clip


@dataclass
class Trainables:
    """What the step updates. G and D may be DDP- and compile-wrapped; `*_raw` are the plain modules."""
    G: nn.Module
    D: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    diffusion: Diffusion
    ada: AdaptiveT
    skip_streak: torch.Tensor = field(default_factory=lambda: torch.zeros(()))

    @property
    def D_raw(self) -> nn.Module:
        return dist.unwrap(self.D)

    @property
    def G_raw(self) -> nn.Module:
        return dist.unwrap(self.G)


@dataclass
class TrainState:
    """The trainer's own state, checkpointed like any other component."""
    step: int = 0
    images_seen: int = 0
    mlflow_run_id: Optional[str] = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        self.step, self.images_seen = int(d["step"]), int(d["images_seen"])
        self.mlflow_run_id = d.get("mlflow_run_id")


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def drop_labels(y: Optional[torch.Tensor], p: float) -> Optional[torch.Tensor]:
    """Classifier-free guidance training: replace a fraction p of labels by -1 (the null class)."""
    if y is None or p <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < p
    return torch.where(drop, torch.full_like(y, -1), y)


def with_cond(x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """D's input: the image, plus (task=sr) the upsampled LR of the same samples, channel-wise.

    Why a conditional D for SR: an unconditional D only asks "is this a plausible HR image?", so G
    could satisfy it with sharp detail that contradicts the LR. Seeing the LR next to the image, D
    also judges whether the two agree (pix2pix-style). The LR is not diffused with tau: it is a clean
    observation at test time, and noising it would hide the consistency that D is meant to check.
    """
    return x if cond is None else torch.cat([x, cond], dim=1)


def draw_timesteps(batch: int, num_steps: int, adv_t_max: int, device: torch.device
                   ) -> tuple[torch.Tensor, int]:
    """Uniform diffusion timesteps for a batch, the ones that yield fakes (t <= adv_t_max) first;
    returns (t [batch], k = how many of them yield fakes).

    Why: D only judges fakes from t <= adv_t_max, about 1 sample in 10. k is drawn first, as a
    Binomial(batch, (adv_t_max + 1) / T) on the CPU generator (a host number: no device sync, and
    its state is checkpointed); then k timesteps from [0, adv_t_max] and the rest from the others.
    On an exchangeable (shuffled) batch that is exactly the law of `batch` uniform draws, and D runs
    on k fakes instead of all B fakes under a mask: the same losses at about half D's cost.
    """
    p = min(1.0, (adv_t_max + 1) / num_steps)
    k = int(torch.binomial(torch.tensor(float(batch)), torch.tensor(p)))
    low = torch.randint(0, adv_t_max + 1, (k,), device=device)
    if k == batch:
        return low, k
    high = torch.randint(adv_t_max + 1, num_steps, (batch - k,), device=device)
    return torch.cat([low, high]), k


@dataclass
class DSide:
    """What D sees beside each image, per block of its input: the context channels (the SR LR, and
    with gan.d_sees_xt the x_t the image is judged against) and that x_t's step t; None = nothing."""
    real: Optional[torch.Tensor] = None
    fake: Optional[torch.Tensor] = None
    t_real: Optional[torch.Tensor] = None
    t_fake: Optional[torch.Tensor] = None


@dataclass
class AdvDraws:
    """The random draws of a micro-batch that only the adversarial side makes (a pure-diffusion run
    makes none): `device` for D's tau, instance noise and x_t and the self-sampled fakes' x_T, `host`
    for host numbers (those fakes' t, drawn without a sync). None: the global streams."""
    device: Optional[torch.Generator] = None
    host: Optional[torch.Generator] = None


def adv_draws(cfg: Config, device: torch.device, step: int, micro: int) -> AdvDraws:
    """Micro-batch `micro` of `step`'s AdvDraws, from stateless streams of (seed, rank, step, micro).

    Why: on the global stream, these draws shifted every later t and eps of G, so a hybrid and a
    pure-diffusion run of one seed parted at step 1 (benchmarks/RESULTS.md, "Paired arms"). Stateless,
    they need nothing in a checkpoint for exact resume. The host stream has one more part, so on a CPU
    run its draws are not the device stream's."""
    parts = (cfg.train.seed, Stream.D_NOISE, dist.get_rank(), step, micro)
    return AdvDraws(stream_generator(device, *parts), stream_generator(None, *parts, 1))


def d_context(tr: Trainables, cfg: Config, x0: torch.Tensor, x_t_fake: torch.Tensor, t_fake: torch.Tensor,
              cond: Optional[torch.Tensor], d_gen: Optional[torch.Generator] = None) -> DSide:
    """D's side inputs for the B reals and the k fakes (made from x_t_fake at t_fake; the SR condition
    of a fake is that of the batch's sample in the same row).

    gan.d_sees_xt: a fake x0_hat is judged beside the x_t that G denoised, at its t. Why: alone, a
    slightly blurred x0_hat from t <= adv_t_max is nearly a real image; beside x_t, D can ask whether
    the image explains x_t as a real one does (the residual x_t - sqrt(abar) x0 of a real pair is white
    noise). Off by default: with it D stayed at chance, with R1 (benchmarks/RESULTS.md) and without.
    The reals get their own x_t from a fresh t <= adv_t_max (not G's t, mostly > adv_t_max), so both
    classes share one t law and t alone tells D nothing.
    """
    k = x_t_fake.shape[0]
    side = DSide(real=cond, fake=None if cond is None else cond[:k])
    if not cfg.gan.d_sees_xt:
        return side
    B = x0.shape[0]
    side.t_real = torch.randint(0, cfg.gan.adv_t_max + 1, (B,), generator=d_gen, device=x0.device)
    noise = torch.randn(x0.shape, generator=d_gen, device=x0.device, dtype=x0.dtype)
    x_t_real, side.t_fake = tr.diffusion.q_sample(x0, side.t_real, noise), t_fake
    side.real = x_t_real if cond is None else torch.cat([x_t_real, cond], dim=1)
    side.fake = x_t_fake if cond is None else torch.cat([x_t_fake, cond[:k]], dim=1)
    return side


def d_backward(tr: Trainables, cfg: Config, x0: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor,
               tau: torch.Tensor, y_d: Optional[torch.Tensor], side: DSide,
               *, do_r1: bool, sync: bool, loss_scale: float) -> dict[str, torch.Tensor]:
    """D's forward/backward on the B diffused reals and the k (detached) fakes, whose tau, y and
    side inputs are rows 0..k-1 of the batch's, plus lazy R1 on clean reals, in one DDP forward;
    feeds r_d to the adaptive-T controller. Returns D's detached metrics.

    L_D is D's classification loss alone (2 ln 2 at chance): what the D-health guard judges and the
    status line shows. The lazy R1 term (gamma x r1_every on one step in r1_every) has its own scale
    and is logged apart as L_r1; mixed in, it made L_D jump on every R1 step.
    """
    g, dev, B, k = cfg.gan, x0.device, x0.shape[0], y_fake.shape[0]
    amp = autocast_for(cfg.train.precision, dev)
    tr.D_raw.requires_grad_(True)
    parts = [slice(None), slice(0, k)]  # which samples each stacked block of D's input belongs to
    d_in, d_tau, d_side, d_t = [y_real, y_fake], [tau, tau[:k]], [side.real, side.fake], [side.t_real, side.t_fake]
    if do_r1:
        x_r1 = x0.detach().requires_grad_(True)
        parts.append(slice(None))
        d_in.append(x_r1)
        d_tau.append(torch.zeros_like(tau))
        d_side.append(side.real)
        d_t.append(side.t_real)
    x_in = torch.cat([with_cond(x, c) for x, c in zip(d_in, d_side)])
    t_in = None if side.t_real is None else torch.cat(d_t)
    with dist.ddp_sync(tr.D, sync), amp:
        logits = tr.D(x_in, torch.cat(d_tau), None if y_d is None else torch.cat([y_d[p] for p in parts]), t_in)
    logits = logits.float()
    real_logits, fake_logits = logits[:B], logits[B:B + k]
    L_D = d_loss(real_logits, fake_logits)
    L_r1 = torch.zeros((), device=dev)
    L_D_total = L_D
    if do_r1:
        # Lazy regularisation (StyleGAN2): every r1_every steps, weighted by gamma * r1_every
        L_r1 = r1_penalty(logits[B + k:], x_r1)
        L_D_total = L_D + g.r1_gamma * g.r1_every * L_r1
    tr.scaler_d.scale(L_D_total * loss_scale).backward()
    # A NaN logit (a step about to be skipped) would turn into a garbage integer sign count
    # and corrupt r_d for the whole window; count it as neither real nor fake instead.
    tr.ada.accumulate(torch.nan_to_num(real_logits.detach(), nan=0.0), B)
    # k = 0 (a batch with no fake): D_fake reads 0 rather than the NaN mean of nothing.
    d_fake = fake_logits.detach().mean() if k > 0 else torch.zeros((), device=dev)
    return {"L_D": L_D.detach(), "L_r1": L_r1.detach(), "D_real": real_logits.detach().mean(), "D_fake": d_fake}


def self_sampled_xt(tr: Trainables, cfg: Config, k: int, y: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                    like: torch.Tensor, draws: AdvDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) of k of G's own samples at one t <= adv_t_max (gan.fakes=samples): DDIM, no grad, from
    pure noise over the points of the sampler's self_fake_steps grid above t, then a jump to t.

    Why: the recon fakes are x0_hat of *real* x_t at low t, nearly the reals, so D learns little and
    never sees what goes wrong along a sampling chain (low contrast, wrong anatomy). A sample's last
    x0 prediction, made with gradient in the training forward, is what the samplers output and what
    D can learn to tell apart. t is one draw per micro-batch on draws.host (a host number, no sync),
    uniform in [0, adv_t_max] like the reals' t under d_sees_xt; x_T is drawn on draws.device. y (the true
    labels, not the dropped ones: D judges the rows by them) and cond are the batch's first k rows.
    """
    t_last = int(torch.randint(0, cfg.gan.adv_t_max + 1, (), generator=draws.host))
    x_T = torch.randn((k, *like.shape[1:]), generator=draws.device, device=like.device, dtype=like.dtype)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return tr.G_raw(x_t, t, y, cond).float()

    # The plain module, no grad (ddim_sample's): no DDP reducer is involved, the chain costs only
    # forwards (and runs uncompiled under model.compile). BatchNorm would learn its statistics from
    # these small same-t batches, so config_checks refuses fakes=samples with model.norm=batch.
    # (D's gradient through the whole chain made G's samples washed out at 100 kimg: RESULTS.md.)
    with autocast_for(cfg.train.precision, like.device):
        x = tr.diffusion.ddim_sample(model_fn, x_T=x_T, steps=cfg.gan.self_fake_steps, end_t=t_last)
    return x.float(), torch.full((k,), t_last, dtype=torch.long, device=like.device)


@dataclass
class GOutput:
    """Phase 1's result: G's output for the batch (and, with fakes=samples, for G's own samples after
    it), the diffusion loss, and each fake's x0_hat with the x_t and t it came from."""
    out: torch.Tensor
    L_diff: torch.Tensor
    x0_hat: torch.Tensor
    x_t_fake: torch.Tensor
    t_fake: torch.Tensor
    fakes: slice


def g_forward(tr: Trainables, cfg: Config, x0: torch.Tensor, y_g: Optional[torch.Tensor], y: Optional[torch.Tensor],
              cond: Optional[torch.Tensor], draws: AdvDraws, *, sync: bool, adversarial: bool) -> GOutput:
    """ONE G forward: the diffusion loss on the batch and the fakes' x0_hat (clamped to the data range);
    without `adversarial` (a pure-diffusion step) no self-sampled fakes are made."""
    g, dev, B = cfg.gan, x0.device, x0.shape[0]
    # recon: the first k samples of the batch have t <= adv_t_max and make the fakes; samples: the
    # fakes' x_t (G's own) ride along after the batch, so one DDP forward serves both losses.
    t, k = draw_timesteps(B, tr.diffusion.num_steps, g.adv_t_max, dev)
    eps = torch.randn_like(x0)
    x_t = tr.diffusion.q_sample(x0, t, eps)
    x_in, t_in, y_in, c_in = x_t, t, y_g, cond
    samples = g.fakes == "samples" and adversarial
    if samples:
        k = min(g.self_fakes, B) if g.self_fakes else max(1, B // 8)  # 0: one per 8 images
        y_s, c_s = (None if y is None else y[:k]), (None if cond is None else cond[:k])
        x_s, t_s = self_sampled_xt(tr, cfg, k, y_s, c_s, x0, draws)
        x_in, t_in = torch.cat([x_t, x_s]), torch.cat([t, t_s])
        y_in = None if y_g is None else torch.cat([y_g, y_s])
        c_in = None if cond is None else torch.cat([cond, c_s])
    with dist.ddp_sync(tr.G, sync), autocast_for(cfg.train.precision, dev):
        out = tr.G(x_in, t_in, y_in, c_in).float()
    L_diff = diffusion_loss(out[:B], tr.diffusion.training_target(x0, t, eps),
                            tr.diffusion.loss_weight(t, cfg.diffusion.min_snr_gamma))
    fakes = slice(B, B + k) if samples else slice(0, k)
    x_t_fake, t_fake = x_in[fakes], t_in[fakes]
    x0_hat = tr.diffusion.model_x0(x_t_fake, t_fake, out[fakes]).clamp(-1, 1)
    return GOutput(out, L_diff, x0_hat, x_t_fake, t_fake, fakes)


def micro_step(tr: Trainables, cfg: Config, x0: torch.Tensor, y: Optional[torch.Tensor],
               *, do_r1: bool, sync: bool, loss_scale: float, gain: float = 1.0,
               draws: Optional[AdvDraws] = None, adversarial: bool = True) -> dict[str, torch.Tensor]:
    """Forward/backward for one micro-batch; gradients accumulate in .grad. The adversarial side draws
    from `draws` (None: the global streams); adversarial=False makes it a pure-diffusion step."""
    g, dev, draws = cfg.gan, x0.device, draws or AdvDraws()
    d_gen = draws.device
    amp = autocast_for(cfg.train.precision, dev)
    B = x0.shape[0]
    y_g = drop_labels(y, cfg.train.label_dropout) if cfg.model.num_classes > 0 else None
    y_d = y if cfg.model.num_classes > 0 else None
    # task=sr: the LR is made here from the HR batch, on device. It is a deterministic function
    # of x0 (no RNG, no host sync), so exact resume holds, and every caller of the step (the
    # trainer, DDP workers, benchmarks) keeps passing plain (x0, y) micro-batches.
    cond = sr_condition(x0, cfg.model.sr_scale) if cfg.model.task == "sr" else None

    # -- Phase 1: one G forward -> diffusion loss, and the fakes' x0_hat ----------------------
    # Large-t reconstructions are blurry means, not fakes: only t <= adv_t_max yields one.
    adversarial = adversarial and g.adv_weight > 0
    gen = g_forward(tr, cfg, x0, y_g, y_d, cond, draws, sync=sync, adversarial=adversarial)
    if not adversarial:
        # Pure diffusion: G never sees D, so training D would only cost time (and, with nothing
        # pushing back, it overfits and runs away). Skipping it also keeps G's random stream
        # independent of D's design, so a pure-diffusion arm is the same run whatever D is.
        tr.scaler_g.scale(gen.L_diff * loss_scale).backward()
        zero = torch.zeros((), device=dev)
        return {"L_diff": gen.L_diff.detach(), "L_adv": zero, "L_D": zero, "L_r1": zero, "D_real": zero,
                "D_fake": zero}
    k = gen.x0_hat.shape[0]

    # -- Phase 2: Diffusion-GAN instance noise on real and fake -----------------------------
    tau = sample_tau(B, tr.ada.t_adapt, t_max=g.t_max, dist=g.tau_dist, generator=d_gen, device=dev)
    y_real = diffuse(x0, tau, tr.diffusion.alpha_bar, g.sigma, generator=d_gen)
    y_fake = diffuse(gen.x0_hat, tau[:k], tr.diffusion.alpha_bar, g.sigma, generator=d_gen)

    # -- Phase 3: D on real and detached fake (+ lazy R1 on clean reals), one DDP forward ---
    side = d_context(tr, cfg, x0, gen.x_t_fake, gen.t_fake, cond, d_gen)
    d_out = d_backward(tr, cfg, x0, y_real, y_fake.detach(), tau, y_d, side, do_r1=do_r1, sync=sync,
                       loss_scale=loss_scale)

    # -- Phase 4: G step with D frozen ------------------------------------------------------
    L_adv = g_adversarial(tr, y_fake, tau[:k], None if y_d is None else y_d[:k], side, amp)
    if g.adv_balance:
        adv_term = balanced_adv_surrogate(gen.out, gen.L_diff, tr.scaler_g.scale(L_adv), gen.fakes,
                                          gain * g.adv_weight, own_reference=g.fakes == "recon")
    else:
        adv_term = gain * g.adv_weight * L_adv
    tr.scaler_g.scale((gen.L_diff + adv_term) * loss_scale).backward()
    return {"L_diff": gen.L_diff.detach(), "L_adv": L_adv.detach(), **d_out}


def g_adversarial(tr: Trainables, y_fake: torch.Tensor, tau: torch.Tensor, y_d: Optional[torch.Tensor],
                  side: DSide, amp) -> torch.Tensor:
    """G's non-saturating loss on its fakes, through the frozen D.

    The raw module, not the DDP wrapper: D's gradients are not wanted here, so there must be no
    reducer waiting for them (and no wasted all-reduce)."""
    if y_fake.shape[0] == 0:  # a host number: no sync
        return torch.zeros((), device=y_fake.device)
    tr.D_raw.requires_grad_(False)
    with amp:
        logits = tr.D_raw(with_cond(y_fake, side.fake), tau, y_d, side.t_fake).float()
    tr.D_raw.requires_grad_(True)
    return g_adv_loss(logits)


def train_step(tr: Trainables, cfg: Config, micro_batches: list[tuple[torch.Tensor, Optional[torch.Tensor]]],
               step: int) -> dict[str, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches. Returns detached metric tensors."""
    do_r1 = cfg.gan.r1_gamma > 0 and step % cfg.gan.r1_every == 0
    tr.opt_g.zero_grad(set_to_none=True)
    tr.opt_d.zero_grad(set_to_none=True)
    n = len(micro_batches)
    sums: dict[str, torch.Tensor] = {}
    # the adversarial part on one step in N, its push x N (lazy, like R1's gamma x N)
    every = adversarial_period(cfg)
    d_ran, gain = step % every == 0 and cfg.gan.adv_weight > 0, adv_gain(cfg, step) * every
    for i, (x0, y) in enumerate(micro_batches):
        # Only the last micro-batch all-reduces gradients (no_sync on the others).
        # The adversarial side draws from its own streams (adv_draws), so G draws the same t and eps
        # whatever D does: a hybrid and a pure-diffusion run of one seed are paired.
        out = micro_step(tr, cfg, x0, y, do_r1=do_r1, sync=(i == n - 1), loss_scale=1.0 / n, gain=gain,
                         draws=adv_draws(cfg, x0.device, step, i), adversarial=d_ran)
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v / n
    gn_g, inf_g = unscale_and_clip(tr.opt_g, tr.scaler_g, list(tr.G_raw.parameters()), cfg.train.grad_clip_g)
    # No D in this step (pure diffusion, a lazy step): no D gradient to apply (fp16's scaler would refuse)
    gn_d, inf_d = (unscale_and_clip(tr.opt_d, tr.scaler_d, list(tr.D_raw.parameters()), cfg.train.grad_clip_d)
                   if d_ran else (torch.zeros_like(gn_g), torch.zeros_like(inf_g)))
    skipped = torch.maximum(inf_d, inf_g)  # a bad G or D gradient skips both players
    if d_ran:
        apply_step(tr.opt_d, tr.scaler_d, skipped)
    apply_step(tr.opt_g, tr.scaler_g, skipped)
    tr.skip_streak = (tr.skip_streak.to(skipped.device) + skipped) * skipped  # resets on a good step
    d_steps = torch.full((), float(d_ran), device=gn_g.device)
    sums.update(grad_norm_g=gn_g, grad_norm_d=gn_d, skipped=skipped, d_steps=d_steps)
    return sums

