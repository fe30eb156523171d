"""Distributed training with real `torchrun --nproc_per_node=2` (gloo, CPU), run as users run it.

Each torchrun launch costs ~10 s of start-up on 2 cores, so the tests are few and each
checks several things: rank agreement (tests/ddp_worker.py), exact resume (1 and 2 ranks), a
2 -> 1 world-size change, preemption with grad accumulation, a SIGKILL mid-checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cli_helpers import REPO, TINY_RUN, cli_env, run_cli, start_cli

from dgan import distributed as dist
from dgan.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane

SIGNALS = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def torchrun(nproc: int, *args: str) -> list[str]:
    # --standalone: a local rendezvous on a free port, so tests never collide on 29500
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def train_cmd(nproc: int, root: Path, *args: str, launcher: tuple[str, ...] = ()) -> list[str]:
    cli = ["-m", "dgan.train", *TINY_RUN, f"log.root={root}", f"data.cache_dir={root / '.cache'}", *args]
    return torchrun(nproc, *launcher, *cli) if nproc > 1 else [sys.executable, *cli]


def run(cmd: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    r = run_cli(cmd, timeout=timeout)  # one thread per rank: 2 ranks on 2 cores, no oversubscription
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def ckpts(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("ckpt-0*.pt"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


# ----------------------------------------------------------------------------------------
# 1 + 5 + 7: the ranks agree (G, D, EMA, p/T_adapt) with and without accumulation


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One log.root for all launches: the data cache and the MLflow store are made once."""
    return tmp_path_factory.mktemp("ddp")


def test_ranks_stay_identical_and_agree_to_stop(root, tmp_path):
    # adv_t_max pinned: "r_d != 0" below is a proxy for "the controller ran" that fails when the last
    # window's 64 patch signs happen to cancel; with the default (100) fakes are rarely kept in
    # 6 tiny steps, D's real logits hover at 0, and seed 0 lands on exactly that.
    # R1 is off by default (gan.r1_gamma): switched on here so that its double backward runs under DDP
    base = TINY_RUN + [f"data.cache_dir={root / '.cache'}", "gan.r1_every=2", "gan.r1_gamma=0.05",
                   "gan.ada_interval=2", "gan.ada_kimg=0.1", "gan.ada_target=0.0", "gan.adv_t_max=400",
                   "gan.fakes=recon"]
    spec = {"plain": base,
            # accumulation (no_sync), BatchNorm buffers (broadcast per step) and channels_last inputs
            "accum": base + ["train.grad_accum=2", "model.norm=batch", "model.channels_last=true"],
            # a NaN image on rank 1 alone at step 2: all ranks skip that step, and only that one
            "nan": base + ["poison_rank1_step=2"],
            # G's own samples as D's fakes: a no-grad chain on the plain module, then one DDP forward; lazy,
            # so on steps 1, 3 and 5 no rank runs D
            "samples": base + ["gan.fakes=samples", "gan.self_fakes=2", "gan.self_fake_steps=3",
                               "gan.self_fake_every=2"]}
    r = run(torchrun(2, str(REPO / "tests" / "ddp_worker.py"), str(tmp_path), "6", json.dumps(spec)))
    for name in spec:
        r0, r1 = (torch.load(tmp_path / f"{name}-rank{k}.pt", weights_only=True) for k in (0, 1))
        assert r0["wrapped"] == "DistributedDataParallel", name
        assert not torch.equal(r0["first_x"], r1["first_x"]), f"{name}: ranks must see different data"
        for part in ("G", "D", "ema"):  # bitwise: every rank applied the same all-reduced gradients
            assert r0[part].keys() == r1[part].keys()
            for k in r0[part]:
                assert torch.equal(r0[part][k], r1[part][k]), f"{name}: {part}.{k} differs between ranks"
        assert r0["ada"] == r1["ada"], name
        # r_d is a mean over BOTH ranks' reals (each rank alone would see another value)
        assert r0["ada"]["r_d"] != 0, f"{name}: adaptive T was never updated"
        assert max_diff(r0["init_G"], r0["G"]) > 1e-4, f"{name}: G did not train"
        assert r0["skipped"] == r1["skipped"] == ([0, 0, 1, 0, 0, 0] if name == "nan" else [0] * 6), name
        # one optimizer step per step, accumulation or not; a skipped step is not counted
        assert r0["opt_g_steps"] == r1["opt_g_steps"] == [6 - sum(r0["skipped"])], name
    accum = torch.load(tmp_path / "accum-rank0.pt", weights_only=True)
    assert accum["images_seen"] == 6 * 4 * 2 * 2  # global batch = batch x ranks x accum
    assert all(accum["channels_last"]), "inputs must be channels_last when the model is"
    assert any(k.endswith("running_mean") for k in accum["G"]), "norm=batch should give G BatchNorm buffers"
    stops = [json.loads((tmp_path / f"stop-rank{k}.json").read_text()) for k in (0, 1)]
    assert stops == [{"local": False, "agreed": True}, {"local": True, "agreed": True}], r.stderr[-2000:]


