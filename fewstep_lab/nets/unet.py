"""DDPM++-style U-Net ``F(x_in, c_noise, cond=None)`` for images (Song et al. 2021; Karras et al. 2022).

The architecture follows DDPM++ of Song et al. 2021 ("Score-Based Generative Modeling through
Stochastic Differential Equations", Appendix H) in the simplified form of the ``SongUNet`` of
Karras et al. 2022 ("EDM", Appendix F.2, Table 7): residual blocks with GroupNorm + SiLU,
adaptive scale-shift conditioning ``h = norm(h) * (1 + scale) + shift`` on the noise (and
class) embedding, residual sums scaled by ``1/sqrt(2)``, multi-head self-attention at chosen
resolutions and in the bottleneck, box-filter down/up-sampling (average pooling / nearest
neighbour), skip connections from every encoder block, and zero-initialised last
convolutions (of each block, each attention and the output), so that every residual branch
starts at zero and ``F`` starts as the zero function. The network knows nothing about diffusion: ``c_noise``
is whatever the preconditioning (fewstep_lab/precond.py) hands it.

``emb_scale`` multiplies c_noise before the embedding. Which value suits which convention:
  * ``1.0``  -- DDPM discrete timesteps (c_noise = t in 0..999) and EDM's own choice for
    c_noise = 0.25 ln(sigma) (range about [-1.6, 1.1]) with the positional embedding;
  * ``1000`` -- c_noise = 0.25 ln(sigma) as in the consistency-model code of Song et al.
    2023, which feeds ``1000 * 0.25 ln(sigma)`` to a positional embedding: spreads c_noise
    over DDPM's timestep scale so all the embedding's frequencies are used;
  * with ``embedding="fourier"`` the features are ``cos(2 pi f emb_scale c_noise)`` with
    ``f ~ N(0, 1)``: ``emb_scale=16`` with c_noise = ln(sigma / 2) reproduces NCSN++ (EDM's VE
    setting). See fewstep_lab/nets/embeddings.py for why large values slow small models.

Parameter counts, measured with ``count_parameters(UNet(**unet_sizes[p]))`` (32x32x3 images,
unconditional; ``num_classes=10`` adds 11 * model_channels):
  * ``'smoke'`` (16 channels, mult (1, 1), 1 block):        89,363
  * ``'cpu'``   (24 channels, mult (1, 2, 2), 2 blocks):  1,073,019
  * ``'gpu'``   (128 channels, mult (2, 2, 2), 2 blocks): 37,883,139
  * the paper's DDPM++ (128 channels, mult (2, 2, 2), 4 blocks): 60,066,563 here, of which
    4,333,824 come from the scale-shift affine layers (DDPM++ adds a shift only); without
    them it has 55,732,739, the ~56M of the paper. So 'gpu' is 0.63x of DDPM++ as built
    here, 0.68x of the paper's figure, and 0.60x its compute (25.4 vs 42.4 GFLOP per
    forward pass of one image, ``torch.utils.flop_counter.FlopCounterMode``).

Differences from EDM's SongUNet, on purpose: scale-shift conditioning (ADM's, asked for by
the course) instead of DDPM++'s additive shift; 64 channels per attention head instead of
one head; exact zero init instead of 1e-5; labels through an ``nn.Embedding`` with a learnt
"no label" row instead of a linear map of one-hot vectors.

Guidance embedding (latent consistency models, Luo et al. 2023, sec. 4.2): with
``guidance_embed=True`` the net also takes the guidance scale w, ``cond = (labels, w)`` (labels
None for an unconditional net; w a float or a (B,) tensor). w enters as LCM does it (diffusers'
``time_cond_proj_dim``): a sinusoidal embedding of ``w_scale * w`` (LCM: 1000 w) mapped by a small
SiLU MLP and added to the noise embedding before the embedding MLP. The w MLP's last layer is
zero-initialised, so such a net starts as the same net without it: a student copied from its teacher
(``methods.base.copy_teacher_net(own_prefixes=("w_",))``; every w parameter is named ``w_*``)
predicts what the teacher predicts. Off by default; a net without it has the state-dict keys it
had before the option existed (as ``nets.mlp``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewstep_lab.nets.embeddings import FourierEmbedding, SinusoidalEmbedding

__all__ = ["UNet", "unet_sizes", "count_parameters"]

SKIP_SCALE = 1 / math.sqrt(2)  # keeps the variance of residual sums constant (DDPM++)
CHANNELS_PER_HEAD = 64  # attention heads = channels // 64, at least one (EDM, Table 7)

unet_sizes: dict[str, dict] = {
    # < 100k parameters (89,363): for tests and notebook smoke runs.
    "smoke": dict(model_channels=16, channel_mult=(1, 1), num_blocks=1,
                  attn_resolutions=(16,), dropout=0.0),
    # about 1M parameters (1,073,019): trains a little on 2 CPU cores.
    "cpu": dict(model_channels=24, channel_mult=(1, 2, 2), num_blocks=2,
                attn_resolutions=(16,), dropout=0.1),
    # DDPM++ (128 channels, mult (2, 2, 2), attention at 16x16, dropout 0.13) with 2 instead
    # of 4 blocks per level: 37.9M parameters, 0.68x the paper's ~56M, for one GPU.
    "gpu": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=2,
                attn_resolutions=(16,), dropout=0.13),
}


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _init(layer: nn.Module, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weights times ``gain`` (0 = zero init) and zero bias, as in DDPM++."""
    if gain == 0:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, C/4) groups (EDM's choice)."""
    groups = min(32, channels // 4)
    if groups < 1 or channels % groups:
        raise ValueError(
            f"{channels} channels cannot be split into {groups} GroupNorm groups; "
            "choose model_channels * channel_mult as a multiple of 4 (of 32 above 128)"
        )
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """Box-filter resampling: 2x2 average pooling ('down') or nearest upsampling ('up')."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ResBlock(nn.Module):
    """DDPM++ residual block with adaptive scale-shift and optional self-attention."""

    def __init__(self, cin: int, cout: int, emb_channels: int, dropout: float,
                 resample: str | None = None, attention: bool = False):
        super().__init__()
        self.resample, self.attention = resample, attention
        self.norm0 = _norm(cin)
        self.conv0 = _init(nn.Conv2d(cin, cout, 3, padding=1))
        self.affine = _init(nn.Linear(emb_channels, 2 * cout))
        self.norm1 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _init(nn.Conv2d(cout, cout, 3, padding=1), gain=0.0)
        needs_proj = cin != cout or resample is not None
        self.skip = _init(nn.Conv2d(cin, cout, 1)) if needs_proj else nn.Identity()
        if attention:
            self.num_heads = max(1, cout // CHANNELS_PER_HEAD)
            if cout % self.num_heads:
                raise ValueError(f"{cout} channels do not split into {self.num_heads} heads")
            self.norm2 = _norm(cout)
            self.qkv = _init(nn.Conv2d(cout, 3 * cout, 1), gain=math.sqrt(0.2))
            self.proj = _init(nn.Conv2d(cout, cout, 1), gain=0.0)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(_resample(F.silu(self.norm0(x)), self.resample))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))  # dropout is active in train() mode only
        x = (h + self.skip(_resample(x, self.resample))) * SKIP_SCALE
        if self.attention:
            b, c, height, width = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(b, 3, self.num_heads, c // self.num_heads, -1)
            q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
            a = F.scaled_dot_product_attention(q, k, v)
            a = a.transpose(-1, -2).reshape(b, c, height, width)
            x = (x + self.proj(a)) * SKIP_SCALE
        return x


class UNet(nn.Module):
    """DDPM++ U-Net of Song et al. 2021 as simplified in EDM's SongUNet (Karras et al. 2022, Table 7).

    Args:
        in_channels, out_channels: image channels of ``x_in`` and of the output.
        resolution: input height = width; must be divisible by ``2**(len(channel_mult)-1)``.
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]``
            channels and the embedding MLP has ``4 * model_channels``.
        channel_mult: one multiplier per resolution level (each level halves the size).
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: resolutions (e.g. 16) whose blocks get self-attention; the
            bottleneck always has one attention block.
        dropout: dropout probability inside residual blocks (train() mode only).
        num_classes: None for an unconditional net; else ``cond`` holds labels in
            ``0..num_classes``, where ``num_classes`` itself means "no label" (the learnt
            null embedding used when labels are dropped for classifier-free guidance).
        embedding: "positional" (SinusoidalEmbedding) or "fourier" (FourierEmbedding,
            unit-scale frequencies).
        emb_scale: c_noise is multiplied by this before the embedding (see module docstring).
        guidance_embed: also take the guidance scale w, ``cond = (labels, w)`` (module docstring).
        w_scale: w is multiplied by this before its sinusoidal embedding (LCM: 1000).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, resolution: int = 32,
                 model_channels: int = 64, channel_mult: tuple[int, ...] = (1, 2, 2),
                 num_blocks: int = 2, attn_resolutions: tuple[int, ...] = (16,),
                 dropout: float = 0.1, num_classes: int | None = None,
                 embedding: str = "positional", emb_scale: float = 1.0,
                 guidance_embed: bool = False, w_scale: float = 1000.0):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or resolution % 2 ** (levels - 1):
            raise ValueError(
                f"resolution {resolution} is not divisible by 2**{levels - 1} "
                f"(channel_mult={channel_mult}); use fewer levels or another resolution"
            )
        self.in_channels, self.resolution = in_channels, resolution
        self.num_classes, self.emb_scale = num_classes, float(emb_scale)
        emb_channels = 4 * model_channels

        if embedding == "positional":
            self.embed = SinusoidalEmbedding(model_channels)
        elif embedding == "fourier":
            self.embed = FourierEmbedding(model_channels, scale=1.0)
        else:
            raise ValueError(f"embedding must be 'positional' or 'fourier', got {embedding!r}")
        self.label_embed = None
        if num_classes is not None:
            # One extra row: index num_classes is the "unconditional" (dropped) label.
            self.label_embed = nn.Embedding(num_classes + 1, model_channels)
            nn.init.xavier_uniform_(self.label_embed.weight)
        self.map0 = _init(nn.Linear(model_channels, emb_channels))
        self.map1 = _init(nn.Linear(emb_channels, emb_channels))

        # Encoder: every output (including the input conv's) is kept as a skip.
        cout, res = model_channels, resolution
        self.conv_in = _init(nn.Conv2d(in_channels, cout, 3, padding=1))
        self.enc, skip_channels = nn.ModuleList(), [cout]
        for level, mult in enumerate(channel_mult):
            if level > 0:
                res //= 2
                self.enc.append(ResBlock(cout, cout, emb_channels, dropout, resample="down"))
                skip_channels.append(cout)
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc.append(ResBlock(cin, cout, emb_channels, dropout,
                                         attention=res in attn_resolutions))
                skip_channels.append(cout)

        # Decoder: bottleneck pair (attention + plain), then per level an upsampling block
        # and num_blocks + 1 blocks that each consume one skip.
        self.dec, self.dec_takes_skip = nn.ModuleList(), []
        for level in reversed(range(levels)):
            if level == levels - 1:
                new = [ResBlock(cout, cout, emb_channels, dropout, attention=True),
                       ResBlock(cout, cout, emb_channels, dropout)]
            else:
                res *= 2
                new = [ResBlock(cout, cout, emb_channels, dropout, resample="up")]
            self.dec.extend(new)
            self.dec_takes_skip.extend([False] * len(new))
            for i in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * channel_mult[level]
                attention = i == num_blocks and res in attn_resolutions
                self.dec.append(ResBlock(cin, cout, emb_channels, dropout, attention=attention))
                self.dec_takes_skip.append(True)
        self.norm_out = _norm(cout)
        self.conv_out = _init(nn.Conv2d(cout, out_channels, 3, padding=1), gain=0.0)
        # Built last, so that the other weights are drawn as without it (same seed, same shared weights).
        self.guidance_embed, self.w_scale = bool(guidance_embed), float(w_scale)
        if guidance_embed:
            # LCM's w-embedding; the zero last layer makes the branch start as "no w branch at all".
            self.w_embed = SinusoidalEmbedding(model_channels)
            self.w_map0 = _init(nn.Linear(model_channels, emb_channels))
            self.w_map1 = _init(nn.Linear(emb_channels, model_channels), gain=0.0)

    def _embedding(self, c_noise, cond, batch: int, device) -> torch.Tensor:
        """Noise (+ label) embedding passed through the two-layer SiLU MLP: (B, 4*model_channels)."""
        c_noise = torch.as_tensor(c_noise, device=device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        if c_noise.shape != (batch,):
            raise ValueError(f"c_noise must have shape ({batch},), got {tuple(c_noise.shape)}")
        emb = self.embed(c_noise.float() * self.emb_scale)
        if self.guidance_embed:
            if not (isinstance(cond, (tuple, list)) and len(cond) == 2):
                raise ValueError("this UNet takes the guidance scale: pass cond=(labels, w) (labels None for an "
                                 "unconditional net; w a float or a (B,) tensor)")
            cond, w = cond
            w = torch.as_tensor(w, dtype=torch.float32, device=device)
            w = w.expand(batch) if w.ndim == 0 else w
            if w.shape != (batch,):
                raise ValueError(f"w must be a float or have shape ({batch},), got {tuple(w.shape)}")
            emb = emb + self.w_map1(F.silu(self.w_map0(self.w_embed(w * self.w_scale))))
        if self.label_embed is None:
            if cond is not None:
                raise ValueError("this UNet is unconditional (num_classes=None) but got cond")
        else:
            if cond is None:
                raise ValueError(
                    f"this UNet is class-conditional: pass cond (B,) int64 labels; use "
                    f"cond=torch.full((B,), {self.num_classes}) for 'no label'"
                )
            cond = torch.as_tensor(cond, device=device)
            if cond.ndim == 0:
                cond = cond.expand(batch)
            if cond.shape != (batch,) or cond.is_floating_point():
                raise ValueError(f"cond must be integer labels of shape ({batch},)")
            if cond.min() < 0 or cond.max() > self.num_classes:
                raise ValueError(f"labels must lie in 0..{self.num_classes} "
                                 f"({self.num_classes} = unconditional)")
            emb = emb + self.label_embed(cond.long())
        return F.silu(self.map1(F.silu(self.map0(emb))))

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """F(x_in, c_noise, cond): (B, C_in, R, R) -> (B, C_out, R, R)."""
        if x_in.ndim != 4 or x_in.shape[1] != self.in_channels or \
                x_in.shape[2:] != (self.resolution, self.resolution):
            raise ValueError(
                f"expected x_in of shape (B, {self.in_channels}, {self.resolution}, "
                f"{self.resolution}), got {tuple(x_in.shape)}; build the UNet with "
                "matching in_channels / resolution"
            )
        emb = self._embedding(c_noise, cond, x_in.shape[0], x_in.device)
        h = self.conv_in(x_in)
        skips = [h]
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
        for block, takes_skip in zip(self.dec, self.dec_takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
