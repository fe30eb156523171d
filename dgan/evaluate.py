"""python -m dgan.evaluate: FID/KID/PSNR/SSIM of a checkpoint's EMA generator.

    python -m dgan.evaluate --fid --kid --psnr --ssim [--frd] [--sharpness] [--run DIR | --checkpoint PATH]
        [--num-samples N] [--sampler ddim|ddpm|dpmpp2m --steps 50 --eta 0] [--batch-size B] [--seed S]
        [--fid-weights PATH] [--feature-extractor model.pt] [--reference val|train]
        [--t-values 50,100,250,500] [--root runs] [--no-mlflow] [--guidance W] [--per-class]
        [--prdc] [--memorization] [--diversity] [--utility] [--audit] [--utility-per-class N]

The synthetic-data audit (dgan/audit.py; --audit for all four): --prdc (precision, recall, density,
coverage in FID's feature space), --memorization (nearest training image of each sample against
held-out real images' own; the closest pairs go to <run>/eval/memorization-<step>.png), --diversity
(MS-SSIM between sample pairs) and --utility (train on synthetic, test on real; conditional models,
--utility-per-class N). Each comes with its real-data floor (keys real_*, utility_real_*).

With no metric flag, FID, KID, PSNR and SSIM are computed; --frd (Fréchet Radiomics Distance,
dgan.metrics.frd, samples against the reference like FID) is opt-in and needs the `frd` extra:
pip install -e ".[frd]". --sharpness (opt-in, and nearly free) is the samples' edge energy (mean
|difference| of neighbouring pixels) over the reference's: above 1 the samples are grainier than the
data (try fewer steps, dpmpp2m 10, or --t-min), below 1 blurrier (more steps). With neither --run
nor --checkpoint, the newest run under --root (the one whose newest checkpoint was written last) is
evaluated, at its newest valid checkpoint.

Generation. Sample i starts from noise seeded by (seed, i) and, for conditional models, has label
i % num_classes, so the sample set does not depend on the batch size or on the number of ranks
(up to float rounding between batch compositions; DDPM's per-step noise, and DDIM's with --eta above
0, is drawn per batch, so those are reproducible for the same world size and batch size). Under
torchrun, rank r generates the indices i with i % world_size == r and rank 0 gathers exactly N samples in index order. Write
--run-dir there: torchrun's own parser takes --run for an abbreviation of its --run-path.

Reference. The held-out split of the run's data config (--reference val, default) or its training
images (--reference train). FID and KID are computed against it with torch-fidelity
(dgan.metrics.fid_kid); reference statistics are cached under <runs root>/.cache/fid.

PSNR/SSIM. One-step reconstructions: x_t = q(x0, t) of held-out images, then
x0_hat = clamp(model_x0(x_t, G(x_t, t)), -1, 1), scored against x0 for each t in --t-values
(keys psnr_t<t>, ssim_t<t>).

--task inpaint [--mask-type box|brush --jump-length 10 --jump-n-sample 10 --task-images 16]. RePaint
fills a hole in the first --task-images reference images; PSNR/SSIM inside the hole (inpaint_psnr,
inpaint_ssim) next to a mean-of-known-pixels fill (inpaint_baseline_*). See dgan/inpaint.py.

--task sr [--task-images 16] (model.task=sr checkpoints). Super-resolves the area-downsampled first
--task-images reference images; PSNR/SSIM of SR and of bicubic upsampling against the HR images
(sr_psnr, sr_ssim, bicubic_psnr, bicubic_ssim). See dgan/superres.py.

Results. <run>/eval/eval-<step>.json, a table on the console, a sample grid
<run>/eval/samples-<step>.png, and (unless --no-mlflow) the metrics as eval/<key> on the training
run's MLflow record, at step = the checkpoint's step.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from dgan import distributed as dist
from dgan.audit import AUDIT_METRICS, DEFAULT_UTILITY_PER_CLASS
from dgan.config import int_list_arg
from dgan.diffusion import SAMPLERS
from dgan.errors import DganError, report
from dgan.generation import load_generator, sampler_floor
from dgan.inpaint import add_inpaint_args, run_inpaint_task
from dgan.reference import LABEL_SHIFT_WARNING, REFERENCES, reference_split
from dgan.report import checkpoint_record, print_report, write_outputs
from dgan.rundir import find_checkpoint
from dgan.scoring import (DEFAULT_METRICS, DEFAULT_RECON_IMAGES, DEFAULT_T_VALUES, METRICS,
                          check_request, run_evaluation)
from dgan.superres import run_sr_task

TASKS = ("generate", "inpaint", "sr")  # --task: what is scored; generate is FID/KID/PSNR/SSIM of samples
DEFAULT_TASK_IMAGES = 16  # --task inpaint/sr: held-out images, small enough for a CPU run


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 0")
    return value


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=50, help="sampler steps (ddpm always runs all T)")
    p.add_argument("--t-min", type=_non_negative, default=None,
                   help="no sampler step below this timestep (default: the run's diffusion.sample_t_min)")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM's fresh noise per step, in [0, 1] (0: deterministic; 1: DDPM's step on DDIM's grid)")


def _check_generation_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit code 2) in how the samples are drawn."""
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if not 0.0 <= args.eta <= 1.0:
        p.error(f"--eta {args.eta}: must be in [0, 1]")
    if args.eta > 0 and args.sampler != "ddim":
        p.error(f"--eta is DDIM's; --sampler {args.sampler} would ignore it (add --sampler ddim, or drop --eta)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dgan.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in DEFAULT_METRICS:
        p.add_argument(f"--{name}", action="store_true", help=f"compute {name.upper()} (no metric flag: all four)")
    p.add_argument("--frd", action="store_true",
                   help='compute FRD, the Fréchet Radiomics Distance (opt-in; needs pip install -e ".[frd]")')
    p.add_argument("--sharpness", action="store_true", help="samples' edge energy over the reference's (1: as sharp)")
    audit = p.add_argument_group("synthetic-data audit (README: 'Is my synthetic data safe and useful?')")
    audit.add_argument("--prdc", action="store_true",
                       help="precision, recall, density and coverage, in FID's feature space")
    audit.add_argument("--memorization", action="store_true",
                       help="each sample's nearest training image vs held-out real images' (copies flagged)")
    audit.add_argument("--diversity", action="store_true", help="MS-SSIM between sample pairs (lower: more diverse)")
    audit.add_argument("--utility", action="store_true",
                       help="train on synthetic, test on real: balanced accuracy and AUROC (conditional models)")
    audit.add_argument("--audit", action="store_true", help="all four of the above")
    audit.add_argument("--report", action="store_true",
                       help="everything (FID, KID, PSNR, SSIM, sharpness and the audit; utility only for conditional "
                            "models) and one self-contained HTML page, <run>/eval/report-<step>.html")
    audit.add_argument("--utility-per-class", type=int, default=DEFAULT_UTILITY_PER_CLASS,
                       help="images per class for each utility classifier (synthetic and real)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--run", "--run-dir", dest="run",
                       help="run directory (default: the newest run under --root); under torchrun write "
                            "--run-dir, since torchrun takes --run as an abbreviation of its --run-path")
    where.add_argument("--checkpoint", help="a checkpoint file (default: the run's newest valid one)")
    p.add_argument("--root", default="runs", help="where runs live (log.root); used without --run/--checkpoint")
    p.add_argument("--num-samples", type=int, default=5000, help="generated images for FID/KID/FRD")
    _add_sampler_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="per-rank generation batch")
    p.add_argument("--seed", type=_non_negative, default=0)
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance weight for conditional models (1 = none)")
    p.add_argument("--per-class", action="store_true",
                   help="also FID/KID per class (keys fid_c<k>, kid_c<k>): class k's samples vs its references")
    p.add_argument("--fid-weights", help="Inception weights file (default: the torch hub cache)")
    p.add_argument("--feature-extractor", help="TorchScript extractor (uint8 NxCxHxW -> NxD) instead of Inception")
    p.add_argument("--reference", default="val", choices=REFERENCES, help="held-out split or the training images")
    p.add_argument("--reference-images", type=int, default=None, help="use at most this many reference images")
    p.add_argument("--t-values", type=int_list_arg, default=DEFAULT_T_VALUES, help="PSNR/SSIM timesteps, e.g. 50,100")
    p.add_argument("--recon-images", type=int, default=DEFAULT_RECON_IMAGES,
                   help="held-out images scored by PSNR/SSIM (the first N)")
    p.add_argument("--out", help="JSON path (default: <run>/eval/eval-<step>.json)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to the MLflow store")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dump-samples", help="also torch.save the gathered uint8 samples here (for checks)")
    p.add_argument("--task", default="generate", choices=TASKS,
                   help="generate: score samples (default); inpaint: RePaint PSNR/SSIM inside a mask; sr")
    p.add_argument("--task-images", type=int, default=DEFAULT_TASK_IMAGES,
                   help="--task inpaint/sr: score the first N held-out images of --reference")
    add_inpaint_args(p, mask_file=False)  # --mask-type box|brush --jump-length --jump-n-sample
    args = p.parse_args(argv)
    _check_generation_args(p, args)
    if args.utility_per_class < 2:
        p.error("--utility-per-class must be >= 2")
    for name in (*DEFAULT_METRICS, "sharpness", *AUDIT_METRICS) if args.report else AUDIT_METRICS if args.audit else ():
        setattr(args, name, True)
    return args


