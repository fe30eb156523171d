"""Training progress on the console (rich): a live bar on a terminal, and one plain status line per
log interval when stdout is a file (SLURM logs), carrying the same keys as MLflow."""
from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, Task, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text


def format_value(value: float) -> str:
    """Short, fixed-style number for status lines: 0.0412, 210.3, 1200, 3.2e-05."""
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1e-3:
        return f"{value:.4g}"
    return f"{value:.2e}"



class _StepColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"step {int(task.completed)}/{int(task.total or 0)}")



class _MetricColumn(ProgressColumn):
    """Shows one metric from the task's ``metrics`` field (names may contain '/')."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def render(self, task: Task) -> Text:
        value = task.fields.get("metrics", {}).get(self.key)
        return Text(f"{self.key} {'-' if value is None else format_value(value)}")



class Progress:
    """Training progress: a live bar on a TTY, one status line per log call otherwise.

    ``keys`` are the metric columns of the live bar and lead the status line.
    ``images_per_step`` (global batch) lets us derive img/s and kimg when the
    caller does not pass them as metrics.
    """

    def __init__(self, *, total_steps: int, start_step: int, enabled: bool, keys: list[str],
                 images_per_step: int | None = None, console: Console | None = None) -> None:
        self.total_steps = int(total_steps)
        self.keys = list(keys)
        self.enabled = enabled
        self.images_per_step = images_per_step
        self.console = (console or Console()) if enabled else None
        self._bar: RichProgress | None = None
        self._task: Any = None
        self._start = (int(start_step), time.monotonic())   # for the ETA
        self._last = self._start                              # for img/s

    def __enter__(self) -> Progress:
        if self.enabled and self.console is not None and self.console.is_terminal:
            shown = ["kimg", "img/s"] + [k for k in self.keys if k not in ("kimg", "img/s")]
            self._bar = RichProgress(_StepColumn(), BarColumn(),
                                     *(_MetricColumn(k) for k in shown),
                                     TimeRemainingColumn(), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total_steps,
                                            completed=self._start[0], metrics={})
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def advance(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Move to ``step``. On a file, print one status line when metrics are given."""
        if not self.enabled or self.console is None:
            return
        shown = self._with_throughput(step, metrics) if metrics is not None else None
        if self._bar is not None:
            update: dict[str, Any] = {"metrics": shown} if shown is not None else {}
            self._bar.update(self._task, completed=step, **update)
        elif shown is not None:
            self.console.print(self.status_line(step, shown), markup=False,
                               highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        """An event line (above the live bar on a TTY); printed even when progress is off."""
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, flush=True)

    def status_line(self, step: int, metrics: Mapping[str, float] | None) -> str:
        """``step 1200/5000 kimg 38.4 img/s 210.3 L_diff 0.0412 ... eta 0:41:07``."""
        metrics = dict(metrics or {})
        order = [k for k in ("kimg", "img/s") if k in metrics]
        order += [k for k in self.keys if k in metrics and k not in order]
        order += [k for k in metrics if k not in order]
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {format_value(metrics[k])}" for k in order]
        eta = self._eta(step)
        if eta is not None:
            parts.append(f"eta {eta}")
        return " ".join(parts)

    def _with_throughput(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        out = dict(metrics)
        now = time.monotonic()
        last_step, last_time = self._last
        self._last = (step, now)
        if self.images_per_step:
            out.setdefault("kimg", step * self.images_per_step / 1000)
            if step > last_step and now > last_time:
                out.setdefault("img/s", (step - last_step) * self.images_per_step
                               / (now - last_time))
        return out

    def _eta(self, step: int) -> str | None:
        start_step, start_time = self._start
        elapsed = time.monotonic() - start_time
        if step <= start_step or elapsed <= 0 or step >= self.total_steps:
            return None
        seconds = (self.total_steps - step) * elapsed / (step - start_step)
        return str(datetime.timedelta(seconds=int(seconds)))
