"""Tests of the noise embeddings and the DDPM++-style U-Net (fewstep_lab/nets)."""

import math

import pytest
import torch

from fewstep_lab.nets.embeddings import FourierEmbedding, SinusoidalEmbedding
from fewstep_lab.nets.unet import UNet, count_parameters, unet_sizes

SMOKE = unet_sizes["smoke"]


def perturbed(net: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter: the zero-initialised layers would hide all differences."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))
    return net


def inputs(batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.linspace(-2.0, 1.2, batch)


# ----------------------------------------------------------------------------- embeddings

def test_sinusoidal_matches_formula():
    emb = SinusoidalEmbedding(8, max_period=100.0, max_freq=2.0)
    c = torch.tensor([0.0, 0.3, -1.7])
    freqs = [2.0 * 100.0 ** (-i / 3) for i in range(4)]  # 2 down to 2/100, ends included
    expected = torch.tensor([[math.cos(f * v) for f in freqs] + [math.sin(f * v) for f in freqs]
                             for v in c.tolist()])
    out = emb(c)
    assert out.shape == (3, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_sinusoidal_max_freq_and_period_change_features():
    c = torch.tensor([0.5])
    base = SinusoidalEmbedding(16)(c)
    assert not torch.allclose(base, SinusoidalEmbedding(16, max_freq=4.0)(c))
    assert not torch.allclose(base, SinusoidalEmbedding(16, max_period=10.0)(c))
    assert SinusoidalEmbedding(16).freqs.max().item() == pytest.approx(1.0)


def test_fourier_seeded_buffer_and_scale():
    a, b = FourierEmbedding(256, scale=3.0, seed=1), FourierEmbedding(256, scale=3.0, seed=1)
    torch.testing.assert_close(a.freqs, b.freqs)
    assert "freqs" in a.state_dict()  # travels with checkpoints
    assert not torch.equal(a.freqs, FourierEmbedding(256, scale=3.0, seed=2).freqs)
    assert 2.0 < a.freqs.std().item() < 4.0
    torch.manual_seed(0)
    unseeded = FourierEmbedding(256, seed=None).freqs
    torch.manual_seed(0)
    torch.testing.assert_close(unseeded, torch.randn(128))
    c = torch.tensor([0.25, -1.0])
    expected_cos = torch.cos(2 * math.pi * c[:, None] * a.freqs[None, :])
    torch.testing.assert_close(a(c)[:, :128], expected_cos, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("emb", [SinusoidalEmbedding(6), FourierEmbedding(6)])
def test_embedding_pairs_on_unit_circle_and_shape_checks(emb):
    out = emb(torch.randn(5))
    assert out.shape == (5, 6)
    torch.testing.assert_close(out[:, :3] ** 2 + out[:, 3:] ** 2, torch.ones(5, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert emb(torch.randn(5)).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        emb(torch.randn(5, 1))
    with pytest.raises(ValueError, match="even"):
        type(emb)(5)


# ----------------------------------------------------------------------------- U-Net

def test_profile_sizes():
    counts = {}
    for name, kwargs in unet_sizes.items():
        with torch.device("meta"):  # no memory, no init cost
            counts[name] = count_parameters(UNet(**kwargs))
    assert counts["smoke"] < 100_000
    assert 0.8e6 < counts["cpu"] < 1.3e6
    assert 30e6 < counts["gpu"] < 56e6


def test_zero_init_output_and_shape():
    net = UNet(**SMOKE, out_channels=5)
    x, c = inputs()
    out = net(x, c)
    assert out.shape == (4, 5, 32, 32)
    assert torch.count_nonzero(out) == 0  # zero-initialised output convolution


def test_every_parameter_gets_gradient():
    torch.manual_seed(0)
    net = perturbed(UNet(**SMOKE, num_classes=3))
    x, c = inputs()
    net(x, c, torch.tensor([0, 1, 2, 3])).square().mean().backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not unused


def test_channels_last_matches():
    torch.manual_seed(0)
    net = perturbed(UNet(**SMOKE)).eval()
    x, c = inputs()
    ref = net(x, c)
    out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), c)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_bfloat16_autocast_close_to_fp32():
    torch.manual_seed(0)
    net = perturbed(UNet(**SMOKE, num_classes=10)).eval()
    x, c = inputs()
    y = torch.tensor([0, 4, 9, 10])
    ref = net(x, c, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x.to(memory_format=torch.channels_last), c, y).float()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_emb_scale_multiplies_c_noise():
    torch.manual_seed(0)
    a = perturbed(UNet(**SMOKE)).eval()
    b = UNet(**SMOKE, emb_scale=1000.0).eval()
    b.load_state_dict(a.state_dict())
    x, c = inputs()
    torch.testing.assert_close(b(x, c), a(x, 1000.0 * c))
    assert not torch.allclose(b(x, c), a(x, c))


def test_scalar_c_noise_broadcasts_and_fourier_embedding():
    torch.manual_seed(0)
    net = perturbed(UNet(**SMOKE, embedding="fourier")).eval()
    x, _ = inputs()
    torch.testing.assert_close(net(x, torch.tensor(0.3)), net(x, torch.full((4,), 0.3)))
    with pytest.raises(ValueError, match="positional"):
        UNet(**SMOKE, embedding="learned")


def test_class_labels_and_unconditional_index():
    torch.manual_seed(0)
    net = perturbed(UNet(**SMOKE, num_classes=10)).eval()
    x, c = inputs(2)
    x = x[:1].expand(2, -1, -1, -1)
    out = net(x, c[:1].expand(2), torch.tensor([3, 10]))  # 10 = "no label"
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="0..10"):
        net(x, c, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, c)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(**SMOKE)(x, c, torch.tensor([0, 1]))


def test_dropout_active_only_in_train_mode():
    torch.manual_seed(0)
    net = perturbed(UNet(**SMOKE | {"dropout": 0.5}))
    x, c = inputs(2)
    assert not torch.allclose(net.train()(x, c), net(x, c))
    net.eval()
    torch.testing.assert_close(net(x, c), net(x, c))


def test_attention_placement_and_bad_shapes():
    net = UNet(model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(16,))
    # Encoder: 16x16 level has 1 block with attention; decoder: bottleneck + last block at 16.
    assert sum(b.attention for b in net.enc) == 1
    assert sum(b.attention for b in net.dec) == 2
    with pytest.raises(ValueError, match="shape"):
        net(torch.zeros(1, 3, 16, 16), torch.zeros(1))
    with pytest.raises(ValueError, match="divisible"):
        UNet(resolution=36, channel_mult=(1, 2, 2, 2))


# ----------------------------------------------------------------------------- guidance embedding (LCM)

SMALL = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0,
             resolution=8, in_channels=4, out_channels=4)


def test_guidance_embed_off_keeps_the_state_dict_and_on_adds_only_w_keys():
    torch.manual_seed(0)
    plain = UNet(**SMALL, num_classes=10)
    torch.manual_seed(0)
    guided = UNet(**SMALL, num_classes=10, guidance_embed=True)
    torch.manual_seed(0)
    off = UNet(**SMALL, num_classes=10, guidance_embed=False)
    assert list(off.state_dict()) == list(plain.state_dict())
    extra = set(guided.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("w_") for k in extra)
    assert set(plain.state_dict()) <= set(guided.state_dict())
    # The w branch is built last: the shared weights are drawn as without it.
    for k, v in plain.state_dict().items():
        assert torch.equal(guided.state_dict()[k], v), k


def test_guidance_embed_shapes_zero_start_and_w_dependence():
    torch.manual_seed(0)
    plain = perturbed(UNet(**SMALL, num_classes=10))
    guided = UNet(**SMALL, num_classes=10, guidance_embed=True)
    guided.load_state_dict(plain.state_dict(), strict=False)
    x, c, y = torch.randn(5, 4, 8, 8), torch.linspace(-1, 1, 5), torch.tensor([0, 3, 10, 9, 1])
    for w in (0.0, 7.5, torch.linspace(0, 14, 5)):
        out = guided(x, c, (y, w))
        assert out.shape == x.shape
        assert torch.equal(out, plain(x, c, y))  # the zero last layer: starts as the net without w
    with pytest.raises(ValueError, match=r"\(labels, w\)"):
        guided(x, c, y)
    with pytest.raises(ValueError, match="w must be"):
        guided(x, c, (y, torch.zeros(3)))
    torch.nn.init.normal_(guided.w_map1.weight, std=0.1)
    assert not torch.allclose(guided(x, c, (y, 0.0)), guided(x, c, (y, 7.0)))
    # An unconditional net takes (None, w).
    unc = UNet(**SMALL, guidance_embed=True)
    assert unc(x, c, (None, 2.0)).shape == x.shape
