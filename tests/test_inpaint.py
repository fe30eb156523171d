"""RePaint inpainting (dgan.inpaint): masks, the jump schedule, the sampler moves, quality against an
analytic oracle, and the two command lines (dgan.sample --inpaint, dgan.evaluate --task inpaint)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli, tiny_run
from PIL import Image

from dgan.diffusion import Diffusion
from dgan.inpaint import inpaint, jump_schedule, masked_psnr_ssim, mean_fill, paste_hook, read_input_image
from dgan.masks import InpaintError, box_mask, brush_mask, mask_from_array

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.getbasetemp() / "dgan-tiny-run")


@pytest.fixture(scope="module")
def checkpoint(run_dir: Path) -> Path:
    return max((run_dir / "checkpoints").glob("ckpt-0*.pt"))


def _linear_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A cheap deterministic stand-in for a network (depends on x and t)."""
    return 0.3 * x + 0.002 * t.view(-1, 1, 1, 1).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def test_box_mask_is_centred_quarter_or_the_given_rectangle():
    m = box_mask(32)
    assert m.dtype == bool and m.shape == (32, 32) and m.sum() == 16 * 16
    rows, cols = np.nonzero(m)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 23, 8, 23)
    custom = box_mask((20, 30), box=(2, 5, 4, 10))
    assert custom.sum() == 40 and custom[2:6, 5:15].all()
    with pytest.raises(InpaintError, match="does not fit"):
        box_mask(32, box=(30, 0, 4, 4))


def test_brush_mask_is_seeded_non_empty_and_bounded():
    masks = [brush_mask(32, seed) for seed in range(20)]
    assert all(m.shape == (32, 32) and m.dtype == bool for m in masks)
    fractions = np.array([m.mean() for m in masks])
    # strokes stop once the drawn target (10-30%) is reached; one more stroke can overshoot a little
    assert fractions.min() >= 0.1 and fractions.max() <= 0.5, fractions
    assert np.array_equal(brush_mask(32, 7), masks[7])  # the seed alone decides
    assert len({m.tobytes() for m in masks}) == 20  # and different seeds give different strokes
    assert not any(m.all() for m in masks)
    assert brush_mask((24, 48), 3).shape == (24, 48)


def test_mask_file_rules_resize_letterbox_and_refusals():
    big = np.zeros((64, 64), np.uint8)
    big[16:48, 8:40] = 255
    m = mask_from_array(big, (32, 32), 32, "m")  # twice the image size: nearest halves it exactly
    assert np.array_equal(m, box_mask(32, box=(8, 4, 16, 16)))
    colour = np.zeros((32, 32, 4), np.uint8)
    colour[..., 3] = 255  # opaque alpha alone is not a hole
    colour[0:4, 0:4, 2] = 1  # any non-zero colour channel is
    assert mask_from_array(colour, (32, 32), 32, "m").sum() == 16
    # A portrait image is letterboxed (padded left and right); its mask, at any resolution of the same
    # aspect ratio, must land on the same pixels.
    tall = np.zeros((64, 32), np.uint8)
    tall[:, :16] = 7
    m = mask_from_array(tall, (32, 16), 32, "m")
    assert m[:, 8:16].all() and not m[:, :8].any() and not m[:, 16:].any()
    with pytest.raises(InpaintError, match="mask is 48x32 .*image is 32x32"):
        mask_from_array(np.eye(32, 48, dtype=np.uint8), (32, 32), 32, "m")
    with pytest.raises(InpaintError, match="empty"):
        mask_from_array(np.zeros((32, 32), np.uint8), (32, 32), 32, "m")
    with pytest.raises(InpaintError, match="whole image"):
        mask_from_array(np.full((32, 32), 255, np.uint8), (32, 32), 32, "m")


# --------------------------------------------------------------------------------------------------
# The schedule and the sampler moves
# --------------------------------------------------------------------------------------------------


