"""Tests for fewstep_lab.editing (Algorithm 4 of Song et al. 2023 and the other zero-shot edits)."""

import math

import pytest
import torch

from fewstep_lab.editing import (LUMA_WEIGHTS, LinearConstraint, block_basis, colorize, downsample,
                                 inpaint, interpolate, luminance_basis, orthogonal_completion, slerp,
                                 stroke_guided, super_resolve, to_grayscale)

SIGMAS = torch.tensor([80.0, 10.0, 1.0, 0.0])


def gaussian_f(mu, s=0.5):
    """Exact consistency function (PF-ODE map to sigma=0) of data N(mu, s^2 I)."""
    def f(x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
        return mu + (x - mu) * s / torch.sqrt(s ** 2 + sigma ** 2)
    return f


def conv_f(channels=3, seed=0):
    """A random small conv net with consistency-style scalings: mixes pixels and channels."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(8, channels, 3, padding=1))

    @torch.no_grad()
    def f(x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
        c_skip = 0.25 / ((sigma - 0.002) ** 2 + 0.25)
        c_out = (sigma - 0.002) * 0.5 / torch.sqrt(sigma ** 2 + 0.25)
        return c_skip * x + c_out * torch.tanh(net(x / torch.sqrt(sigma ** 2 + 0.25)))
    return f


def identity_f(x, sigma, cond=None):
    return x


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(shape=(2, 3, 8, 8), seed=1):
    return torch.rand(shape, generator=gen(seed)) * 2 - 1


# ---------------------------------------------------------------- projection and bases
def test_linear_constraint_matches_closed_form_for_random_orthogonal_A():
    n = 6
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(3), dtype=torch.float64))
    y, x = torch.randn(2, n, generator=gen(4), dtype=torch.float64), torch.randn(2, n, generator=gen(5), dtype=torch.float64)
    omega = torch.tensor([1.0, 0, 1, 0, 0, 1], dtype=torch.float64)
    P = LinearConstraint(lambda v: v @ Q.T, lambda c: c @ Q, y @ Q.T, omega)
    out = P(x)
    assert torch.allclose(out @ Q.T * omega, y @ Q.T * omega)           # known components set
    assert torch.allclose(out @ Q.T * (1 - omega), x @ Q.T * (1 - omega))  # others untouched
    assert torch.allclose(P(out), out)                                  # a projection
    assert torch.allclose(P.reference() @ Q.T, y @ Q.T * omega)


@pytest.mark.parametrize("v", [[0.2989, 0.5870, 0.1140], [1.0] * 16, [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, -1.0]])
def test_orthogonal_completion_is_orthogonal_with_given_first_row(v):
    Q = orthogonal_completion(v)
    v = torch.tensor(v, dtype=torch.float64)
    assert Q.shape == (len(v), len(v))
    assert torch.allclose(Q @ Q.T, torch.eye(len(v), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q[0], v / v.norm(), atol=1e-15)


def test_luminance_basis_first_row_is_normalised_luminance():
    Q = luminance_basis()
    w = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)
    assert torch.allclose(Q @ Q.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q[0], w / w.norm(), atol=1e-15)


def test_block_basis_first_row_is_uniform():
    for factor in (1, 2, 4):
        Q = block_basis(factor)
        assert torch.allclose(Q @ Q.T, torch.eye(factor ** 2, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(Q[0], torch.full((factor ** 2,), 1.0 / factor, dtype=torch.float64))


def test_to_grayscale_and_downsample_definitions():
    x = images()
    manual = 0.2989 * x[:, 0:1] + 0.5870 * x[:, 1:2] + 0.1140 * x[:, 2:3]
    assert torch.allclose(to_grayscale(x), manual, atol=1e-6)
    g = x[:, :1].expand(-1, 3, -1, -1)  # a gray image (g, g, g) has luminance g in [-1, 1] units
    assert torch.allclose(to_grayscale(g), x[:, :1], atol=2e-4)
    blocks = x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    assert torch.allclose(downsample(x, 2), blocks, atol=1e-6)


# ---------------------------------------------------------------- inpainting
def test_inpaint_keeps_known_pixels_exactly_and_fills_the_rest():
    y = images()
    mask = (torch.rand(1, 1, 8, 8, generator=gen(2)) > 0.5).float()
    out = inpaint(conv_f(), y, mask, SIGMAS, generator=gen())
    known = mask.expand_as(y).bool()
    assert out.shape == y.shape
    assert torch.equal(out[known], y[known])
    assert (out[~known] - y[~known]).abs().mean() > 0.1


def test_inpaint_per_channel_mask():
    y = images()
    mask = (torch.rand(2, 3, 8, 8, generator=gen(7)) > 0.3).float()
    out = inpaint(gaussian_f(torch.zeros(1)), y, mask, SIGMAS, generator=gen())
    assert torch.equal(out[mask.bool()], y[mask.bool()])


def test_inpaint_starts_from_known_part_plus_noise():
    # Lines 2-3 of Algorithm 4: the first input to f is y * mask + sigma0 * z (unknown part zeroed),
    # z the generator's first draw; with f = identity one step returns project(that).
    y, mask = images(), (torch.rand(1, 1, 8, 8, generator=gen(2)) > 0.5).float()
    inputs = []

    def f(x, sigma, cond=None):
        inputs.append(x.clone())
        return x

    out = inpaint(f, y, mask, torch.tensor([7.0, 0.0]), generator=gen(11))
    z = torch.randn(y.shape, generator=gen(11))
    assert torch.allclose(inputs[0], y * mask + 7.0 * z, atol=1e-6)
    assert torch.allclose(out, y * mask + 7.0 * z * (1 - mask), atol=1e-6)


def test_inpaint_projects_after_every_step_not_only_the_last():
    # f pulls everything to 5; if the known pixels were not reset after the first f, the second
    # f would see 5 + noise there instead of y + noise.
    y, mask = images(), torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    inputs = []

    def f(x, sigma, cond=None):
        inputs.append(x.clone())
        return torch.full_like(x, 5.0)

    inpaint(f, y, mask, torch.tensor([80.0, 1.0, 0.0]), generator=gen())
    known = mask.expand_as(y).bool()
    assert len(inputs) == 2
    assert (inputs[1][known] - y[known]).mean().abs() < 0.3


def test_sigma_min_and_cond_are_forwarded():
    y, mask = images(), (torch.rand(1, 1, 8, 8, generator=gen(2)) > 0.5).float()
    seen = []

    def f(x, sigma, cond=None):
        seen.append(cond)
        return x

    one = inpaint(f, y, mask, torch.tensor([80.0, 0.0]), generator=gen(), cond="label")
    # With sigma_min = 0.5 the step at sigma = 0.5 adds sqrt(0.5^2 - 0.5^2) = 0 noise.
    two = inpaint(f, y, mask, torch.tensor([80.0, 0.5, 0.0]), generator=gen(), sigma_min=0.5)
    noisy = inpaint(f, y, mask, torch.tensor([80.0, 0.5, 0.0]), generator=gen())
    assert torch.allclose(one, two) and not torch.allclose(one, noisy)
    assert seen[0] == "label"


# ---------------------------------------------------------------- colorization / super-resolution
def test_colorize_matches_luminance_exactly():
    y_gray = to_grayscale(images())
    out = colorize(conv_f(), y_gray, SIGMAS, generator=gen())
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(to_grayscale(out), y_gray, atol=1e-5)
    assert (out - y_gray).abs().mean() > 0.05  # chroma was generated, not a gray copy


def test_super_resolve_matches_block_averages_exactly():
    y_low = images((2, 3, 4, 4))
    for factor in (2, 4):
        out = super_resolve(conv_f(), y_low, factor, SIGMAS, generator=gen())
        assert out.shape == (2, 3, 4 * factor, 4 * factor)
        assert torch.allclose(downsample(out, factor), y_low, atol=1e-5)
        assert (out - y_low.repeat_interleave(factor, 2).repeat_interleave(factor, 3)).abs().mean() > 0.01


# ---------------------------------------------------------------- stroke guidance
def test_stroke_guided_deterministic_per_seed_and_differs_across_seeds():
    strokes, f = images(), conv_f()
    sigmas = torch.tensor([20.0, 2.0, 0.0])
    a = stroke_guided(f, strokes, sigmas, generator=gen(0))
    b = stroke_guided(f, strokes, sigmas, generator=gen(0))
    c = stroke_guided(f, strokes, sigmas, generator=gen(1))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3


def test_stroke_guided_starts_from_strokes_plus_noise_at_sigmas0():
    strokes = images()
    out = stroke_guided(identity_f, strokes, torch.tensor([15.0, 0.0]), generator=gen(4))
    assert torch.allclose(out, strokes + 15.0 * torch.randn(strokes.shape, generator=gen(4)), atol=1e-5)
    # sigma_min is forwarded: a later level equal to sigma_min adds no noise.
    two = stroke_guided(identity_f, strokes, torch.tensor([15.0, 0.5, 0.0]), generator=gen(4), sigma_min=0.5)
    assert torch.allclose(out, two)


# ---------------------------------------------------------------- slerp / interpolation
def test_slerp_endpoints_norm_and_angle():
    z0 = torch.randn(3, 2, 4, 4, generator=gen(0))
    z1 = torch.randn(3, 2, 4, 4, generator=gen(1))
    z1 = z1 / z1.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * z0.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(slerp(z0, z1, 0.0), z0, atol=1e-6)
    assert torch.allclose(slerp(z0, z1, 1.0), z1, atol=1e-5)
    cos = lambda a, b: (a.flatten(1) * b.flatten(1)).sum(1) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))  # noqa: E731
    theta = torch.arccos(cos(z0, z1))
    for alpha in (0.25, 0.5, 0.8):
        z = slerp(z0, z1, alpha)
        assert torch.allclose(z.flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1), rtol=1e-5)
        assert torch.allclose(torch.arccos(cos(z0, z).clamp(-1, 1)), alpha * theta, atol=1e-3)
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(slerp(e1, e2, 0.5), torch.tensor([[1.0, 1.0]]) / math.sqrt(2))
    assert torch.allclose(slerp(e1, 2 * e1, 0.5), 1.5 * e1)  # parallel: falls back to a line


def test_interpolate_endpoints_are_one_step_samples():
    z0, z1 = torch.randn(2, 3, 8, 8, generator=gen(0)), torch.randn(2, 3, 8, 8, generator=gen(1))
    f, s = conv_f(), torch.full((2,), 80.0)
    out = interpolate(f, z0, z1, [0.0, 0.5, 1.0], cond=None)
    assert out.shape == (3, 2, 3, 8, 8)
    assert torch.allclose(out[0], f(z0 * 80.0, s), atol=1e-5)
    assert torch.allclose(out[2], f(z1 * 80.0, s), atol=1e-5)
    seen = []
    interpolate(lambda x, sigma, cond=None: seen.append((float(sigma[0]), cond)) or x, z0, z1, [0.3],
                sigma_max=40.0, cond="c")
    assert seen == [(40.0, "c")]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("sigmas, match", [
    (torch.tensor([80.0, 1.0]), "must end in 0.*append_zero"),
    (torch.tensor([1.0, 80.0, 0.0]), "strictly decreasing"),
    (torch.tensor([80.0, 0.001, 0.0]), "sigma_min.*drop the levels"),
    (torch.tensor([0.0]), "at least 2 values"),
])
def test_bad_sigmas_raise(sigmas, match):
    y, mask = images(), torch.ones(1, 1, 8, 8)
    with pytest.raises(ValueError, match=match):
        inpaint(identity_f, y, mask, sigmas)
    with pytest.raises(ValueError, match=match):
        stroke_guided(identity_f, y, sigmas)


def test_bad_shapes_raise():
    y = images()
    with pytest.raises(ValueError, match="mask shape .* does not match y.*pass a mask of shape"):
        inpaint(identity_f, y, torch.ones(1, 1, 4, 8), SIGMAS)
    with pytest.raises(ValueError, match="only 0 and 1.*threshold"):
        inpaint(identity_f, y, torch.full((1, 1, 8, 8), 0.5), SIGMAS)
    with pytest.raises(ValueError, match="divisible by factor=3.*crop or pad"):
        downsample(y, 3)
    with pytest.raises(ValueError, match="positive int"):
        super_resolve(identity_f, y, 2.0, SIGMAS)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*to_grayscale"):
        colorize(identity_f, y, SIGMAS)
    with pytest.raises(ValueError, match="same shape"):
        slerp(y, y[:1], 0.5)
