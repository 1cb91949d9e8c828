"""Sample-quality metrics for 2-D data, measured honestly (see the README's "Results").

- Exact W2 (the optimal assignment between two equal-size point sets, Kuhn–Munkres via
  scipy's linear_sum_assignment): sharp, O(n^3), for n up to a few thousand.
- Sliced W2 (Rabin et al. 2011; Bonneel et al. 2015, eq. 4): the root mean over random unit
  directions of the squared 1-D W2 between projections, computed by sorting; O(n log n), so it
  is usable at n = 100,000, where it separates samplers that exact W2 on 2,000 points cannot.
- Energy distance (Székely & Rizzo 2013), a V-statistic.
- For Gaussian mixtures: the mode-weight error (total variation between the assignment
  histogram of the samples and the true weights), which shows mode dropping an average hides.
- For labelled mixtures (classifier-free guidance, notebook 07): per class, the sliced W2 to the class's
  own distribution, the within-mode spread and mode shift, mode coverage and off-mode mass
  (`per_class_metrics`, `per_class_table`).
Every distance is to be reported beside its *noise floor*: the same distance between two
fresh samples of the true distribution (`noise_floor`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["w2_exact", "sliced_w2", "energy_distance", "mode_weight_error", "noise_floor", "mean_std",
           "sliced_w2_unequal", "class_sliced_w2", "class_spread", "class_spread_data", "class_mode_shift",
           "class_mode_coverage", "off_mode_data", "per_class_table", "per_class_metrics"]


def _as2d(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; the sampler diverged")
    return x.detach().to("cpu", torch.float64)


def w2_exact(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact 2-Wasserstein distance between two equal-size empirical measures (optimal assignment)."""
    from scipy.optimize import linear_sum_assignment

    x, y = _as2d(x, "x"), _as2d(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"w2_exact needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] > 5000:
        raise ValueError("w2_exact is O(n^3); use n <= 5000 or sliced_w2 for larger samples")
    cost = torch.cdist(x, y) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    return math.sqrt(float(cost[rows, cols].mean()))


def _sorted_projections(x, y, num_projections: int, generator):
    """x and y projected on the same random unit directions, each row sorted: (P, n) and (P, m) float64."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    dirs = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    # (P, n) rows: sorting contiguous rows is several times faster than sorting strided columns.
    px, _ = torch.sort((x @ dirs).T.contiguous(), dim=1)
    py, _ = torch.sort((y @ dirs).T.contiguous(), dim=1)
    return px, py


def sliced_w2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, generator=None) -> float:
    """Sliced 2-Wasserstein distance with random directions, by sorting projections (equal n)."""
    x, y = _as2d(x, "x"), _as2d(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"sliced_w2 needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    px, py = _sorted_projections(x, y, num_projections, generator)
    return math.sqrt(float(((px - py) ** 2).mean()))


def energy_distance(x: torch.Tensor, y: torch.Tensor, max_points: int = 4000) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic), on at most max_points of each."""
    x, y = _as2d(x, "x")[:max_points], _as2d(y, "y")[:max_points]
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mode_weight_error(mixture, x: torch.Tensor) -> float:
    """Total variation between the samples' most-likely-component histogram and the mixture weights."""
    x = _as2d(x, "x")
    labels = mixture.assign(x)
    hist = torch.bincount(labels, minlength=len(mixture.weights)).double() / len(labels)
    return 0.5 * float((hist - mixture.weights).abs().sum())


def noise_floor(
    sample: Callable[[int, torch.Generator], torch.Tensor],
    n: int,
    metric: Callable = sliced_w2,
    seeds=(0, 1, 2),
) -> list[float]:
    """The metric between two independent fresh samples of the truth, one value per seed."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(10_000 + s)
        out.append(metric(sample(n, g), sample(n, g)))
    return out


def mean_std(values) -> tuple[float, float]:
    """Mean and (sample) standard deviation of a list of numbers; std 0 for one value."""
    v = torch.tensor(list(values), dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Guidance on a labelled mixture: quality and diversity per class (notebook 07).
#
# Classifier-free guidance (Ho & Salimans 2022) trades diversity for "quality". On a labelled Gaussian mixture
# (data/labelled.py) both sides can be measured against the exact class-conditional distribution p(x0 | c):
# - quality:   sliced W2 between the samples generated for class c and fresh samples of p(x0 | c)
#              (`class_sliced_w2`), beside its data-vs-data floor at the same n (see the module docstring);
# - spread:    the pooled within-mode standard deviation of the samples, each at its nearest mode of class c
#              (`class_spread`), beside the data's own value sqrt(sum_k w_k|c tr S_k) (`class_spread_data`),
#              and how far the samples' per-mode means sit from the true modes (`class_mode_shift`);
# - coverage:  the share of the samples that lands on each mode of class c (within a Mahalanobis radius),
#              the fraction of modes that receive at least a given part of their expected share, and the
#              fraction of samples on none of the class's modes (`class_mode_coverage`), beside the data's own
#              off-mode fraction P(chi^2_d > radius^2) (`off_mode_data`).
# ---------------------------------------------------------------------------------------------------------------------


def _class_components(mixture, c: int):
    """Means (K_c, d), covariances (K_c, d, d) and within-class weights (K_c,) of class c, float64."""
    cm = mixture.class_mixture(int(c))
    return cm.means, cm.covs, cm.weights


def sliced_w2_unequal(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, generator=None) -> float:
    """Sliced W2 between point sets of any sizes n and m: exact 1-D W2 of each projection's quantile functions.

    For empirical measures on the line, W2^2 = int_0^1 (F_x^-1(u) - F_y^-1(u))^2 du with step quantile
    functions; the integral is a finite sum over the merged breakpoints {i/n} U {j/m}. With n = m it equals
    `sliced_w2` (same directions for the same generator).
    """
    x, y = _as2d(x, "x"), _as2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    px, py = _sorted_projections(x, y, num_projections, generator)
    n, m = px.shape[1], py.shape[1]
    # breakpoints of both step functions, in (0, 1]; on (u_{k-1}, u_k] the quantile indices are constant
    u = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                                torch.arange(1, m + 1, dtype=torch.float64) / m]))
    du = torch.diff(u, prepend=u.new_zeros(1))
    mid = u - du / 2
    ix = torch.clamp((mid * n).long(), max=n - 1)
    iy = torch.clamp((mid * m).long(), max=m - 1)
    return math.sqrt(float((((px[:, ix] - py[:, iy]) ** 2) * du).sum(1).mean()))


def class_sliced_w2(samples: torch.Tensor, mixture, c: int, n_ref: int | None = None, seed: int = 0,
                    num_projections: int = 256) -> float:
    """Sliced W2 between samples generated for class c and n_ref fresh samples of p(x0 | c).

    The reference is ``mixture.class_mixture(c).sample(n_ref, torch.Generator().manual_seed(seed))``
    (n_ref = len(samples) when None); the directions come from a generator seeded with ``seed`` too.
    Report it beside its floor: the same call on fresh data samples drawn with another seed.
    """
    samples = _as2d(samples, "samples")
    n_ref = samples.shape[0] if n_ref is None else int(n_ref)
    ref = mixture.class_mixture(int(c)).sample(n_ref, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    if n_ref == samples.shape[0]:
        return sliced_w2(samples, ref, num_projections, gen)
    return sliced_w2_unequal(samples, ref, num_projections, gen)


def _nearest_class_mode(x: torch.Tensor, mixture, c: int):
    """Index (within the class) of each point's nearest class-c mode and the squared distance to it."""
    means, _, _ = _class_components(mixture, c)
    d2 = torch.cdist(x, means.to(x.device)) ** 2
    return d2.min(1)


def _per_mode_moments(x: torch.Tensor, mixture, c: int):
    """Nearest class-c mode of each point, then per mode: share of the points, their mean and their variance."""
    means, _, _ = _class_components(mixture, c)
    _, k = _nearest_class_mode(x, mixture, c)
    K = len(means)
    counts = torch.bincount(k, minlength=K).double()
    share = counts / x.shape[0]
    sums = torch.zeros(K, x.shape[1], dtype=torch.float64).index_add_(0, k, x)
    centre = sums / counts.clamp(min=1)[:, None]
    sq = torch.zeros(K, dtype=torch.float64).index_add_(0, k, ((x - centre[k]) ** 2).sum(1))
    return means, share, centre, sq / counts.clamp(min=1)


def class_spread(samples: torch.Tensor, mixture, c: int) -> float:
    """Within-mode spread: the pooled standard deviation of the samples around their own per-mode means.

    Each sample goes to its nearest mode (component mean) of class c; then
    spread^2 = sum_k share_k tr Cov_k, with Cov_k the covariance of the samples that went to mode k
    (about THEIR mean, so a shift of a whole mode does not count here: see `class_mode_shift`).
    For data of class c with well-separated modes it is `class_spread_data`; guidance that sharpens the
    modes makes it smaller, samples spread between or beyond the modes make it larger.
    """
    x = _as2d(samples, "samples")
    _, share, _, var = _per_mode_moments(x, mixture, c)
    return math.sqrt(float((share * var).sum()))


def class_mode_shift(samples: torch.Tensor, mixture, c: int) -> float:
    """How far the samples' per-mode means sit from the true modes: sqrt(sum_k share_k ||mean_k - mu_k||^2).

    With `class_spread` it splits the RMS distance to the nearest mode: rms^2 = spread^2 + shift^2.
    Zero (up to sampling error std/sqrt(n)) for data of the class.
    """
    x = _as2d(samples, "samples")
    means, share, centre, _ = _per_mode_moments(x, mixture, c)
    return math.sqrt(float((share * ((centre - means) ** 2).sum(1)).sum()))


def class_spread_data(mixture, c: int) -> float:
    """The data's own `class_spread` when the class's modes do not overlap: sqrt(sum_k w_k|c tr S_k)."""
    _, covs, w = _class_components(mixture, c)
    return math.sqrt(float((w * torch.diagonal(covs, dim1=-2, dim2=-1).sum(-1)).sum()))


def off_mode_data(dim: int, radius: float = 3.0) -> float:
    """Fraction of a Gaussian's own samples outside the Mahalanobis radius: P(chi^2_dim > radius^2)."""
    from scipy.stats import chi2

    return float(chi2.sf(radius**2, dim))


def class_mode_coverage(samples: torch.Tensor, mixture, c: int, radius: float = 3.0, min_share: float = 0.25) -> dict:
    """Which of class c's modes the samples reach, and how many samples reach none.

    A sample is ON mode k (a component of class c) when its Mahalanobis distance
    sqrt((x - mu_k)^T S_k^-1 (x - mu_k)) is at most `radius` (nearest such mode if several).
    Returns a dict with
      - ``shares``: (K_c,) fraction of the samples on each mode, in the order of ``class_mixture(c)``;
      - ``coverage``: fraction of the class's modes whose share is at least ``min_share`` times the
        mode's expected share (its weight within the class): 1.0 when no mode is dropped;
      - ``off_mode``: fraction of the samples on none of the class's modes; for data of class c with
        non-overlapping modes it is `off_mode_data(d, radius)` (1.1 % at radius 3 in 2-D).
    """
    x = _as2d(samples, "samples")
    means, covs, w = _class_components(mixture, c)
    diff = x[:, None, :] - means[None]  # (n, K_c, d)
    maha2 = (torch.einsum("kij,nkj->nki", torch.linalg.inv(covs), diff) * diff).sum(-1)  # (n, K_c)
    best, k = maha2.min(1)
    on = best <= radius**2
    shares = torch.bincount(k[on], minlength=len(means)).double() / x.shape[0]
    return {"shares": shares, "coverage": float((shares >= min_share * w).double().mean()),
            "off_mode": float(1.0 - on.double().mean())}


def per_class_table(samples: torch.Tensor, labels: torch.Tensor, mixture, *, floor_seed: int = 1, seed: int = 0,
                    radius: float = 3.0, min_share: float = 0.25, num_projections: int = 256) -> list[dict]:
    """One row per class of the labelled samples, then a "mean" row (unweighted mean over classes).

    Each row: ``class``, ``n``, ``swd`` (`class_sliced_w2` against fresh data of class c, seeded ``seed + c``),
    ``swd_floor`` (the same with fresh data, seeded ``10_000 + 100 floor_seed + c``, in place of the samples:
    data vs data at the same n), ``spread`` and ``spread_data`` with ``spread_ratio`` = spread / spread_data,
    ``mode_shift``, ``coverage``, ``off_mode`` and ``off_mode_data``. Classes without samples are skipped.
    """
    x = _as2d(samples, "samples")
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
    rows = []
    for c in range(mixture.num_classes):
        xc = x[labels == c]
        if len(xc) == 0:
            continue
        fresh = mixture.class_mixture(c).sample(len(xc), torch.Generator().manual_seed(10_000 + 100 * floor_seed + c))
        cov = class_mode_coverage(xc, mixture, c, radius, min_share)
        spread, spread_data = class_spread(xc, mixture, c), class_spread_data(mixture, c)
        shift = class_mode_shift(xc, mixture, c)
        rows.append({"class": c, "n": len(xc),
                     "swd": class_sliced_w2(xc, mixture, c, seed=seed + c, num_projections=num_projections),
                     "swd_floor": class_sliced_w2(fresh, mixture, c, seed=seed + c, num_projections=num_projections),
                     "spread": spread, "spread_data": spread_data, "spread_ratio": spread / spread_data,
                     "mode_shift": shift,
                     "coverage": cov["coverage"], "off_mode": cov["off_mode"],
                     "off_mode_data": off_mode_data(x.shape[1], radius)})
    if not rows:
        raise ValueError("no samples with a class label in 0..num_classes-1")
    keys = [k for k in rows[0] if k not in ("class", "n")]
    rows.append({"class": "mean", "n": sum(r["n"] for r in rows),
                 **{k: sum(r[k] for r in rows) / len(rows) for k in keys}})
    return rows


def per_class_metrics(sample_fn: Callable, mixture, n: int, *, seed: int = 0, **table_kw) -> list[dict]:
    """`per_class_table` of ``sample_fn(c, n, generator)`` (n points generated for class c) for every class.

    The generator of class c is seeded with ``seed * 1000 + c``; ``table_kw`` go to `per_class_table`
    (floor_seed, radius, min_share, num_projections).
    """
    xs, labels = [], []
    for c in range(mixture.num_classes):
        xc = torch.as_tensor(sample_fn(c, n, torch.Generator().manual_seed(seed * 1000 + c)))
        if xc.ndim != 2 or xc.shape[0] != n:
            raise ValueError(f"sample_fn(c, n, generator) must return (n, d) = ({n}, d) points, got {tuple(xc.shape)}")
        xs.append(xc.detach().cpu().double())
        labels.append(torch.full((n,), c, dtype=torch.long))
    return per_class_table(torch.cat(xs), torch.cat(labels), mixture, **table_kw)
