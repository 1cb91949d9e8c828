"""Packaging, CI and the headless course runner (pyproject.toml, environment.yml, Makefile,
.ci/run, fewstep_lab/__main__.py, fewstep_lab/course.py)."""

import os
import re
import runpy
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
import yaml

import fewstep_lab
from fewstep_lab import course
from fewstep_lab import paths as course_paths
from fewstep_lab.course import NotebookError, figure_path, list_notebooks, run_course, run_notebook

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = ("FEWSTEP_PROFILE=smoke OMP_NUM_THREADS=1 python -m pytest -n 2 --dist loadscope "
                "--nbval-lax --nbval-current-env tests notebooks")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement(line):
    """Split 'name[extra] op version; marker' into (normalized name, specifier without spaces)."""
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)", line)
    assert match, f"cannot parse requirement {line!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower(), match.group(3).replace(" ", "")


def _names(lines):
    return {_requirement(line)[0] for line in lines}


# --- pyproject.toml -------------------------------------------------------------------

def test_pyproject_runtime_dependencies():
    project = _pyproject()["project"]
    assert project["name"] == "fewstep_lab"
    assert project["requires-python"] == ">=3.10"
    deps = dict(_requirement(d) for d in project["dependencies"])
    # An unpinned torch makes pip fetch a multi-GB CUDA build.
    assert deps["torch"] == "==2.13.0"
    for name in ["numpy", "scipy", "matplotlib", "torchdiffeq", "tqdm", "ipywidgets",
                 "safetensors", "nbclient", "nbformat", "ipykernel"]:
        assert name in deps, f"{name} missing from [project] dependencies"
    assert "torchvision" not in deps  # PyPI's torchvision does not install beside the CPU torch


def test_pyproject_extras_keep_jupyterlab_out_of_tests():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    dev, lab = _names(extras["dev"]), _names(extras["lab"])
    assert {"pytest", "pytest-xdist", "nbval", "diffusers", "pyyaml", "tomli"} <= dev
    assert lab == {"jupyterlab"}
    assert "jupyterlab" not in dev | _names(project["dependencies"])


