"""Per-class quality / diversity measures for guidance on a labelled mixture (metrics.py, notebook 07)."""

import math

import pytest
import torch

from fewstep_lab.data.labelled import LabelledGaussianMixture, eight_gaussians_4class
from fewstep_lab.guidance import CFGDenoiser
from fewstep_lab.metrics import (class_mode_coverage, class_sliced_w2, class_spread, class_spread_data,
                                 class_mode_shift,
                                 off_mode_data, per_class_metrics, per_class_table, sliced_w2, sliced_w2_unequal)
from fewstep_lab.sampling import sample_heun
from fewstep_lab.schedules import karras_sigmas

torch.set_num_threads(1)
MIX = eight_gaussians_4class()  # radius 0.7, std 0.05: class c has the modes at angles c*45 and c*45 + 180 degrees


def _dirs(seed, p=256, d=2):
    dirs = torch.randn(d, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return dirs / dirs.norm(dim=0, keepdim=True)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_unequal_sliced_w2_matches_equal_case_and_duplicates():
    x = torch.randn(300, 2, generator=_gen(0), dtype=torch.float64)
    y = torch.randn(300, 2, generator=_gen(1), dtype=torch.float64) + 0.3
    assert sliced_w2_unequal(x, y, generator=_gen(5)) == pytest.approx(sliced_w2(x, y, generator=_gen(5)), rel=1e-12)
    # every point twice is the same empirical measure: distance 0 although the sizes differ
    assert sliced_w2_unequal(x, torch.cat([x, x.flip(0)]), generator=_gen(5)) == pytest.approx(0.0, abs=1e-12)
    # a pure shift a: each projection moves by a.theta, so SW2^2 = mean over directions of (a.theta)^2
    a = torch.tensor([0.4, -0.2], dtype=torch.float64)
    expect = math.sqrt(float(((a @ _dirs(7)) ** 2).mean()))
    assert sliced_w2_unequal(x, x + a, generator=_gen(7)) == pytest.approx(expect, rel=1e-10)
    assert sliced_w2_unequal(x, torch.cat([x, x]) + a, generator=_gen(7)) == pytest.approx(expect, rel=1e-10)
    # sizes 300 and 200 of one distribution: close, and far from a shifted copy
    z = torch.randn(200, 2, generator=_gen(3), dtype=torch.float64)
    assert sliced_w2_unequal(x, z) < 0.3 < sliced_w2_unequal(x, z + 2.0)


def test_class_sliced_w2_of_a_shifted_reference_is_the_shift():
    n, seed = 4000, 3
    a = torch.tensor([0.1, 0.05])
    for c in (0, 2):
        ref = MIX.class_mixture(c).sample(n, _gen(seed))  # the reference class_sliced_w2 draws itself
        got = class_sliced_w2(ref + a, MIX, c, seed=seed)
        expect = math.sqrt(float(((a.double() @ _dirs(seed)) ** 2).mean()))
        assert got == pytest.approx(expect, rel=1e-5)
        assert got == pytest.approx(float(a.norm()) / math.sqrt(2), rel=0.08)  # E (a.theta)^2 = |a|^2 / d
        assert class_sliced_w2(ref, MIX, c, seed=seed) == pytest.approx(0.0, abs=1e-9)


def test_class_sliced_w2_separates_right_class_from_wrong_class():
    n = 20_000
    own = MIX.class_mixture(1).sample(n, _gen(11))
    floor = class_sliced_w2(own, MIX, 1, seed=0)
    wrong = class_sliced_w2(MIX.class_mixture(2).sample(n, _gen(12)), MIX, 1, seed=0)
    # the floor of a two-mode class is mostly the unequal counts per mode (shares 1/2 +- 1/sqrt(4n), modes
    # 1.4 apart: W2 ~ 1.4 sqrt(2 * 0.0035) ~ 0.1 at worst); a wrong class's modes sit 0.54 away from the right ones
    assert floor < 0.08, floor
    assert wrong > 4 * floor and wrong > 0.3, (wrong, floor)
    # n_ref different from n goes through the unequal-size form
    assert class_sliced_w2(own, MIX, 1, n_ref=2 * n, seed=0) < 0.08


def test_class_spread_and_shift_closed_forms():
    c = 3
    means = MIX.class_mixture(c).means
    assert class_spread_data(MIX, c) == pytest.approx(0.05 * math.sqrt(2), rel=1e-6)  # sqrt(tr S) = std sqrt(d)
    assert class_spread(means.repeat(5, 1), MIX, c) == pytest.approx(0.0, abs=1e-12)  # every point on a mode
    assert class_mode_shift(means.repeat(5, 1), MIX, c) == pytest.approx(0.0, abs=1e-12)
    # constructed points at distance exactly r around each mode: spread r, no shift
    ang = torch.linspace(0, 2 * math.pi, 17, dtype=torch.float64)[:-1]
    ring = 0.03 * torch.stack([ang.cos(), ang.sin()], 1)
    assert class_spread(torch.cat([means[0] + ring, means[1] + ring]), MIX, c) == pytest.approx(0.03, rel=1e-12)
    assert class_mode_shift(torch.cat([means[0] + ring, means[1] + ring]), MIX, c) == pytest.approx(0.0, abs=1e-12)
    # the same rings moved by a: spread unchanged, shift |a|; unequal counts per mode weigh by share
    a = torch.tensor([0.02, -0.01], dtype=torch.float64)
    pts = torch.cat([means[0] + ring + a, means[1] + ring.repeat(3, 1) + a])
    assert class_spread(pts, MIX, c) == pytest.approx(0.03, rel=1e-12)
    assert class_mode_shift(pts, MIX, c) == pytest.approx(float(a.norm()), rel=1e-12)
    only_second = torch.cat([means[0] + ring, means[1] + ring.repeat(3, 1) + a])  # 3/4 of the points shifted
    assert class_mode_shift(only_second, MIX, c) == pytest.approx(math.sqrt(0.75) * float(a.norm()), rel=1e-12)
    # data of the class: the closed form, within sampling error (2 %); a shrunk copy has a smaller spread
    data = MIX.class_mixture(c).sample(20_000, _gen(4))
    assert class_spread(data, MIX, c) == pytest.approx(class_spread_data(MIX, c), rel=0.02)
    assert class_mode_shift(data, MIX, c) < 5 * 0.05 / math.sqrt(10_000)
    near = means[torch.cdist(data.double(), means).argmin(1)]
    assert class_spread(near + 0.5 * (data - near), MIX, c) == pytest.approx(0.5 * class_spread(data, MIX, c), rel=1e-9)


def test_class_mode_coverage_constructed_cases_and_data():
    c = 0
    cm = MIX.class_mixture(c)
    m0 = cm.means[0]
    on_first = m0 + 0.05 * torch.randn(100, 2, generator=_gen(5), dtype=torch.float64).clamp(-1, 1)
    cov = class_mode_coverage(on_first, MIX, c)
    assert torch.allclose(cov["shares"], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert cov["coverage"] == 0.5 and cov["off_mode"] == 0.0  # one of two modes dropped
    cov = class_mode_coverage(torch.zeros(7, 2), MIX, c)
    assert cov["coverage"] == 0.0 and cov["off_mode"] == 1.0
    # the Mahalanobis radius: 2.9 std away is on the mode, 3.1 std is off
    e = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    assert class_mode_coverage(m0 + 2.9 * 0.05 * e, MIX, c)["off_mode"] == 0.0
    assert class_mode_coverage(m0 + 3.1 * 0.05 * e, MIX, c)["off_mode"] == 1.0
    # min_share is relative to the expected share (1/2 each): 20 % on the second mode covers it at 0.25, not at 0.5
    pts = torch.cat([m0.repeat(80, 1), cm.means[1].repeat(20, 1)])
    assert class_mode_coverage(pts, MIX, c, min_share=0.25)["coverage"] == 1.0
    assert class_mode_coverage(pts, MIX, c, min_share=0.5)["coverage"] == 0.5
    # data: both modes covered, off-mode fraction P(chi^2_2 > 9) = exp(-4.5)
    assert off_mode_data(2, 3.0) == pytest.approx(math.exp(-4.5), rel=1e-10)
    n = 40_000
    cov = class_mode_coverage(cm.sample(n, _gen(6)), MIX, c)
    p = math.exp(-4.5)
    assert cov["coverage"] == 1.0
    assert abs(cov["off_mode"] - p) < 4 * math.sqrt(p * (1 - p) / n), cov["off_mode"]
    assert torch.allclose(cov["shares"].sum(), torch.tensor(1 - cov["off_mode"], dtype=torch.float64))


def test_mode_coverage_with_anisotropic_unequal_components():
    mix = LabelledGaussianMixture([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]],
                                  torch.tensor([[[0.04, 0.0], [0.0, 0.0025]]] * 3, dtype=torch.float64),
                                  [0, 0, 1], weights=[0.6, 0.2, 0.2])
    # 0.5 along x is 2.5 std (on), 0.5 along y is 10 std (off)
    cov = class_mode_coverage(torch.tensor([[0.5, 0.0], [0.0, 0.5]]), mix, 0)
    assert cov["off_mode"] == 0.5
    # expected shares within class 0: 0.75 and 0.25; 10 % on the second mode is 0.4 of its expected share
    pts = torch.cat([torch.zeros(90, 2), torch.tensor([[3.0, 0.0]]).repeat(10, 1)])
    assert class_mode_coverage(pts, mix, 0, min_share=0.3)["coverage"] == 1.0
    assert class_mode_coverage(pts, mix, 0, min_share=0.5)["coverage"] == 0.5
    assert class_spread_data(mix, 0) == pytest.approx(math.sqrt(0.0425), rel=1e-12)


def test_per_class_table_and_metrics():
    n = 5000

    def data_fn(c, n, generator):
        return MIX.class_mixture(c).sample(n, generator)

    rows = per_class_metrics(data_fn, MIX, n)
    assert [r["class"] for r in rows] == [0, 1, 2, 3, "mean"]
    for r in rows[:-1]:
        assert r["n"] == n and r["coverage"] == 1.0
        assert r["spread_ratio"] == pytest.approx(1.0, abs=0.05)
        assert r["swd"] < 3 * r["swd_floor"] + 0.01
    assert rows[-1]["swd"] == pytest.approx(sum(r["swd"] for r in rows[:-1]) / 4)

    # collapsed onto the first mode of each class: half the modes dropped, spread 0
    def collapsed(c, n, generator):
        return MIX.class_mixture(c).means[:1].repeat(n, 1)

    mean = per_class_metrics(collapsed, MIX, 200)[-1]
    assert mean["coverage"] == 0.5 and mean["spread_ratio"] == pytest.approx(0.0, abs=1e-9) and mean["off_mode"] == 0
    # per_class_table with labels skips absent classes; wrong shapes are refused
    x, y = MIX.sample_with_classes(400, _gen(8))
    keep = y != 2
    rows = per_class_table(x[keep], y[keep], MIX)
    assert [r["class"] for r in rows] == [0, 1, 3, "mean"]
    with pytest.raises(ValueError, match="labels"):
        per_class_table(x, y[:10], MIX)
    with pytest.raises(ValueError, match="sample_fn"):
        per_class_metrics(lambda c, n, g: torch.zeros(n - 1, 2), MIX, 10)


def test_guidance_sharpens_then_overshoots_with_the_exact_teacher():
    """Exact CFG on the mixture, Heun 35 NFE: w = 0 samples the class; w = 1 sharpens the modes (smaller
    within-mode spread); w = 7 throws samples off the modes (larger shift, off-mode mass, sliced W2)."""
    sigmas = karras_sigmas(18)

    def guided(w):
        D = CFGDenoiser(MIX.denoiser, w, MIX.null_label)

        def fn(c, n, generator):
            z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
            return sample_heun(D, sigmas[0] * z, sigmas, cond=torch.full((n,), c))
        return fn

    plain, mild, strong = (per_class_metrics(guided(w), MIX, 1500)[-1] for w in (0.0, 1.0, 7.0))
    assert plain["spread_ratio"] == pytest.approx(1.0, abs=0.15) and plain["coverage"] == 1.0
    assert plain["swd"] < 1.5 * plain["swd_floor"] + 0.01 and plain["mode_shift"] < 0.02
    assert mild["spread_ratio"] < 0.9 * plain["spread_ratio"], (mild, plain)
    assert strong["off_mode"] > 0.2 and strong["mode_shift"] > 0.1 and strong["swd"] > 3 * plain["swd"], strong
