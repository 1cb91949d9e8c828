"""The seed paper's table on toy 2-D data: sample quality against network evaluations (NFE).

Song et al. 2023 ("Consistency Models"), Table 1 compares DDPM, DDIM, DPM-Solver, the EDM
teacher, progressive distillation (PD), consistency distillation (CD) and consistency training
(CT) by FID against NFE on CIFAR-10. On toy 2-D data the same comparison can be measured
exactly, with no Inception network in the loop: every row here is sliced W2 (256 directions)
between n generated points and n fresh data points, mean ± std over seeds, beside the noise
floor (data vs data) and, for mixtures with a closed-form denoiser, the "perfect teacher" (the exact
denoiser driving the teacher's sampler), which separates what the sampler loses from what
training loses. The ordering the paper reports (CD-1 better than PD-1 and DDIM-10, two steps
better than one) is an outcome to check, not to force. Run: ``fewstep bench --profile cpu``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .data.toy2d import get_dataset
from .metrics import mean_std, noise_floor
from .profiles import get_device, get_profile
from .recipes import CTRecipe, cd_recipe, ct_recipe, ict_recipe, pd_recipe, toy_recipe
from .toy import EvalResult, evaluate_sampler, train_toy
from .toy_consistency import evaluate_toy_consistency, train_toy_cd, train_toy_ct, train_toy_pd

__all__ = ["BenchSettings", "BENCH_SETTINGS", "run_bench", "format_table"]


@dataclass(frozen=True)
class BenchSettings:
    """How much each profile measures: sample size n, seeds, datasets, and the DDPM-1000 row's budget."""

    n: int
    seeds: int
    datasets: tuple[str, ...]
    ddpm_seeds: int  # the 1000-step ancestral row costs 1000 NFE per point


BENCH_SETTINGS = {
    "smoke": BenchSettings(n=500, seeds=3, datasets=("8gaussians",), ddpm_seeds=0),
    "cpu": BenchSettings(n=20_000, seeds=3, datasets=("8gaussians", "checkerboard"), ddpm_seeds=1),
    "gpu": BenchSettings(n=100_000, seeds=5, datasets=("8gaussians", "checkerboard"), ddpm_seeds=3),
}


def _row(method: str, res: EvalResult | None, note: str = "", train_seconds: float | None = None, **extra) -> dict:
    d = {"method": method, "note": note, "train_seconds": train_seconds, **extra}
    if res is not None:
        d.update(steps=res.steps, nfe=res.nfe, swd_mean=res.swd_mean, swd_std=res.swd_std,
                 mode_tv=res.mode_error, seconds_per_10k=res.seconds_per_10k)
    return d


