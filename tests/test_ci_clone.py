""".ci/run's second run: a clean clone with no ../shared beside it, FEWSTEP_NO_DOWNLOAD=1, must pass too."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None,
                                reason="needs make and git")


def _repo(path, recipe):
    """A git repository holding .ci/run and a Makefile whose `make test` runs `recipe`, with ../shared beside it."""
    (path / ".ci").mkdir(parents=True)
    (path.parent / "shared").mkdir()
    shutil.copy2(ROOT / ".ci" / "run", path / ".ci" / "run")
    (path / "Makefile").write_text(f"test:\n\t{recipe}\n")
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "-C", str(path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "scratch"], check=True)
    return path


def _ci(repo, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "CI_CACHE": str(tmp_path / "cache"), "FEWSTEP_DATA": "x"}
    env.pop("FEWSTEP_NO_DOWNLOAD", None)
    return subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=120)


# The recipe reports where it runs; it fails (exit 3) only without ../shared.
REPORT = ('@echo "shared=$$(test -e ../shared && echo yes || echo no) nodl=$$FEWSTEP_NO_DOWNLOAD '
          'data=$$FEWSTEP_DATA"')


def test_second_run_is_a_clone_without_shared_and_without_downloads(tmp_path):
    out = _ci(_repo(tmp_path / "src", REPORT), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "shared=yes nodl= data=x" in out.stdout  # the main run, as before
    assert "shared=no nodl=1 data=" in out.stdout  # the clone: no ../shared, no download, no FEWSTEP_DATA
    assert "PASSED" in out.stdout and "both runs" in out.stdout
    assert not list(tmp_path.glob("fewstep-ci-clone.*"))  # the clone is removed afterwards


def test_failure_in_the_clean_clone_fails_ci(tmp_path):
    out = _ci(_repo(tmp_path / "src", REPORT + "; test -e ../shared || exit 3"), tmp_path)
    assert out.returncode != 0
    assert "FAILED (clean clone without ../shared)" in out.stdout and "exited 3" in out.stdout


def test_make_torch_cpu_installs_the_cpu_build_first(tmp_path):
    def dry(*args):
        return subprocess.run(["make", "-n", *args, f"VENV={tmp_path}/venv"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.splitlines()

    lines = dry("course", "TORCH=cpu")
    torch_line = next(i for i, line in enumerate(lines) if "--index-url" in line)
    package_line = next(i for i, line in enumerate(lines) if "pip install -e ." in line)
    assert torch_line < package_line
    pin = re.search(r'"torch==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f'"torch=={pin}" --index-url https://download.pytorch.org/whl/cpu' in lines[torch_line]
    assert any("--index-url https://download.pytorch.org/whl/cu128" in line for line in dry("test", "TORCH=cu128"))
    assert not any("--index-url" in line for line in dry("course"))  # without TORCH: plain pip, as before
