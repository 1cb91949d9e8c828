"""The student edition of the course: every exercise's solution replaced by a stub.

The notebooks in ``notebooks/`` are the instructor edition. In an exercise cell ("Write it
yourself") the solution is wrapped in marker lines::

    ### BEGIN SOLUTION: write the CD loss
    loss = ...
    ### END SOLUTION
    assert torch.allclose(loss, consistency_loss(...)), "..."

``student_notebook`` replaces each block, marker lines included, by one line at the indentation
of the BEGIN line, ``raise NotImplementedError("exercise: write the CD loss")`` (the description
defaults to "write the solution"), and clears outputs and execution counts so no output of a
solution survives. Markers that do not pair up (nested, unclosed, an END without a BEGIN, a
misspelt marker line) raise ValueError naming the notebook, the cell and the line. Markers count
in code cells only: markdown may show them. ``build_student_edition`` writes the whole course
(``fewstep course --student OUT``, ``make student``). No paper: this is plumbing.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BEGIN", "END", "DEFAULT_DESCRIPTION", "Exercise", "find_exercises", "student_notebook",
           "build_student_edition"]

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
DEFAULT_DESCRIPTION = "write the solution"
_BEGIN_LINE = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION(?::(?P<description>.*))?[ \t]*$")
_END_LINE = re.compile(r"^[ \t]*### END SOLUTION[ \t]*$")
# What a marker looks like, misspelt or not ("## begin solution", "###BEGIN SOLUTION"): such a line must be exact.
_MARKER_LIKE = re.compile(r"^[ \t]*#+[ \t]*(?P<kind>BEGIN|END)[ \t]+SOLUTION", re.IGNORECASE)


@dataclass(frozen=True)
class Exercise:
    """One solution block: its cell (index into nb.cells), its lines (0-based, markers included), its description."""

    cell_index: int
    begin_line: int
    end_line: int
    description: str
    indent: str


def _source(cell) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _where(name, index, cell, line=None) -> str:
    cell_id = cell.get("id")
    where = f"{name or 'notebook'}: cell {index}" + (f" (id {cell_id})" if cell_id else "")
    return where + (f", line {line + 1}" if line is not None else "")


def _cell_exercises(cell, index: int, name) -> list[Exercise]:
    """The solution blocks of one code cell, checked: ValueError when the markers do not pair up."""
    exercises, open_at, indent, description = [], None, "", ""
    for number, line in enumerate(_source(cell).splitlines()):
        text, like = line.strip(), _MARKER_LIKE.match(line)
        if like is not None and like.group("kind").upper() == "BEGIN":
            match = _BEGIN_LINE.match(line)
            if match is None:
                raise ValueError(f"{_where(name, index, cell, number)}: malformed marker {text!r}; "
                                 f"write '{BEGIN}' or '{BEGIN}: <short description>' on a line of its own")
            if open_at is not None:
                raise ValueError(f"{_where(name, index, cell, number)}: '{BEGIN}' inside the solution block opened "
                                 f"on line {open_at + 1}; solution blocks cannot nest, close the first with '{END}'")
            open_at, indent = number, match.group("indent")
            description = (match.group("description") or "").strip() or DEFAULT_DESCRIPTION
        elif like is not None:
            if _END_LINE.match(line) is None:
                raise ValueError(f"{_where(name, index, cell, number)}: malformed marker {text!r}; "
                                 f"write '{END}' alone on its line")
            if open_at is None:
                raise ValueError(f"{_where(name, index, cell, number)}: '{END}' without a '{BEGIN}' above it")
            exercises.append(Exercise(index, open_at, number, description, indent))
            open_at = None
    if open_at is not None:
        raise ValueError(f"{_where(name, index, cell, open_at)}: '{BEGIN}' is never closed; "
                         f"add a line '{END}' after the solution (in the same cell)")
    return exercises


def find_exercises(nb, name: str | os.PathLike | None = None) -> list[Exercise]:
    """All solution blocks of notebook `nb` in order; ValueError (naming `name` and the cell) for bad markers."""
    name = Path(name).name if name is not None else None
    found = []
    for index, cell in enumerate(nb.cells):
        if cell.get("cell_type") == "code":
            found += _cell_exercises(cell, index, name)
    return found


def _stub_line(exercise: Exercise) -> str:
    text = exercise.description.replace("\\", "\\\\").replace('"', '\\"')
    return f'{exercise.indent}raise NotImplementedError("exercise: {text}")'


def _stub_source(source: str, exercises: list[Exercise]) -> str:
    lines = source.splitlines(keepends=True)
    for exercise in reversed(exercises):  # from the bottom: earlier line numbers stay valid
        last = lines[exercise.end_line]
        newline = last[len(last.rstrip("\r\n")):]
        lines[exercise.begin_line:exercise.end_line + 1] = [_stub_line(exercise) + newline]
    return "".join(lines)


def student_notebook(nb, name: str | os.PathLike | None = None, *, keep_outputs: bool = False):
    """A copy of `nb` with every solution block replaced by `raise NotImplementedError("exercise: ...")`.

    Outputs and execution counts (and the run's timestamps, metadata "execution") are cleared in
    every code cell, with the notebook's saved widget state (they may show what a solution
    computes), or only in the stubbed cells with `keep_outputs=True`. Every other part of the
    notebook (cell ids, metadata, markdown) is left as it was; `nb` itself is not changed.
    `name` (the notebook's file) only labels errors: ValueError when markers do not pair up.
    """
    exercises = find_exercises(nb, name)
    by_cell: dict[int, list[Exercise]] = {}
    for exercise in exercises:
        by_cell.setdefault(exercise.cell_index, []).append(exercise)
    out = copy.deepcopy(nb)
    for index, cell in enumerate(out.cells):
        if cell.get("cell_type") != "code":
            continue
        if index in by_cell:
            cell["source"] = _stub_source(_source(cell), by_cell[index])
        if index in by_cell or not keep_outputs:
            cell["outputs"], cell["execution_count"] = [], None
            cell.get("metadata", {}).pop("execution", None)  # when the instructor's run executed it
    if not keep_outputs:
        out.get("metadata", {}).pop("widgets", None)  # the saved state of widgets drawn in the outputs
    return out


def build_student_edition(out_dir, folder="notebooks", only=None) -> dict[str, int]:
    """Write the student edition of every course notebook in `folder` to `out_dir`; return {name: exercises}.

    Every notebook is checked before any is written (a bad marker anywhere writes nothing);
    files are written atomically. `only` selects notebooks as `fewstep course --only` does.
    `out_dir` must not be the notebook folder itself (that would overwrite the solutions).
    """
    import nbformat

    from .course import _select, list_notebooks
    from .io import atomic_write_text

    out_dir, folder = Path(out_dir), Path(folder)
    notebooks = _select(list_notebooks(folder), only)
    if not notebooks:
        raise FileNotFoundError(f"no NN_*.ipynb notebooks in {folder.resolve()}")
    if out_dir.resolve() == folder.resolve():
        raise ValueError(f"{out_dir} is the notebook folder: the student edition would overwrite the "
                         f"solutions; choose another folder, e.g. runs/student")
    editions = {}
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        editions[path.name] = (student_notebook(nb, path), len(find_exercises(nb, path)))
    for file_name, (nb, _) in editions.items():
        atomic_write_text(out_dir / file_name, nbformat.writes(nb))
    return {file_name: count for file_name, (_, count) in editions.items()}