def test_pyproject_entry_points_packages_and_version():
    data = _pyproject()
    assert data["project"]["scripts"] == {"fewstep": "fewstep_lab.cli:main"}
    setuptools = data["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == ["fewstep_lab*"]
    assert "assets/*" in setuptools["package-data"]["fewstep_lab"]
    assert setuptools["dynamic"]["version"] == {"attr": "fewstep_lab.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", fewstep_lab.__version__)


def test_installed_metadata_matches_the_source():
    from importlib import metadata
    try:
        dist = metadata.distribution("fewstep_lab")
    except metadata.PackageNotFoundError:
        pytest.skip("fewstep_lab is not installed (pip install -e .)")
    assert dist.version == fewstep_lab.__version__
    assert any(ep.name == "fewstep" and ep.value == "fewstep_lab.cli:main" for ep in dist.entry_points)


def test_environment_yml_lists_the_same_runtime_dependencies():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(d.split("=")[0] == "python" for d in conda) and "pip" in conda
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    editable = [p for p in pip if p.startswith("-e")]
    assert [e.replace(" ", "") for e in editable] == ["-e.[dev,lab]"]
    listed = sorted(_requirement(p) for p in pip if not p.startswith("-"))
    wanted = sorted(_requirement(d) for d in _pyproject()["project"]["dependencies"])
    assert listed == wanted, "environment.yml and pyproject.toml disagree (names or pins)"


def test_python_m_fewstep_lab_calls_cli_main(monkeypatch):
    calls = []
    fake = types.ModuleType("fewstep_lab.cli")
    fake.main = lambda: calls.append(True) or 0
    monkeypatch.setitem(sys.modules, "fewstep_lab.cli", fake)
    with pytest.raises(SystemExit) as info:
        runpy.run_module("fewstep_lab", run_name="__main__")
    assert calls == [True] and info.value.code == 0


# --- README, Makefile, CI ---------------------------------------------------------------

def test_readme_test_command_is_what_make_test_runs():
    assert TEST_COMMAND in (ROOT / "README.md").read_text()
    recipe = re.search(r"^test:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    recipe = recipe.replace("$(PY)", "python").replace("$(TEST_PATHS)", "tests notebooks")
    assert recipe.replace(" $(PYTEST_ARGS)", "") == TEST_COMMAND


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_dry_run(tmp_path):
    def dry(*args):
        out = subprocess.run(["make", "-n", *args, f"VENV={tmp_path}/venv"], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        return out.stdout
    test = dry("test")
    assert "-m venv" in test and 'pip install -e ".[dev]"' in test
    assert "FEWSTEP_PROFILE=smoke" in test and "--dist loadscope --nbval-lax --nbval-current-env" in test
    assert "FEWSTEP_PROFILE=smoke" in dry("course", "PROFILE=smoke") and "fewstep course" in dry("course")
    assert "fewstep course --profile cpu --inplace" in dry("notebooks")
    assert 'pip install -e ".[lab]"' in dry("lab") and "jupyter lab" in dry("lab")


def _scratch_checkout(path, recipe):
    """A throwaway checkout holding a copy of .ci/run and a Makefile whose `make test` runs `recipe`."""
    (path / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", path / ".ci" / "run")
    (path / "Makefile").write_text(f"test:\n\t{recipe}\n")
    return path


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("code", [0, 1, 5])
def test_ci_run_fails_on_failures_and_on_no_tests_collected(code, tmp_path):
    script = ROOT / ".ci" / "run"
    assert "set -euo pipefail" in script.read_text() and "make --no-print-directory test" in script.read_text()
    checkout = _scratch_checkout(tmp_path / "src", f"@echo CI is $$CI; exit {code}")
    env = {**os.environ, "TMPDIR": str(tmp_path), "CI_CACHE": str(tmp_path / "cache")}
    env.pop("CI", None)
    out = subprocess.run(["bash", str(checkout / ".ci" / "run")], env=env, capture_output=True, text=True)
    assert "CI is true" in out.stdout
    if code == 0:
        assert out.returncode == 0 and "PASSED" in out.stdout
    else:
        assert out.returncode != 0 and "FAILED" in out.stdout
    if code == 5:
        assert out.returncode == 5 and "no tests" in out.stdout


# --- course.py --------------------------------------------------------------------------

def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


OK_CELLS = (
    "import os\nfrom fewstep_lab.course import figure_path",
    "p = figure_path('curve')\np.write_bytes(b'png')\n"
    "print(os.environ['FEWSTEP_PROFILE'], p, os.getcwd(), sep='|')",
)


def test_list_notebooks_keeps_numbered_ones_sorted(tmp_path):
    for name in ["10_b.ipynb", "02b_z.ipynb", "02_a.ipynb", "scratch.ipynb", "2_x.ipynb", "03_c.txt", "02bb_y.ipynb"]:
        (tmp_path / name).write_text("{}")
    assert [p.name for p in list_notebooks(tmp_path)] == ["02_a.ipynb", "02b_z.ipynb", "10_b.ipynb"]
    with pytest.raises(FileNotFoundError, match="no notebook folder"):
        list_notebooks(tmp_path / "missing")


def test_figure_path_under_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_RUN_DIR", str(tmp_path / "run"))
    path = figure_path("sub/loss")
    assert path == tmp_path / "run" / "sub" / "loss.png" and path.parent.is_dir()
    monkeypatch.delenv("FEWSTEP_RUN_DIR")
    monkeypatch.delenv("FEWSTEP_RUNS", raising=False)
    # Without it: runs/figures of the repository, whatever the working directory (JupyterLab: notebooks/).
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setattr(course_paths, "PACKAGE_PARENT", tmp_path)
    monkeypatch.chdir(tmp_path / "notebooks")
    assert figure_path("a.png") == tmp_path / "runs/figures/a.png" and (tmp_path / "runs/figures").is_dir()


def test_run_course_runs_in_order_and_reports_the_failing_cell(tmp_path, capsys):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_ok.ipynb", *OK_CELLS)
    _notebook(folder / "02_broken.ipynb", "x = 1", "raise KeyError('no such sigma')", "y = 2")
    _notebook(folder / "03_never.ipynb", "open('ran', 'w')")
    out_dir = tmp_path / "out"
    with pytest.raises(NotebookError) as info:
        run_course("smoke", out_dir=out_dir, folder=folder, timeout=120)
    err = info.value
    assert err.notebook.name == "02_broken.ipynb" and err.cell_index == 1
    assert err.ename == "KeyError" and "no such sigma" in str(err) and "02_broken.ipynb" in str(err)
    # The notebook that passed keeps its executed copy, with its outputs and its figure.
    done = nbformat.read(out_dir / "01_ok.ipynb", as_version=4)
    profile, fig, cwd = done.cells[1].outputs[0]["text"].strip().split("|")
    assert profile == "smoke" and Path(fig) == (out_dir / "01_ok" / "curve.png").resolve()
    assert Path(fig).read_bytes() == b"png" and Path(cwd) == folder.resolve()
    # The failing one is written up to the error; the later one never ran.
    broken = nbformat.read(err.out_path, as_version=4)
    assert broken.cells[1].outputs[0]["ename"] == "KeyError" and not broken.cells[2].outputs
    assert not (out_dir / "03_never.ipynb").exists() and not (folder / "ran").exists()
    table = capsys.readouterr().out
    assert re.search(r"01_ok\.ipynb\s+\d+\.\d", table) and re.search(r"02_broken\.ipynb\s+FAILED", table)


def test_run_course_inplace_only_and_run_notebook(tmp_path, capsys):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_ok.ipynb", *OK_CELLS)
    _notebook(folder / "02_other.ipynb", "raise SystemExit('must not run')")
    with pytest.raises(ValueError, match="no notebook matches '7'.*01_ok"):
        run_course("smoke", folder=folder, only=["7"])
    assert [p.name for p in course._select(list_notebooks(folder), ["other", 1])] == ["01_ok.ipynb", "02_other.ipynb"]
    assert [p.name for p in course._select(list_notebooks(folder), "2")] == ["02_other.ipynb"]
    timings = run_course("cpu", out_dir=tmp_path / "out", only="01", inplace=True, folder=folder)
    assert list(timings) == ["01_ok.ipynb"] and timings["01_ok.ipynb"] > 0
    assert "total" in capsys.readouterr().out
    executed = nbformat.read(folder / "01_ok.ipynb", as_version=4)
    assert executed.cells[1].outputs[0]["text"].startswith("cpu|")
    assert not list((tmp_path / "out").glob("*.ipynb"))  # in place: no copies
    with pytest.raises(ValueError, match="valid profiles"):
        run_notebook(folder / "01_ok.ipynb", tmp_path / "x.ipynb", profile="turbo")

