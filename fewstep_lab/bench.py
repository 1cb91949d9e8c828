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

On labelled data (``8gaussians-4class``) the table is LCM's instead (Luo et al. 2023, Table 1:
quality against steps at a fixed guidance scale): per-class sliced W2 (each class against its own
distribution, mean over classes) at w = ``LCM_W`` for LCM-1/2/4, the exact guided teacher (Heun 35)
and guided DDIM at 4/8 steps, and the ablations (skipping step k, a student distilled at one w,
plain CD of the unguided teacher guided at sampling time). A guided call evaluates the conditional
and unconditional denoiser in one batch of 2B: its NFE counts calls, the note says so.

The table is data: ``MODELS`` (what is trained, through the one pipeline, with which method and
recipe changes) and ``ROWS`` (which model is sampled with which sampler and steps). A new method
is a new line in each.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .io import atomic_write_text
from .methods import get_method
from .methods.consistency import CTRecipe
from .pipeline import evaluate, load_run, make_domain, make_run, train_run
from .data.registry import resolve_data
from .profiles import get_device, get_profile

__all__ = ["BenchSettings", "BENCH_SETTINGS", "BenchModel", "BenchRow", "MODELS", "ROWS", "run_bench", "format_table",
           "result_row", "LCM_MODELS", "LCM_ROWS", "LCM_W",
           "LATENT_MODELS", "LATENT_ROWS", "format_latent_table"]


@dataclass(frozen=True)
class BenchSettings:
    """How much each profile measures: sample size n, seeds, datasets, and the DDPM-1000 row's budget."""

    n: int
    seeds: int
    datasets: tuple[str, ...]
    ddpm_seeds: int  # the 1000-step ancestral row costs 1000 NFE per point


BENCH_SETTINGS = {
    "smoke": BenchSettings(n=500, seeds=3, datasets=("8gaussians",), ddpm_seeds=0),
    "cpu": BenchSettings(n=20_000, seeds=3, datasets=("8gaussians", "checkerboard", "8gaussians-4class"),
                         ddpm_seeds=1),
    "gpu": BenchSettings(n=100_000, seeds=5, datasets=("8gaussians", "checkerboard", "8gaussians-4class"),
                         ddpm_seeds=3),
}


@dataclass(frozen=True)
class BenchModel:
    """A model the bench trains: checkpoint `key`, registered `method`, recipe `overrides`, its `teacher`'s key."""

    key: str
    method: str
    label: str  # may name recipe fields, e.g. "CT (mu0 = {mu0:g})"
    overrides: dict = field(default_factory=dict)
    teacher: str | None = None  # a key above, or "exact" (the data's closed-form denoiser)


@dataclass(frozen=True)
class BenchRow:
    """One table row: `model` (a BenchModel key, or 'exact') sampled with `sampler` (None: its own) and `steps`."""

    model: str
    steps: int
    sampler: str | None = None
    label: str | None = None  # None: the model's label
    note: str = ""
    seeds: str = "seeds"  # which BenchSettings field gives the number of seeds
    w: float | None = None  # guidance scale (class-conditional models)


MODELS = (
    BenchModel("teacher", "edm", "EDM teacher, Heun"),
    BenchModel("pd", "pd", "PD", teacher="teacher"),
    BenchModel("cd", "cd", "CD", teacher="teacher"),
    BenchModel("ct", "ct", "CT (mu0 = {mu0:g})"),
    # The same Algorithm 3 with CM's CIFAR-10 target decay (the dataclass default).
    BenchModel("ct_cm", "ct", "CT (mu0 = {mu0:g}, CM's CIFAR-10 value)", {"mu0": CTRecipe.mu0}),
    BenchModel("ict", "ict", "iCT"),
)

_TEACHER_NOTE = "teacher network"
ROWS = (
    BenchRow("exact", 18, "heun", "perfect teacher, Heun", "exact mixture denoiser"),
    BenchRow("exact", 10, "euler", "perfect teacher, DDIM", "exact mixture denoiser"),
    BenchRow("teacher", 1000, "ancestral", "DDPM ancestral", "teacher network, Karras grid", seeds="ddpm_seeds"),
    *(BenchRow("teacher", k, "euler", "DDIM (Euler)", _TEACHER_NOTE) for k in (50, 20, 10)),
    BenchRow("teacher", 5, "dpm_solver_2", "DPM-Solver-2", _TEACHER_NOTE),
    BenchRow("teacher", 10, "dpmpp_2m", "DPM-Solver++(2M)", _TEACHER_NOTE),
    BenchRow("teacher", 18),
    *(BenchRow(m.key, k) for m in MODELS[1:] for k in (1, 2)),
)

