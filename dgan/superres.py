"""Super-resolution (model.task=sr): G denoises the HR image conditioned on the upsampled LR.

Training pairs are made on the fly from the HR batch (`sr_condition`, called inside the
training step): LR = area downsample by model.sr_scale, cond = bicubic upsample back to the HR
size. G sees [x_t, cond] channel-wise; the discriminator sees [diffused image, cond].

Degradation. Area averaging (for an integer scale, the mean of each scale x scale block) is
the physical model of a coarser detector: each LR pixel integrates the signal over its
footprint. It is exactly antialiased, has no ringing or overshoot, is deterministic on every
device and needs no random numbers (so exact resume is unaffected), and it matches the
INTER_AREA downscaling that dgan.data uses when it shrinks images, so an LR made by resizing
a file looks like the training LR. (Bicubic-with-antialias, the MATLAB imresize convention of
SR benchmarks, would add a slight sharpening and overshoot that real scanners do not make.)

Noise schedule. Sampling starts from x_T = q(upsampled LR, T), the noised LR, not from pure
noise (see `super_resolve`). So the schedule may keep signal at T, and for SR it should: with a
linear beta_end of 0.002 (sqrt(abar_T) ~ 0.6) the tiny test model beats bicubic by ~1 dB after 2 kimg,
while with the default 0.02 (pure noise at T, and the default lr_g) it took ~6 kimg to draw level. Why:
G predicts eps, so its x0 estimate at t near T is eps's error times 1/sqrt(abar_t) (~150 at the
default T) -- the LR must be learned to a precision the eps loss barely rewards there.

Sampler default. `super_resolve` uses DDIM, eta=0, like the rest of dgan (dgan.sample, the
training previews, dgan.evaluate): deterministic for a seed and cheap at few steps. The folk
rule that few-step deterministic DDIM sits near the posterior mean and so wins on PSNR did not
hold for the tiny test model (2 kimg, 64 held-out phantoms, x4, bicubic 17.64 dB / SSIM 0.549):
DDIM eta=0 gave 18.59 dB at 1 step, 19.01 at 3, 18.63 / 0.656 at 10 and 18.38 / 0.623 at 50;
stochastic sampling scored higher, DDIM-10 eta=1 19.02 / 0.682 and DDPM (1000 steps) 18.94 /
0.657. An undertrained eps model errs, a deterministic trajectory carries its early errors to
the end, and re-injected noise lets later steps correct them. So for fidelity on a young model
pass eta=1 (python -m dgan.sample --eta 1); expect the gap to narrow with training.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from dgan import distributed as dist
from dgan.checkpoint import CheckpointError
from dgan.errors import EvalError, UsageError
from dgan.generation import guided_model_fn, initial_noise, make_lr, save_grid, save_image, upsample
from dgan.pixels import to_uint8
from dgan.reference import EvalResult, load_reference, reference_info
from dgan.rundir import output_dir
from dgan.seeding import Stream, stream_generator

DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 50


@torch.no_grad()
def super_resolve(G: torch.nn.Module, diffusion, lr: torch.Tensor, *, scale: int, sampler: str = DEFAULT_SAMPLER,
                  steps: int = DEFAULT_STEPS, seed: int = 0, eta: float = 0.0, batch_size: int = 64) -> torch.Tensor:
    """SR images (float [-1, 1], CPU) for LR images B x C x h x w in [-1, 1], sampled with cond =
    the bicubic-upsampled LR. Image i starts from noise seeded by (seed, i) only, so a result does
    not depend on the batch size; the global RNG streams are not touched."""

    device = next(G.parameters()).device
    size = lr.shape[-1] * scale
    was_training = G.training
    G.eval()
    out = [torch.empty((0, lr.shape[1], size, size))]
    try:
        for start in range(0, lr.shape[0], batch_size):
            cond = upsample(lr[start:start + batch_size].to(device), size)
            noise = initial_noise(range(start, start + cond.shape[0]), seed, cond.shape[1:]).to(device)
            # x_T ~ q(x_T | x0) with the upsampled LR for the unknown x0: the mean of x_T really is
            # sqrt(abar_T) * HR, not 0. Negligible for a schedule that ends in pure noise; for one
            # with signal left at T it keeps sampling on the distribution G was trained on.
            x_T = diffusion.q_sample(cond, torch.full((cond.shape[0],), diffusion.num_steps - 1, device=device),
                                     noise)
            # step noise (ddpm, ddim with eta > 0): its own stream per batch, tag 1 as in dgan.evaluate
            gen = stream_generator(device, seed, Stream.STEP_NOISE, start)
            x = diffusion.sample(guided_model_fn(G, None, 1.0, cond), sampler, x_T=x_T, steps=steps,
                                 eta=eta, generator=gen)  # only DDIM reads eta
            out.append(x.cpu())
    finally:
        G.train(was_training)
    return torch.cat(out)


def evaluate_sr(G: torch.nn.Module, diffusion, hr_images: torch.Tensor, *, scale: int,
                sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, seed: int = 0, eta: float = 0.0,
                batch_size: int = 64) -> dict[str, float]:
    """PSNR/SSIM against the HR images of G's SR and, as the baseline, of bicubic upsampling, both
    from the same LR (make_lr of each HR image): sr_psnr, sr_ssim, bicubic_psnr, bicubic_ssim."""
    return scored_sr(G, diffusion, hr_images, scale=scale, sampler=sampler, steps=steps, seed=seed, eta=eta,
                     batch_size=batch_size)[0]


def scored_sr(G: torch.nn.Module, diffusion, hr_images: torch.Tensor, *, scale: int, **sampling
              ) -> tuple[dict[str, float], torch.Tensor]:
    """evaluate_sr's scores and the SR images themselves (for grids)."""
    from dgan.metrics import psnr_ssim  # torch-fidelity: slow to import

    lr = make_lr(hr_images, scale)
    sr = super_resolve(G, diffusion, lr, scale=scale, **sampling)
    ours, bicubic = psnr_ssim(sr, hr_images), psnr_ssim(upsample(lr, hr_images.shape[-1]), hr_images)
    return {"sr_psnr": ours["psnr"], "sr_ssim": ours["ssim"],
            "bicubic_psnr": bicubic["psnr"], "bicubic_ssim": bicubic["ssim"]}, sr