def _evaluate_cli(args: argparse.Namespace, chosen: list[str], device: torch.device) -> int:
    # Rank 0 decides: a checkpoint written meanwhile must not make ranks evaluate different files.
    # Its rank-0-only work goes through dist.on_main, so a failure there stops every rank.
    ckpt, run_dir = dist.on_main(lambda: find_checkpoint(args.run, args.checkpoint, args.root))
    plain = args.task == "generate" and not {"psnr", "ssim"} & set(chosen)  # samples from noise alone
    G, cfg, diffusion, _ = load_generator(ckpt, device, sampler_floor(args.sampler, args.t_min),
                                          (args.sampler, args.steps, args.eta) if plain else None)
    if args.report and cfg.model.num_classes < 2 and "utility" in chosen:
        chosen.remove("utility")  # --report asks for everything that applies; utility needs classes
        dist.print0("dgan.evaluate: --report: no utility score, the model is unconditional")
    record = dist.on_main(lambda: announce(ckpt, cfg, args, chosen))
    if args.task == "inpaint":
        result = run_inpaint_task(G, diffusion, cfg, args, device)
    elif args.task == "sr" or cfg.model.task == "sr":  # an SR checkpoint is only scored against bicubic
        result = run_sr_task(G, diffusion, cfg, args, device)
    else:
        result = run_evaluation(G, diffusion, cfg, num_samples=args.num_samples, sampler=args.sampler,
                                steps=args.steps, seed=args.seed, metrics=chosen, device=device,
                                extractor_path=args.feature_extractor, fid_weights=args.fid_weights,
                                reference=args.reference, batch_size=args.batch_size, t_values=args.t_values,
                                recon_images=args.recon_images, reference_images=args.reference_images,
                                cache_dir=run_dir.parent / ".cache" / "fid", guidance=args.guidance,
                                per_class=args.per_class, utility_per_class=args.utility_per_class, eta=args.eta)
    # the other ranks leave only once the results are on disk (on_main is collective)
    dist.on_main(lambda: print_report(write_outputs(result, args, record, run_dir, cfg, diffusion, chosen)))
    return 0


