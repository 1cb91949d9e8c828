"""Every failure of the real `fewstep` entry point is one line, `fewstep <command>: error: ...`, and a non-zero exit.

Each case runs `python -m fewstep_lab` in a subprocess (what a user types) and checks the exit code, that
stderr holds exactly one line naming the problem, and that no Python traceback is shown."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fewstep_lab.pipeline import make_run, train_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_PROFILE": "smoke", "FEWSTEP_DEBUG": ""}


def fewstep(*args, cwd=None):
    done = subprocess.run([sys.executable, "-m", "fewstep_lab", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)
    return done.returncode, done.stdout, done.stderr


def one_line_error(rc, err, command, *needles):
    assert rc != 0, err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fewstep {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts")
    train_run(make_run("edm", "8gaussians", "smoke", steps=2), checkpoint_path=out / "edm.pt", progress=False)
    train_run(make_run("ict", "8gaussians", "smoke", steps=2), checkpoint_path=out / "ict.pt", progress=False)
    return out


def test_out_is_a_folder_or_unwritable_is_refused_before_any_work(tmp_path):
    one_line_error(*fewstep("train", "--method", "edm", "--out", tmp_path)[::2], "train", "is a folder")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    one_line_error(*fewstep("train", "--method", "edm", "--out", blocker / "sub" / "m.pt")[::2], "train",
                   "cannot create the folder")
    one_line_error(*fewstep("sample", "--ckpt", "exact:8gaussians", "--out", tmp_path / "x.txt")[::2], "sample",
                   "unknown output type '.txt'")


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage" * 3, os.urandom(4096), b"just some text\n"],
                         ids=["empty", "truncated-pickle", "random-bytes", "text"])
def test_damaged_checkpoints_name_the_file(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    rc, _, err = fewstep("eval", "--ckpt", bad, "--n", "100")
    one_line_error(rc, err, "eval", str(bad))


def test_a_truncated_real_checkpoint_is_refused(tmp_path, ckpts):
    data = (ckpts / "edm.pt").read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 2])
    one_line_error(*fewstep("sample", "--ckpt", bad, "--out", tmp_path / "s.npy")[::2], "sample", str(bad))


def test_teacher_of_the_wrong_kind_is_refused(tmp_path, ckpts):
    rc, _, err = fewstep("train", "--method", "cd", "--teacher", ckpts / "ict.pt", "--out", tmp_path / "cd.pt")
    one_line_error(rc, err, "train", "distils a diffusion teacher")
    assert not (tmp_path / "cd.pt").exists()


def test_checkpoint_with_bad_run_json_is_refused(tmp_path, ckpts):
    blob = torch.load(ckpts / "edm.pt", weights_only=True)
    meta = json.loads(blob["meta_json"])
    for change, needle in ((("recipe", "sigma_data", float("nan")), "sigma_data"),
                           (("recipe", "steps", "many"), "steps"),
                           (("data_recipe", "hidden", -4), "hidden")):
        part, key, value = change
        bad = json.loads(json.dumps(meta))
        bad["run"][part][key] = value
        blob["meta_json"] = json.dumps(bad)
        path = tmp_path / "bad.pt"
        torch.save(blob, path)
        rc, _, err = fewstep("sample", "--ckpt", path, "--out", tmp_path / "s.npy")
        one_line_error(rc, err, "sample", "invalid run description", needle)


def test_bad_numbers_and_unknown_names(tmp_path):
    one_line_error(*fewstep("sample", "--ckpt", "exact:8gaussians", "--n", "-5", "--out", tmp_path / "s.npy")[::2],
                   "sample", "--n must be >= 1")
    one_line_error(*fewstep("eval", "--ckpt", "exact:pinwheel")[::2], "eval", "no closed-form denoiser")
    one_line_error(*fewstep("eval", "--ckpt", "exact:8gaussians", "--seeds", "0")[::2], "eval", "--seeds >= 1")
    one_line_error(*fewstep("train", "--method", "ct", "--set", "mu0=2", "--out", tmp_path / "c.pt")[::2], "train",
                   "mu0 must lie in (0, 1)")
    one_line_error(*fewstep("train", "--method", "edm", "--set", "lr=nan", "--out", tmp_path / "c.pt")[::2], "train",
                   "lr must be a finite")
    one_line_error(*fewstep("train", "--method", "edm", "--data", "mnist", "--out", tmp_path / "c.pt")[::2], "train",
                   "unknown data 'mnist'")
    one_line_error(*fewstep("eval", "--ckpt", tmp_path / "missing.pt")[::2], "eval", "no checkpoint")
