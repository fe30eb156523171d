"""Behavioural tests for dgan.checkpoint: atomic writes under a real SIGKILL, retention, safe loading."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dgan.checkpoint import (
    BEST_JSON,
    BEST_NAME,
    SCHEMA_VERSION,
    CheckpointError,
    Checkpointer,
    load_checkpoint,
)
from dgan.config import with_legacy_defaults
from dgan.resume_state import (capture_rng_state, check_compatible, load_state_dict_strict, recipe_changes,
                               restore_rng_state)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny_state(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # populates exp_avg/exp_avg_sq so the optimizer state is non-trivial
    return model, opt, {"G": model.state_dict(), "opt_G": opt.state_dict(), "step": 7}


def _save_steps(ck: Checkpointer, steps, metrics=None) -> None:
    for i, step in enumerate(steps):
        metric = None if metrics is None else metrics[i]
        ck.save({"w": torch.full((3,), float(step))}, step=step, metadata={"world_size": 1}, metric=metric)


def test_round_trip_model_optimizer_and_metadata(tmp_path: Path) -> None:
    model, opt, state = _tiny_state()
    meta = {"config": {"model": {"encoder": "resnet18"}}, "git_hash": "abc123", "world_size": 2}
    path = Checkpointer(tmp_path).save(state, step=12, metadata=meta)
    assert path == tmp_path / "ckpt-000000012.pt"

    loaded = load_checkpoint(path)
    assert loaded["schema_version"] == SCHEMA_VERSION
    assert loaded["metadata"]["config"] == meta["config"]
    assert loaded["metadata"]["git_hash"] == "abc123" and loaded["metadata"]["step"] == 12
    assert loaded["state"]["step"] == 7
    fresh, fresh_opt, _ = _tiny_state(seed=1)
    fresh.load_state_dict(loaded["state"]["G"])
    fresh_opt.load_state_dict(loaded["state"]["opt_G"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    # No temp files are left behind by a successful save.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000012.pt"]


def test_retention_keeps_newest_and_best_min(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, keep_last=2, best_metric="fid", best_mode="min")
    _save_steps(ck, [100, 200, 300, 400, 500], metrics=[9.0, 3.0, 5.0, 4.0, 6.0])
    assert [p.name for p in ck.list()] == ["ckpt-000000400.pt", "ckpt-000000500.pt"]
    best = json.loads((tmp_path / BEST_JSON).read_text())
    assert best == {"metric": "fid", "mode": "min", "step": 200, "value": 3.0, "file": "ckpt-000000200.pt"}
    # The best survives although its regular file was pruned, and it holds step 200's tensors.
    assert not (tmp_path / "ckpt-000000200.pt").exists()
    kept = load_checkpoint(tmp_path / BEST_NAME)
    assert kept["metadata"]["step"] == 200 and torch.equal(kept["state"]["w"], torch.full((3,), 200.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt-000000400.pt", "ckpt-000000500.pt", BEST_NAME, BEST_JSON])


def test_retention_best_max_and_without_best(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path / "max", keep_last=2, best_metric="ssim", best_mode="max")
    with pytest.warns(UserWarning, match="ssim is NaN at step 4"):
        _save_steps(ck, [1, 2, 3, 4, 5], metrics=[0.2, 0.9, 0.5, float("nan"), 0.3])
    best = json.loads((tmp_path / "max" / BEST_JSON).read_text())
    assert (best["step"], best["value"], best["mode"]) == (2, 0.9, "max")
    assert load_checkpoint(tmp_path / "max" / BEST_NAME)["metadata"]["step"] == 2

    plain = Checkpointer(tmp_path / "plain", keep_last=2)
    _save_steps(plain, [1, 2, 3, 4, 5], metrics=[5.0, 4.0, 3.0, 2.0, 1.0])
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["ckpt-000000004.pt", "ckpt-000000005.pt"]


def test_best_survives_a_new_checkpointer_and_keep_last_one(tmp_path: Path) -> None:
    _save_steps(Checkpointer(tmp_path, keep_last=1, best_metric="fid"), [1, 2], metrics=[2.0, 3.0])
    # A resumed run (new instance) must compare against the stored best, not start over.
    ck = Checkpointer(tmp_path, keep_last=1, best_metric="fid")
    _save_steps(ck, [3], metrics=[2.5])
    assert [p.name for p in ck.list()] == ["ckpt-000000003.pt"]
    assert json.loads((tmp_path / BEST_JSON).read_text())["step"] == 1
    _save_steps(ck, [4], metrics=[1.0])
    assert json.loads((tmp_path / BEST_JSON).read_text())["step"] == 4
    assert load_checkpoint(tmp_path / BEST_NAME)["metadata"]["step"] == 4


def test_invalid_settings_and_unsaveable_state(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)
    with pytest.raises(CheckpointError, match="best_mode"):
        Checkpointer(tmp_path, best_mode="lowest")
    # A numpy array would save fine but never load under weights_only: refuse it at save time.
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"\['data_pos'\] is a numpy.ndarray"):
        ck.save({"data_pos": np.arange(3)}, step=1, metadata={})
    assert list(tmp_path.iterdir()) == []


_KILL_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    import dgan.checkpoint as C

    ckpt_dir, ready, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    ck = C.Checkpointer(ckpt_dir, keep_last=3)
    ck.save({"w": torch.ones(4)}, step=1, metadata={"tag": "first"})

    def park():
        ready.write_text("ready")
        time.sleep(600)  # the parent SIGKILLs us here

    class PausingFile:
        # Forwards to the real temp file and parks once ~100 MB of the payload are on disk.
        def __init__(self, f):
            self.f, self.written = f, 0
        def write(self, data):
            n = self.f.write(data)
            self.written += memoryview(data).nbytes
            if self.written > 100_000_000:
                self.f.flush(); os.fsync(self.f.fileno()); park()
            return n
        def __getattr__(self, name):
            return getattr(self.f, name)

    if mode == "mid-write":
        real_save = torch.save
        torch.save = lambda obj, f, *a, **k: real_save(obj, PausingFile(f), *a, **k)
    else:  # complete and fsynced temp file, killed just before the rename
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith("ckpt-000000002.pt"):
                park()
            return real_replace(src, dst)
        os.replace = replace
    big = {f"t{i}": torch.zeros(12_500_000) for i in range(4)}  # 4 x 50 MB float32 = 200 MB
    ck.save(big, step=2, metadata={"tag": "second"})
    print("save returned; the test failed to interrupt it", flush=True)
""")


