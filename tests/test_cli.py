"""The fewstep command line: each sub-command's help, a smoke train/sample/eval, clear errors."""

import subprocess
import sys

import numpy as np
import pytest

from fewstep_lab.cli import build_parser, main


@pytest.mark.parametrize("cmd", ["train", "sample", "eval", "course", "bench", "data"])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: fewstep " + cmd in capsys.readouterr().out


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fewstep_lab", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "course" in out.stdout


def test_train_sample_eval_smoke(tmp_path, capsys):
    ckpt = tmp_path / "edm.pt"
    assert main(["train", "--method", "edm", "--data", "8gaussians", "--profile", "smoke", "--steps", "20",
                 "--out", str(ckpt), "--quiet", "--device", "cpu"]) == 0
    assert "for 20 steps" in capsys.readouterr().out
    out = tmp_path / "s.npy"
    assert main(["sample", "--ckpt", str(ckpt), "--steps", "4", "--n", "64", "--out", str(out)]) == 0
    x = np.load(out)
    assert x.shape == (64, 2) and np.isfinite(x).all()
    assert main(["eval", "--ckpt", str(ckpt), "--steps", "4", "--n", "200", "--seeds", "2"]) == 0
    text = capsys.readouterr().out
    assert "sliced-W2" in text and "noise floor" in text and "NFE      7" in text


def test_eval_exact_teacher_is_near_the_floor(capsys):
    assert main(["eval", "--ckpt", "exact:gaussian", "--steps", "18", "--n", "4000", "--seeds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = float(lines[1].split("sliced-W2")[1].split()[0])
    floor = float(lines[2].split("sliced-W2")[1].split()[0])
    assert model < 3 * floor + 0.01


def test_clear_errors(tmp_path, capsys):
    assert main(["eval", "--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--method", "edm", "--profile", "huge", "--out", str(tmp_path / "x.pt")]) == 2
    assert "unknown profile 'huge'" in capsys.readouterr().err
    assert main(["eval", "--ckpt", "exact:nope"]) == 2
    assert "unknown data 'nope'" in capsys.readouterr().err
    assert main(["eval", "--ckpt", "exact:pinwheel"]) == 2
    assert "no closed-form denoiser" in capsys.readouterr().err
    assert main(["sample", "--ckpt", "exact:gaussian", "--steps", "0", "--out", str(tmp_path / "a.png")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["train", "--method", "cd", "--profile", "smoke", "--out", str(tmp_path / "cd.pt")]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(["train", "--method", "ict", "--profile", "smoke", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["train", "--method", "ict", "--profile", "smoke", "--set", "nope=1", "--out", str(tmp_path / "a.pt")]) == 2
    assert "no recipe field 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", "gan", "--out", "x"])


def test_set_overrides_and_a_different_run_is_not_overwritten(tmp_path, capsys):
    from fewstep_lab.pipeline import load_run

    ckpt = tmp_path / "ct.pt"
    common = ["--profile", "smoke", "--quiet", "--device", "cpu", "--steps", "3", "--out", str(ckpt)]
    assert main(["train", "--method", "ct", "--data", "checkerboard", "--set", "mu0=0.5", "--set", "hidden=32",
                 *common]) == 0
    run = load_run(ckpt)[1]
    assert run.recipe.mu0 == 0.5 and run.data_recipe.hidden == 32 and run.data_recipe.dataset == "checkerboard"
    before = ckpt.read_bytes()
    assert main(["train", "--method", "ict", "--data", "checkerboard", *common]) == 2
    assert "holds a different run" in capsys.readouterr().err and ckpt.read_bytes() == before
    assert main(["train", "--method", "ict", "--data", "checkerboard", "--restart", *common]) == 0
    assert load_run(ckpt)[1].method == "ict"


def test_restart_keeps_the_old_checkpoint_until_the_new_run_writes(tmp_path):
    from fewstep_lab.pipeline import load_run, make_run, train_run

    ckpt = tmp_path / "m.pt"
    train_run(make_run("ict", "8gaussians", "smoke", steps=2), checkpoint_path=ckpt, progress=False)
    before = ckpt.read_bytes()

    def crash(state):
        raise RuntimeError("killed before the first checkpoint")

    with pytest.raises(RuntimeError, match="killed"):
        train_run(make_run("edm", "8gaussians", "smoke", steps=5), checkpoint_path=ckpt, restart=True,
                  progress=False, hooks=[(1, crash)])
    assert ckpt.read_bytes() == before and load_run(ckpt)[1].method == "ict"


def test_a_full_disk_keeps_the_old_sample_file(tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "s.npy"
    out.write_bytes(b"old samples")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    assert main(["sample", "--ckpt", "exact:8gaussians", "--n", "10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disk" in err and "full" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"old samples" and [p.name for p in tmp_path.iterdir()] == ["s.npy"]
