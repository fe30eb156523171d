"""Config validation: impossible values fail at load, before anything is built, in one line that
names the key and the fix. Called by dgan.config.load_config on the typed Config it built.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dgan.errors import ConfigError
from dgan.schedules import make_betas

# Every metric dgan computes, the one list: eval.metrics is checked against it here, and
# dgan.scoring (and python -m dgan.evaluate's flags) dispatch on it.
METRICS = ("fid", "kid", "psnr", "ssim", "frd", "sharpness", "prdc", "memorization", "diversity", "utility")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _nearest_multiples(size: int, k: int) -> str:
    lo = max(k, (size // k) * k)
    hi = lo if lo >= size else lo + k
    if lo == hi or lo == size:
        return f"{max(lo, hi)}"
    return f"{lo} or {hi}"


# Samplers start from pure noise, so x_T must hold (almost) no signal: sqrt(alpha_bar_T) <= 0.1.
MAX_TERMINAL_ALPHA_BAR = 0.01


def _require_terminal_noise(d) -> None:  # a DiffusionConfig
    """A linear schedule tuned for T=1000 (beta_end 0.02) keeps alpha_bar_T = 0.36 at T=100: training
    then never sees pure noise, sampling starts from it, and the samples are grey mush. Fail early."""
    if d.schedule != "linear" or not 0 < d.beta_start < d.beta_end < 1 or d.num_steps < 2:
        return  # cosine ends at alpha_bar ~ 0; bad betas get their own message
    abar_T = float(torch.prod(1.0 - make_betas("linear", d.num_steps, d.beta_start, d.beta_end)))
    _require(abar_T <= MAX_TERMINAL_ALPHA_BAR, "diffusion.beta_end",
             f"{d.beta_end} with num_steps={d.num_steps} leaves alpha_bar={abar_T:.3g} at the last step "
             f"(sampling starts from pure noise, training never reaches it); raise it to about "
             f"{min(0.999, 20.0 / d.num_steps):.3g} (20/num_steps) or use diffusion.schedule=cosine")


def _validate_gan(g, d, m) -> None:  # GanConfig, DiffusionConfig, ModelConfig
    """The adversarial side: weights, the fakes, adaptive T, R1 and the D-health guard."""
    _require(g.adv_weight >= 0, "gan.adv_weight", "must be >= 0 (0 = pure diffusion)")
    _require(g.adv_warmup_kimg >= 0, "gan.adv_warmup_kimg", "must be >= 0 (0 = the adversarial term from step 0)")
    _require(g.self_fakes >= 0, "gan.self_fakes",
             "must be >= 0 (G's own samples per micro-batch; 0 = one per 8 of its images)")
    _require(2 <= g.self_fake_steps <= d.num_steps, "gan.self_fake_steps",
             f"must be in [2, diffusion.num_steps={d.num_steps}] (the DDIM grid of the fakes' chain)")
    _require(g.self_fake_every >= 1, "gan.self_fake_every", "must be >= 1 (1 = fakes on every step)")
    _require(g.fakes != "samples" or g.r1_gamma == 0 or g.r1_every % g.self_fake_every == 0, "gan.r1_every",
             "must be a multiple of gan.self_fake_every, or R1 would fall on steps that run no D")
    _require(g.fakes != "samples" or m.norm != "batch", "gan.fakes",
             "samples needs model.norm=group (BatchNorm would learn its statistics from the fakes' chain); "
             "or set gan.fakes=recon")
    _require(0 <= g.adv_t_max < d.num_steps, "gan.adv_t_max", f"must be in [0, {d.num_steps - 1}]")
    _require(0 <= g.t_min <= g.t_max < d.num_steps, "gan.t_max",
             f"need 0 <= gan.t_min <= gan.t_max <= diffusion.num_steps - 1 ({d.num_steps - 1}): "
             "tau indexes the noise schedule")
    _require(0.0 <= g.ada_target <= 1.0, "gan.ada_target", "must be in [0, 1]")
    _require(g.ada_interval >= 1 and g.r1_every >= 1, "gan.ada_interval", "ada_interval and r1_every must be >= 1")
    _require(g.ada_kimg > 0 and g.sigma >= 0 and g.r1_gamma >= 0, "gan.ada_kimg",
             "ada_kimg must be > 0; sigma and r1_gamma >= 0")
    _require(g.guard_max_loss > 1.39 and g.guard_max_logit > 0, "gan.guard_max_loss",
             "guard_max_loss must exceed a chance-level D's 1.39 (try 10) and guard_max_logit be > 0")
    _require(0 < g.guard_lr_factor <= 1, "gan.guard_lr_factor", "must be in (0, 1]; 0.5 halves lr_d per event")


def validate(cfg) -> None:
    """Check a dgan.config.Config (not imported here: config.py imports this module)."""
    m, d, g, t = cfg.model, cfg.diffusion, cfg.gan, cfg.train
    k = 2 ** m.encoder_depth
    _require(m.image_size % k == 0, "model.image_size",
             f"{m.image_size} is not divisible by 2**encoder_depth={k}; "
             f"use {_nearest_multiples(m.image_size, k)} (or lower model.encoder_depth)")
    _require(32 <= m.image_size <= 1024, "model.image_size", f"{m.image_size} outside the supported 32..1024")
    _require(m.channels in (1, 3), "model.channels", f"{m.channels} not supported; use 1 or 3")
    _require(3 <= m.encoder_depth <= 5, "model.encoder_depth", "must be 3, 4 or 5")
    _require(len(m.decoder_channels) == m.encoder_depth, "model.decoder_channels",
             f"needs {m.encoder_depth} entries (one per encoder stage), got {len(m.decoder_channels)}")
    _require(m.encoder_weights in (None, "imagenet"), "model.encoder_weights", "use null or 'imagenet'")
    _require(m.num_classes >= 0, "model.num_classes", "must be >= 0 (0 = unconditional)")
    _require(m.time_dim % 2 == 0 and m.time_dim >= 8, "model.time_dim", "must be an even number >= 8")
    _require(2 ** m.d_layers * 4 <= m.image_size, "model.d_layers",
             f"{m.d_layers} stride-2 layers leave less than a 4x4 patch map at {m.image_size}px; lower it")
    _require(d.num_steps >= 2, "diffusion.num_steps", "must be >= 2")
    _require(0 < d.beta_start < d.beta_end < 1, "diffusion.beta_start",
             "need 0 < beta_start < beta_end < 1")
    if m.task != "sr":  # SR sampling starts from q(upsampled LR, T), so signal left at T is wanted there
        _require_terminal_noise(d)
    _validate_gan(g, d, m)
    _require(t.batch_size >= 1 and t.grad_accum >= 1, "train.batch_size", "batch_size and grad_accum must be >= 1")
    _require(t.total_kimg > 0, "train.total_kimg", "must be > 0")
    _require(t.lr_g > 0 and t.lr_d > 0, "train.lr_g", "learning rates must be > 0")
    _require(t.lr_decay_kimg is None or t.lr_decay_kimg > 0, "train.lr_decay_kimg",
             "must be > 0, or null to decay over train.total_kimg")
    _require(0 <= t.lr_min_ratio <= 1, "train.lr_min_ratio", f"{t.lr_min_ratio} is not in [0, 1]; 0.1 decays to a tenth")
    _require(d.min_snr_gamma >= 0, "diffusion.min_snr_gamma", "must be >= 0 (0 = off, 5 is the paper's value)")
    _require(0 <= d.sample_t_min < d.num_steps, "diffusion.sample_t_min",
             f"must be in [0, {d.num_steps - 1}] (9 = the 10-step grid's last timestep; 0 = down to t = 0)")
    for name in ("betas_g", "betas_d"):
        b = getattr(t, name)
        _require(len(b) == 2 and all(0 <= v < 1 for v in b), f"train.{name}", "two values in [0, 1)")
    _require(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device",
             "use auto, cpu or cuda")
    _require(0 <= t.label_dropout < 1, "train.label_dropout", "must be in [0, 1)")
    _require(t.keep_last >= 1, "train.keep_last", "must be >= 1 (keeping none would lose the run)")
    _require(t.ckpt_every_kimg > 0 and t.ckpt_every_min > 0, "train.ckpt_every_kimg",
             "ckpt_every_kimg and ckpt_every_min must be > 0")
    _require(t.ema_halflife_kimg > 0, "train.ema_halflife_kimg", "must be > 0")
    _validate_data(cfg.data)
    _validate_eval(cfg.eval, sr=m.task == "sr")
    _validate_sr(cfg)
    _require(cfg.log.every_steps >= 1, "log.every_steps", "must be >= 1")


def _validate_data(dc) -> None:  # a DataConfig
    if dc.source == "npz":
        _require(dc.path is not None, "data.path", "source=npz needs data.path=/path/to/file.npz")
    if dc.source == "shards":
        _require(dc.shards is not None, "data.shards",
                 "source=shards needs data.shards='dir/train-*.tar' (see python -m dgan.data.shards)")
    _require(dc.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(dc.num_images >= 1, "data.num_images", "must be >= 1")
    for name in ("hflip_p", "vflip_p", "affine_p", "crop_p", "intensity_p"):
        _require(0.0 <= getattr(dc, name) <= 1.0, f"data.{name}", "a probability in [0, 1]")


def _validate_eval(ev, sr: bool = False) -> None:  # an EvalConfig
    for name in ev.metrics:  # frd needs the `frd` extra (checked by the trainer)
        _require(name in METRICS, "eval.metrics", f"unknown metric {name!r}; use some of {', '.join(METRICS)}")
    _require(ev.every_kimg >= 0 and ev.num_samples >= 2 and ev.steps >= 1, "eval.every_kimg",
             "every_kimg must be >= 0, num_samples >= 2 and steps >= 1")
    if ev.best_metric is not None:
        base = ev.best_metric.split("_t")[0]  # psnr_t100 -> psnr
        if sr:
            base = ev.best_metric.removeprefix("sr_")  # sr_psnr -> psnr (see _validate_sr)
        _require(base in ev.metrics, "eval.best_metric",
                 f"{ev.best_metric!r} is not computed; add {base!r} to eval.metrics")
        _require(ev.every_kimg > 0, "eval.best_metric", "needs eval.every_kimg > 0 to have values")
        # sharpness is best near 1 (as sharp as the data): a min or a max would keep the blurriest
        # or the grainiest checkpoint, so it is logged but cannot choose ckpt-best.pt
        _require(base != "sharpness", "eval.best_metric",
                 "sharpness is best near 1, not at a min or max; use eval.best_metric=fid")
    if ev.feature_extractor is not None:
        _require(Path(ev.feature_extractor).is_file(), "eval.feature_extractor",
                 f"{ev.feature_extractor} does not exist")


def _validate_sr(cfg) -> None:
    """task=sr: the LR grid must tile the HR image exactly, and periodic evaluation must be SR's."""
    m, ev = cfg.model, cfg.eval
    if m.task != "sr":
        return
    _require(m.sr_scale >= 2, "model.sr_scale", f"{m.sr_scale} is not an upscaling factor; use an integer >= 2 "
             "(2, 4 or 8 are typical)")
    fits = [s for s in (2, 4, 8) if m.image_size % s == 0]
    _require(m.image_size % m.sr_scale == 0, "model.sr_scale",
             f"model.image_size={m.image_size} is not divisible by {m.sr_scale}, so no LR image maps onto it "
             f"exactly; use model.sr_scale={' or '.join(map(str, fits)) or 2} or change model.image_size")
    _require(m.image_size // m.sr_scale >= 4, "model.sr_scale",
             f"x{m.sr_scale} of {m.image_size} px leaves a {m.image_size // m.sr_scale} px LR image (need >= 4 px); "
             f"use model.sr_scale <= {m.image_size // 4} or a larger model.image_size")
    _require(m.num_classes == 0, "model.num_classes",
             "task=sr is conditioned on the LR image, not on a class label; set model.num_classes=0")
    if ev.every_kimg > 0:
        _require(set(ev.metrics) <= {"psnr", "ssim"}, "eval.metrics",
                 f"{ev.metrics}: task=sr scores SR against bicubic by PSNR/SSIM (FID/KID of unconditional "
                 "samples do not apply); set eval.metrics=[psnr,ssim]")
    if ev.best_metric is not None:
        _require(ev.best_metric in ("sr_psnr", "sr_ssim") and ev.best_mode == "max", "eval.best_metric",
                 f"{ev.best_metric!r} ({ev.best_mode}): task=sr logs sr_psnr and sr_ssim, higher is better; "
                 "use eval.best_metric=sr_psnr eval.best_mode=max")