@pytest.mark.parametrize("mode", ["mid-write", "before-replace"])
def test_sigkill_during_save_leaves_previous_checkpoint_usable(tmp_path: Path, mode: str) -> None:
    script, ready, ckpt_dir = tmp_path / "child.py", tmp_path / "ready", tmp_path / "ckpt"
    script.write_text(_KILL_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, str(script), str(ckpt_dir), str(ready), mode], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "child never reached the kill point"
            time.sleep(0.05)
        temps = [p for p in ckpt_dir.iterdir() if p.name.startswith(".ckpt-000000002.pt.tmp-")]
        assert len(temps) == 1 and temps[0].stat().st_size > 100_000_000  # really killed mid-save
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    ck = Checkpointer(ckpt_dir, keep_last=3)
    assert not (ckpt_dir / "ckpt-000000002.pt").exists()
    assert ck.list() == [ckpt_dir / "ckpt-000000001.pt"]
    assert ck.latest_valid() == ckpt_dir / "ckpt-000000001.pt"
    assert load_checkpoint(ck.latest_valid())["metadata"]["tag"] == "first"
    # The next save sweeps the killed writer's temp file away.
    ck.save({"w": torch.zeros(1)}, step=3, metadata={})
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["ckpt-000000001.pt", "ckpt-000000003.pt"]


def test_truncated_newest_is_skipped_with_warning_not_deleted(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, keep_last=5)
    _save_steps(ck, [10, 20])
    newest = tmp_path / "ckpt-000000020.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="ckpt-000000020.pt"):
        assert ck.latest_valid() == tmp_path / "ckpt-000000010.pt"
    assert newest.exists()
    with pytest.raises(CheckpointError, match=r"ckpt-000000020\.pt is truncated or corrupt.*pass another checkpoint") as info:
        load_checkpoint(newest)
    assert "\n" not in str(info.value)
    newest.write_bytes(b"")  # a zero-byte file (killed before the first write) is also just skipped
    with pytest.warns(UserWarning, match="ckpt-000000020.pt"):
        assert ck.latest_valid() == tmp_path / "ckpt-000000010.pt"
    # Training resumes from step 10 and saves step 11: the stale, higher-numbered file is left
    # alone (with a warning) and does not push valid checkpoints out of keep_last.
    ck = Checkpointer(tmp_path, keep_last=2)
    with pytest.warns(UserWarning, match="newer than step 11"):
        _save_steps(ck, [11])
    assert [p.name for p in ck.list()] == ["ckpt-000000010.pt", "ckpt-000000011.pt", "ckpt-000000020.pt"]


