"""Tracker against a real sqlite MLflow store; Progress output."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from dgan.progress import Progress
from dgan.tracking import MAX_PARAM_VALUE_CHARS, Tracker, default_tracking_uri, flatten

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "tracking-tests"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One store for the module: creating a sqlite store runs MLflow's migrations (slow).
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def client(root: Path):
    from mlflow.tracking import MlflowClient

    Tracker(enabled=True, root=root, experiment=EXPERIMENT, run_name="init").close()
    return MlflowClient(tracking_uri=default_tracking_uri(root))


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_default_tracking_uri_is_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri("runs") == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"


def test_flatten_nested_dicts() -> None:
    flat = flatten({"gan": {"adv_weight": 0.1, "r1": {"gamma": 1}}, "seed": 0, "empty": {}})
    assert flat == {"gan.adv_weight": 0.1, "gan.r1.gamma": 1, "seed": 0, "empty": {}}


def test_params_metrics_artifact_tags_land(root: Path, client, tmp_path: Path) -> None:
    tracker = Tracker(enabled=True, root=root, experiment=EXPERIMENT, run_name="land")
    tracker.log_params({"gan": {"adv_weight": 0.1}, "model": {"decoder_channels": [128, 64]},
                        "notes": "x" * (MAX_PARAM_VALUE_CHARS + 500)})
    for step in (0, 25, 50):
        tracker.log_metrics({"L_diff": 1.0 / (step + 1), "loss/G": float(step)}, step=step)
    note = tmp_path / "samples.txt"
    note.write_text("grid")
    tracker.log_artifact(note, artifact_path="samples")
    tracker.set_tags({"git": "abc123", "world_size": 4})
    tracker.close()

    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "land" and run.info.status == "FINISHED"
    assert run.data.params["gan.adv_weight"] == "0.1"
    assert run.data.params["model.decoder_channels"] == "[128, 64]"
    assert len(run.data.params["notes"]) == MAX_PARAM_VALUE_CHARS
    assert _history(client, tracker.run_id, "loss/G") == [(0, 0.0), (25, 25.0), (50, 50.0)]
    assert run.data.metrics["L_diff"] == pytest.approx(1 / 51)
    assert run.data.tags["git"] == "abc123" and run.data.tags["world_size"] == "4"
    assert [a.path for a in client.list_artifacts(tracker.run_id, "samples")] == \
        ["samples/samples.txt"]
    stored = list((root / "mlartifacts").rglob("samples.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "grid"


def test_resume_appends_to_same_run(root: Path, client) -> None:
    first = Tracker(enabled=True, root=root, experiment=EXPERIMENT, run_name="resume")
    first.log_params({"train": {"lr": 1e-4, "batch_size": 32}})
    first.log_metrics({"L_diff": 0.5}, step=0)
    first.log_metrics({"L_diff": 0.4}, step=10)
    first.close("KILLED")   # preempted job

    second = Tracker(enabled=True, root=root, experiment=EXPERIMENT, run_name="resume",
                     run_id=first.run_id)
    assert second.run_id == first.run_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # identical params must be skipped silently
        second.log_params({"train": {"lr": 1e-4, "batch_size": 32}})
    with pytest.warns(RuntimeWarning, match="train.batch_size"):
        second.log_params({"train": {"lr": 1e-4, "batch_size": 64}})
    second.log_metrics({"L_diff": 0.3}, step=20)
    second.close()

    run = client.get_run(first.run_id)
    assert _history(client, first.run_id, "L_diff") == [(0, 0.5), (10, 0.4), (20, 0.3)]
    assert run.data.params["train.batch_size"] == "32"      # MLflow params are immutable
    assert run.data.tags["changed_param.train.batch_size"] == "64"
    assert run.info.status == "FINISHED"
    names = [r.info.run_name for r in client.search_runs([run.info.experiment_id])]
    assert names.count("resume") == 1


def test_resume_with_unknown_run_id_starts_a_new_run(root: Path, client) -> None:
    missing = "0" * 32
    with pytest.warns(RuntimeWarning, match="not found"):
        tracker = Tracker(enabled=True, root=root, experiment=EXPERIMENT, run_name="fresh",
                          run_id=missing)
    assert tracker.run_id not in (None, missing)
    tracker.close()
    assert client.get_run(tracker.run_id).info.run_name == "fresh"


def test_mlflow_failure_warns_instead_of_raising(root: Path, client, tmp_path: Path) -> None:
    tracker = Tracker(enabled=True, root=root, experiment=EXPERIMENT, run_name="fails")
    missing = tmp_path / "not-there.png"
    with pytest.warns(RuntimeWarning, match="not-there.png"):
        tracker.log_artifact(missing)
    with pytest.warns(RuntimeWarning, match="log_metrics failed"):
        tracker.log_metrics({"L_diff": "not a number"}, step=1)  # type: ignore[dict-item]
    tracker.log_metrics({"L_diff": 0.2}, step=2)   # still usable afterwards
    tracker.close()
    assert _history(client, tracker.run_id, "L_diff") == [(2, 0.2)]


def test_unopenable_store_warns_and_disables(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="tracking disabled"):
        tracker = Tracker(enabled=True, root=blocker / "runs", experiment="x", run_name="y")
    assert tracker.run_id is None
    tracker.log_metrics({"a": 1.0}, step=0)
    tracker.close()


def test_disabled_tracker_creates_nothing_and_never_imports_mlflow(tmp_path: Path) -> None:
    # A fresh interpreter: this test process has mlflow imported already.
    code = (
        "import sys\n"
        "from dgan.tracking import Tracker\n"
        f"t = Tracker(enabled=False, root={str(tmp_path / 'off')!r}, experiment='e',"
        " run_name='r')\n"
        "t.log_params({'a': {'b': 1}}); t.log_metrics({'x': 1.0}, step=0)\n"
        "t.log_artifact('nope'); t.set_tags({'k': 'v'}); t.close()\n"
        "assert t.run_id is None\n"
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_status_line_contains_every_key() -> None:
    progress = Progress(total_steps=5000, start_step=0, enabled=True, keys=["L_diff", "L_D"])
    metrics = {"kimg": 38.4, "img/s": 210.3, "L_diff": 0.0412, "L_D": 1.25, "ada/p": 0.02,
               "T_adapt": 30.0}
    line = progress.status_line(1200, metrics)
    assert line.startswith("step 1200/5000 kimg 38.4 img/s 210.3 L_diff 0.0412 L_D 1.25")
    for key in metrics:
        assert f" {key} " in line
    assert "\n" not in line


def test_progress_prints_one_line_per_call_on_a_file() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=40)  # narrow: must not wrap
    with Progress(total_steps=100, start_step=10, enabled=True, keys=["L_diff"],
                  images_per_step=64, console=console) as progress:
        progress.advance(11)                        # no metrics: nothing printed
        progress.advance(20, {"L_diff": 0.25, "L_G/adv": 0.7})
        progress.advance(30, {"L_diff": 0.125, "L_G/adv": 0.6})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step 20/100 kimg 1.28 img/s ")
    assert "L_diff 0.125 L_G/adv 0.6" in lines[1] and "eta " in lines[1]


def test_disabled_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(total_steps=10, start_step=0, enabled=False, keys=["L_diff"]) as progress:
        progress.advance(5, {"L_diff": 0.1})
    assert capsys.readouterr() == ("", "")


def test_live_bar_on_a_terminal_shows_metrics() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160)
    with Progress(total_steps=100, start_step=0, enabled=True, keys=["L_diff"],
                  console=console) as progress:
        progress.advance(50, {"L_diff": 0.0412, "img/s": 99.0})
    out = buf.getvalue()
    assert "step 50/100" in out and "L_diff 0.0412" in out and "img/s 99" in out
