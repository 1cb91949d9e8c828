"""The student edition (fewstep_lab/student.py): solution blocks become stubs, nothing else changes."""

import copy
import json
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

from fewstep_lab.cli import main
from fewstep_lab.course import list_notebooks
from fewstep_lab.student import (BEGIN, END, build_student_edition, find_exercises,
                                 student_notebook)

ROOT = Path(__file__).resolve().parents[1]
REAL_NOTEBOOKS = list_notebooks(ROOT / "notebooks")
STUB = 'raise NotImplementedError("exercise: '
v4 = nbformat.v4

SETUP = "import math\nscale = 2.0"
TOP_LEVEL = ("x = 3.0\n"
             "### BEGIN SOLUTION: square x and scale it\n"
             "y = scale * x ** 2\n"
             "### END SOLUTION\n"
             "assert y == 18.0, 'y should be scale * x**2'")
IN_FUNCTION = ("def loss(a, b):\n"
               "    \"\"\"Squared error.\"\"\"\n"
               "    ### BEGIN SOLUTION: write the \"squared\" error\n"
               "    d = a - b\n"
               "    return d * d\n"
               "    ### END SOLUTION\n")
CHECK = "assert loss(3.0, 1.0) == 4.0, 'loss(3, 1) should be 4: (a - b) squared'"
NO_DESCRIPTION = "### BEGIN SOLUTION\nz = math.pi\n### END SOLUTION"


def _synthetic():
    md = v4.new_markdown_cell("Write it yourself: the solution goes between `### BEGIN SOLUTION` and `### END SOLUTION`.")
    md.metadata["slideshow"] = {"slide_type": "slide"}
    setup = v4.new_code_cell(SETUP, execution_count=1,
                             outputs=[v4.new_output("stream", name="stdout", text="ready\n")])
    setup.metadata["tags"] = ["setup"]
    setup.metadata["execution"] = {"iopub.status.idle": "2026-12-01T06:51:43.414324Z"}
    cells = [md, setup,
             v4.new_code_cell(TOP_LEVEL, execution_count=2,
                              outputs=[v4.new_output("execute_result", data={"text/plain": "18.0"}, execution_count=2)]),
             v4.new_code_cell(IN_FUNCTION, execution_count=3),
             v4.new_code_cell(CHECK, execution_count=4),
             v4.new_code_cell(NO_DESCRIPTION, execution_count=5)]
    nb = v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return nb


def test_markers_are_replaced_with_the_indentation_of_the_begin_line():
    nb = _synthetic()
    before = copy.deepcopy(nb)
    student = student_notebook(nb, "synthetic.ipynb")
    assert nb == before  # the instructor notebook is not touched
    sources = [c.source for c in student.cells]
    assert sources[2] == ("x = 3.0\n"
                          'raise NotImplementedError("exercise: square x and scale it")\n'
                          "assert y == 18.0, 'y should be scale * x**2'")
    assert sources[3] == ("def loss(a, b):\n"
                          "    \"\"\"Squared error.\"\"\"\n"
                          '    raise NotImplementedError("exercise: write the \\"squared\\" error")\n')
    assert sources[5] == 'raise NotImplementedError("exercise: write the solution")'
    assert [e.description for e in find_exercises(nb)] == ["square x and scale it", 'write the "squared" error',
                                                           "write the solution"]
    for cell in student.cells[1:]:
        assert cell.outputs == [] and cell.execution_count is None
    # Everything else as it was: markdown (which may show the markers), ids, metadata, the setup and check cells.
    for index in (0, 1, 4):
        want, got = dict(before.cells[index]), dict(student.cells[index])
        if want["cell_type"] == "code":
            want["outputs"], want["execution_count"] = [], None
            want["metadata"] = {k: v for k, v in want["metadata"].items() if k != "execution"}
        assert got == want
    assert student.cells[1].metadata == {"tags": ["setup"]}  # the run's timestamps go with the outputs
    assert [c.id for c in student.cells] == [c.id for c in before.cells]
    assert student.metadata == {"kernelspec": before.metadata.kernelspec}  # no saved widget state


def test_keep_outputs_leaves_every_other_cell_byte_identical():
    nb = _synthetic()
    student = student_notebook(nb, keep_outputs=True)
    for index in (0, 1, 4):
        assert json.dumps(student.cells[index], sort_keys=True) == json.dumps(nb.cells[index], sort_keys=True)
    assert student.cells[1].outputs and not student.cells[2].outputs and student.cells[2].execution_count is None
    assert student.metadata == nb.metadata


def _run(cells):
    namespace = {}
    for cell in cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, "<cell>", "exec"), namespace)
    return namespace


def test_the_instructor_edition_passes_its_checks_and_the_student_edition_stops_at_the_stub():
    nb = _synthetic()
    assert _run(nb.cells)["z"] > 3  # solutions and checks run
    student = student_notebook(nb)
    # A stub at the top level stops its own cell; a stub in a function stops the check cell that calls it.
    with pytest.raises(NotImplementedError, match="exercise: square x and scale it"):
        _run(student.cells[1:3])
    with pytest.raises(NotImplementedError, match="exercise: write the \"squared\" error"):
        _run([student.cells[1], student.cells[3], student.cells[4]])


