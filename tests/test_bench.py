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


def test_labelled_data_get_lcm_s_table_with_its_ablations(tmp_path):
    rows = bench.run_bench("smoke", datasets=["8gaussians-4class"], n=200, seeds=1, out_dir=tmp_path, device="cpu",
                           log=lambda *_: None)
    by = {(r["method"], r.get("steps")): r for r in rows}
    assert rows[0]["method"] == "data vs data (noise floor), per class"
    lcm = make_run("lcm", "8gaussians-4class", "smoke").recipe
    main = f"LCM (k = {lcm.k}, w in [{lcm.w_min:g}, {lcm.w_max:g}])"
    for steps in (1, 2, 4):
        assert (main, steps) in by and (main + ", exact teacher", steps) in by
    for label in (f"LCM (k = 1, w in [{lcm.w_min:g}, {lcm.w_max:g}])", f"LCM (k = 20, w in [{lcm.w_min:g}, "
                  f"{lcm.w_max:g}])", "LCM distilled at w = 3 only", "CD of the unguided teacher, CFG at sampling"):
        assert {(label, 1), (label, 4)} <= set(by), label
    assert by[("perfect guided teacher, Heun", 18)]["nfe"] == 35
    assert {("perfect guided teacher, DDIM", 4), ("EDM-CFG teacher, DDIM", 8)} <= set(by)
    for r in rows[1:]:
        assert r["note"].endswith("w = 3, per class") and not r["note"].startswith(";") and math.isfinite(r["swd_mean"])


def test_cifar10_latents_get_lcm_s_rows_with_fd_accuracy_and_time(tmp_path):
    rows = bench.run_bench("smoke", datasets=["cifar10-latent"], n=32, seeds=1, out_dir=tmp_path, device="cpu",
                           log=lambda *_: None)
    assert rows[0]["method"] == "real training images (floor)"
    teacher = sorted(r["steps"] for r in rows if r["method"].startswith("DDPM-CFG"))
    lcm = sorted(r["steps"] for r in rows if r["method"].startswith("LCM"))
    assert teacher == [4, 8, 20, 50] and lcm == [1, 2, 4]
    for r in rows[1:]:
        assert math.isfinite(r["fd_mean"]) and 0 <= r["accuracy"] <= 1 and r["ms_per_image"] > 0, r
        assert r["note"].endswith("w = 3")
    table = (tmp_path / "smoke" / "table.md").read_text()
    assert "classifier accuracy" in table and table.count("| cifar10-latent |") == len(rows)
