"""Nothing lost, nothing wrong: atomic writes, lock files, non-finite training, damaged checkpoints.

Tests of fewstep_lab/io.py and of the safety parts of fewstep_lab/train.py, on small real runs.
"""

import errno
import json
import math
import os
import subprocess
import sys
import uuid

import pytest
import torch
from torch import nn

from fewstep_lab import io as fio
from fewstep_lab import train as tr
from fewstep_lab.train import CheckpointError, NonFiniteLossError, load_checkpoint, read_checkpoint_meta, train


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 2))

    def batch_fn(g):
        return torch.randn(32, 2, generator=g)

    def loss_fn(m, x, ctx):
        return ((m(x) - x.flip(1)) ** 2).mean(1)

    return model, loss_fn, batch_fn


def _run(path, steps=4, **kw):
    model, loss_fn, batch_fn = _problem()
    kw = {"loss_fn": loss_fn, **kw}
    return train(model, kw.pop("loss_fn"), batch_fn, steps=steps, device="cpu", progress=False,
                 checkpoint_path=path, **kw)


def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ----------------------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.md"
    fio.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with fio.atomic_write(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and _leftovers(tmp_path, {"table.md"}) == []
    fio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and _leftovers(tmp_path, {"table.md"}) == []
    with pytest.raises(ValueError, match="mode"):
        with fio.atomic_write(path, "a"):
            pass


def test_atomic_write_gives_normal_permissions(tmp_path):
    # mkstemp's temporary file is 0600; the result must have the mode open() would give (or the old file's).
    mask = os.umask(0o022)
    try:
        fio.atomic_write_text(tmp_path / "new.txt", "x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644
        (tmp_path / "old.txt").write_text("old")
        os.chmod(tmp_path / "old.txt", 0o640)
        fio.atomic_write_text(tmp_path / "old.txt", "new")
        assert (tmp_path / "old.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(mask)


def test_disk_full_keeps_the_old_checkpoint_monkeypatched(tmp_path, monkeypatch):
    # Portable version of the tmpfs test below: torch.save writes part of a file, then the disk is full.
    path = tmp_path / "run.pt"
    _run(path, steps=3)
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tr.torch, "save", full_disk)
    with pytest.raises(fio.DiskFullError, match=r"disk full while writing .*run\.pt") as info:
        _run(path, steps=6)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and read_checkpoint_meta(path)["step"] == 3
    assert _leftovers(tmp_path, {"run.pt"}) == []  # no temporary file, and the lock was released


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs: a real full disk. Needs root and mount rights; skipped where the sandbox has neither."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot run mount here: {err}")
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_on_a_real_small_filesystem(tiny_tmpfs):
    path = tiny_tmpfs / "run.pt"
    small = _run(path, steps=2)
    assert path.is_file()
    before = path.read_bytes()
    (tiny_tmpfs / "ballast").write_bytes(b"\0" * (256 * 1024 - 2 * len(before) + 4096))  # leave < one file
    big = small.model
    with pytest.raises(fio.DiskFullError, match="disk full while writing"):
        tr.save_checkpoint(path, tr.TrainState(model=big, emas={"a": big, "b": big, "c": big},
                                               optimizer=small.optimizer, step=99))
    assert path.read_bytes() == before and read_checkpoint_meta(path)["step"] == 2
    assert _leftovers(tiny_tmpfs, {"run.pt", "ballast"}) == []


# ----------------------------------------------------------------------------- lock files

def test_second_trainer_on_the_same_checkpoint_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(60)"])
    try:
        (tmp_path / "run.pt.lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                          "started": 0}))
        with pytest.raises(fio.LockedError, match=rf"run\.pt\.lock.*|process {holder.pid}") as info:
            _run(path)
        assert f"process {holder.pid}" in str(info.value) and "run.pt.lock" in str(info.value)
        assert not path.exists()  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now: its lock is stale and is taken over; released at the end.
    _run(path)
    assert path.is_file() and not (tmp_path / "run.pt.lock").exists()


def test_lock_released_when_training_raises(tmp_path):
    path = tmp_path / "run.pt"

    def broken(m, x, ctx):
        raise KeyError("bug in the loss")

    with pytest.raises(KeyError):
        _run(path, loss_fn=broken)
    assert not (tmp_path / "run.pt.lock").exists()
    with fio.FileLock(path):
        with pytest.raises(fio.LockedError, match=f"process {os.getpid()}"):
            fio.FileLock(path).acquire()
    assert not (tmp_path / "run.pt.lock").exists()


def test_lock_of_another_host_or_unreadable_is_not_taken_over(tmp_path):
    lock = tmp_path / "x.pt.lock"
    lock.write_text(json.dumps({"pid": 1, "host": f"elsewhere-{uuid.uuid4()}"}))
    with pytest.raises(fio.LockedError, match="elsewhere"):
        fio.FileLock(tmp_path / "x.pt").acquire()
    lock.write_text("garbage{")
    with pytest.raises(fio.LockedError, match="unknown process"):
        fio.FileLock(tmp_path / "x.pt").acquire()


# ----------------------------------------------------------------------------- non-finite training

class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


@pytest.mark.parametrize("grad_clip", [None, 1.0])
@pytest.mark.parametrize("where", ["loss", "grad", "param"])
def test_non_finite_values_never_reach_the_checkpoint(tmp_path, where, grad_clip):
    path = tmp_path / "run.pt"
    model, loss_fn, batch_fn = _problem()
    bad_step, hooks = 7, ()

    def poisoned(m, x, ctx):
        loss = loss_fn(m, x, ctx)
        if ctx.step == bad_step and where == "loss":
            return loss * math.nan
        if ctx.step == bad_step and where == "grad":  # the loss stays finite, its gradient does not
            w = next(iter(m.parameters())).sum()
            return loss + _InfGrad.apply(w) - w.detach()
        return loss

    if where == "param":
        # finite loss and gradients at step 7, but a corrupt Adam state (first moment 1e38, second 0)
        # makes the optimiser step itself overflow the weights
        def corrupt(state):
            for s in state.optimizer.state.values():
                s["exp_avg"].fill_(1e38)
                s["exp_avg_sq"].zero_()
        hooks = [(bad_step, corrupt)]
    with pytest.raises(NonFiniteLossError, match=rf"at step {bad_step}.*last good checkpoint.*step 5\)") as info:
        train(model, poisoned, batch_fn, steps=20, device="cpu", progress=False, checkpoint_path=path,
              checkpoint_every=5, grad_clip=grad_clip, hooks=hooks)
    assert {"loss": "loss", "grad": "gradient norm", "param": "parameter norm"}[where] in str(info.value)
    assert read_checkpoint_meta(path)["step"] == 5  # the message is true: the step-5 file is on disk
    fresh, _, _ = _problem(seed=1)
    load_checkpoint(path, fresh, which="model")
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    assert not (tmp_path / "run.pt.lock").exists()


def test_nan_before_any_checkpoint_says_nothing_was_written(tmp_path):
    model, loss_fn, batch_fn = _problem()
    with pytest.raises(NonFiniteLossError, match=r"nothing was written to .*run\.pt"):
        train(model, lambda m, x, c: loss_fn(m, x, c) * math.nan, batch_fn, steps=3, device="cpu",
              progress=False, checkpoint_path=tmp_path / "run.pt")
    with pytest.raises(NonFiniteLossError, match="no checkpoint was requested"):
        train(model, lambda m, x, c: loss_fn(m, x, c) * math.inf, batch_fn, steps=3, device="cpu", progress=False)
    assert not (tmp_path / "run.pt").exists()


@pytest.mark.parametrize("lr", [0.0, -1e-3, math.nan, math.inf, "1e-3"])
def test_bad_learning_rates_are_refused(lr):
    model, loss_fn, batch_fn = _problem()
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        train(model, loss_fn, batch_fn, steps=1, lr=lr, device="cpu", progress=False)


# ----------------------------------------------------------------------------- damaged checkpoints

def _damaged_files(tmp_path, good):
    blob = good.read_bytes()
    full = torch.load(good, weights_only=True)
    yield "empty", b""
    yield "truncated", blob[: len(blob) // 2]
    yield "random bytes", os.urandom(4096)
    yield "a text file", b"step,loss\n1,0.5\n"
    for key in ("model", "meta_json"):
        part = {k: v for k, v in full.items() if k != key}
        path = tmp_path / "tmp.pt"
        torch.save(part, path)
        yield f"no {key}", path.read_bytes()
    for meta in ("not json{", "[1, 2]"):
        path = tmp_path / "tmp.pt"
        torch.save({**full, "meta_json": meta}, path)
        yield f"meta {meta}", path.read_bytes()
    torch.save([1, 2, 3], tmp_path / "tmp.pt")
    yield "a list", (tmp_path / "tmp.pt").read_bytes()


def test_damaged_checkpoints_raise_one_clear_error(tmp_path):
    good = tmp_path / "good.pt"
    _run(good)
    for what, content in list(_damaged_files(tmp_path, good)):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(content)
        for read in (read_checkpoint_meta, lambda p: load_checkpoint(p, _problem()[0])):
            with pytest.raises(CheckpointError) as info:
                read(bad)
            text = str(info.value)
            assert isinstance(info.value, ValueError), what
            assert str(bad) in text and "not a fewstep checkpoint or is damaged" in text, (what, text)
            assert "retrain" in text and "weights_only" not in text, (what, text)
