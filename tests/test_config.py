"""Config: YAML + dotted overrides, and one-line errors that name the key and the fix."""
import subprocess
import sys

import pytest

from dgan.config import ConfigError, config_from_dict, load_config, save_config, to_dict


def test_defaults_are_the_cpu_quick_start():
    cfg = load_config()
    assert cfg.data.source == "phantoms" and cfg.model.image_size == 32
    assert cfg.model.encoder_weights is None  # imagenet weights would need a download


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr_g: 0.001\nmodel:\n  encoder: resnet34\n")
    cfg = load_config(f, ["train.lr_g=1e-4", "model.decoder_channels=[64,32,16,8]", "train.resume=auto"])
    assert cfg.train.lr_g == pytest.approx(1e-4)  # YAML 1.1 would read 1e-4 as a string
    assert cfg.model.encoder == "resnet34"
    assert cfg.model.decoder_channels == [64, 32, 16, 8]
    assert cfg.train.resume == "auto"


def test_int_widens_to_float_but_bool_is_not_an_int():
    assert load_config(None, ["train.lr_g=1"]).train.lr_g == 1.0
    with pytest.raises(ConfigError, match="train.batch_size: expected int"):
        load_config(None, ["train.batch_size=true"])


@pytest.mark.parametrize("override, needle", [
    ("train.lr=1e-4", "did you mean 'train.lr_g'"),
    ("trian.lr_g=1e-4", "did you mean 'train'"),
    ("model.encodr=resnet18", "did you mean 'model.encoder'"),
])
def test_unknown_key_names_the_closest_valid_one(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"train.batch_size: expected int, got 'big'"):
        load_config(None, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"diffusion.schedule: expected 'linear' \| 'cosine'"):
        load_config(None, ["diffusion.schedule=quadratic"])


def test_image_size_not_divisible_suggests_sizes():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.image_size=100", "model.encoder_depth=5", "model.decoder_channels=[64,32,16,16,8]"])
    msg = str(e.value)
    assert "model.image_size" in msg and "2**encoder_depth=32" in msg and "96 or 128" in msg
    # a shallower encoder makes 48 valid
    assert load_config(None, ["model.image_size=48", "model.encoder_depth=4",
                              "model.decoder_channels=[64,32,16,16]"]).model.image_size == 48
    with pytest.raises(ConfigError, match="model.decoder_channels: needs 4 entries"):
        load_config(None, ["model.decoder_channels=[64,32,16,16,8]"])


@pytest.mark.parametrize("override, key", [
    ("gan.t_max=1000", "gan.t_max"), ("train.keep_last=0", "train.keep_last"),
    ("model.channels=2", "model.channels"), ("data.source=npz", "data.path"),
    ("gan.adv_weight=-1", "gan.adv_weight"), ("data.hflip_p=1.5", "data.hflip_p"),
    ("gan.adv_warmup_kimg=-1", "gan.adv_warmup_kimg"), ("gan.self_fake_steps=1", "gan.self_fake_steps"),
    ("gan.self_fake_every=0", "gan.self_fake_every"), ("gan.self_fakes=-1", "gan.self_fakes"),
    ("gan.fakes=samples gan.r1_gamma=0.1 gan.r1_every=16 gan.self_fake_every=3", "gan.r1_every"),
])
def test_impossible_values_fail_at_load(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, override.split())


def test_own_samples_as_fakes_refuse_batchnorm():
    with pytest.raises(ConfigError, match="gan.fakes: samples needs model.norm=group"):
        load_config(None, ["gan.fakes=samples", "model.norm=batch"])


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(None, ["gan.adv_weight=0.25", "model.num_classes=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(config_from_dict(to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize("name", ["default", "pneumonia32", "medical128"])
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/{name}.yaml")
    if name == "medical128":
        assert (cfg.model.channels, cfg.model.image_size, cfg.model.encoder) == (1, 128, "resnet34")
        assert cfg.gan.adv_weight == 0.3 and cfg.diffusion.num_steps == 1000
    if name == "pneumonia32":  # its own gan block: the recipe measured at 100 and 400 kimg
        assert (cfg.gan.adv_weight, cfg.gan.adv_t_max, cfg.gan.adv_balance) == (1.0, 300, True)


def test_cli_reports_config_error_before_starting(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dgan.train", "train.lr=1e-4", f"log.root={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "did you mean 'train.lr_g'" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_a_schedule_that_leaves_signal_at_T_is_refused_with_the_fix():
    """beta_end=0.02 is tuned for T=1000; at T=100 alpha_bar_T is 0.36, so training never sees the
    pure noise that sampling starts from (samples come out grey). The error names the fix."""
    short = ["diffusion.num_steps=100", "gan.t_max=99", "gan.adv_t_max=40"]
    with pytest.raises(ConfigError, match=r"diffusion.beta_end: 0.02 with num_steps=100 .* raise it to about 0.2"):
        load_config(None, short)
    load_config(None, short + ["diffusion.beta_end=0.2"])  # the suggested value passes
    load_config(None, short + ["diffusion.schedule=cosine"])  # cosine always ends at ~pure noise
    load_config(None, [])  # the defaults (T=1000, linear) do


def test_sharpness_is_logged_but_cannot_choose_the_best_checkpoint():
    cfg = load_config(None, ["eval.every_kimg=1", "eval.metrics=[fid,sharpness]"])
    assert cfg.eval.metrics == ["fid", "sharpness"]
    with pytest.raises(ConfigError, match=r"eval.best_metric: sharpness is best near 1.*eval.best_metric=fid"):
        load_config(None, ["eval.every_kimg=1", "eval.metrics=[fid,sharpness]", "eval.best_metric=sharpness"])


def test_periodic_frd_is_a_metric_and_a_missing_extra_stops_before_training(monkeypatch):
    from dgan import metrics
    from dgan.monitor import check_eval_ready

    cfg = load_config(None, ["eval.every_kimg=1", "eval.metrics=[psnr,frd]", "eval.best_metric=frd"])
    assert cfg.eval.metrics == ["psnr", "frd"]

    def missing():
        raise metrics.MetricError(f"FRD needs the frd extra: {metrics.FRD_INSTALL}")

    monkeypatch.setattr(metrics, "require_frd", missing)
    with pytest.raises(ConfigError, match=r"eval.metrics has frd: .*pip install -e \".\[frd\]\""):
        check_eval_ready(cfg)
