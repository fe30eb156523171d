"""python -m dgan.distill (issue 10): the step targets, the student checkpoint and the CLIs that read it.

That the student learns is a learning test in test_learning.py (it shares that module's trained G).
"""
from __future__ import annotations

import hashlib
import math
import re
import sys

import pytest
import torch

from cli_helpers import run_cli, tiny_run
from dgan.checkpoint import load_checkpoint
from dgan.diffusion import Diffusion
from dgan.distill import grid_states, grid_tables, nested_grid, step_targets
from dgan.errors import UsageError
from dgan.generation import check_student


def test_one_ddim_step_to_the_target_lands_on_the_teachers_next_point():
    diffusion = Diffusion(num_steps=1000, spacing="quadratic")
    _, grid = nested_grid(diffusion, 50, 10)
    states = torch.randn(3, len(grid) + 1, 1, 8, 8, dtype=torch.float64).float()
    for k in range(len(grid)):
        rows, ks = torch.arange(3), torch.full((3,), k)
        x, t, target, weight = step_targets(grid_tables(diffusion, grid, states.device), states, rows, ks)
        t_next = grid[k + 1] if k + 1 < len(grid) else None
        abar = diffusion.abar_at(grid[k])
        eps = (x - math.sqrt(abar) * target) / math.sqrt(1 - abar)  # the eps DDIM derives from x0 (denoise)
        landed = diffusion.ddim_step(target, eps, grid[k], t_next)
        assert torch.allclose(landed, states[:, k + 1], atol=2e-3), k
        assert (t == grid[k]).all() and torch.allclose(weight.flatten(), torch.full((3,), 1 / (1 - abar)))


def test_the_grids_must_nest():
    diffusion = Diffusion(num_steps=1000, spacing="quadratic")
    fine, coarse = nested_grid(diffusion, 50, 10)
    assert coarse == [999, 809, 639, 489, 359, 249, 159, 89, 39, 9] and set(coarse) <= set(fine)
    with pytest.raises(UsageError, match="multiple of --steps"):
        nested_grid(diffusion, 35, 10)


def test_a_student_is_sampled_only_the_way_it_learnt():
    meta = {"student": {"steps": 10, "t_min": 0, "teacher": "ckpt-best.pt"}}
    check_student("s.pt", meta, ("ddim", 10, 0.0), None)
    check_student("s.pt", meta, ("ddim", 10, 0.0), 0)
    check_student("t.pt", {}, ("dpmpp2m", 20, 0.0), 9)  # a teacher: anything goes
    for sampling, t_min, says in ((("ddim", 50, 0.0), None, "--sampler ddim --steps 10 and no --eta"),
                                  (("dpmpp2m", 10, 0.0), None, "--sampler ddim --steps 10 and no --eta"),
                                  (("ddim", 10, 0.5), None, "--sampler ddim --steps 10 and no --eta"),
                                  (("ddim", 10, 0.0), 9, "--t-min 9: s.pt learnt the DDIM-10 grid down to t = 0"),
                                  (None, None, "use its teacher ckpt-best.pt for inpainting")):
        with pytest.raises(UsageError, match=re.escape(says)):
            check_student("s.pt", meta, sampling, t_min)


