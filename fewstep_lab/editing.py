"""Zero-shot image editing with a consistency model (Song et al. 2023, "Consistency Models").

Algorithm 4 of the paper (appendix D) runs multistep consistency sampling and, after every
evaluation of the consistency function ``f``, overwrites the components of the image that
are known. The components are taken in an orthogonal basis ``A`` (``A^{-1} = A^T``)::

    x <- A^T [ (A y) * Omega + (A x) * (1 - Omega) ]

Here ``Omega = 1`` marks a KNOWN component (the paper's Algorithm 4 writes the opposite
convention, Omega = 1 for the components to generate). Following the algorithm, the first
noisy sample is ``A^T[(A y) * Omega] + sigmas[0] * z``: the known part of the reference
plus noise. The projection is also applied after the last ``f``, so the returned image
satisfies the constraint exactly (up to float rounding). Choices of ``A``:

- inpainting: ``A`` = identity, ``Omega`` = the pixel mask;
- colorization: per pixel a 3x3 orthogonal ``Q`` whose first row is the normalised
  luminance weights (0.2989, 0.5870, 0.1140) / norm, completed by Gram-Schmidt; the first
  component (luminance) is known;
- super-resolution: per ``factor x factor`` block an orthogonal basis whose first vector is
  uniform, ``1 / factor``; the first component (the block average times ``factor``) is known.

Three more edits from the paper need no projection: denoising (Algorithm 4 with nothing known,
started from the noisy image itself at its own noise level: ``denoise``), stroke-guided
generation (SDEdit, Meng et al. 2022, started from a stroke painting at a moderate noise level)
and interpolation (slerp between two Gaussian noises, then one step of ``f`` at ``sigma_max``).
Images are ``(B, C, H, W)`` in ``[-1, 1]``; results are not clamped (clamping would break
the constraint). The sampling loop is ``fewstep_lab.sampling.sample_consistency``.

How to use::

    from fewstep_lab.editing import inpaint, colorize, super_resolve, downsample, to_grayscale
    sigmas = torch.tensor([80.0, 24.4, 5.84, 0.9, 0.661, 0.0])  # decreasing, ends in 0
    g = torch.Generator().manual_seed(0)
    x = inpaint(f, y, mask, sigmas, generator=g)               # x * mask == y * mask
    x = colorize(f, to_grayscale(y), sigmas, generator=g)      # to_grayscale(x) == to_grayscale(y)
    x = super_resolve(f, downsample(y, 4), 4, sigmas, generator=g)  # downsample(x, 4) == y_low
    x = denoise(f, y + 0.5 * torch.randn_like(y), 0.5)          # f(y + 0.5 z, 0.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor

from fewstep_lab.sampling import randn_like, sample_consistency
from fewstep_lab.schedules import check_sigmas

# ITU-R BT.601 luma weights; they sum to 0.9999, so a gray image (g, g, g) has luminance ~g.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)


def _check_sigmas(sigmas, sigma_min: float) -> Tensor:
    sigmas = check_sigmas(sigmas)  # 1-D, strictly decreasing, ends in 0
    if float(sigmas[-2]) < sigma_min:
        raise ValueError(f"every positive sigma must be >= sigma_min={sigma_min} (consistency "
                         f"models are defined on [sigma_min, sigma_max]), got {float(sigmas[-2])}; "
                         f"drop the levels below sigma_min or lower sigma_min.")
    return sigmas


# --------------------------------------------------------------------------- projection
@dataclass(frozen=True)
class LinearConstraint:
    """Projection of Algorithm 4: x -> A^T[known * omega + (A x) * (1 - omega)], A orthogonal.

    ``A`` maps an image to coefficients, ``A_T`` is its transpose (= inverse); ``known`` is
    ``A y`` (only its entries where ``omega = 1`` matter) and ``omega`` (1 = known) broadcasts
    against ``A(x)``.
    """

    A: Callable[[Tensor], Tensor]
    A_T: Callable[[Tensor], Tensor]
    known: Tensor
    omega: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        return self.A_T(self.known * self.omega + self.A(x) * (1 - self.omega))

    def reference(self) -> Tensor:
        """The known part of the reference in image space, A^T[(A y) * omega] (line 2 of Algorithm 4)."""
        return self.A_T(self.known * self.omega)


def sample_with_constraint(f, constraint: LinearConstraint, sigmas, *, cond=None, generator=None,
                           sigma_min: float = 0.002) -> Tensor:
    """Algorithm 4 of Song et al. 2023: multistep consistency sampling projected after every f."""
    sigmas = _check_sigmas(sigmas, sigma_min)
    y0 = constraint.reference()
    x = y0 + float(sigmas[0]) * randn_like(y0, generator)
    return sample_consistency(f, x, sigmas, cond=cond, generator=generator, sigma_min=sigma_min,
                              project=constraint)


def orthogonal_completion(v) -> Tensor:
    """Gram-Schmidt: an (n, n) orthogonal float64 matrix whose first row is v / |v|."""
    v = torch.as_tensor(v, dtype=torch.float64).flatten()
    if v.numel() == 0 or float(v.norm()) == 0.0:
        raise ValueError("orthogonal_completion needs a non-zero vector; pass the first basis vector.")
    n = v.numel()
    rows = [v / v.norm()]
    for e in torch.eye(n, dtype=torch.float64):  # candidates: the standard basis
        if len(rows) == n:
            break
        r = e.clone()
        for _ in range(2):  # orthogonalise twice so rounding errors do not accumulate
            for q in rows:
                r = r - (q @ r) * q
        if float(r.norm()) > 1e-6:  # skip the one candidate that lies in the span already
            rows.append(r / r.norm())
    return torch.stack(rows)


# --------------------------------------------------------------------------- inpainting
def inpaint(f, y: Tensor, mask: Tensor, sigmas, *, cond=None, generator=None,
            sigma_min: float = 0.002) -> Tensor:
    """Inpainting by Algorithm 4 of Song et al. 2023 (A = identity); mask (B or 1, 1 or C, H, W), 1 = known."""
    if y.ndim != 4:
        raise ValueError(f"y must be an image batch (B, C, H, W), got shape {tuple(y.shape)}.")
    B, C, H, W = y.shape
    if (mask.ndim != 4 or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, C)
            or tuple(mask.shape[2:]) != (H, W)):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match y {tuple(y.shape)}; "
                         f"pass a mask of shape ({B} or 1, {C} or 1, {H}, {W}).")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 and 1 (1 = known pixel); threshold it, e.g. (mask > 0.5).float().")
    mask = mask.to(dtype=y.dtype, device=y.device)
    identity = lambda t: t  # noqa: E731
    return sample_with_constraint(f, LinearConstraint(identity, identity, y, mask), sigmas,
                                  cond=cond, generator=generator, sigma_min=sigma_min)


# --------------------------------------------------------------------------- colorization
def luminance_basis() -> Tensor:
    """Appendix D of Song et al. 2023: 3x3 orthogonal Q, first row = normalised luminance weights."""
    return orthogonal_completion(torch.tensor(LUMA_WEIGHTS, dtype=torch.float64))


def to_grayscale(x: Tensor) -> Tensor:
    """Luminance (B, 3, H, W) -> (B, 1, H, W), 0.2989 R + 0.5870 G + 0.1140 B in the same [-1, 1] units."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"to_grayscale needs RGB images (B, 3, H, W), got shape {tuple(x.shape)}.")
    w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device)
    return torch.einsum("c,bchw->bhw", w, x).unsqueeze(1)


