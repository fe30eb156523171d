"""python -m dgan.compare: MLflow runs side by side, as a table and a plot.

Works straight on the sqlite store that training writes (``<root>/mlflow.db``),
so it runs on an offline compute or login node without an MLflow server.
The table shows only the params that differ between the selected runs: with a
few hundred config keys per run, the shared ones hide what was being compared.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dgan.errors import UsageError, report
from dgan.progress import format_value
from dgan.tracking import default_tracking_uri, import_mlflow

# Metrics shown whenever a run has them, with the direction that is better.
# dgan.evaluate and periodic evaluation log eval/fid and eval/kid; plain fid/kid are kept
# for runs logged by other tools.
STANDARD_METRICS: tuple[tuple[str, str], ...] = (("L_diff", "min"), ("eval/fid", "min"), ("eval/kid", "min"),
                                                 ("fid", "min"), ("kid", "min"))
# Where a run records its checkpoint location, most specific first.
CHECKPOINT_KEYS = ("checkpoint", "run_dir")
# Params that differ between any two runs by construction; they have own columns.
NOT_COMPARED = frozenset({"checkpoint", "run_dir", "log.run_name"})
MISSING = "-"


class CompareError(UsageError):
    """A user-facing problem (no store, no experiment, no matching run): one line."""


def sqlite_path(uri: str) -> Path | None:
    """The file behind a ``sqlite:///`` URI, or None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///"):].split("?", 1)[0]))


def _client(tracking_uri: str) -> Any:
    # Opening a missing sqlite file would silently create an empty store there.
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise CompareError(f"no MLflow store at {db}: pass --root DIR (the training "
                           f"log.root) or --tracking-uri URI")
    mlflow = import_mlflow()
    return mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)


