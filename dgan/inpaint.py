"""RePaint-style inpainting (Lugmayr et al. 2022, arXiv 2201.09865) with a trained noise predictor.

Mask convention, everywhere in dgan (dgan/masks.py): **1 (True) = the region to generate (the
hole), 0 = known** pixels that are kept from the input; in a mask PNG, white = generate.

How it works. The unconditional model is never retrained. At every sampler step the state's known
region is replaced by the input noised to the new state's level, ``q(x0_known, t_next)``, so the
model always sees a consistent noisy image and fills the hole to match. RePaint's "resampling
jumps" harmonise the hole with its border: after reaching certain timesteps, the state is
re-noised ``jump_length`` steps back up and denoised again, ``jump_n_sample`` times in all
(``jump_n_sample=1``: no jumps). At the end the known region is pasted exactly, so outside the
mask the output equals the input.

    python -m dgan.sample --checkpoint CKPT --inpaint image.png --mask mask.png --out DIR
    python -m dgan.evaluate --task inpaint --mask-type box|brush [--task-images 16]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgan import distributed as dist
from dgan.diffusion import Diffusion, ModelFn, StepHook
from dgan.errors import EvalError
from dgan.generation import guided_model_fn, save_grid, save_image
from dgan.masks import MASK_TYPES, InpaintError, make_mask, mask_from_array
from dgan.pixels import to_uint8
from dgan.reference import EvalResult, conditioning_labels, load_reference, reference_info
from dgan.rundir import output_dir
from dgan.seeding import Stream, derive_seed, stream_generator

INPAINT_SAMPLERS = ("ddim", "ddpm")
DEFAULT_JUMP_LENGTH = 10
DEFAULT_JUMP_N_SAMPLE = 10

Move = tuple[int, int | None]  # (timestep from, timestep to); to None = clean data


# -- The RePaint time schedule and its moves --------------------------------------------------------


def jump_schedule(grid: Sequence[int], jump_length: int, jump_n_sample: int) -> list[Move]:
    """The moves of RePaint's resampling schedule over a decreasing timestep grid.

    Positions 0..S-1 are the grid's timesteps and position S is clean data. Each time the state
    reaches a position p = k * jump_length (0 < p < S) it is re-noised back to p - jump_length,
    and that happens jump_n_sample - 1 times per p: every block of jump_length denoising steps
    runs jump_n_sample times, so about S * jump_n_sample model calls in all. A move (a, b) with
    b > a is a re-noising jump; b None is the final step to clean data.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise InpaintError(f"jump_length {jump_length} and jump_n_sample {jump_n_sample} must both be >= 1")
    if jump_n_sample > 1 and jump_length >= len(grid):
        raise InpaintError(f"jump_length {jump_length} must be below the number of sampler steps "
                           f"({len(grid)}) to jump at all; lower --jump-length or raise --steps")
    levels: list[int | None] = [int(t) for t in grid] + [None]
    jumps_left = {p: jump_n_sample - 1 for p in range(jump_length, len(grid), jump_length)}
    moves: list[Move] = []
    p = 0
    while p < len(grid):
        moves.append((levels[p], levels[p + 1]))
        p += 1
        if jumps_left.get(p, 0) > 0:
            jumps_left[p] -= 1
            moves.append((levels[p], levels[p - jump_length]))
            p -= jump_length
    return moves


def _noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # A generator fills tensors on its own device only: draw there, then move.
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)


def _t_batch(t: int | None, x: torch.Tensor) -> torch.Tensor | None:
    """Timestep t for every row of x, as the model and StepHooks take it; None stays None (clean)."""
    return None if t is None else torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def renoise(diffusion: Diffusion, x: torch.Tensor, t_from: int, t_to: int,
            generator: torch.Generator) -> torch.Tensor:
    """Sample q(x_{t_to} | x_{t_from}) for t_to > t_from: the forward process over the gap in one draw
    (the product of its one-step kernels, which is what RePaint's step-by-step re-noising samples)."""
    ratio = diffusion.abar_at(t_to) / diffusion.abar_at(t_from)
    return math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * _noise_like(x, generator)