def comparison_rows(lr: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor | None = None) -> torch.Tensor:
    """Images interleaved as [LR (nearest, so its pixels show), bicubic, SR(, HR)] per example,
    for save_grid with nrow = a multiple of 3 (or 4 with HR)."""
    size = sr.shape[-1]
    parts = [F.interpolate(lr, size=(size, size), mode="nearest"), upsample(lr, size), sr]
    parts += [] if hr is None else [hr]
    return torch.stack(parts, dim=1).flatten(0, 1)


def preview_images(cfg, count: int) -> torch.Tensor:
    """Held-out HR images for training previews; the training images when there is no held-out set
    (e.g. shards without data.val_shards), so a preview never stops a run."""
    from dgan.data import DataError  # albumentations/webdataset: slow to import

    try:
        return load_reference(cfg, "val", count)[0]
    except (DataError, EvalError):
        return load_reference(cfg, "train", count)[0]


def training_preview(G: torch.nn.Module, diffusion, cfg) -> tuple[torch.Tensor, int]:
    """(images, nrow) of the SR run's sample grid: LR | bicubic | SR | HR for up to 16 held-out
    images, two examples per row."""
    hr = preview_images(cfg, min(cfg.log.num_samples, 16))
    lr = make_lr(hr, cfg.model.sr_scale)
    sr = super_resolve(G, diffusion, lr, scale=cfg.model.sr_scale, steps=cfg.log.sample_steps,
                       seed=cfg.train.seed)
    return comparison_rows(lr, sr, hr), 4 * min(2, hr.shape[0])