def _all_runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no experiment {experiment!r} in the store; "
                           f"found: {', '.join(names) or 'none'} (use --experiment)")
    runs: list[Any] = []
    token = None
    while True:   # page through: search_runs returns at most 1000 per call
        page = client.search_runs([exp.experiment_id], page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _select(runs: list[Any], wanted: Sequence[str] | None) -> list[Any]:
    """Keep runs whose id or name is in ``wanted`` (all runs when it is empty)."""
    if not wanted:
        return runs
    chosen = [r for r in runs if r.info.run_id in wanted or r.info.run_name in wanted]
    known = {r.info.run_id for r in chosen} | {r.info.run_name for r in chosen}
    missing = [w for w in wanted if w not in known]
    if missing:
        raise CompareError(f"no run with id or name {', '.join(missing)} in this experiment")
    return chosen


def summarize(history: Sequence[tuple[int, float]], mode: str) -> dict[str, Any]:
    """Final (last step) and best (by ``mode``, ignoring NaN) of a metric history."""
    finite = [(s, v) for s, v in history if not math.isnan(v)]
    best_step, best = (None, math.nan)
    if finite:
        pick = min if mode == "min" else max
        best_step, best = pick(finite, key=lambda sv: sv[1])
    return {"final": history[-1][1], "best": best, "best_step": best_step,
            "history": list(history)}


def _metric_history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    points = client.get_metric_history(run_id, key)
    points = sorted(points, key=lambda m: (m.step, m.timestamp))
    return [(int(m.step), float(m.value)) for m in points]


def _checkpoint(run: Any) -> str | None:
    for key in CHECKPOINT_KEYS:
        for source in (run.data.tags, run.data.params):
            if source.get(key):
                return source[key]
    return None


def _row(client: Any, run: Any, metrics: Sequence[tuple[str, str]]) -> dict[str, Any]:
    stats: dict[str, dict[str, Any]] = {}
    for key, mode in metrics:
        if key in run.data.metrics:   # only runs that logged it: saves a query
            history = _metric_history(client, run.info.run_id, key)
            if history:
                stats[key] = summarize(history, mode)
    last_steps = [s["history"][-1][0] for s in stats.values()]
    return {"run_id": run.info.run_id, "run_name": run.info.run_name,
            "status": run.info.status, "params": {}, "metrics": stats,
            "steps": max(last_steps) if last_steps else None,
            "checkpoint": _checkpoint(run)}


def differing_params(params: Sequence[dict[str, str]]) -> list[str]:
    """Keys whose value is not the same in every run (absent counts as a value)."""
    keys = sorted(set().union(*params)) if params else []
    return [k for k in keys if k not in NOT_COMPARED
            and len({p.get(k, MISSING) for p in params}) > 1]


def compare_runs(tracking_uri: str, experiment: str, metric: str, mode: str,
                 runs: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per selected run, sorted by best ``metric`` (runs without it last).

    Each row: run_id, run_name, status, params (only the differing ones), metrics
    ({name: {final, best, best_step, history}} for ``metric`` and the standard
    metrics present), steps (last logged step), checkpoint, best (of ``metric``).
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    client = _client(tracking_uri)
    selected = _select(_all_runs(client, experiment), runs)
    wanted = [(metric, mode)] + [m for m in STANDARD_METRICS if m[0] != metric]
    rows = [_row(client, run, wanted) for run in selected]
    diff = differing_params([run.data.params for run in selected])
    for row, run in zip(rows, selected):
        row["params"] = {k: run.data.params.get(k, MISSING) for k in diff}
        row["best"] = row["metrics"].get(metric, {}).get("best", math.nan)
    sign = 1.0 if mode == "min" else -1.0
    rows.sort(key=lambda r: (math.isnan(r["best"]), sign * r["best"]
                             if not math.isnan(r["best"]) else 0.0))
    return rows


# ----------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None) -> str:
    return MISSING if value is None or math.isnan(value) else format_value(value)


def render_table(rows: list[dict[str, Any]], metric: str, title: str) -> Table:
    metric_names = [metric] + [m for m, _ in STANDARD_METRICS
                               if m != metric and any(m in r["metrics"] for r in rows)]
    param_keys = list(rows[0]["params"]) if rows else []
    table = Table(title=title)
    table.add_column("run", no_wrap=True)
    table.add_column("status")
    for key in param_keys:
        table.add_column(key, style="cyan")
    for name in metric_names:
        table.add_column(f"{name} final", justify="right")
        table.add_column(f"{name} best", justify="right", style="bold" if name == metric else "")
    table.add_column("steps", justify="right")
    table.add_column("checkpoint", overflow="fold")
    for row in rows:
        cells = [row["run_name"] or row["run_id"], row["status"]]
        cells += [str(row["params"][k]) for k in param_keys]
        for name in metric_names:
            stat = row["metrics"].get(name, {})
            cells += [_fmt(stat.get("final")), _fmt(stat.get("best"))]
        cells += [MISSING if row["steps"] is None else str(row["steps"]),
                  row["checkpoint"] or MISSING]
        # Text, not str: run names and values like "[128, 64]" are not rich markup.
        table.add_row(*(Text(c) for c in cells))
    return table


def plot_curves(rows: list[dict[str, Any]], metric: str, out: str | Path) -> Path:
    """``metric`` vs step per run, and L_diff in a second panel when logged."""
    # Figure without pyplot: renders through Agg and leaves no global backend state.
    from matplotlib.figure import Figure

    panels = [metric]
    if metric != "L_diff" and any("L_diff" in r["metrics"] for r in rows):
        panels.append("L_diff")
    fig = Figure(figsize=(6.5 * len(panels), 4.5), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for i, row in enumerate(rows):
            history = row["metrics"].get(name, {}).get("history")
            if history:
                steps, values = zip(*history)
                # Colour fixed per run, so a run keeps its colour across panels.
                ax.plot(steps, values, color=f"C{i % 10}",
                        marker="." if len(steps) < 30 else None,
                        label=row["run_name"] or row["run_id"])
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {name} logged", ha="center", transform=ax.transAxes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dgan.compare",
                                description="Compare dgan training runs stored in MLflow.")
    p.add_argument("--root", default="runs",
                   help="training log.root; the store is <root>/mlflow.db (default: runs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides --root)")
    p.add_argument("--experiment", default="dgan", help="MLflow experiment (default: dgan)")
    p.add_argument("--metric", default="eval/fid", help="metric to rank by (default: eval/fid)")
    p.add_argument("--mode", choices=("min", "max"), default="min",
                   help="whether lower or higher --metric is better (default: min)")
    p.add_argument("--plot", metavar="OUT.png", help="write metric curves to this image")
    p.add_argument("--runs", nargs="+", metavar="ID_OR_NAME",
                   help="only these runs (default: all runs of the experiment)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri(args.root)
    try:
        rows = compare_runs(uri, args.experiment, args.metric, args.mode, args.runs)
    except CompareError as err:
        return report(err, "dgan.compare")
    if not rows:
        print(f"dgan.compare: error: experiment {args.experiment!r} has no runs",
              file=sys.stderr)
        return 1
    console = Console()
    if not console.is_terminal:
        # Piped or in a SLURM log: rich would squeeze the table to 80 columns.
        console = Console(width=max(console.width, 200))
    title = f"{args.experiment}: {len(rows)} runs, sorted by {args.mode} {args.metric}"
    console.print(render_table(rows, args.metric, title))
    if args.plot:
        console.print(f"plot: {plot_curves(rows, args.metric, args.plot)}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
