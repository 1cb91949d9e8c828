"""Noise-level embeddings shared by every network: ``(B,) c_noise -> (B, dim)`` features.

Two families are used in the literature. The sinusoidal ("positional") embedding of the
Transformer (Vaswani et al. 2017, Sec. 3.5), adopted for diffusion timesteps by DDPM (Ho et
al. 2020, Appendix B) and kept by DDPM++ (Song et al. 2021) and EDM (Karras et al. 2022,
Table 7), uses geometrically spaced frequencies from ``max_freq`` down to
``max_freq / max_period``. The Fourier-feature embedding (Tancik et al. 2020, Eq. 5), used
by NCSN++ (Song et al. 2021, Appendix H.1), draws the frequencies once from
``N(0, scale**2)`` and keeps them as a fixed buffer.

Pitfall: the highest frequency sets how wiggly the features are as functions of c_noise.
With frequencies far above the range of c_noise (NCSN++ uses ``scale=16``, so frequencies
reach ~50 cycles per unit) a small MLP on 2-D toy data has to untangle fast oscillations
and learns slowly: a 2-D EDM teacher with Fourier frequencies up to 64 produced plain noise
for its first 2,000-4,000 steps, while capping them at 4-8 made it learn at once
(/work/shared/MEASURE.md). For toy models keep ``max_freq`` / ``scale`` small (about 1) or
feed c_noise itself; large values suit big image networks with a wide c_noise range.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SinusoidalEmbedding", "FourierEmbedding"]


def _as_batch(c_noise: torch.Tensor) -> torch.Tensor:
    """Check that ``c_noise`` is a (B,) tensor and return it in float32."""
    c_noise = torch.as_tensor(c_noise)
    if c_noise.ndim != 1:
        raise ValueError(
            f"c_noise must have shape (B,), got {tuple(c_noise.shape)}; "
            "broadcast a scalar with c_noise.expand(batch_size)"
        )
    # Embeddings are computed in float32 even under autocast: cos/sin of large arguments
    # lose all precision in bfloat16.
    return c_noise.float()


class SinusoidalEmbedding(nn.Module):
    """Transformer/DDPM sinusoidal embedding: ``[cos(f_i c), sin(f_i c)]`` (Vaswani et al. 2017).

    Frequencies (in radians per unit of c_noise) are
    ``f_i = max_freq * max_period ** (-i / (dim/2 - 1))`` for ``i = 0 .. dim/2 - 1``, i.e.
    geometric from ``max_freq`` down to ``max_freq / max_period`` with both ends included
    (EDM's ``endpoint=True``). ``max_period=10000, max_freq=1`` is DDPM's and EDM's choice,
    meant for inputs spanning hundreds of units (DDPM timesteps 0..999).
    """

    def __init__(self, dim: int, max_period: float = 10000.0, max_freq: float = 1.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even number >= 2, got {dim}")
        if max_period < 1 or max_freq <= 0:
            raise ValueError(
                f"need max_period >= 1 and max_freq > 0, got {max_period}, {max_freq}"
            )
        self.dim, self.max_period, self.max_freq = dim, float(max_period), float(max_freq)
        half = dim // 2
        exponent = torch.arange(half, dtype=torch.float64) / max(half - 1, 1)
        freqs = max_freq * (1.0 / max_period) ** exponent
        # Deterministic function of the arguments, so not saved in checkpoints.
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        """Embed c_noise of shape (B,) into (B, dim) float32 features."""
        angles = _as_batch(c_noise)[:, None] * self.freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period:g}, max_freq={self.max_freq:g}"


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi f_i c), sin(2 pi f_i c)]``, ``f_i ~ N(0, scale^2)`` (Tancik et al. 2020).

    The frequencies (in cycles per unit of c_noise) are drawn once and stored as a buffer,
    so they travel with the checkpoint. ``seed`` makes them independent of the global RNG
    (two models built with the same seed share the same features); ``seed=None`` draws from
    the global RNG. About 99.7% of the frequencies lie below ``3 * scale``.
    """

    def __init__(self, dim: int, scale: float = 1.0, seed: int | None = 0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even number >= 2, got {dim}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.dim, self.scale = dim, float(scale)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        freqs = torch.randn(dim // 2, generator=generator) * scale
        self.register_buffer("freqs", freqs)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        """Embed c_noise of shape (B,) into (B, dim) float32 features."""
        angles = _as_batch(c_noise)[:, None] * (2 * math.pi * self.freqs.float()[None, :])
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale:g}"
