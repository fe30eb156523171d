"""Typed configuration: one dataclass per component, loaded from YAML plus dotted overrides.

Everything is validated at load time so that a typo or an impossible value fails before
a model is built or a GPU-hour is spent. Errors are one line and say how to fix them.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from dgan.diffusion import SAMPLERS
from dgan.config_checks import validate
from dgan.errors import ConfigError


@dataclass
class ModelConfig:
    encoder: str = "resnet18"                 # smp encoder name; the seed setup uses resnet34
    encoder_weights: Optional[str] = None     # None or "imagenet" (needs a download or encoder_weights_path)
    encoder_weights_path: Optional[str] = None  # local state_dict for the encoder (offline clusters)
    encoder_depth: int = 4                    # 4 halves the FLOPs of 5 at 32 px
    norm: Literal["group", "batch"] = "group"  # smp's BatchNorm -> GroupNorm (see models/generator.py)
    decoder_channels: list[int] = field(default_factory=lambda: [64, 32, 16, 16])
    channels: int = 1                         # image channels (1 grayscale, 3 RGB)
    image_size: int = 32
    num_classes: int = 0                      # 0 = unconditional
    task: Literal["generate", "sr"] = "generate"  # sr: G conditioned on the bicubic-upsampled LR image
    sr_scale: int = 4                         # task=sr: HR/LR size ratio (model.image_size is the HR size)
    time_dim: int = 128                       # width of the t/tau embedding
    # true: (t, y) scale and shift after every GroupNorm of the UNet++ (encoder and decoder), not only
    # one FiLM per encoder stage (models/adanorm.py). Off by default: with v prediction it measured
    # neutral (PneumoniaMNIST 28 kimg: FID 1.53 on vs 1.37 off; tiny phantoms: 1-2%, benchmarks/RESULTS.md)
    # and it costs a modulation per norm layer.
    norm_conditioning: bool = False
    d_channels: int = 32                      # PatchGAN base width (64 costs 4x: D runs 3 passes per step)
    d_layers: int = 3                         # PatchGAN stride-2 layers
    channels_last: bool = False
    compile: bool = False

    @property
    def cond_channels(self) -> int:
        """Channels G (and D) get concatenated to their input: the upsampled LR image for task=sr."""
        return self.channels if self.task == "sr" else 0


@dataclass
class DiffusionConfig:
    num_steps: int = 1000                     # T
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # What G outputs. v: no 1/sqrt(alpha_bar) amplification of G's error near t = T-1 (see
    # Diffusion.training_target); eps is the textbook DDPM target, kept for old checkpoints.
    prediction: Literal["eps", "v"] = "v"
    min_snr_gamma: float = 0.0                # > 0: min-SNR-gamma loss weights (5 in the paper); 0 = off
    # Where DDIM / DPM-Solver++ evaluate G. quadratic: dense near t = 0, where the image's detail is
    # decided, and no evaluation wasted at t = 0 itself (Diffusion.timesteps_for; RESULTS.md, issue 10)
    timestep_spacing: Literal["uniform", "quadratic"] = "quadratic"
    # The samplers' lowest timestep (0: down to t = 0). 9, the 10-step grid's last: FID at DDIM 50 0-23%
    # lower after 28 kimg (five seeds), mixed after 100 (RESULTS.md, "the DDIM-50 grain"); dgan.sample --t-min.
    sample_t_min: int = 0


@dataclass
class GanConfig:
    # The adversarial share: with adv_balance (default) a ratio of gradient norms per fake, else a loss
    # weight (L_G = L_diff + adv_weight * L_adv); 0 = pure diffusion, D untrained. 0.3 beat 0.1, 1.0 and
    # 2.0 at 28 kimg; pneumonia32 sets 1.0 with adv_t_max 300, which won at 100 and 400 kimg (RESULTS.md).
    adv_weight: float = 0.3
    # Fakes only from x0_hat where t <= adv_t_max: large-t reconstructions are blurry means that D tells
    # apart at once and then overpowers G (with the recon fakes, seed 0: 400 lost, 100 won; RESULTS.md).
    adv_t_max: int = 100
    # G ignores D for its first adv_warmup_kimg (then the weight ramps linearly to adv_weight over as
    # many kimg again), while D trains from step 0: G first learns to denoise, D starts ahead.
    adv_warmup_kimg: float = 0.0
    # D judges a clean image beside the noisy x_t it came from (and t): "is this a plausible x0 for
    # this x_t?" rather than "is this a plausible image?" (DDGAN's conditional D, without its latent)
    d_sees_xt: bool = False
    # true: adv_weight is no loss weight but a ratio: on each fake, the adversarial gradient at G's output
    # is rescaled to adv_weight x the norm of that sample's diffusion-loss gradient (losses.balanced_adv_surrogate).
    # With it D may learn (r1_gamma 0, lr_d 1e-3) without pushing G to texture: five seeds at 28 kimg in
    # benchmarks/RESULTS.md ("A bounded adversarial push"). false: the plain weighted sum, which with a
    # D that learns ruined G; the old recipe is false with gan.r1_gamma=0.05 train.lr_d=2e-4.
    adv_balance: bool = True
    # What D judges as fake. samples: G's own samples, run by a no-grad DDIM chain (self_fake_steps, the
    # sampler's grid) from pure noise down to one t <= adv_t_max, whose last x0 prediction is made in G's
    # training forward, so D's gradient reaches G there (step.self_sampled_xt). recon: x0_hat of the
    # batch's own diffusion samples with t <= adv_t_max (nearly the reals: D learns little from them).
    # Paired at 28 kimg, samples beat recon on 6 and 5 of 8 runs at DDIM 10 and 50 (FID -4%), and D learns
    # from them (benchmarks/RESULTS.md, "Fakes from G's own sampler").
    fakes: Literal["recon", "samples"] = "samples"
    # fakes=samples: G's own samples per micro-batch; 0 = one per 8 of its images (at least one): 8 at a
    # batch of 64 (the setting measured), 1 at the seed setup's 8, whose step the chain's forwards would
    # otherwise dominate (benchmarks/RESULTS.md, "Hybrid step cost")
    self_fakes: int = 0
    self_fake_steps: int = 4                  # fakes=samples: the DDIM grid of their chain
    # fakes=samples: the adversarial part of a step (the chain, D's step, G's adversarial term) runs on one
    # step in self_fake_every, with its ratio x self_fake_every (lazy, like StyleGAN2's R1); the others are
    # pure diffusion steps. Why: the chain's forwards cost a step about 1.6x (batch 64, CPU)
    self_fake_every: int = 4
    sigma: float = 0.05                       # instance-noise std for D's diffusion
    tau_dist: Literal["priority", "uniform"] = "priority"
    ada_target: float = 0.6
    ada_interval: int = 4                     # steps between adaptive-T updates
    ada_kimg: float = 100.0                   # kimg for p to travel 0 -> 1
    t_min: int = 10
    t_max: int = 999                          # the last index of a T=1000 schedule (paper: 1000)
    # 0: off. benchmarks/d_probe.py: at 0.05 (lazy, x r1_every) D learned nothing in 300 steps against a
    # frozen G, so the adversarial term was noise; with adv_balance a D that learns is wanted and safe.
    r1_gamma: float = 0.0
    r1_every: int = 16                        # lazy R1: every N D steps, weighted by gamma * N
    # D-health guard (dgan/dguard.py): per log interval, a D whose mean L_D (chance: 1.39) or |logit| exceeds
    # guard_max_loss or guard_max_logit is restored from its last healthy state, with lr_d x guard_lr_factor.
    guard: bool = True
    guard_max_loss: float = 10.0
    guard_max_logit: float = 50.0
    guard_lr_factor: float = 0.5


@dataclass
class DataConfig:
    source: Literal["phantoms", "npz", "shards"] = "phantoms"
    path: Optional[str] = None                # npz file (source=npz)
    shards: Optional[str] = None              # glob or brace pattern of train tar shards (source=shards)
    val_shards: Optional[str] = None          # held-out shards for evaluation
    split: str = "train"                      # npz split used for training
    num_images: int = 2048                    # phantoms: how many to synthesise
    phantom_seed: int = 1234
    cache_dir: str = "runs/.cache"            # built-in sources are written to shards here once
    num_workers: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False                   # infinite resampled shards vs finite epochs
    augment: bool = False
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    affine_p: float = 0.3
    crop_p: float = 0.0
    intensity_p: float = 0.3


@dataclass
class TrainConfig:
    total_kimg: float = 32.0                  # training length in thousands of images
    batch_size: int = 32                      # per rank
    grad_accum: int = 1
    lr_g: float = 1e-3
    lr_d: float = 1e-3                        # with recon fakes D sees ~B/10 per step: at 2e-4 it stayed at chance
    betas_g: list[float] = field(default_factory=lambda: [0.9, 0.999])  # diffusion-model practice
    betas_d: list[float] = field(default_factory=lambda: [0.5, 0.999])  # GAN practice: short momentum for D
    warmup_kimg: float = 0.5
    # After warm-up: "cosine" decays the lr to lr_min_ratio x lr at total_kimg; "constant" holds it
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    lr_min_ratio: float = 0.1
    # the cosine's horizon; null = total_kimg. Pin it to extend a run (total_kimg up, then
    # --resume) without reshaping the lr curve that the run has followed so far.
    lr_decay_kimg: Optional[float] = None
    grad_clip_g: float = 1.0
    grad_clip_d: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    ema_halflife_kimg: float = 1.0
    ema_rampup: float = 0.05                  # EMA half-life <= rampup * images seen, early on
    label_dropout: float = 0.1                # classifier-free guidance: P(drop the label)
    max_skipped_steps: int = 20               # consecutive non-finite steps before we stop
    seed: int = 0
    device: str = "auto"                      # auto | cpu | cuda
    threads: int = 0                          # torch CPU threads; 0 = leave torch's default
    resume: Optional[str] = None              # None | "auto" | path to a checkpoint
    ckpt_every_kimg: float = 16.0
    ckpt_every_min: float = 30.0
    keep_last: int = 3


@dataclass
class LogConfig:
    root: str = "runs"                        # run dirs go to root/<run_name>
    run_name: Optional[str] = None            # default: config stem + timestamp
    experiment: str = "dgan"
    tracking_uri: Optional[str] = None        # default: sqlite:///<root>/mlflow.db
    every_steps: int = 50                     # status line / metric reduction interval
    sample_every_kimg: float = 8.0
    num_samples: int = 64                     # images in each sample grid
    sample_steps: int = 50                    # DDIM steps for grids
    progress: bool = True


@dataclass
class EvalConfig:
    """Periodic evaluation during training (python -m dgan.evaluate does the full version)."""
    every_kimg: float = 0.0                   # 0 = off
    num_samples: int = 500                    # small: this runs inside training
    sampler: Literal[SAMPLERS] = "ddim"
    steps: int = 50
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid"])  # fid, kid, psnr, ssim, frd, sharpness
    best_metric: Optional[str] = None         # e.g. "fid": keep checkpoints/ckpt-best.pt by it
    best_mode: Literal["min", "max"] = "min"
    feature_extractor: Optional[str] = None   # TorchScript extractor (see README, Evaluation)
    fid_weights: Optional[str] = None         # local Inception weights file
    reference: Literal["val", "train"] = "val"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool or tp is int:
        # bool is an int subclass; keep them apart so `train.batch_size=true` is refused
        if type(value) is not tp:
            raise bad
        return value
    if not isinstance(value, tp):
        raise bad
    return value


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1, cutoff=0.5)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(prefix + str(key), names)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, prefix + key + ".")
        else:
            setattr(obj, key, _coerce(prefix + key, value, hints[key]))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. train.lr_g=1e-4")
    key, raw = text.split("=", 1)
    # YAML gives us ints, floats, bools, null and lists for free: `decoder_channels=[64,32]`
    value = _yaml_load(raw, f"override '{text}'", "close the brackets or quote the value") if raw.strip() else None
    if isinstance(value, str) and _looks_numeric(raw):
        value = float(raw)  # YAML 1.1 reads "1e-4" as a string
    return key.strip().split("."), value


def _yaml_load(text: str, where: str, fix: str) -> Any:
    """yaml.safe_load, with a parse error turned into one ConfigError line (PyYAML's own is 5+ lines)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{where}: not valid YAML ({problem}{at}); {fix}") from None


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def int_list_arg(text: str) -> tuple[int, ...]:
    """argparse type for options like --t-values 50,100,250: comma-separated integers."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 50,100,250,500")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def positive_int_arg(text: str) -> int:
    """argparse type for counts such as --n or --steps: an integer >= 1 (argparse then exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, then validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (see configs/ for examples)")
        data = _yaml_load(path.read_text(), f"config file {path}", "fix the file (see configs/ for examples)") or {}
        _apply(cfg, data)
    for text in overrides:
        keys, value = _parse_override(text)
        _apply(cfg, _nest(keys, value))
    validate(cfg)
    return cfg


# What a key meant before it existed. A checkpoint's stored config lacks keys added after it was
# written; their *current* defaults would rebuild a different model (an eps-predicting G read as
# a v-predicting one samples garbage), so a missing key takes its old behaviour instead.
LEGACY_DEFAULTS = {("model", "task"): "generate", ("model", "norm_conditioning"): False,
                   ("diffusion", "prediction"): "eps", ("train", "lr_schedule"): "constant",
                   ("gan", "adv_warmup_kimg"): 0.0, ("gan", "d_sees_xt"): False,
                   ("gan", "adv_balance"): False, ("gan", "fakes"): "recon", ("gan", "self_fake_every"): 1}


def with_legacy_defaults(saved: dict) -> dict:
    """A copy of a stored config dict with every key it predates set to its old behaviour."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in saved.items()}
    for (section, key), value in LEGACY_DEFAULTS.items():
        out.setdefault(section, {}).setdefault(key, value)
    return out


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint's metadata); keys the dict
    predates keep their old meaning (LEGACY_DEFAULTS)."""
    cfg = Config()
    _apply(cfg, with_legacy_defaults(data))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
