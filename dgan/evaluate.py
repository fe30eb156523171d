"""python -m dgan.evaluate: FID/KID/PSNR/SSIM of a checkpoint's EMA generator.

    python -m dgan.evaluate --fid --kid --psnr --ssim [--frd] [--run DIR | --checkpoint PATH]
        [--num-samples N] [--sampler ddim|ddpm|dpmpp2m --steps 50] [--batch-size B] [--seed S]
        [--fid-weights PATH] [--feature-extractor model.pt] [--reference val|train]
        [--t-values 50,100,250,500] [--root runs] [--no-mlflow] [--guidance W] [--per-class]

With no metric flag, FID, KID, PSNR and SSIM are computed; --frd (Fréchet Radiomics Distance,
dgan.metrics.frd, samples against the reference like FID) is opt-in and needs the `frd` extra:
pip install -e ".[frd]". With neither --run nor --checkpoint, the newest run
under --root (the one whose newest checkpoint was written last) is evaluated, at its newest
valid checkpoint.

Generation. Sample i starts from noise seeded by (seed, i) and, for conditional models, has label
i % num_classes, so the sample set does not depend on the batch size or on the number of ranks
(up to float rounding between batch compositions; DDPM's per-step noise is drawn per batch, so
DDPM is reproducible for the same world size and batch size). Under torchrun, rank r generates the
indices i with i % world_size == r and rank 0 gathers exactly N samples in index order. Write
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
import datetime
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch  # noqa: E402

from dgan import __version__  # noqa: E402
from dgan import distributed as dist  # noqa: E402
from dgan.checkpoint import load_checkpoint  # noqa: E402
from dgan.config import int_list_arg  # noqa: E402
from dgan.diffusion import SAMPLERS  # noqa: E402
from dgan.errors import DganError, EvalError, report  # noqa: E402
from dgan.generation import generate_distributed, guided_model_fn, load_generator, save_grid  # noqa: E402
from dgan.inpaint import add_inpaint_args, run_inpaint_task  # noqa: E402
from dgan.reference import (LABEL_SHIFT_WARNING, REFERENCES, EvalResult, conditioning_labels,  # noqa: E402
                            load_reference, reference_cache_key, reference_info, reference_split)
from dgan.rundir import find_checkpoint  # noqa: E402
from dgan.runinfo import file_sha256  # noqa: E402
from dgan.seeding import Stream, derive_seed  # noqa: E402
from dgan.superres import run_sr_task  # noqa: E402
from dgan.tracking import RUN_STATUSES, Tracker, default_tracking_uri, format_value, import_mlflow  # noqa: E402

METRICS = ("fid", "kid", "psnr", "ssim", "frd")
# Without a metric flag. FRD is opt-in: it needs the optional `frd` extra (PyRadiomics).
DEFAULT_METRICS = ("fid", "kid", "psnr", "ssim")
SAMPLE_METRICS = {"fid", "kid", "frd"}  # scored on generated samples, so they need a generation
TASKS = ("generate", "inpaint", "sr")  # --task: what is scored; generate is FID/KID/PSNR/SSIM of samples
DEFAULT_TASK_IMAGES = 16  # --task inpaint/sr: held-out images, small enough for a CPU run
DEFAULT_T_VALUES = (50, 100, 250, 500)
DEFAULT_RECON_IMAGES = 1000
GRID_IMAGES = 64


# --------------------------------------------------------------------------------------------------
# Seeded, rank-independent generation
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Reference images and reconstruction metrics
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_metrics(G: torch.nn.Module, diffusion, x0: torch.Tensor, labels: Optional[torch.Tensor],
                           t_values: Sequence[int], *, seed: int, batch_size: int,
                           device: torch.device) -> dict[str, float]:
    """PSNR/SSIM of one-step x0 predictions from q(x0, t), per t: {"psnr_t50": ..., "ssim_t50": ...}."""
    from dgan.metrics import psnr_ssim  # torch-fidelity: slow to import

    out: dict[str, float] = {}
    was_training = G.training
    G.eval()
    try:
        for t in t_values:
            # All of eps at once from one generator: the numbers do not depend on batch_size.
            gen = torch.Generator().manual_seed(derive_seed(seed, Stream.RECON_NOISE, t))
            eps = torch.randn(x0.shape, generator=gen)
            preds = []
            for start in range(0, x0.shape[0], batch_size):
                xb, eb = x0[start:start + batch_size].to(device), eps[start:start + batch_size].to(device)
                tb = torch.full((xb.shape[0],), int(t), dtype=torch.long, device=device)
                yb = None if labels is None else labels[start:start + batch_size].to(device)
                x_t = diffusion.q_sample(xb, tb, eb)
                out_b = guided_model_fn(G, yb, 1.0)(x_t, tb)
                preds.append(diffusion.model_x0(x_t, tb, out_b).clamp(-1, 1).cpu())
            scores = psnr_ssim(torch.cat(preds), x0, data_range=2.0)
            out[f"psnr_t{t}"], out[f"ssim_t{t}"] = scores["psnr"], scores["ssim"]
    finally:
        G.train(was_training)
    return out


# --------------------------------------------------------------------------------------------------
# The evaluation itself (used by the CLI and, for periodic evaluation, by the trainer)
# --------------------------------------------------------------------------------------------------


def check_request(metrics: Iterable[str], *, sampler: str, steps: int, num_samples: int, t_values: Sequence[int],
                  num_steps: Optional[int], extractor_path=None, fid_weights=None) -> dict[str, Any]:
    """Validate everything that can be checked before any work; return the feature-extractor record.

    Raises EvalError, or MetricError for missing Inception weights or a missing `frd` extra: nothing is
    downloaded, so this is where an offline run without them stops, before a long generation.
    """
    from dgan.metrics import INCEPTION, resolve_inception_weights  # torch-fidelity: slow to import

    chosen = set(metrics)
    if not chosen or chosen - set(METRICS):
        raise EvalError(f"metrics {sorted(chosen)}: choose from {', '.join(METRICS)}")
    if sampler not in SAMPLERS:
        raise EvalError(f"sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if steps < 1 or (num_steps is not None and steps > num_steps and sampler != "ddpm"):
        raise EvalError(f"--steps {steps}: must be in 1..{num_steps or 'T'}")
    if chosen & {"psnr", "ssim"}:
        # T is unknown before the checkpoint is read (num_steps None): then only the sign is checked.
        bad = [t for t in t_values if t < 0 or (num_steps is not None and t >= num_steps)]
        if not t_values or bad:
            top = num_steps - 1 if num_steps is not None else "T-1"
            raise EvalError(f"--t-values {list(t_values)}: need timesteps in 0..{top}")
    if "frd" in chosen:
        from dgan.metrics import require_frd  # torch-fidelity: slow to import

        require_frd()  # MetricError with the install command when the optional extra is missing
    if chosen & SAMPLE_METRICS and num_samples < 2:
        raise EvalError(f"--num-samples {num_samples}: FID/KID/FRD need at least 2 samples")
    if not chosen & {"fid", "kid"}:
        return {"name": None}
    if extractor_path is not None:
        path = Path(extractor_path).expanduser()
        if not path.is_file():
            raise EvalError(f"--feature-extractor {path}: no such file (a TorchScript module, uint8 NxCxHxW -> NxD)")
        return {"name": "torchscript", "path": str(path.resolve()), "sha256": file_sha256(path)}
    return {"name": INCEPTION, "path": str(resolve_inception_weights(fid_weights))}


def run_evaluation(G: torch.nn.Module, diffusion, cfg, *, num_samples: int, sampler: str, steps: int, seed: int,
                   metrics: Iterable[str], device: torch.device, extractor_path=None, fid_weights=None,
                   reference: str = "val", batch_size: int = 64, t_values: Sequence[int] = DEFAULT_T_VALUES,
                   recon_images: int = DEFAULT_RECON_IMAGES, reference_images: Optional[int] = None,
                   cache_dir=None, guidance: float = 1.0, per_class: bool = False) -> EvalResult:
    """Collective: call on every rank. Metrics and info are broadcast to all ranks; samples stay on rank 0.
    per_class: also FID/KID of each class's samples against that class's reference images."""
    chosen = set(metrics)
    if per_class and cfg.model.num_classes < 1:
        raise EvalError("--per-class needs a class-conditional model (model.num_classes > 0); this one has none")
    if per_class and not chosen & {"fid", "kid"}:
        raise EvalError("--per-class scores FID/KID per class; add --fid and/or --kid")
    extractor = check_request(chosen, sampler=sampler, steps=steps, num_samples=num_samples, t_values=t_values,
                              num_steps=diffusion.num_steps, extractor_path=extractor_path, fid_weights=fid_weights)
    want_fid = bool(chosen & {"fid", "kid"})
    scores: dict[str, float] = {}
    info: dict[str, Any] = {}
    ref: dict[str, Any] = {}  # rank 0's reference images, kept out of the broadcasts

    def load_and_reconstruct() -> None:  # rank 0, before the long generation: data problems fail now
        ref["real"], ref["labels"] = real, labels = load_reference(cfg, reference, reference_images)
        ref["key"] = reference_cache_key(cfg, reference, real) if want_fid else None
        info["reference"] = reference_info(cfg, reference, real.shape[0], ref["key"])
        if chosen & {"psnr", "ssim"}:
            n = min(recon_images, real.shape[0])
            recon = reconstruction_metrics(G, diffusion, real[:n], conditioning_labels(cfg, labels[:n]), t_values,
                                           seed=seed, batch_size=batch_size, device=device)
            scores.update({k: v for k, v in recon.items() if k.split("_t")[0] in chosen})
            info["reference"]["recon_images"] = n
    dist.on_main(load_and_reconstruct)  # an error on rank 0 stops every rank
    samples = ranks = None
    clock = time.perf_counter()
    if chosen & SAMPLE_METRICS:
        samples, ranks = generate_distributed(G, diffusion, cfg, num_samples=num_samples, sampler=sampler,
                                              steps=steps, seed=seed, batch_size=batch_size, device=device,
                                              guidance=guidance)
    info.update(generation_s=round(time.perf_counter() - clock, 3), extractor=extractor,
                world_size=dist.get_world_size())

    def score() -> tuple[dict[str, float], dict[str, Any]]:  # rank 0, which holds the samples
        real, labels, key = ref["real"], ref["labels"], ref["key"]
        if want_fid:
            scores.update(_fid_kid(real, samples, chosen, extractor_path, fid_weights, cache_dir, key, cfg, device,
                                   batch_size))
            for c in range(cfg.model.num_classes if per_class else 0):
                scores.update(_class_fid_kid(c, real, labels, samples, chosen, extractor_path, fid_weights,
                                             cache_dir, key, cfg, device, batch_size))
        if "frd" in chosen:
            from dgan.metrics import frd, to_uint8  # torch-fidelity: slow to import

            scores["frd"] = frd(to_uint8(real), samples)  # the reference first: FRD z-scores against it
        return scores, info
    scores, info = dist.on_main(score)  # every rank gets the numbers, or rank 0's error
    return EvalResult(metrics=scores, info=info, samples=samples, sample_ranks=ranks)


def _fid_kid(real, samples, chosen, extractor_path, fid_weights, cache_dir, key, cfg, device,
             batch_size) -> dict[str, float]:
    from dgan.metrics import fid_kid, to_uint8  # torch-fidelity: slow to import

    cache = Path(cache_dir) if cache_dir is not None else Path(cfg.log.root) / ".cache" / "fid"
    out = fid_kid(to_uint8(real), samples, extractor_path=extractor_path, fid_weights=fid_weights,
                  cache_dir=cache, real_cache_key=key, device=device, batch_size=batch_size,
                  fid="fid" in chosen, kid="kid" in chosen)
    return out


def _class_fid_kid(c: int, real, labels, samples, chosen, extractor_path, fid_weights, cache_dir, key, cfg,
                   device, batch_size) -> dict[str, float]:
    """FID/KID of class c: sample i has label i % K (generate_indices), so class c is samples[c::K]."""
    real_c, fake_c = real[labels == c], samples[c::cfg.model.num_classes]
    if real_c.shape[0] < 2 or fake_c.shape[0] < 2:
        raise EvalError(f"--per-class: class {c} has {real_c.shape[0]} reference image(s) and {fake_c.shape[0]} "
                        "sample(s); need at least 2 of each (raise --num-samples or --reference-images)")
    out = _fid_kid(real_c, fake_c, chosen, extractor_path, fid_weights, cache_dir, key and f"{key}_c{c}", cfg,
                   device, batch_size)
    return {f"{k}_c{c}": v for k, v in out.items()}


def evaluate_generator(G: torch.nn.Module, diffusion, cfg, *, num_samples: int, sampler: str, steps: int, seed: int,
                       metrics: Iterable[str], extractor_path=None, fid_weights=None, reference: str = "val",
                       device: torch.device, batch_size: int = 64, t_values: Sequence[int] = DEFAULT_T_VALUES,
                       cache_dir=None) -> dict[str, float]:
    """Metrics of generator G (pass the EMA module) as a flat dict, e.g. {"fid", "kid", "kid_std",
    "psnr_t100", "ssim_t100"}.

    Collective: call it on every rank at the same point; every rank gets the same dict. G's train/eval
    mode is restored afterwards and the global RNG streams are not touched (all noise comes from
    seeded generators), so calling it inside a training loop keeps exact resume intact.
    """
    device = torch.device(device)
    # fork_rng: a guarantee rather than a promise; the evaluation draws only from its own generators.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        return run_evaluation(G, diffusion, cfg, num_samples=num_samples, sampler=sampler, steps=steps, seed=seed,
                              metrics=metrics, device=device, extractor_path=extractor_path, fid_weights=fid_weights,
                              reference=reference, batch_size=batch_size, t_values=t_values,
                              cache_dir=cache_dir).metrics


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def checkpoint_record(path: Path) -> dict[str, Any]:
    """Step, images seen and the training run's MLflow id, from the checkpoint's trainer state."""
    payload = load_checkpoint(path)
    trainer = payload["state"].get("trainer", {})
    step = int(payload["metadata"].get("step", trainer.get("step", 0)))
    return {"path": str(path), "step": step, "images_seen": int(trainer.get("images_seen", 0)),
            "mlflow_run_id": trainer.get("mlflow_run_id")}


def _mlflow_status(uri: str, run_id: Optional[str]) -> Optional[str]:
    """The run's status, or None when there is no such run in the store."""
    if run_id is None:
        return None
    mlflow = import_mlflow()
    try:
        return mlflow.tracking.MlflowClient(tracking_uri=uri).get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - unknown run or unreadable store: Tracker warns and starts a linked run
        return None