# ----------------------------------------------------------------------------------------
# Evaluation: periodic (eval.every_kimg) and python -m dgan.evaluate --task sr


def periodic_sr_eval(G: torch.nn.Module, diffusion, cfg) -> dict[str, float]:
    """Collective, for eval.every_kimg: rank 0 scores the first eval.num_samples images of
    eval.reference and every rank gets the same dict. Raises MetricError (on every rank, so none
    is left waiting) when the images cannot be had; the trainer then warns and goes on."""
    from dgan.data import DataError  # albumentations/webdataset: slow to import
    from dgan.metrics import MetricError  # torch-fidelity: slow to import

    ev, scores, problem = cfg.eval, {}, None
    if dist.is_main():
        try:
            hr = load_reference(cfg, ev.reference, ev.num_samples)[0]
            # fork_rng: a guarantee for exact resume; all noise already comes from seeded generators
            with torch.random.fork_rng(devices=[]):
                scores = evaluate_sr(G, diffusion, hr, scale=cfg.model.sr_scale, sampler=ev.sampler,
                                     steps=ev.steps, seed=cfg.train.seed)
        except (DataError, EvalError) as e:
            problem = str(e)
    scores, problem = dist.broadcast_object((scores, problem))
    if problem is not None:
        raise MetricError(problem)
    return scores


def run_sr_task(G: torch.nn.Module, diffusion, cfg, args, device: torch.device):
    """python -m dgan.evaluate --task sr: rank 0 scores the first --task-images held-out images of
    --reference (SR and bicubic vs HR); every rank gets the metrics. Returns a dgan.evaluate.EvalResult."""

    if cfg.model.task != "sr":
        raise CheckpointError(f"--task sr needs a super-resolution checkpoint (model.task=sr); this one is "
                        f"model.task={cfg.model.task}")
    if args.task != "sr":
        raise CheckpointError(f"this is a x{cfg.model.sr_scale} super-resolution checkpoint (model.task=sr): "
                        "evaluate it with --task sr")
    kept: dict = {"samples": None}  # rank 0's SR images, kept out of the broadcast
    clock = time.perf_counter()

    def score() -> tuple[dict, dict]:  # rank 0; an error there stops every rank
        hr = load_reference(cfg, args.reference, args.task_images)[0]
        metrics, sr = scored_sr(G, diffusion, hr, scale=cfg.model.sr_scale, sampler=args.sampler,
                                steps=args.steps, seed=args.seed, batch_size=args.batch_size, eta=args.eta)
        kept["samples"] = to_uint8(sr)
        info = {"reference": reference_info(cfg, args.reference, hr.shape[0], None),
                "task": {"scale": cfg.model.sr_scale, "degradation": "area downsample, bicubic upsample",
                         "baseline": "bicubic upsampling of the same LR"}}
        return metrics, info
    metrics, info = dist.on_main(score)
    info.update(generation_s=round(time.perf_counter() - clock, 3), extractor={"name": None},
                world_size=dist.get_world_size())
    return EvalResult(metrics=metrics, info=info, samples=kept["samples"])


# ----------------------------------------------------------------------------------------
# python -m dgan.sample --super-resolve LOW.png [--scale N]


class SRRequestError(UsageError):
    """A super-resolution request that does not fit the checkpoint; one line saying how to fix it."""


def read_lr_image(path: Path, channels: int) -> tuple[torch.Tensor, int]:
    """An LR image file -> (1 x C x h x w float in [-1, 1], its bit depth), read and converted
    exactly as dgan.data reads training images (8/16-bit PNG, JPG, TIFF; channels converted)."""
    from dgan.data.loader import collate  # albumentations/webdataset: slow to import
    from dgan.data.readers import read_image_file  # cv2/pydicom/nibabel: slow to import
    from dgan.data.sources import IMAGE_SUFFIXES, ReadOptions, Record, SourceItem, to_stored  # as above

    if not path.is_file():
        raise SRRequestError(f"--super-resolve {path}: no such file")
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise SRRequestError(f"--super-resolve {path}: use a {'/'.join(IMAGE_SUFFIXES)} image")
    (rec,) = read_image_file(SourceItem(path, path.name, "image"), ReadOptions(channels=channels))
    if not isinstance(rec, Record):
        raise SRRequestError(f"--super-resolve {path}: unreadable ({rec.reason}: {rec.detail})")
    stored = to_stored(rec.image, channels)
    floats = stored.astype(np.float32) / (65535.0 if stored.dtype == np.uint16 else 255.0)
    x, _ = collate([floats.reshape(*floats.shape[:2], -1)], [0])
    return x, rec.meta.bit_depth


