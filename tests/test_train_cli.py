"""python -m dgan.train end to end, in subprocesses, exactly as the README shows it."""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import TINY_RUN, run_cli, start_cli

from dgan.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane



def run_train(root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dgan.train", *TINY_RUN, f"log.root={root}",
           f"data.cache_dir={root / '.cache'}", *args]
    return run_cli(cmd, timeout=timeout)


def test_quick_start_leaves_a_complete_run_dir(tmp_path):
    r = run_train(tmp_path, "log.run_name=qs", "train.total_kimg=0.04")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "qs"
    assert (run / "config.yaml").is_file()
    assert list((run / "checkpoints").glob("ckpt-000000010.pt"))
    assert (run / "samples.png").stat().st_size > 100
    # the MLflow run: params, metrics over time, the grid and the config as artifacts
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mrun,) = client.search_runs(client.get_experiment_by_name("dgan").experiment_id)
    assert mrun.data.params["gan.adv_weight"] == "0.3"
    assert mrun.data.params["data.manifest_hash"]
    hist = client.get_metric_history(mrun.info.run_id, "L_diff")
    assert [m.step for m in hist] == [5, 10]
    arts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert "config.yaml" in arts and "samples" in arts
    for key in ("L_diff", "L_adv", "L_D", "r_d", "T_adapt", "img/s"):
        assert key in r.stdout, key  # the status line carries the MLflow keys


# The SIGINT relaunch also lowers lr_g: a resume may change the recipe, and says so in one line.
@pytest.mark.parametrize("sig, code, change", [(signal.SIGUSR1, 75, ()), (signal.SIGINT, 130, ("train.lr_g=0.0005",))])
def test_signal_saves_a_checkpoint_and_exits_with_the_documented_code(tmp_path, sig, code, change):
    cmd = [sys.executable, "-m", "dgan.train", *TINY_RUN, f"log.root={tmp_path}", "log.run_name=sig",
           f"data.cache_dir={tmp_path / '.cache'}", "train.total_kimg=100", "log.every_steps=1"]
    proc = start_cli(cmd)
    try:
        for line in proc.stdout:  # wait until steps are really being taken
            if line.startswith("step 3/"):
                break
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, out[-3000:]
    ckpts = sorted((tmp_path / "sig" / "checkpoints").glob("ckpt-0*.pt"))
    assert len(ckpts) == 1
    step = load_checkpoint(ckpts[0])["state"]["trainer"]["step"]
    assert 3 <= step < 50
    # a relaunch resumes from it
    r = run_train(tmp_path, "log.run_name=sig", f"train.total_kimg={(step + 2) * 4 / 1000}", "--resume", "auto", *change)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {step}" in r.stdout
    warnings = [line for line in r.stdout.splitlines() if "changes the checkpoint's recipe" in line]
    # a longer total_kimg is not a recipe change; the lower lr is, named with the override that undoes it
    assert warnings == ([] if not change else
                        ["warning: this resume changes the checkpoint's recipe; the checkpoint had "
                         "train.lr_g=0.001 (now 0.0005) -- pass those overrides to keep its recipe"]), r.stdout[-2000:]


def test_bad_checkpoint_architecture_is_a_one_line_error(tmp_path):
    r = run_train(tmp_path, "log.run_name=arch", "train.total_kimg=0.008")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(tmp_path, "log.run_name=arch", "train.total_kimg=0.016", "--resume", "auto",
                  "model.decoder_channels=[64,32,16,8]")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1]
    assert "model.decoder_channels" in err and "checkpoint has" in err


def test_periodic_eval_logs_over_time_and_keeps_the_best_checkpoint(tmp_path):
    from dgan.metrics import build_tiny_extractor
    extractor = build_tiny_extractor(tmp_path / "tiny.pt", channels=1, dim=16)
    r = run_train(tmp_path, "log.run_name=ev", "train.total_kimg=0.04", "eval.every_kimg=0.02",
                  "eval.num_samples=8", "eval.steps=2", "eval.metrics=[fid,kid]", "eval.best_metric=fid",
                  f"eval.feature_extractor={extractor}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("eval at step") == 2
    ckpts = tmp_path / "ev" / "checkpoints"
    assert (ckpts / "ckpt-best.pt").is_file()
    import json
    best = json.loads((ckpts / "best.json").read_text())
    assert best["metric"] == "fid" and best["step"] in (5, 10)
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mrun,) = client.search_runs(client.get_experiment_by_name("dgan").experiment_id)
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "eval/fid")] == [5, 10]


def test_periodic_fid_without_weights_fails_before_training(tmp_path):
    cmd = [sys.executable, "-m", "dgan.train", *TINY_RUN, f"log.root={tmp_path}", "log.run_name=nofid",
           f"data.cache_dir={tmp_path / '.cache'}", "eval.every_kimg=1"]
    r = run_cli(cmd, timeout=120, TORCH_HOME=str(tmp_path / "empty-torch-home"))
    assert r.returncode == 1
    assert "weights-inception" in r.stderr and "eval.every_kimg" in r.stderr
    assert not (tmp_path / "nofid" / "checkpoints").exists()
