"""A noise-conditioned MLP for toy 2-D data: F(x_in, c_noise, cond) with no diffusion inside.

The noise level enters through a sinusoidal embedding (Vaswani et al. 2017; DDPM appendix B)
of ``noise_scale * c_noise`` with frequencies capped at ``max_freq``: on 2-D data high
frequencies slow learning badly (see nets/embeddings.py). Optional class conditioning adds a
learned label embedding; label ``num_classes`` is the "no label" token (pass it
explicitly; a missing label is an error) used by
classifier-free guidance (Ho & Salimans 2022). With ``guidance_embed=True`` the net also takes
the guidance scale w, as latent consistency models do (Luo et al. 2023, sec. 4.2: a sinusoidal
embedding of w added to the noise embedding); ``cond`` is then the pair ``(labels, w)``, w a float
or a (B,) tensor. The w branch's last layer starts at zero, so such a net starts as the same net
without it (a student copied from its teacher predicts what the teacher predicts); it is off by
default, and a net without it has the same parameters (state-dict keys) as before it existed.
"""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import SinusoidalEmbedding

__all__ = ["MLP"]


class MLP(nn.Module):
    """Residual SiLU MLP F(x_in, c_noise, cond=None) -> same shape as x_in."""

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        depth: int = 4,
        emb_dim: int = 32,
        max_freq: float = 8.0,
        max_period: float = 100.0,
        noise_scale: float = 1.0,
        num_classes: int | None = None,
        guidance_embed: bool = False,
        w_scale: float = 0.25,
    ):
        super().__init__()
        if depth < 1 or hidden < 1 or dim < 1:
            raise ValueError("MLP needs dim, hidden and depth >= 1")
        self.dim, self.noise_scale, self.num_classes = dim, float(noise_scale), num_classes
        self.embed = SinusoidalEmbedding(emb_dim, max_period=max_period, max_freq=max_freq)
        self.emb_mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.guidance_embed, self.w_scale = bool(guidance_embed), float(w_scale)
        if guidance_embed:
            # w in LCM's usual range [0, 15] times w_scale stays within the embedding's frequencies.
            self.w_embed = SinusoidalEmbedding(emb_dim, max_period=max_period, max_freq=max_freq)
            self.w_mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            nn.init.zeros_(self.w_mlp[-1].weight)
            nn.init.zeros_(self.w_mlp[-1].bias)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond=None) -> torch.Tensor:
        if x_in.ndim != 2 or x_in.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {tuple(x_in.shape)}")
        c_noise = torch.as_tensor(c_noise, device=x_in.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(x_in.shape[0])
        emb = self.emb_mlp(self.embed(c_noise * self.noise_scale))
        if self.guidance_embed:
            if not (isinstance(cond, (tuple, list)) and len(cond) == 2):
                raise ValueError("this MLP takes the guidance scale: pass cond=(labels, w) (labels None for an "
                                 "unconditional net; w a float or a (B,) tensor)")
            cond, w = cond
            w = torch.as_tensor(w, dtype=torch.float32, device=x_in.device)
            w = w.expand(x_in.shape[0]) if w.ndim == 0 else w
            emb = emb + self.w_mlp(self.w_embed(w * self.w_scale))
        if self.label is not None:
            if cond is None:
                raise ValueError(
                    f"this MLP is class-conditional: pass cond labels in [0, {self.num_classes}] "
                    f"({self.num_classes} = no label, for classifier-free guidance)"
                )
            emb = emb + self.label(cond.long())
        elif cond is not None:
            raise ValueError("this MLP was built without num_classes, so it takes no cond")
        h = self.inp(x_in) + emb
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)
