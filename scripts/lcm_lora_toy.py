"""LCM-LoRA and style LoRA on 8gaussians-4class: per-class sliced W2 against the exact guided teacher.

    OMP_NUM_THREADS=1 python scripts/lcm_lora_toy.py --profile cpu --out runs/lora

Trains (or reuses, in --out) an edm-cfg teacher, an lcm-lora student of it (at its one w) and a style
LoRA of it on 8gaussians-4class-inner; then prints, per class c and on average over the 4 classes,
the sliced W2 between n samples and the exact guided reference: Heun, 18 steps (35 NFE), driven by
guidance.CFGDenoiser(exact denoiser, w), with a floor (the reference sampler against itself, other
seeds). A class is two modes 1.4 apart, so W2 between two finite samples is dominated by the binomial
spread of the mode weights (the floor).
Rows: the exact guided teacher's own floor, the edm-cfg teacher guided at w (Heun 35), LCM-LoRA at 1/2/4
steps, the boundary-wrapped teacher alone (lambda_acc = 0) at 4 steps, and teacher + acceleration +
style (combine) at 4 steps against the inner mixture's guided reference. Also the adapter file size
against the model's, and the trainable fraction.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewstep_lab.data.toy2d import get_dataset
from fewstep_lab.guidance import CFGDenoiser
from fewstep_lab.methods.lora import LCMBoundary, combine, export_adapter
from fewstep_lab.metrics import sliced_w2
from fewstep_lab.nets.lora import count_trainable
from fewstep_lab.pipeline import build_model, default_sigmas, load_or_train, load_run, make_run
from fewstep_lab.sampling import get_sampler
from fewstep_lab.schedules import karras_sigmas


def class_samples(D, sampler, sigmas, c, n, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    x = sigmas[0] * torch.randn(n, 2, generator=g)
    with torch.no_grad():
        return get_sampler(sampler)(D, x, sigmas, cond=torch.full((n,), c), generator=g, **kw).float()


def per_class_w2(D, sampler, sigmas, ref, n, seeds):
    """{class: mean over seeds of sliced W2 against ref[c][seed]} and the mean over classes."""
    out = {}
    for c in ref:
        vals = [sliced_w2(class_samples(D, sampler, sigmas, c, n, 1000 + s), ref[c][s],
                          generator=torch.Generator().manual_seed(s)) for s in seeds]
        out[c] = sum(vals) / len(vals)
    return out, sum(out.values()) / len(out)


def row(name, res):
    per, mean = res
    print(f"{name:<42} mean {mean:.4f}   " + "  ".join(f"c{c} {v:.4f}" for c, v in per.items()), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--out", default="runs/lora")
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--w-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="instead: train a student on w ~ U[LO, HI] and compare it with the exact guided teacher "
                         "at LO, the middle and HI (what a student that cannot see w learns from a range)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out, seeds = Path(a.out), range(a.seeds)
    if a.w_range:
        return w_range(a, out, seeds)
    t0 = time.time()
    teacher, t_run = load_or_train(make_run("edm-cfg", "8gaussians-4class", a.profile), out / "edm-cfg.pt",
                                   progress=False)
    print(f"teacher ready ({time.time() - t0:.0f} s)", flush=True)
    t0 = time.time()
    student, run = load_or_train(make_run("lcm-lora", "8gaussians-4class", a.profile), out / "lcm-lora.pt",
                                 teacher=out / "edm-cfg.pt", progress=False)
    print(f"lcm-lora ready ({time.time() - t0:.0f} s)", flush=True)
    t0 = time.time()
    load_or_train(make_run("lora", "8gaussians-4class-inner", a.profile), out / "style.pt",
                  teacher=out / "edm-cfg.pt", progress=False)
    print(f"style lora ready ({time.time() - t0:.0f} s)", flush=True)
    student, run = load_run(out / "lcm-lora.pt")
    teacher, t_run = load_run(out / "edm-cfg.pt")
    r = run.recipe
    assert r.w_min == r.w_max, "this script measures a student trained at one w"
    w = r.w_min
    acc = export_adapter(out / "lcm-lora.pt")
    sty = export_adapter(out / "style.pt")
    n_model = sum(v.numel() for v in teacher.state_dict().values())
    trainable, total = count_trainable(build_model(run))  # load_run freezes everything: count a fresh build
    print(f"adapter file {acc.stat().st_size} bytes vs model weights {4 * n_model} bytes (fp32): ratio "
          f"{acc.stat().st_size / (4 * n_model):.3f}; trainable {trainable} of {total} parameters "
          f"({trainable / total:.3f}); rank {r.rank}")

    heun = karras_sigmas(18, r.sigma_min, r.sigma_max, r.rho)
    refs = {}
    for name in ("8gaussians-4class", "8gaussians-4class-inner"):
        exact = CFGDenoiser(get_dataset(name).denoiser, w, 4)
        refs[name] = (exact, {c: [class_samples(exact, "heun", heun, c, a.n, 5000 + s) for s in seeds]
                              for c in range(4)})
    exact, ref = refs["8gaussians-4class"]
    print(f"\nper-class sliced W2 against the exact guided teacher (w = {w}, Heun 35 NFE), n = {a.n}, "
          f"{a.seeds} seeds")
    row("floor: exact guided Heun-35 (other seeds)", per_class_w2(exact, "heun", heun, ref, a.n, seeds))
    row("edm-cfg teacher guided, Heun 35", per_class_w2(CFGDenoiser(teacher, w, 4), "heun", heun, ref, a.n, seeds))
    for steps in (1, 2, 4):
        row(f"LCM-LoRA, {steps} step(s)", per_class_w2(student, "lcm", default_sigmas(run, steps), ref, a.n, seeds))
    wrapped = LCMBoundary(teacher, sigma_min=r.sigma_min)
    row("teacher alone, boundary-wrapped, 4 steps", per_class_w2(wrapped, "lcm", default_sigmas(run, 4), ref, a.n,
                                                                seeds))
    inner_exact, inner_ref = refs["8gaussians-4class-inner"]
    print("\nagainst the inner mixture's exact guided reference (the style data)")
    row("floor: exact guided Heun-35 (other seeds)", per_class_w2(inner_exact, "heun", heun, inner_ref, a.n, seeds))
    style, _ = load_run(out / "style.pt")
    row("style LoRA guided, Heun 35", per_class_w2(CFGDenoiser(style, w, 4), "heun", heun,
                                                                         inner_ref, a.n, seeds))
    for lam in (0.0, 1.0):
        both = combine(teacher, [(acc, 1.0), (sty, lam)])
        row(f"teacher + acc + {lam} style, 4 steps", per_class_w2(both, "lcm", default_sigmas(run, 4), inner_ref,
                                                                  a.n, seeds))


def w_range(a, out, seeds):
    lo, hi = a.w_range
    load_or_train(make_run("edm-cfg", "8gaussians-4class", a.profile), out / "edm-cfg.pt", progress=False)
    t0 = time.time()
    path = out / f"lcm-lora-w{lo:g}-{hi:g}.pt"
    load_or_train(make_run("lcm-lora", "8gaussians-4class", a.profile, w_min=lo, w_max=hi), path,
                  teacher=out / "edm-cfg.pt", progress=False)
    print(f"lcm-lora on w ~ U[{lo:g}, {hi:g}] ready ({time.time() - t0:.0f} s)", flush=True)
    student, run = load_run(path)
    r = run.recipe
    heun = karras_sigmas(18, r.sigma_min, r.sigma_max, r.rho)
    for w in (lo, (lo + hi) / 2, hi):
        exact = CFGDenoiser(get_dataset("8gaussians-4class").denoiser, w, 4)
        ref = {c: [class_samples(exact, "heun", heun, c, a.n, 5000 + s) for s in seeds] for c in range(4)}
        print(f"against the exact guided teacher at w = {w:g} (Heun 35), n = {a.n}, {a.seeds} seeds")
        for steps in (1, 2, 4):
            row(f"  LCM-LoRA (w range), {steps} step(s)", per_class_w2(student, "lcm", default_sigmas(run, steps), ref,
                                                                     a.n, seeds))


if __name__ == "__main__":
    main()
