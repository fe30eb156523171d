"""Behaviour of the networks: G's FiLM-at-init identity, conditioning, shapes, gradients,
encoder weight loading, and D's tau / class conditioning."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from dgan.models import (
    ClassEmbedding,
    EncoderWeightsError,
    Generator,
    PatchDiscriminator,
    TimeEmbedding,
    sinusoidal_embedding,
)

SMALL_DECODER = (64, 32, 16, 16, 8)
REPO_ROOT = Path(__file__).resolve().parents[1]


def small_generator(**kwargs: object) -> Generator:
    defaults: dict[str, object] = {"encoder": "resnet18", "decoder_channels": SMALL_DECODER}
    defaults.update(kwargs)
    return Generator(**defaults)  # type: ignore[arg-type]


def perturb(modules: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in modules.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------- embeddings


def test_sinusoidal_embedding_pinned_values() -> None:
    emb = sinusoidal_embedding(torch.tensor([1]), 4)
    # half=2 -> frequencies 1 and 10000**-0.5 = 0.01
    expected = torch.tensor([[math.sin(1.0), math.sin(0.01), math.cos(1.0), math.cos(0.01)]])
    torch.testing.assert_close(emb, expected)
    assert sinusoidal_embedding(torch.tensor([0.5, 2.0]), 7).shape == (2, 7)


def test_sinusoidal_embedding_distinct_for_distinct_t() -> None:
    emb = sinusoidal_embedding(torch.arange(1000), 128)
    dist = torch.cdist(emb, emb)
    dist.fill_diagonal_(float("inf"))
    assert dist.min() > 1e-3
    # int and float timesteps embed identically
    torch.testing.assert_close(emb[:10], sinusoidal_embedding(torch.arange(10.0), 128))


def test_time_and_class_embedding() -> None:
    assert TimeEmbedding(32)(torch.tensor([0, 999, 5])).shape == (3, 32)
    emb = ClassEmbedding(num_classes=2, dim=8)
    out = emb(torch.tensor([0, 1, 2, -1]))
    assert out.shape == (4, 8)
    torch.testing.assert_close(out[3], out[2])  # -1 is the null label (index 2)
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


# ---------------------------------------------------------------- generator


@pytest.mark.parametrize("num_classes", [0, 3])
def test_generator_equals_plain_unet_at_init(num_classes: int) -> None:
    torch.manual_seed(0)
    g = small_generator(num_classes=num_classes).eval()
    x = torch.randn(2, 1, 32, 32)
    t = torch.randint(0, 1000, (2,))
    y = torch.tensor([0, 2]) if num_classes else None
    with torch.no_grad():
        diff = (g(x, t, y) - g.unet(x)).abs().max()
    assert diff < 1e-6


def test_generator_depends_on_t_and_y_after_film_perturbed() -> None:
    torch.manual_seed(0)
    g = small_generator(num_classes=2).eval()
    perturb(g.film)
    x = torch.randn(1, 1, 32, 32).repeat(2, 1, 1, 1)
    with torch.no_grad():
        by_t = g(x, torch.tensor([10, 900]), torch.tensor([1, 1]))
        by_y = g(x, torch.tensor([10, 10]), torch.tensor([0, 1]))
        uncond = g(x[:1], torch.tensor([10]))
        null = g(x[:1], torch.tensor([10]), torch.tensor([-1]))
    assert (by_t[0] - by_t[1]).abs().max() > 1e-4
    assert (by_y[0] - by_y[1]).abs().max() > 1e-4
    torch.testing.assert_close(uncond, null)  # y=None is the null label


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size_px", [32, 64])
def test_generator_output_shape(channels: int, size_px: int) -> None:
    g = small_generator(channels=channels)
    x = torch.randn(2, channels, size_px, size_px)
    assert g(x, torch.tensor([1, 2])).shape == x.shape


def test_generator_resnet34_default_decoder_shape() -> None:
    g = Generator(channels=1)
    # batch 2: at 32 px the bottleneck is 1x1, and train-mode BatchNorm needs >1 value
    x = torch.randn(2, 1, 32, 32)
    assert g(x, torch.tensor([7, 8])).shape == x.shape
    assert g.image_multiple == 32


def test_generator_cond_channels_feed_the_input() -> None:
    torch.manual_seed(0)
    g = small_generator(channels=1, cond_channels=2).eval()
    x = torch.randn(1, 1, 32, 32)
    t = torch.tensor([3])
    with torch.no_grad():
        a = g(x, t, cond=torch.zeros(1, 2, 32, 32))
        b = g(x, t, cond=torch.ones(1, 2, 32, 32))
    assert a.shape == x.shape
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="cond"):
        g(x, t)


def test_image_multiple_and_size_check() -> None:
    g = small_generator(encoder_depth=4, decoder_channels=(64, 32, 16, 8))
    assert g.image_multiple == 16
    g.check_image_size(48, 64)
    with pytest.raises(ValueError, match="divide by 16"):
        g.check_image_size(40, 64)


def _nonzero_grad(p: nn.Parameter) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def _g_loss(g: Generator) -> torch.Tensor:
    x = torch.randn(4, 1, 32, 32)
    return g(x, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, -1, 1])).square().mean()


def test_generator_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    g = small_generator(num_classes=2)
    _g_loss(g).backward()
    # zero-init FiLM still learns: its gradient is d(loss)/d(gamma,beta) x act
    assert all(_nonzero_grad(p) for p in g.film.parameters())
    # the zero-init full-resolution refinement learns the same way, from its last conv
    assert all(_nonzero_grad(p) for p in g.refine.conv_out.parameters())
    assert all(p.grad is not None for p in g.parameters())
    # once FiLM and the refinement's output conv are non-zero, everything behind them gets gradient
    g.zero_grad(set_to_none=True)
    perturb(g.film)
    perturb(g.refine.conv_out)
    _g_loss(g).backward()
    dead = [name for name, p in g.named_parameters() if not _nonzero_grad(p)]
    assert dead == []


def test_shallow_encoder_freezes_unused_stages() -> None:
    # smp keeps layer3/layer4 at depth 3; trainable-but-unused params break DDP
    g = small_generator(encoder_depth=3, decoder_channels=(32, 16, 8))
    assert {name.split(".")[0] for name in g.frozen_encoder_params} == {"layer3", "layer4"}
    g(torch.randn(2, 1, 32, 32), torch.tensor([1, 2])).square().mean().backward()
    no_grad = [n for n, p in g.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert not g.unet.encoder.layer4[0].conv1.weight.requires_grad


# ---------------------------------------------------------------- encoder weights


def test_imagenet_weights_offline_fail_fast(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import time
        from dgan.models import Generator
        start = time.perf_counter()
        try:
            Generator(encoder="resnet18", encoder_weights="imagenet")
        except RuntimeError as err:
            print(f"{time.perf_counter() - start:.3f}")
            print(type(err).__name__)
            print(err)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TORCH_HOME=str(tmp_path / "torch"), NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3, proc.stdout + proc.stderr  # one-line message
    elapsed_s, err_name, message = float(lines[0]), lines[1], lines[2]
    assert elapsed_s < 10
    assert err_name == "EncoderWeightsError"
    assert "encoder_weights_path" in message and "internet" in message


def test_encoder_weights_path_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = small_generator(channels=1)
    path = tmp_path / "encoder.pth"
    torch.save(source.unet.encoder.state_dict(), path)
    torch.manual_seed(2)
    # the local file wins over encoder_weights, so no download is attempted
    loaded = small_generator(channels=1, encoder_weights="imagenet", encoder_weights_path=path)
    want, got = source.unet.encoder.state_dict(), loaded.unet.encoder.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_encoder_weights_path_adapts_rgb_first_conv(tmp_path: Path) -> None:
    rgb = smp.encoders.get_encoder("resnet18", in_channels=3)
    path = tmp_path / "rgb.pth"
    torch.save(rgb.state_dict(), path)
    grey = small_generator(channels=1, encoder_weights_path=path)
    want_conv1 = rgb.conv1.weight.sum(1, keepdim=True)  # grey = sum of the RGB filters
    torch.testing.assert_close(grey.unet.encoder.conv1.weight, want_conv1)
    torch.testing.assert_close(grey.unet.encoder.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)
    five = small_generator(channels=1, cond_channels=4, encoder_weights_path=path)
    w5 = five.unet.encoder.conv1.weight
    assert w5.shape[1] == 5
    torch.testing.assert_close(w5[:, 3], rgb.conv1.weight[:, 0] * 3 / 5)


def test_encoder_weights_path_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(smp.encoders.get_encoder("resnet34", in_channels=1).state_dict(), path)
    with pytest.raises(EncoderWeightsError) as info:
        small_generator(channels=1, encoder_weights_path=path)
    assert str(path) in str(info.value) and "resnet18" in str(info.value)
    assert "unexpected" in str(info.value)
    with pytest.raises(EncoderWeightsError, match="does not exist"):
        small_generator(encoder_weights_path=tmp_path / "missing.pth")


# ---------------------------------------------------------------- discriminator


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size_px", [32, 64, 256])
def test_discriminator_logit_map_shape(channels: int, size_px: int) -> None:
    d = PatchDiscriminator(channels=channels, base_channels=8)
    out = d(torch.randn(2, channels, size_px, size_px), torch.tensor([0, 500]))
    side = size_px // 8 - 2  # three halvings, then two 4x4 stride-1 convs with padding 1
    assert out.shape == (2, 1, side, side)
    assert side >= 2


def test_discriminator_depends_on_tau_and_y() -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator(channels=1, base_channels=16, num_classes=2, num_steps=100)
    x = torch.randn(1, 1, 32, 32).repeat(2, 1, 1, 1)
    with torch.no_grad():
        by_tau = d(x, torch.tensor([0, 80]))
        by_y = d(x, torch.tensor([5, 5]), torch.tensor([0, 1]))
        no_y = d(x, torch.tensor([5, 5]))
        masked = d(x, torch.tensor([5, 5]), torch.tensor([-1, -1]))
    assert (by_tau[0] - by_tau[1]).abs().max() > 1e-4
    assert (by_y[0] - by_y[1]).abs().max() > 1e-4
    torch.testing.assert_close(masked, no_y)  # y == -1 means no class term


def test_discriminator_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator(channels=3, base_channels=8, num_classes=2)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    d(x, torch.tensor([0, 1, 50, 999]), torch.tensor([0, 1, 1, 0])).mean().backward()
    dead = [name for name, p in d.named_parameters() if not _nonzero_grad(p)]
    assert dead == []
    assert x.grad is not None and x.grad.abs().sum() > 0  # R1 needs input gradients


def test_discriminator_has_no_batchnorm() -> None:
    d = PatchDiscriminator(num_classes=2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())


# ---------------------------------------------------------------- norm conditioning (issue 10)


def test_norm_conditioning_is_zero_init_and_reaches_every_norm() -> None:
    from dgan.models.adanorm import AdaGroupNorm

    torch.manual_seed(0)
    g = small_generator(num_classes=2, norm_conditioning=True).eval()
    plain = small_generator(num_classes=2).eval()
    plain.load_state_dict({k: v for k, v in g.state_dict().items() if not k.startswith("norm_proj")})
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([10, 900]), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(g(x, t, y), plain(x, t, y))  # zero init: the plain G exactly
    norms = [m for m in g.unet.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(isinstance(m, AdaGroupNorm) for m in norms)  # encoder and decoder
    assert {id(m.cond) for m in norms} == {id(g.norm_condition)}
    assert g.norm_condition.mod is None  # nothing stale after a forward
    # the zero-init projection learns, then t and y change every block
    g.train()
    _g_loss(g).backward()
    assert all(_nonzero_grad(p) for p in g.norm_proj.parameters())
    perturb(g.norm_proj)
    g.eval()
    with torch.no_grad():
        decoder_in = {}
        hook = g.unet.decoder.register_forward_pre_hook(lambda m, a: decoder_in.setdefault("f", a[0]))
        g(x[:1].repeat(2, 1, 1, 1), t, y)
        hook.remove()
    deepest = decoder_in["f"][-1]
    assert (deepest[0] - deepest[1]).abs().max() > 1e-4  # the encoder already depends on t


def test_group_count_keeps_four_channels_per_group() -> None:
    from dgan.models.adanorm import num_groups

    assert [num_groups(c) for c in (8, 16, 32, 64, 128, 512, 6)] == [2, 4, 8, 16, 32, 32, 1]


def test_generator_from_config_and_legacy_checkpoint_configs() -> None:
    from dgan.config import config_from_dict, load_config, to_dict

    cfg = load_config(None, ["model.decoder_channels=[32,16,16,8]", "model.time_dim=32",
                             "model.norm_conditioning=true"])
    assert cfg.diffusion.prediction == "v" and cfg.train.lr_schedule == "cosine"
    assert Generator.from_config(cfg.model).norm_proj is not None
    old = to_dict(cfg)  # a checkpoint config written before these keys existed
    del old["model"]["norm_conditioning"], old["diffusion"]["prediction"], old["train"]["lr_schedule"]
    del old["gan"]["fakes"], old["gan"]["self_fake_every"]
    legacy = config_from_dict(old)
    assert (legacy.model.norm_conditioning, legacy.diffusion.prediction, legacy.train.lr_schedule) == \
        (False, "eps", "constant")
    assert (cfg.gan.fakes, legacy.gan.fakes, legacy.gan.self_fake_every) == ("samples", "recon", 1)
    assert Generator.from_config(legacy.model).norm_proj is None