def test_jump_schedule_exact_small_case():
    # grid 4..0 (positions 0..4, clean = 5), jumps of 2 at positions 2 and 4, each block run twice
    assert jump_schedule([4, 3, 2, 1, 0], 2, 2) == [
        (4, 3), (3, 2), (2, 4), (4, 3), (3, 2), (2, 1), (1, 0), (0, 2), (2, 1), (1, 0), (0, None)]
    assert jump_schedule([4, 3, 2, 1, 0], 2, 1) == [(4, 3), (3, 2), (2, 1), (1, 0), (0, None)]
    with pytest.raises(InpaintError, match="below the number of sampler steps"):
        jump_schedule([4, 3, 2, 1, 0], 5, 2)


def test_resampling_jumps_change_the_model_calls():
    diffusion = Diffusion(100)
    grid = diffusion.timesteps_for(10).tolist()
    seen: dict[tuple[int, int], list[int]] = {}
    for jump_length, jump_n_sample in ((1, 1), (2, 3), (5, 4)):
        calls = seen.setdefault((jump_length, jump_n_sample), [])

        def counting(x, t, calls=calls):
            calls.append(int(t[0]))
            return _linear_fn(x, t)
        inpaint(counting, diffusion, torch.zeros(2, 1, 16, 16), box_mask(16), steps=10, jump_length=jump_length,
                jump_n_sample=jump_n_sample)
        # every block of jump_length steps that ends at a jump point runs jump_n_sample times
        jump_points = len(range(jump_length, 10, jump_length))
        assert len(calls) == 10 + (jump_n_sample - 1) * jump_length * jump_points
    assert seen[(1, 1)] == grid  # no jumps: the plain DDIM timesteps
    # jump length 2, three runs per block: t0 t1 (x3), then t2 t3 (x3), ..., and t8 t9 once at the end
    expected = [t for i in range(0, 8, 2) for t in [grid[i], grid[i + 1]] * 3] + grid[8:]
    assert seen[(2, 3)] == expected


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_no_jumps_is_the_diffusion_sampler_with_the_paste_step_hook(sampler):
    """With jump_n_sample=1, inpaint's own moves equal Diffusion's sampler with paste_hook as its
    step_hook, on the same random stream: the moves are the project's samplers, not a re-derivation."""
    diffusion = Diffusion(50)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 1, 16, 16, generator=gen) * 2 - 1
    mask = torch.from_numpy(box_mask(16)).expand(3, 1, 16, 16)
    ours = inpaint(_linear_fn, diffusion, image, mask, sampler=sampler, steps=8, jump_length=1,
                   jump_n_sample=1, seed=5)
    gen = torch.Generator().manual_seed(5)
    hook = paste_hook(diffusion, image, mask, gen)
    first_t = diffusion.num_steps - 1
    x_T = hook(torch.randn(image.shape, generator=gen), torch.full((3,), first_t))
    theirs = diffusion.sample(_linear_fn, sampler, x_T=x_T, steps=8, generator=gen, step_hook=hook)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(ours[~mask], image[~mask])  # the known region is pasted exactly at the end


# --------------------------------------------------------------------------------------------------
# Quality: an analytic oracle that knows the data distribution
# --------------------------------------------------------------------------------------------------