class _Payload:
    """Unpickling this creates a file: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    evil = tmp_path / "ckpt-000000005.pt"
    torch.save({"schema_version": 1, "metadata": {}, "state": {"x": _Payload(marker)}}, evil)
    with pytest.raises(CheckpointError, match="was NOT loaded: it contains arbitrary code/objects"):
        load_checkpoint(evil)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="NOT loaded"):
        assert Checkpointer(tmp_path).latest_valid() is None
    assert not marker.exists()
    # Sanity check that the payload is live: an unsafe load really does run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_schema_too_new_missing_file_and_foreign_files(tmp_path: Path) -> None:
    future = tmp_path / "ckpt-000000001.pt"
    torch.save({"schema_version": SCHEMA_VERSION + 1, "metadata": {"dgan_version": "9.1.0"}, "state": {}}, future)
    with pytest.raises(CheckpointError, match=r"schema 2 but this dgan reads up to schema 1.*dgan>=9\.1\.0"):
        load_checkpoint(future)
    # Falling back to an older checkpoint past a newer-dgan one would silently throw work away.
    with pytest.raises(CheckpointError, match="dgan>=9.1.0"):
        Checkpointer(tmp_path).latest_valid()

    missing = tmp_path / "nope" / "ckpt-000000042.pt"
    with pytest.raises(CheckpointError, match=r"nope/ckpt-000000042\.pt does not exist"):
        load_checkpoint(missing)

    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, foreign)
    with pytest.raises(CheckpointError, match=r"not a dgan checkpoint.*\['weight'\]"):
        load_checkpoint(foreign)


def test_check_compatible_lists_every_mismatch() -> None:
    saved = {"model": {"encoder": "resnet34", "channels": 1, "image_size": 32, "decoder_channels": [64, 32]}}
    current = {"model": {"encoder": "resnet18", "channels": 1, "image_size": 64, "decoder_channels": (64, 32)}}
    keys = ["model.encoder", "model.channels", "model.image_size", "model.decoder_channels"]
    with pytest.raises(CheckpointError) as info:
        check_compatible(saved, current, keys)
    msg = str(info.value)
    assert "model.encoder: checkpoint has resnet34, config has resnet18" in msg
    assert "model.image_size: checkpoint has 32, config has 64" in msg
    assert "model.channels" not in msg and "model.decoder_channels" not in msg  # equal (list vs tuple)
    assert "--config runs/<run>/config.yaml" in msg and "model.encoder=resnet34 model.image_size=32" in msg
    assert "\n" not in msg
    check_compatible(saved, saved, keys)  # identical configs pass silently


def test_recipe_changes_names_each_changed_recipe_key_but_not_run_control() -> None:
    # a checkpoint from before gan.fakes existed: it meant recon, and the current default is samples
    saved = with_legacy_defaults({"gan": {"adv_weight": 0.3},
                                  "train": {"total_kimg": 10, "lr_g": 1e-3, "betas_g": [0.9, 0.999]}})
    current = {"gan": {"adv_weight": 0.3, "fakes": "samples", "sigma": 0.05},
               "train": {"total_kimg": 20, "lr_g": 5e-4, "betas_g": (0.9, 0.999)}, "log": {"every_steps": 5}}
    assert recipe_changes(saved, current) == ["gan.fakes=recon (now samples)", "train.lr_g=0.001 (now 0.0005)"]
    assert recipe_changes(saved, saved) == []


def test_load_state_dict_strict_names_component_and_file(tmp_path: Path) -> None:
    good = nn.Linear(4, 3)
    load_state_dict_strict(nn.Linear(4, 3), good.state_dict(), "generator", tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(nn.Linear(4, 2), good.state_dict(), "generator", tmp_path / "c.pt")
    msg = str(info.value)
    assert msg.startswith(f"generator in {tmp_path / 'c.pt'} does not fit the model")
    assert "weight is [3, 4] in the checkpoint but [2, 4] in the model" in msg and "\n" not in msg
    wrapped = {f"module.{k}": v for k, v in good.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"discriminator .*missing keys weight, bias.*DDP/compile prefix"):
        load_state_dict_strict(nn.Linear(4, 3), wrapped, "discriminator", "d.pt")


def _draw() -> tuple:
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_rng_capture_restore_survives_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state, which must round-trip too
    saved = capture_rng_state(torch.device("cpu"))
    first = _draw()
    torch.save(saved, tmp_path / "rng.pt")
    restored = torch.load(tmp_path / "rng.pt", weights_only=True)
    _draw()  # move every generator on, so a no-op restore would fail below
    restore_rng_state(restored)
    assert _draw() == first
    # And it travels inside a full checkpoint too.
    path = Checkpointer(tmp_path / "ck").save({"rng": [saved]}, step=1, metadata={})
    restore_rng_state(load_checkpoint(path)["state"]["rng"][0])
    assert _draw() == first
