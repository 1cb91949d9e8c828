"""Labelled mixtures and classifier-free guidance, exactly (issue 10, sections 1 and 6)."""

import pytest
import torch

from fewstep_lab.data.labelled import eight_gaussians_4class
from fewstep_lab.data.toy2d import eight_gaussians, get_dataset
from fewstep_lab.guidance import CFGDenoiser, cfg_denoiser, null_label_of
from fewstep_lab.methods.guided import drop_labels
from fewstep_lab.pipeline import make_domain, make_run, sample, train_run

torch.set_num_threads(1)
MIX = eight_gaussians_4class()


def _points(n=64, seed=0, scale=0.8):
    return scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _per_class(x, sigma, labels):
    """D(x, sigma, c) from each class's own mixture (restricted components, renormalised weights)."""
    out = torch.empty_like(x)
    for c in range(MIX.num_classes):
        m = labels == c
        if m.any():
            out[m] = MIX.class_mixture(c).denoiser(x[m], sigma)
    return out


def test_dataset_registered_with_four_classes_of_two_opposite_modes():
    data = get_dataset("8gaussians-4class")
    assert data.num_classes == 4 and data.null_label == 4
    assert torch.equal(data.classes, torch.arange(8) % 4)
    assert torch.allclose(data.class_weights(), torch.full((4,), 0.25, dtype=torch.float64))
    # the two modes of a class are opposite: their means sum to zero
    for c in range(4):
        assert torch.allclose(data.class_mixture(c).means.sum(0), torch.zeros(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 5.0])
def test_conditional_denoiser_is_the_class_mixtures(sigma):
    x = _points()
    labels = torch.arange(64) % 4
    assert torch.allclose(MIX.denoiser(x, sigma, labels), _per_class(x, sigma, labels), atol=1e-12)
    # no label (num_classes) and None: the unconditional denoiser of all 8 modes
    plain = eight_gaussians().denoiser(x, sigma)
    assert torch.allclose(MIX.denoiser(x, sigma, torch.full((64,), 4)), plain, atol=1e-12)
    assert torch.allclose(MIX.denoiser(x, sigma), plain, atol=1e-12)


def test_labels_are_checked_and_unlabelled_mixtures_still_refuse_cond():
    x = _points(4)
    with pytest.raises(ValueError, match="0..4"):
        MIX.denoiser(x, 0.5, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="integer"):
        MIX.denoiser(x, 0.5, torch.zeros(4))
    with pytest.raises(ValueError, match="unconditional"):
        eight_gaussians().denoiser(x, 0.5, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, 7.0])
def test_cfg_wrapper_equals_the_exact_guided_denoiser(w):
    x, sigma = _points(), 0.4
    labels = torch.arange(64) % 4
    cond, uncond = _per_class(x, sigma, labels), eight_gaussians().denoiser(x, sigma)
    exact = uncond + (1 + w) * (cond - uncond)
    assert torch.allclose(CFGDenoiser(MIX.denoiser, w, 4)(x, sigma, labels), exact, atol=1e-12)
    assert torch.allclose(cfg_denoiser(MIX.denoiser, w)(x, sigma, labels), exact, atol=1e-12)  # null label read


def test_w_zero_is_conditional_and_w_minus_one_unconditional_and_w_per_sample():
    x, labels = _points(), torch.arange(64) % 4
    sigma = torch.full((64,), 0.7, dtype=torch.float64)
    assert torch.allclose(CFGDenoiser(MIX, 0.0, 4)(x, sigma, labels), MIX(x, sigma, labels), atol=1e-12)
    assert torch.allclose(CFGDenoiser(MIX, -1.0, 4)(x, sigma, labels), MIX(x, sigma), atol=1e-12)
    w = torch.linspace(0, 7, 64, dtype=torch.float64)
    per = CFGDenoiser(MIX, w, 4)(x, sigma, labels)
    for i in (0, 20, 63):
        one = CFGDenoiser(MIX, float(w[i]), 4)(x[i:i + 1], sigma[i:i + 1], labels[i:i + 1])
        assert torch.allclose(per[i:i + 1], one, atol=1e-12)
    # cond None: the unconditional denoiser
    assert torch.allclose(CFGDenoiser(MIX, 3.0, 4)(x, sigma), MIX(x, sigma), atol=1e-12)


def test_guidance_in_epsilon_space_is_the_same():
    """eps_w = (1 + w) eps(c) - w eps(∅) (LCM sec. 4.2; diffusers: guidance_scale = 1 + w) and D_w = x - sigma eps_w."""
    x, sigma, w, labels = _points(), 0.9, 3.0, torch.arange(64) % 4
    eps_c, eps_u = (x - MIX(x, sigma, labels)) / sigma, (x - MIX(x, sigma)) / sigma
    eps_w = (1 + w) * eps_c - w * eps_u
    assert torch.allclose(CFGDenoiser(MIX, w, 4)(x, sigma, labels), x - sigma * eps_w, atol=1e-12)
    scale = 1 + w  # diffusers: eps_u + guidance_scale (eps_c - eps_u)
    assert torch.allclose(eps_u + scale * (eps_c - eps_u), eps_w, atol=1e-12)


def test_null_label_of_needs_a_conditional_denoiser():
    assert null_label_of(MIX.denoiser) == 4 and null_label_of(MIX) == 4
    with pytest.raises(ValueError, match="class-conditional"):
        null_label_of(eight_gaussians().denoiser)


def test_toy_domain_gives_class_labels_and_num_classes():
    dom = make_domain(make_run("edm-cfg", "8gaussians-4class", "smoke"))
    assert dom.num_classes == 4
    x, y = dom.batch_fn(512, labels=True)(torch.Generator().manual_seed(0))
    assert x.shape == (512, 2) and y.dtype == torch.long and set(y.tolist()) == {0, 1, 2, 3}
    assert torch.equal(MIX.classes[MIX.assign(x)], y)  # each point lies at a mode of its class
    assert make_domain(make_run("edm", "8gaussians", "smoke")).num_classes is None


def test_label_dropout_rate():
    labels = torch.zeros(20000, dtype=torch.long)
    out = drop_labels(labels, 0.2, 4, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0, 4}
    assert abs((out == 4).double().mean().item() - 0.2) < 0.01
    assert torch.equal(drop_labels(labels, 0.0, 4), labels)


def test_edm_cfg_trains_and_samples_guided_through_the_pipeline(tmp_path):
    run = make_run("edm-cfg", "8gaussians-4class", "smoke", steps=20)
    model, _ = train_run(run, checkpoint_path=tmp_path / "t.pt", progress=False)
    assert model.net.num_classes == 4
    labels = torch.arange(40) % 4
    x = sample(model, run, 40, steps=4, cond=labels, batch_size=16)
    assert x.shape == (40, 2) and torch.isfinite(x).all()
    guided = sample(CFGDenoiser(model, 3.0, 4), run, 40, steps=4, cond=labels, batch_size=16)
    assert guided.shape == (40, 2) and torch.isfinite(guided).all()
    with pytest.raises(ValueError, match="one entry per sample"):
        sample(model, run, 40, steps=4, cond=labels[:30])
    unlabelled = make_run("edm-cfg", "8gaussians", "smoke", steps=2)
    with pytest.raises(ValueError, match="trains on class labels"):
        train_run(unlabelled, progress=False)
