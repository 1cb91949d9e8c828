"""fewstep bench (the seed table on toy data): every row the issue lists, files written, resume."""

import json
import math

import pytest

from fewstep_lab import bench
from fewstep_lab.methods.consistency import CTRecipe
from fewstep_lab.pipeline import make_run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    logs = []
    rows = bench.run_bench("smoke", n=300, seeds=2, out_dir=out, device="cpu", log=logs.append)
    return out, rows, logs


def test_rows_cover_every_method_at_one_and_two_steps(smoke_run):
    _, rows, _ = smoke_run
    few_step = {(r["method"], r["steps"]) for r in rows if r.get("nfe") in (1, 2)}
    ct_toy = f"CT (mu0 = {make_run('ct', '8gaussians', 'smoke').recipe.mu0:g})"
    ct_cm = f"CT (mu0 = {CTRecipe.mu0:g}, CM's CIFAR-10 value)"
    assert ct_toy != ct_cm  # the toy recipes do not use CM's CIFAR-10 target decay
    for method in ("PD", "CD", ct_toy, ct_cm, "iCT"):
        assert {(method, 1), (method, 2)} <= few_step, method
    ddim = sorted(r["steps"] for r in rows if r["method"] == "DDIM (Euler)")
    assert ddim == [10, 20, 50]
    names = {r["method"] for r in rows}
    assert {"data vs data (noise floor)", "perfect teacher, Heun", "EDM teacher, Heun", "DPM-Solver-2"} <= names
    for r in rows:
        assert r["dataset"] == "8gaussians" and math.isfinite(r["swd_mean"]) and r["swd_mean"] > 0
        assert r["x_floor"] == pytest.approx(r["swd_mean"] / rows[0]["swd_mean"])
        if r.get("nfe"):
            assert r["seconds_per_10k"] > 0


def test_writes_the_table_and_the_results(smoke_run):
    out, rows, logs = smoke_run
    table = (out / "smoke" / "table.md").read_text()
    assert table.startswith("fewstep bench --profile smoke: n = 300, 2 seeds")
    assert table.count("\n| 8gaussians |") == len(rows)
    saved = json.loads((out / "smoke" / "results.json").read_text())
    assert saved["settings"]["n"] == 300 and len(saved["rows"]) == len(rows)
    assert any("iCT done" in line for line in logs)


def test_second_run_resumes_from_the_checkpoints(smoke_run):
    out, rows, _ = smoke_run
    again = bench.run_bench("smoke", n=300, seeds=2, out_dir=out, device="cpu", log=lambda *_: None)
    # Trained models are loaded, not trained anew: their training time is the one saved in the
    # checkpoint (a new run would measure another), and every evaluation is seeded: the same table.
    key = lambda r: (r["method"], r.get("steps"), r.get("train_seconds"), r["swd_mean"])  # noqa: E731
    assert [key(r) for r in again] == [key(r) for r in rows]
    assert sum(1 for r in again if r.get("train_seconds")) >= 10


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="seeds >= 1"):
        bench.run_bench("smoke", seeds=0)
