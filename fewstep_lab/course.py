"""Run the course headless: execute the numbered notebooks in order, in one profile.

``run_course`` is what ``fewstep course`` and ``make course`` call. Each notebook runs in
a fresh Jupyter kernel (nbclient) whose environment carries ``FEWSTEP_PROFILE`` (see
``profiles.py``) and ``FEWSTEP_RUN_DIR``, a folder of its own under the output folder
where ``figure_path`` puts its figures. Executed copies are written next to them, or
back into the notebooks with ``inplace=True`` (to commit them with their outputs).
No paper: this is plumbing.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

# profiles.py (and so torch) is imported inside the functions that need it, so that
# `from fewstep_lab.course import figure_path` stays instant.
RUN_DIR_ENV = "FEWSTEP_RUN_DIR"
DEFAULT_FIGURE_DIR = Path("runs") / "figures"
NOTEBOOK_PATTERN = re.compile(r"^\d\d_.*\.ipynb$")


class NotebookError(RuntimeError):
    """A notebook of the course failed; names the notebook, the cell and its error."""

    def __init__(self, notebook, cell_index, ename, evalue, out_path):
        self.notebook, self.cell_index = Path(notebook), cell_index
        self.ename, self.evalue, self.out_path = ename, evalue, Path(out_path)
        where = f"cell {cell_index}" if cell_index is not None else "an unknown cell"
        super().__init__(
            f"notebook {self.notebook.name} failed in {where}: {ename}: {evalue}\n"
            f"The executed copy with the full traceback is {self.out_path}; fix the cell "
            f"and rerun this notebook alone: fewstep course --only {self.notebook.stem[:2]}"
        )


def list_notebooks(folder: str | os.PathLike = "notebooks") -> list[Path]:
    """Return the course notebooks `NN_*.ipynb` in `folder`, sorted (teaching order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no notebook folder {folder.resolve()}; run from the repository root or pass folder=")
    return sorted(p for p in folder.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))


def figure_path(name: str) -> Path:
    """Return a PNG path `name` under $FEWSTEP_RUN_DIR (default runs/figures), folders created."""
    path = Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_FIGURE_DIR) / name
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _first_error(nb):
    """Return (cell index, ename, evalue) of the first cell with an error output, or None."""
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return index, output.get("ename", "Error"), output.get("evalue", "")
    return None


def run_notebook(path, out_path, *, profile: str, timeout: int = 1800, run_dir=None) -> float:
    """Execute notebook `path` in a fresh kernel (nbclient), write it to `out_path`, return seconds.

    The kernel runs in the notebook's folder with FEWSTEP_PROFILE=`profile` and
    FEWSTEP_RUN_DIR=`run_dir` (default: a folder named after the notebook next to
    `out_path`). `timeout` is per cell, in seconds. On failure the partly executed
    copy is still written and NotebookError is raised.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    from fewstep_lab.profiles import PROFILE_ENV, get_profile

    path, out_path = Path(path), Path(out_path)
    profile = get_profile(profile)
    run_dir = Path(run_dir) if run_dir is not None else out_path.parent / path.stem
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, PROFILE_ENV: profile, RUN_DIR_ENV: str(run_dir)}
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=env)
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        nbformat.write(nb, out_path)  # keep what ran, with the error output, for inspection
        found = _first_error(nb)
        if found is None:  # timeouts and dead kernels leave no error output
            index = next((i for i, c in reversed(list(enumerate(nb.cells)))
                          if c.get("execution_count") is not None), None)
            found = (index, type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "")
        raise NotebookError(path, *found, out_path) from err
    elapsed = time.perf_counter() - start
    nbformat.write(nb, out_path)
    return elapsed


def _select(notebooks, only):
    """Keep the notebooks chosen by `only`: numbers ('3', '03') or parts of their names."""
    if only is None:
        return notebooks
    wanted = [str(o) for o in ([only] if isinstance(only, (str, int)) else only)]
    chosen = []
    for want in wanted:
        if want.isdigit():
            hits = [nb for nb in notebooks if int(nb.stem[:2]) == int(want)]
        else:
            hits = [nb for nb in notebooks if want in nb.name]
        if not hits:
            names = ", ".join(nb.stem for nb in notebooks) or "(none)"
            raise ValueError(f"no notebook matches {want!r}; available: {names}")
        chosen += [nb for nb in hits if nb not in chosen]
    return sorted(chosen)


def run_course(profile=None, out_dir="runs/course", only=None, inplace=False, *,
               folder="notebooks", timeout: int = 1800) -> dict[str, float]:
    """Execute the course notebooks in order in one profile; print and return {name: seconds}.

    Executed copies go to `out_dir` (or back into the notebooks with `inplace=True`);
    each notebook's figures go to `out_dir/<notebook stem>/`. `only` selects notebooks by
    number ('3' or '03') or by a part of their name. Raises NotebookError at the first failure; the copies
    already written stay.
    """
    from fewstep_lab.profiles import get_profile

    profile = get_profile(profile)
    notebooks = _select(list_notebooks(folder), only)
    if not notebooks:
        raise FileNotFoundError(f"no NN_*.ipynb notebooks in {Path(folder).resolve()}")
    out_dir = Path(out_dir)
    width = max(len(nb.name) for nb in notebooks) + 2
    print(f"profile {profile}: {len(notebooks)} notebook(s), outputs in {out_dir}", flush=True)
    print(f"{'notebook':<{width}}{'seconds':>9}", flush=True)
    timings = {}
    for nb in notebooks:
        out_path = nb if inplace else out_dir / nb.name
        try:
            timings[nb.name] = run_notebook(nb, out_path, profile=profile, timeout=timeout,
                                            run_dir=out_dir / nb.stem)
        except NotebookError:
            print(f"{nb.name:<{width}}{'FAILED':>9}", flush=True)
            raise
        print(f"{nb.name:<{width}}{timings[nb.name]:9.1f}", flush=True)
    print(f"{'total':<{width}}{sum(timings.values()):9.1f}", flush=True)
    return timings
