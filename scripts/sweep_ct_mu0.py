"""Consistency training (CM Algorithm 3) on toy 2-D data as its target EMA decay mu0 is varied.

CM's mu(k) = exp(s0 ln(mu0) / N(k)) ties the target network's EMA to the number of levels N(k);
on CIFAR-10 CM used mu0 = 0.9 (with s0 = 2, s1 = 150). This script trains the cpu-profile CT
recipe (make_run("ct", ...)) with each mu0 given, everything else fixed, and prints the one- and
two-step sliced W2 (pipeline.evaluate) beside the data-vs-data floor. It
is where the toy recipes' mu0 comes from (see methods.consistency.CTRecipe).

    python scripts/sweep_ct_mu0.py --dataset 8gaussians                  # about 2 min per value
    python scripts/sweep_ct_mu0.py --dataset checkerboard --mu0 0.9 0.01
"""

import argparse
import time
import torch

from fewstep_lab.losses.consistency import ct_mu
from fewstep_lab.pipeline import evaluate, make_domain, make_run, train_run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="8gaussians")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--mu0", type=float, nargs="+", default=[0.9, 0.5, 0.1, 0.01, 0.001])
    p.add_argument("--n", type=int, default=20_000, help="points per evaluation (default 20,000)")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = tuple(range(args.seeds))
    base_run = make_run("ct", args.dataset, args.profile)
    base = base_run.recipe
    floor = make_domain(base_run).floor(args.n, seeds)
    print(f"CT on {args.dataset}, {args.profile} profile: {base.steps} steps, s0 = {base.s0}, s1 = {base.s1}, "
          f"l2, uniform levels; sliced W2 at n = {args.n}, {args.seeds} seeds; torch threads {args.threads}")
    print(f"\n| mu0 | mu at N = s1 + 1 | 1 step | 2 steps | train s |\n|---|---|---|---|---|\n"
          f"| data vs data (floor) | | {floor[0]:.4f} ± {floor[1]:.4f} | | |", flush=True)
    for mu0 in args.mu0:
        run = make_run("ct", args.dataset, args.profile, mu0=mu0)
        recipe = run.recipe
        t0 = time.perf_counter()
        f, _ = train_run(run, progress=False)
        seconds = time.perf_counter() - t0
        res = [evaluate(f, run, steps=k, n=args.n, seeds=seeds) for k in (1, 2)]
        cells = " | ".join(f"{r.swd_mean:.4f} ± {r.swd_std:.4f}" for r in res)
        mu_end = ct_mu(recipe.steps, recipe.steps, recipe.s0, recipe.s1, mu0)  # mu(K), at N = s1 + 1
        print(f"| {mu0:g} | {mu_end:.4f} | {cells} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
