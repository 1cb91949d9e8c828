"""The ``fewstep`` command (also ``python -m fewstep_lab``): train, sample, evaluate, run the course.

    fewstep train  --method edm --dataset 8gaussians --out runs/toy/edm_8g.pt
    fewstep sample --ckpt runs/toy/edm_8g.pt --sampler heun --steps 18 --out samples.png
    fewstep eval   --ckpt runs/toy/edm_8g.pt --sampler heun --steps 18 --n 50000
    fewstep course --profile smoke
    fewstep bench  --profile cpu
    fewstep data   cifar10
    fewstep cifar train --method edm --profile cpu --out runs/cifar/edm.pt   (also under torchrun)
    fewstep cifar eval  --ckpt runs/cifar/cd.pt --steps 1 2 --n 1000

Every command takes --profile (smoke | cpu | gpu; default from FEWSTEP_PROFILE or the
hardware). Arguments are turned into recipe fields here and nowhere else.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["main", "build_parser"]

TOY_METHODS = ("edm", "ddpm", "cd", "ct", "ict", "pd")


def _add_common(p):
    p.add_argument("--profile", default=None, help="smoke | cpu | gpu (default: $FEWSTEP_PROFILE or the hardware)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: best available)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fewstep", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a toy 2-D model (teacher or few-step student)")
    _add_common(p)
    p.add_argument("--method", choices=TOY_METHODS, default="edm")
    p.add_argument("--dataset", default="8gaussians", help="toy dataset name (see fewstep_lab.data.toy2d.DATASETS)")
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint for cd/pd, or 'exact' for the Gaussian mixture's exact denoiser")
    p.add_argument("--steps", type=int, default=None, help="override the profile's number of training steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", required=True, help="checkpoint path (resumed if it exists, unless --restart)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("sample", help="draw samples from a toy checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--sampler", default=None, help="sampler name (default: heun for teachers, consistency for CMs)")
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps (default per model)")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help=".png (scatter plot), .npy or .csv")

    p = sub.add_parser("eval", help="sliced W2 of a toy checkpoint's samples against fresh data, with the noise floor")
    p.add_argument("--ckpt", required=True, help="checkpoint path, or 'exact:<dataset>' for the exact mixture denoiser")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--seeds", type=int, default=3)

    p = sub.add_parser("course", help="execute the notebooks headless, writing executed copies under runs/")
    p.add_argument("--profile", default=None, help="smoke | cpu | gpu (default: $FEWSTEP_PROFILE or the hardware)")
    p.add_argument("--out", default="runs/course")
    p.add_argument("--only", nargs="*", default=None, help="notebook numbers or name parts, e.g. 01 03")
    p.add_argument("--inplace", action="store_true", help="overwrite the notebooks with their executed versions")

    p = sub.add_parser("bench", help="the seed paper's table on toy 2-D data: quality vs NFE for every method")
    _add_common(p)
    p.add_argument("--datasets", nargs="*", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--out", default="runs/bench")

    _add_cifar(sub)

    p = sub.add_parser("data", help="where the datasets are found; --download fetches CIFAR-10 (needs internet)")
    p.add_argument("name", choices=["cifar10"])
    p.add_argument("--root", default=None, help="dataset folder (default: $FEWSTEP_DATA or the usual places)")
    p.add_argument("--download", action="store_true")
    return ap


def _add_cifar(sub):
    p = sub.add_parser("cifar", help="CIFAR-10 consistency models: train (also under torchrun) or evaluate FD")
    actions = p.add_subparsers(dest="cifar_command", required=True, metavar="ACTION")
    q = actions.add_parser("train", help="train an EDM teacher, CD from it, or iCT; several GPUs: "
                                         "torchrun --nproc_per_node=N -m fewstep_lab cifar train ...")
    _add_common(q)
    q.add_argument("--method", choices=("edm", "cd", "ict"), default="edm")
    q.add_argument("--teacher", default=None, help="the EDM teacher's checkpoint (for --method cd)")
    q.add_argument("--steps", type=int, default=None, help="override the profile's number of training steps")
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--data", default=None, help="CIFAR-10 folder (default: $FEWSTEP_DATA or the usual places)")
    q.add_argument("--out", required=True, help="checkpoint path (resumed if it exists, unless --restart)")
    q.add_argument("--restart", action="store_true", help="ignore an existing checkpoint at --out")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q = actions.add_parser("eval", help="FD (the course's classifier features, not FID) of a checkpoint's samples")
    _add_common(q)
    q.add_argument("--ckpt", required=True)
    q.add_argument("--steps", type=int, nargs="*", default=None,
                   help="sampling steps, several allowed (default: 18 Heun steps for a teacher, 1 and 2 for a CM)")
    q.add_argument("--n", type=int, default=1000, help="samples per FD (compare methods at equal n)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--data", default=None, help="CIFAR-10 folder (default: $FEWSTEP_DATA or the usual places)")


def _cmd_cifar(a):
    from . import cifar

    if a.cifar_command == "eval":
        return _cmd_cifar_eval(a, cifar)
    from .distributed import close_distributed, init_distributed
    from .profiles import get_profile

    info = init_distributed(a.device)  # under torchrun: join the group; alone: a single process
    out = Path(a.out)
    try:
        if a.restart and out.exists() and info.is_main:
            out.unlink()
        if info.distributed:
            import torch.distributed as dist

            dist.barrier()  # no rank may resume from a checkpoint that rank 0 is deleting
        recipe = cifar.cifar_recipe(a.method, get_profile(a.profile))
        recipe = replace(recipe, **{k: v for k, v in (("steps", a.steps), ("seed", a.seed)) if v is not None})
        images = cifar.load_images(recipe, root=a.data)
        kw = dict(images=images, checkpoint_path=out, device=info.device, distributed=info.distributed,
                  progress=not a.quiet, checkpoint_every=max(recipe.steps // 10, 1))
        if a.method == "cd":
            if a.teacher is None:
                raise ValueError("cd distils a teacher: pass --teacher CKPT (train one with --method edm)")
            _, state = cifar.train_cifar_cd(a.teacher, recipe, **kw)
        elif a.method == "ict":
            _, state = cifar.train_cifar_ct(recipe, **kw)
        else:
            _, state = cifar.train_cifar_teacher(recipe, **kw)
    finally:
        close_distributed()
    if info.is_main:
        last = f"{state.losses[-1][1]:.4f}" if state.losses else "n/a"
        print(f"trained cifar {a.method} ({get_profile(a.profile)} profile, {info.world_size} process(es)) for "
              f"{state.step} steps in {state.seconds:.1f} s; last loss {last}; checkpoint {out}")


def _cmd_cifar_eval(a, cifar):
    from .metrics_images import load_fd_classifier
    from .profiles import get_device

    if a.n < 2:
        raise ValueError(f"--n must be >= 2, got {a.n}")
    device = get_device(a.device)
    model, recipe = cifar.load_cifar(a.ckpt, device=device)
    classifier = load_fd_classifier(device=device)
    reference = cifar.fd_reference(recipe, classifier, root=a.data)
    print(f"{type(recipe).__name__}, classes {recipe.classes or 'all'}, {recipe.resolution}px, n = {a.n}")
    for steps in a.steps or ([18] if isinstance(recipe, cifar.CifarEDMRecipe) else [1, 2]):
        sigmas = cifar.sampling_sigmas(recipe, steps)
        x = cifar.sample_images(model, recipe, a.n, sigmas=sigmas, seed=a.seed)
        print(f"steps {steps:>3}  NFE {cifar.nfe(recipe, sigmas):>3}  FD {cifar.image_fd(x, reference, classifier):9.3f}")
    images = cifar.load_images(recipe, root=a.data)
    print(f"real vs real (the floor)  FD {cifar.fd_floor(recipe, a.n, reference, classifier, seed=a.seed, images=images):9.3f}")


def _teacher(arg, dataset):
    from .data.toy2d import get_dataset
    from .toy import load_toy

    if arg is None:
        raise SystemExit("this method distils a teacher: pass --teacher CKPT (or --teacher exact)")
    if arg == "exact":
        data = get_dataset(dataset)
        if not hasattr(data, "denoiser"):
            raise SystemExit(f"--teacher exact needs a dataset with an exact denoiser; {dataset!r} is sample-only")
        return data.denoiser
    return load_toy(arg)[0]


def _cmd_train(a):
    from .profiles import get_device, get_profile
    from .recipes import toy_recipe

    profile, device = get_profile(a.profile), get_device(a.device)
    out = Path(a.out)
    if a.restart and out.exists():
        out.unlink()
    if a.method in ("edm", "ddpm"):
        from .toy import train_toy

        recipe = toy_recipe(a.method, a.dataset, profile)
        recipe = replace(recipe, **{k: v for k, v in (("steps", a.steps), ("seed", a.seed)) if v is not None})
        _, state = train_toy(recipe, checkpoint_path=out, device=device, progress=not a.quiet,
                             checkpoint_every=max(recipe.steps // 10, 1))
    else:
        from . import toy_consistency as tc

        state = tc.train_from_cli(a.method, a.dataset, profile, device=device, checkpoint_path=out,
                                  teacher=_teacher(a.teacher, a.dataset) if a.method in ("cd", "pd") else None,
                                  steps=a.steps, seed=a.seed, progress=not a.quiet)
    last = f"{state.losses[-1][1]:.4f}" if state.losses else "n/a"
    print(f"trained {a.method} on {a.dataset} ({profile} profile) for {state.step} steps in "
          f"{state.seconds:.1f} s; last loss {last}; checkpoint {out}")


def _load_any(ckpt, sampler, steps):
    """(D, dataset, sampler, sigmas) for a toy checkpoint or 'exact:<dataset>', with per-model defaults."""
    from .data.toy2d import get_dataset
    from .schedules import karras_sigmas
    from .train import read_checkpoint_meta

    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if ckpt.startswith("exact:"):
        name = ckpt.split(":", 1)[1]
        return get_dataset(name).denoiser, name, sampler or "heun", karras_sigmas(steps or 18)
    meta = read_checkpoint_meta(ckpt)
    if meta["recipe"]["class"] == "ToyRecipe":
        from .toy import load_toy

        D, recipe = load_toy(ckpt)
        if recipe.method == "ddpm":
            # A DDPM network knows only its own timesteps: sample on its grid (all T for ancestral).
            sampler = sampler or "ancestral"
            sched = D.schedule
            steps = steps or (sched.num_steps if sampler in ("ancestral", "ddpm") else 50)
            return D, recipe.dataset, sampler, sched.ddim_sigmas(steps)
        return D, recipe.dataset, sampler or "heun", karras_sigmas(steps or 18)
    from . import toy_consistency as tc

    f, recipe = tc.load_toy_consistency(ckpt)
    sampler = sampler or tc.default_sampler(recipe)
    return f, recipe.dataset, sampler, tc.default_sigmas(recipe, steps)


def _cmd_sample(a):
    import numpy as np
    import torch

    from .sampling import get_sampler

    D, dataset, sampler, sigmas = _load_any(a.ckpt, a.sampler, a.steps)
    steps = len(sigmas) - 1
    g = torch.Generator().manual_seed(a.seed)
    out = get_sampler(sampler)(D, sigmas[0] * torch.randn(a.n, 2, generator=g), sigmas, generator=g)
    x = (out[0] if isinstance(out, tuple) else out).numpy()
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.set_aspect("equal")
        ax.set_title(f"{dataset}: {sampler}, {steps} steps")
        fig.savefig(path, dpi=120, bbox_inches="tight")
    elif path.suffix == ".npy":
        np.save(path, x)
    elif path.suffix == ".csv":
        np.savetxt(path, x, delimiter=",", header="x,y", comments="")
    else:
        raise SystemExit(f"unknown output type {path.suffix!r}; use .png, .npy or .csv")
    print(f"wrote {a.n} samples ({sampler}, {steps} steps) to {path}")


def _cmd_eval(a):
    from .data.toy2d import get_dataset
    from .metrics import mean_std, noise_floor
    from .toy import evaluate_sampler

    if a.n < 2 or a.seeds < 1:
        raise SystemExit("--n must be >= 2 and --seeds >= 1")
    D, dataset, sampler, sigmas = _load_any(a.ckpt, a.sampler, a.steps)
    res = evaluate_sampler(D, dataset, sampler, len(sigmas) - 1, n=a.n, seeds=tuple(range(a.seeds)),
                           sigmas=sigmas)
    floor = mean_std(noise_floor(get_dataset(dataset).sample, a.n, seeds=tuple(range(a.seeds))))
    print(f"{dataset}, n = {a.n}, {a.seeds} seeds")
    print(res.row())
    print(f"{'data vs data':>14} (noise floor)              sliced-W2 {floor[0]:.4f} ± {floor[1]:.4f}")


def _cmd_course(a):
    from .course import run_course

    run_course(profile=a.profile, out_dir=a.out, only=a.only, inplace=a.inplace)


def _cmd_bench(a):
    from .bench import run_bench

    run_bench(profile=a.profile, datasets=a.datasets, seeds=a.seeds, n=a.n, out_dir=a.out, device=a.device)


def _cmd_data(a):
    from .data import images

    if a.download:
        root = Path(a.root or "data/cifar10")
        images.download_cifar10(root)
        print(f"downloaded CIFAR-10 to {root}")
        return
    print(f"CIFAR-10 found at {images.find_cifar10(a.root)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": _cmd_train, "sample": _cmd_sample, "eval": _cmd_eval, "course": _cmd_course,
               "bench": _cmd_bench, "data": _cmd_data, "cifar": _cmd_cifar}[args.command]
    try:
        handler(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"fewstep {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