def colorize(f, y_gray: Tensor, sigmas, *, cond=None, generator=None,
             sigma_min: float = 0.002) -> Tensor:
    """Colorization by Algorithm 4 of Song et al. 2023; y_gray = to_grayscale(image), (B, 1, H, W)."""
    if y_gray.ndim != 4 or y_gray.shape[1] != 1:
        raise ValueError(f"y_gray must be (B, 1, H, W) luminance, got shape {tuple(y_gray.shape)}; "
                         f"make it with to_grayscale(x).")
    Q = luminance_basis().to(dtype=y_gray.dtype, device=y_gray.device)
    A = lambda x: torch.einsum("ij,bjhw->bihw", Q, x)  # noqa: E731
    A_T = lambda c: torch.einsum("ji,bjhw->bihw", Q, c)  # noqa: E731
    # First component of Q x is (w . x) / |w| = luminance / |w|; the other two are unknown.
    w_norm = math.sqrt(sum(v * v for v in LUMA_WEIGHTS))
    known = torch.cat([y_gray / w_norm, torch.zeros_like(y_gray).expand(-1, 2, -1, -1)], dim=1)
    omega = torch.tensor([1.0, 0.0, 0.0], dtype=y_gray.dtype, device=y_gray.device).view(1, 3, 1, 1)
    return sample_with_constraint(f, LinearConstraint(A, A_T, known, omega), sigmas,
                                  cond=cond, generator=generator, sigma_min=sigma_min)


# --------------------------------------------------------------------------- super-resolution
def _check_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}.")
    return factor


def downsample(x: Tensor, factor: int) -> Tensor:
    """Block average: (B, C, H, W) -> (B, C, H/factor, W/factor)."""
    factor = _check_factor(factor)
    if x.ndim != 4 or x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(f"downsample needs (B, C, H, W) with H and W divisible by factor={factor}, "
                         f"got shape {tuple(x.shape)}; crop or pad the image to a multiple of {factor}.")
    return nnf.avg_pool2d(x, factor)


def block_basis(factor: int) -> Tensor:
    """Appendix D of Song et al. 2023: (factor^2, factor^2) orthogonal basis, first row uniform 1/factor."""
    factor = _check_factor(factor)
    return orthogonal_completion(torch.ones(factor * factor, dtype=torch.float64))


def _to_blocks(x: Tensor, p: int) -> Tensor:  # (B, C, H, W) -> (B, C, H/p, W/p, p*p)
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H // p, W // p, p * p)


