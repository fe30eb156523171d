"""dgan.compare against a real sqlite MLflow store written through Tracker."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dgan.compare import compare_runs, differing_params, main, summarize
from dgan.tracking import Tracker, default_tracking_uri

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "compare-tests"
SHARED = {"model": {"encoder": "resnet18", "image_size": 32}, "train": {"lr": 2e-4}}
# fid per step: under 'min' run-a wins (20 < 24), under 'max' run-b wins (50 > 30).
FID = {"run-a": [30.0, 20.0, 22.0], "run-b": [50.0, 25.0, 24.0]}
ADV = {"run-a": 0.1, "run-b": 0.0}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "dgan.compare", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for name in ("run-a", "run-b"):
        tracker = Tracker(enabled=True, root=root, experiment=EXPERIMENT, run_name=name)
        tracker.log_params({**SHARED, "gan": {"adv_weight": ADV[name]},
                            "run_dir": str(root / name)})
        for i, fid in enumerate(FID[name]):
            step = 100 * (i + 1)
            tracker.log_metrics({"fid": fid, "L_diff": 0.5 / (i + 1)}, step=step)
        tracker.log_metrics({"L_diff": 0.1}, step=350)   # last step has no fid
        tracker.close()
    return root


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {row["run_name"]: row for row in rows}


def test_summarize_ignores_nan_for_best() -> None:
    stat = summarize([(1, 3.0), (2, float("nan")), (3, 2.0), (4, 5.0)], "min")
    assert (stat["final"], stat["best"], stat["best_step"]) == (5.0, 2.0, 3)
    assert summarize([(1, 3.0), (4, 5.0)], "max")["best"] == 5.0


def test_differing_params_treats_absent_as_different() -> None:
    params = [{"a": "1", "b": "x", "run_dir": "/r1"}, {"a": "1", "b": "y", "run_dir": "/r2"},
              {"a": "1", "c": "z"}]
    assert differing_params(params) == ["b", "c"]


def test_compare_lists_only_differing_params(store: Path) -> None:
    rows = compare_runs(default_tracking_uri(store), EXPERIMENT, "fid", "min")
    assert sorted(r["run_name"] for r in rows) == ["run-a", "run-b"]
    for row in rows:
        assert list(row["params"]) == ["gan.adv_weight"]
    named = _by_name(rows)
    assert named["run-a"]["params"]["gan.adv_weight"] == "0.1"
    assert named["run-b"]["params"]["gan.adv_weight"] == "0.0"
    assert named["run-a"]["checkpoint"] == str(store / "run-a")
    assert named["run-a"]["status"] == "FINISHED"
    assert named["run-a"]["steps"] == 350


def test_compare_best_and_final_min(store: Path) -> None:
    rows = compare_runs(default_tracking_uri(store), EXPERIMENT, "fid", "min")
    assert [r["run_name"] for r in rows] == ["run-a", "run-b"]
    fid = {r["run_name"]: r["metrics"]["fid"] for r in rows}
    assert (fid["run-a"]["final"], fid["run-a"]["best"], fid["run-a"]["best_step"]) == \
        (22.0, 20.0, 200)
    assert (fid["run-b"]["final"], fid["run-b"]["best"]) == (24.0, 24.0)
    l_diff = rows[0]["metrics"]["L_diff"]
    assert (l_diff["final"], l_diff["best"]) == (pytest.approx(0.1), pytest.approx(0.1))
    assert [s for s, _ in l_diff["history"]] == [100, 200, 300, 350]


def test_compare_best_and_final_max(store: Path) -> None:
    rows = compare_runs(default_tracking_uri(store), EXPERIMENT, "fid", "max")
    assert [r["run_name"] for r in rows] == ["run-b", "run-a"]
    assert [r["best"] for r in rows] == [50.0, 30.0]
    assert [r["metrics"]["fid"]["final"] for r in rows] == [24.0, 22.0]


def test_compare_selects_runs_by_name_or_id(store: Path) -> None:
    uri = default_tracking_uri(store)
    run_b_id = _by_name(compare_runs(uri, EXPERIMENT, "fid", "min"))["run-b"]["run_id"]
    rows = compare_runs(uri, EXPERIMENT, "fid", "min", runs=[run_b_id])
    assert [r["run_name"] for r in rows] == ["run-b"]
    assert rows[0]["params"] == {}     # one run: nothing differs
    rows = compare_runs(uri, EXPERIMENT, "fid", "min", runs=["run-a"])
    assert [r["run_name"] for r in rows] == ["run-a"]


def test_cli_table_and_plot(store: Path) -> None:
    out = store / "cmp.png"
    proc = _cli("--root", str(store), "--experiment", EXPERIMENT, "--metric", "fid",
                "--plot", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "run-a" in proc.stdout and "run-b" in proc.stdout
    assert "gan.adv_weight" in proc.stdout and "model.encoder" not in proc.stdout
    assert out.is_file() and out.stat().st_size > 10_000
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width >= 600 and img.height >= 300
        # Not a blank canvas: curves and text give many distinct colours.
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


def test_cli_without_store_fails_in_one_line(tmp_path: Path) -> None:
    proc = _cli("--root", str(tmp_path / "nowhere"), "--experiment", EXPERIMENT)
    assert proc.returncode != 0
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert str(tmp_path / "nowhere" / "mlflow.db") in message
    assert "--root" in message and "--tracking-uri" in message
    assert not (tmp_path / "nowhere").exists()   # no empty store created as a side effect


def test_unknown_experiment_and_run_are_one_line_errors(
        store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process main(): the subprocess path is covered above, and mlflow imports are slow.
    assert main(["--root", str(store), "--experiment", "nope"]) != 0
    err = capsys.readouterr().err.strip()
    assert EXPERIMENT in err and len(err.splitlines()) == 1
    assert main(["--root", str(store), "--experiment", EXPERIMENT, "--runs", "run-zzz"]) != 0
    assert "run-zzz" in capsys.readouterr().err
