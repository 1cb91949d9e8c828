"""A small KL-regularised convolutional autoencoder, latent diffusion's first stage (Rombach et al. 2022).

The encoder E maps an image x in [-1, 1] to the mean and log-variance of a diagonal Gaussian
q(z|x) = N(mean, exp(logvar)) on a latent of shape (latent_channels, R/f, R/f), f = 2**(levels-1)
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3.1 and
appendix G: "KL-reg." autoencoders, f = 4 or 8, c = 3 or 4 channels); the decoder G maps z back.
The layout is LDM's ``Encoder``/``Decoder`` (ldm/modules/diffusionmodules/model.py) made small:
ResBlocks of GroupNorm + SiLU + 3x3 convolution, stride-2 convolutions down, nearest-neighbour
upsampling + convolution up, a middle pair of ResBlocks (no attention: at 8x8 it buys little here),
and the 1x1 ``quant_conv`` / ``post_quant_conv``. The log-variance is clamped to [-30, 20] as
LDM's ``DiagonalGaussianDistribution`` does, so exp(logvar) never overflows.

The diffusion model sees ``to_latent(x) = scaling_factor * z`` (LDM sec. 4.3.2 and appendix G:
the latent is rescaled by 1 / std of the encoded training set, so that it has unit variance;
Stable Diffusion's 0.18215). ``scaling_factor`` is a buffer (1.0 until set), so it lives in the
state dict and in every checkpoint. Sizes: ``autoencoder_sizes`` ('gpu': 32x32x3 -> 4x8x8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KLAutoencoder", "autoencoder_sizes", "LOGVAR_RANGE"]

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp

autoencoder_sizes: dict[str, dict] = {
    # 16x16x3 -> 4x8x8 (f = 2): seconds on the shipped sample.
    "smoke": dict(latent_channels=4, channels=8, channel_mult=(1, 2), num_blocks=1, resolution=16),
    # 16x16x3 -> 4x8x8 (f = 2, 768 -> 256 numbers): trains in about two minutes on 2 CPU cores.
    "cpu": dict(latent_channels=4, channels=16, channel_mult=(1, 2), num_blocks=1, resolution=16),
    # 32x32x3 -> 4x8x8 (f = 4, 3072 -> 256 numbers), LDM's "KL-f4"-style first stage made small.
    "gpu": dict(latent_channels=4, channels=64, channel_mult=(1, 2, 2), num_blocks=1, resolution=32),
}


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (LDM uses 32 groups at 128+ channels)."""
    return nn.GroupNorm(math.gcd(channels, max(1, min(32, channels // 4))), channels, eps=1e-6)


class _ResBlock(nn.Module):
    """LDM's ResnetBlock without the time embedding: x + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _Down(nn.Module):
    """Stride-2 3x3 convolution with LDM's asymmetric (0, 1, 0, 1) padding: exact halving."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (LDM's Upsample)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class KLAutoencoder(nn.Module):
    """KL-regularised autoencoder (Rombach et al. 2022, sec. 3.1): ``encode(x) -> (mean, logvar)``, ``decode(z)``.

    Args:
        in_channels: image channels (3).
        latent_channels: channels c of the latent z.
        channels, channel_mult: level i has ``channels * channel_mult[i]`` channels; every level but
            the last halves the resolution, so f = 2**(len(channel_mult) - 1).
        num_blocks: ResBlocks per level in the encoder (the decoder has one more, as in LDM).
        resolution: image height = width; must be divisible by f.
    """

    def __init__(self, in_channels: int = 3, latent_channels: int = 4, channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2, 2), num_blocks: int = 1, resolution: int = 32):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or any(not isinstance(m, int) or m < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of integers >= 1, got {channel_mult}")
        if min(in_channels, latent_channels, channels, num_blocks, resolution) < 1:
            raise ValueError("in_channels, latent_channels, channels, num_blocks and resolution must be >= 1")
        self.factor = 2 ** (levels - 1)
        if resolution % self.factor:
            raise ValueError(f"resolution {resolution} is not divisible by f = {self.factor} "
                             f"(channel_mult={channel_mult}); use fewer levels or another resolution")
        self.config = dict(in_channels=in_channels, latent_channels=latent_channels, channels=channels,
                           channel_mult=tuple(channel_mult), num_blocks=num_blocks, resolution=resolution)
        widths = [channels * m for m in channel_mult]

        # Encoder E: conv_in, per level num_blocks ResBlocks (+ a stride-2 conv but at the last), middle, out.
        enc, c = [nn.Conv2d(in_channels, channels, 3, padding=1)], channels
        for level, w in enumerate(widths):
            for _ in range(num_blocks):
                enc.append(_ResBlock(c, w))
                c = w
            if level < levels - 1:
                enc.append(_Down(c))
        enc += [_ResBlock(c, c), _ResBlock(c, c), _norm(c), nn.SiLU(), nn.Conv2d(c, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

        # Decoder G: the mirror image, num_blocks + 1 ResBlocks per level, nearest-neighbour upsampling.
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        c = widths[-1]
        dec = [nn.Conv2d(latent_channels, c, 3, padding=1), _ResBlock(c, c), _ResBlock(c, c)]
        for level in reversed(range(levels)):
            for _ in range(num_blocks + 1):
                dec.append(_ResBlock(c, widths[level]))
                c = widths[level]
            if level > 0:
                dec.append(_Up(c))
        dec += [_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("scaling_factor", torch.tensor(1.0))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(latent_channels, R / f, R / f)."""
        r = self.config["resolution"] // self.factor
        return (self.config["latent_channels"], r, r)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, R, R) in [-1, 1] -> the mean and log-variance of q(z|x), each (B, c, R/f, R/f)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.config["in_channels"], *(self.config["resolution"],) * 2):
            raise ValueError(f"this autoencoder reads images of shape (B, {self.config['in_channels']}, "
                             f"{self.config['resolution']}, {self.config['resolution']}), got {tuple(x.shape)}")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, c, R/f, R/f) (unscaled) -> images (B, 3, R, R), about [-1, 1] (not clipped)."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"this autoencoder decodes latents of shape (B, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def sample_latent(self, mean, logvar, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): the reparameterised draw from q(z|x)."""
        # eps is drawn on the generator's device (the training loop's generators live on the CPU), then moved
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * eps

    def to_latent(self, x: torch.Tensor, *, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """The diffusion model's latent: scaling_factor * (mean, or a draw from q(z|x) with sample=True)."""
        mean, logvar = self.encode(x)
        z = self.sample_latent(mean, logvar, generator) if sample else mean
        return self.scaling_factor * z

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Images from a scaled latent: decode(z / scaling_factor)."""
        return self.decode(z / self.scaling_factor)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(reconstruction of a sampled latent, mean, logvar): what the training loss needs."""
        mean, logvar = self.encode(x)
        return self.decode(self.sample_latent(mean, logvar, generator)), mean, logvar
