"""Run the course headless: execute the numbered notebooks in order, in one profile.

``run_course`` is what ``fewstep course`` and ``make course`` call. Each notebook runs in
a fresh Jupyter kernel (nbclient, over IPC sockets where the platform has them, so nothing
listens on TCP) whose environment carries ``FEWSTEP_PROFILE`` (see ``profiles.py``),
``FEWSTEP_RUN_DIR`` (a folder of its own under the output folder, where ``figure_path`` puts its
figures) and ``FEWSTEP_PROGRESS=0`` (no training bars in the written outputs). Executed copies
are written atomically next to them, or back into the notebooks with ``inplace=True`` (to
commit them with their outputs); a failed notebook's copy always goes to the output folder,
its cells below the error cleared. A notebook that fails for a reason outside the code (data
not available, no network) is reported in one line and the course goes on; a code error stops
it. No paper: this is plumbing.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# figure_path and run_path live in paths.py (no torch import: `from fewstep_lab.course import
# figure_path` stays instant); profiles.py (and so torch) is imported inside the functions.
from .paths import RUN_DIR_ENV, figure_path, repo_root, run_path  # noqa: F401

NOTEBOOK_PATTERN = re.compile(r"^\d\d[a-z]?_.*\.ipynb$")  # 04_..., 04b_... (a lesson in two parts)
# Errors that come from the machine, not the code: the notebook is skipped with the fix, the course goes on.
EXTERNAL = {"DataUnavailableError": "CIFAR-10 is not available here",
            "URLError": "it needs network access", "HTTPError": "it needs network access",
            "ConnectionError": "it needs network access", "ConnectionRefusedError": "it needs network access"}
DATA_FIX = ("get CIFAR-10 first: `fewstep data cifar10 --download` (needs internet), or unpack it into "
            "./data/cifar10 or set FEWSTEP_DATA (see data/README.md)")


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

    @property
    def external(self) -> str | None:
        """Why the failure is the machine's (data, network), or None for an error in the code."""
        if self.ename in EXTERNAL:
            return EXTERNAL[self.ename]
        if self.ename == "FileNotFoundError" and "CIFAR-10" in self.evalue:
            return EXTERNAL["DataUnavailableError"]
        return None


@dataclass
class NotebookResult:
    """How one notebook went: status 'passed', 'skipped' (outside the code, with the fix) or 'failed'."""

    name: str
    status: str
    seconds: float
    message: str = ""


class CourseFailed(RuntimeError):
    """Some notebooks could not run for reasons outside the code; `results` lists every notebook."""

    def __init__(self, results: list[NotebookResult]):
        self.results = results
        bad = [r for r in results if r.status != "passed"]
        lines = [f"{len(bad)} of {len(results)} notebook(s) did not run to the end:"]
        lines += [f"  {r.name}: {r.message}" for r in bad]
        super().__init__("\n".join(lines))