def _bench_dataset(ds: str, profile: str, s: BenchSettings, out: Path, device, log) -> list[dict]:
    seeds = tuple(range(s.seeds))
    data = get_dataset(ds)
    rows = []
    floor = mean_std(noise_floor(data.sample, s.n, seeds=seeds))
    rows.append({"method": "data vs data (noise floor)", "nfe": 0, "swd_mean": floor[0], "swd_std": floor[1],
                 "note": "two fresh samples of the truth"})
    ev = lambda D, sampler, steps, **kw: evaluate_sampler(D, ds, sampler, steps, n=s.n, seeds=seeds, **kw)  # noqa: E731

    if hasattr(data, "denoiser"):
        rows.append(_row("perfect teacher, Heun", ev(data.denoiser, "heun", 18), "exact mixture denoiser"))
        rows.append(_row("perfect teacher, DDIM", ev(data.denoiser, "euler", 10), "exact mixture denoiser"))

    t0 = time.perf_counter()
    teacher, st = train_toy(toy_recipe("edm", ds, profile), checkpoint_path=out / "teacher.pt", device=device,
                            progress=False)
    t_teacher = st.seconds
    log(f"  teacher trained ({st.step} steps, {t_teacher:.0f} s)")
    if s.ddpm_seeds:
        res = evaluate_sampler(teacher, ds, "ancestral", 1000, n=s.n, seeds=tuple(range(s.ddpm_seeds)))
        rows.append(_row("DDPM ancestral", res, f"teacher network, Karras grid; {s.ddpm_seeds} seed(s)"))
    for steps in (50, 20, 10):
        rows.append(_row("DDIM (Euler)", ev(teacher, "euler", steps), "teacher network"))
    rows.append(_row("DPM-Solver-2", ev(teacher, "dpm_solver_2", 5), "teacher network"))
    rows.append(_row("DPM-Solver++(2M)", ev(teacher, "dpmpp_2m", 10), "teacher network"))
    rows.append(_row("EDM teacher, Heun", ev(teacher, "heun", 18), "", t_teacher))
    log(f"  teacher rows done ({time.perf_counter() - t0:.0f} s)")

    pd = pd_recipe(ds, profile)
    students, states = train_toy_pd(teacher, pd, checkpoint_path=out / "pd.pt", device=device, progress=False)
    t_pd = sum(x.seconds for x in states.values())
    for k in (1, 2):
        if k in students:
            rows.append(_row("PD", evaluate_sampler(students[k], ds, "euler", k, n=s.n, seeds=seeds,
                                                    sigmas=_pd_grid(pd, k)), "", t_pd))
    log("  PD done")

    train_ct = lambda r, p: train_toy_ct(r, checkpoint_path=p, device=device, progress=False)  # noqa: E731
    ct = ct_recipe(ds, profile)
    for name, stem, train_fn, recipe in (
        ("CD", "cd", lambda r, p: train_toy_cd(teacher, r, checkpoint_path=p, device=device, progress=False),
         cd_recipe(ds, profile)),
        # The same Algorithm 3 twice: with the toy profile's target decay mu0 and with CM's CIFAR-10
        # value, CTRecipe's default (the dataclass defaults are CM's constants).
        (f"CT (mu0 = {ct.mu0:g})", "ct", train_ct, ct),
        (f"CT (mu0 = {CTRecipe.mu0:g}, CM's CIFAR-10 value)", "ct_cm", train_ct, replace(ct, mu0=CTRecipe.mu0)),
        ("iCT", "ict", train_ct, ict_recipe(ds, profile)),
    ):
        f, state = train_fn(recipe, out / f"{stem}.pt")
        for k in (1, 2):
            rows.append(_row(name, evaluate_toy_consistency(f, recipe, k, n=s.n, seeds=seeds), "", state.seconds))
        log(f"  {name} done ({state.seconds:.0f} s training)")
    for r in rows:
        r["dataset"] = ds
        if "swd_mean" in r and floor[0] > 0:
            r["x_floor"] = r["swd_mean"] / floor[0]
    return rows


def _pd_grid(recipe, k):
    from .losses.progressive import pd_sigmas

    return pd_sigmas(k, recipe.sigma_min, recipe.sigma_max, recipe.rho)


def format_table(rows: list[dict]) -> str:
    """A markdown table of bench rows."""
    head = "| dataset | method | steps | NFE | sliced W2 (mean ± std) | × floor | mode TV | s / 10k samples | train s | note |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        fmt = lambda k, f: (f.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
        swd = f"{r['swd_mean']:.4f} ± {r['swd_std']:.4f}" if "swd_mean" in r else ""
        lines.append(f"| {r['dataset']} | {r['method']} | {fmt('steps', '{}')} | {fmt('nfe', '{:.0f}')} | {swd} | "
                     f"{fmt('x_floor', '{:.2f}')} | {fmt('mode_tv', '{:.3f}')} | {fmt('seconds_per_10k', '{:.2f}')} | "
                     f"{fmt('train_seconds', '{:.0f}')} | {r.get('note', '')} |")
    return "\n".join(lines)


def run_bench(profile=None, datasets=None, seeds=None, n=None, out_dir="runs/bench", device=None,
              log=print) -> list[dict]:
    """Train (or resume from out_dir) every method on each dataset, measure each row, write table.md and results.json."""
    profile = get_profile(profile)
    s = BENCH_SETTINGS[profile]
    s = replace(s, **{k: v for k, v in (("datasets", tuple(datasets) if datasets else None), ("seeds", seeds),
                                         ("n", n)) if v is not None})
    if s.seeds < 1 or s.n < 2:
        raise ValueError("bench needs seeds >= 1 and n >= 2")
    device = get_device(device)
    out = Path(out_dir) / profile
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for ds in s.datasets:
        log(f"{ds} ({profile} profile, n = {s.n}, {s.seeds} seeds)")
        rows += _bench_dataset(ds, profile, s, out / ds, device, log)
    table = format_table(rows)
    header = (f"fewstep bench --profile {profile}: n = {s.n}, {s.seeds} seeds, device {device}, "
              f"torch threads {torch.get_num_threads()}, total {time.perf_counter() - t0:.0f} s")
    (out / "table.md").write_text(header + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps({"settings": asdict(s), "rows": rows}, indent=1))
    log(header)
    log(table)
    return rows

