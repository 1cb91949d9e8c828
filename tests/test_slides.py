"""Slides (fewstep_lab/slides.py): a reveal.js deck per notebook from the cells' slideshow metadata, offline."""

import shutil
import socket
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from fewstep_lab.cli import main
from fewstep_lab.slides import build_slides, count_slides, notebook_to_slides

ROOT = Path(__file__).resolve().parents[1]
v4 = nbformat.v4


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Building a deck must not need the network (the decks load reveal.js from a CDN only in the browser)."""
    def refuse(*args, **kwargs):
        raise OSError("network access in a slides test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


class _Sections(HTMLParser):
    """Counts <section> tags, and the outer ones (reveal.js' horizontal slides)."""

    def __init__(self):
        super().__init__()
        self.depth = self.total = self.outer = 0

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.total += 1
            self.outer += self.depth == 0
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == "section":
            self.depth -= 1


def _sections(html):
    parser = _Sections()
    parser.feed(html)
    assert parser.depth == 0, "unbalanced <section> tags"
    return parser


# (source, slide_type): 3 slides; the second holds 3 vertical subslides, the first a fragment.
DECK = [("# Few-step diffusion", "slide"), ("x = 1", "-"), ("The key equation", "fragment"),
        ("## Consistency models", "slide"), ("The loss", "subslide"), ("setup plumbing, SKIPPED_TEXT", "skip"),
        ("The figure", "subslide"), ("## What to take away", "slide"), ("y = 2", None)]


def _deck_notebook():
    cells = []
    for source, kind in DECK:
        cell = v4.new_code_cell(source) if source[0].islower() else v4.new_markdown_cell(source)
        if kind is not None:
            cell.metadata["slideshow"] = {"slide_type": kind}
        cells.append(cell)
    nb = v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def test_synthetic_deck_has_one_section_per_slide_and_subslide():
    nb = _deck_notebook()
    html = notebook_to_slides(nb, title="07_deck")
    assert count_slides(nb) == 3
    # reveal.js: an outer <section> per slide, an inner one per (sub)slide in it: 3 outer + (1 + 3 + 1) inner.
    assert html.count("<section") == 8
    sections = _sections(html)
    assert (sections.outer, sections.total) == (3, 8)
    assert "SKIPPED_TEXT" not in html and 'class="fragment"' in html
    assert "<title>07_deck" in html and "reveal" in html


def test_unknown_slide_type_is_refused():
    nb = _deck_notebook()
    nb.cells[1].metadata["slideshow"] = {"slide_type": "sldie"}
    with pytest.raises(ValueError, match="cell 1 has slide_type 'sldie'"):
        notebook_to_slides(nb, title="07_deck")


def test_build_slides_from_the_setup_notebook(tmp_path):
    path = ROOT / "notebooks" / "00_setup.ipynb"
    decks = build_slides(tmp_path, notebooks=[path])
    assert decks == {"00_setup.ipynb": tmp_path / "00_setup.slides.html"}
    assert [p.name for p in tmp_path.iterdir()] == ["00_setup.slides.html"]  # no temporary files left
    html = decks["00_setup.ipynb"].read_text()
    nb = nbformat.read(path, as_version=4)
    assert _sections(html).outer == count_slides(nb) >= 1


def test_fewstep_course_slides(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nbformat.write(_deck_notebook(), folder / "01_deck.ipynb")
    nbformat.write(_deck_notebook(), folder / "02_other.ipynb")
    monkeypatch.chdir(tmp_path)
    assert main(["course", "--slides", "decks", "--only", "01"]) == 0
    assert "01_deck.ipynb -> decks/01_deck.slides.html" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "decks").iterdir()] == ["01_deck.slides.html"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_slides(tmp_path):
    out = subprocess.run(["make", "-n", "slides", f"VENV={tmp_path}/venv"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert 'pip install -e ".[dev]"' in out and "fewstep course --slides runs/slides" in out
    assert "make slides" in subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True).stdout
