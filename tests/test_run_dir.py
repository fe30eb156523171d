"""Where a run lives (dgan/rundir.py) and the one-line errors of the CLIs (dgan/errors.py), through
the commands as a user types them. Each test here reproduces a bug of issue 11."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import TINY_TRAIN, cli_env

pytestmark = pytest.mark.slow


def run_in(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A dgan CLI run from `cwd`, as a user in that folder would."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


@pytest.fixture
def copied_run(tiny_run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny run, under tmp_path/runs/r, to resume and to break."""
    run = tmp_path / "runs" / "r"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("mlflow*", ".cache"))
    return run


def train_args(root: Path, *extra: str) -> list[str]:
    return [*TINY_TRAIN, f"log.root={root}", f"data.cache_dir={root / '.cache'}", *extra]


@pytest.mark.parametrize("target", ["checkpoints folder", "run folder", "checkpoint file"])
def test_resume_by_path_continues_in_the_run_that_owns_it(copied_run, tmp_path, target):
    # bug 1: --resume runs/X/checkpoints trained in runs/ itself; --resume runs/X wrote config.yaml to the cwd
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = sorted(p.name for p in (copied_run / "checkpoints").glob("ckpt-0*.pt"))
    path = {"checkpoints folder": copied_run / "checkpoints", "run folder": copied_run,
            "checkpoint file": copied_run / "checkpoints" / before[-1]}[target]
    r = run_in(cwd, "dgan.train", *train_args(tmp_path / "runs", "train.total_kimg=0.04"), "--resume", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    after = sorted(p.name for p in (copied_run / "checkpoints").glob("ckpt-0*.pt"))
    assert after[-1] > before[-1]  # the new checkpoints went into the run they resumed
    assert not (tmp_path / "runs" / "checkpoints").exists() and not list(cwd.iterdir())


def test_a_loose_checkpoint_continues_in_a_new_run_not_beside_the_file(copied_run, tmp_path):
    loose = tmp_path / "elsewhere" / "model.pt"
    loose.parent.mkdir()
    shutil.copy(sorted((copied_run / "checkpoints").glob("ckpt-0*.pt"))[-1], loose)
    r = run_in(tmp_path, "dgan.train", *train_args(tmp_path / "runs", "train.total_kimg=0.04", "log.run_name=cont"),
               "--resume", str(loose))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in loose.parent.iterdir()) == ["model.pt"]
    assert list((tmp_path / "runs" / "cont" / "checkpoints").glob("ckpt-0*.pt"))


def test_a_failed_resume_keeps_the_runs_config_and_writes_nothing(copied_run, tmp_path):
    # bug 2: an architecture mismatch overwrote config.yaml before failing
    config = (copied_run / "config.yaml").read_bytes()
    names = sorted(p.name for p in copied_run.rglob("*"))
    r = run_in(tmp_path, "dgan.train", *train_args(tmp_path / "runs", "model.time_dim=64"), "--resume", "auto")
    line = one_line_error(r, 1)
    assert "model.time_dim" in line and f"--config {copied_run / 'config.yaml'}" in line
    assert (copied_run / "config.yaml").read_bytes() == config
    assert sorted(p.name for p in copied_run.rglob("*")) == names


def test_a_fresh_start_never_overwrites_a_runs_checkpoints(copied_run, tmp_path):
    ckpts = {p.name: p.read_bytes() for p in (copied_run / "checkpoints").glob("*.pt")}
    line = one_line_error(run_in(tmp_path, "dgan.train", *train_args(tmp_path / "runs")), 2)
    assert "already has checkpoints" in line and "--resume auto" in line
    assert {p.name: p.read_bytes() for p in (copied_run / "checkpoints").glob("*.pt")} == ckpts


