"""fewstep course's runner (fewstep_lab/course.py, paths.py): failures outside the code, progress, failed
copies, paths that do not depend on the working directory, the notebook set-up helper."""

import os
import re

import nbformat
import pytest
import torch

from fewstep_lab import paths, profiles
from fewstep_lab.course import CourseFailed, NotebookError, run_course, run_notebook


def _notebook(path, *sources, outputs=None):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for cell in nb.cells:  # outputs "committed" with the notebook
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=outputs or "committed\n")]
        cell.execution_count = 1
    nbformat.write(nb, path)
    return path


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A fake repository (notebooks/, pyproject.toml) that paths.repo_root() finds."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setattr(paths, "PACKAGE_PARENT", tmp_path)
    for name in ("FEWSTEP_RUNS", "FEWSTEP_RUN_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_data_failures_are_one_line_and_the_course_goes_on(repo, capsys):
    nbs = repo / "notebooks"
    _notebook(nbs / "01_ok.ipynb", "print('one')")
    _notebook(nbs / "02_data.ipynb", "from fewstep_lab.data.images import DataUnavailableError\n"
              "raise DataUnavailableError('CIFAR-10 not found; looked in ...')", "print('never')")
    _notebook(nbs / "03_net.ipynb", "import urllib.error\nraise urllib.error.URLError('no route to host')")
    _notebook(nbs / "04_ok.ipynb", "import os\nprint(os.environ['FEWSTEP_PROGRESS'])")
    with pytest.raises(CourseFailed) as info:
        run_course("smoke", out_dir=repo / "out", folder=nbs, timeout=120)
    assert isinstance(info.value, RuntimeError)
    status = {r.name: r.status for r in info.value.results}
    assert status == {"01_ok.ipynb": "passed", "02_data.ipynb": "skipped", "03_net.ipynb": "skipped",
                      "04_ok.ipynb": "passed"}
    assert "2 of 4 notebook(s) did not run to the end" in str(info.value)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("02_data.ipynb"))
    assert "SKIPPED" in line and "fewstep data cifar10 --download" in line and "DataUnavailableError" in line
    assert re.search(r"03_net\.ipynb\s+SKIPPED.*network access", out)
    assert re.search(r"04_ok\.ipynb\s+\d+\.\d", out) and "2 of 4 notebook(s) ran to the end" in out
    # FEWSTEP_PROGRESS=0 reaches the kernel; the failed copy shows no committed output below the error
    done = nbformat.read(repo / "out" / "04_ok.ipynb", as_version=4)
    assert done.cells[0].outputs[0]["text"].strip() == "0"
    failed = nbformat.read(repo / "out" / "02_data.ipynb", as_version=4)
    assert failed.cells[0].outputs[-1]["ename"] == "DataUnavailableError"
    assert failed.cells[1].outputs == [] and failed.cells[1].execution_count is None


def test_code_error_stops_at_once_and_inplace_keeps_the_source(repo, capsys):
    nbs = repo / "notebooks"
    source = _notebook(nbs / "01_bug.ipynb", "x = 1", "raise FileNotFoundError('no such file: x.csv')", "y = 2")
    _notebook(nbs / "02_never.ipynb", "open('ran', 'w')")
    before = source.read_bytes()
    with pytest.raises(NotebookError) as info:
        run_course("smoke", out_dir=repo / "out", folder=nbs, inplace=True, timeout=120)
    assert info.value.cell_index == 1 and info.value.external is None  # a FileNotFoundError not about CIFAR-10
    assert source.read_bytes() == before  # in place: a failure never overwrites the committed notebook
    copy = nbformat.read(repo / "out" / "01_bug.ipynb", as_version=4)
    assert copy.cells[0].outputs == [] and copy.cells[1].outputs[0]["ename"] == "FileNotFoundError"
    assert copy.cells[2].outputs == []  # not the committed "committed\n"
    assert not (nbs / "ran").exists() and "FAILED" in capsys.readouterr().out


def test_no_tcp_warning_and_progress_bar_names_the_cell(repo, capfd):
    nbs = repo / "notebooks"
    _notebook(nbs / "01_ok.ipynb", "a = 1", "b = 2")
    seconds = run_notebook(nbs / "01_ok.ipynb", repo / "out" / "01_ok.ipynb", profile="smoke", progress=True)
    assert seconds > 0
    err = capfd.readouterr().err
    assert "without encryption" not in err
    assert "01_ok.ipynb" in err and "cell/s" in err and "ZMQError" not in err  # the bar: notebook and cells
    assert not list((repo / "out").glob(".*.tmp"))  # written atomically, no temporary file left