def announce(ckpt: Path, cfg, args: argparse.Namespace, chosen: list[str]) -> dict[str, Any]:
    """Rank 0: the checkpoint's record, and one line saying what is evaluated against what."""
    record = checkpoint_record(ckpt)
    print(f"dgan.evaluate: {', '.join(chosen)} of {ckpt} (step {record['step']}) on "
          f"{dist.get_world_size()} rank(s), reference split {reference_split(cfg, args.reference)}", flush=True)
    if cfg.data.source == "npz" and args.reference == "val":
        print(f"dgan.evaluate: warning: {LABEL_SHIFT_WARNING}", file=sys.stderr, flush=True)
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    chosen = [m for m in METRICS if getattr(args, m)] or list(DEFAULT_METRICS)
    try:
        # First, before the checkpoint, the data and any generation are even imported: bad options
        # and missing Inception weights stop the command within seconds.
        if args.task == "generate":
            check_request(chosen, sampler=args.sampler, steps=args.steps, num_samples=args.num_samples,
                          t_values=args.t_values, num_steps=None, extractor_path=args.feature_extractor,
                          fid_weights=args.fid_weights)
        else:
            chosen = [args.task]  # the task's own metrics (e.g. inpaint_psnr), not FID/KID/PSNR/SSIM
        device = dist.init(args.device)
        try:
            return _evaluate_cli(args, chosen, device)
        finally:
            dist.shutdown()
    except DganError as err:
        return report(err, "dgan.evaluate")


if __name__ == "__main__":
    sys.exit(main())