def test_a_failed_data_setup_leaves_no_run_folder(tmp_path):
    # bug 7: data that fails at build time left runs/<name>/ holding only a config.yaml (and this
    # file, not an npz at all, gave a numpy traceback)
    (tmp_path / "x.npz").write_text("not an npz")
    r = run_in(tmp_path, "dgan.train", *train_args(tmp_path / "runs", "data.source=npz",
                                                     f"data.path={tmp_path / 'x.npz'}"))
    assert "not a readable .npz" in one_line_error(r, 1)
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.parametrize("bad", ["config file", "override"])
def test_malformed_yaml_is_one_line_and_exit_2(tmp_path, bad):
    # bug 3: a PyYAML traceback and exit 1
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  encoder: [resnet18\ntrain:\n  batch_size: 4\n")
    args = ["--config", str(config)] if bad == "config file" else ["model.decoder_channels=[64,32"]
    line = one_line_error(run_in(tmp_path, "dgan.train", *args, f"log.root={tmp_path / 'runs'}"), 2)
    assert "not valid YAML" in line and "line " in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, what", [(["--n", "0"], "--n"), (["--steps", "0"], "--steps"),
                                        (["--steps", "5000"], "--steps 5000"), (["--eta", "2"], "--eta")])
def test_sample_rejects_impossible_counts_in_one_line(tiny_run_dir, tmp_path, args, what):
    # bug 4: tracebacks
    ckpt = sorted((tiny_run_dir / "checkpoints").glob("ckpt-0*.pt"))[-1]
    r = run_in(tmp_path, "dgan.sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), *args)
    assert what in one_line_error(r, 2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module, extra", [("dgan.sample", []), ("dgan.evaluate", ["--psnr"])])
def test_a_corrupt_checkpoint_error_names_only_options_the_command_has(tmp_path, module, extra):
    # bug 6: "pass --resume auto", an option neither command has
    bad = tmp_path / "checkpoints" / "ckpt-000000005.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 truncated")
    line = one_line_error(run_in(tmp_path, module, "--checkpoint", str(bad), *extra, "--out", str(tmp_path / "o")), 1)
    assert "corrupt" in line and "--resume" not in line


def test_a_signal_during_the_periodic_evaluation_saves_within_seconds(tmp_path):
    # bug 5: the signal was acted on only after the evaluation ended (minutes on a CPU)
    import signal
    import time

    from dgan.metrics import build_tiny_extractor

    extractor = build_tiny_extractor(tmp_path / "tiny.pt", channels=1, dim=16)
    # 2000 samples x 100 steps: this evaluation alone takes minutes on 2 cores
    args = train_args(tmp_path / "runs", "train.total_kimg=0.04", "eval.every_kimg=0.02", "eval.num_samples=2000",
                      "eval.steps=100", "eval.metrics=[fid]", f"eval.feature_extractor={extractor}")
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dgan.train", *args], cwd=tmp_path, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            for line in proc.stdout:
                if line.startswith("evaluating at step"):
                    break
            time.sleep(1.0)  # well inside the evaluation's sampling
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            seconds = time.monotonic() - sent
        finally:
            proc.kill()
    assert code == 75, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert seconds < 10, seconds
    assert (tmp_path / "runs" / "r" / "checkpoints" / "ckpt-000000005.pt").is_file()


def test_two_trainings_in_one_run_dir_are_refused(tmp_path):
    # bug 7: two trainings with one log.run_name both wrote into the run dir, with no lock and no warning
    import time

    args = train_args(tmp_path / "runs", "train.total_kimg=50")  # long enough to be running
    with open(tmp_path / "first.txt", "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "dgan.train", *args], cwd=tmp_path, env=cli_env(),
                                 stdout=out, stderr=subprocess.STDOUT)
        try:
            config = tmp_path / "runs" / "r" / "config.yaml"
            deadline = time.monotonic() + 120
            while not config.exists() and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert config.exists(), (tmp_path / "first.txt").read_text()[-3000:]
            written = config.read_bytes()
            second = run_in(tmp_path, "dgan.train", *args[:-1], "train.total_kimg=0.02", "train.lr_g=0.0005")
            line = one_line_error(second, 2)
            assert "in use by another training" in line and f"pid {first.pid}" in line
            assert config.read_bytes() == written  # the running run's config.yaml is untouched
        finally:
            first.kill()
            first.wait()


def test_a_rank0_error_in_evaluate_reaches_every_rank(tmp_path):
    # bug 7: with several ranks, an exception in rank-0-only work left the other ranks waiting
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dgan.evaluate",
           "--psnr", "--checkpoint", str(tmp_path / "no-such.pt"), "--no-mlflow",
           "--out", str(tmp_path / "e.json")]
    r = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    # found on rank 0, said by both ranks (their lines may interleave), and neither was killed
    assert r.stderr.count("dgan.evaluate: error: --checkpoint") == 2 and "no-such.pt" in r.stderr, r.stderr[-3000:]
