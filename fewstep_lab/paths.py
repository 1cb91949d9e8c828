"""Where the course writes: the repository root, its runs/ folder and the figures of a notebook.

Paths do not depend on the working directory: JupyterLab runs a notebook in ``notebooks/``, the
tests and ``fewstep course`` elsewhere, and all of them must find the checkpoint that notebook 05
saved for notebook 06, and put figures where the README says. The repository root is the
folder holding ``notebooks/`` and ``pyproject.toml``: the one above the package for an editable
install or a checkout, else the first such folder above the working directory, else the
working directory. ``FEWSTEP_RUNS`` moves ``runs/``; ``FEWSTEP_RUN_DIR`` (set per notebook by
``fewstep course``) moves the figures. No paper: this is plumbing.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR_ENV = "FEWSTEP_RUN_DIR"
RUNS_ENV = "FEWSTEP_RUNS"
PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def _is_repo(folder: Path) -> bool:
    return (folder / "notebooks").is_dir() and (folder / "pyproject.toml").is_file()


def repo_root() -> Path:
    """The repository root (see the module doc): package parent, else a parent of the cwd, else the cwd."""
    if _is_repo(PACKAGE_PARENT):
        return PACKAGE_PARENT
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if _is_repo(folder):
            return folder
    return cwd


def runs_dir() -> Path:
    """$FEWSTEP_RUNS, else `<repository root>/runs` (not created)."""
    value = os.environ.get(RUNS_ENV)
    return Path(value).expanduser().resolve() if value else repo_root() / "runs"


def run_path(*parts: str) -> Path:
    """A path under the runs folder (`runs_dir()`), its parent folder created: the same file whatever the cwd.

    For checkpoints shared between notebooks: ``run_path("checkpoints", "edm_cifar10_cpu.pt")``
    is the same file under ``fewstep course``, in JupyterLab and in a script.
    """
    if not parts:
        raise ValueError("run_path needs at least one part, e.g. run_path('checkpoints', 'teacher.pt')")
    path = runs_dir().joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def figure_path(name: str) -> Path:
    """A PNG path `name` under $FEWSTEP_RUN_DIR, else `<runs>/figures/`; folders created."""
    base = os.environ.get(RUN_DIR_ENV)
    path = (Path(base) if base else runs_dir() / "figures") / name
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
