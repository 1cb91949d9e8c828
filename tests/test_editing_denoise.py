"""Zero-shot denoising (editing.denoise): against the closed-form consistency function of Gaussian data."""

import math

import pytest
import torch

from fewstep_lab.editing import denoise
from fewstep_lab.sampling import sample_consistency

SIGMA_MIN = 0.002


def gaussian_f(s):
    """Exact consistency function of data N(0, s^2 I): the PF-ODE keeps x / sqrt(sigma^2 + s^2) constant."""
    def f(x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x * math.sqrt(SIGMA_MIN**2 + s**2) / torch.sqrt(sigma**2 + s**2)
    return f


def test_one_step_is_f_at_the_image_own_level():
    f = gaussian_f(0.5)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = denoise(f, x, 2.0)
    assert torch.allclose(out, f(x, torch.full((4,), 2.0, dtype=torch.float64)))
    # Closed form: x * sqrt(eps^2 + s^2) / sqrt(sigma^2 + s^2), a shrinkage towards the data mean 0.
    assert torch.allclose(out, x * math.sqrt(SIGMA_MIN**2 + 0.25) / math.sqrt(4.25))


def test_point_mass_data_is_recovered_exactly():
    y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def f(x, sigma, cond=None):  # the consistency function of a point mass at y: every trajectory ends at y
        return y.expand_as(x).clone()

    noisy = y + 5.0 * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(denoise(f, noisy, 5.0, [1.0, 0.1], generator=torch.Generator().manual_seed(3)), y)


def test_later_levels_are_multistep_consistency_sampling():
    f = gaussian_f(0.7)
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = denoise(f, x, 3.0, [1.0, 0.3], generator=torch.Generator().manual_seed(5))
    want = sample_consistency(f, x, torch.tensor([3.0, 1.0, 0.3, 0.0], dtype=torch.float64),
                              generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, want)


@pytest.mark.parametrize("sigma, later", [(0.001, ()), (1.0, (2.0,)), (1.0, (0.0005,))])
def test_bad_levels_are_refused(sigma, later):
    with pytest.raises(ValueError):
        denoise(gaussian_f(0.5), torch.zeros(1, 3, 4, 4), sigma, later)