def test_paths_resolve_to_the_repository_whatever_the_cwd(repo, monkeypatch):
    monkeypatch.chdir(repo / "notebooks")  # JupyterLab's working directory
    assert paths.repo_root() == repo
    assert paths.figure_path("x") == repo / "runs" / "figures" / "x.png"
    ckpt = paths.run_path("checkpoints", "edm_cifar10_cpu.pt")
    assert ckpt == repo / "runs" / "checkpoints" / "edm_cifar10_cpu.pt" and ckpt.parent.is_dir()
    monkeypatch.chdir(repo)
    assert paths.run_path("checkpoints", "edm_cifar10_cpu.pt") == ckpt  # same file from the root
    monkeypatch.setenv("FEWSTEP_RUNS", str(repo / "elsewhere"))
    assert paths.run_path("a.pt") == repo / "elsewhere" / "a.pt"
    assert paths.figure_path("x") == repo / "elsewhere" / "figures" / "x.png"
    monkeypatch.setenv("FEWSTEP_RUN_DIR", str(repo / "nb01"))
    assert paths.figure_path("x") == repo / "nb01" / "x.png"  # FEWSTEP_RUN_DIR still wins for figures
    with pytest.raises(ValueError, match="at least one part"):
        paths.run_path()


def test_repo_root_found_from_the_cwd_when_the_package_is_installed_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "PACKAGE_PARENT", tmp_path / "site-packages")
    (tmp_path / "repo" / "notebooks").mkdir(parents=True)
    (tmp_path / "repo" / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path / "repo" / "notebooks")
    assert paths.repo_root() == tmp_path / "repo"
    monkeypatch.chdir(tmp_path)
    assert paths.repo_root() == tmp_path  # no repository anywhere: the working directory


# ----------------------------------------------------------------------------- profiles helpers

@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_setup_notebook_sets_threads_from_the_load(monkeypatch, capsys, threads):
    for name in ("FEWSTEP_THREADS", "OMP_NUM_THREADS", "FEWSTEP_PROFILE", "FEWSTEP_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(profiles, "_usable_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))  # one core taken by someone else
    profile, device = profiles.setup_notebook("smoke", device="cpu")
    assert (profile, device, torch.get_num_threads()) == ("smoke", torch.device("cpu"), 1)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "'smoke'" in line and "1 torch thread (2 cores, load 1.2)" in line
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))  # idle: both cores
    profiles.setup_notebook("smoke", device="cpu")
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))  # overloaded: still one
    assert profiles.auto_threads()[0] == 1


def test_setup_notebook_threads_from_argument_and_environment(monkeypatch, capsys, threads):
    monkeypatch.delenv("FEWSTEP_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    profiles.setup_notebook("cpu", device="cpu")
    assert torch.get_num_threads() == 1 and "from OMP_NUM_THREADS" in capsys.readouterr().out
    monkeypatch.setenv("FEWSTEP_THREADS", "2")
    assert profiles.auto_threads() == (2, "from FEWSTEP_THREADS")
    profiles.setup_notebook("cpu", threads=3, device="cpu")
    assert torch.get_num_threads() == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            profiles.setup_notebook("cpu", threads=bad, device="cpu")
    monkeypatch.setenv("FEWSTEP_THREADS", "many")
    with pytest.raises(ValueError, match="FEWSTEP_THREADS='many'"):
        profiles.auto_threads()
    with pytest.raises(ValueError, match="valid profiles"):
        profiles.setup_notebook("laptop")


def test_progress_env_turns_bars_off(monkeypatch):
    monkeypatch.delenv("FEWSTEP_PROGRESS", raising=False)
    assert profiles.progress_enabled() and profiles.progress_enabled(True) and not profiles.progress_enabled(False)
    for off in ("0", "false", "No", "off"):
        monkeypatch.setenv("FEWSTEP_PROGRESS", off)
        assert not profiles.progress_enabled(True)
    monkeypatch.setenv("FEWSTEP_PROGRESS", "1")
    assert profiles.progress_enabled(None)