# LCM's table on labelled data, at one guidance scale.
LCM_W = 3.0
_LCM = "LCM (k = {k}, w in [{w_min:g}, {w_max:g}])"
LCM_MODELS = (
    BenchModel("teacher", "edm-cfg", "EDM-CFG teacher"),
    BenchModel("lcm", "lcm", _LCM, teacher="teacher"),
    BenchModel("lcm_exact", "lcm", _LCM + ", exact teacher", teacher="exact"),
    BenchModel("lcm_k1", "lcm", _LCM, {"k": 1}, teacher="teacher"),
    BenchModel("lcm_k20", "lcm", _LCM, {"k": 20}, teacher="teacher"),
    BenchModel("lcm_w3", "lcm", "LCM distilled at w = {w_min:g} only", {"w_min": LCM_W, "w_max": LCM_W},
               teacher="teacher"),
    BenchModel("cd_cfg", "lcm", "CD of the unguided teacher, CFG at sampling",
               {"guidance": "sampling", "w_min": 0.0, "w_max": 0.0, "p_uncond": 0.2}, teacher="teacher"),
)
_CFG = "guided: each call is one batch of 2B"
LCM_ROWS = (
    BenchRow("exact", 18, "heun", "perfect guided teacher, Heun", "exact mixture denoiser; " + _CFG, w=LCM_W),
    *(BenchRow("exact", k, "euler", "perfect guided teacher, DDIM", "exact mixture denoiser; " + _CFG, w=LCM_W)
      for k in (8, 4)),
    BenchRow("teacher", 18, None, None, _CFG, w=LCM_W),
    *(BenchRow("teacher", k, "euler", "EDM-CFG teacher, DDIM", _CFG, w=LCM_W) for k in (8, 4)),
    *(BenchRow("lcm", k, w=LCM_W) for k in (1, 2, 4)),
    *(BenchRow("lcm_exact", k, w=LCM_W) for k in (1, 2, 4)),
    *(BenchRow(m, k, w=LCM_W) for m in ("lcm_k1", "lcm_k20", "lcm_w3") for k in (1, 4)),
    *(BenchRow("cd_cfg", k, note=_CFG, w=LCM_W) for k in (1, 4)),
)

LATENT_DOMAINS = ("cifar10-latent",)
# LCM's table on CIFAR-10 latents (opt-in: --datasets cifar10-latent): the latent DDPM-CFG teacher's guided
# DDIM against LCM at the same w; FD of decoded images, the shipped classifier's accuracy, time per image.
LATENT_N = {"smoke": 64, "cpu": 1000, "gpu": 10_000}  # decoded images per row (at most the settings' n)
LATENT_MODELS = (
    BenchModel("teacher", "ddpm-cfg", "DDPM-CFG teacher, guided DDIM"),
    BenchModel("lcm", "lcm", "LCM (k = {k}, w in [{w_min:g}, {w_max:g}])", teacher="teacher"),
)
LATENT_ROWS = (*(BenchRow("teacher", k, note=_CFG, w=LCM_W) for k in (50, 20, 8, 4)),
               *(BenchRow("lcm", k, w=LCM_W) for k in (1, 2, 4)))


def result_row(label: str, res, note: str = "", train_seconds: float | None = None) -> dict:
    """A table row (a dict for format_table) from an EvalResult."""
    return {"method": label, "note": note, "train_seconds": train_seconds, "steps": res.steps, "nfe": res.nfe,
            "swd_mean": res.swd_mean, "swd_std": res.swd_std, "mode_tv": res.mode_error,
            "seconds_per_10k": res.seconds_per_10k}


def _train_models(ds, profile, out: Path, device, log, models=MODELS) -> dict:
    """{key: (model, run, label, train seconds, checkpoint)} for every BenchModel, trained or resumed."""
    trained = {}
    for m in models:
        run = make_run(m.method, ds, profile, **m.overrides)
        path = out / f"{m.key}.pt"
        teacher = "exact" if m.teacher == "exact" else trained[m.teacher][0] if m.teacher else None
        model, state = train_run(run, teacher=teacher, checkpoint_path=path, device=device, progress=False)
        label = m.label.format(**asdict(run.recipe))
        trained[m.key] = (model, run, label, state.seconds, path)
        log(f"  {label} done ({state.seconds:.0f} s training)")
    return trained


