"""Rank-0 experiment tracking (MLflow); the console side is dgan/progress.py.

``Tracker`` is a thin wrapper over an MLflow run. It exists so that the training loop never has to
think about ranks, resumes or a flaky tracking store. A run that costs GPU-days must not die because
the sqlite file was locked, so every MLflow call that fails is turned into a warning that carries
the error message.

mlflow is imported lazily: non-zero ranks (and ``--help``) never pay for the
slow import, and a disabled tracker touches neither the network nor the disk.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar


# MLflow's server-side limits (mlflow.utils.validation). Values past them are
# rejected outright, which would lose the whole batch, so we truncate first.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_KEY_CHARS = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
RUN_STATUSES = ("FINISHED", "KILLED", "FAILED")
CHANGED_PARAM_TAG_PREFIX = "changed_param."

_T = TypeVar("_T")


def default_tracking_uri(root: str | Path) -> str:
    """``sqlite:///<abs root>/mlflow.db``: absolute, so every rank and node agrees."""
    db = Path(root).expanduser().resolve() / "mlflow.db"
    return "sqlite:///" + db.as_posix()


def import_mlflow() -> Any:
    """Import mlflow with its usage telemetry off unless the user chose otherwise.

    Compute nodes are offline; telemetry would only try (and fail) to reach the
    network in the background. ``setdefault`` keeps an explicit user setting.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings (or dataclasses) -> one level with dotted keys.

    ``{"gan": {"adv_weight": 0.1}}`` -> ``{"gan.adv_weight": 0.1}``. Leaves
    (including lists and empty dicts) are kept as they are.
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def clean_key(key: str) -> str:
    """Make ``key`` acceptable to MLflow as a param/metric/tag name.

    MLflow rejects characters outside ``[/\\w.\\- :]`` and names that are not
    normalised paths; one bad key would otherwise drop a whole batch.
    """
    key = re.sub(r"[^/\w.\- :]", "_", str(key))
    key = posixpath.normpath(key).lstrip("/") if key else "_"
    if key in (".", "") or key.startswith(".."):
        key = "_" + key
    return key[:MAX_KEY_CHARS]


def param_value(value: Any) -> str:
    """Stringify a param the same way every time, so resumes compare equal."""
    if isinstance(value, (list, tuple)):
        try:
            text = json.dumps(list(value))
        except TypeError:
            text = str(list(value))
    else:
        text = str(value)
    return text[:MAX_PARAM_VALUE_CHARS]


def _chunks(items: list[_T], size: int) -> Iterable[list[_T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class Tracker:
    """One MLflow run, created (or resumed) on the main rank only.

    With ``enabled=False`` every method is a no-op, ``run_id`` is None and
    mlflow is never imported. If MLflow cannot be opened at all the tracker
    warns and behaves as disabled, rather than stopping training.
    """

    def __init__(self, *, enabled: bool, root: str | Path, experiment: str, run_name: str,
                 tracking_uri: str | None = None, run_id: str | None = None) -> None:
        self.run_id: str | None = None
        self._client: Any = None
        self._params: dict[str, str] = {}   # params already on the run, to skip on resume
        self._closed = False
        if not enabled:
            return
        root = Path(root).expanduser().resolve()
        uri = tracking_uri or default_tracking_uri(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._client, self.run_id, self._params = _open_run(
                uri, root, experiment, run_name, run_id)
        except Exception as err:  # noqa: BLE001 - tracking must not stop training
            self._client, self.run_id = None, None
            _warn(f"MLflow tracking disabled: could not open run at {uri}: "
                  f"{type(err).__name__}: {err}")

    # -- public API -----------------------------------------------------------------

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log params once. On resume, identical values are skipped; a changed value
        is not re-logged (MLflow forbids it) but warned about and recorded as a tag."""
        if self._client is None:
            return
        params = {clean_key(k): param_value(v) for k, v in flatten(flat).items()}
        new = {k: v for k, v in params.items() if k not in self._params}
        changed = {k: v for k, v in params.items()
                   if k in self._params and self._params[k] != v}
        self._call("log_params", self._log_param_batch, new)
        if changed:
            self._flag_changed(changed)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step``. Names keep their '/' (MLflow groups by it)."""
        if self._client is None or not metrics:
            return
        self._call("log_metrics", self._log_metric_batch, metrics, int(step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or directory) into the run's artifact store."""
        if self._client is None:
            return
        self._call(f"log_artifact({path})", self._client.log_artifact,
                   self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._client is None or not tags:
            return
        self._call("set_tags", self._log_tag_batch, tags)

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, KILLED or FAILED). Idempotent."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        if self._client is None or self._closed:
            return
        self._closed = True
        self._call("close", self._client.set_terminated, self.run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")

    # -- internals ------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., _T], *args: Any) -> _T | None:
        """Run one MLflow operation; a failure becomes a warning with its message."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - a logging error must not kill training
            _warn(f"MLflow {what} failed for run {self.run_id}: "
                  f"{type(err).__name__}: {err}")
            return None

    def _log_param_batch(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)
            # Remember per chunk, so a later failure does not make us re-log these.
            self._params.update({p.key: p.value for p in chunk})

    def _log_metric_batch(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        items = [Metric(clean_key(k), float(v), now_ms, step) for k, v in metrics.items()]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)

    def _log_tag_batch(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(clean_key(k), str(v)[:MAX_TAG_VALUE_CHARS]) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk)

    def _flag_changed(self, changed: dict[str, str]) -> None:
        # MLflow params are immutable; keep the original and make the change visible.
        for key, value in changed.items():
            _warn(f"MLflow param {key!r} changed on resume: run {self.run_id} keeps "
                  f"{self._params[key]!r}, new value {value!r} recorded as tag "
                  f"{CHANGED_PARAM_TAG_PREFIX}{key}")
        self.set_tags({f"{CHANGED_PARAM_TAG_PREFIX}{k}": v for k, v in changed.items()})


def _open_run(uri: str, root: Path, experiment: str, run_name: str,
              run_id: str | None) -> tuple[Any, str, dict[str, str]]:
    """Return (client, run_id, params already logged), resuming ``run_id`` if given."""
    mlflow = import_mlflow()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp_id = _get_or_create_experiment(client, experiment, root)
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except mlflow.exceptions.MlflowException as err:
            _warn(f"MLflow run {run_id} not found in {uri} ({err}); starting a new run")
        else:
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            return client, run_id, dict(run.data.params)
    run = client.create_run(exp_id, run_name=run_name)
    return client, run.info.run_id, {}


def _get_or_create_experiment(client: Any, name: str, root: Path) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        # Explicit artifact location: MLflow 3 has no usable default next to a sqlite
        # store, and artifacts must sit under root on the shared filesystem.
        location = (root / "mlartifacts").resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Another job created it between our lookup and create: use theirs.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise RuntimeError(f"experiment {name!r} is deleted; restore it with "
                           f"`mlflow experiments restore` or choose another log.experiment")
    return exp.experiment_id


# ----------------------------------------------------------------------------------------
# Console progress