def _smooth_gaussian(size: int, std: float, length_px: float):
    """Covariance eigenpairs of a Gaussian random field with a squared-exponential kernel."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).double()
    cov = std ** 2 * torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * length_px ** 2))
    return torch.linalg.eigh(cov + 1e-6 * torch.eye(size * size, dtype=torch.float64))


def test_repaint_with_an_oracle_beats_the_mean_fill_and_jumps_help():
    """x0 ~ N(0, Sigma), a smooth field: the known pixels nearly determine the hole. The oracle is the
    exact E[eps | x_t] = sqrt(1 - abar) (abar Sigma + (1 - abar) I)^-1 x_t. Unconditional samples (a
    broken paste) score about 2x worse than the mean fill; real conditioning must beat it, and
    RePaint's resampling jumps must beat plain replacement, which leaves the hole inconsistent."""
    size, diffusion = 16, Diffusion(100)
    lam, vecs = _smooth_gaussian(size, std=0.3, length_px=3.0)
    alpha_bar = diffusion.alpha_bar.double()

    def oracle(x, t):
        ab = alpha_bar[t[0]]
        z = x.double().flatten(1) @ vecs / (ab * lam + 1 - ab)
        return ((z @ vecs.T) * (1 - ab).sqrt()).view_as(x).to(x.dtype)

    gen = torch.Generator().manual_seed(0)
    x0 = ((torch.randn(32, size * size, generator=gen, dtype=torch.float64) * lam.sqrt()) @ vecs.T)
    x0 = x0.view(32, 1, size, size).float()
    mask = box_mask(size)

    def hole_mse(result: torch.Tensor) -> float:
        return float(((result - x0)[:, :, torch.from_numpy(mask)] ** 2).mean())

    def repaint(m, **kw) -> float:
        return hole_mse(inpaint(oracle, diffusion, x0, m, steps=10, seed=1, **kw))

    mean_mse = hole_mse(mean_fill(x0, mask))
    plain = repaint(mask, jump_length=1, jump_n_sample=1)
    jumps = repaint(mask, jump_length=2, jump_n_sample=10)
    unconditional = repaint(np.ones_like(mask), jump_length=1, jump_n_sample=1)
    assert unconditional > 1.5 * mean_mse, (unconditional, mean_mse)
    assert jumps < 0.75 * mean_mse, (jumps, mean_mse)
    assert jumps < 0.75 * plain, (jumps, plain)


def test_masked_metrics_only_see_the_hole():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1
    mask = box_mask(32)
    known = torch.from_numpy(~mask)
    scrambled_outside = torch.where(known, -target, target)
    scores = masked_psnr_ssim(scrambled_outside, target, mask)
    assert scores["psnr"] == float("inf")  # the known region is not scored at all
    filled = mean_fill(target, mask)
    assert torch.equal(filled[:, :, known], target[:, :, known])
    baseline = masked_psnr_ssim(filled, target, mask)
    assert 0 < baseline["psnr"] < 20 and baseline["ssim"] < 0.2
    noisy = target + 0.05 * torch.randn(target.shape, generator=gen)
    better = masked_psnr_ssim(noisy, target, mask)
    assert better["psnr"] > baseline["psnr"] and better["ssim"] > baseline["ssim"]


def test_input_image_16bit_keeps_its_precision(tmp_path):
    values = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 61)
    Image.fromarray(values).save(tmp_path / "x16.png")
    x, bit_depth, original = read_input_image(tmp_path / "x16.png", channels=1, image_size=32)
    assert bit_depth == 16 and original == (32, 32) and x.shape == (1, 1, 32, 32)
    torch.testing.assert_close(x[0, 0], torch.from_numpy(values / 65535.0 * 2 - 1).float())


