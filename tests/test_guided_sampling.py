"""Sampling and scoring class-conditional models through the pipeline and the CLI (issue 10): labels,
the guidance scale w (classifier-free guidance for a conditional teacher, an input for LCM), and the
per-class sliced W2 of labelled 2-D data."""

import numpy as np
import pytest
import torch

from fewstep_lab.cli import main
from fewstep_lab.data.labelled import eight_gaussians_4class
from fewstep_lab.guidance import CFGDenoiser
from fewstep_lab.metrics import sliced_w2
from fewstep_lab.pipeline import condition, evaluate, make_domain, make_run, sample

torch.set_num_threads(1)
MIX = eight_gaussians_4class()


def _exact_run():
    run = make_run("edm-cfg", "8gaussians-4class", "smoke")
    return run, make_domain(run).exact_denoiser


def test_condition_wraps_a_conditional_teacher_in_cfg_and_passes_plain_labels_without_w():
    run, D = _exact_run()
    labels = torch.tensor([0, 1, 2, 3])
    x, sigma = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.4, dtype=torch.float64)
    G, cond = condition(D, run, labels, 3.0)
    assert isinstance(G, CFGDenoiser) and torch.equal(cond, labels)
    want = D(x, sigma, None) + 4.0 * (D(x, sigma, labels) - D(x, sigma, None))
    torch.testing.assert_close(G(x, sigma, cond), want)
    G0, cond0 = condition(D, run, labels, None)
    assert G0 is D and torch.equal(cond0, labels)
    with pytest.raises(ValueError, match="unconditional"):
        condition(D, make_run("edm", "8gaussians", "smoke"), labels, 1.0)
    with pytest.raises(ValueError, match="integers"):
        condition(D, run, torch.tensor([0.5]), 1.0)


def test_lcm_takes_w_as_an_input_and_needs_it():
    run = make_run("lcm", "8gaussians-4class", "smoke")
    f = object()
    G, (labels, w) = condition(f, run, torch.tensor([1, 2]), 2.5)
    assert G is f and torch.equal(labels, torch.tensor([1, 2])) and torch.equal(w, torch.full((2,), 2.5))
    with pytest.raises(ValueError, match="give w"):
        condition(f, run, torch.tensor([1]), None)


def test_sample_with_a_label_lands_on_that_class_modes():
    run, D = _exact_run()
    x = sample(D, run, 2000, steps=18, labels=2, w=1.0)
    # Class 2 holds modes 2 and 6 (opposite on the circle): nearly every sample is closest to one of them.
    nearest = torch.cdist(x.double(), MIX.means).argmin(1)
    assert ((nearest == 2) | (nearest == 6)).float().mean() > 0.99


def test_per_class_evaluation_scores_each_class_against_its_own_distribution():
    run, D = _exact_run()
    seeds = (0, 1, 2, 3)  # sliced W2 of two-mode classes is dominated by the mode-weight noise: average
    res = evaluate(D, run, steps=18, n=3000, seeds=seeds, w=0.0)
    assert len(res.per_class) == 4 and res.nfe == 35
    # At w = 0 the exact conditional PF-ODE samples p(x0 | c): each class near its own floor...
    floor = make_domain(run).class_floor(3000, seeds)[0]
    assert res.swd_mean < 2 * floor and res.mode_error < 0.02
    # ...and far from the whole mixture (what a wrong reference would give).
    x = sample(D, run, 3000, steps=18, labels=0, w=0.0)
    assert sliced_w2(x, MIX.sample(3000, torch.Generator().manual_seed(0))) > 3 * res.per_class[0].swd_mean


def test_cli_samples_and_scores_with_label_and_w(tmp_path, capsys):
    out = tmp_path / "s.npy"
    assert main(["sample", "--ckpt", "exact:8gaussians-4class", "--label", "1", "--w", "3", "--steps", "18",
                 "--n", "200", "--out", str(out)]) == 0
    x = torch.from_numpy(np.load(out)).double()
    nearest = torch.cdist(x, MIX.means).argmin(1)
    assert ((nearest == 1) | (nearest == 5)).all()
    assert main(["eval", "--ckpt", "exact:8gaussians-4class", "--w", "3", "--steps", "6", "--n", "500",
                 "--seeds", "1"]) == 0
    text = capsys.readouterr().out
    assert "per-class sliced-W2" in text and "classes:" in text
    assert main(["sample", "--ckpt", "exact:8gaussians", "--w", "3", "--out", str(out)]) == 2
    assert "unconditional" in capsys.readouterr().err
    assert main(["sample", "--ckpt", "exact:8gaussians-4class", "--label", "7", "--out", str(out)]) == 2
    assert "--label must be a class in 0..3" in capsys.readouterr().err
