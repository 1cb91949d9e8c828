"""The uniform-box mixture (checkerboard): exact denoiser vs Tweedie and vs Monte Carlo."""

import pytest
import torch

from fewstep_lab.data.toy2d import UniformBoxMixture, checkerboard, get_dataset


@pytest.mark.parametrize("sigma", [0.002, 0.05, 0.5, 5.0, 80.0])
def test_denoiser_is_tweedie_of_log_prob(sigma):
    cb = checkerboard()
    g = torch.Generator().manual_seed(0)
    x = (cb.sample(500, g).double() + sigma * torch.randn(500, 2, generator=g, dtype=torch.float64))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(cb.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(cb.denoiser(x.detach(), sigma), x.detach() + sigma**2 * grad, rtol=0, atol=1e-9)


def test_denoiser_matches_monte_carlo_posterior_mean():
    box = UniformBoxMixture([[0.0, 0.0], [2.0, -1.0]], [[1.0, 0.5], [2.5, 1.0]], weights=[0.3, 0.7])
    g = torch.Generator().manual_seed(1)
    x0 = box.sample(400_000, g).double()
    sigma = 0.4
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    query = torch.tensor([[0.5, 0.2], [1.5, 0.0], [2.2, 0.3]], dtype=torch.float64)
    for q, d in zip(query, box.denoiser(query, sigma)):
        near = (x - q).norm(dim=1) < 0.07
        assert near.sum() > 300
        # The posterior can be bimodal (between boxes): allow 4 standard errors plus the bin's bias.
        se = x0[near].std(0) / near.sum().sqrt()
        assert ((x0[near].mean(0) - d).abs() < 4 * se + 0.01).all(), (q, x0[near].mean(0), d, se)


def test_far_points_and_tiny_sigma_stay_finite_and_inside():
    cb = get_dataset("checkerboard")
    x = torch.tensor([[50.0, -40.0], [0.1, 0.1], [-0.3, 0.7]])
    d = cb.denoiser(x, 0.002)
    assert torch.isfinite(d).all()
    assert (d.abs() <= 0.9 + 1e-6).all()  # posterior means lie inside the board
    samples, labels = cb.sample(1000, torch.Generator().manual_seed(0), return_labels=True)
    assert torch.equal(cb.assign(samples), labels)


def test_bad_boxes():
    with pytest.raises(ValueError, match="highs > lows"):
        UniformBoxMixture([[0.0, 0.0]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="weights"):
        UniformBoxMixture([[0.0], [1.0]], [[0.5], [2.0]], weights=[0.9, 0.3])