def denoise_step(diffusion: Diffusion, model_fn: ModelFn, x: torch.Tensor, t: int, t_next: int | None, *,
                 sampler: str, eta: float, generator: torch.Generator) -> torch.Tensor:
    """One sampler update from timestep t to t_next (None: clean), as Diffusion's samplers make it:
    x0 is predicted and clipped to [-1, 1], then DDPM draws from q_posterior (one-step grid) and DDIM
    moves along the (x0, eps) line with eta-scaled fresh noise."""
    x0, eps = diffusion.denoise(model_fn, x, t, clip_x0=True)
    if sampler == "ddpm":
        mean, variance, _ = diffusion.q_posterior(x0, x, _t_batch(t, x))
        return mean if t_next is None else mean + variance.sqrt() * _noise_like(x, generator)
    if t_next is None:
        return x0
    return diffusion.ddim_step(x0, eps, t, t_next, eta=eta, generator=generator)


def paste_hook(diffusion: Diffusion, x0_known: torch.Tensor, mask: torch.Tensor,
               generator: torch.Generator) -> StepHook:
    """A Diffusion StepHook: outside the mask the state becomes q(x0_known, t_next) with fresh noise,
    or x0_known itself once the state is clean (t_next None), pasted exactly (torch.where, no blend)."""
    hole = mask.bool()

    def hook(x: torch.Tensor, t_next: torch.Tensor | None) -> torch.Tensor:
        known = x0_known if t_next is None else diffusion.q_sample(x0_known, t_next, _noise_like(x, generator))
        return torch.where(hole, x, known)
    return hook


# -- Inpainting -------------------------------------------------------------------------------------


def _as_model_fn(model: torch.nn.Module | ModelFn, labels: torch.Tensor | None,
                 guidance: float) -> ModelFn:
    """A generator module goes through sample.guided_model_fn (labels, classifier-free guidance);
    a plain eps function (an analytic oracle in tests) is used as it is."""
    if isinstance(model, torch.nn.Module):

        return guided_model_fn(model, labels, guidance)
    if labels is not None:
        raise InpaintError("labels need a generator module; a plain model_fn cannot take them")
    return model


