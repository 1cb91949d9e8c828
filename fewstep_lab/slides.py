"""Slides of the course: one reveal.js HTML deck per notebook (nbconvert's slides exporter).

Each cell's ``metadata.slideshow.slide_type`` places it: "slide" starts a new slide (a section
title), "subslide" a new slide below the current one (reveal.js' vertical navigation),
"fragment" appears on the next key press within the slide, "skip" leaves the cell out, "-" or no
metadata continues the slide above. Decks load reveal.js, MathJax and the notebook CSS from a
CDN when opened in a browser (building them needs no network). ``make slides`` and
``fewstep course --slides OUT`` call ``build_slides``. Needs nbconvert (the ``dev`` extra).
No paper: this is plumbing.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SLIDE_TYPES", "count_slides", "notebook_to_slides", "build_slides"]

SLIDE_TYPES = ("slide", "subslide", "fragment", "skip", "-", "notes")


def _slide_type(cell) -> str:
    return (cell.get("metadata", {}).get("slideshow") or {}).get("slide_type") or "-"


def count_slides(nb) -> int:
    """How many horizontal slides the deck of `nb` has: its "slide" cells, plus one if it opens on another cell."""
    shown = [_slide_type(c) for c in nb.cells if _slide_type(c) != "skip"]
    if not shown:
        return 0
    return shown.count("slide") + (shown[0] != "slide")


def _exporter():
    try:
        from nbconvert import SlidesExporter
    except ImportError as err:
        raise ImportError("the slides need nbconvert: pip install nbconvert (or: pip install -e '.[dev]', "
                          "make install-dev)") from err
    exporter = SlidesExporter()
    exporter.exclude_input_prompt = True  # no "In [ ]:" beside the code on a slide
    exporter.exclude_output_prompt = True
    exporter.reveal_scroll = True  # a slide taller than the screen scrolls instead of being cut
    return exporter


def notebook_to_slides(nb, title: str = "fewstep_lab") -> str:
    """The reveal.js HTML of notebook `nb` (a nbformat NotebookNode) as a string, titled `title`."""
    for index, cell in enumerate(nb.cells):
        kind = _slide_type(cell)
        if kind not in SLIDE_TYPES:
            raise ValueError(f"{title}: cell {index} has slide_type {kind!r}; use one of {', '.join(SLIDE_TYPES)}")
    html, _ = _exporter().from_notebook_node(nb, resources={"metadata": {"name": title}})
    return html


def build_slides(out_dir, notebooks=None, folder="notebooks", only=None) -> dict[str, Path]:
    """Write one deck `<stem>.slides.html` per notebook to `out_dir`; return {notebook name: deck path}.

    `notebooks`: paths of notebooks (default: the course notebooks in `folder`, chosen by `only`
    as `fewstep course --only` does). Decks are written atomically.
    """
    import nbformat

    from .course import _select, list_notebooks
    from .io import atomic_write_text

    if notebooks is None:
        notebooks = _select(list_notebooks(folder), only)
    paths = [Path(p) for p in notebooks]
    if not paths:
        raise FileNotFoundError(f"no NN_*.ipynb notebooks in {Path(folder).resolve()}")
    out_dir = Path(out_dir)
    decks = {}
    for path in paths:
        html = notebook_to_slides(nbformat.read(path, as_version=4), title=path.stem)
        deck = out_dir / f"{path.stem}.slides.html"
        atomic_write_text(deck, html)
        decks[path.name] = deck
    return decks