# --------------------------------------------------------------------------------------------------
# The command lines
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_and_mask(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    folder = tmp_path_factory.mktemp("inpaint-input")
    yy, xx = np.mgrid[0:32, 0:32]
    image = (128 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).round().astype(np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[6:20, 10:28] = 255
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "image.png", folder / "mask.png", image, mask > 0


def test_cli_inpaints_a_png_and_keeps_the_known_pixels(checkpoint, image_and_mask, tmp_path, capsys):
    image_path, mask_path, image, hole = image_and_mask
    from dgan.sample import main

    # The CLI's own main with a user's argv (in-process: the subprocess start is covered by the evaluate test)
    assert main(["--checkpoint", str(checkpoint), "--inpaint", str(image_path), "--mask", str(mask_path),
                 "--sampler", "ddim", "--steps", "6", "--jump-length", "2", "--jump-n-sample", "2", "--n", "2",
                 "--out", str(tmp_path)]) == 0
    assert "wrote 2 inpainted image(s)" in capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["inpainted-000.png", "inpainted-001.png", "input.png", "mask.png", "strip.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "mask.png")) > 0, hole)
    results = [np.asarray(Image.open(tmp_path / f"inpainted-00{k}.png")) for k in range(2)]
    for result in results:
        assert result.dtype == np.uint8 and result.shape == (32, 32)  # 8-bit in, 8-bit out
        outside = np.abs(result.astype(np.float64) - image)[~hole] / 255.0
        assert outside.max() <= 1 / 255, outside.max()
    assert not np.array_equal(results[0][hole], results[1][hole])  # --n 2: two different completions
    assert Image.open(tmp_path / "strip.png").size == (4 * 34 + 2, 34 + 2)  # input | masked | 2 results


@pytest.mark.parametrize("extra, message", [
    (["--mask", "{missing}"], "--mask .*missing.png: no such file"),
    (["--mask", "{wide}"], "mask is 64x32 .*image is 32x32"),
    (["--mask", "{empty}"], "mask is empty"),
    (["--mask", "{full}"], "covers the whole image"),
    (["--mask", "{mask}", "--mask-type", "box"], "either --mask PNG or --mask-type"),
    (["--mask-type", "brush", "--sampler", "dpmpp2m"], "inpainting supports ddim, ddpm"),
    (["--mask-type", "box", "--steps", "4", "--jump-length", "4", "--jump-n-sample", "2"], "--jump-length"),
])
def test_cli_bad_mask_input_is_one_line_and_exit_2(checkpoint, image_and_mask, tmp_path, capsys, extra, message):
    from dgan.sample import main

    image_path, mask_path, _, _ = image_and_mask
    Image.fromarray(np.eye(32, 64, dtype=np.uint8) * 255).save(tmp_path / "wide.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "full.png")
    files = {"missing": tmp_path / "missing.png", "wide": tmp_path / "wide.png", "empty": tmp_path / "empty.png",
             "full": tmp_path / "full.png", "mask": mask_path}
    argv = ["--checkpoint", str(checkpoint), "--inpaint", str(image_path), "--out", str(tmp_path / "out"),
            *(a.format(**files) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_cli_bad_image_input(checkpoint, tmp_path, capsys):
    from dgan.sample import main

    (tmp_path / "broken.png").write_text("not a png")
    (tmp_path / "notes.txt").write_text("hello")
    for path, message in ((tmp_path / "nope.png", "no such file"), (tmp_path / "broken.png", "cannot read"),
                          (tmp_path / "notes.txt", "not a PNG/JPG/TIFF/DICOM/NIfTI")):
        assert main(["--checkpoint", str(checkpoint), "--inpaint", str(path), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_evaluate_task_inpaint_writes_the_metrics(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    r = run_cli([sys.executable, "-m", "dgan.evaluate", "--task", "inpaint", "--run", str(run_dir),
                 "--mask-type", "brush", "--task-images", "4", "--sampler", "ddim", "--steps", "5",
                 "--jump-length", "2", "--jump-n-sample", "2", "--batch-size", "4", "--no-mlflow", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"inpaint_psnr", "inpaint_ssim", "inpaint_baseline_psnr", "inpaint_baseline_ssim",
                            "inpaint_mask_fraction"}
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert 0.1 <= metrics["inpaint_mask_fraction"] <= 0.5 and -1 <= metrics["inpaint_ssim"] <= 1
    assert report["task"] == {"name": "inpaint", "mask_type": "brush", "jump_length": 2, "jump_n_sample": 2,
                              "baseline": "mean of the known pixels"}
    assert report["reference"]["num_images"] == 4 and report["num_samples"] == 4
    assert "inpaint_psnr" in r.stdout  # the console table
    # --eta reaches the RePaint steps (DDIM's fresh noise changes the fill) and the report
    noisy = tmp_path / "eta.json"
    r = run_cli([sys.executable, "-m", "dgan.evaluate", "--task", "inpaint", "--run", str(run_dir),
                 "--mask-type", "brush", "--task-images", "4", "--sampler", "ddim", "--steps", "5", "--eta", "1",
                 "--jump-length", "2", "--jump-n-sample", "2", "--batch-size", "4", "--no-mlflow", "--out", str(noisy)])
    assert r.returncode == 0, r.stderr[-3000:]
    eta_report = json.loads(noisy.read_text())
    assert eta_report["eta"] == 1.0 and eta_report["metrics"]["inpaint_psnr"] != metrics["inpaint_psnr"]