def _batch_mask(mask: np.ndarray | torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Any H x W, 1 x H x W or B x 1 x H x W mask -> a bool B x 1 x H x W tensor on image's device."""
    m = torch.as_tensor(mask).to(image.device) != 0
    while m.ndim < 4:
        m = m.unsqueeze(0)
    if m.shape[-2:] != image.shape[-2:] or m.shape[1] != 1 or m.shape[0] not in (1, image.shape[0]):
        raise InpaintError(f"mask of shape {tuple(m.shape)} does not fit images of shape {tuple(image.shape)}")
    return m.expand(image.shape[0], 1, *image.shape[-2:])


@torch.no_grad()
def inpaint(model: torch.nn.Module | ModelFn, diffusion: Diffusion, image: torch.Tensor,
            mask: np.ndarray | torch.Tensor, *, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
            jump_length: int = DEFAULT_JUMP_LENGTH, jump_n_sample: int = DEFAULT_JUMP_N_SAMPLE,
            seed: int = 0, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
            guidance: float = 1.0) -> torch.Tensor:
    """Fill the hole (mask 1) of `image` (B x C x H x W in [-1, 1]) with RePaint; returns B x C x H x W.

    `sampler` "ddim" runs `steps` timesteps (timesteps_for), "ddpm" all T (steps ignored). Each batch
    row gets its own noise, so repeating one image B times gives B different completions. Noise comes
    from `generator` (default: a new one seeded by `seed`), never from the global RNG. Outside the
    mask the result is the input exactly.
    """
    if sampler not in INPAINT_SAMPLERS:
        raise InpaintError(f"sampler {sampler!r}: inpainting supports {', '.join(INPAINT_SAMPLERS)} "
                           "(dpmpp2m's multistep history does not survive the pasting)")
    if not 0.0 <= eta <= 1.0:
        raise InpaintError(f"eta {eta}: must be in [0, 1]")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    hole = _batch_mask(mask, image)
    ddpm = sampler == "ddpm"
    grid = list(range(diffusion.num_steps - 1, -1, -1)) if ddpm else diffusion.timesteps_for(steps).tolist()
    moves = jump_schedule(grid, jump_length, jump_n_sample)
    gen = torch.Generator(device=image.device).manual_seed(seed) if generator is None else generator
    model_fn = _as_model_fn(model, labels, guidance)
    paste = paste_hook(diffusion, image, hole, gen)
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if was_training is not None:
        model.eval()
    try:
        x = paste(_noise_like(image, gen), _t_batch(grid[0], image))
        for t_from, t_to in moves:
            if t_to is not None and t_to > t_from:
                x = renoise(diffusion, x, t_from, t_to, gen)
            else:
                x = denoise_step(diffusion, model_fn, x, t_from, t_to, sampler=sampler, eta=eta, generator=gen)
            x = paste(x, _t_batch(t_to, x))
    finally:
        if was_training is not None:
            model.train(was_training)
    return x


# -- Metrics inside the mask ------------------------------------------------------------------------


def masked_psnr_ssim(pred: torch.Tensor, target: torch.Tensor, mask: np.ndarray | torch.Tensor,
                     data_range: float = 2.0) -> dict[str, float]:
    """Mean over images of PSNR and SSIM restricted to the hole (mask 1).

    PSNR: torchmetrics' PSNR of the hole pixels only (all channels), per image. SSIM: torchmetrics'
    full SSIM map (11x11 Gaussian windows, as dgan.metrics.psnr_ssim), averaged over the hole pixels
    only; a window centred in the hole near its border also sees known pixels, which is what makes
    SSIM score how well the fill continues the surrounding structure.
    """
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    pred, target = pred.double(), target.double()
    hole = _batch_mask(mask, target).expand_as(target)
    _, ssim_map = structural_similarity_index_measure(pred, target, data_range=data_range, reduction="none",
                                                      return_full_image=True)
    psnr = [peak_signal_noise_ratio(p[m], t[m], data_range=data_range) for p, t, m in zip(pred, target, hole)]
    ssim = (ssim_map * hole).sum(dim=(1, 2, 3)) / hole.sum(dim=(1, 2, 3))
    return {"psnr": float(torch.stack(psnr).mean()), "ssim": float(ssim.mean())}


def mean_fill(image: torch.Tensor, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The trivial baseline: the hole filled with the mean of each image's known pixels, per channel."""
    hole = _batch_mask(mask, image).to(image.dtype)
    known = 1.0 - hole
    mean = (image * known).sum(dim=(2, 3), keepdim=True) / known.sum(dim=(2, 3), keepdim=True)
    return image * known + mean * hole


@torch.no_grad()
def evaluate_inpainting(G: torch.nn.Module | ModelFn, diffusion: Diffusion, images: torch.Tensor, *,
                        mask_type: str = "box", seed: int = 0, labels: torch.Tensor | None = None,
                        sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                        jump_length: int = DEFAULT_JUMP_LENGTH, jump_n_sample: int = DEFAULT_JUMP_N_SAMPLE,
                        batch_size: int = 16, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Inpaint held-out `images` (N x C x H x W in [-1, 1]) and score the hole against the truth.

    Image i gets the centred box, or the brush mask seeded by (seed, i). Returns the metrics
    inpaint_psnr/ssim, the same for the mean-fill baseline (inpaint_baseline_*), the mean hole fraction,
    and "results", the inpainted images (CPU). Batch b's noise is seeded by (seed, its first index).
    """

    size = images.shape[-2:]
    masks = torch.stack([torch.from_numpy(make_mask(mask_type, size, derive_seed(seed, Stream.MASK, i)))
                         for i in range(images.shape[0])]).unsqueeze(1)
    results = []
    for start in range(0, images.shape[0], batch_size):
        stop = min(start + batch_size, images.shape[0])
        gen = stream_generator(device, seed, Stream.INPAINT_NOISE, start)
        y = None if labels is None else labels[start:stop].to(device)
        results.append(inpaint(G, diffusion, images[start:stop].to(device), masks[start:stop].to(device),
                               sampler=sampler, steps=steps, eta=eta, jump_length=jump_length,
                               jump_n_sample=jump_n_sample, generator=gen, labels=y).cpu())
    result = torch.cat(results)
    ours, baseline = masked_psnr_ssim(result, images, masks), masked_psnr_ssim(mean_fill(images, masks), images, masks)
    return {"inpaint_psnr": ours["psnr"], "inpaint_ssim": ours["ssim"],
            "inpaint_baseline_psnr": baseline["psnr"], "inpaint_baseline_ssim": baseline["ssim"],
            "inpaint_mask_fraction": float(masks.float().mean()), "results": result}


def run_inpaint_task(G: torch.nn.Module, diffusion: Diffusion, cfg, args: argparse.Namespace,
                     device: torch.device):
    """python -m dgan.evaluate --task inpaint: rank 0 scores the first --task-images held-out images of
    --reference; every rank gets the metrics. Returns a dgan.evaluate.EvalResult."""

    try:  # on every rank, before rank 0 starts: a bad option must not leave the other ranks waiting
        _check_generate_model(cfg)
        if args.sampler not in INPAINT_SAMPLERS:
            raise InpaintError(f"--sampler {args.sampler}: --task inpaint supports {', '.join(INPAINT_SAMPLERS)}")
        grid_len = diffusion.num_steps if args.sampler == "ddpm" else len(diffusion.timesteps_for(args.steps))
        jump_schedule(range(grid_len), args.jump_length, args.jump_n_sample)
    except (InpaintError, ValueError) as err:
        raise EvalError(str(err)) from None
    kept: dict[str, Any] = {"samples": None}  # rank 0's results, kept out of the broadcast
    clock = time.perf_counter()

    def score() -> tuple[dict[str, float], dict[str, Any]]:  # rank 0; an error there stops every rank
        real, labels = load_reference(cfg, args.reference, args.task_images)
        scores = evaluate_inpainting(G, diffusion, real, mask_type=args.mask_type or "box", seed=args.seed,
                                     labels=conditioning_labels(cfg, labels), sampler=args.sampler,
                                     steps=args.steps, jump_length=args.jump_length,
                                     jump_n_sample=args.jump_n_sample, batch_size=args.batch_size, device=device,
                                     eta=args.eta)
        kept["samples"] = to_uint8(scores.pop("results"))
        info = {"reference": reference_info(cfg, args.reference, real.shape[0], None),
                "task": {"mask_type": args.mask_type or "box", "jump_length": args.jump_length,
                         "jump_n_sample": args.jump_n_sample, "baseline": "mean of the known pixels"}}
        return scores, info
    metrics, info = dist.on_main(score)
    info.update(generation_s=round(time.perf_counter() - clock, 3), extractor={"name": None},
                world_size=dist.get_world_size())
    return EvalResult(metrics=metrics, info=info, samples=kept["samples"])


# -- Command line (python -m dgan.sample --inpaint ...) ---------------------------------------------


def add_inpaint_args(p: argparse.ArgumentParser, *, mask_file: bool) -> None:
    """The inpainting options, shared by dgan.sample (mask_file: --inpaint/--mask) and dgan.evaluate."""
    if mask_file:
        p.add_argument("--inpaint", metavar="IMAGE", help="inpaint this image (PNG/TIFF/DICOM/NIfTI) instead of "
                                                          "sampling; --n gives that many completions")
        p.add_argument("--mask", metavar="PNG", help="--inpaint: the hole as a PNG, white (non-zero) = generate")
    p.add_argument("--mask-type", choices=MASK_TYPES, default=None,
                   help="inpainting hole: centred box (default) or seeded random brush strokes")
    p.add_argument("--jump-length", type=int, default=DEFAULT_JUMP_LENGTH,
                   help="RePaint: re-noise this many sampler steps back at each jump")
    p.add_argument("--jump-n-sample", type=int, default=DEFAULT_JUMP_N_SAMPLE,
                   help="RePaint: run each jump block this many times (1 = no resampling)")


def _first_record(path: Path, what: str, channels: int):
    """The first image record of a file through dgan.data.sources (the readers training data uses)."""
    from dgan.data.readers import read_item  # cv2/pydicom/nibabel: slow to import
    from dgan.data.sources import DataError, ReadOptions, Record, discover  # as above

    if not path.is_file():
        raise InpaintError(f"{what} {path}: no such file")
    opts = ReadOptions(channels=channels, labels="none")
    try:
        item = discover(path, opts).items[0]
    except DataError:
        raise InpaintError(f"{what} {path}: not a PNG/JPG/TIFF/DICOM/NIfTI file") from None
    record = next(read_item(item, opts), None)
    if not isinstance(record, Record):
        detail = f"{record.reason}: {record.detail}" if record is not None else "no image in it"
        raise InpaintError(f"{what} {path}: cannot read the image ({detail})")
    return record


def read_input_image(path: Path, channels: int, image_size: int) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """(1 x C x S x S image in [-1, 1], bit depth, original (H, W)), preprocessed like training data:
    stored dtype and channels, letterboxed and resized to S, scaled to [-1, 1]. A volume (NIfTI,
    multi-frame DICOM) gives its first usable slice."""
    from dgan.data.loader import collate  # albumentations/webdataset: slow to import
    from dgan.data.sources import DataError, letterbox_resize, to_stored  # cv2/pydicom/nibabel: slow to import

    record = _first_record(Path(path), "--inpaint", channels)
    try:
        stored = letterbox_resize(to_stored(record.image, channels), image_size)
    except DataError as err:
        raise InpaintError(f"--inpaint {path}: {err}") from None
    scaled = stored.astype(np.float32) / (65535.0 if stored.dtype == np.uint16 else 255.0)
    x, _ = collate([scaled[:, :, None] if scaled.ndim == 2 else scaled], [0])
    return x, record.meta.bit_depth, tuple(record.meta.original_size)


def _check_generate_model(cfg) -> None:
    if getattr(cfg.model, "task", "generate") != "generate":
        raise InpaintError(f"the checkpoint is a model.task={cfg.model.task} model; inpainting needs an "
                           "image generator (model.task=generate)")


def _cli_mask(args: argparse.Namespace, image_hw: tuple[int, int], image_size: int) -> np.ndarray:
    if args.mask is not None and args.mask_type is not None:
        raise InpaintError("give either --mask PNG or --mask-type, not both")
    if args.mask is None:
        return make_mask(args.mask_type or "box", image_size, args.seed)
    record = _first_record(Path(args.mask), "--mask", 1)
    return mask_from_array(record.image, image_hw, image_size, f"--mask {args.mask}")


def _write_outputs(out: Path, image: torch.Tensor, mask: np.ndarray, results: torch.Tensor, bit_depth: int) -> None:
    """input.png, mask.png (white = generated), inpainted-K.png and strip.png (input | masked | results)."""
    from PIL import Image


    out.mkdir(parents=True, exist_ok=True)
    save_image(image[0], out / "input.png", bit_depth=bit_depth)
    Image.fromarray(mask.astype(np.uint8) * 255).save(out / "mask.png")
    for k, result in enumerate(results):
        save_image(result, out / f"inpainted-{k:03d}.png", bit_depth=bit_depth)
    masked = torch.where(torch.from_numpy(mask), torch.ones(()), image)  # the hole shown white, like mask.png
    strip = torch.cat([image, masked, results])
    save_grid(strip, out / "strip.png", nrow=len(strip))


def inpaint_cli(args: argparse.Namespace, G: torch.nn.Module, cfg, diffusion: Diffusion,
                device: torch.device) -> int:
    """python -m dgan.sample --inpaint IMAGE [--mask PNG | --mask-type box|brush]: 0 on success,
    2 (one line on stderr) for bad input."""
    try:
        _check_generate_model(cfg)
        if args.n < 1:
            raise InpaintError(f"--n {args.n}: need at least one completion")
        size = cfg.model.image_size
        image, bit_depth, image_hw = read_input_image(Path(args.inpaint), cfg.model.channels, size)
        mask = _cli_mask(args, image_hw, size)
        labels = None if args.label is None else torch.full((args.n,), args.label, dtype=torch.long, device=device)
        results = inpaint(G, diffusion, image.expand(args.n, -1, -1, -1).to(device), mask, sampler=args.sampler,
                          steps=args.steps, eta=args.eta, jump_length=args.jump_length,
                          jump_n_sample=args.jump_n_sample, seed=args.seed, labels=labels,
                          guidance=args.guidance).cpu()
    except (InpaintError, ValueError) as err:  # ValueError: e.g. --steps outside 1..T from the Diffusion
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or output_dir(args.checkpoint, f"inpaint-{Path(args.inpaint).stem}"))
    _write_outputs(out, image, mask, results, bit_depth)
    print(f"wrote {len(results)} inpainted image(s), mask.png and strip.png to {out}")
    return 0

