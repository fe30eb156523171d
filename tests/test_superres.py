"""Super-resolution (model.task=sr): config, LR/HR pairs, the conditioned step, and the CLIs end to
end on a tiny model that must beat bicubic upsampling on held-out phantoms."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import TINY_QUIET as TINY, run_cli
from PIL import Image

from dgan.checkpoint import Checkpointer, CheckpointError
from dgan.config import ConfigError, load_config, to_dict
from dgan.generation import make_lr, sr_condition, upsample

pytestmark = pytest.mark.slow  # subprocess CLIs or training runs: not in the fast lane

# The tiny configuration (cli_helpers.TINY: a module-scoped run cannot use the function-scoped
# tiny_overrides fixture), and SR.
SR = ["model.task=sr", "model.sr_scale=4", "train.device=cpu"]
# The learning run: the smallest budget that beats bicubic with margin. Seeds 0-2 gave +0.99 to
# +1.25 dB over bicubic at 2 kimg, but only +0.6 to +0.9 dB at 1.5 kimg, against the test's 0.5 dB.
# What makes it that small: signal left at T (beta_end 0.002, sqrt(abar_T) ~ 0.6; sampling starts
# from the noised upsampled LR) and lr_g 2e-3. With the default schedule (pure noise at T) and lr_g
# the same model took ~6 kimg just to draw level with bicubic.
LEARN_KIMG = 2.0
LEARN = ["train.batch_size=8", "data.num_images=256", "diffusion.beta_end=0.002", "train.lr_g=2e-3",
         "train.warmup_kimg=0.1",
         "log.num_samples=4", "log.sample_steps=5", "log.every_steps=50",
         "eval.every_kimg=1", "eval.metrics=[psnr,ssim]", "eval.num_samples=8", "eval.steps=5",
         "eval.best_metric=sr_psnr", "eval.best_mode=max"]


# ----------------------------------------------------------------------------------------------
# Config and the LR/HR pair


def test_config_turns_sr_on_and_g_d_get_the_lr_channels():
    cfg = load_config(None, TINY + SR)
    assert cfg.model.task == "sr" and cfg.model.cond_channels == 1
    assert load_config(None, TINY).model.cond_channels == 0  # the default stays unconditional
    assert "cond_channels" not in to_dict(cfg)["model"]  # derived, not a key of its own


@pytest.mark.parametrize("extra, needle", [
    (["model.sr_scale=3"], "model.sr_scale: model.image_size=32 is not divisible by 3"),
    (["model.sr_scale=1"], "model.sr_scale: 1 is not an upscaling factor"),
    (["model.sr_scale=16"], "leaves a 2 px LR image"),
    (["model.num_classes=2"], "set model.num_classes=0"),
    (["eval.every_kimg=1"], "set eval.metrics=[psnr,ssim]"),
    (["eval.every_kimg=1", "eval.metrics=[psnr]", "eval.best_metric=psnr"], "use eval.best_metric=sr_psnr"),
    (["model.task=superres"], "model.task: expected 'generate' | 'sr'"),
])
def test_bad_sr_configs_fail_at_load_in_one_line(extra, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, TINY + SR + extra)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_make_lr_averages_blocks_and_upsample_is_bicubic_in_range():
    hr = torch.rand(2, 1, 32, 32) * 2 - 1
    lr = make_lr(hr, 4)
    assert lr.shape == (2, 1, 8, 8)
    torch.testing.assert_close(lr[0, 0, 1, 2], hr[0, 0, 4:8, 8:12].mean())  # area = the block mean
    up = upsample(lr, 32)
    assert up.shape == hr.shape and up.min() >= -1 and up.max() <= 1
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(sr_condition(flat, 2), flat)  # a flat image survives the round trip


def test_sr_step_conditions_g_and_d_on_the_lr():
    from dgan.step import micro_step
    from dgan.trainer import build_trainables

    cfg = load_config(None, TINY + SR + ["gan.adv_t_max=999"])
    torch.manual_seed(0)
    tr, _, _ = build_trainables(cfg, torch.device("cpu"))
    assert tr.G_raw.cond_channels == 1 and tr.D_raw.convs[0].in_channels == 2
    hr = torch.rand(4, 1, 32, 32) * 2 - 1
    out = micro_step(tr, cfg, hr, torch.zeros(4, dtype=torch.long), do_r1=True, sync=True, loss_scale=1.0)
    assert all(torch.isfinite(v) for v in out.values())
    # both players really read the LR channel: its input weights get gradients
    assert tr.G_raw.unet.encoder.conv1.weight.grad[:, 1].abs().sum() > 0
    assert tr.D_raw.convs[0].weight.grad[:, 1].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# A tiny SR model trained with the CLI, as a user would


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("sr")
    r = run_cli([sys.executable, "-m", "dgan.train", *TINY, *SR, *LEARN, f"train.total_kimg={LEARN_KIMG}",
                 f"log.root={root}", f"data.cache_dir={root / '.cache'}", "log.run_name=sr"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "sr", r.stdout


def _checkpoint(run: Path) -> Path:
    return max((run / "checkpoints").glob("ckpt-0*.pt"))


def test_trained_model_beats_bicubic(sr_run, tmp_path):
    run, _ = sr_run
    out = tmp_path / "eval.json"
    r = run_cli([sys.executable, "-m", "dgan.evaluate", "--task", "sr", "--run", str(run), "--task-images", "64",
                 "--steps", "10", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text())["metrics"]
    print(f"SR vs bicubic after {LEARN_KIMG} kimg: {m}")
    assert "sr_psnr" in r.stdout and "bicubic_psnr" in r.stdout  # the console table
    assert m["sr_psnr"] > m["bicubic_psnr"] + 0.5, m
    assert m["sr_ssim"] > m["bicubic_ssim"], m
    # --eta reaches the SR sampler (DDIM's fresh noise changes the images) and the report
    noisy = tmp_path / "eta.json"
    r = run_cli([sys.executable, "-m", "dgan.evaluate", "--task", "sr", "--run", str(run), "--task-images", "64",
                 "--steps", "10", "--eta", "1", "--no-mlflow", "--out", str(noisy)])
    assert r.returncode == 0, r.stderr[-3000:]
    eta_report = json.loads(noisy.read_text())
    assert eta_report["eta"] == 1.0 and eta_report["metrics"]["sr_psnr"] != m["sr_psnr"]
    assert eta_report["metrics"]["bicubic_psnr"] == m["bicubic_psnr"]  # the same HR images and LR


def test_training_shows_lr_sr_hr_and_evaluates_sr_periodically(sr_run):
    run, stdout = sr_run
    assert "eval at step" in stdout and "sr_psnr" in stdout  # eval.every_kimg scored SR, no crash
    assert (run / "checkpoints" / "ckpt-best.pt").exists()  # kept by eval.best_metric=sr_psnr
    # 4 held-out examples, each LR | bicubic | SR | HR, two examples per row: 8 x 2 tiles of 32 px
    assert Image.open(run / "samples.png").size == (8 * 34 + 2, 2 * 34 + 2)


def test_sample_cli_super_resolves_a_png(sr_run, tmp_path):
    low = tmp_path / "low.png"
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(low)  # 16-bit in
    out = tmp_path / "out"
    r = run_cli([sys.executable, "-m", "dgan.sample", "--checkpoint", str(_checkpoint(sr_run[0])),
                 "--super-resolve", str(low), "--scale", "4", "--steps", "5", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    sr, bicubic = Image.open(out / "low_sr.png"), Image.open(out / "low_bicubic.png")
    assert sr.size == bicubic.size == (32, 32)
    assert np.asarray(sr).dtype == np.uint16  # 16-bit where the input was
    assert Image.open(out / "low_strip.png").size == (3 * 34 + 2, 34 + 2)  # LR | bicubic | SR


@pytest.mark.parametrize("args, needle", [
    (["--scale", "2"], "--scale 2 but the model was trained for x4 (model.sr_scale); pass --scale 4"),
    (["--size", "16"], "low.png is 16x16 px; x4 must give the model's 32 px (model.image_size): resize it to 8x8"),
    (["--no-lr"], "is a x4 super-resolution model (model.task=sr): pass --super-resolve LOW.png (a 8x8 px"),
])
def test_sample_cli_refuses_requests_that_do_not_fit(sr_run, tmp_path, capsys, args, needle):
    from dgan.sample import main

    size = int(args[1]) if args[0] == "--size" else 8
    Image.fromarray(np.zeros((size, size), np.uint8)).save(tmp_path / "low.png")
    lr = [] if args[0] == "--no-lr" else ["--super-resolve", str(tmp_path / "low.png")]
    extra = args if args[0] == "--scale" else []
    assert main(["--checkpoint", str(_checkpoint(sr_run[0])), *lr, *extra, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def _generator_checkpoint(tmp_path: Path) -> Path:
    """A plain (model.task=generate) checkpoint with untrained EMA weights, written in-process."""
    from dgan.ema import EMA
    from dgan.trainer import build_models

    cfg = load_config(None, TINY + ["train.device=cpu"])
    G, _ = build_models(cfg, torch.device("cpu"))
    ema = EMA(G, halflife_kimg=1.0)
    ema.update(G, images_seen=1, batch_images=1)
    return Checkpointer(tmp_path / "run" / "checkpoints").save({"ema": ema.state_dict()}, step=1,
                                                               metadata={"config": to_dict(cfg)})


def test_non_sr_checkpoints_are_refused_clearly(tmp_path, capsys):
    from dgan.sample import main as sample_main

    ckpt = _generator_checkpoint(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "low.png")
    assert sample_main(["--checkpoint", str(ckpt), "--super-resolve", str(tmp_path / "low.png")]) == 2
    assert "is not a super-resolution checkpoint (model.task=generate)" in capsys.readouterr().err
    # a subprocess: under python -m, dgan.evaluate's own error classes are __main__'s
    r = run_cli([sys.executable, "-m", "dgan.evaluate", "--task", "sr", "--checkpoint", str(ckpt), "--no-mlflow"])
    assert r.returncode == 1 and "--task sr needs a super-resolution checkpoint" in r.stderr, r.stderr[-2000:]


def test_sr_checkpoint_loads_and_resumes_as_sr_only(sr_run):
    from dgan.config import Config, config_from_dict
    from dgan.generation import generate, load_generator
    from dgan.trainer import Trainer

    ckpt, cpu = _checkpoint(sr_run[0]), torch.device("cpu")
    G, cfg, diffusion, _ = load_generator(ckpt, cpu)
    assert cfg.model.task == "sr" and G.cond_channels == 1  # built from the stored config
    with pytest.raises(ValueError, match="--super-resolve"):
        generate(G, diffusion, n=1, channels=1, image_size=32)  # noise alone makes no sense for SR
    trainer = Trainer.build(cfg, cpu, data=False)
    trainer.restore(ckpt)  # G and D (2 input channels) load strictly, EMA, optimizers
    assert trainer.state.step > 0
    plain = to_dict(cfg)
    # the same run as a plain generator (its SR-only eval keys and low-noise schedule put back)
    plain["model"]["task"], plain["eval"], plain["diffusion"] = "generate", *[to_dict(Config())[k]
                                                                            for k in ("eval", "diffusion")]
    plain = config_from_dict(plain)
    with pytest.raises(CheckpointError, match="model.task: checkpoint has sr, config has generate"):
        Trainer.build(plain, cpu, data=False).restore(ckpt)