# ----------------------------------------------------------------------------------------
# 2: exact resume, in one process and with 2 ranks


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_is_exact(root, nproc):
    """2N steps straight == N, stop, --resume auto to 2N (G, D, EMA to 1e-6), as one process (a world
    of one: no process group) and as 2 ranks under torchrun.

    The stop falls mid-epoch (16 batches per epoch for one rank, 8 per rank for two), between
    adaptive-T updates (every 3 steps: a partial r_d window per rank) and between R1 steps (every 4).
    """
    # lr_decay_kimg: the split run's first half stops through a shorter total_kimg, which would
    # otherwise be a shorter cosine horizon; pinned, both runs follow the same lr curve.
    common = ["gan.ada_interval=3", "gan.r1_every=4", "gan.r1_gamma=0.05", "gan.ada_kimg=0.05",
              "train.lr_decay_kimg=0.08"]
    straight, split = f"straight{nproc}", f"split{nproc}"
    half = 40 // (4 * nproc)  # steps in 0.04 kimg at 4 images per rank
    run(train_cmd(nproc, root, f"log.run_name={straight}", "train.total_kimg=0.08", *common))
    run(train_cmd(nproc, root, f"log.run_name={split}", "train.total_kimg=0.04", *common))
    b2 = run(train_cmd(nproc, root, f"log.run_name={split}", "train.total_kimg=0.08", "--resume", "auto", *common))
    assert f"at step {half} (40 images seen)" in b2.stdout
    assert f"data position: epoch 0, batch {half} of {64 // (4 * nproc)}" in b2.stdout
    sa, sb = (load_checkpoint(ckpts(root / n)[-1])["state"] for n in (straight, split))
    assert sa["trainer"]["step"] == sb["trainer"]["step"] == 2 * half
    for part in ("G", "D", "ema"):
        assert max_diff(sa[part], sb[part]) <= 1e-6, part
    assert sa["ada"] == sb["ada"] and sa["opt_g"]["state"][0]["step"] == sb["opt_g"]["state"][0]["step"]
    first = load_checkpoint(ckpts(root / split)[0])
    assert first["metadata"]["world_size"] == nproc and len(first["state"]["per_rank"]) == nproc
    assert max_diff(first["state"]["G"], sa["G"]) > 1e-4  # training moved the weights: not vacuous


# ----------------------------------------------------------------------------------------
# 4 + 5 + 6 (+3): preemption through the torchrun agent with gradient accumulation, a relaunch,
# a SIGKILL of rank 0 mid-checkpoint, and a 1-process relaunch from the last complete one


def read_until(proc: subprocess.Popen, marker: str) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            break
    return "".join(seen)


def preempt_with_sigusr1(root: Path) -> tuple[int, str]:
    """Launch 2 ranks, SIGUSR1 the torchrun agent once steps run; (step they stopped at, output)."""
    cmd = train_cmd(2, root, "log.run_name=pre", "train.total_kimg=100", "log.every_steps=1", "train.grad_accum=2",
                    launcher=(SIGNALS, "--shutdown-timeout=60"))
    proc = start_cli(cmd)
    try:
        head = read_until(proc, "step 3/")  # steps are really being taken
        proc.send_signal(signal.SIGUSR1)  # to the agent, as slurm/train.sh's trap does
        out = head + proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    # torchrun itself exits 1 after a handled signal; the workers' own codes are what count
    stopped = [line for line in out.splitlines() if "stopped at step" in line and "exit code" in line]
    assert len(stopped) == 2, out[-4000:]
    assert {line.split("]")[0] for line in stopped} == {"[rank 0", "[rank 1"}
    assert all(line.endswith("exit code 75") for line in stopped), stopped
    steps = {int(line.split("stopped at step ")[1].split()[0]) for line in stopped}
    assert len(steps) == 1, f"ranks stopped at different steps: {stopped}"
    return steps.pop(), out