def list_notebooks(folder: str | os.PathLike = "notebooks") -> list[Path]:
    """Return the course notebooks `NN_*.ipynb` in `folder`, sorted (teaching order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no notebook folder {folder.resolve()}; run from the repository root or pass folder=")
    return sorted(p for p in folder.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))


def _first_error(nb):
    """Return (cell index, ename, evalue) of the first cell with an error output, or None."""
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return index, output.get("ename", "Error"), output.get("evalue", "")
    return None


def _clear_after(nb, index) -> None:
    """Clear the cells below `index`: a failed copy must not show the committed outputs of cells that never ran."""
    for cell in nb.cells[(index or 0) + 1:]:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None


def _write(nb, path: Path) -> None:
    import nbformat

    from .io import atomic_write_text

    atomic_write_text(path, nbformat.writes(nb))


def _kernel_config(socket_dir: str):
    """Kernels talk over IPC sockets in `socket_dir` (POSIX); Windows has no IPC transport, so TCP there."""
    from traitlets.config import Config

    config = Config()
    if os.name == "posix":
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = os.path.join(socket_dir, "kernel")
    return config


def run_notebook(path, out_path, *, profile: str, timeout: int = 1800, run_dir=None, failed_path=None,
                 progress: bool | None = None) -> float:
    """Execute notebook `path` in a fresh kernel (nbclient), write it to `out_path`, return seconds.

    The kernel runs in the notebook's folder with FEWSTEP_PROFILE=`profile`, FEWSTEP_PROGRESS=0
    and FEWSTEP_RUN_DIR=`run_dir` (default: a folder named after the notebook next to
    `out_path`). `timeout` is per cell, in seconds. `progress` shows a bar of the cells
    (None: when the terminal is interactive). On failure the partly executed copy is written
    to `failed_path` (default `out_path`), cells below the error cleared, and NotebookError is raised.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from tqdm.auto import tqdm

    from fewstep_lab.profiles import PROFILE_ENV, PROGRESS_ENV, get_profile

    path, out_path = Path(path), Path(out_path)
    failed_path = Path(failed_path) if failed_path is not None else out_path
    profile = get_profile(profile)
    run_dir = Path(run_dir) if run_dir is not None else out_path.parent / path.stem
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, PROFILE_ENV: profile, RUN_DIR_ENV: str(run_dir), PROGRESS_ENV: "0"}
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    bar = tqdm(total=n_code, desc=path.name, unit="cell", leave=False, file=sys.stderr,
               disable=None if progress is None else not progress)

    def on_cell_execute(cell, cell_index):
        bar.set_postfix_str(f"cell {cell_index}", refresh=False)

    def on_cell_executed(cell, cell_index, execute_reply):
        bar.update(1)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fewstep-kernel-") as sockets:
        client = NotebookClient(
            # shutdown "immediate": once the last cell has run, the kernel is killed rather than asked to stop,
            # which spared us ZMQ shutdown tracebacks printed by exiting kernels into the next notebook's output
            nb, timeout=timeout, kernel_name="python3", config=_kernel_config(sockets), shutdown_kernel="immediate",
            resources={"metadata": {"path": str(path.parent.resolve())}},
            on_cell_execute=on_cell_execute, on_cell_executed=on_cell_executed,
        )
        try:
            client.execute(env=env)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
            bar.close()
            found = _first_error(nb)
            if found is None:  # timeouts and dead kernels leave no error output
                index = next((i for i, c in reversed(list(enumerate(nb.cells)))
                              if c.get("execution_count") is not None), None)
                text = str(err).strip()
                found = (index, type(err).__name__, text.splitlines()[0] if text else "")
            _clear_after(nb, found[0])
            _write(nb, failed_path)  # keep what ran, with the error output, for inspection
            raise NotebookError(path, *found, failed_path) from err
    bar.close()
    elapsed = time.perf_counter() - start
    _write(nb, out_path)
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
               folder="notebooks", timeout: int = 1800, progress: bool | None = None) -> dict[str, float]:
    """Execute the course notebooks in order in one profile; print and return {name: seconds}.

    Executed copies go to `out_dir` (or back into the notebooks with `inplace=True`; a failed one
    always goes to `out_dir`); each notebook's figures go to `out_dir/<notebook stem>/`. `only`
    selects notebooks by number ('3' or '03') or by a part of their name. A notebook that fails
    for a reason outside the code (CIFAR-10 missing, no network) gets one line with the fix and
    the others still run; CourseFailed (a RuntimeError listing every notebook) is raised at the
    end. An error in the code raises NotebookError at once (later notebooks may need its outputs).
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
    results: list[NotebookResult] = []
    for nb in notebooks:
        out_path = nb if inplace else out_dir / nb.name
        start = time.perf_counter()
        try:
            seconds = run_notebook(nb, out_path, profile=profile, timeout=timeout, run_dir=out_dir / nb.stem,
                                   failed_path=out_dir / nb.name, progress=progress)
        except NotebookError as err:
            seconds = time.perf_counter() - start
            if err.external is None:
                print(f"{nb.name:<{width}}{'FAILED':>9}", flush=True)
                _summary(results + [NotebookResult(nb.name, "failed", seconds, str(err))], width)
                raise
            fix = DATA_FIX if "CIFAR-10" in err.external else "run it on a machine with network access"
            message = f"skipped: {err.external} ({err.ename} in cell {err.cell_index}); to fix: {fix}"
            results.append(NotebookResult(nb.name, "skipped", seconds, message))
            print(f"{nb.name:<{width}}{'SKIPPED':>9}  {message}", flush=True)
            continue
        results.append(NotebookResult(nb.name, "passed", seconds))
        print(f"{nb.name:<{width}}{seconds:9.1f}", flush=True)
    _summary(results, width)
    if any(r.status != "passed" for r in results):
        raise CourseFailed(results)
    return {r.name: r.seconds for r in results}


def _summary(results: list[NotebookResult], width: int) -> None:
    passed = [r for r in results if r.status == "passed"]
    print(f"{'total':<{width}}{sum(r.seconds for r in results):9.1f}", flush=True)
    if len(passed) != len(results):
        print(f"{len(passed)} of {len(results)} notebook(s) ran to the end", flush=True)
