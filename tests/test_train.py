"""The generic train loop: resume, checkpoints, EMA, NaN handling, safe loading, toy smoke runs."""

import math
import pickle

import pytest
import torch
from torch import nn

from fewstep_lab.pipeline import build_model, load_run, make_run, train_run
from fewstep_lab.train import (
    CheckpointError,
    NonFiniteLossError,
    ema_update,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
    train,
)


def _tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Dropout(0.1), nn.SiLU(), nn.Linear(16, 2))

    def batch_fn(g):
        return torch.randn(32, 2, generator=g)

    def loss_fn(m, x, ctx):
        return ((m(x) - x.flip(1)) ** 2).mean(1)

    return model, loss_fn, batch_fn


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_resume_equals_uninterrupted_training(tmp_path):
    model, loss_fn, batch_fn = _tiny_problem()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    full = train(model, loss_fn, batch_fn, steps=40, ema_decays={"ema": 0.9}, seed=3, device="cpu",
                 progress=False, log_every=5, warmup=5)

    model2, _, _ = _tiny_problem()
    model2.load_state_dict(init)
    ckpt = tmp_path / "run.pt"
    part = train(model2, loss_fn, batch_fn, steps=25, ema_decays={"ema": 0.9}, seed=3, device="cpu",
                 progress=False, log_every=5, warmup=5, checkpoint_path=ckpt)
    assert part.step == 25
    # A fresh process would rebuild the model from scratch and continue from the checkpoint.
    model3, _, _ = _tiny_problem()
    resumed = train(model3, loss_fn, batch_fn, steps=40, ema_decays={"ema": 0.9}, seed=3, device="cpu",
                    progress=False, log_every=5, warmup=5, checkpoint_path=ckpt)
    assert resumed.step == 40
    assert torch.equal(_params(resumed.model), _params(full.model))
    assert torch.equal(_params(resumed.emas["ema"]), _params(full.emas["ema"]))
    assert [s for s, _ in resumed.losses] == [s for s, _ in full.losses]
    assert [v for _, v in resumed.losses] == pytest.approx([v for _, v in full.losses])


def test_different_seeds_give_different_runs():
    m1, loss_fn, batch_fn = _tiny_problem()
    m2, _, _ = _tiny_problem()
    a = train(m1, loss_fn, batch_fn, steps=5, seed=0, device="cpu", progress=False)
    b = train(m2, loss_fn, batch_fn, steps=5, seed=1, device="cpu", progress=False)
    assert not torch.equal(_params(a.model), _params(b.model))


def test_ema_update_closed_form():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    expect = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    ema_update(a, b, 0.9)
    for p, e in zip(a.parameters(), expect):
        torch.testing.assert_close(p, e)


def test_ema_decay_schedule_is_called_with_the_step():
    model, loss_fn, batch_fn = _tiny_problem()
    seen = []
    train(model, loss_fn, batch_fn, steps=3, device="cpu", progress=False,
          ema_decays={"target": lambda k: seen.append(k) or 0.5})
    assert seen == [0, 1, 2]
    with pytest.raises(ValueError, match="EMA decay"):
        train(model, loss_fn, batch_fn, steps=1, device="cpu", progress=False, ema_decays={"x": 1.5})


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model, _, batch_fn = _tiny_problem()
    ckpt = tmp_path / "run.pt"

    def loss_fn(m, x, ctx):
        loss = ((m(x) - x) ** 2).mean(1)
        return loss * math.nan if ctx.step >= 7 else loss

    with pytest.raises(NonFiniteLossError, match="step 7.*last good checkpoint"):
        train(model, loss_fn, batch_fn, steps=20, device="cpu", progress=False,
              checkpoint_path=ckpt, checkpoint_every=5)
    meta = read_checkpoint_meta(ckpt)
    assert meta["step"] == 5  # the step-5 checkpoint survived; nothing after the NaN was written
    fresh, _, _ = _tiny_problem()
    load_checkpoint(ckpt, fresh, which="model")
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_checkpoint_round_trip_and_refuses_pickled_code(tmp_path):
    D, state = train_run(make_run("edm", "8gaussians", "smoke", steps=3), checkpoint_path=tmp_path / "t.pt",
                         progress=False)
    loaded, run = load_run(tmp_path / "t.pt")
    assert run.recipe.steps == 3 and run.method == "edm"
    x, s = torch.randn(8, 2), torch.full((8,), 1.3)
    torch.testing.assert_close(loaded(x, s), D(x, s))
    with pytest.raises(KeyError, match="no weights 'nope'"):
        load_checkpoint(tmp_path / "t.pt", build_model(run), which="nope")

    class Evil:
        def __reduce__(self):
            return (print, ("executed!",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    with pytest.raises(CheckpointError, match="evil.pt is not a fewstep checkpoint") as info:
        load_checkpoint(bad, build_model(run))
    assert "weights_only" not in str(info.value)  # torch's advice to unpickle anyway is never passed on
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", build_model(run))


def test_save_checkpoint_is_atomic(tmp_path):
    model, loss_fn, batch_fn = _tiny_problem()
    state = train(model, loss_fn, batch_fn, steps=2, device="cpu", progress=False)
    path = tmp_path / "c.pt"
    save_checkpoint(path, state, {"a": 1})
    assert path.exists() and not (tmp_path / "c.pt.tmp").exists()
    assert read_checkpoint_meta(path) == {"a": 1, "step": 2}


def test_bad_arguments():
    model, loss_fn, batch_fn = _tiny_problem()
    with pytest.raises(ValueError, match="steps"):
        train(model, loss_fn, batch_fn, steps=-1, device="cpu")
    with pytest.raises(ValueError, match="lr"):
        train(model, loss_fn, batch_fn, steps=1, lr=0, device="cpu")