@pytest.mark.slow
def test_cli_writes_a_student_that_the_sample_cli_reads(tmp_path_factory, tmp_path):
    run = tiny_run(tmp_path_factory.getbasetemp() / "dgan-tiny-run")
    teacher = sorted((run / "checkpoints").glob("ckpt-0*.pt"))[-1]
    out = tmp_path / "student.pt"
    cmd = [sys.executable, "-m", "dgan.distill", "--checkpoint", str(teacher), "--steps", "4", "--teacher-steps", "20",
           "--trajectories", "16", "--held-out", "8", "--iters", "5", "--batch-size", "4", "--out", str(out)]
    done = run_cli(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RMS grey levels: teacher" in done.stdout and "wrote" in done.stdout
    meta = load_checkpoint(out)["metadata"]
    assert meta["student"]["steps"] == 4 and meta["student"]["teacher_steps"] == 20
    assert meta["student"]["teacher_sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert meta["config"] == load_checkpoint(teacher)["metadata"]["config"]

    before = out.read_bytes()
    again = run_cli(cmd)  # nothing already saved is overwritten
    assert again.returncode == 2 and "exists" in again.stderr and out.read_bytes() == before
    twice = run_cli([*cmd[:4], str(out), "--out", str(tmp_path / "s2" / "s.pt")])
    assert twice.returncode == 2 and "is a DDIM-4 student" in twice.stderr
    beside = run_cli([*cmd[:-2], "--out", str(run / "student.pt")])  # would write over the teacher's outputs
    assert beside.returncode == 2 and "folder of its own" in beside.stderr and not (run / "student.pt").exists()
    bad = run_cli([*cmd[:-2], "--teacher-steps", "7", "--out", str(tmp_path / "s3.pt")])
    assert bad.returncode == 2 and "multiple of --steps" in bad.stderr and not (tmp_path / "s3.pt").exists()

    sample = [sys.executable, "-m", "dgan.sample", "--checkpoint", str(out), "--n", "4", "--sampler", "ddim"]
    ok = run_cli([*sample, "--steps", "4", "--out", str(tmp_path / "s")])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(list((tmp_path / "s").glob("0*.png"))) == 4
    wrong = run_cli([*sample, "--steps", "50", "--out", str(tmp_path / "w")])
    assert wrong.returncode == 2 and "DDIM-4 student" in wrong.stderr and not (tmp_path / "w").exists()
    assert len(wrong.stderr.strip().splitlines()) == 1
    # reconstructions and pictures use G as a one-step denoiser, which a student no longer is
    recon = run_cli([sys.executable, "-m", "dgan.evaluate", "--checkpoint", str(out), "--psnr", "--steps", "4"])
    assert recon.returncode == 2 and "PSNR/SSIM" in recon.stderr
    pictures = run_cli([sys.executable, "-m", "dgan.visualize", "samplers", "--checkpoint", str(out),
                        "--out", str(tmp_path / "v.png")])
    assert pictures.returncode == 2 and "student" in pictures.stderr and not (tmp_path / "v.png").exists()


class _TanhDenoiser(torch.nn.Module):
    """An eps-predicting stand-in for G whose x0 is tanh(2 x): a smooth teacher inside [-1, 1]."""

    def __init__(self, diffusion: Diffusion) -> None:
        super().__init__()
        self.diffusion, self.unused = diffusion, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        abar = self.diffusion.alpha_bar[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - abar.sqrt() * torch.tanh(2 * x)) / (1 - abar).sqrt()


def test_the_samplers_ddim_on_the_targets_retraces_the_teachers_trajectory():
    """End to end through Diffusion's own DDIM (x0 clipping and all): the teacher's DDIM 50 kept on the
    10-step grid (grid_states), then a 'student' that outputs exactly step_targets, sampled with DDIM 10
    from the same noise, passes through every kept point and ends on the teacher's sample."""
    diffusion = Diffusion(num_steps=1000, spacing="quadratic")
    teacher = _TanhDenoiser(diffusion)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    states = grid_states(teacher, diffusion, x_T, 50, 10, "fp32")
    _, grid = nested_grid(diffusion, 50, 10)
    assert states.shape == (4, 11, 1, 8, 8) and torch.equal(states[:, 0], x_T)

    def student(x, t):
        k = grid.index(int(t[0]))
        target = step_targets(grid_tables(diffusion, grid, 'cpu'), states, torch.arange(4), torch.full((4,), k))[2]
        assert target.abs().max() <= 1 + 1e-4  # inside the clip: the teacher's steps average clipped x0s
        abar = diffusion.abar_at(grid[k])
        return (x - math.sqrt(abar) * target) / math.sqrt(1 - abar)

    seen = []
    end = diffusion.ddim_sample(student, x_T=x_T, steps=10, callback=lambda i, x, x0: seen.append(x))
    for k in range(1, 10):
        assert torch.allclose(seen[k - 1], states[:, k], atol=1e-4), k
    assert torch.allclose(end, states[:, -1], atol=1e-4)