def check_lr_size(path: Path, lr: torch.Tensor, cfg) -> None:
    m = cfg.model
    h, w = lr.shape[-2:]
    if h != w or h * m.sr_scale != m.image_size:
        need = m.image_size // m.sr_scale
        raise SRRequestError(
            f"{path.name} is {w}x{h} px; x{m.sr_scale} must give the model's {m.image_size} px (model.image_size): "
            f"resize it to {need}x{need} px, or use a checkpoint trained at model.image_size={h * m.sr_scale}")


def check_request(cfg, paths: list[str] | None, scale: int | None, checkpoint: str) -> None:
    """The checkpoint, --super-resolve and --scale must agree; raise SRRequestError if not."""
    m = cfg.model
    if m.task != "sr":
        raise SRRequestError(f"{checkpoint} is not a super-resolution checkpoint (model.task={m.task}); "
                             "--super-resolve needs one trained with model.task=sr (see README, Super-resolution)")
    if not paths:
        side = m.image_size // m.sr_scale
        raise SRRequestError(f"{checkpoint} is a x{m.sr_scale} super-resolution model (model.task=sr): pass "
                             f"--super-resolve LOW.png (a {side}x{side} px image) instead of sampling from noise")
    if scale is not None and scale != m.sr_scale:
        raise SRRequestError(f"--scale {scale} but the model was trained for x{m.sr_scale} (model.sr_scale); "
                             f"pass --scale {m.sr_scale}, or use a checkpoint trained with model.sr_scale={scale}")


def super_resolve_cli(args, G: torch.nn.Module, cfg, diffusion, meta: dict) -> int:
    """Writes <name>_sr.png and <name>_bicubic.png (16-bit where the input or the training data
    was) and <name>_strip.png (LR | bicubic | SR) per LR image. Exit 2 on a request that does not
    fit the checkpoint."""

    try:
        check_request(cfg, args.super_resolve, args.scale, args.checkpoint)
        paths = [Path(p) for p in args.super_resolve]
        inputs = [read_lr_image(p, cfg.model.channels) for p in paths]
        for path, (lr, _) in zip(paths, inputs):
            check_lr_size(path, lr, cfg)
    except SRRequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or output_dir(args.checkpoint, "super-resolved"))
    out.mkdir(parents=True, exist_ok=True)
    lr = torch.cat([x for x, _ in inputs])
    sr = super_resolve(G, diffusion, lr, scale=cfg.model.sr_scale, sampler=args.sampler, steps=args.steps,
                       seed=args.seed, eta=args.eta, batch_size=args.batch_size)
    bicubic = upsample(lr, cfg.model.image_size)
    for i, (path, (_, bits)) in enumerate(zip(paths, inputs)):
        bit_depth = max(bits, int(meta.get("bit_depth", 8)))
        save_image(sr[i], out / f"{path.stem}_sr.png", bit_depth=bit_depth)
        save_image(bicubic[i], out / f"{path.stem}_bicubic.png", bit_depth=bit_depth)
        save_grid(comparison_rows(lr[i:i + 1], sr[i:i + 1]), out / f"{path.stem}_strip.png", nrow=3)
    print(f"wrote {len(paths)} super-resolved image(s) (x{cfg.model.sr_scale}, {args.sampler} {args.steps} steps) "
          f"with bicubic baselines and LR | bicubic | SR strips to {out}")
    return 0