@pytest.mark.parametrize("source, problem", [
    (f"{BEGIN}\na = 1\n{BEGIN}: inner\nb = 2\n{END}\n{END}", "cannot nest"),
    (f"{BEGIN}: never closed\na = 1", "never closed"),
    (f"a = 1\n{END}", "without a"),
    ("## BEGIN SOLUTION\na = 1\n### END SOLUTION", "malformed marker"),
    (f"{BEGIN} square it\na = 1\n{END}", "malformed marker"),
    (f"    ###BEGIN SOLUTION\na = 1\n{END}", "malformed marker"),
    (f"{BEGIN}\na = 1\n{END} here", "malformed marker"),
])
def test_markers_that_do_not_pair_up_are_refused(source, problem):
    nb = _synthetic()
    nb.cells[3].source = source
    with pytest.raises(ValueError, match=problem) as info:
        student_notebook(nb, Path("/somewhere/07_bad.ipynb"))
    assert "07_bad.ipynb: cell 3" in str(info.value) and nb.cells[3].id in str(info.value)
    with pytest.raises(ValueError, match="cell 3"):
        find_exercises(nb)


def test_build_student_edition_writes_every_notebook_or_none(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nbformat.write(_synthetic(), folder / "01_one.ipynb")
    nbformat.write(v4.new_notebook(cells=[v4.new_code_cell("a = 1")]), folder / "02_none.ipynb")
    (folder / "scratch.ipynb").write_text("not a course notebook")
    out = tmp_path / "student"
    assert build_student_edition(out, folder=folder) == {"01_one.ipynb": 3, "02_none.ipynb": 0}
    assert sorted(p.name for p in out.iterdir()) == ["01_one.ipynb", "02_none.ipynb"]  # no temporary files left
    instructor = nbformat.read(folder / "01_one.ipynb", as_version=4)
    assert nbformat.read(out / "01_one.ipynb", as_version=4) == student_notebook(instructor)
    with pytest.raises(ValueError, match="overwrite the solutions"):
        build_student_edition(folder, folder=folder)
    # A bad marker in any notebook writes nothing.
    bad = v4.new_notebook(cells=[v4.new_code_cell(f"{BEGIN}\na = 1")])
    nbformat.write(bad, folder / "03_bad.ipynb")
    with pytest.raises(ValueError, match="03_bad.ipynb: cell 0"):
        build_student_edition(tmp_path / "other", folder=folder)
    assert not (tmp_path / "other").exists()
    # The command line: fewstep course --student OUT (notebooks/ of the working directory).
    (folder / "03_bad.ipynb").unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["course", "--student", "cli-out", "--only", "01"]) == 0
    table = capsys.readouterr().out
    assert "01_one.ipynb" in table and "02_none" not in table and (tmp_path / "cli-out" / "01_one.ipynb").exists()
    assert main(["course", "--student", "x", "--inplace"]) != 0


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_student(tmp_path):
    out = subprocess.run(["make", "-n", "student", f"VENV={tmp_path}/venv"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert 'pip install -e .' in out and "fewstep course --student runs/student" in out
    assert "make student" in subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True).stdout

# --- the real course notebooks, whatever they hold today ---------------------------------

def _outside_blocks(source):
    """The lines of `source` outside solution blocks (an independent reading of the markers)."""
    kept, inside = [], False
    for line in source.splitlines():
        if line.strip().startswith(BEGIN):
            inside = True
        elif line.strip().startswith(END):
            inside = False
        elif not inside:
            kept.append(line)
    return kept


@pytest.mark.parametrize("path", REAL_NOTEBOOKS, ids=lambda p: p.name)
def test_course_notebook_markers_are_balanced(path):
    nb = nbformat.read(path, as_version=4)
    exercises = find_exercises(nb, path)  # raises ValueError naming the cell if not
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert len(exercises) == code.count(BEGIN) == code.count(END)


@pytest.mark.parametrize("path", REAL_NOTEBOOKS, ids=lambda p: p.name)
def test_course_notebook_student_edition(path):
    nb = nbformat.read(path, as_version=4)
    student = student_notebook(nb, path)
    assert len(student.cells) == len(nb.cells)
    assert student.metadata == {k: v for k, v in nb.metadata.items() if k != "widgets"}
    transform = TransformerManager().transform_cell  # IPython syntax (%magics) to Python
    for index, (old, new) in enumerate(zip(nb.cells, student.cells)):
        where = f"{path.name} cell {index}"
        assert new.cell_type == old.cell_type and new.get("id") == old.get("id"), where
        assert new.metadata == {k: v for k, v in old.metadata.items() if k != "execution"}, where
        if old.cell_type != "code":
            assert new == old, where
            continue
        assert new.outputs == [] and new.execution_count is None, where
        assert BEGIN not in new.source and END not in new.source, where
        n_begin = sum(line.strip().startswith(BEGIN) for line in old.source.splitlines())
        if n_begin == 0:
            assert new.source == old.source, where
            continue
        lines = new.source.splitlines()
        stubs = [line for line in lines if line.strip().startswith(STUB)]
        assert len(stubs) == n_begin + old.source.count(STUB), f"{where}: every solution block becomes one stub"
        assert [line for line in lines if not line.strip().startswith(STUB)] == \
            [line for line in _outside_blocks(old.source) if not line.strip().startswith(STUB)], where
        compile(transform(new.source), where, "exec")  # the student's cell is still valid Python