def _from_blocks(b: Tensor, p: int) -> Tensor:  # inverse of _to_blocks
    B, C, h, w, _ = b.shape
    return b.reshape(B, C, h, w, p, p).permute(0, 1, 2, 4, 3, 5).reshape(B, C, h * p, w * p)


def super_resolve(f, y_low: Tensor, factor: int, sigmas, *, cond=None, generator=None,
                  sigma_min: float = 0.002) -> Tensor:
    """Super-resolution by Algorithm 4 of Song et al. 2023; y_low (B, C, H/factor, W/factor) -> (B, C, H, W)."""
    factor = _check_factor(factor)
    if y_low.ndim != 4:
        raise ValueError(f"y_low must be an image batch (B, C, h, w), got shape {tuple(y_low.shape)}.")
    Q = block_basis(factor).to(dtype=y_low.dtype, device=y_low.device)
    A = lambda x: _to_blocks(x, factor) @ Q.T  # noqa: E731
    A_T = lambda c: _from_blocks(c @ Q, factor)  # noqa: E731
    # First coefficient of a block is sum(block) / factor = factor * mean(block).
    known = nnf.pad((factor * y_low).unsqueeze(-1), (0, factor * factor - 1))
    omega = torch.zeros(factor * factor, dtype=y_low.dtype, device=y_low.device)
    omega[0] = 1.0
    return sample_with_constraint(f, LinearConstraint(A, A_T, known, omega), sigmas,
                                  cond=cond, generator=generator, sigma_min=sigma_min)


# --------------------------------------------------------------------------- denoising
def denoise(f, x_noisy: Tensor, sigma: float, later_sigmas: Sequence[float] = (), *, cond=None, generator=None,
            sigma_min: float = 0.002) -> Tensor:
    """Zero-shot denoising (Song et al. 2023, sec. 6): Algorithm 4 with nothing known (Omega = 0),
    started from the noisy image itself, x_noisy = y + sigma z, at its own level sigma.

    One step is f(x_noisy, sigma); `later_sigmas` (decreasing, below sigma) add multistep
    re-noising as in Algorithm 1. No projection: the noisy image is no constraint.
    """
    levels = [float(sigma), *(float(s) for s in later_sigmas)]
    sigmas = _check_sigmas(torch.tensor(levels + [0.0], dtype=torch.float64), sigma_min)
    return sample_consistency(f, x_noisy, sigmas, cond=cond, generator=generator, sigma_min=sigma_min)


# --------------------------------------------------------------------------- stroke guidance
def stroke_guided(f, strokes: Tensor, sigmas, *, cond=None, generator=None,
                  sigma_min: float = 0.002) -> Tensor:
    """Stroke-guided generation (SDEdit, Meng et al. 2022) with multistep consistency sampling.

    Our construction (no public reference implements it): x = strokes + sigmas[0] * z, then
    ``sample_consistency`` over ``sigmas`` with no projection, so the strokes only guide the
    colours and layout. ``sigmas[0]`` trades faithfulness (small) for realism (large); for
    images in [-1, 1] a start between about 10 and 40 is a reasonable range.
    """
    sigmas = _check_sigmas(sigmas, sigma_min)
    x = strokes + float(sigmas[0]) * randn_like(strokes, generator)
    return sample_consistency(f, x, sigmas, cond=cond, generator=generator, sigma_min=sigma_min)


# --------------------------------------------------------------------------- interpolation
def slerp(z0: Tensor, z1: Tensor, alpha: float) -> Tensor:
    """Spherical linear interpolation per batch element (angle between flattened z0[b], z1[b])."""
    if z0.shape != z1.shape:
        raise ValueError(f"slerp needs z0 and z1 of the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}.")
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    safe = sin > 1e-6  # (anti)parallel vectors: the great circle is undefined, use a straight line
    sin_ = torch.where(safe, sin, torch.ones_like(sin))
    w0 = torch.where(safe, torch.sin((1 - alpha) * theta) / sin_, torch.full_like(sin, 1 - alpha))
    w1 = torch.where(safe, torch.sin(alpha * theta) / sin_, torch.full_like(sin, alpha))
    shape = (-1,) + (1,) * (z0.ndim - 1)
    return w0.view(shape) * z0 + w1.view(shape) * z1


def interpolate(f, z0: Tensor, z1: Tensor, alphas: Sequence[float], sigma_max: float = 80.0,
                cond=None) -> Tensor:
    """Interpolation of Song et al. 2023 (sec. 6): f(slerp(z0, z1, alpha) * sigma_max, sigma_max) per alpha.

    z0, z1 are standard Gaussian noises (B, C, H, W); returns (len(alphas), B, C, H, W).
    """
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be positive, got {sigma_max}; use the model's largest noise level.")
    sigma = torch.full((z0.shape[0],), float(sigma_max), dtype=z0.dtype, device=z0.device)
    return torch.stack([f(slerp(z0, z1, float(a)) * sigma_max, sigma, cond=cond) for a in alphas])
