"""Every committed course notebook stays under 1 MB (quick to clone, to open and to review in a diff)."""

import json
from pathlib import Path

import pytest

from fewstep_lab.course import list_notebooks

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000  # 1 MB


def _heaviest_cells(path, n=3):
    """The `n` code cells whose outputs weigh the most: [(bytes, cell index, first line of the source)]."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    sizes = []
    for index, cell in enumerate(cells):
        if cell.get("cell_type") == "code":
            source = "".join(cell.get("source", ""))
            first = source.strip().splitlines()[0][:60] if source.strip() else ""
            sizes.append((len(json.dumps(cell.get("outputs", []))), index, first))
    return sorted(sizes, reverse=True)[:n]


@pytest.mark.parametrize("path", list_notebooks(ROOT / "notebooks"), ids=lambda p: p.name)
def test_notebook_is_under_1_mb(path):
    size = path.stat().st_size
    if size < MAX_BYTES:
        return
    heavy = "\n".join(f"    cell {index}: outputs {nbytes / 1e6:.2f} MB  ({first})"
                      for nbytes, index, first in _heaviest_cells(path))
    pytest.fail(
        f"{path.name} is {size / 1e6:.2f} MB; a committed notebook must stay under {MAX_BYTES / 1e6:.0f} MB.\n"
        f"  Heaviest outputs:\n{heavy}\n"
        f"  To shrink it: draw figures at a modest dpi (e.g. plt.rcParams['figure.dpi'] = 80, or a smaller "
        f"figsize), pass rasterized=True to scatter plots of many points, show fewer or smaller image grids, "
        f"print summaries rather than whole tensors; then re-execute it: "
        f"fewstep course --profile <smoke|cpu> --only {path.stem[:3].rstrip('_')} --inplace",
        pytrace=False)
