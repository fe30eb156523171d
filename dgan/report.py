"""An evaluation's report: the JSON at <run>/eval/eval-<step>.json, the sample grid, the metrics on
the training run's MLflow record (eval/<key> at the checkpoint's step), and the console table.
Rank 0 only; `python -m dgan.evaluate` calls it with the metrics every rank agreed on.
"""
from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from dgan import __version__
from dgan.atomic import write_text_atomic
from dgan.checkpoint import load_checkpoint
from dgan.generation import save_grid
from dgan.html_report import write_html_report
from dgan.progress import format_value
from dgan.reference import EvalResult
from dgan.tracking import RUN_STATUSES, Tracker, default_tracking_uri, import_mlflow


GRID_IMAGES = 64



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
        "t_min": 0 if args.sampler == "ddpm" else diffusion.t_min,  # the grid's floor (DDPM: every step)
        "eta": args.eta,
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
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")  # a reader never sees half a file



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
    pairs, memo_png = result.artefacts.get("memorization_pairs"), None
    if pairs is not None:  # sample | nearest training image, four pairs per row: for a person to judge
        memo_png = save_grid(pairs.to(torch.float32) / 127.5 - 1.0, eval_dir / f"memorization-{step:09d}.png", nrow=8)
    json_path = Path(args.out) if args.out else eval_dir / f"eval-{step:09d}.json"
    tracker = before = None
    if not args.no_mlflow:
        tracker, before = open_training_run(cfg, run_dir, record["mlflow_run_id"])
    report = build_report(result, args, record, run_dir, diffusion, chosen,
                          tracker.run_id if tracker is not None else record["mlflow_run_id"])
    page = None
    if args.report:
        page = write_html_report(json_path.with_name(f"report-{step:09d}.html"), report, grid, result.artefacts,
                                 memo_png)
        report["html_path"] = str(page)
    _write_json(json_path, report)
    if tracker is not None:
        tracker.log_metrics({f"eval/{k}": v for k, v in result.metrics.items()}, step=step)
        tracker.set_tags({"eval.checkpoint": record["path"], "eval.step": step, "eval.run_dir": str(run_dir),
                          "eval.reference": (report["reference"] or {}).get("split", ""),
                          "eval.sampler": f"{report['sampler']} {report['steps']} steps, eta {report['eta']}"})
        for artifact in (json_path, grid, memo_png, page):
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
    eta = f", eta {report['eta']}" if report.get("eta") else ""  # reports before --eta have none
    console.print(f"samples {report['num_samples']} ({report['sampler']}, {report['steps']} steps{eta}, seed "
                  f"{report['seed']}, world size {report['world_size']}); reference {ref.get('source')} "
                  f"split {ref.get('split')} ({ref.get('num_images')} images); extractor {extractor}",
                  highlight=False)
    console.print(f"wrote {report['json_path']}", highlight=False)