def open_training_run(cfg, run_dir: Path, run_id: Optional[str]):
    """(Tracker on the training run, its status before we touched it). Without that run in the store,
    Tracker starts a linked evaluation run instead (tagged with the run dir)."""
    uri = cfg.log.tracking_uri or default_tracking_uri(run_dir.parent)  # the store next to the run dirs
    before = _mlflow_status(uri, run_id)
    tracker = Tracker(enabled=True, root=run_dir.parent, experiment=cfg.log.experiment,
                      run_name=run_dir.name if before else f"{run_dir.name}-eval", tracking_uri=uri,
                      run_id=run_id if before else None)
    return tracker, before


def close_training_run(tracker, before: Optional[str]) -> None:
    # Reopening marks the run RUNNING; put back what it was. A run still training stays RUNNING.
    if before is None:
        tracker.close("FINISHED")
    elif before in RUN_STATUSES:
        tracker.close(before)


def build_report(result: EvalResult, args: argparse.Namespace, record: dict, run_dir: Path,
                 diffusion, chosen: Sequence[str], mlflow_run_id: Optional[str]) -> dict[str, Any]:
    """The JSON written to <run>/eval/eval-<step>.json."""
    return {
        "metrics": result.metrics,
        "checkpoint": {k: record[k] for k in ("path", "step", "images_seen")},
        "run_dir": str(run_dir),
        "num_samples": 0 if result.samples is None else int(result.samples.shape[0]),
        "sampler": args.sampler,
        "steps": diffusion.num_steps if args.sampler == "ddpm" else args.steps,  # DDPM always runs T steps
        "seed": args.seed,
        "guidance": args.guidance,
        "batch_size": args.batch_size,
        "world_size": result.info["world_size"],
        "reference": result.info.get("reference"),
        "extractor": result.info["extractor"],
        "task": {"name": args.task, **result.info.get("task", {})},  # a task's own settings (mask type...)
        "t_values": list(args.t_values) if {"psnr", "ssim"} & set(chosen) else [],
        "mlflow_run_id": mlflow_run_id,
        "generation_s": result.info["generation_s"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dgan_version": __version__,
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader (or a concurrent evaluation) never sees half a file


def write_outputs(result: EvalResult, args: argparse.Namespace, record: dict, run_dir: Path, cfg, diffusion,
                  chosen: Sequence[str]) -> dict[str, Any]:
    """Rank 0: grid, optional sample dump, MLflow, JSON. Returns the report."""
    step = record["step"]
    eval_dir = run_dir / "eval"
    grid = None
    if result.samples is not None:
        shown = result.samples[:GRID_IMAGES].to(torch.float32) / 127.5 - 1.0
        grid = save_grid(shown, eval_dir / f"samples-{step:09d}.png")
    if args.dump_samples and result.samples is not None:
        Path(args.dump_samples).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": result.samples, "ranks": result.sample_ranks, "seed": args.seed},
                   args.dump_samples)
    json_path = Path(args.out) if args.out else eval_dir / f"eval-{step:09d}.json"
    tracker = before = None
    if not args.no_mlflow:
        tracker, before = open_training_run(cfg, run_dir, record["mlflow_run_id"])
    report = build_report(result, args, record, run_dir, diffusion, chosen,
                          tracker.run_id if tracker is not None else record["mlflow_run_id"])
    _write_json(json_path, report)
    if tracker is not None:
        tracker.log_metrics({f"eval/{k}": v for k, v in result.metrics.items()}, step=step)
        tracker.set_tags({"eval.checkpoint": record["path"], "eval.step": step, "eval.run_dir": str(run_dir),
                          "eval.reference": (report["reference"] or {}).get("split", "")})
        for artifact in (json_path, grid):
            if artifact is not None:
                tracker.log_artifact(artifact, "eval")
        close_training_run(tracker, before)
    report["json_path"] = str(json_path)
    return report


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))  # a SLURM log: no wrapping at 80 columns
    ref = report["reference"] or {}
    console.print(f"checkpoint {report['checkpoint']['path']} (step {report['checkpoint']['step']})",
                  highlight=False)
    table = Table(title="dgan.evaluate")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report["metrics"].items():
        table.add_row(key, format_value(value))
    console.print(table)
    extractor = report["extractor"].get("name") or "-"
    console.print(f"samples {report['num_samples']} ({report['sampler']}, {report['steps']} steps, seed "
                  f"{report['seed']}, world size {report['world_size']}); reference {ref.get('source')} "
                  f"split {ref.get('split')} ({ref.get('num_images')} images); extractor {extractor}",
                  highlight=False)
    console.print(f"wrote {report['json_path']}", highlight=False)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 0")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dgan.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in DEFAULT_METRICS:
        p.add_argument(f"--{name}", action="store_true", help=f"compute {name.upper()} (no metric flag: all four)")
    p.add_argument("--frd", action="store_true",
                   help='compute FRD, the Fréchet Radiomics Distance (opt-in; needs pip install -e ".[frd]")')
    where = p.add_mutually_exclusive_group()
    where.add_argument("--run", "--run-dir", dest="run",
                       help="run directory (default: the newest run under --root); under torchrun write "
                            "--run-dir, since torchrun takes --run as an abbreviation of its --run-path")
    where.add_argument("--checkpoint", help="a checkpoint file (default: the run's newest valid one)")
    p.add_argument("--root", default="runs", help="where runs live (log.root); used without --run/--checkpoint")
    p.add_argument("--num-samples", type=int, default=5000, help="generated images for FID/KID/FRD")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=50, help="sampler steps (ddpm always runs all T)")
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
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def _evaluate_cli(args: argparse.Namespace, chosen: list[str], device: torch.device) -> int:
    # Rank 0 decides: a checkpoint written meanwhile must not make ranks evaluate different files.
    # Its rank-0-only work goes through dist.on_main, so a failure there stops every rank.
    ckpt, run_dir = dist.on_main(lambda: find_checkpoint(args.run, args.checkpoint, args.root))
    G, cfg, diffusion, _ = load_generator(ckpt, device)
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
                                per_class=args.per_class)
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