def kill_rank0_during_a_checkpoint_write(proc: subprocess.Popen, ckpt_dir: Path, after_step: int) -> int:
    """SIGKILL the rank writing a checkpoint newer than `after_step`, mid-write; that step."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for tmp in ckpt_dir.glob(".ckpt-0*.tmp-*"):  # .ckpt-{step}.pt.tmp-{writer pid}-{hex}
            step, pid = int(tmp.name.split("-")[1].split(".")[0]), int(tmp.name.split("-")[2])
            if step <= after_step:
                continue
            os.kill(pid, signal.SIGSTOP)  # freeze the writer, then check it really is mid-write
            if tmp.exists():
                os.kill(pid, signal.SIGKILL)
                return step
            os.kill(pid, signal.SIGCONT)  # the write finished under our feet: take the next one
        time.sleep(0.0005)
    raise AssertionError("never caught rank 0 in a checkpoint write")


def test_preempt_relaunch_sigkill_mid_checkpoint_and_resume_on_one_rank(root):
    step, _ = preempt_with_sigusr1(root)
    ckpt_dir = root / "pre" / "checkpoints"
    assert ckpts(root / "pre")[-1].name == f"ckpt-{step:09d}.pt"  # saved at the step all ranks stopped at
    assert 3 <= step < 100
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (mrun,) = client.search_runs(client.get_experiment_by_name("dgan").experiment_id,
                                 filter_string="tags.mlflow.runName = 'pre'")
    assert mrun.data.params["global_batch"] == "16" and mrun.data.params["world_size"] == "2"

    # relaunch (2 ranks, a checkpoint every step); SIGKILL rank 0 while it writes one
    log = root / "relaunch.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(train_cmd(2, root, "log.run_name=pre", "train.total_kimg=100", "train.grad_accum=2",
                                          "train.ckpt_every_kimg=0.016", "train.keep_last=100", "--resume", "auto"),
                                stdout=f, stderr=subprocess.STDOUT, env=cli_env(), cwd=REPO)
        try:
            killed = kill_rank0_during_a_checkpoint_write(proc, ckpt_dir, after_step=step + 1)
            assert proc.wait(timeout=120) != 0  # torchrun notices the dead worker and stops the other
        finally:
            proc.kill()
    assert f"at step {step} ({step * 16} images seen)" in log.read_text()
    assert not (ckpt_dir / f"ckpt-{killed:09d}.pt").exists() and list(ckpt_dir.glob(".ckpt-*.tmp-*"))

    # one plain process continues from the newest complete checkpoint: a 2 -> 1 world-size change
    r = run(train_cmd(1, root, "log.run_name=pre", f"train.total_kimg={((killed - 1) * 16 + 16) / 1000}",
                      "train.grad_accum=2", "--resume", "auto"))
    assert f"at step {killed - 1} ({(killed - 1) * 16} images seen)" in r.stdout
    assert "warning: checkpoint was written with world size 2, now 1" in r.stdout
    epoch, batch = divmod((killed - 1) * 16 // 4, 16)  # 1 rank x batch 4: 16 batches per epoch
    assert f"data position: epoch {epoch}, batch {batch} of 16" in r.stdout
    end = load_checkpoint(ckpts(root / "pre")[-1])
    assert end["metadata"]["world_size"] == 1
    assert end["state"]["trainer"]["images_seen"] == (killed - 1) * 16 + 16  # two steps of 8 images
    # the warm-up schedule continues at the step those images make in the new world (+2 steps)
    assert end["state"]["sched_g"]["last_epoch"] == end["state"]["trainer"]["images_seen"] // 8
    assert not list(ckpt_dir.glob(".ckpt-*.tmp-*"))  # the killed writer's temp file is cleaned up


# ----------------------------------------------------------------------------------------
# 7: torch.compile wiring, and the EMA's sync-free update (in process, no launch)


@contextmanager
def world_of_one(tmp_path: Path):
    """A real gloo process group of one rank, so DDP itself (not a stand-in) can be built."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_compile_wraps_ddp_and_checkpoints_hold_the_plain_generator(tmp_path):
    """torch.compile on CPU costs ~2.5 min for 3 steps of the tiny model (inductor builds C++
    kernels), too slow for CI: we check the wiring, not compiled steps."""
    from dgan.config import load_config
    from dgan.models import Generator
    from dgan.trainer import Trainer
    cfg = load_config(None, TINY_RUN + ["model.compile=true"])
    with world_of_one(tmp_path):
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        compiled = torch.compile(ddp)
        # the accumulation switch must reach the DDP inside the compiled wrapper
        with dist.ddp_sync(compiled, sync=False):
            assert not ddp.require_backward_grad_sync
        assert ddp.require_backward_grad_sync and dist.unwrap(compiled) is ddp.module
    trainer = Trainer.build(cfg, torch.device("cpu"), data=False)
    tr = trainer.tr
    assert isinstance(tr.G, torch._dynamo.eval_frame.OptimizedModule)
    assert type(tr.G_raw) is Generator
    keys = list(trainer.components()["G"].state_dict())
    assert keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)


def test_ema_update_matches_averaged_model(tiny_overrides):
    """EMA.update skips AveragedModel.update_parameters after the first call (its per-step
    host->device copy of n_averaged is a CUDA sync); the result must be the same."""
    from torch.optim.swa_utils import AveragedModel

    from dgan.ema import EMA
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    ema = EMA(model, halflife_kimg=0.01, rampup=0.05)
    ref = AveragedModel(model, multi_avg_fn=ema._lerp, use_buffers=True)
    for i in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 1, 5, 5))  # moves the BatchNorm buffers
        ema.update(model, images_seen=16 * i, batch_images=16)
        ref.update_parameters(model)  # with the beta ema.update just set
    assert int(ema.averaged.n_averaged) == int(ref.n_averaged) == 4
    for (k, a), b in zip(ema.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