def _bench_dataset(ds: str, profile: str, s: BenchSettings, out: Path, device, log) -> list[dict]:
    seeds = tuple(range(s.seeds))
    domain = make_domain(make_run("edm", ds, profile))
    labelled = getattr(domain, "num_classes", None) is not None
    exact_run = make_run("edm-cfg" if labelled else "edm", ds, profile)
    floor = domain.class_floor(s.n, seeds) if labelled else domain.floor(s.n, seeds)
    rows = [{"method": "data vs data (noise floor)" + (", per class" if labelled else ""), "nfe": 0,
             "swd_mean": floor[0], "swd_std": floor[1], "note": "two fresh samples of the truth"}]
    trained = _train_models(ds, profile, out, device, log, LCM_MODELS if labelled else MODELS)
    for row in LCM_ROWS if labelled else ROWS:
        k = getattr(s, row.seeds)
        if not k or (row.model == "exact" and domain.exact_denoiser is None):
            continue
        if row.model == "exact":
            model, run, label, secs = domain.exact_denoiser, exact_run, row.label, None
        else:
            model, run, label, secs, path = trained[row.model]
            other = get_method(run.method).checkpoint_for(path, run.recipe, row.steps)
            if other != path:  # e.g. PD's 2-step student is its own checkpoint
                model, run = load_run(other, device=device)
            label = row.label or label
            secs = None if row.sampler else secs
        note = row.note + (f"; {k} seed(s)" if row.seeds != "seeds" else "")
        res = evaluate(model, run, steps=row.steps, sampler=row.sampler, n=s.n, seeds=tuple(range(k)), domain=domain,
                       w=row.w)
        note = "; ".join(t for t in (note, f"w = {row.w:g}, per class" if row.w is not None else "") if t)
        rows.append(result_row(label, res, note, secs))
    log(f"  {ds}: {len(rows)} rows")
    for r in rows:
        r["dataset"] = ds
        if "swd_mean" in r and floor[0] > 0:
            r["x_floor"] = r["swd_mean"] / floor[0]
    return rows


def _bench_latent(ds: str, profile: str, s: BenchSettings, out: Path, device, log) -> list[dict]:
    """LCM's rows on a latent image domain: FD and classifier accuracy of decoded samples, ms per image."""
    n = min(s.n, LATENT_N[profile])
    trained = _train_models(ds, profile, out, device, log, LATENT_MODELS)
    domain = make_domain(trained["teacher"][1])
    floor = domain.floor(n)
    rows = [{"method": "real training images (floor)", "fd_mean": floor[0], "fd_std": floor[1], "nfe": 0,
             "note": f"FD of {n} images against the test set"}]
    for row in LATENT_ROWS:
        model, run, label, secs, _ = trained[row.model]
        res = evaluate(model, run, steps=row.steps, n=n, seeds=(0,), domain=domain, w=row.w)
        note = "; ".join(t for t in (row.note, f"w = {row.w:g}") if t)
        rows.append({"dataset": ds, "method": label, "steps": res.steps, "nfe": res.nfe, "fd_mean": res.fd_mean,
                     "fd_std": res.fd_std, "accuracy": res.accuracy, "ms_per_image": 1000 * res.seconds_per_image,
                     "train_seconds": secs,
                     "note": note})
    rows[0]["dataset"] = ds
    log(f"  {ds}: {len(rows)} rows (n = {n} decoded images per row)")
    return rows


def format_latent_table(rows: list[dict]) -> str:
    """A markdown table of latent bench rows (FD, classifier accuracy, time per image including decoding)."""
    lines = ["| dataset | method | steps | calls | FD | classifier accuracy | ms / image (with decoding) | train s | note |",
             "|" + "---|" * 9]
    for r in rows:
        fmt = lambda k, f: (f.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
        lines.append(f"| {r['dataset']} | {r['method']} | {fmt('steps', '{}')} | {fmt('nfe', '{:.0f}')} | "
                     f"{r['fd_mean']:.3f} | {fmt('accuracy', '{:.3f}')} | {fmt('ms_per_image', '{:.2f}')} | "
                     f"{fmt('train_seconds', '{:.0f}')} | {r.get('note', '')} |")
    return "\n".join(lines)


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
    """Train (or resume from out_dir) every model on each dataset, measure each row, write table.md and results.json."""
    profile = get_profile(profile)
    s = BENCH_SETTINGS[profile]
    s = replace(s, **{k: v for k, v in (("datasets", tuple(datasets) if datasets else None), ("seeds", seeds),
                                         ("n", n)) if v is not None})
    if s.seeds < 1 or s.n < 2:
        raise ValueError("bench needs seeds >= 1 and n >= 2")
    device = get_device(device)
    out = Path(out_dir) / profile
    out.mkdir(parents=True, exist_ok=True)
    rows, latent, t0 = [], [], time.perf_counter()
    for ds in s.datasets:
        log(f"{ds} ({profile} profile, n = {s.n}, {s.seeds} seeds)")
        if resolve_data(ds)[0] in LATENT_DOMAINS:
            latent += _bench_latent(ds, profile, s, out / ds, device, log)
        else:
            rows += _bench_dataset(ds, profile, s, out / ds, device, log)
    table = "\n\n".join(t for t in (format_table(rows) if rows else "", format_latent_table(latent) if latent else "")
                         if t)
    rows = rows + latent
    header = (f"fewstep bench --profile {profile}: n = {s.n}, {s.seeds} seeds, device {device}, "
              f"torch threads {torch.get_num_threads()}, total {time.perf_counter() - t0:.0f} s")
    # Atomic writes: an interrupted run or a full disk keeps the previous table.
    atomic_write_text(out / "table.md", header + "\n\n" + table + "\n")
    atomic_write_text(out / "results.json", json.dumps({"settings": asdict(s), "rows": rows}, indent=1))
    log(header)
    log(table)
    return rows
